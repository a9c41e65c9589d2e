"""GET /health (liveness plus what a load balancer needs to know) and GET /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the gateway can reach its store; the body says how many workers are alive (0 is still
    healthy for the gateway itself: requests then get 503 until a worker registers)."""
    try:
        workers = await request.app.state.router.workers()
    except Exception:
        return JSONResponse({"status": "unhealthy", "reason": "job store unreachable"}, status_code=503)
    return JSONResponse({"status": "ok", "workers": len(workers), "models": sorted({w.model for w in workers})})


@router.get("/metrics")
def metrics(request: Request) -> Response:
    # A plain def: FastAPI runs it on a thread, so the store query behind the fleet gauges never blocks the loop.
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
