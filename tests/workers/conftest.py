"""Worker-side fixtures: one real engine over a tiny random chat model (word-level tokenizer, 2 layers), shared
by the session because profiling its step latency takes a second, and a migrated SQLite store per test."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_session_factory
from app.migrate import migrate
from engine import Engine, EngineConfig
from workers.engine_host import EngineHost

# save_tiny_chat_model lives beside the end-to-end tests; reuse it rather than keep a second copy.
_SERVING = str(Path(__file__).resolve().parents[1] / "serving")
if _SERVING not in sys.path:
    sys.path.insert(0, _SERVING)
from stack import save_tiny_chat_model  # noqa: E402

# The tiny model's whole context: "as many tokens as fit" is ~500 steps (a few tenths of a second), long enough
# that a test can leave a request mid-way before it finishes by itself.
CONTEXT = 512


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Iterator[Engine]:
    model_dir = save_tiny_chat_model(tmp_path_factory.mktemp("worker-tiny-chat"))
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", policy="conserve",
                          kv_cache_bytes=4_000_000, max_model_len=CONTEXT, profile_seconds=1.0,
                          profile_cache_dir=str(tmp_path_factory.mktemp("worker-profiles")))
    with Engine(config) as e:
        yield e


@pytest.fixture
def idle_engine(engine) -> Engine:
    """The shared engine once no request of an earlier test is still in it (an abort lands a moment later)."""
    deadline = time.monotonic() + 10
    while True:
        s = engine.stats()
        if not any(s.num_running.values()) and not any(s.num_waiting.values()):
            return engine
        if time.monotonic() > deadline:
            pytest.fail(f"the engine is still busy with earlier requests: {s}")
        time.sleep(0.005)


@pytest.fixture
def host(idle_engine) -> EngineHost:
    """A fresh host (its own metrics registry and latency window) over the shared engine."""
    return EngineHost(idle_engine, served_model_name="tiny-chat")


@pytest.fixture
def store_sessions(tmp_path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a fresh SQLite file brought to the head migration, as a worker's store would be."""
    url = f"sqlite:///{tmp_path / 'store' / 'conserve.db'}"
    migrate(url)
    db = make_engine(url)
    yield make_session_factory(db)
    db.dispose()
