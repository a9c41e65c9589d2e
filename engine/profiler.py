"""Profiles the step-latency CostModel on the running hardware, and caches it per model and machine.

Profiling times ModelRunner.execute on synthetic requests over a spread of step shapes (decode
batches, prefill chunks with and without cached context, decodes mixed with a prefill chunk) and fits
the model to the timings. The KV contents are whatever the pool's blocks hold: timing does not depend
on them. A cached profile is checked against a few steps timed at start-up before it is used
(CHECK_TOLERANCE says why)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from engine.cache_dir import cache_root
from engine.cost_model import Chunks, CostModel, Sample
from engine.kv_cache import BlockPool
from engine.model_runner import ModelRunner
from engine.request import Request, RequestClass
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

# Part of every cache file's name: bump it when the features or the profiled shapes change, so that
# profiles made the old way are not reused.
PROFILE_VERSION = 4
# Profiling goes on past its time budget until it has this many samples: fewer cannot pin down six
# coefficients against timing noise.
MIN_SAMPLES = 12


def measure_step(runner: ModelRunner, pool: BlockPool, chunks: Chunks, repeats: int = 3, enough_s: float = 0.3,
                 generator: torch.Generator | None = None) -> float | None:
    """Seconds of runner.execute on one step of (p, c) chunks: for each, a synthetic request of exactly
    c + p random tokens (so the chunk samples), c of them counted as cached. Blocks come from pool and
    go back to it; None, with nothing run, when the pool has too few free.

    The fastest of `repeats` runs, or of fewer once enough_s seconds are spent: long steps vary by a
    few percent from run to run, and one 2,048-token prefill of the 135M model takes 1.7 s on 2 cores.
    The fastest, not the median, because another process on the machine only ever adds time: with one
    of 2 cores kept busy elsewhere, a model fitted to medians was off by up to 31% on a tiny model's
    unseen steps, one fitted to minima by 13%. On a quiet machine the two differ by a few percent."""
    if sum(pool.blocks_for(p + c) for p, c in chunks) > pool.num_free:
        return None
    vocab = runner.model.config.vocab_size
    generator = generator or torch.Generator().manual_seed(0)  # leave torch's global generator alone
    params = SamplingParams(max_tokens=1, temperature=0.0)
    requests = []
    try:
        for i, (p, c) in enumerate(chunks):
            ids = torch.randint(vocab, (p + c,), generator=generator).tolist()
            req = Request(f"profile-{i}", ids, params, RequestClass.OFFLINE, frozenset(), max_model_len=p + c + 1)
            req.block_ids = pool.allocate(pool.blocks_for(p + c))
            req.num_computed_tokens = c
            requests.append(req)
        step = [ScheduledChunk(req, p) for req, (p, _) in zip(requests, chunks)]
        sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda device: None)
        graphs = runner.graphs
        times = []
        while len(times) < repeats and sum(times) < enough_s:
            captured = graphs.capture_seconds if graphs is not None else 0.0
            sync(runner.device)  # on CUDA the clock must not start while earlier work is still queued
            start = time.perf_counter()
            runner.execute(step)
            sync(runner.device)
            if graphs is not None and graphs.capture_seconds != captured:
                continue  # the run captured this shape's decode graphs: that is no step's time
            times.append(time.perf_counter() - start)
        return min(times)
    finally:
        for req in requests:
            pool.free(req.block_ids)


def _spread(lo: int, hi: int, n: int) -> list[int]:
    """Up to n integers from lo to hi, spaced geometrically (lo and hi included)."""
    if hi <= lo:
        return [lo]
    return sorted({round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)})


def profile_shapes(max_tokens: int, max_seqs: int, max_context: int, rng: random.Random) -> list[list[tuple[int, int]]]:
    """The steps to time: the extremes first, then the rest in random order, so that a profile cut
    short by its budget still spans the whole range and samples the middle evenly.

    Decode batches come with equal contexts and with ragged ones (the runner pads decodes to the
    longest); prefill chunks with no cached context and with some; and decodes beside one prefill chunk,
    the shape of a step that mixes online decodes with offline prefill. The extremes are the largest
    prefill chunk and full decode batches: on 2 cores a decode's cost per context token grows with
    the batch (64 sequences of 512 tokens cost about 2.4 us a token, 8 of 2,047 tokens 1.4 us, as
    the gathered keys and values outgrow the caches), and full batches of online decodes are what
    the TPOT bound is about."""
    seqs = _spread(1, max_seqs, 5)
    contexts = _spread(8, max(8, max_context - 1), 5)
    sizes = _spread(8, max_tokens, 6)
    longest = min(max_tokens, max_context)
    extremes = [[(longest, 0)]] + [[(1, c)] * max_seqs for c in reversed(contexts)]
    rest: list[list[tuple[int, int]]] = []
    for n in seqs:
        for c in contexts:
            if n < max_seqs:
                rest.append([(1, c)] * n)
            if n > 1:
                rest.append([(1, rng.randint(0, c)) for _ in range(n)])
    for p in sizes:
        for c in [0] + contexts:
            if p + c <= max_context and (p, c) != (longest, 0):
                rest.append([(p, c)])
    for n in seqs:
        for p in sizes:
            if n + 1 <= max_seqs and n + p <= max_tokens and p <= max_context:
                c = rng.choice([0] + [x for x in contexts if p + x <= max_context])
                rest.append([(1, rng.randint(0, max_context - 1)) for _ in range(n)] + [(p, c)])
    rng.shuffle(rest)
    return extremes + rest


def profile_cost_model(runner: ModelRunner, pool: BlockPool, max_tokens: int, max_seqs: int, max_context: int,
                       time_budget_s: float = 5.0, repeats: int = 3, seed: int = 0) -> tuple[CostModel, list[Sample]]:
    """Time steps of up to max_tokens tokens, max_seqs sequences and max_context tokens per sequence,
    for about time_budget_s seconds (a step started before the deadline runs to its end); return the
    fitted model and its samples. Shapes the pool's free blocks cannot hold are skipped; every block is
    free again afterwards. Raises ValueError when none fits."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    deadline = time.perf_counter() + time_budget_s
    # Warm-up: first calls pay for lazy initialisation and the allocator growing its heap.
    for chunks in ([(1, 8)], [(min(64, max_tokens, max_context), 0)], [(1, 8)] * max_seqs):
        measure_step(runner, pool, chunks, repeats=1, generator=generator)
    samples: list[Sample] = []
    for chunks in profile_shapes(max_tokens, max_seqs, max_context, rng):
        if time.perf_counter() > deadline and len(samples) >= MIN_SAMPLES:
            break
        seconds = measure_step(runner, pool, chunks, repeats, generator=generator)
        if seconds is not None:
            samples.append((chunks, seconds))
    return CostModel.fit(samples), samples


