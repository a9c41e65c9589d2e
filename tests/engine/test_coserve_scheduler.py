"""The class-aware policies on the scheduler alone (no model): online work first, offline evicted for
online memory, the SLO-aware budget of conserve, its reserve of free blocks, and its choice of victim."""
from __future__ import annotations

from engine.cost_model import CostModel
from engine.kv_cache import BlockPool
from engine.policy import Policy
from engine.request import Request, RequestClass
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from scheduler_steps import chunks, step

# 1 ms per token and 10 ms per step: easy to reason about.
COST = CostModel(per_token=0.001, per_step=0.010)


def request(name: str, prompt_len: int, klass: str, max_tokens: int = 16) -> Request:
    return Request(name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                   RequestClass(klass), frozenset(), max_model_len=1 << 20)


def scheduler(policy: str, num_blocks: int = 64, block_size: int = 4, budget: int = 64, **extra) -> Scheduler:
    config = SchedulerConfig(128, budget, True, Policy(policy), **extra)
    return Scheduler(config, BlockPool(num_blocks, block_size), cost_model=COST)


def test_fcfs_serves_in_arrival_order_whatever_the_class():
    s = scheduler("fcfs", budget=40)
    s.add(request("off", 40, "offline"))
    s.add(request("on", 8, "online"))
    assert chunks(step(s)) == [("off", 40)]
    assert chunks(step(s)) == [("off", 1), ("on", 8)]


def test_priority_puts_online_work_first():
    s = scheduler("priority", budget=40)
    s.add(request("off", 40, "offline"))
    s.add(request("on", 8, "online"))
    assert chunks(step(s)) == [("on", 8), ("off", 32)]
    assert chunks(step(s)) == [("on", 1), ("off", 8)]


def test_priority_evicts_the_latest_offline_request_for_an_online_one():
    s = scheduler("priority", num_blocks=8, budget=64)
    a, b = request("a", 16, "offline"), request("b", 16, "offline")
    s.add(a), s.add(b)
    step(s)  # a and b hold 4 blocks each: the pool is full
    s.add(request("on", 6, "online"))
    out = step(s)
    assert out.preempted == [b] and chunks(out) == [("on", 6), ("a", 1)]
    # b's 4 blocks went to the online request (2) and a's next token (1); b waits at the queue's front.
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and s.pool.num_free == 1
    assert s.waiting == [b]


def test_conserve_fills_steps_beside_online_decodes_only_up_to_the_tpot_slo():
    # SLO 50 ms, planned to 85%: 42.5 ms, of which the step's 10 ms and the online decode's 1 ms are taken.
    s = scheduler("conserve", budget=256, slo_tpot_s=0.050)
    on = request("on", 4, "online", max_tokens=50)
    s.add(on)
    step(s)
    s.add(request("off", 200, "offline"))
    out = step(s)
    assert chunks(out) == [("on", 1), ("off", 31)]
    assert 0.0425 - 0.001 < COST.predict([(c.num_tokens, 0) for c in out.chunks]) <= 0.0425


def test_conserve_adds_no_offline_work_to_a_step_with_an_online_prefill():
    s = scheduler("conserve", budget=256, slo_tpot_s=0.050)
    s.add(request("off", 200, "offline"))
    s.add(request("on", 20, "online"))
    assert chunks(step(s)) == [("on", 20)]


def test_conserve_grows_offline_steps_when_no_online_work_is_in_flight():
    s = scheduler("conserve", budget=64, offline_max_batched_tokens=256)
    s.add(request("off", 300, "offline"))
    assert chunks(step(s)) == [("off", 256)]


def test_conserve_offline_admission_leaves_the_online_reserve_free():
    s = scheduler("conserve", num_blocks=16, budget=256, online_reserve_blocks=4)
    s.add(request("a", 40, "offline"))   # 10 blocks
    s.add(request("b", 12, "offline"))   # 3 more would leave 3 < 4 free
    assert chunks(step(s)) == [("a", 40)]
    assert s.pool.num_free == 6
    s.add(request("on", 20, "online"))   # online requests may use the reserve
    assert chunks(step(s))[0] == ("on", 20)


