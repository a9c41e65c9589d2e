"""The engine: owns the model, the KV pool and the scheduler, and runs their step loop on a background thread."""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from engine.attention import TorchAttentionBackend
from engine.checkpoint import Checkpointer, HostKVStore
from engine.config import EngineConfig
from engine.decode_graphs import DecodeGraphs
from engine.decode_mirror import DecodeMirror
from engine.cpu_tuning import keep_large_allocations_in_heap
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.kv_cache import BlockPool, KVCache, kv_bytes_per_block
from engine.loader import LoadedModel, load_model
from engine.model import LlamaModel
from engine.model_runner import ModelRunner, ParkedStep
from engine.native_kernels import NativeBuildError, NativeKernels, PagedDecodeAttention, native_kernels
from engine.output import RequestMetrics, RequestOutput, RequestStream
from engine.policy import Policy
from engine.profiler import check_shapes, device_key, load_or_profile, profile_cost_model, time_check_steps
from engine.prompt import Prompt, prompt_token_ids
from engine.request import Request, RequestClass
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from engine.step_trace import StepRecord, StepTrace

log = logging.getLogger(__name__)

@dataclass
class EngineStats:
    num_running: dict[str, int] = field(default_factory=lambda: {"online": 0, "offline": 0})
    num_waiting: dict[str, int] = field(default_factory=lambda: {"online": 0, "offline": 0})
    kv_usage: float = 0.0                # fraction of KV blocks in use
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prompt_tokens: int = 0               # prompt tokens computed (again, after a preemption)
    generation_tokens: int = 0           # tokens sampled
    # Progress by request class: prompt tokens computed for the first time, and tokens sampled.
    prompt_tokens_by_class: dict[str, int] = field(default_factory=lambda: {"online": 0, "offline": 0})
    generation_tokens_by_class: dict[str, int] = field(default_factory=lambda: {"online": 0, "offline": 0})
    recomputed_tokens: int = 0           # tokens computed again after an eviction (not restored from a checkpoint)
    layer_yields: int = 0                # steps stopped at a safepoint for newly arrived online work
    discarded_tokens: int = 0            # tokens of steps a yield threw away (preemption_mode "discard", "drop")
    checkpointed_tokens: int = 0         # offline tokens whose KV reached the host checkpoint store
    restored_tokens: int = 0             # tokens restored from the store instead of recomputed
    checkpoint_store_full: int = 0       # requests the store had no room for (they recompute what is missing)
    checkpoint_usage: float = 0.0        # fraction of the host store in use
    num_steps: int = 0
    graphed_steps: int = 0               # steps replayed from the decode CUDA graphs (engine/decode_graphs.py)
    num_preemptions: int = 0
    busy_seconds: float = 0.0            # time spent computing steps
    uptime_seconds: float = 0.0


# The default host checkpoint store takes at most this share of the machine's physical memory, split
# evenly between the GPUs the process sees (one worker per GPU on one host each take their part).
HOST_STORE_RAM_SHARE = 0.4
# Longest context decode graphs are captured for; decodes of longer contexts run eagerly. Their buffers
# and the gathered keys and values of a full batch grow with it (a batch of 256 sequences of SmolLM2 at
# 4,096 tokens gathers 400 MB a layer in bf16).
GRAPHS_MAX_CONTEXT = 4096
# Most bytes of keys and values a graphed decode step gathers a layer; larger buckets run eagerly. The
# graphs keep that memory for good, out of the share of GPU memory the KV cache leaves (SmolLM2: 1 GiB
# holds 256 sequences of 4,096 tokens; a Llama-2-7B, 16 sequences of 4,096 or 256 of 256).
GRAPHS_MAX_GATHER_BYTES = 1 << 30
# Most of host RAM the decode mirror may take by default (on CPU, beside the pool and the host store).
DECODE_MIRROR_RAM_SHARE = 0.2


