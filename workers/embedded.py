"""`conserve serve`: the whole platform on one machine with no external server. The gateway runs in this
process; one worker runs as a child process (its engine thread would otherwise compete with the gateway for
the GIL), restarted if it crashes; a private redis-server is the broker (workers/embedded_broker.py). They
share a SQLite store and a private internal token."""
from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from datetime import datetime
from typing import Any

import uvicorn

from app.db import make_engine, make_session_factory, utcnow
from app.main import create_app
from app.migrate import migrate
from app.settings import Settings
from app.worker_registry import alive_workers
from workers.child_process import popen_tied_to_parent
from workers.embedded_broker import EmbeddedRedis
from workers.shutdown import exit_cleanly_on_sigterm

log = logging.getLogger("conserve.serve")
BAD_INPUT_EXIT = 2
MAX_RESTARTS = 5


def serve(gateway_overrides: dict[str, Any], engine_overrides: dict[str, Any]) -> int:
    settings = Settings(**gateway_overrides)
    broker = EmbeddedRedis(settings.data_dir).start()
    settings = settings.model_copy(update={"internal_token": settings.internal_token or secrets.token_urlsafe(24),
                                           "admin_key": settings.admin_key or secrets.token_urlsafe(18),
                                           "broker_url": broker.url})
    migrate(settings.database_url)
    # float32 unless asked otherwise: the embedded default is where people first try the bundled model, and
    # bfloat16's rounding flips near-tied tokens of a model this small (it names the wrong capital of France).
    engine_overrides = {"dtype": "float32"} | engine_overrides
    worker = WorkerSupervisor(_worker_command(engine_overrides),
                              os.environ | {"CONSERVE_DATABASE_URL": settings.database_url,
                                            "CONSERVE_INTERNAL_TOKEN": settings.internal_token,
                                            "CONSERVE_BROKER_URL": settings.broker_url,
                                            "CONSERVE_SHARD_LEASE_S": str(settings.shard_lease_s),
                                            "CONSERVE_BROKER_VISIBILITY_TIMEOUT_S":
                                                str(settings.broker_visibility_timeout_s)})
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                                           log_level="warning"))
    worker.on_fatal = lambda: setattr(server, "should_exit", True)
    exit_cleanly_on_sigterm()
    launched = utcnow()
    worker.start()
    threading.Thread(target=_announce_when_ready, args=(settings, worker, launched), daemon=True).start()
    try:
        server.run()
    finally:
        worker.stop()
        broker.stop()
    return worker.fatal_code or 0


def _worker_command(engine_overrides: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "workers.cli", "worker"]
    for name, value in engine_overrides.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def _announce_when_ready(settings: Settings, worker: "WorkerSupervisor", launched: datetime) -> None:
    """Print the URL once our worker has registered: only then does the API answer chats. (A row left
    'online' by a worker that crashed moments ago must not count.)"""
    db = make_engine(settings.database_url)
    sessions = make_session_factory(db)
    try:
        while not worker.stopping:
            with sessions() as s:
                workers = [w for w in alive_workers(s, stale_after_s=settings.worker_stale_after_s)
                           if w.started_at >= launched]
            if workers:
                url = f"http://{settings.host}:{settings.port}"
                print(f"ConServe is serving {', '.join(sorted({w.model for w in workers}))} at {url} "
                      f"(OpenAI API: {url}/v1; dashboard: {url}/ui/jobs; admin key for {url}/ui/admin: "
                      f"{settings.admin_key})", flush=True)
                return
            time.sleep(0.25)
    finally:
        db.dispose()


class WorkerSupervisor:
    """Keeps one worker child process running; gives up (and stops serve) if it fails on bad input or keeps
    crashing."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.command, self.env = command, env
        self.process: subprocess.Popen | None = None
        self.stopping = False
        self.fatal_code: int | None = None
        self.on_fatal = lambda: None
        self._thread = threading.Thread(target=self._watch, name="conserve-worker-supervisor", daemon=True)

    def start(self) -> None:
        self.process = popen_tied_to_parent(self.command, env=self.env)
        self._thread.start()

    def _watch(self) -> None:
        restarts = 0
        while not self.stopping:
            code = self.process.wait()
            if self.stopping:
                return
            if code == BAD_INPUT_EXIT or restarts >= MAX_RESTARTS:
                log.error("the worker exited with code %s; stopping", code)
                self.fatal_code = code or 1
                self.on_fatal()
                return
            restarts += 1
            log.error("the worker exited with code %s; restarting it (%d/%d)", code, restarts, MAX_RESTARTS)
            time.sleep(1.0)
            self.process = popen_tied_to_parent(self.command, env=self.env)

    def stop(self) -> None:
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the worker marks itself offline and shuts its engine down
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
