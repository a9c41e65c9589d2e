"""/v1/batches: create (validated in the background, then dispatched), retrieve, list, cancel."""
from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.auth import require_api_key
from app.batch_jobs import create_batch_for_file
from app.batch_output import batch_object
from app.batch_store import batch_counts, cancel_batch, get_batch, list_batches
from app.errors import not_found
from app.owner import current_owner

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return value


@router.post("/batches")
async def create(body: CreateBatch, request: Request, owner: str | None = Depends(current_owner)) -> dict[str, Any]:
    state = request.app.state

    def record():
        with state.sessions() as s:
            batch = create_batch_for_file(s, owner, body.input_file_id, body.endpoint, body.completion_window,
                                          body.metadata)
            return batch_object(batch, batch_counts(s, batch))

    created = await asyncio.to_thread(record)
    state.pipeline.accept(created["id"])
    return created


@router.get("/batches/{batch_id}")
def retrieve(batch_id: str, request: Request, owner: str | None = Depends(current_owner)) -> dict[str, Any]:
    with request.app.state.sessions() as s:
        batch = get_batch(s, batch_id, owner)
        if batch is None:
            raise _no_such_batch(batch_id)
        return batch_object(batch, batch_counts(s, batch))


@router.get("/batches")
def list_all(request: Request, owner: str | None = Depends(current_owner), after: str | None = None,
             limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
    with request.app.state.sessions() as s:
        batches = list_batches(s, owner, after=after, limit=limit + 1)
        page = [batch_object(b, batch_counts(s, b)) for b in batches[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(batches) > limit}


@router.post("/batches/{batch_id}/cancel")
def cancel(batch_id: str, request: Request, owner: str | None = Depends(current_owner)) -> dict[str, Any]:
    with request.app.state.sessions() as s:
        batch = cancel_batch(s, batch_id, owner)
        if batch is None:
            raise _no_such_batch(batch_id)
        return batch_object(batch, batch_counts(s, batch))


def _no_such_batch(batch_id: str):
    return not_found(f"No such Batch object: {batch_id}", param="batch_id")