# A cached profile is checked before use: a few quick steps (check_shapes) are timed right after
# profiling and stored with the model, and timed again at every start; when the median ratio of now to
# then falls outside [1 / CHECK_TOLERANCE, CHECK_TOLERANCE], the machine is not the one profiled and the
# profile is taken again. Why: a profile taken while something else held the cores fits its own
# samples well (every step is slowed alike), so the fit-error guard below lets it into the cache, and
# every later start planned with it. Seen on 2 cores (SmolLM2, bf16): profiled beside a package
# install, it put a step's fixed cost at 20 ms and each token of cached context at 14 us, where a quiet
# profile finds 11 ms and 1.5 us; under a 21 ms TPOT SLO the scheduler then found no room for any
# offline token beside an online decode. The same check catches a cache carried to a faster or slower
# machine that reports the same CPU name. Timings, not the model's predictions, are compared: the
# linear model over-predicts small steps by up to 1.6x even when right (a matrix product of 8 rows
# costs what one of 1 does), which a check against predictions mistook for a changed machine.
CHECK_TOLERANCE = 1.5


def check_shapes(max_tokens: int, max_seqs: int, max_context: int) -> list[list[tuple[int, int]]]:
    """The steps a cached profile is checked with: a lone decode, a batch of decodes over some context,
    and a decode beside a prefill chunk over cached context (the step that carries offline work beside
    an online request), each within the limits the profile was taken for."""
    context = max(0, min(256, max_context - 33))
    chunk = max(1, min(32, max_tokens - 1, max_context - context))
    shapes = [[(1, min(16, max_context - 1))], [(1, context)] * min(8, max_seqs)]
    if max_seqs > 1 and max_tokens > 1:
        shapes.append([(1, min(16, max_context - 1)), (chunk, context)])
    return shapes


