"""Engine-test fixtures: tiny random models (milliseconds to build) and the bundled SmolLM2, whose engine
and transformers reference are built at most once per session because each takes seconds."""
from __future__ import annotations

import time
from typing import Callable

import pytest

from engine.config import EngineConfig
from engine.engine import Engine, EngineStats
from engine.loader import LoadedModel
from tiny_models import TinyModel, build_tiny_model


@pytest.fixture(scope="session")
def tiny() -> TinyModel:
    """The default tiny model: 2 layers, GQA (4 heads, 2 KV heads), untied embeddings, 384 ids, no tokenizer."""
    return build_tiny_model()


@pytest.fixture(scope="session")
def smollm2(bundled_model) -> LoadedModel:
    """The bundled SmolLM2-135M-Instruct in float32. A shallow copy, because an engine empties the
    tensor dict it is given and other tests read bundled_model.tensors."""
    m = bundled_model
    return LoadedModel(m.config, dict(m.tensors), m.tokenizer, m.name)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    loaded = LoadedModel(smollm2.config, dict(smollm2.tensors), smollm2.tokenizer, smollm2.name)
    with Engine(EngineConfig(dtype="float32", device="cpu", num_kv_blocks=64, profile_seconds=2.0), loaded=loaded) as engine:
        yield engine


@pytest.fixture(scope="session")
def tiny_with_real_tokenizer(smollm2) -> TinyModel:
    """A tiny random model over SmolLM2's 49,152-id vocabulary with its real tokenizer: random tokens
    include many byte-level pieces, which stress incremental detokenisation."""
    return build_tiny_model(vocab_size=smollm2.config.vocab_size, hidden_size=32, intermediate_size=64,
                            num_attention_heads=4, num_key_value_heads=2, tokenizer=smollm2.tokenizer)


@pytest.fixture
def wait_for_stats() -> Callable[..., EngineStats]:
    """poll(engine, condition, timeout=10): engine.stats() once condition(stats) holds, or fail with the
    last stats seen. The engine thread refreshes its statistics just after it hands out a request's
    final output, so a caller holding that output may read the previous counts for a moment."""

    def poll(engine: Engine, condition: Callable[[EngineStats], bool], timeout: float = 10.0) -> EngineStats:
        deadline = time.monotonic() + timeout
        while True:
            stats = engine.stats()
            if condition(stats):
                return stats
            if time.monotonic() > deadline:
                pytest.fail(f"engine stats never reached the expected state: {stats}")
            time.sleep(0.002)

    return poll
