"""The decode mirror: decodes that read their keys and values from the mirror's slots attend exactly as
decodes that gather them from the paged pool, step after step, as sequences join, leave, lose their
blocks or miss a step; and the mirror plans appends, joins, repacks and reallocations as documented."""
from __future__ import annotations

import pytest
import torch

from engine.attention import TorchAttentionBackend
from engine.decode_mirror import GROWTH, DecodeMirror
from engine.kv_cache import BlockPool, KVCache
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.request import Request, RequestClass
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk
from tiny_models import prompt_of

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 4, 2, 8, 4, 2
CONFIG = ModelConfig(vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=64, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
CPU = torch.device("cpu")


class _NoModel:
    """ModelRunner.prepare needs no model; only the cache geometry and the backend's mask dtype."""
    backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)


def mirror(max_bytes: int = 1 << 30, dtype: torch.dtype = torch.float32, cut_views: bool = False) -> DecodeMirror:
    return DecodeMirror(LAYERS, KV_HEADS, HEAD_DIM, BLOCK, dtype, CPU, max_bytes, cut_views)


def request(i: int, length: int, pool: BlockPool, room: int = 8) -> Request:
    """A request decoding its token number `length`, with blocks for `room` more."""
    req = Request(f"r{i}", list(range(length + room)), SamplingParams(max_tokens=4), RequestClass.ONLINE,
                  frozenset(), 1024)
    req.block_ids = pool.allocate(pool.blocks_for(length + room))
    pool.free(pool.allocate(1))  # interleave a freed block so tables are not contiguous
    req.num_computed_tokens = length - 1
    return req


class Harness:
    """Two runners over two copies of one pool, one with a mirror and one without; each step feeds both
    the same random q, k, v (every layer) and compares their decode outputs: exactly in float32, and
    to bfloat16's rounding where the two take different kernels."""

    def __init__(self, num_blocks: int = 256, max_bytes: int = 1 << 30, dtype: torch.dtype = torch.float32):
        torch.manual_seed(0)
        self.dtype = dtype
        self.tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        self.pool = BlockPool(num_blocks, BLOCK)
        self.caches = [KVCache(CONFIG, num_blocks, BLOCK, dtype, CPU) for _ in range(2)]
        for layer in range(LAYERS):  # pool contents of every block: what earlier steps wrote
            for name in ("keys", "values"):
                fill = torch.randn_like(getattr(self.caches[0], name)[layer])
                for cache in self.caches:
                    getattr(cache, name)[layer].copy_(fill)
        self.backend = _NoModel.backend
        self.mirror = mirror(max_bytes, dtype, cut_views=self.backend.mirror_cut_views(CPU, dtype))
        self.with_mirror = ModelRunner(_NoModel(), self.caches[0], CPU, self.mirror)
        self.without = ModelRunner(_NoModel(), self.caches[1], CPU)

    def step(self, requests: list[Request]):
        """Run one decode step of `requests` through both runners; returns the mirror's plan for it."""
        chunks = [ScheduledChunk(r, 1) for r in requests]
        batches = [self.with_mirror.prepare(chunks), self.without.prepare(chunks)]
        assert batches[0].meta.mirror is not None and batches[1].meta.mirror is None
        n = len(requests)
        for layer in range(LAYERS):
            q, k, v = (torch.randn(n, heads, HEAD_DIM).to(self.dtype) for heads in (HEADS, KV_HEADS, KV_HEADS))
            outs = [self.backend.forward(q, k, v, cache.keys[layer], cache.values[layer], b.meta, layer)
                    for cache, b in zip(self.caches, batches)]
            assert outs[0].dtype == self.dtype
            torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=self.tolerance, atol=self.tolerance)
        self.mirror.commit(batches[0].mirror_table)
        for r in requests:
            r.num_computed_tokens += 1
        return batches[0].meta.mirror


def kernels(monkeypatch, sdpa_decode_dtypes=(), matmul_cut_view_dtypes=()) -> None:
    """Which kernel the decodes over the mirror take, and whether it reads cut views, by dtype."""
    monkeypatch.setattr(TorchAttentionBackend, "sdpa_decode_dtypes", sdpa_decode_dtypes)
    monkeypatch.setattr(TorchAttentionBackend, "matmul_cut_view_dtypes", matmul_cut_view_dtypes)