class FakeCheckpoints:
    def __init__(self):
        self.saved: dict[str, int] = {}

    def settle(self, req):
        pass

    def restorable(self, req):
        return min(self.saved.get(req.request_id, 0), req.num_tokens - 1)

    def restore(self, req, num_tokens):
        pass

    def on_evict(self, req):
        pass

    def drop(self, req):
        self.saved.pop(req.request_id, None)


def test_conserve_evicts_the_offline_request_that_loses_least_and_resumes_it_from_its_checkpoint():
    checkpoints = FakeCheckpoints()
    s = Scheduler(SchedulerConfig(128, 64, True, Policy.CONSERVE), BlockPool(8, 4), COST, checkpoints)
    a, b = request("a", 16, "offline", max_tokens=2), request("b", 16, "offline", max_tokens=2)
    s.add(a), s.add(b)
    step(s)
    # a's KV is all in the host store, b's not at all: evicting a loses nothing.
    a.num_checkpointed_tokens = checkpoints.saved["a"] = 16
    s.add(request("on", 6, "online"))
    out = step(s)
    assert out.preempted == [a]
    for _ in range(50):  # b and the online request finish, then a comes back restored
        out = step(s)
        if "a" in dict(chunks(out)):
            break
    assert out.restored_tokens == 16 and ("a", 1) in chunks(out)


def test_offline_requests_with_deadlines_wait_earliest_deadline_first():
    s = scheduler("conserve", budget=8)
    for name, deadline in [("late", 300.0), ("none", None), ("soon", 100.0), ("middle", 200.0), ("soon2", 100.0)]:
        r = request(name, 8, "offline")
        r.deadline = deadline
        s.add(r)
    # One 8-token prompt fits a step: admission order is the queue order.
    assert [r.request_id for r in s.waiting] == ["soon", "soon2", "middle", "late", "none"]
    assert chunks(step(s)) == [("soon", 8)]


def test_online_arrival_takes_a_seat_from_offline_work_when_every_seat_is_taken():
    # Measured on an H200: offline requests held all max_num_seqs seats, and online arrivals waited
    # for each other to finish (3-5 s TTFT) while memory was plentiful.
    for policy in ("priority", "conserve"):
        s = Scheduler(SchedulerConfig(2, 64, True, Policy(policy)), BlockPool(64, 4), COST)
        a, b = request("a", 8, "offline", max_tokens=100), request("b", 8, "offline", max_tokens=100)
        s.add(a), s.add(b)
        step(s)
        s.add(request("on", 6, "online"))
        out = step(s)
        assert ("on", 6) in chunks(out), policy
        assert len(out.preempted) == 1 and len(s.running) == 2, policy


def test_fcfs_evicts_nobody_for_a_seat():
    s = Scheduler(SchedulerConfig(2, 64, True, Policy.FCFS), BlockPool(64, 4), COST)
    s.add(request("a", 8, "offline", max_tokens=100)), s.add(request("b", 8, "offline", max_tokens=100))
    step(s)
    s.add(request("on", 6, "online"))
    out = step(s)
    assert chunks(out) == [("a", 1), ("b", 1)] and out.preempted == []


def test_conserve_offline_admission_leaves_the_online_seats_free():
    s = Scheduler(SchedulerConfig(4, 64, True, Policy.CONSERVE, online_reserve_seats=1), BlockPool(64, 4), COST)
    for name in "abcd":
        s.add(request(name, 8, "offline", max_tokens=100))
    assert chunks(step(s)) == [("a", 8), ("b", 8), ("c", 8)]
    s.add(request("on", 6, "online"))
    out = step(s)
    assert chunks(out)[0] == ("on", 6) and out.preempted == []
