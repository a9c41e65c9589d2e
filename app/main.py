"""The gateway application: the OpenAI-compatible API (chat, completions, models, files, batches) in front of
the workers, the dashboard, metrics and health, and the background duties of offline jobs."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app.batch_maintenance import BatchMaintenance
from app.batch_pipeline import BatchPipeline
from app.db import make_engine, make_session_factory
from app.dispatch import make_celery
from app.errors import install_error_handlers
from app.file_storage import FileStorage
from app.fleet_metrics import FleetCollector
from app.openapi_docs import install_openapi
from app.request_metrics import RequestMetrics
from app.routes import admin_api, batches, completions, dashboard, files, health, models
from app.routes.dashboard import login_page
from app.settings import Settings
from app.ui_auth import LoginRequired
from app.worker_registry import mark_stale_workers
from app.worker_router import WorkerRouter

log = logging.getLogger("conserve.gateway")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway on `settings.database_url`, whose schema must be migrated already (`conserve migrate`;
    `conserve gateway` and `conserve serve` do it on start)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = make_engine(settings.database_url)
        sessions = make_session_factory(db)
        # Generation streams can run for minutes; only connecting is bounded (a dead worker refuses at once).
        timeout = httpx.Timeout(connect=settings.worker_connect_timeout_s, read=None, write=30.0, pool=30.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            state = app.state
            state.settings, state.sessions, state.http = settings, sessions, http
            state.router = WorkerRouter(sessions, settings.worker_stale_after_s, settings.max_inflight_per_worker)
            state.metrics_registry = registry = CollectorRegistry()
            state.request_metrics = RequestMetrics(registry)
            registry.register(FleetCollector(sessions, settings.worker_stale_after_s))
            state.started = int(time.time())
            state.storage = FileStorage(settings.files_dir)
            celery = make_celery(settings.broker_url, settings.broker_visibility_timeout_s)
            state.pipeline = BatchPipeline(settings, sessions, state.storage, celery)
            maintenance = BatchMaintenance(settings, sessions, state.storage, celery, state.pipeline)
            background = [asyncio.create_task(_mark_stale_forever(sessions, settings.worker_stale_after_s)),
                          asyncio.create_task(maintenance.run_forever())]
            try:
                yield
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                db.dispose()

    app = FastAPI(title="ConServe", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM co-serving: online chat beside offline batch jobs.")
    install_error_handlers(app)
    install_openapi(app)
    app.add_exception_handler(LoginRequired, lambda request, exc: login_page(request, exc))
    app.include_router(completions.router)
    app.include_router(models.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(dashboard.router)
    app.include_router(admin_api.router)
    app.include_router(health.router)
    return app


async def _mark_stale_forever(sessions, stale_after_s: float) -> None:
    """Workers that stopped beating (killed, machine gone) are marked offline, so the dashboard and the
    store say what the router already assumes."""
    def sweep() -> None:
        with sessions() as s:
            gone = mark_stale_workers(s, stale_after_s)
        for worker_id in gone:
            log.warning("worker %s stopped sending heartbeats; marked offline", worker_id)

    while True:
        await asyncio.sleep(max(1.0, stale_after_s / 2))
        try:
            await asyncio.to_thread(sweep)
        except Exception:
            log.exception("could not mark stale workers")
