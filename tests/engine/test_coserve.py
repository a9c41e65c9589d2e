"""The ConServe mechanisms end to end on a tiny model: every policy, layer-wise yields (park and discard),
evictions with checkpoint restores and with the recompute fallback leave greedy outputs exactly as
transformers makes them, and leak no device or host blocks."""
from __future__ import annotations

import threading

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.model_runner import ParkedStep
from engine.sampling_params import SamplingParams
from tiny_models import build_tiny_model, prompt_of

NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
OFFLINE_PROMPTS = [prompt_of(n, seed=40 + i) for i, n in enumerate([70, 45, 90, 33, 60, 52])]
ONLINE_PROMPTS = [prompt_of(n, seed=60 + i) for i, n in enumerate([9, 20, 5, 14])]


@pytest.fixture(scope="module")
def deep():
    """Six layers, so a step has safepoints to stop at in the middle."""
    return build_tiny_model(num_hidden_layers=6, seed=3)


@pytest.fixture(scope="module")
def expected(deep) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): deep.reference_greedy(p, NEW_TOKENS) for p in OFFLINE_PROMPTS + ONLINE_PROMPTS}


class ArrivalsAtSafepoints:
    """Submits an online request from inside the engine's step, at chosen (step-visit, layer) safepoints
    of steps that carry offline work: the arrival lands mid-step at a known layer, every run alike."""

    def __init__(self, engine, at_layers: list[int]):
        self.engine = engine
        self.at_layers = list(at_layers)
        self.prompts = list(ONLINE_PROMPTS)
        self.streams = []
        self.visited = []
        self.yields = []
        self._original = engine._safepoint
        engine._safepoint = self

    def __call__(self, layer: int) -> bool:
        self.visited.append(layer)
        if self.at_layers and self.prompts and layer == self.at_layers[0]:
            self.at_layers.pop(0)
            self.streams.append(self.engine.submit(self.prompts.pop(0), GREEDY, "online"))
        stop = self._original(layer)
        if stop:
            self.yields.append(layer)
        return stop


class ArrivalsBetweenSteps:
    """Submits an online request from the engine thread just before chosen scheduling rounds (for the
    policies without safepoints)."""

    def __init__(self, engine, at_rounds: list[int]):
        self.engine = engine
        self.at_rounds = set(at_rounds)
        self.prompts = list(ONLINE_PROMPTS)
        self.streams = []
        self.rounds = 0
        self._schedule = engine.scheduler.schedule
        engine.scheduler.schedule = self

    def __call__(self, *args, **kwargs):
        self.rounds += 1
        if self.rounds in self.at_rounds and self.prompts:
            self.streams.append(self.engine.submit(self.prompts.pop(0), GREEDY, "online"))
        return self._schedule(*args, **kwargs)


def run_mixed(engine, at_layers: list[int] | None = None, at_rounds: list[int] | None = None):
    arrivals = ArrivalsAtSafepoints(engine, at_layers) if at_layers else ArrivalsBetweenSteps(engine, at_rounds)
    offline = [engine.submit(p, GREEDY, "offline") for p in OFFLINE_PROMPTS]
    offline_out = [s.final() for s in offline]
    online_out = [s.final() for s in arrivals.streams]
    return offline_out, online_out, arrivals


@pytest.mark.parametrize("mode", ["park", "discard", "drop"])
def test_layer_wise_yields_leave_every_output_identical(deep, expected, mode):
    with deep.engine(preemption_mode=mode, max_num_batched_tokens=64) as engine:
        offline_out, online_out, arrivals = run_mixed(engine, at_layers=[2, 4, 1, 5])
        stats = engine.stats()
    assert [o.token_ids for o in offline_out] == [expected[tuple(p)] for p in OFFLINE_PROMPTS]
    assert [o.token_ids for o in online_out] == [expected[tuple(p)] for p in ONLINE_PROMPTS[:len(online_out)]]
    # Every mode stops every step with offline work, those beside online decodes included ("discard"
    # finishes their online rows alone, "drop" runs them again), so every planned arrival happens.
    assert len(online_out) == len(ONLINE_PROMPTS)
    assert stats.layer_yields == len(online_out)
    assert (stats.discarded_tokens > 0) == (mode != "park")
    assert engine.pool.num_free == engine.pool.num_blocks


