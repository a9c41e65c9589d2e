"""Co-serving: online chat requests with latency SLOs beside a backlog of offline work, per policy.

Reproduces the ConServe paper's experiment at this machine's scale on the bundled model (bf16, CPU by
default; --device cuda runs it on a GPU).
Every policy (online-only, fcfs, priority, conserve) serves the SAME online arrival trace for
--duration seconds; the policies that take offline work also get the same backlog of long
summarisation-like requests, submitted at the start. A last run serves the backlog alone for
dedicated_offline_tok_s. Prints one table and the issue's target ratios, writes --json and a PNG.

    python bench/coserve.py --duration 60 --json bench/results/coserve.json [--plot out.png]
        [--policies online-only conserve] [--online-load 0.3] [--arrivals gamma --burstiness 2]

Online load: S = mean busy seconds the engine spends serving one online request alone (measured on a
few sample requests at the start, one at a time, policy online-only); the arrival rate is
--online-load / S, so online-only is busy about that share of the time. See bench/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from coserve_workload import (Lengths, OnlineRecord, RequestSpec, Workload, build_workload, sleep_until,
                              summarise_online, text_token_ids)
from coserve_report import plot_results, print_table, ratios
from coserve_rounds import merge_rounds
from coserve_steps import describe, summarise_steps, window_steps
from throughput import cpu_by_process, others_cpu_seconds

POLICIES = ("online-only", "fcfs", "priority", "conserve")
ONLINE = Lengths(prompt=(64, 256), output=(32, 128))       # chat-like
OFFLINE = Lengths(prompt=(900, 1100), output=(16, 32))     # summarisation-like: long in, short out
SAMPLE_EVERY_S = 0.5
# Default SLOs as multiples of one online request served alone (calibrate()): on a 2-core AVX-512 BF16
# Xeon such a request had a TTFT of ~0.1 s and a TPOT of 12.4 ms, so these give the 1 s and 50 ms chosen
# there by hand (bench/README.md says why), and they scale with the machine.
SLO_TTFT_FACTOR = 10.0
SLO_TPOT_FACTOR = 4.0
CHILD_SETUP_S = 600  # allowance per engine process beyond the window and drain: load, profile, warm-up, calibration
# EngineStats counters reported as their change over the window.
WINDOW_COUNTERS = ("recomputed_tokens", "layer_yields", "discarded_tokens", "checkpointed_tokens", "restored_tokens",
                   "checkpoint_store_full")


def main() -> int:
    args = _parse_args()
    if importlib.util.find_spec("matplotlib") is None:  # say so now, not after the whole run
        sys.exit("bench/coserve.py draws its plot with matplotlib, which is not installed: run "
                 "`make bench-coserve`, or `pip install -e '.[bench]'` first")
    result: dict = {"policies": {}}
    # Every engine lives in a fresh process, so nothing one leaves behind in process-wide state (torch's
    # thread count, allocator, threads) can change the next policy's figures.
    first = run_isolated(first_run, args)
    args.slo_ttft_ms, args.slo_tpot_ms = first["slo_ms"]  # as given, or derived from the calibration
    result["slo"] = {"ttft_s": args.slo_ttft_ms / 1000, "tpot_s": args.slo_tpot_ms / 1000, "how": first["slo_how"]}
    result["machine"], result["calibration"] = first["machine"], first["calibration"]
    workload, base_ids = first["workload"], first["base_ids"]
    result["workload"] = describe_workload(workload, first["calibration"]["rate_per_s"], args)
    # Round by round, every policy once (online-only's first round ran in first_run).
    runs: dict[str, list[dict]] = {policy: [] for policy in args.policies}
    if "online-only" in args.policies:
        runs["online-only"].append(first["online-only"])
    for round_index in range(args.rounds):
        for policy in args.policies:
            if not (policy == "online-only" and round_index == 0):
                runs[policy].append(run_or_report(policy, workload, args, base_ids))
    for policy in args.policies:
        result["policies"][policy] = (runs[policy][0] if args.rounds == 1 else
                                      merge_rounds(runs[policy], WINDOW_COUNTERS, args.duration + args.drain))
        if args.rounds > 1 and "step_trace" in result["policies"][policy]:
            result["policies"][policy]["step_summary"] = summarise_steps(
                result["policies"][policy]["step_trace"], args.slo_tpot_ms / 1000)
    if not args.skip_dedicated:
        # The best of --dedicated-runs runs under each --dedicated-policy: noise only ever slows a run
        # down (two runs of one configuration on an idle machine gave 874 and 1,062 offline tok/s), and
        # the fastest way this engine serves the backlog alone is the honest baseline for the harvest
        # ratio. conserve alone (512-token steps, evictions restored from checkpoints) outran fcfs
        # alone (2,048-token steps, evictions recomputed) by about 15% on a Zen 5 machine, so a
        # baseline of fcfs alone made harvest look that much better (bench/README.md).
        alone = Workload(online=[], offline=workload.offline)
        runs = [dict(run_or_report(policy, alone, args, base_ids), policy=policy)
                for policy in args.dedicated_policy for _ in range(args.dedicated_runs)]
        dedicated = max(runs, key=lambda r: r.get("offline_tok_s") or 0.0)
        result["dedicated_offline"] = {k: v for k, v in dedicated.items() if not k.startswith("online_")}
        result["dedicated_offline_tok_s"] = dedicated.get("offline_tok_s")
        result["dedicated_offline_runs_tok_s"] = [r.get("offline_tok_s") for r in runs]
        result["dedicated_offline_runs_policy"] = [r["policy"] for r in runs]

    result["ratios"] = ratios(result, args.slo_tpot_ms / 1000)
    print_table(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    plot = args.plot or str(Path(args.json).with_suffix(".png"))
    plot_results(result, plot)
    print(f"wrote {plot}", file=sys.stderr)
    return 0


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--plot", help="PNG to write (default: the --json path with .png)")
    p.add_argument("--duration", type=float, default=60.0, help="measured window per policy, seconds")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every policy this many times, round by round, and pool each policy's rounds "
                        "(spreads every policy over the same minutes of a drifting machine)")
    p.add_argument("--online-load", type=float, default=0.3,
                   help="online load as a share of the engine's single-request capacity (see README)")
    p.add_argument("--online-rate", type=float,
                   help="online requests per second; skips the calibration and ignores --online-load")
    p.add_argument("--arrivals", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--burstiness", type=float, default=2.0,
                   help="coefficient of variation of gamma inter-arrival gaps (1 = Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float,
                   help=f"online TTFT SLO (default: {SLO_TTFT_FACTOR:g}x the calibrated TTFT of a request served alone)")
    p.add_argument("--slo-tpot-ms", type=float,
                   help=f"online TPOT SLO (default: {SLO_TPOT_FACTOR:g}x the calibrated TPOT of a request served alone)")
    p.add_argument("--kv-blocks", type=int, default=320,
                   help="KV pool in 16-token blocks; small so the offline backlog fills it (see README)")
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    # 512, not the engine's 2,048: on 2 cores one layer of a 2,048-token step over 1,000-token contexts
    # takes ~50 ms, which an arriving online request waits at worst; 512 cuts that to ~12 ms for a few
    # per cent of offline throughput (bench/README.md).
    p.add_argument("--offline-max-batched-tokens", type=int, default=512,
                   help="conserve's step size with no online work in flight")
    p.add_argument("--preemption-mode", choices=("discard", "drop", "park"), default="drop")
    p.add_argument("--checkpoint-bytes", type=int, help="host KV checkpoint store (engine default: pool size)")
    p.add_argument("--offline-requests", type=int, help="offline backlog size (default: never runs dry)")
    p.add_argument("--drain", type=float, default=15.0,
                   help="seconds online requests that arrived in the window may take to finish after it")
    p.add_argument("--calibration-requests", type=int, default=6)
    p.add_argument("--dedicated-policy", nargs="+", choices=("fcfs", "priority", "conserve"),
                   default=["fcfs", "conserve"],
                   help="policies of the offline-only runs (default: fcfs, plain continuous batching, and "
                        "conserve with no online work); the fastest run is the baseline")
    p.add_argument("--skip-dedicated", action="store_true", help="no offline-only run")
    p.add_argument("--dedicated-runs", type=int, default=2,
                   help="offline-only runs per --dedicated-policy; the fastest of all is "
                        "dedicated_offline_tok_s (default 2)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto (default): bfloat16 where the device computes it natively (CUDA; a CPU with "
                        "AVX-512 BF16 or AMX), else float32")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--model", help="HF directory or .gguf file (default: the bundled SmolLM2 GGUF)")
    p.add_argument("--step-trace", type=int, default=0, metavar="N",
                   help="record each engine's last N steps (shape, seconds, prediction) and add the window's "
                        "to the JSON as step_trace, with a step_summary (default 0: off)")
    args = p.parse_args()
    if args.duration <= 0 or args.drain < 0 or args.burstiness <= 0 or not 0 < args.online_load:
        p.error("--duration, --burstiness and --online-load must be > 0, --drain >= 0")
    if args.dedicated_runs < 1 or args.rounds < 1:
        p.error("--dedicated-runs and --rounds must be >= 1")
    if args.step_trace < 0:
        p.error("--step-trace must be >= 0")
    if args.calibration_requests < 1 and not _calibration_skipped(args):
        p.error("--calibration-requests must be >= 1")
    if args.dtype == "auto":  # resolved once here, so every system and every run uses the same dtype
        from engine.config import auto_dtype_name
        args.dtype = auto_dtype_name(args.device)
    args.policies = [x for x in POLICIES if x in args.policies]  # the table's order
    return args


def _calibration_skipped(args: argparse.Namespace) -> bool:
    """Calibration sets the rate and the SLOs; with all three given there is nothing to measure."""
    return None not in (args.online_rate, args.slo_ttft_ms, args.slo_tpot_ms)


def slos_ms(args: argparse.Namespace, calibration: dict) -> tuple[float, float, str]:
    """The SLOs as given, or as multiples of what one online request served alone reached on this
    machine: fixed SLOs suit one machine only (a 2-core AVX2 EPYC in float32 decodes one request at
    ~75 ms a token, a 2-core AVX-512 BF16 Xeon in bfloat16 at ~12 ms)."""
    ttft, tpot = args.slo_ttft_ms, args.slo_tpot_ms
    derived = []
    if ttft is None:
        ttft = round(SLO_TTFT_FACTOR * calibration["mean_ttft_s"] * 1000, -1)
        derived.append(f"TTFT = {SLO_TTFT_FACTOR:g} x the calibrated {calibration['mean_ttft_s'] * 1000:.0f} ms")
    if tpot is None:
        tpot = round(SLO_TPOT_FACTOR * calibration["mean_tpot_s"] * 1000)
        derived.append(f"TPOT = {SLO_TPOT_FACTOR:g} x the calibrated {calibration['mean_tpot_s'] * 1000:.1f} ms")
    return ttft, tpot, "; ".join(derived) or "given"


def _auto_backlog(args: argparse.Namespace) -> int:
    # Three ~1,000-token requests a second is about twice what 2 cores compute; grows with --duration.
    return int(args.duration * 3) + 8


def first_run(args: argparse.Namespace) -> dict:
    """The first engine (online-only) yields the tokenizer, calibrates the load, builds the workload
    every policy then serves, and serves it online-only."""
    import torch
    engine = start_engine("online-only", args)
    try:
        base_ids = text_token_ids(engine.tokenizer, 4 * OFFLINE.prompt[1])
        calibration = calibrate(engine, base_ids, args)
        rate = calibration["rate_per_s"]
        args.slo_ttft_ms, args.slo_tpot_ms, slo_how = slos_ms(args, calibration)
        print(f"[slo] TTFT {args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms ({slo_how})", file=sys.stderr)
        workload = build_workload(base_ids, seed=args.seed, rate=rate, duration=args.duration,
                                  arrivals=args.arrivals, burstiness=args.burstiness, online=ONLINE,
                                  offline=OFFLINE, num_offline=args.offline_requests or _auto_backlog(args))
        print(f"[workload] {len(workload.online)} online requests over {args.duration:g} s "
              f"({rate:.3f}/s, {args.arrivals}); offline backlog {len(workload.offline)} requests", file=sys.stderr)
        if not workload.online:
            print("[workload] WARNING: no online request arrives in the window; raise --duration or the load",
                  file=sys.stderr)
        out = {"base_ids": base_ids, "calibration": calibration, "workload": workload,
               "slo_ms": (args.slo_ttft_ms, args.slo_tpot_ms), "slo_how": slo_how,
               "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "accelerator": (torch.cuda.get_device_name(engine.device)
                                           if engine.device.type == "cuda" else None)}}
        if "online-only" in args.policies:
            out["online-only"] = measure(engine, "online-only", workload, args)
        return out
    finally:
        engine.shutdown()


def run_or_report(policy: str, workload: Workload, args: argparse.Namespace, base_ids: list[int]) -> dict:
    """One policy's figures, or {"error": ...} if its run failed (the other policies still run)."""
    try:
        return run_isolated(run_policy, policy, workload, args, base_ids)
    except RuntimeError as exc:
        print(f"[{policy}] ERROR: {exc}", file=sys.stderr)
        return {"error": str(exc)}


