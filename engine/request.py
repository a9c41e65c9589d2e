"""One generation request as the engine tracks it: its tokens, its progress and its timeline."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


class RequestClass(str, enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestTimes:
    """Event timestamps (time.monotonic); every latency metric is derived from these."""
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 request_class: RequestClass, eos_token_ids: frozenset[int], max_model_len: int):
        self.request_id = request_id
        self.params = params
        self.request_class = request_class
        self.token_ids = list(prompt_token_ids)  # prompt then output; grows as tokens are sampled
        self.num_prompt_tokens = len(prompt_token_ids)
        # Tokens whose keys and values are in the cache; catches up to len(token_ids) chunk by chunk.
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # Most tokens ever computed: work below it after an eviction is recompute, above it progress.
        self.high_water = 0
        # KV checkpoint in the host store (engine/checkpoint.py): its blocks and the tokens they hold.
        self.host_block_ids: list[int] = []
        self.num_checkpointed_tokens = 0
        # Bumped whenever the request's device blocks are freed, so a checkpoint copy that raced with the
        # free is thrown away instead of storing keys and values of blocks that changed hands.
        self.kv_generation = 0
        self.times = RequestTimes()
        # Wall-clock time (time.time()) by which an offline request should be done, if its job has one.
        self.deadline: float | None = None
        self.max_total_tokens = min(max_model_len, self.num_prompt_tokens + params.max_tokens)
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def online(self) -> bool:
        return self.request_class is RequestClass.ONLINE

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> str | None:
        """Record a sampled token; return the finish reason it causes ('stop' or 'length'), if any."""
        self.token_ids.append(token_id)
        if token_id in self.stop_ids and self.num_output_tokens > self.params.min_tokens:
            return "stop"
        if self.num_tokens >= self.max_total_tokens:
            return "length"
        return None
