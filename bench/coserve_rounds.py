"""Pooling one policy's figures over several rounds of bench/coserve.py (--rounds).

Why rounds: the machines these benchmarks run on drift by 20-30% over minutes, so one long window per
policy, taken one policy after another, compares different minutes of the machine. Rounds run every
policy once, then again, and pool each policy's rounds: its p99s come from all its requests, its rates
from all its windows, and every policy's windows are spread over the same stretch of time."""
from __future__ import annotations

from coserve_workload import online_figures

# Summed over rounds; rates are recomputed from the sums.
SUMMED = ("window_s", "online_tokens", "offline_tokens", "steps", "evictions")
# Worst round's value.
MAXED = ("offline_backlog_left", "offline_submit_s", "release_lag_max_s")
# One round's figures kept in "rounds", so the spread between rounds shows.
PER_ROUND = ("online_ttft_p99_s", "online_tpot_p99_s", "online_slo_attainment", "offline_tok_s", "total_tok_s",
             "busy_fraction")


def merge_rounds(runs: list[dict], counters: tuple[str, ...], round_span_s: float) -> dict:
    """One policy's figures from its rounds' figures (each as bench/coserve.py's measure() returns them),
    as if from one window: counters and tokens summed, rates over the summed window, latency figures
    from the pooled requests. Rounds that failed ({"error": ...}) are left out and listed under
    "failed_rounds"; if every round failed, the first error is returned. Each later round's requests and
    timeline are shifted by round_span_s, so a plot shows the rounds one after another."""
    good = [(i, r) for i, r in enumerate(runs) if "error" not in r]
    if not good:
        return runs[0]
    out: dict = {}
    for name in SUMMED + counters:
        out[name] = sum(r[name] for _, r in good)
    window = out["window_s"]
    out["online_tok_s"] = out["online_tokens"] / window
    out["offline_tok_s"] = out["offline_tokens"] / window
    out["total_tok_s"] = (out["online_tokens"] + out["offline_tokens"]) / window
    out["busy_fraction"] = sum(r["busy_fraction"] * r["window_s"] for _, r in good) / window
    for name in MAXED:
        out[name] = max(r[name] for _, r in good)
    others = [r["other_processes_cores_busy"] * r["window_s"] for _, r in good if "other_processes_cores_busy" in r]
    if len(others) == len(good):
        out["other_processes_cores_busy"] = round(sum(others) / window, 2)
    rows = [_shifted(row, i * round_span_s, ("arrival_s", "done_s")) for i, r in good for row in r["requests"]]
    out.update(online_figures(rows))
    out["requests"] = rows
    # Each sample names its round: engine counters start afresh in every round's engine.
    out["timeline"] = [{**_shifted(sample, i * round_span_s, ("t",)), "round": i + 1}
                       for i, r in good for sample in r["timeline"]]
    out["rounds"] = [{"round": i + 1, **{k: r.get(k) for k in PER_ROUND}} for i, r in good]
    if all("step_trace" in r for _, r in good):  # --step-trace; the caller summarises the pooled steps
        out["step_trace"] = [{**_shifted(step, i * round_span_s, ("at_s",)), "round": i + 1}
                             for i, r in good for step in r["step_trace"]]
    failed = [{"round": i + 1, "error": r["error"]} for i, r in enumerate(runs) if "error" in r]
    if failed:
        out["failed_rounds"] = failed
    return out


def _shifted(item: dict, offset: float, keys: tuple[str, ...]) -> dict:
    return {k: (round(v + offset, 4) if k in keys and v is not None else v) for k, v in item.items()}
