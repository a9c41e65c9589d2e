"""/v1/files: upload (streamed to disk, size-limited), list, retrieve, delete, download content."""
from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from app.auth import require_api_key
from app.batch_output import file_object
from app.batch_store import create_file, delete_file, get_file, list_files
from app.errors import invalid_request, not_found
from app.file_storage import is_file_id, new_file_id
from app.owner import current_owner
from app.upload import receive_upload

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
PURPOSES = ("batch",)


@router.post("/files")
async def upload_file(request: Request, owner: str | None = Depends(current_owner)) -> dict[str, Any]:
    state = request.app.state
    file_id = new_file_id()
    upload = await receive_upload(request, state.storage, file_id, state.settings.max_upload_bytes)
    purpose = upload.fields.get("purpose")
    if purpose not in PURPOSES:
        state.storage.delete(file_id)
        raise invalid_request(f"purpose must be one of {list(PURPOSES)}, got {purpose!r}", param="purpose")
    if upload.size == 0:
        state.storage.delete(file_id)
        raise invalid_request("the file is empty", param="file", code="empty_file")

    def record():
        with state.sessions() as s:
            return create_file(s, file_id=file_id, owner=owner, purpose=purpose, filename=upload.filename,
                               size=upload.size)
    return file_object(await asyncio.to_thread(record))


@router.get("/files")
def list_all_files(request: Request, owner: str | None = Depends(current_owner), purpose: str | None = None,
                   after: str | None = None, limit: int = Query(20, ge=1, le=10_000),
                   order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    with request.app.state.sessions() as s:
        files = list_files(s, owner, purpose=purpose, after=after, limit=limit + 1, order=order)
    page = [file_object(f) for f in files[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(files) > limit}


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, request: Request, owner: str | None = Depends(current_owner)) -> dict[str, Any]:
    return file_object(_owned_file(request, file_id, owner))


@router.delete("/files/{file_id}")
def remove_file(file_id: str, request: Request, owner: str | None = Depends(current_owner)) -> dict[str, Any]:
    with request.app.state.sessions() as s:
        deleted = delete_file(s, file_id, owner) if is_file_id(file_id) else None
    if deleted is None:
        raise _no_such_file(file_id)
    request.app.state.storage.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(file_id: str, request: Request, owner: str | None = Depends(current_owner)) -> StreamingResponse:
    _owned_file(request, file_id, owner)
    storage = request.app.state.storage
    if not storage.exists(file_id):
        raise _no_such_file(file_id)
    return StreamingResponse(storage.iter_chunks(file_id), media_type="application/octet-stream",
                             headers={"Content-Length": str(storage.size(file_id))})


def _owned_file(request: Request, file_id: str, owner: str | None):
    if not is_file_id(file_id):
        raise _no_such_file(file_id)
    with request.app.state.sessions() as s:
        file = get_file(s, file_id, owner)
    if file is None:
        raise _no_such_file(file_id)
    return file


def _no_such_file(file_id: str):
    return not_found(f"No such File object: {file_id}", param="file_id")