def default_store_blocks(pool_blocks: int, bytes_per_block: int, host_memory: int, gpus: int) -> int:
    """Twice the device pool, within this process's share of host RAM: HOST_STORE_RAM_SHARE of it,
    divided by the GPUs it sees. A worker that sees one GPU in a container cannot know how many others
    share the host; there --kv-cache-bytes or --checkpoint-bytes has to say (README, "Memory")."""
    share = int(HOST_STORE_RAM_SHARE * host_memory / max(gpus, 1))
    return min(2 * pool_blocks, share // bytes_per_block)


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34  # unknown platform: assume 16 GiB


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, loaded: LoadedModel | None = None):
        """Load the model (or use `loaded`, e.g. a model built in memory) and start the step loop.
        Raises what loading raises (ModelLoadError, InvalidRequestError for bad settings)."""
        self.config = config or EngineConfig()
        self.config.validate()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[Request, RequestStream, IncrementalDetokenizer | None]] = []
        self._aborts: list[str] = []
        self._live: dict[str, tuple[Request, RequestStream, IncrementalDetokenizer | None]] = {}
        self._ids = itertools.count()
        self._stopping = False
        # Set by submit() when online work arrives; a step carrying offline work yields at its next safepoint.
        self._online_arrived = False
        self._parked: ParkedStep | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        # Loading runs on the engine thread too: once a thread has run parallel torch ops, its OpenMP
        # team competes with any other thread's, and steps on the engine thread ran 1.5x slower when
        # the caller's thread had done the loading (measured on 2 cores).
        self._thread = threading.Thread(target=self._run, args=(loaded,), name="conserve-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error

    def _build(self, loaded: LoadedModel | None) -> None:
        config = self.config
        dtype, self.device = config.torch_dtype(), config.torch_device()
        keep_large_allocations_in_heap()
        loaded = loaded or load_model(config.model, dtype)
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.model_config = mc = loaded.config
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else mc.eos_token_ids)

        num_blocks = self._kv_pool_blocks(loaded, dtype)
        pool_tokens = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, pool_tokens)
        self.pool = BlockPool(num_blocks, config.block_size)
        # "auto" leaves the graphs off where the decode mirror is asked for explicitly (they exclude each other).
        graphs = config.decode_graphs == "on" or (config.decode_graphs == "auto" and self.device.type == "cuda"
                                                   and not config.decode_mirror_bytes)
        # With decode graphs the cache holds one block beyond the pool's: the graphs' padding rows write
        # and read it, and no request ever owns it.
        self.kv_cache = KVCache(mc, num_blocks + (1 if graphs else 0), config.block_size, dtype, self.device)
        native = self._native_kernels(mc, dtype, graphs)
        backend = TorchAttentionBackend(mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim,
                                        config.block_size, native.decode_attention if native else None)
        model = LlamaModel(mc, loaded.tensors, backend, self.max_model_len, dtype, self.device,
                           native.row_ops if native else None)
        loaded.tensors.clear()  # the model holds its own (fused, converted) copies
        if graphs:
            self.runner = ModelRunner(model, self.kv_cache, self.device, graphs=DecodeGraphs(
                model, self.kv_cache, scratch_block=num_blocks, max_batch=config.max_num_seqs,
                max_context=min(self.max_model_len, GRAPHS_MAX_CONTEXT), device=self.device,
                capture=self.device.type == "cuda", max_gather_bytes=GRAPHS_MAX_GATHER_BYTES))
        else:
            mirror = (None if backend.native_decode(self.device, dtype)
                      else self._decode_mirror(mc, num_blocks, dtype, backend.mirror_cut_views(self.device, dtype)))
            self.runner = ModelRunner(model, self.kv_cache, self.device, mirror)
        self.policy = Policy.parse(config.policy)
        cost_model = None
        self.profile_key: str | None = None  # what the step-latency profile is cached under (conserve only)
        self.checkpointer: Checkpointer | None = None  # the host KV store's copier (conserve only)
        if self.policy.harvests:
            cost_model = self._cost_model(loaded, dtype)
            store_bytes = config.checkpoint_bytes
            # Default: twice the device pool, so evicted requests waiting to resume keep their checkpoints
            # beside those of the running ones (a store the pool's size filled up and fell back to recompute).
            per_block = kv_bytes_per_block(mc, config.block_size, dtype)
            if store_bytes is None:
                # Capped at a share of host RAM: twice an 80 GB GPU's pool would not fit beside the rest.
                store_blocks = default_store_blocks(num_blocks, per_block, _host_memory_bytes(),
                                                    torch.cuda.device_count() if self.device.type == "cuda" else 1)
            else:
                store_blocks = store_bytes // per_block
            if store_blocks > 0:
                self.checkpointer = Checkpointer(self.kv_cache, HostKVStore(self.kv_cache, store_blocks,
                                                                           pin=self.device.type == "cuda"), self.device)
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill, self.policy,
            config.offline_max_batched_tokens, config.slo_tpot_ms / 1000,
            int(config.online_reserve_fraction * num_blocks),
            int(config.online_reserve_fraction * config.max_num_seqs)), self.pool, cost_model, self.checkpointer)
        self._stats = EngineStats(num_free_blocks=num_blocks, num_total_blocks=num_blocks)
        self._trace = StepTrace(config.step_trace) if config.step_trace else None
        self._started = time.monotonic()

    def _native_kernels(self, mc, dtype: torch.dtype, graphs: bool) -> NativeKernels | None:
        """The compiled kernels (paged decode attention, row-wise ops) where config.native_decode wants
        them and they can serve."""
        mode = self.config.native_decode
        if mode == "off" or (mode == "auto" and (graphs or self.config.decode_mirror_bytes)):
            return None
        fits = self.device.type == "cpu" and PagedDecodeAttention.supports(
            dtype, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim)
        if not fits:
            if mode == "on":
                raise InvalidRequestError(
                    f"native_decode='on': no native kernel for {self.device.type}, {dtype}, head size "
                    f"{mc.head_dim}, {mc.num_attention_heads} heads over {mc.num_key_value_heads} KV heads")
            return None
        try:
            return native_kernels(dtype, mc.head_dim)
        except NativeBuildError as e:
            if mode == "on":
                raise InvalidRequestError(f"native_decode='on': {e}") from e
            return None

    def _decode_mirror(self, mc, num_blocks: int, dtype: torch.dtype, cut_views: bool) -> DecodeMirror | None:
        """The decode mirror, on CPU by default: there it spares every decode step its gather. On CUDA the
        gather is cheap beside the memory a mirror would hold.

        Its default cap is twice the pool's size (within a share of host RAM): it holds no more than the
        decoding sequences' keys and values, which live in the pool too, plus its padding (up to twice
        GROWTH tokens a slot, slots rounded up to SLOT_ROUND; with cut views up to the longest context
        again, where the cap allows), which a small pool's size alone leaves no room for. The tensors are
        sized to the batch decoding, not to the cap."""
        limit = self.config.decode_mirror_bytes
        if limit is None:
            pool_bytes = num_blocks * kv_bytes_per_block(mc, self.config.block_size, dtype)
            limit = (min(2 * pool_bytes, int(DECODE_MIRROR_RAM_SHARE * _host_memory_bytes()))
                     if self.device.type == "cpu" else 0)
        if limit == 0:
            return None
        return DecodeMirror(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, self.config.block_size,
                            dtype, self.device, limit, cut_views)

    def _cost_model(self, loaded: LoadedModel, dtype: torch.dtype):
        """The step-latency model the SLO-aware scheduler plans with: profiled on this device once, then
        read from the cache (keyed by model, device, dtype, threads and block size)."""
        cfg = self.config
        max_tokens = max(cfg.max_num_batched_tokens, cfg.offline_max_batched_tokens or 0)
        # profiler.profile_cache_path(cfg.profile_cache_dir, self.profile_key) is the cache file.
        self.profile_key = key = "|".join([device_key(loaded.name, self.device, dtype, cfg.block_size),
                                           repr(self.model_config), f"tokens {max_tokens}",
                                           self.runner.model.backend.kernels(self.device, dtype),
                                           "row ops: " + ("native" if self.runner.model.row_ops else "torch")])
        max_seqs, max_context = min(cfg.max_num_seqs, 64), min(self.max_model_len, 2048)
        return load_or_profile(cfg.profile_cache_dir, key, lambda: profile_cost_model(
            self.runner, self.pool, max_tokens=max_tokens, max_seqs=max_seqs, max_context=max_context,
            time_budget_s=cfg.profile_seconds), check=lambda: time_check_steps(
            self.runner, self.pool, check_shapes(max_tokens, max_seqs, max_context)))

    def _run(self, loaded: LoadedModel | None) -> None:
        try:
            self._build(loaded)
        except BaseException as exc:  # handed to the constructor's caller
            self._load_error = exc
            return
        finally:
            self._ready.set()
        self._loop()

    # ---- public API -------------------------------------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_class: str = "online",
               request_id: str | None = None, deadline: float | None = None) -> RequestStream:
        """Queue a request; returns its output stream (async-iterable inside an event loop, iterable
        from a thread). Raises InvalidRequestError for bad input; other requests are unaffected.
        `deadline` (wall-clock seconds, time.time()) orders waiting offline requests earliest first."""
        params = params or SamplingParams()
        params.validate()
        try:
            klass = RequestClass(request_class)
        except ValueError:
            raise InvalidRequestError(f"request_class must be 'online' or 'offline', got {request_class!r}") from None
        if klass is RequestClass.OFFLINE and not self.policy.accepts_offline:
            raise InvalidRequestError(f"the {self.policy.value} policy refuses offline requests")
        prompt_ids = self._prompt_token_ids(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        req = Request(request_id, prompt_ids, params, klass, self.eos_token_ids, self.max_model_len)
        req.deadline = deadline
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, stop=params.stop,
                                           skip_special_tokens=params.skip_special_tokens,
                                           include_stop_str_in_output=params.include_stop_str_in_output)
        stream = RequestStream(request_id, self.abort)
        with self._wake:
            if self._stopping:
                raise InvalidRequestError("the engine is shut down")
            if request_id in self._live or any(r.request_id == request_id for r, _, _ in self._inbox):
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._inbox.append((req, stream, detok))
            if klass is RequestClass.ONLINE:
                self._online_arrived = True
            self._wake.notify()
        return stream

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               request_class: str = "online") -> RequestStream:
        """Synchronous streaming for scripts: `for out in engine.stream(...): print(out.delta)`."""
        return self.submit(prompt, params, request_class)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 request_class: str = "offline") -> list[RequestOutput]:
        """Run prompts to completion together (batched) and return their final outputs, in order."""
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InvalidRequestError("give one SamplingParams, or one per prompt")
        streams = [self.submit(p, sp, request_class) for p, sp in zip(prompts, per_prompt)]
        return [s.final() for s in streams]

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its stream ends with finish_reason 'abort'. Unknown ids are ignored."""
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self._stats).items()})
        s.uptime_seconds = time.monotonic() - self._started
        return s

    def step_trace(self) -> list[StepRecord]:
        """The last EngineConfig.step_trace steps, oldest first (empty when the trace is off). In
        preemption_mode "park" the steps that finish a parked step, and those run before it, are not
        recorded."""
        return self._trace.records() if self._trace is not None else []

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- input ------------------------------------------------------------------------------

    def _prompt_token_ids(self, prompt: Prompt) -> list[int]:
        ids = prompt_token_ids(prompt, self.tokenizer, self.model_config.vocab_size)
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and len(ids) > budget:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but without chunked prefill a step holds at most {budget}; "
                f"shorten the prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                f"(prompt plus at least one generated token); shorten the prompt")
        return ids

    def _kv_pool_blocks(self, loaded: LoadedModel, dtype: torch.dtype) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kv_bytes_per_block(loaded.config, cfg.block_size, dtype)
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            weights = sum(t.numel() for t in loaded.tensors.values()) * torch.empty((), dtype=dtype).element_size()
            # Leave room for the weights (not yet moved) and a share of total memory for activations.
            budget = int(free - weights - (1 - cfg.gpu_memory_utilization) * total)
        else:
            budget = 1 << 30
        blocks = budget // per_block
        if blocks < 1:
            raise InvalidRequestError(f"KV cache budget of {budget} bytes holds no {per_block}-byte block")
        return int(blocks)

    # ---- the step loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._aborts or self.scheduler.has_work()):
                    self._wake.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                self._online_arrived = False
            try:
                for req, stream, detok in inbox:
                    self._live[req.request_id] = (req, stream, detok)
                    self.scheduler.add(req)
                for request_id in aborts:
                    if request_id in self._live:
                        if self._parked is not None and request_id in self._parked.requests:
                            self._parked = None  # its blocks are about to be freed: the step cannot finish
                        self._finish(request_id, "abort")
                if self.scheduler.has_work() and not self._step():
                    with self._wake:  # nothing could be scheduled: wait for a change instead of spinning
                        self._wake.wait(timeout=0.05)
            except Exception as exc:  # a bug must fail the requests in flight, not hang their callers
                log.exception("engine loop failed")
                self._fail_all(f"engine failure: {exc}")
        with self._wake:
            inbox, self._inbox = self._inbox, []
        for req, stream, detok in inbox:
            self._live[req.request_id] = (req, stream, detok)
        self._fail_all(None)
        if self.checkpointer is not None:
            self.checkpointer.close()

    def _fail_all(self, error: str | None) -> None:
        """End every live request (with `error`, or as a plain abort at shutdown)."""
        self._parked = None
        for request_id in list(self._live):
            try:
                self._finish(request_id, "abort", error=error)
            except Exception:
                log.exception("could not finish request %s", request_id)
                self._live.pop(request_id, None)

    def _step(self) -> bool:
        """Schedule and run one step; False if nothing could be scheduled.

        Layer-wise preemption: a step carrying offline work (under conserve) asks at every safepoint
        whether online work has arrived, and stops there. "discard" throws the partial step's offline
        work away (nothing of it was committed, so those requests simply run again) and finishes its
        online rows alone from that layer, so online requests already decoding lose nothing; the new
        arrival goes into the next step. "drop" throws the whole partial step away, online rows too: they
        run again beside the arrival, which waits for no remaining layers. "park" keeps the whole hidden
        state; the next call runs a step of the new online requests alone, then finishes the parked one
        from the layer it stopped at."""
        if self._parked is not None:
            parked, self._parked = self._parked, None
            inserted = self.scheduler.schedule(only_new_online=True, busy=frozenset(parked.requests))
            # If new online work waits but could not be planned beside the parked step (the blocks it
            # needs are held by requests in it), the parked step is dropped below rather than make the
            # arrival wait for its remaining layers (measured: 0.3 s of TTFT). Nothing of it was
            # committed; its requests run again.
            if inserted.chunks or not self.scheduler.online_waiting():
                if inserted.chunks:
                    self._run_step(inserted.chunks, lambda: self.runner.execute(inserted.chunks),
                                   inserted.restored_tokens)
                self._run_step(parked.chunks, lambda: self.runner.resume(parked, self._safepoint), 0)
                return True
            with self._lock:
                self._stats.discarded_tokens += sum(c.num_tokens for c in parked.chunks)
        planned = time.monotonic()
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return False
        safepoint = self._safepoint if self.policy.harvests and sched.has_offline else None
        time_scale = self.scheduler.time_scale
        committed = self._run_step(sched.chunks, lambda: self.runner.execute(sched.chunks, safepoint),
                                   sched.restored_tokens)
        seconds = time.monotonic() - planned
        if committed and sched.predicted_s is not None:
            self.scheduler.observe(sched.predicted_s, seconds)
        if self._trace is not None:
            online = sum(c.num_tokens for c in sched.chunks if c.request.online)
            decodes = sum(c.num_tokens == 1 for c in sched.chunks)
            self._trace.append(StepRecord(planned - self._started, seconds, len(sched.chunks), decodes, online,
                                          sched.num_tokens - online, sched.predicted_s, time_scale, committed))
        return True

    def _safepoint(self, layer: int) -> bool:
        return self._online_arrived

    def _run_step(self, chunks: list[ScheduledChunk], compute, restored_tokens: int) -> bool:
        """Run one planned step (compute() does the model's work), then commit what it computed.
        True if it was committed as planned (False: it failed, stopped at a safepoint, or went on from
        there with its online rows only)."""
        started = time.monotonic()
        for c in chunks:
            if c.request.times.first_scheduled is None:
                c.request.times.first_scheduled = started  # for online requests: the preemption latency
        try:
            result = compute()
        except Exception as exc:  # a failed step must not take the engine down with it
            self._fail_step(chunks, exc)
            return False
        now = time.monotonic()
        as_planned = True
        if (isinstance(result, ParkedStep) and self.config.preemption_mode == "discard"
                and (online := [c for c in chunks if c.request.online])):
            # Measured (2 cores, SmolLM2): steps beside online decodes take ~85 ms against ~23 ms for
            # the decodes alone, and an arrival used to wait for the rest of such a step.
            shed = sum(c.num_tokens for c in chunks if not c.request.online)
            try:
                result = self.runner.shed(result, online)
            except Exception as exc:  # the offline chunks were dropped already: they simply run again
                self._fail_step(online, exc)
                return False
            with self._lock:
                self._stats.layer_yields += 1
                self._stats.discarded_tokens += shed
            chunks, as_planned, now = online, False, time.monotonic()
        if isinstance(result, ParkedStep):
            discard = self.config.preemption_mode in ("discard", "drop")
            if not discard:
                self._parked = result
            with self._lock:
                self._stats.busy_seconds += now - started
                self._stats.layer_yields += 1
                self._stats.restored_tokens += restored_tokens
                if discard:
                    self._stats.discarded_tokens += sum(c.num_tokens for c in chunks)
            return False
        with self._lock:
            st = self._stats
            spans = [self._commit(c, st) for c in chunks]
            if self.checkpointer is not None:
                self.checkpointer.save([(c.request, *span) for c, span in zip(chunks, spans) if not c.request.online])
            st.num_steps += 1
            if self.runner.graphs is not None:
                st.graphed_steps = self.runner.graphs.steps_run
            st.busy_seconds += now - started
            st.generation_tokens += len(result)
            for req, _ in result:
                st.generation_tokens_by_class[req.request_class.value] += 1
            st.restored_tokens += restored_tokens
            st.num_preemptions = self.scheduler.num_preemptions
            self._refresh_counts(st)  # admissions and preemptions; _finish refreshes for each finish
        for req, token in result:
            if req.request_id in self._live:
                self._emit_token(req, token, now)
        if self.checkpointer is not None:
            copying = time.monotonic()
            self.checkpointer.flush()  # the CPU's copies, once the tokens are out (no-op on CUDA)
            with self._lock:
                st.busy_seconds += time.monotonic() - copying
                cs = self.checkpointer.stats
                st.checkpointed_tokens, st.checkpoint_store_full = cs.checkpointed_tokens, cs.store_full
                st.checkpoint_usage = self.checkpointer.usage()
        return as_planned

    def _fail_step(self, chunks: list[ScheduledChunk], exc: Exception) -> None:
        """A step's computation raised: end its requests with the error, leave the engine serving."""
        log.exception("engine step failed")
        for c in chunks:
            if c.request.request_id in self._live:
                self._finish(c.request.request_id, "abort", error=f"engine step failed: {exc}")

    def _commit(self, chunk: ScheduledChunk, st: EngineStats) -> tuple[int, int]:
        """Advance a request past a computed chunk, count progress and recompute; return the token span."""
        req = chunk.request
        start, end = req.num_computed_tokens, req.num_computed_tokens + chunk.num_tokens
        fresh_from = max(start, req.high_water)
        st.recomputed_tokens += max(0, min(end, req.high_water) - start)
        st.prompt_tokens += max(0, min(end, req.num_prompt_tokens) - start)
        st.prompt_tokens_by_class[req.request_class.value] += max(0, min(end, req.num_prompt_tokens) - fresh_from)
        req.high_water = max(req.high_water, end)
        req.num_computed_tokens = end
        return start, end

    def _emit_token(self, req: Request, token: int, now: float) -> None:
        if req.times.first_token is None:
            req.times.first_token = now
        reason = req.append_token(token)
        _, stream, detok = self._live[req.request_id]
        delta = ""
        if detok is not None:
            delta, hit_stop = detok.add(token)
            if hit_stop:
                reason = "stop"
        if reason is not None:
            self._finish(req.request_id, reason, delta=delta, last_token=token)
        else:
            stream.put(RequestOutput(req.request_id, delta, [token], num_prompt_tokens=req.num_prompt_tokens,
                                     num_output_tokens=req.num_output_tokens))

    def _finish(self, request_id: str, reason: str, delta: str = "", last_token: int | None = None,
                error: str | None = None) -> None:
        req, stream, detok = self._live.pop(request_id)
        self.scheduler.finish(req)
        with self._lock:
            self._refresh_counts(self._stats)
        req.finish_reason = reason
        req.times.finished = time.monotonic()
        if detok is not None:
            delta += detok.flush()  # held-back text (a partial stop string or character) after eos
        t = req.times
        metrics = RequestMetrics(
            queued=(t.first_scheduled or t.finished) - t.arrival,
            time_to_first_token=None if t.first_token is None else t.first_token - t.arrival,
            e2e=t.finished - t.arrival, num_preemptions=req.num_preemptions)
        stream.put(RequestOutput(
            request_id, delta, [] if last_token is None else [last_token], finished=True, finish_reason=reason,
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
            text=detok.text if detok is not None else "", token_ids=req.output_token_ids,
            metrics=metrics, error=error))

    def _refresh_counts(self, st: EngineStats) -> None:
        for name, queue in (("num_running", self.scheduler.running), ("num_waiting", self.scheduler.waiting)):
            counts = {"online": 0, "offline": 0}
            for r in queue:
                counts[r.request_class.value] += 1
            setattr(st, name, counts)
        st.num_free_blocks = self.pool.num_free
        st.kv_usage = self.pool.usage()
