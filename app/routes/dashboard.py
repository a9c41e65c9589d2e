"""The dashboard: server-rendered pages (templates/) refreshed by htmx polling. Everything on them comes from
the job store and the workers' heartbeats."""
from __future__ import annotations

import asyncio
import html
from pathlib import Path

import js_lib_htmx
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from app.batch_jobs import create_batch_for_file
from app.batch_store import cancel_batch, create_file, get_file
from app.dashboard_charts import live_charts, progress_svg
from app.dashboard_data import admin_workers, job_detail, job_rows, live_series
from app.errors import OpenAIError, not_found
from app.file_storage import is_file_id, new_file_id
from app.ui_auth import ADMIN_COOKIE, API_COOKIE, LoginRequired, require_admin, ui_owner
from app.upload import receive_upload
from app.worker_client import WorkerLost, open_generation

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
HTMX = Path(js_lib_htmx.__file__).parent / "static" / "htmx" / "htmx.min.js"
templates = Jinja2Templates(directory=TEMPLATES)
router = APIRouter(include_in_schema=False)  # HTML pages, not part of the API


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


templates.env.filters["duration"] = _duration


def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def login_page(request: Request, exc: LoginRequired) -> HTMLResponse:
    return page(request, "login.html", 401, active="", message=exc.message, next=request.url.path)


@router.get("/static/htmx.min.js")
def htmx_js() -> FileResponse:
    return FileResponse(HTMX, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/ui/login")
def login_form(request: Request, next: str = "/ui/jobs") -> HTMLResponse:
    return page(request, "login.html", active="", message=None, next=next)


@router.post("/ui/login")
def login(request: Request, api_key: str = Form(""), admin_key: str = Form(""), next: str = Form("/ui/jobs")):
    target = next if next.startswith("/ui/") else "/ui/jobs"  # never an open redirect
    response = RedirectResponse(target, status_code=303)
    for cookie, value in ((API_COOKIE, api_key), (ADMIN_COOKIE, admin_key)):
        if value:
            response.set_cookie(cookie, value.strip(), httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
    return response


# ---- jobs ------------------------------------------------------------------------------------------

@router.get("/ui/jobs")
def jobs_page(request: Request, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    with request.app.state.sessions() as s:
        return page(request, "jobs.html", active="Jobs", jobs=job_rows(s, owner))


@router.get("/ui/jobs/table")
def jobs_table(request: Request, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    with request.app.state.sessions() as s:
        return page(request, "_jobs_table.html", jobs=job_rows(s, owner))


@router.post("/ui/jobs")
async def upload_job(request: Request, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    state = request.app.state
    file_id = new_file_id()
    try:
        upload = await receive_upload(request, state.storage, file_id, state.settings.max_upload_bytes)
        if upload.size == 0:
            state.storage.delete(file_id)
            raise OpenAIError("the file is empty", param="file")

        def record():
            with state.sessions() as s:
                create_file(s, file_id=file_id, owner=owner, purpose="batch", filename=upload.filename,
                            size=upload.size)
                return create_batch_for_file(s, owner, file_id, upload.fields.get("endpoint", "/v1/chat/completions")).id

        batch_id = await asyncio.to_thread(record)
    except OpenAIError as exc:
        return HTMLResponse(f'<p class="error" role="alert">{html.escape(exc.message)}</p>', status_code=200)
    state.pipeline.accept(batch_id)
    message = (f'<p>Uploaded {html.escape(upload.filename)} ({upload.size:,} bytes): batch '
               f'<a href="/ui/jobs/{batch_id}">{batch_id}</a> is validating.</p>')
    return HTMLResponse(message, headers={"HX-Trigger": "jobs-changed"})


@router.post("/ui/jobs/{batch_id}/cancel")
def cancel_job(batch_id: str, request: Request, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    with request.app.state.sessions() as s:
        if cancel_batch(s, batch_id, owner) is None:
            raise not_found(f"No such Batch object: {batch_id}")
        return page(request, "_jobs_table.html", jobs=job_rows(s, owner))


@router.get("/ui/jobs/{batch_id}")
def job_page(batch_id: str, request: Request, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    return _job(request, batch_id, owner, "job.html")


@router.get("/ui/jobs/{batch_id}/panel")
def job_panel(batch_id: str, request: Request, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    return _job(request, batch_id, owner, "_job_panel.html")


def _job(request: Request, batch_id: str, owner: str | None, template: str) -> HTMLResponse:
    with request.app.state.sessions() as s:
        detail = job_detail(s, batch_id, owner)
    if detail is None:
        return HTMLResponse("<p>No such batch.</p>", status_code=404)
    return page(request, template, active="Jobs", detail=detail, progress_svg=progress_svg(detail))


@router.get("/ui/files/{file_id}")
def download(file_id: str, request: Request, owner: str | None = Depends(ui_owner)) -> Response:
    storage = request.app.state.storage
    with request.app.state.sessions() as s:
        file = get_file(s, file_id, owner) if is_file_id(file_id) else None
    if file is None or not storage.exists(file_id):
        return HTMLResponse("<p>No such file.</p>", status_code=404)
    return FileResponse(storage.path(file_id), media_type="application/jsonl", filename=file.filename)


# ---- live charts -----------------------------------------------------------------------------------

@router.get("/ui/live")
def live_page(request: Request, minutes: int = 10, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    return page(request, "live.html", active="Live", minutes=minutes, charts=_charts(request, minutes))


@router.get("/ui/live/charts")
def live_charts_partial(request: Request, minutes: int = 10, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    return page(request, "_live_charts.html", charts=_charts(request, minutes))


def _charts(request: Request, minutes: int) -> list[str]:
    minutes = max(1, min(minutes, 60))
    with request.app.state.sessions() as s:
        return live_charts(live_series(s, minutes))


# ---- admin -----------------------------------------------------------------------------------------

@router.get("/ui/admin")
def admin_page(request: Request, _: None = Depends(require_admin)) -> HTMLResponse:
    return page(request, "admin.html", active="Admin", workers=_workers(request))


@router.get("/ui/admin/table")
def admin_table(request: Request, _: None = Depends(require_admin)) -> HTMLResponse:
    return page(request, "_admin_table.html", workers=_workers(request))


def _workers(request: Request):
    with request.app.state.sessions() as s:
        return admin_workers(s, request.app.state.settings.worker_stale_after_s)


# ---- playground ------------------------------------------------------------------------------------

@router.get("/ui/playground")
async def playground(request: Request, owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    return page(request, "playground.html", active="Playground", models=await request.app.state.router.models())


@router.post("/ui/playground")
async def playground_send(request: Request, model: str = Form(...), message: str = Form(...),
                          max_tokens: str = Form("64"), owner: str | None = Depends(ui_owner)) -> HTMLResponse:
    state = request.app.state
    tokens = int(max_tokens) if max_tokens.strip().isdigit() and int(max_tokens) > 0 else 64
    payload = {"prompt": [{"role": "user", "content": message}], "request_class": "online",
               "params": {"max_tokens": min(tokens, 1024), "temperature": 0.0}}
    headers = {"x-conserve-internal-token": state.settings.internal_token} if state.settings.internal_token else {}
    try:
        stream = await open_generation(state.http, state.router, model, payload, headers)
        async with stream:
            text = "".join([event["delta"] async for event in stream.events()])
    except (OpenAIError, WorkerLost) as exc:
        return HTMLResponse(f'<p class="error" role="alert">{html.escape(getattr(exc, "message", str(exc)))}</p>')
    return HTMLResponse(f'<div class="card"><strong>{html.escape(model)}</strong><p>{html.escape(text)}</p></div>')
