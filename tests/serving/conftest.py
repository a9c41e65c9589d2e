"""One platform per test module (worker processes take seconds to start): see stack.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.migrate import migrate
from stack import GatewayThread, WorkerProcess, gateway_settings, save_tiny_chat_model


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def profile_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def database_url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'conserve.db'}"
    migrate(url)
    return url


_broker_dbs = iter(range(1, 16))


@pytest.fixture(scope="module")
def broker_url() -> str:
    """A Redis database of its own per test module (the CI machine's Redis), emptied first: queued shards of
    one module must never reach another module's workers."""
    import redis

    url = f"redis://127.0.0.1:6379/{next(_broker_dbs)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def start_worker(chat_model_dir, database_url, profile_dir, broker_url):
    """start_worker(worker_id, *flags) -> a registered WorkerProcess, stopped at the end of the module."""
    started: list[WorkerProcess] = []

    def start(worker_id: str, *flags: str) -> WorkerProcess:
        # A few MB of KV cache: the CPU default (1 GiB, and a host checkpoint store twice that) is sized for
        # real models, and each worker would zero it all at start.
        w = WorkerProcess(chat_model_dir, database_url, worker_id, profile_dir, "--kv-cache-bytes", "4000000",
                          *flags, broker_url=broker_url)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def gateway(database_url, broker_url, files_dir):
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir)).start()
    yield g
    g.stop()
