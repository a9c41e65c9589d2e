"""The continuous-batching scheduler on its own (no model): token budget, running-first order, the cap
on running requests, admission by free blocks, preemption of the latest admitted, and freeing on finish."""
from __future__ import annotations

import pytest

from engine.kv_cache import BlockPool
from engine.request import Request, RequestClass, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from scheduler_steps import chunks, step


def request(name: str, prompt_len: int, max_tokens: int = 16) -> Request:
    return Request(name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                   RequestClass.OFFLINE, frozenset(), max_model_len=1 << 20)


def scheduler(num_blocks: int = 64, block_size: int = 4, budget: int = 2048, max_num_seqs: int = 128,
              chunked: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, chunked), BlockPool(num_blocks, block_size))


def test_a_step_never_exceeds_the_token_budget_and_every_request_finishes():
    s = scheduler(budget=16)
    reqs = [request(f"r{i}", n, max_tokens=5) for i, n in enumerate([1, 7, 16, 23, 40, 3, 16])]
    for r in reqs:
        s.add(r)
    sizes = []
    while s.has_work():
        out = step(s)
        assert out.chunks, "a step with work pending scheduled nothing"
        sizes.append(out.num_tokens)
        assert len(sizes) < 200
    assert max(sizes) == 16 and all(n <= 16 for n in sizes)
    assert all(r.finished and r.num_output_tokens == 5 for r in reqs)
    assert s.pool.num_free == s.pool.num_blocks


def test_long_prompt_is_prefilled_in_budget_sized_chunks():
    s = scheduler(budget=8)
    r = request("long", 21)
    s.add(r)
    assert [chunks(step(s)) for _ in range(4)] == [[("long", 8)], [("long", 8)], [("long", 5)], [("long", 1)]]
    assert r.num_output_tokens == 2


def test_without_chunking_a_prompt_waits_until_the_budget_holds_all_of_it():
    s = scheduler(budget=10, chunked=False)
    for name, n in [("a", 6), ("b", 6)]:
        s.add(request(name, n))
    assert chunks(step(s)) == [("a", 6)]  # b's whole prompt does not fit the 4 tokens left
    assert chunks(step(s)) == [("a", 1), ("b", 6)]


def test_running_requests_are_scheduled_before_waiting_ones():
    s = scheduler(budget=8)
    a, b = request("a", 5), request("b", 20)
    s.add(a)
    step(s)
    s.add(b)
    assert chunks(step(s)) == [("a", 1), ("b", 7)]
    assert chunks(step(s)) == [("a", 1), ("b", 7)]


def test_a_full_budget_of_running_work_leaves_waiting_requests_waiting():
    s = scheduler(budget=2)
    a, b = request("a", 1), request("b", 1)
    s.add(a), s.add(b)
    step(s)
    c = request("c", 1)
    s.add(c)
    assert chunks(step(s)) == [("a", 1), ("b", 1)]
    assert list(s.waiting) == [c] and c.status is RequestStatus.WAITING


def test_max_num_seqs_caps_running_requests():
    s = scheduler(max_num_seqs=2)
    reqs = [request(f"r{i}", 3, max_tokens=2) for i in range(4)]
    for r in reqs:
        s.add(r)
    assert chunks(step(s)) == [("r0", 3), ("r1", 3)]
    assert s.running == reqs[:2] and list(s.waiting) == reqs[2:]
    step(s)  # r0 and r1 reach max_tokens and finish
    assert chunks(step(s)) == [("r2", 3), ("r3", 3)]


def test_a_request_is_admitted_only_when_its_blocks_are_free():
    s = scheduler(num_blocks=4, block_size=4)
    a, b, c = request("a", 12, max_tokens=2), request("b", 8), request("c", 1)
    for r in (a, b, c):
        s.add(r)
    assert chunks(step(s)) == [("a", 12)]  # a takes 3 of the 4 blocks; b needs 2
    # b waits, and c (which would fit) does not overtake it: admission keeps arrival order.
    assert len(a.block_ids) == 3 and list(s.waiting) == [b, c]
    assert chunks(step(s)) == [("a", 1)]  # a's 13th token takes the last block, then a finishes
    assert a.finished and s.pool.num_free == 4
    assert chunks(step(s)) == [("b", 8), ("c", 1)]
    assert s.pool.num_free == 1


def test_admission_allocates_blocks_for_the_scheduled_chunk_only():
    s = scheduler(num_blocks=16, block_size=4, budget=6)
    r = request("r", 20)
    s.add(r)
    step(s)
    assert len(r.block_ids) == 2  # 6 tokens
    step(s)
    assert len(r.block_ids) == 3  # 12 tokens


