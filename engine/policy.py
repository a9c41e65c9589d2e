"""Scheduling policies, selectable by name so every comparison runs in the same engine.

- online-only: offline requests are refused; the baseline for online latency.
- fcfs: one queue in arrival order, no classes; what a plain serving engine does.
- priority: online first at iteration granularity; offline requests preempted for memory are freed and
  recomputed (vLLM's priority scheduling).
- conserve: the paper: SLO-aware token budgets from a profiled cost model, layer-wise preemption of
  steps carrying offline work, incremental KV checkpointing so evictions cost no recompute."""
from __future__ import annotations

import enum

from engine.errors import InvalidRequestError


class Policy(str, enum.Enum):
    ONLINE_ONLY = "online-only"
    FCFS = "fcfs"
    PRIORITY = "priority"
    CONSERVE = "conserve"

    @classmethod
    def parse(cls, name: str) -> "Policy":
        try:
            return cls(name)
        except ValueError:
            raise InvalidRequestError(
                f"policy must be one of {', '.join(p.value for p in cls)}; got {name!r}") from None

    @property
    def knows_classes(self) -> bool:
        """Whether online requests go ahead of offline ones."""
        return self is not Policy.FCFS

    @property
    def accepts_offline(self) -> bool:
        return self is not Policy.ONLINE_ONLY

    @property
    def harvests(self) -> bool:
        """The ConServe mechanisms: layer-wise preemption, checkpointing, SLO-aware budgets."""
        return self is Policy.CONSERVE
