"""Decode steps through the decode graphs (engine/decode_graphs.py): padded batches and contexts, the
scratch block for padding rows, layer-wise yields inside a graphed step, and the eager fallback give
exactly the tokens transformers gives. On the CPU the graphs' steps run as plain calls on the same
static buffers; with CONSERVE_TEST_DEVICE=cuda they are captured CUDA graphs."""
from __future__ import annotations

import pytest

import engine.engine as engine_module
from engine.sampling_params import SamplingParams
from test_coserve import GREEDY, NEW_TOKENS, ONLINE_PROMPTS
from tiny_models import TEST_DEVICE, build_tiny_model, prompt_of

# Lengths that put a batch of decodes in several batch buckets (3 and then fewer rows, padded) and
# context buckets (8-token blocks: 1 to 8 blocks and beyond as they grow).
PROMPTS = [prompt_of(n, seed=200 + i) for i, n in enumerate([3, 17, 40, 9])]
MAX_TOKENS = [34, 12, 30, 5]


@pytest.fixture(scope="module")
def deep():
    return build_tiny_model(num_hidden_layers=6, seed=3)


@pytest.fixture(scope="module")
def expected(deep):
    return [deep.reference_greedy(p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]


def generate(engine, prompts=PROMPTS, max_tokens=MAX_TOKENS, request_class="offline"):
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    return [o.token_ids for o in engine.generate(prompts, params, request_class)]


def test_graphed_decodes_give_transformers_tokens(deep, expected):
    with deep.engine(decode_graphs="on") as engine:
        graphs = engine.runner.graphs
        assert graphs.capture == (engine.device.type == "cuda")
        # Padding rows own the block past the pool's: no request can be handed it.
        assert graphs.scratch_block == engine.pool.num_blocks == engine.kv_cache.num_blocks - 1
        assert generate(engine) == expected
        assert engine.pool.num_free == engine.pool.num_blocks
        assert graphs.steps_run >= max(MAX_TOKENS) - 2
        assert engine.stats().graphed_steps == graphs.steps_run
        batches = {b for b, _ in graphs.buckets}
        widths = {w for _, w in graphs.buckets}
    assert {4, 2, 1} <= batches  # four decoding, padded; then fewer as they finish
    assert {8, 16} <= widths     # the longest context grew from 6 blocks past 8
    with deep.engine(decode_graphs="off") as engine:
        assert engine.runner.graphs is None
        assert generate(engine) == expected
        assert engine.stats().graphed_steps == 0


def test_decode_graphs_are_on_by_default_on_cuda_only(deep):
    with deep.engine() as engine:
        assert (engine.runner.graphs is not None) == (engine.device.type == "cuda")


def test_single_token_prefill_chunks_ride_along_unsampled(deep):
    """A token budget that leaves one token of a prompt beside the decodes: that row is computed in the
    graphed step (its keys and values written) but not sampled."""
    prompts = [prompt_of(n, seed=300 + i) for i, n in enumerate([4, 4, 4, 23])]
    max_tokens = [20, 20, 20, 6]
    with deep.engine(decode_graphs="on", max_num_batched_tokens=4) as engine:
        graphs = engine.runner.graphs
        plans = []
        plan = graphs.plan

        def recording_plan(requests, sampled_rows):
            plans.append((len(requests), len(sampled_rows)))
            return plan(requests, sampled_rows)

        graphs.plan = recording_plan
        outputs = generate(engine, prompts, max_tokens)
    assert outputs == [deep.reference_greedy(p, n) for p, n in zip(prompts, max_tokens)]
    assert any(sampled < rows for rows, sampled in plans), plans


def test_contexts_beyond_the_graphs_run_eagerly(deep, expected, monkeypatch):
    monkeypatch.setattr(engine_module, "GRAPHS_MAX_CONTEXT", 48)
    with deep.engine(decode_graphs="on") as engine:
        graphs = engine.runner.graphs
        eager = []
        run = engine.runner._run
        engine.runner._run = lambda chunks, *rest: eager.append(len(chunks)) or run(chunks, *rest)
        assert generate(engine) == expected
    assert graphs.steps_run > 0 and eager  # decodes past 48 tokens of context went eager
    assert max(w for _, w in graphs.buckets) == 6  # 48 tokens: the widest bucket is capped there


class ArrivalsInGraphedSteps:
    """Submits an online request at a chosen layer's safepoint of a step running in the decode graphs."""

    def __init__(self, engine, layer: int, count: int):
        self.engine, self.layer, self.count = engine, layer, count
        self.streams = []
        self.in_graphs = False
        graphs = engine.runner.graphs
        run = graphs.run

        def flagged_run(plan, safepoint):
            self.in_graphs = True
            try:
                return run(plan, safepoint)
            finally:
                self.in_graphs = False

        graphs.run = flagged_run
        self._original = engine._safepoint
        engine._safepoint = self

    def __call__(self, layer: int) -> bool:
        if self.in_graphs and layer == self.layer and len(self.streams) < self.count:
            self.streams.append(self.engine.submit(ONLINE_PROMPTS[len(self.streams)], GREEDY, "online"))
        return self._original(layer)


@pytest.mark.parametrize("mode", ["park", "discard", "drop"])
def test_a_graphed_step_yields_at_a_layer_and_every_output_stays_exact(deep, mode):
    offline = [prompt_of(n, seed=400 + i) for i, n in enumerate([12, 30, 7])]
    with deep.engine(decode_graphs="on", preemption_mode=mode) as engine:
        arrivals = ArrivalsInGraphedSteps(engine, layer=3, count=3)
        offline_out = generate(engine, offline, [40, 40, 40])
        online_out = [s.final().token_ids for s in arrivals.streams]
        stats = engine.stats()
        assert engine.pool.num_free == engine.pool.num_blocks
    assert offline_out == [deep.reference_greedy(p, 40) for p in offline]
    assert online_out == [deep.reference_greedy(p, NEW_TOKENS) for p in ONLINE_PROMPTS[:3]]
    assert len(online_out) == 3 and stats.layer_yields >= 3


def test_buckets_whose_gather_would_outgrow_the_memory_cap_run_eagerly(deep, expected, monkeypatch):
    """The graphs keep their gathered keys and values for good, so a bucket over the cap runs eagerly."""
    per_token = 2 * deep.config.num_key_value_heads * deep.config.head_dim * 4  # keys and values, float32
    monkeypatch.setattr(engine_module, "GRAPHS_MAX_GATHER_BYTES", 4 * 32 * per_token)  # 4 rows x 32 tokens
    with deep.engine(decode_graphs="on") as engine:
        graphs = engine.runner.graphs
        assert generate(engine) == expected
    assert graphs.steps_run > 0
    assert all(b * w * 8 <= 4 * 32 for b, w in graphs.buckets), graphs.buckets