@pytest.mark.parametrize("dtype, sdpa_decode_dtypes, matmul_cut_view_dtypes", [
    (torch.float32, (), (torch.float32,)),   # the matmuls over views cut to the longest context
    (torch.float32, (), ()),                 # ... and over the whole capacity
    (torch.bfloat16, (), ()),
    # bfloat16 decodes over the mirror on scaled_dot_product_attention (CPUs with AMX), the gather's
    # on the matmuls
    (torch.bfloat16, (torch.bfloat16,), ()),
])
def test_mirror_attends_as_the_gather_does_as_sequences_join_leave_and_lose_blocks(
        dtype, sdpa_decode_dtypes, matmul_cut_view_dtypes, monkeypatch):
    kernels(monkeypatch, sdpa_decode_dtypes, matmul_cut_view_dtypes)
    h = Harness(dtype=dtype)
    assert h.mirror.cut_views == bool(sdpa_decode_dtypes or matmul_cut_view_dtypes)
    reqs = [request(i, n, h.pool) for i, n in enumerate([3, 9, 17, 4, 30])]
    h.step(reqs[:3])                          # all join
    h.step(reqs[:3])                          # all append
    h.step([reqs[2], reqs[0], reqs[1]])       # same sequences, another order
    h.step([reqs[0], reqs[2], reqs[3]])       # r1 leaves (its slot becomes a hole), r3 takes it
    h.step(reqs[:4])                          # r1 comes back after missing a step: it joins again
    reqs[2].kv_generation += 1                # r2's blocks were freed and its KV restored elsewhere
    h.pool.free(reqs[2].block_ids)
    reqs[2].block_ids = h.pool.allocate(h.pool.blocks_for(len(reqs[2].token_ids)))
    h.step(reqs)                              # r2 re-joins from its new blocks, r4 joins
    h.step(reqs[3:])                          # only two left: holes before them


def test_mirror_reallocates_as_contexts_outgrow_its_capacity(monkeypatch):
    kernels(monkeypatch)  # no cut views: capacity kept just above the longest context
    h = Harness()
    assert not h.mirror.cut_views
    reqs = [request(i, n, h.pool, room=2 * GROWTH + 16) for i, n in enumerate([5, 6])]
    h.step(reqs)
    capacity = h.mirror.capacity
    for _ in range(capacity - 6 + 2):  # grow past the capacity, one decode at a time
        plan = h.step(reqs)
        if h.mirror.capacity > capacity:
            break
    assert h.mirror.capacity > capacity
    # What the slots held was carried into the larger tensors: the sequences append, none joins again.
    assert plan.join_slots is None
    for _ in range(3):
        h.step(reqs)
    # More sequences than slots: the tensors grow by slots, and those already there keep theirs.
    more = reqs + [request(i, 9, h.pool) for i in range(2, 10)]
    plan = h.step(more)
    assert len(h.mirror._slots) >= len(more) and plan.join_slots.tolist() == list(range(2, 10))
    h.step(more)


@pytest.mark.parametrize("dtype, sdpa_decode_dtypes, matmul_cut_view_dtypes", [
    (torch.bfloat16, (torch.bfloat16,), ()),
    (torch.float32, (), (torch.float32,)),
])
def test_cut_views_size_slots_to_what_the_requests_can_reach(dtype, sdpa_decode_dtypes, matmul_cut_view_dtypes,
                                                             monkeypatch):
    """Where attention reads views cut to the longest context, the slots are sized to the requests'
    prompt plus max_tokens (up to twice the longest context), so they never grow as the sequences
    decode; each step attends over exactly its longest context."""
    kernels(monkeypatch, sdpa_decode_dtypes, matmul_cut_view_dtypes)
    h = Harness(dtype=dtype)
    assert h.mirror.cut_views
    # Contexts of 10 and 14 tokens; prompts of 22 and 26 with max_tokens 4: they reach 26 and 30.
    reqs = [request(i, n, h.pool, room=12) for i, n in enumerate([10, 14])]
    plan = h.step(reqs)
    capacity = h.mirror.capacity
    assert 30 <= capacity < 30 + BLOCK and plan.attend_len == 14 and plan.bias.shape[-1] == 14
    while reqs[1].num_computed_tokens + 1 < len(reqs[1].token_ids):  # as far as its blocks go
        plan = h.step(reqs)
        assert h.mirror.capacity == capacity and plan.join_slots is None
    assert plan.attend_len == reqs[1].num_computed_tokens  # the step's longest context, after it ran
    # A budget too small for the reach (here twice the context: 96 positions) falls back to GROWTH tokens
    # of headroom.
    longest = 3 * GROWTH // 2
    small = Harness(dtype=dtype, max_bytes=mirror(dtype=dtype).bytes_for(8, longest + GROWTH))
    small.step([request(0, longest, small.pool, room=4 * GROWTH)])
    assert small.mirror.capacity == longest + GROWTH