def time_check_steps(runner: ModelRunner, pool: BlockPool, shapes: list[list[tuple[int, int]]]) -> list[float | None]:
    """Seconds of each of these steps now (None where the pool cannot hold it), after one warm-up step."""
    generator = torch.Generator().manual_seed(0)
    measure_step(runner, pool, shapes[0], repeats=1, generator=generator)  # lazy initialisation
    return [measure_step(runner, pool, chunks, generator=generator) for chunks in shapes]


def same_speed(then: list[float | None], now: list[float | None]) -> bool:
    """Whether the check steps ran as fast now as when the profile was taken, to within CHECK_TOLERANCE
    (median ratio). True when no step was timed both times (nothing to judge by)."""
    ratios = sorted(b / a for a, b in zip(then, now) if a and b)
    if not ratios:
        return True
    log.debug("profile check: check steps now / at profiling %s", [round(r, 2) for r in ratios])
    return 1 / CHECK_TOLERANCE <= ratios[len(ratios) // 2] <= CHECK_TOLERANCE


def device_key(model_name: str, device: torch.device, dtype: torch.dtype, block_size: int) -> str:
    """What a profile depends on: model, dtype, the device's make, torch version, CPU threads, block size."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_name()
    return (f"{model_name}|{dtype}|{device.type}:{hardware}|torch {torch.__version__}"
            f"|threads {torch.get_num_threads()}|block {block_size}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_cache_dir() -> Path:
    return cache_root() / "profiles"


# A fit worse than this on its own samples means the profile ran while something else held the cores
# (measured: 8% on a quiet 2-core machine, 20-58% under contention): used for this run, never cached.
MAX_CACHED_FIT_ERROR = 0.2


def profile_cache_path(cache_dir: str | Path | None, key: str) -> Path:
    """The file the profile for key is cached in (cache_dir None: the default directory)."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(f"v{PROFILE_VERSION}|{key}".encode()).hexdigest()[:24]
    return directory / f"cost-model-{digest}.json"


def load_or_profile(cache_dir: str | Path | None, key: str,
                    profile: Callable[[], tuple[CostModel, list[Sample]]],
                    check: Callable[[], list[float | None]] | None = None) -> CostModel:
    """The cost model cached for key (see device_key), or the one profile() fits, written to the cache
    if it fits its samples well. check() times a few fixed steps (time_check_steps): right after
    profiling, and at a later start to compare with those timings (same_speed). A missing, unreadable or
    corrupt file means profiling again, and so does a cached profile whose check steps now run at
    another speed; a cache that cannot be written is only logged."""
    path = profile_cache_path(cache_dir, key)
    directory = path.parent
    cached = then = None
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            cached = CostModel.from_dict(stored["model"])
            then = stored.get("check_seconds")
            if then is not None and (not isinstance(then, list)
                                     or not all(t is None or isinstance(t, (int, float)) for t in then)):
                raise ValueError("check_seconds must be a list of seconds")
        else:
            log.info("profile cache %s holds another key; profiling again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        cached = None
        log.warning("ignoring unreadable profile cache %s (%s); profiling again", path, exc)
    if cached is not None:
        if check is None or then is None or same_speed(then, check()):
            return cached
        log.warning("steps run at another speed than when the cached step-latency profile %s was taken "
                    "(taken while something else ran, or on another machine); profiling again", path)
    model, samples = profile()
    error = model.mean_relative_error(samples)
    if error > MAX_CACHED_FIT_ERROR:
        log.warning("step-latency profile fits its samples to %.0f%% only (busy machine?); using it without "
                    "caching it", 100 * error)
        if cached is not None:  # the stale one would only fail its check again at every start
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        return model
    check_seconds = check() if check is not None else None  # right after profiling, for later starts
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed over: a reader (another engine starting) never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "version": PROFILE_VERSION, "model": model.to_dict(),
                           "check_seconds": check_seconds}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("could not cache the profile in %s (%s)", directory, exc)
    return model
