"""Driving a scheduler without a model: what an engine step does to the requests it planned."""
from __future__ import annotations

from engine.scheduler import Scheduler, SchedulerOutput


def step(s: Scheduler) -> SchedulerOutput:
    """One engine step without a model: schedule, compute the chunks, sample a token where a chunk
    reached its request's end, and finish requests that hit max_tokens."""
    out = s.schedule()
    sampling = [c.request for c in out.chunks if c.samples]
    for c in out.chunks:
        c.request.num_computed_tokens += c.num_tokens
    for r in sampling:
        if r.append_token(7) is not None:
            s.finish(r)
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.request.request_id, c.num_tokens) for c in out.chunks]