def test_plan_appends_joins_and_repacks():
    pool = BlockPool(256, BLOCK)
    m = mirror()
    runner = ModelRunner(_NoModel(), KVCache(CONFIG, 256, BLOCK, torch.float32, CPU), CPU, m)
    reqs = [request(i, 10 + i, pool) for i in range(12)]

    def plan(rs):
        return m.plan(rs, [r.num_computed_tokens + 1 for r in rs], runner._block_tables, runner._bias)

    p, table = plan(reqs[:3])
    assert p.join_slots.tolist() == [0, 1, 2] and p.identity
    m.commit(table)
    for r in reqs[:3]:
        r.num_computed_tokens += 1
    p, table = plan(reqs[:3])
    assert p.join_slots is None and p.identity and p.positions.tolist() == [r.num_computed_tokens for r in reqs[:3]]
    m.commit(table)
    for r in reqs[:3]:
        r.num_computed_tokens += 1
    p, table = plan([reqs[2], reqs[5]])          # r2 keeps slot 2; r5 takes the lowest free slot
    assert p.slots.tolist() == [2, 0] and p.join_slots.tolist() == [0] and not p.identity
    assert p.num_slots == 3
    # Holes (slot 1 here) see only their first position, never nothing: no row of -inf.
    assert torch.isfinite(p.bias[1, 0, 0]) and torch.isinf(p.bias[1, 0, 1:]).all()
    m.invalidate()
    p, _ = plan(reqs[:3])
    assert p.join_slots.tolist() == [0, 1, 2]   # nothing is trusted after invalidate()
    p, table = plan(reqs[:12])
    m.commit(table)
    for r in reqs:
        r.num_computed_tokens += 1
    # Holes below or above the slots in use are not attended over: r11 alone keeps its slot.
    p, _ = plan([reqs[11]])
    assert (p.first_slot, p.num_slots, p.slots.tolist(), p.join_slots) == (11, 1, [0], None) and p.identity
    p, _ = plan(reqs[6:12])
    assert (p.first_slot, p.num_slots, p.join_slots) == (6, 6, None) and p.identity
    # Too many holes between them are repacked instead of attended over: both join again from slot 0.
    p, _ = plan([reqs[0], reqs[11]])
    assert (p.first_slot, p.num_slots, p.slots.tolist(), p.join_slots.tolist()) == (0, 2, [0, 1], [0, 1])


def test_plan_falls_back_to_the_gather_beyond_its_byte_budget():
    pool = BlockPool(256, BLOCK)
    small = mirror(max_bytes=mirror().bytes_for(8, 2 * GROWTH))
    runner = ModelRunner(_NoModel(), KVCache(CONFIG, 256, BLOCK, torch.float32, CPU), CPU, small)
    short, long_ = request(0, 10, pool), request(1, 2 * GROWTH + 40, pool)
    assert small.plan([short], [11], runner._block_tables, runner._bias)[0] is not None
    assert small.plan([long_], [2 * GROWTH + 41], runner._block_tables, runner._bias) == (None, None)
    batch = runner.prepare([ScheduledChunk(long_, 1)])
    assert batch.meta.mirror is None and batch.meta.decode_blocks is not None


@pytest.fixture(scope="module")
def churn_outputs(tiny):
    """A workload where decodes join and leave the batch at many different steps: a cap of three
    running requests, prompts and output lengths all different, and a budget that chunks prefills."""
    prompts = [prompt_of(n, seed=40 + i) for i, n in enumerate([3, 11, 6, 25, 14, 9, 2])]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in [30, 7, 19, 12, 41, 5, 23]]

    def run(**settings):
        with tiny.engine(max_num_seqs=3, max_num_batched_tokens=8, **settings) as engine:
            streams = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
            return [s.final().token_ids for s in streams]
    return run


def test_engine_outputs_are_the_same_with_and_without_the_mirror(churn_outputs, monkeypatch):
    plans = []
    real_plan = DecodeMirror.plan

    def counted(self, *args):
        result = real_plan(self, *args)
        plans.append(result[0])
        return result

    monkeypatch.setattr(DecodeMirror, "plan", counted)
    with_mirror = churn_outputs(decode_mirror_bytes=1 << 24)  # on by default on the CPU only
    appends = [p for p in plans if p is not None and p.join_slots is None]
    joins = [p for p in plans if p is not None and p.join_slots is not None]
    assert appends and joins, "the workload should make the mirror both append and join"
    assert with_mirror == churn_outputs(decode_mirror_bytes=0, native_decode="off")


def test_mirror_is_off_when_its_budget_is_zero(tiny):
    with tiny.engine(decode_mirror_bytes=0, native_decode="off") as engine:
        assert engine.runner.mirror is None
    # On by default on the CPU only, and there only where the native decode kernel (which reads the
    # pool in place) is off.
    with tiny.engine(native_decode="off") as engine:
        assert (engine.runner.mirror is not None) == (engine.device.type == "cpu")
