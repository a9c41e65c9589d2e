"""The worker builds its engine from its settings: the engine knobs an operator sets (flags or CONSERVE_*
variables) reach the engine's configuration."""
from __future__ import annotations

from workers.cli_serving import ENGINE_FLAGS
from workers.run_worker import build_engine
from workers.settings import WorkerSettings
from stack import save_tiny_chat_model


def test_engine_settings_reach_the_engine(tmp_path, monkeypatch):
    model_dir = save_tiny_chat_model(tmp_path / "model")
    monkeypatch.setenv("CONSERVE_DECODE_MIRROR_BYTES", "0")  # as an operator would turn the mirror off
    monkeypatch.setenv("CONSERVE_NATIVE_DECODE", "off")  # and the native decode kernel
    settings = WorkerSettings(model=str(model_dir), device="cpu", dtype="float32", policy="conserve",
                              kv_cache_bytes=2_000_000, checkpoint_bytes=0, max_num_seqs=5, max_model_len=256,
                              profile_seconds=0.5, profile_cache_dir=str(tmp_path / "profiles"))
    with build_engine(settings) as engine:
        assert engine.runner.mirror is None and engine.runner.model.backend.native is None
        assert engine.config.kv_cache_bytes == 2_000_000 and engine.config.max_num_seqs == 5
        assert engine.checkpointer is None and engine.max_model_len == 256  # conserve, but the store is off
    with build_engine(settings.model_copy(update={"decode_mirror_bytes": 1 << 20})) as engine:
        assert engine.runner.mirror is not None and engine.runner.mirror.max_bytes == 1 << 20
        assert engine.runner.graphs is None
    with build_engine(settings.model_copy(update={"native_decode": "on"})) as engine:
        assert engine.runner.model.backend.native is not None and engine.runner.mirror is None
    monkeypatch.setenv("CONSERVE_DECODE_GRAPHS", "on")
    with build_engine(WorkerSettings(**settings.model_dump(exclude={"decode_graphs"}))) as engine:
        assert engine.runner.graphs is not None and engine.runner.mirror is None


def test_every_engine_flag_is_a_worker_setting():
    assert set(ENGINE_FLAGS) <= set(WorkerSettings.model_fields)
