"""Starts a worker: load the engine, open the internal endpoint, register in the job store, beat until told
to stop (SIGTERM/SIGINT), then mark itself offline."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading

import uvicorn

from app.db import make_engine, make_session_factory
from workers.heartbeat import Heartbeat, WorkerIdentity
from workers.settings import WorkerSettings
from workers.shutdown import exit_cleanly_on_sigterm

log = logging.getLogger("conserve.worker")


def build_engine(settings: WorkerSettings):
    from engine import Engine, EngineConfig

    return Engine(EngineConfig(model=settings.model, device=settings.device, dtype=settings.dtype,
                               policy=settings.policy, slo_ttft_ms=settings.slo_ttft_ms,
                               slo_tpot_ms=settings.slo_tpot_ms, kv_cache_bytes=settings.kv_cache_bytes,
                               checkpoint_bytes=settings.checkpoint_bytes,
                               decode_mirror_bytes=settings.decode_mirror_bytes,
                               decode_graphs=settings.decode_graphs, native_decode=settings.native_decode,
                               max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len,
                               profile_seconds=settings.profile_seconds,
                               profile_cache_dir=settings.profile_cache_dir))


def run_worker(settings: WorkerSettings, on_ready=None) -> None:
    from workers.engine_host import EngineHost
    from workers.server import create_worker_app

    # Bind first: with port 0 the OS picks the port, and the URL the worker registers must carry the real one.
    sock = socket.socket(socket.AF_INET6 if ":" in settings.worker_host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.worker_host, settings.worker_port))
    port = sock.getsockname()[1]

    engine = build_engine(settings)
    host = EngineHost(engine, settings.served_model_name)
    device = str(engine.device)
    url = settings.worker_url or f"http://{_url_host(settings.worker_host)}:{port}"
    identity = WorkerIdentity(
        worker_id=settings.worker_id or f"{socket.gethostname()}-{device.replace(':', '')}-{port}",
        url=url, model=host.model_name, device=device, policy=engine.policy.value,
        slo_ttft_ms=settings.slo_ttft_ms, slo_tpot_ms=settings.slo_tpot_ms, max_model_len=engine.max_model_len)
    db = make_engine(settings.database_url)
    heartbeat = Heartbeat(make_session_factory(db), identity, host.sample, settings.heartbeat_interval_s,
                          settings.sample_retention_s)

    consumer = None
    if engine.policy.accepts_offline:
        consumer = _offline_consumer(settings, host, make_session_factory(db), identity.worker_id)

    app = create_worker_app(host, settings.internal_token)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    exit_cleanly_on_sigterm()
    try:
        heartbeat.start()
        log.info("worker %s serving %s on %s (%s, policy %s)", identity.worker_id, identity.model, url, device,
                 identity.policy)
        if consumer is not None:
            consumer.start()
        if on_ready is not None:
            on_ready(identity)
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        # Offline first, so the gateway stops routing here at once; then hand back shards and stop.
        heartbeat.stop()
        if consumer is not None:
            consumer.stop()
        engine.shutdown()
        db.dispose()


def _offline_consumer(settings: WorkerSettings, host, sessions, worker_id: str):
    from app.dispatch import make_celery, send_shard
    from workers.offline_consumer import OfflineConsumer
    from workers.shard_runner import ShardRunner

    def make_app():
        return make_celery(settings.broker_url, settings.broker_visibility_timeout_s)

    sender = make_app()
    send_lock = threading.Lock()  # consumers hand shards back from their own threads; one sender, one at a time

    def hand_back(batch_id: str, shard: int, model: str) -> None:
        with send_lock:
            send_shard(sender, batch_id, shard, model)

    runner = ShardRunner(host, sessions, worker_id, hand_back,
                         lease_s=settings.shard_lease_s, max_shard_s=settings.broker_visibility_timeout_s / 4)
    return OfflineConsumer(make_app, runner, host.model_name, worker_id, settings.broker_url, settings.offline_slots)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()  # reachable by name from other machines, not the wildcard address
    return f"[{host}]" if ":" in host else host