def run_isolated(fn, *fn_args):
    """fn(*fn_args) in a fresh (spawned) process; its return value, or RuntimeError if it failed or ran
    far past its expected time (loading, profiling, warm-up, the window and the drain)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, fn_args))
    child.start()
    send.close()
    args = next(a for a in fn_args if isinstance(a, argparse.Namespace))
    limit = CHILD_SETUP_S + args.duration + args.drain
    try:
        status, value = receive.recv() if receive.poll(limit) else ("error", f"no result after {limit:.0f} s")
    except EOFError:
        status, value = "error", "it died without a result"
    if status != "ok" and child.is_alive():
        child.kill()
    child.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__}{tuple(a for a in fn_args if isinstance(a, str))} failed: {value}")
    return value


def _child(send, fn, fn_args) -> None:
    try:
        send.send(("ok", fn(*fn_args)))
    except BaseException:  # handed to the parent, which reports it
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


# ---- engines ----------------------------------------------------------------------------------

def engine_config(policy: str, args: argparse.Namespace):
    from engine import EngineConfig
    # The SLOs are unset only in the first (online-only) engine, before its calibration derives them;
    # online-only plans nothing against them.
    slos = {k: v for k, v in (("slo_ttft_ms", args.slo_ttft_ms), ("slo_tpot_ms", args.slo_tpot_ms)) if v is not None}
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, policy=policy, **slos,
                        num_kv_blocks=args.kv_blocks, block_size=16, max_num_batched_tokens=args.max_batched_tokens,
                        offline_max_batched_tokens=args.offline_max_batched_tokens,
                        preemption_mode=args.preemption_mode, checkpoint_bytes=args.checkpoint_bytes,
                        step_trace=args.step_trace)


def start_engine(policy: str, args: argparse.Namespace):
    from engine import Engine
    started = time.monotonic()
    engine = Engine(engine_config(policy, args))  # loads (and, for conserve, profiles) on its own thread
    print(f"[{policy}] engine ready in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return engine


def params(max_tokens: int):
    from engine import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_policy(policy: str, workload: Workload, args: argparse.Namespace, base_ids: list[int]) -> dict:
    engine = start_engine(policy, args)
    try:
        # Full-size offline steps and an online request first, so first-step costs (allocations, the
        # first use of each kernel) land outside the window.
        prompts = -(-args.max_batched_tokens // OFFLINE.prompt[0]) + 1
        warm_class = "offline" if engine.policy.accepts_offline else "online"  # online-only's later rounds
        engine.generate([base_ids[i:i + OFFLINE.prompt[0]] for i in range(prompts)], params(2), warm_class)
        engine.generate([base_ids[:ONLINE.prompt[1]]], params(8), "online")
        return measure(engine, policy, workload, args)
    finally:
        engine.shutdown()


def calibrate(engine, base_ids: list[int], args: argparse.Namespace) -> dict:
    """Busy seconds of one online request served alone, averaged over a sample whose prompt and output
    lengths are evenly spread over ONLINE's ranges (so their means are the workload's means)."""
    if _calibration_skipped(args):
        return {"method": "given by --online-rate", "rate_per_s": args.online_rate}
    n = args.calibration_requests
    (p_lo, p_hi), (o_lo, o_hi) = ONLINE.prompt, ONLINE.output
    specs = [RequestSpec(base_ids[17 * i: 17 * i + round(p_lo + (p_hi - p_lo) * (i + 0.5) / n)],
                         round(o_lo + (o_hi - o_lo) * (n - i - 0.5) / n))  # long prompts with short outputs
             for i in range(n)]
    engine.generate([specs[0].prompt_ids], params(8), "online")  # warm-up
    rows, cpu_before, started = [], cpu_by_process(), time.monotonic()
    for spec in specs:
        # Each request twice, keeping the faster: noise (a neighbour waking up) only ever adds time.
        runs = []
        for _ in range(2):
            busy = engine.stats().busy_seconds
            m = engine.submit(spec.prompt_ids, params(spec.max_tokens), "online").final().metrics
            runs.append({"busy_s": round(engine.stats().busy_seconds - busy, 4), "ttft_s": round(m.time_to_first_token, 4),
                         "tpot_s": round((m.e2e - m.time_to_first_token) / (spec.max_tokens - 1), 5)})
        rows.append({"prompt_tokens": len(spec.prompt_ids), "output_tokens": spec.max_tokens,
                     **min(runs, key=lambda r: r["busy_s"]), "busy_s_runs": [r["busy_s"] for r in runs]})
    others = others_cpu_seconds(cpu_before, cpu_by_process())
    others = None if others is None else others / (time.monotonic() - started)
    if others is not None and others > 0.1:
        # A busy neighbour slows 2-thread steps far beyond its CPU share, so S and the rate are off.
        print(f"[calibration] WARNING: other processes kept {others:.2f} cores busy; the rate is unreliable "
              f"(fix it with --online-rate)", file=sys.stderr)
    service_s = float(np.mean([r["busy_s"] for r in rows]))
    rate = args.online_load / service_s if args.online_rate is None else args.online_rate
    print(f"[calibration] one online request alone keeps the engine busy {service_s:.3f} s on average "
          f"(TTFT {np.mean([r['ttft_s'] for r in rows]) * 1000:.0f} ms, TPOT {np.mean([r['tpot_s'] for r in rows]) * 1000:.1f} ms); "
          f"{rate:.3f} requests/s", file=sys.stderr, flush=True)
    how = ("given by --online-rate" if args.online_rate is not None else
           "rate = online_load / mean busy seconds of one online request served alone")
    return {"method": how + " (requests served alone: policy online-only, one at a time, each twice and the "
                            "faster kept)",
            "online_load": args.online_load, "mean_busy_s": round(service_s, 4), "rate_per_s": round(rate, 5),
            "mean_ttft_s": round(float(np.mean([r["ttft_s"] for r in rows])), 4),
            "mean_tpot_s": round(float(np.mean([r["tpot_s"] for r in rows])), 5),
            "other_processes_cores_busy": None if others is None else round(others, 2), "requests": rows}


# ---- one measured run -------------------------------------------------------------------------

def measure(engine, policy: str, workload: Workload, args: argparse.Namespace) -> dict:
    """Serve the workload for args.duration seconds and return the policy's figures. Throughput comes
    from engine-stats deltas over the window; online requests that arrived in the window get up to
    args.drain more seconds to finish (offline work keeps running meanwhile), then everything left is
    aborted."""
    records = [OnlineRecord(spec, f"online-{i}") for i, spec in enumerate(workload.online)]
    consumers: list[threading.Thread] = []
    samples: list[dict] = []
    stop = threading.Event()
    cpu_before = cpu_by_process()
    before, t0 = engine.stats(), time.monotonic()
    monitor = threading.Thread(target=_monitor, args=(engine, t0, stop, samples), daemon=True)
    monitor.start()
    offline = [engine.submit(s.prompt_ids, params(s.max_tokens), "offline") for s in workload.offline] \
        if policy != "online-only" else []
    submit_s = time.monotonic() - t0
    client = threading.Thread(target=_release_online, args=(engine, records, t0, consumers), daemon=True)
    client.start()
    print(f"[{policy}] measuring {args.duration:g} s ...", file=sys.stderr, flush=True)
    sleep_until(t0 + args.duration)
    after, t1 = engine.stats(), time.monotonic()
    cpu_after = cpu_by_process()
    client.join()
    for c in list(consumers):
        c.join(timeout=max(0.0, t1 + args.drain - time.monotonic()))
    ended = time.monotonic()
    stop.set()
    monitor.join()
    for r in records:
        if r.final is None:
            engine.abort(r.request_id)
    for c in consumers:
        c.join()

    figures = window_figures(before, after, t1 - t0)
    figures.update(summarise_online(records, args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000, ended, t0))
    left = after.num_running["offline"] + after.num_waiting["offline"]
    figures["offline_backlog_left"] = left
    if offline and left == 0:
        print(f"[{policy}] WARNING: the offline backlog ran dry; raise --offline-requests", file=sys.stderr)
    figures["offline_submit_s"] = round(submit_s, 3)
    figures["release_lag_max_s"] = round(max((r.submitted_at - t0 - r.spec.arrival_s for r in records), default=0.0), 4)
    others = others_cpu_seconds(cpu_before, cpu_after)
    if others is not None:
        figures["other_processes_cores_busy"] = round(others / (t1 - t0), 2)
        if others / (t1 - t0) > 0.1:
            print(f"[{policy}] WARNING: other processes kept {others / (t1 - t0):.2f} cores busy", file=sys.stderr)
    figures["timeline"] = samples
    if args.step_trace:
        steps = window_steps(engine.step_trace(), t0 - before.uptime_seconds, t0, ended)
        figures["step_summary"] = summarise_steps(steps, args.slo_tpot_ms / 1000)
        figures["step_trace"] = steps
        print(f"[{policy}] {describe(figures['step_summary'])}", file=sys.stderr)
    print(f"[{policy}] online {figures['online_completed']}/{figures['online_arrived']} completed, "
          f"offline {figures['offline_tok_s']:.0f} tok/s, busy {figures['busy_fraction']:.2f}", file=sys.stderr)
    return figures


def _release_online(engine, records: list[OnlineRecord], t0: float, consumers: list[threading.Thread]) -> None:
    """Submit each online request at its trace time; one consumer thread per stream."""
    for i, r in enumerate(records):
        sleep_until(t0 + r.spec.arrival_s)
        r.submitted_at = time.monotonic()
        stream = engine.submit(r.spec.prompt_ids, params(r.spec.max_tokens), "online", request_id=r.request_id)
        thread = threading.Thread(target=_consume, args=(stream, r), daemon=True)
        thread.start()
        consumers.append(thread)


def _consume(stream, record: OnlineRecord) -> None:
    try:
        for out in stream:
            if record.first_token_at is None and out.new_token_ids:
                record.first_token_at = time.monotonic()
            if out.finished:
                record.done_at, record.final = time.monotonic(), out
    except Exception as exc:  # RequestFailedError: the engine failed this request
        record.error = str(exc)


def _monitor(engine, t0: float, stop: threading.Event, samples: list[dict]) -> None:
    while True:
        s, now = engine.stats(), time.monotonic()
        tokens = class_tokens(s)
        samples.append({"t": round(now - t0, 3), "busy_s": round(s.busy_seconds, 4),
                        "online_tokens": tokens["online"], "offline_tokens": tokens["offline"],
                        "kv_usage": round(s.kv_usage, 3), "evictions": s.num_preemptions})
        if stop.wait(SAMPLE_EVERY_S):
            return


def class_tokens(stats) -> dict[str, int]:
    """Prompt plus generated tokens processed per class, each counted once (recompute excluded)."""
    return {k: stats.prompt_tokens_by_class[k] + stats.generation_tokens_by_class[k] for k in ("online", "offline")}


def window_figures(before, after, seconds: float) -> dict:
    tok0, tok1 = class_tokens(before), class_tokens(after)
    online, offline = tok1["online"] - tok0["online"], tok1["offline"] - tok0["offline"]
    out = {"window_s": round(seconds, 3), "online_tokens": online, "offline_tokens": offline,
           "online_tok_s": online / seconds, "offline_tok_s": offline / seconds,
           "total_tok_s": (online + offline) / seconds,
           "busy_fraction": (after.busy_seconds - before.busy_seconds) / seconds,
           "steps": after.num_steps - before.num_steps,
           "evictions": after.num_preemptions - before.num_preemptions}
    for name in WINDOW_COUNTERS:
        out[name] = getattr(after, name) - getattr(before, name)
    return out


def describe_workload(workload: Workload, rate: float, args: argparse.Namespace) -> dict:
    return {"model": args.model or "SmolLM2-135M-Instruct (bundled GGUF)", "dtype": args.dtype, "device": args.device,
            "duration_s": args.duration, "drain_s": args.drain, "rounds": args.rounds,
            "round_span_s": args.duration + args.drain, "seed": args.seed, "arrivals": args.arrivals,
            "burstiness_cv": args.burstiness if args.arrivals == "gamma" else 1.0,
            "online_load": None if args.online_rate is not None else args.online_load,
            "online_rate_per_s": rate, "online_requests": len(workload.online),
            "online_prompt_tokens": list(ONLINE.prompt), "online_output_tokens": list(ONLINE.output),
            "offline_requests": len(workload.offline), "offline_prompt_tokens": list(OFFLINE.prompt),
            "offline_output_tokens": list(OFFLINE.output), "greedy": True, "ignore_eos": True,
            "kv_blocks": args.kv_blocks, "block_size": 16, "max_batched_tokens": args.max_batched_tokens,
            "offline_max_batched_tokens": args.offline_max_batched_tokens,
            "preemption_mode": args.preemption_mode, "checkpoint_bytes": args.checkpoint_bytes,
            "dedicated_policy": None if args.skip_dedicated else args.dedicated_policy}


if __name__ == "__main__":
    sys.exit(main())
