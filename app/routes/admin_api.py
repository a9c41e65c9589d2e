"""Admin JSON (admin key required, as a Bearer token): the workers and their latest heartbeat, for scripts
and monitoring that want what the admin page shows."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.batch_output import epoch_seconds
from app.dashboard_data import admin_workers
from app.errors import authentication_error, permission_denied
from app.ui_auth import is_admin
from app.worker_registry import SAMPLE_FIELDS

router = APIRouter(prefix="/admin/api")


def _require_admin(request: Request) -> None:
    if not request.app.state.settings.admin_key:
        raise permission_denied("the admin API is off: start the gateway with CONSERVE_ADMIN_KEY set")
    if not is_admin(request):
        raise authentication_error("the admin API needs the admin key as 'Authorization: Bearer <admin key>'")


@router.get("/workers")
def workers(request: Request) -> dict[str, Any]:
    _require_admin(request)
    with request.app.state.sessions() as s:
        rows = admin_workers(s, request.app.state.settings.worker_stale_after_s)
    data = []
    for row in rows:
        w, sample = row.worker, row.sample
        data.append({
            "id": w.id, "url": w.url, "model": w.model, "device": w.device, "policy": w.policy,
            "slo_ttft_ms": w.slo_ttft_ms, "slo_tpot_ms": w.slo_tpot_ms, "hostname": w.hostname, "pid": w.pid,
            "alive": row.alive, "started_at": epoch_seconds(w.started_at),
            "last_heartbeat": epoch_seconds(w.last_heartbeat), "max_model_len": w.max_model_len,
            "latest": None if sample is None else {f: getattr(sample, f) for f in sorted(SAMPLE_FIELDS)},
        })
    return {"object": "list", "data": data}