def test_discard_finishes_the_online_rows_of_a_step_it_stops(deep, expected):
    """An arrival during a step carrying online decodes beside offline work: "discard" drops the offline
    rows at that safepoint and finishes the online ones from there, so the requests decoding in it keep
    their tokens; every output is still transformers' greedy one."""
    with deep.engine(preemption_mode="discard", max_num_batched_tokens=64) as engine:
        sheds = []
        shed = engine.runner.shed

        def recording_shed(parked, keep):
            sheds.append(([c.request.online for c in parked.chunks], [c.request.online for c in keep]))
            return shed(parked, keep)

        engine.runner.shed = recording_shed
        offline_out, online_out, arrivals = run_mixed(engine, at_layers=[2, 4, 1, 5])
    assert [o.token_ids for o in offline_out] == [expected[tuple(p)] for p in OFFLINE_PROMPTS]
    assert [o.token_ids for o in online_out] == [expected[tuple(p)] for p in ONLINE_PROMPTS]
    assert sheds, "no step mixing online decodes with offline work was stopped"
    for planned, kept in sheds:
        assert False in planned and True in planned
        assert kept == [True] * planned.count(True)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_drop_runs_the_online_rows_of_a_step_it_stops_again(deep, expected):
    """"drop" throws a stopped step away whole, online decodes included: nothing is shed, the decodes run
    again in the next step beside the arrival, and every output is still transformers' greedy one."""
    with deep.engine(preemption_mode="drop", max_num_batched_tokens=64) as engine:
        stopped = []
        execute = engine.runner.execute

        def recording_execute(chunks, safepoint=None):
            result = execute(chunks, safepoint)
            if isinstance(result, ParkedStep):
                stopped.append([(c.request.online, c.num_tokens) for c in chunks])
            return result

        def no_shed(parked, keep):
            raise AssertionError("drop mode shed a stopped step")

        engine.runner.execute = recording_execute
        engine.runner.shed = no_shed
        offline_out, online_out, arrivals = run_mixed(engine, at_layers=[2, 4, 1, 5])
        stats = engine.stats()
    assert [o.token_ids for o in offline_out] == [expected[tuple(p)] for p in OFFLINE_PROMPTS]
    assert [o.token_ids for o in online_out] == [expected[tuple(p)] for p in ONLINE_PROMPTS]
    assert any({online for online, _ in planned} == {True, False} for planned in stopped), \
        "no step mixing online decodes with offline work was stopped"
    # Every token of every stopped step was thrown away, online rows included.
    assert stats.discarded_tokens == sum(n for planned in stopped for _, n in planned)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_an_online_arrival_stops_an_offline_prefill_at_the_next_safepoint(deep):
    """The step yields at the very safepoint after the arrival: the online request waits at most one
    layer of the offline step, never the rest of it."""
    long_prompt = prompt_of(400, seed=5)
    with deep.engine(max_num_batched_tokens=512, num_kv_blocks=128, preemption_mode="park") as engine:
        arrivals = ArrivalsAtSafepoints(engine, at_layers=[3])
        offline = engine.submit(long_prompt, GREEDY, "offline")
        while not arrivals.streams:
            threading.Event().wait(0.01)
        online = arrivals.streams[0].final()
        stats = engine.stats()
    # The arrival came at safepoint 3 and the step stopped right there, before layer 3; resumed after
    # the online step, it went on from layer 3 (not asked again) to the end.
    assert arrivals.yields == [3] and stats.layer_yields == 1
    assert arrivals.visited[:6] == [0, 1, 2, 3, 4, 5]
    assert online.metrics.queued < offline.final().metrics.e2e
    assert online.token_ids == deep.reference_greedy(ONLINE_PROMPTS[0], NEW_TOKENS)


@pytest.mark.parametrize("policy", ["fcfs", "priority", "conserve"])
def test_every_policy_generates_the_same_tokens_under_memory_pressure(deep, expected, policy):
    """A pool too small for all offline requests at once: they are admitted as blocks allow, evicted
    for online arrivals, and restored or recomputed, yet every output is transformers' greedy one."""
    # 32 blocks: small enough that every class-aware policy evicts (with 40, conserve's arrivals, which
    # now also stop steps beside online decodes, came before the pool ran short)
    with deep.engine(policy=policy, num_kv_blocks=32, max_num_batched_tokens=32) as engine:
        offline_out, online_out, _ = run_mixed(engine, at_rounds=[3, 6, 9, 12])
        stats = engine.stats()
    assert [o.token_ids for o in offline_out] == [expected[tuple(p)] for p in OFFLINE_PROMPTS]
    assert [o.token_ids for o in online_out] == [expected[tuple(p)] for p in ONLINE_PROMPTS]
    assert engine.pool.num_free == engine.pool.num_blocks
    if policy != "fcfs":
        assert stats.num_preemptions > 0


