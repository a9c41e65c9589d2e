"""A contiguous copy of the decoding sequences' keys and values, kept from step to step, so that decode
attention reads them in place instead of gathering every sequence's blocks from the paged pool again
at every step.

Why: on CPU a decode step's gather copies each sequence's whole context out of the pool for every
layer, only for the batched matmuls to read the copy once. Measured in a batch-64 decode step of
SmolLM2 (bf16, 2 cores, contexts near 200): the gathers took 17 of 105 ms. With the mirror a step
writes each sequence's one new key and value into its slot and attends over the slots as they lie:
128 decode steps of 64 sequences from 128 tokens of context took 9.8 s against 11.2 s (GROWTH 16:
9.7 s, 64: 10.0 s; the padding attended over costs what the reallocations save).

The paged pool stays the source of truth (every layer still writes it first); the mirror is a cache
of it for the sequences that decode. Each sequence holds a slot: a row [kv_heads, capacity, d] of
each layer's tensor. A step plans before it runs:
- a sequence whose slot holds every position before its new token (same request, same device blocks,
  kv_generation unchanged, and its slot length at least that) only appends its new key and value;
- any other (new to decoding, or back after a prefill chunk, an eviction or a stopped step) joins:
  its context is gathered from the pool into a free slot, at each layer after that layer's write.
Slots of sequences absent from a step are released (their rows are masked holes until reused). A step
that does not finish every layer (stopped at a safepoint, failed) leaves the slots of some layers
behind the others, so the runner calls invalidate() and the next step rebuilds all slots.

The tensors are [slots, kv_heads, capacity, d] per layer: a slot is contiguous, so the matmuls take
[slots * kv_heads, capacity, d] as one batch with no copy. A step attends over the range of slots
from the lowest its decodes use to the highest (a slice along the first axis, still contiguous), so
the slots freed below a batch as its oldest sequences finish cost nothing.

How much capacity a slot gets depends on whether the kernel that reads it takes a view cut to the
longest context (cut_views; such a view is strided between batch entries):
- Where it does not (bfloat16's batched matmuls: the cut scores' product measured 3.9x slower), it
  runs over the whole capacity (masked past each sequence's length). Capacity is kept at most
  2 x GROWTH tokens above the longest context (the tensors are reallocated, the slots keeping what
  they hold, when contexts outgrow it or shrink further below it).
- Where it does, padding costs memory only: scaled_dot_product_attention (bfloat16 decodes on CPUs
  with AMX) reads a cut view about as fast as a contiguous one (64 slots, 200 of 256 positions: 0.54
  against 0.50 ms, against 0.59 over all 256), and float32's batched matmuls read it faster than the
  whole capacity (attention.cpu_matmul_cut_view_dtypes). Capacity then reaches as far as the
  requests can grow (prompt plus max_tokens), up to twice the longest context, and the tensors are
  rarely reallocated: each reallocation copies every slot into fresh memory (on a 2-core Xeon,
  64 slots growing to 272 positions took 220-330 ms against a 70 ms step; on a 2-core AVX2 EPYC in
  float32, 176 to 224 positions about 300 ms against a 290 ms step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import blocks_for
from engine.request import Request

# Tokens of headroom above the longest context when the tensors are (re)allocated: contexts grow one
# token a step, so a batch reallocates (and re-gathers) once every GROWTH steps.
GROWTH = 32
# Slots are allocated in multiples of this, so a batch that grows by a sequence or two does not
# reallocate (and re-gather) every time.
SLOT_ROUND = 8


@dataclass
class MirrorPlan:
    """How one step's decodes (the batch's first rows) use the mirror; read by every layer."""
    keys: list[torch.Tensor]          # per layer [slots, kv_heads, capacity, d]
    values: list[torch.Tensor]
    first_slot: int                   # slots attended over: [first_slot, first_slot + num_slots)
    num_slots: int
    attend_len: int                   # positions attended over: [0, attend_len), capacity unless cut_views
    slots: torch.Tensor               # [decodes]: each decode row's slot, counted from first_slot
    positions: torch.Tensor           # [decodes]: where its new key goes (its context length - 1)
    identity: bool                    # decode row i sits in slot i and there are no other slots
    # Decodes joining their slots this step: their slots (from first_slot), their pool rows to gather (as
    # AttentionMetadata.decode_blocks) and the tokens those rows cover; None when no one joins.
    join_slots: torch.Tensor | None
    join_blocks: torch.Tensor | None
    join_tokens: int
    bias: torch.Tensor                # [num_slots, 1, attend_len]: 0 where a slot's keys count, -inf past them


@dataclass
class _Slot:
    request: Request
    generation: int
    length: int          # positions [0, length) hold the request's keys and values at every layer


class DecodeMirror:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int, cut_views: bool = False):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.max_bytes = max_bytes
        # Whether attention reads a view cut to the longest context (see the module's docstring).
        self.cut_views = cut_views
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self._slots: list[_Slot | None] = []
        self._element = torch.empty((), dtype=dtype).element_size()

    def bytes_for(self, slots: int, capacity: int) -> int:
        return 2 * self.num_layers * slots * self.num_kv_heads * capacity * self.head_dim * self._element

    def invalidate(self) -> None:
        """Forget what the slots hold (the tensors stay allocated for reuse)."""
        self._slots = [None] * len(self._slots)

    def plan(self, requests: list[Request], lengths: list[int], block_rows,
             bias) -> tuple[MirrorPlan | None, list[_Slot | None] | None]:
        """Plan a step whose decodes are `requests`, each with `lengths` tokens of context once the step
        has computed its new one. The runner's helpers build the rest: block_rows(requests, lengths) ->
        (pool rows, tokens) the gather for joining sequences, bias(hidden) a mask from a bool tensor
        (True: -inf). Returns the plan and the slot table to commit() once every layer of the
        step has run; (None, None) when the batch does not fit in max_bytes (the step gathers instead)."""
        n = len(requests)
        longest = max(lengths)
        if longest > self.capacity or self.capacity > self._shrink_above(longest) or n > len(self._slots):
            slots = -(-n // SLOT_ROUND) * SLOT_ROUND
            capacity = next((c for c in self._capacities(requests, longest)
                             if self.bytes_for(slots, c) <= self.max_bytes), None)
            if capacity is None:
                return None, None
            self._allocate(slots, capacity)
        slot_of, joiners = self._keep_or_join(requests, lengths)
        if max(slot_of) + 1 - min(slot_of) > n + max(SLOT_ROUND, n // 4):  # too many holes to attend over: repack
            self.invalidate()
            slot_of, joiners = self._keep_or_join(requests, lengths)
        table: list[_Slot | None] = [None] * len(self._slots)
        for row, (req, length) in enumerate(zip(requests, lengths)):
            table[slot_of[row]] = _Slot(req, req.kv_generation, length)

        dev = self.device
        first = min(slot_of)
        num_slots = max(slot_of) + 1 - first
        rows = [i - first for i in slot_of]
        join_slots = join_blocks = None
        join_tokens = 0
        if joiners:
            join_blocks, join_tokens = block_rows([requests[r] for r in joiners], [lengths[r] for r in joiners])
            join_slots = torch.tensor([rows[r] for r in joiners], device=dev)
        slot_lengths = [0] * num_slots
        for row, length in zip(rows, lengths):
            slot_lengths[row] = length
        attend_len = longest if self.cut_views else self.capacity
        # A hole (a slot no decode of this step uses) keeps its first position visible: a row with every
        # score at -inf would turn into NaN. Its output is thrown away.
        visible = torch.tensor([max(1, x) for x in slot_lengths], device=dev)
        hidden = torch.arange(attend_len, device=dev).unsqueeze(0) >= visible.unsqueeze(1)
        plan = MirrorPlan(
            keys=self.keys, values=self.values, first_slot=first, num_slots=num_slots, attend_len=attend_len,
            slots=torch.tensor(rows, device=dev),
            positions=torch.tensor([x - 1 for x in lengths], device=dev),
            identity=rows == list(range(n)) and num_slots == n,
            join_slots=join_slots, join_blocks=join_blocks, join_tokens=join_tokens,
            bias=bias(hidden).unsqueeze(1),
        )
        return plan, table

    def _shrink_above(self, longest: int) -> int:
        """The capacity past which the tensors are reallocated smaller for a batch whose longest context is
        `longest`: padding the kernel reads costs time, padding it cuts away only memory."""
        return 4 * (longest + GROWTH) if self.cut_views else longest + 2 * GROWTH

    def _capacities(self, requests: list[Request], longest: int) -> list[int]:
        """Capacities to allocate, the preferred first, each a whole number of blocks and at least `longest`.
        With cut views: as far as these requests can grow, up to twice the longest context; then, where
        that exceeds the byte budget, what a kernel without cut views gets: GROWTH tokens of headroom."""
        def whole_blocks(tokens: int) -> int:
            return blocks_for(tokens, self.block_size) * self.block_size
        tight = whole_blocks(longest + GROWTH)
        if not self.cut_views:
            return [tight]
        reach = max(max(r.max_total_tokens for r in requests), longest)
        return [whole_blocks(min(reach, longest + max(GROWTH, longest))), tight]

    def _keep_or_join(self, requests: list[Request], lengths: list[int]) -> tuple[list[int], list[int]]:
        """Each decode's slot: its own where that holds every position before its new token, else the
        lowest free one (so the slots in use stay packed at the front); and the rows that join (take a
        free slot, to be filled from the pool). Slots of requests absent from the step are free."""
        held = {id(s.request): i for i, s in enumerate(self._slots) if s is not None}
        slot_of: list[int | None] = []
        for req, length in zip(requests, lengths):
            i = held.get(id(req))
            s = self._slots[i] if i is not None else None
            keep = s is not None and s.generation == req.kv_generation and s.length >= length - 1
            slot_of.append(i if keep else None)
        taken = {i for i in slot_of if i is not None}
        free = iter(i for i in range(len(self._slots)) if i not in taken)
        joiners = [row for row, i in enumerate(slot_of) if i is None]
        return [i if i is not None else next(free) for i in slot_of], joiners

    def commit(self, table: list[_Slot | None]) -> None:
        """The planned step ran every layer: its slot table is now what the tensors hold."""
        self._slots = table

    def _allocate(self, slots: int, capacity: int) -> None:
        """Resize the tensors to `slots` x `capacity`. Slots that fit the new shape keep what they hold: it
        is copied across, so they go on appending instead of joining again. Joining gathers from the pool
        (an index_select and an index_put per layer), and these reallocations come every GROWTH steps
        and whenever the batch outgrows its slots. Measured for SmolLM2's 30 layers, 64 slots, bf16, 2
        cores (Zen 4): growing from 176 to 224 positions took 18-19 ms copying against 66-92 ms with
        zeros and every slot gathered again; 224 to 272, 22-37 against 85-117 ms.

        Positions no slot holds are zeros, not garbage: masked positions must still hold finite
        numbers (0 * NaN in the weighted sum, or a NaN score, would poison the row). One layer's
        tensors are replaced at a time, so the old and new shapes never coexist beyond one tensor."""
        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        kept_len = min(capacity, self.capacity)
        table = [s if s is not None and s.length <= kept_len else None for s in self._slots[:slots]]
        # Rows up to the last kept slot are copied (holes before it included: zeros or keys that were).
        rows = max((i + 1 for i, s in enumerate(table) if s is not None), default=0)
        for tensors in (self.keys, self.values):
            for layer in range(self.num_layers):
                new = torch.empty(shape, dtype=self.dtype, device=self.device)
                if rows:
                    new[:rows, :, :kept_len] = tensors[layer][:rows, :, :kept_len]
                    new[:rows, :, kept_len:].zero_()
                new[rows:].zero_()
                if layer < len(tensors):
                    tensors[layer] = new  # drops the old tensor now
                else:
                    tensors.append(new)
        self.capacity = capacity
        self._slots = table + [None] * (slots - len(table))