def test_running_out_of_blocks_preempts_the_most_recently_admitted_request():
    s = scheduler(num_blocks=4, block_size=4)
    a, b, c = request("a", 4), request("b", 4), request("c", 4)
    for r in (a, b, c):
        s.add(r)
    step(s)  # each prompt fills one block, one block stays free
    d = request("d", 8)
    s.add(d)  # needs 2 blocks: waits
    out = step(s)  # a's decode takes the free block; b's needs one more: c, admitted last, goes
    assert out.preempted == [c]
    assert chunks(out) == [("a", 1), ("b", 1)]
    assert s.running == [a, b] and list(s.waiting) == [c, d]  # back at the front of the queue
    assert (c.block_ids, c.num_computed_tokens, c.status, c.num_preemptions) == ([], 0, RequestStatus.WAITING, 1)
    assert c.num_tokens == 5  # its sampled token is kept and recomputed with the prompt
    assert s.num_preemptions == 1 and s.pool.num_free == 0


def test_preempted_request_is_recomputed_with_its_output_when_blocks_return():
    s = scheduler(num_blocks=4, block_size=4)
    a, b = request("a", 4, max_tokens=2), request("b", 4, max_tokens=6)
    s.add(a), s.add(b)
    step(s)
    s.pool.allocate(2)  # someone else holds the other two blocks
    out = step(s)  # a needs a block, none free: b, admitted last, goes
    assert out.preempted == [b] and chunks(out) == [("a", 1)] and a.finished
    out = step(s)
    assert chunks(out) == [("b", 5)]  # prompt and its first sampled token, computed again
    assert b.num_output_tokens == 2


def test_the_latest_admitted_request_preempts_itself_rather_than_an_earlier_one():
    s = scheduler(num_blocks=2, block_size=4)
    a, b = request("a", 3), request("b", 4)
    s.add(a), s.add(b)
    step(s)  # a: 3 tokens in one block with room; b: block full
    out = step(s)  # a fits its decode; b needs a block and none is free
    assert out.preempted == [b] and chunks(out) == [("a", 1)]
    assert s.running == [a] and len(a.block_ids) == 1


def test_no_new_admissions_in_a_step_that_had_to_preempt():
    s = scheduler(num_blocks=4, block_size=4, budget=4)
    a, x = request("a", 4), request("x", 12)
    s.add(a), s.add(x)
    for _ in range(3):
        step(s)  # a decodes while x's prompt is prefilled 3 tokens a step, until the pool is full
    out = step(s)  # x's next chunk needs a block: x, admitted last, preempts itself
    assert out.preempted == [x] and chunks(out) == [("a", 1)]
    # Its next 3-token chunk would fit the 2 freed blocks, but memory is short: it waits a step.
    assert s.pool.num_free == 2 and list(s.waiting) == [x]
    assert chunks(step(s)) == [("a", 1), ("x", 3)]


def test_finish_frees_blocks_of_running_and_waiting_requests():
    s = scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    a, b = request("a", 10), request("b", 3)
    s.add(a), s.add(b)
    step(s)
    assert s.pool.num_free == 5
    s.finish(a)
    assert (s.pool.num_free, s.running, a.block_ids, a.status) == (8, [], [], RequestStatus.FINISHED)
    s.finish(b)  # never scheduled: just leaves the queue
    assert not s.has_work() and s.pool.num_free == 8


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_every_budget_and_pool_combination_finishes_all_requests_and_returns_all_blocks(budget):
    s = scheduler(num_blocks=12, block_size=4, budget=budget, max_num_seqs=3)
    reqs = [request(f"r{i}", n, max_tokens=m) for i, (n, m) in enumerate([(9, 12), (2, 20), (17, 6), (5, 9), (1, 1)])]
    for r in reqs:
        s.add(r)
    for _ in range(1000):
        if not s.has_work():
            break
        out = step(s)
        assert 0 < out.num_tokens <= budget and len(s.running) <= 3
        assert s.pool.num_free + sum(len(r.block_ids) for r in s.running) == 12
    assert all(r.finished for r in reqs)
    assert [r.num_output_tokens for r in reqs] == [12, 20, 6, 9, 1]
    assert s.pool.num_free == 12


def test_without_chunking_a_preempted_request_that_outgrew_the_budget_is_recomputed_in_chunks():
    s = scheduler(num_blocks=64, block_size=4, budget=8, chunked=False)
    r = request("r", 6)
    s.add(r)
    for _ in range(4):
        step(s)  # the prompt, then three decodes: 6 + 4 tokens, more than one step holds
    s.preempt(r)
    assert r.num_tokens == 10 and r.num_computed_tokens == 0
    assert [chunks(step(s)) for _ in range(2)] == [[("r", 8)], [("r", 2)]]
    assert r.num_output_tokens == 5