def test_online_only_refuses_offline_work(deep):
    with deep.engine(policy="online-only") as engine:
        with pytest.raises(InvalidRequestError, match="refuses offline"):
            engine.submit(OFFLINE_PROMPTS[0], GREEDY, "offline")
        assert engine.generate([ONLINE_PROMPTS[0]], GREEDY, "online")[0].token_ids == \
            deep.reference_greedy(ONLINE_PROMPTS[0], NEW_TOKENS)


class EvictEveryFewSteps:
    """A safepoint hook that, every `period`-th offline step, evicts every running offline request from
    inside the engine thread (where evictions happen) and stops that step; the steps between run whole."""

    def __init__(self, engine, period: int):
        self.engine = engine
        self.period = period
        self.steps = 0
        self.evictions = 0
        engine._safepoint = self

    def __call__(self, layer: int) -> bool:
        if layer != 0:
            return False
        self.steps += 1
        if self.steps % self.period:
            return False
        self.engine.checkpointer.wait_idle()  # every committed token saved: an eviction then loses nothing
        for req in [r for r in self.engine.scheduler.running if not r.online]:
            self.engine.scheduler.preempt(req)
            self.evictions += 1
        return True  # its requests were just evicted: this step must not finish


def test_evicted_offline_requests_resume_from_their_checkpoint(deep):
    """Evict mid-prefill and mid-decode, many times over: the host store brings the KV back, so almost
    nothing is recomputed, outputs stay exact, and no device or host block leaks."""
    prompts = [prompt_of(n, seed=80 + i) for i, n in enumerate([150, 120, 97])]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    with deep.engine(max_num_batched_tokens=48, num_kv_blocks=128, preemption_mode="discard") as engine:
        threads = torch.get_num_threads()
        store = engine.checkpointer.store
        hook = EvictEveryFewSteps(engine, period=2)
        outputs = [s.final() for s in [engine.submit(p, params, "offline") for p in prompts]]
        stats = engine.stats()
        assert engine.pool.num_free == engine.pool.num_blocks
        assert store.pool.num_free == store.pool.num_blocks
    assert [o.token_ids for o in outputs] == [deep.reference_greedy(p, 30) for p in prompts]
    assert torch.get_num_threads() == threads  # the copy thread must not take the engine's threads away
    assert hook.evictions >= 40 and stats.num_preemptions == hook.evictions
    assert stats.restored_tokens > 1000
    # The copies are waited for before each eviction, so only a discarded step's tokens come back as work.
    assert stats.recomputed_tokens == 0


def test_a_full_checkpoint_store_falls_back_to_recompute(deep):
    prompts = [prompt_of(n, seed=90 + i) for i, n in enumerate([150, 120])]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    block_bytes = 2 * 2 * 6 * 16 * 8 * 4  # k and v, 2 KV heads, 6 layers, head_dim 16, 8-token blocks, fp32
    with deep.engine(max_num_batched_tokens=48, num_kv_blocks=128, preemption_mode="discard",
                     checkpoint_bytes=6 * block_bytes) as engine:
        assert engine.checkpointer.store.pool.num_blocks == 6
        EvictEveryFewSteps(engine, period=4)
        outputs = [s.final() for s in [engine.submit(p, params, "offline") for p in prompts]]
        stats = engine.stats()
        assert engine.checkpointer.store.pool.num_free == 6
    assert [o.token_ids for o in outputs] == [deep.reference_greedy(p, 20) for p in prompts]
    assert stats.checkpoint_store_full >= 1 and stats.recomputed_tokens > 0 and stats.restored_tokens > 0


def test_a_parked_step_holding_the_blocks_an_arrival_needs_is_dropped_for_it(deep):
    """The pool is full of the parked step's own requests: rather than keep the online request waiting
    for the parked step's remaining layers, the engine drops that step (nothing of it was committed)."""
    prompts = [prompt_of(n, seed=100 + i) for i, n in enumerate([70, 60, 70])]
    with deep.engine(num_kv_blocks=28, max_num_batched_tokens=256, preemption_mode="park") as engine:
        arrivals = ArrivalsAtSafepoints(engine, at_layers=[2])
        arrivals.prompts = [prompt_of(20, seed=7)]
        # Hold the engine's steps until all three are queued, so that they share the first step (the
        # engine thread otherwise sometimes started a step with the first alone, which left blocks free).
        gate, has_work = threading.Event(), engine.scheduler.has_work
        engine.scheduler.has_work = lambda: gate.is_set() and has_work()
        offline = [engine.submit(p, GREEDY, "offline") for p in prompts]
        gate.set()
        with engine._wake:
            engine._wake.notify()
        while not arrivals.streams:
            threading.Event().wait(0.01)
        online = arrivals.streams[0].final()
        outputs = [s.final() for s in offline]
        stats = engine.stats()
    assert stats.discarded_tokens == 200 and stats.layer_yields >= 1 and stats.num_preemptions >= 1
    assert online.token_ids == deep.reference_greedy(prompt_of(20, seed=7), NEW_TOKENS)
    assert [o.token_ids for o in outputs] == [deep.reference_greedy(p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("policy", ["priority", "conserve"])
def test_an_online_arrival_gets_a_seat_when_offline_work_holds_every_one(deep, policy):
    """max_num_seqs offline requests running with memory to spare: an online arrival takes a seat from
    one of them instead of waiting for one to finish (on an H200 online requests had run one at a
    time behind 128 offline ones), and every output is still transformers' greedy one."""
    prompts, params = OFFLINE_PROMPTS[:3], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    with deep.engine(policy=policy, max_num_seqs=3, num_kv_blocks=128) as engine:
        finished = []
        original_finish = engine._finish

        def record_finish(request_id, *args, **kwargs):
            finished.append(request_id)
            return original_finish(request_id, *args, **kwargs)

        engine._finish = record_finish
        arrivals = ArrivalsBetweenSteps(engine, at_rounds=[5])
        offline = [engine.submit(p, params, "offline") for p in prompts]
        offline_out = [s.final() for s in offline]
        online_out = arrivals.streams[0].final()
        stats = engine.stats()
        assert engine.pool.num_free == engine.pool.num_blocks
    assert finished[0] == online_out.request_id and stats.num_preemptions >= 1
    assert online_out.token_ids == deep.reference_greedy(ONLINE_PROMPTS[0], NEW_TOKENS)
    assert [o.token_ids for o in offline_out] == [deep.reference_greedy(p, 60) for p in prompts]


def test_the_step_trace_records_every_steps_shape_and_what_the_scheduler_predicted(deep):
    prompts = OFFLINE_PROMPTS[:2]
    with deep.engine(step_trace=1000, num_kv_blocks=128) as engine:
        arrivals = ArrivalsBetweenSteps(engine, at_rounds=[2])
        offline = [s.final() for s in [engine.submit(p, GREEDY, "offline") for p in prompts]]
        online = arrivals.streams[0].final()
        trace, stats = engine.step_trace(), engine.stats()
    committed = [r for r in trace if r.committed]
    assert len(committed) == stats.num_steps
    # Every token computed once (no eviction here): prompt and output, less the last sampled token.
    assert sum(r.online_tokens for r in committed) == len(ONLINE_PROMPTS[0]) + NEW_TOKENS - 1
    assert sum(r.offline_tokens for r in committed) == sum(len(p) + NEW_TOKENS - 1 for p in prompts)
    assert all(r.seconds > 0 and r.decodes <= r.seqs for r in trace)
    assert [r.at_s for r in trace] == sorted(r.at_s for r in trace)
    # Steps with offline work beside the online decodes are sized to the TPOT SLO: those carry a prediction.
    sized = [r for r in committed if r.predicted_s is not None]
    assert sized and all(r.online_tokens and r.predicted_s > 0 and r.time_scale > 0 for r in sized)
    assert online.token_ids == deep.reference_greedy(ONLINE_PROMPTS[0], NEW_TOKENS)
    assert [o.token_ids for o in offline] == [deep.reference_greedy(p, NEW_TOKENS) for p in prompts]


def test_the_step_trace_keeps_only_its_last_steps_and_is_off_by_default(deep):
    with deep.engine(step_trace=3) as engine:
        engine.generate(OFFLINE_PROMPTS[:2], GREEDY, "offline")
        assert len(engine.step_trace()) == 3 and engine.stats().num_steps > 3
    with deep.engine() as engine:
        engine.generate(OFFLINE_PROMPTS[:1], GREEDY, "offline")
        assert engine.step_trace() == []
    with pytest.raises(InvalidRequestError, match="step_trace"):
        deep.engine(step_trace=-1)
