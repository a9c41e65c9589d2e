"""The co-serving benchmark's report: the issue's target ratios, the table, and the figure (online TTFT
and TPOT over time against the SLOs, harvested offline throughput over time, one colour per policy).
Reads only the result dict bench/coserve.py builds (matplotlib is imported when plotting), so a saved
result can be printed and plotted again:

    python bench/coserve_report.py bench/results/coserve.json [--plot out.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NOISY_CORES = 0.1  # other processes' CPU use during a run above which its figures are flagged
COLOURS = {"online-only": "tab:green", "fcfs": "tab:red", "priority": "tab:orange", "conserve": "tab:blue"}


def ratios(result: dict, slo_tpot_s: float) -> dict:
    """The issue's targets, each {value, target, pass}; value None where a figure is missing."""
    pol = result["policies"]

    def get(policy: str, key: str):
        return pol.get(policy, {}).get(key)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def per_eviction(policy: str):
        evictions = get(policy, "evictions")
        return ratio(get(policy, "recomputed_tokens"), evictions) if evictions else None

    # Which runs each ratio is built from ("dedicated" = the offline-only run).
    sources = {"conserve_vs_online_only_ttft_p99": ("conserve", "online-only"),
               "conserve_vs_online_only_tpot_p99": ("conserve", "online-only"),
               "conserve_tpot_p99_vs_slo": ("conserve",),
               "conserve_vs_online_only_total_tok_s": ("conserve", "online-only"),
               "conserve_harvest_vs_dedicated_offline": ("conserve", "dedicated"),
               "priority_vs_conserve_ttft_p99": ("priority", "conserve"),
               "fcfs_vs_conserve_ttft_p99": ("fcfs", "conserve"),
               "conserve_vs_priority_recomputed_per_eviction": ("conserve", "priority")}
    runs = dict(pol, dedicated=result.get("dedicated_offline", {}))
    checks = {
        "conserve_vs_online_only_ttft_p99": (ratio(get("conserve", "online_ttft_p99_s"),
                                                   get("online-only", "online_ttft_p99_s")), "<=", 1.10),
        "conserve_vs_online_only_tpot_p99": (ratio(get("conserve", "online_tpot_p99_s"),
                                                   get("online-only", "online_tpot_p99_s")), "<=", 1.25),
        "conserve_tpot_p99_vs_slo": (ratio(get("conserve", "online_tpot_p99_s"), slo_tpot_s), "<=", 1.0),
        "conserve_vs_online_only_total_tok_s": (ratio(get("conserve", "total_tok_s"),
                                                      get("online-only", "total_tok_s")), ">=", 2.5),
        "conserve_harvest_vs_dedicated_offline": (ratio(get("conserve", "offline_tok_s"),
                                                        result.get("dedicated_offline_tok_s")), ">=", 0.90),
        "priority_vs_conserve_ttft_p99": (ratio(get("priority", "online_ttft_p99_s"),
                                                get("conserve", "online_ttft_p99_s")), ">=", 2.0),
        "fcfs_vs_conserve_ttft_p99": (ratio(get("fcfs", "online_ttft_p99_s"),
                                            get("conserve", "online_ttft_p99_s")), ">=", 10.0),
        "conserve_vs_priority_recomputed_per_eviction": (ratio(per_eviction("conserve"), per_eviction("priority")),
                                                         "<=", 0.01),
    }
    out = {}
    for name, (value, op, target) in checks.items():
        ok = None if value is None else (value <= target if op == "<=" else value >= target)
        out[name] = {"value": None if value is None else round(value, 4), "target": f"{op} {target:g}", "pass": ok}
        # Runs during which other processes kept more than 0.1 cores busy: the ratio is not to be trusted.
        noisy = [r for r in sources[name] if (runs.get(r, {}).get("other_processes_cores_busy") or 0) > NOISY_CORES]
        if noisy:
            out[name]["noisy_runs"] = noisy
    # A TTFT that is a lower bound (censored) makes the ratio it is the numerator of a lower bound too.
    if get("fcfs", "online_ttft_censored"):
        out["fcfs_vs_conserve_ttft_p99"]["lower_bound"] = True
    if get("priority", "online_ttft_censored"):
        out["priority_vs_conserve_ttft_p99"]["lower_bound"] = True
    return out


ROWS = [  # (label, key, scale, format)
    ("online completed", "online_completed", 1, "{:.0f}"), ("online arrived", "online_arrived", 1, "{:.0f}"),
    ("TTFT p50 (s)", "online_ttft_p50_s", 1, "{:.3f}"), ("TTFT p99 (s)", "online_ttft_p99_s", 1, "{:.3f}"),
    ("TPOT p50 (ms)", "online_tpot_p50_s", 1000, "{:.1f}"), ("TPOT p99 (ms)", "online_tpot_p99_s", 1000, "{:.1f}"),
    ("SLO attainment", "online_slo_attainment", 1, "{:.2f}"),
    ("preemption lat. p99 (s)", "preemption_latency_p99_s", 1, "{:.3f}"),
    ("online tok/s", "online_tok_s", 1, "{:.1f}"), ("offline tok/s", "offline_tok_s", 1, "{:.1f}"),
    ("total tok/s", "total_tok_s", 1, "{:.1f}"), ("busy fraction", "busy_fraction", 1, "{:.2f}"),
    ("evictions", "evictions", 1, "{:.0f}"), ("recomputed tokens", "recomputed_tokens", 1, "{:.0f}"),
    ("layer yields", "layer_yields", 1, "{:.0f}"), ("checkpointed tokens", "checkpointed_tokens", 1, "{:.0f}"),
    ("restored tokens", "restored_tokens", 1, "{:.0f}"), ("discarded tokens", "discarded_tokens", 1, "{:.0f}"),
    ("checkpoint store full", "checkpoint_store_full", 1, "{:.0f}"),
    ("others' cores busy", "other_processes_cores_busy", 1, "{:.2f}"),
]


def print_table(result: dict) -> None:
    slo, workload = result["slo"], result["workload"]
    columns = dict(result["policies"])
    if "dedicated_offline" in result:
        columns[f"offline alone ({_dedicated_policy(result)})"] = result["dedicated_offline"]
    width = max(12, *(len(c) + 2 for c in columns))
    print(f"\n{'':<24}" + "".join(f"{c:>{width}}" for c in columns))
    for label, key, scale, fmt in ROWS:
        cells = []
        for col in columns.values():
            value = col.get(key)
            text = "-" if value is None else fmt.format(value * scale)
            if key.startswith("online_ttft_p") and col.get("online_ttft_censored"):
                text = ">=" + text  # some TTFTs are lower bounds (no first token before the end)
            cells.append(f"{text:>{width}}")
        print(f"{label:<24}" + "".join(cells))
    rounds = workload.get("rounds", 1)
    windows = f"{rounds} windows of {workload['duration_s']:g} s, pooled" if rounds > 1 else \
        f"the {workload['duration_s']:g} s window"
    print(f"\nSLOs: TTFT {slo['ttft_s'] * 1000:g} ms, TPOT {slo['tpot_s'] * 1000:g} ms. Latencies cover online "
          f"requests that arrived in {windows} (given {workload['drain_s']:g} s more "
          f"to finish); "
          f"'>=' marks lower bounds from requests with no first token by then.")
    if result.get("dedicated_offline_tok_s") is not None:
        runs = result.get("dedicated_offline_runs_tok_s") or []
        policies = result.get("dedicated_offline_runs_policy") or [""] * len(runs)
        named = [f"{x:.1f}" + (f" {p}" if p else "") for x, p in zip(runs, policies) if x is not None]
        each = f" (the best of {', '.join(named)})" if len(runs) > 1 else ""
        print(f"dedicated_offline_tok_s = {result['dedicated_offline_tok_s']:.1f}{each}")
    for name, col in columns.items():
        if "error" in col:
            print(f"{name}: run failed: {col['error'].strip().splitlines()[-1]}")
        for failed in col.get("failed_rounds", []):
            print(f"{name}: round {failed['round']} failed: {failed['error'].strip().splitlines()[-1]}")
    if rounds > 1:
        print("\nby round (TTFT p99 s, TPOT p99 ms, offline tok/s):")
        for name, col in result["policies"].items():
            cells = [f"{_fmt(r['online_ttft_p99_s'])} / {_fmt(r['online_tpot_p99_s'], 1000)} / "
                     f"{_fmt(r['offline_tok_s'])}" for r in col.get("rounds", [])]
            print(f"  {name:<12} " + "   ".join(cells))
    print("\ntargets (issue 3):")
    for name, r in result["ratios"].items():
        value = "n/a" if r["value"] is None else ("≥" if r.get("lower_bound") else "") + f"{r['value']:.3f}"
        verdict = "n/a" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        noisy = f"  (unreliable: a busy neighbour during {', '.join(r['noisy_runs'])})" if r.get("noisy_runs") else ""
        print(f"  {name:<46} {value:>10}  (target {r['target']:>7})  {verdict}{noisy}")


def plot_results(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    slo, workload = result["slo"], result["workload"]
    fig, (ax_ttft, ax_tpot, ax_tok) = plt.subplots(3, 1, figsize=(15, 11), sharex=True)
    for policy, figures in result["policies"].items():
        if "error" in figures:
            continue
        colour = COLOURS.get(policy, "black")
        rows = figures["requests"]
        done = [r for r in rows if r["completed"] and r["tpot_s"] is not None]
        # TTFT by arrival time, every request: measured ones filled; one with no first token by the end
        # hollow, at its wait so far (a lower bound), nudged sideways by policy since all share arrivals.
        measured = [r for r in rows if not r["ttft_censored"]]
        ax_ttft.scatter([r["arrival_s"] for r in measured], [r["ttft_s"] for r in measured], s=18, color=colour,
                        label=f"{policy} (p99 {_fmt(figures['online_ttft_p99_s'])} s)")
        censored = [r for r in rows if r["ttft_censored"]]
        if censored:
            nudge = 0.004 * workload["duration_s"] * list(COLOURS).index(policy) if policy in COLOURS else 0.0
            ax_ttft.scatter([r["arrival_s"] + nudge for r in censored], [r["ttft_s"] for r in censored], s=30,
                            marker="^", facecolors="none", edgecolors=colour,
                            label=f"{policy}: no first token by the end (lower bound)")
        # TPOT by completion time, completed requests.
        ax_tpot.scatter([r["done_s"] for r in done], [r["tpot_s"] * 1000 for r in done], s=18, color=colour,
                        label=f"{policy} (p99 {_fmt(figures['online_tpot_p99_s'], 1000)} ms)")
        if policy != "online-only":
            label = f"{policy} (window mean {figures['offline_tok_s']:.0f})"
            for segment in _rounds_of(figures["timeline"]):  # a rate never spans two rounds' engines
                t, rate = _offline_rate(segment)
                ax_tok.plot(t, rate, color=colour, lw=1.4, label=label)
                label = None
    if "timeline" in result.get("dedicated_offline", {}):
        t, rate = _offline_rate(result["dedicated_offline"]["timeline"])
        ax_tok.plot(t, rate, color="grey", lw=1.2, ls="--",
                    label=f"offline alone, {_dedicated_policy(result)} "
                          f"(mean {result['dedicated_offline_tok_s']:.0f})")

    ax_ttft.axhline(slo["ttft_s"], color="black", ls=":", lw=1, label=f"TTFT SLO {slo['ttft_s']:g} s")
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("time to first token (s, log)")
    ax_ttft.set_title("online TTFT, by arrival time", fontsize=10)
    ax_tpot.axhline(slo["tpot_s"] * 1000, color="black", ls=":", lw=1, label=f"TPOT SLO {slo['tpot_s'] * 1000:g} ms")
    ax_tpot.set_ylim(bottom=0)
    ax_tpot.set_ylabel("time per output token (ms)")
    ax_tpot.set_title("online TPOT of completed requests, by completion time", fontsize=10)
    ax_tok.set_ylabel("offline tokens/s (prompt + generated)")
    ax_tok.set_title("offline tokens/s harvested (5 s trailing window); the grey line ends the measured window",
                     fontsize=10)
    ax_tok.set_xlabel("seconds since the start of the measured window"
                      + (" (rounds one after another)" if workload.get("rounds", 1) > 1 else ""))
    ax_tok.set_ylim(bottom=0)
    ax_ttft.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers on the log axis
    ax_ttft.yaxis.set_minor_formatter(NullFormatter())
    for ax in (ax_ttft, ax_tpot, ax_tok):
        for k in range(workload.get("rounds", 1)):  # the end of each round's window
            ax.axvline(k * workload.get("round_span_s", 0.0) + workload["duration_s"], color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    load = workload.get("online_load")
    fig.suptitle(f"Co-serving on {workload['model']}, {workload['dtype']} {workload['device']}: "
                 f"{workload['online_requests']} online requests ({workload['arrivals']}, "
                 f"{workload['online_rate_per_s']:.3f}/s" + (f", load {load:g}" if load is not None else "")
                 + ") + offline backlog", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rounds_of(timeline: list[dict]) -> list[list[dict]]:
    """The timeline cut where its round changes (bench/coserve_rounds.py marks each sample's round)."""
    segments: list[list[dict]] = []
    for sample in timeline:
        if not segments or sample.get("round") != segments[-1][-1].get("round"):
            segments.append([])
        segments[-1].append(sample)
    return segments


def _offline_rate(timeline: list[dict], window_s: float = 5.0) -> tuple[list[float], list[float]]:
    """Offline tokens/s over a trailing window of about window_s (one step of a large offline prefill
    takes over a second on 2 cores, so rates between 0.5 s samples jump between 0 and peaks)."""
    t, rate, j = [], [], 0
    for b in timeline:
        while j + 1 < len(timeline) and b["t"] - timeline[j + 1]["t"] >= window_s:
            j += 1
        a = timeline[j]
        if b["t"] - a["t"] >= window_s / 2:
            t.append(b["t"])
            rate.append((b["offline_tokens"] - a["offline_tokens"]) / (b["t"] - a["t"]))
    return t, rate


def _dedicated_policy(result: dict) -> str:
    """The policy of the offline-only run the harvest ratio is measured against (results written before
    several policies were run name a single one in the workload)."""
    return result.get("dedicated_offline", {}).get("policy") or str(result["workload"].get("dedicated_policy"))


def _fmt(value, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description="print and plot a saved bench/coserve.py result again")
    p.add_argument("json")
    p.add_argument("--plot", help="PNG to write (default: the JSON path with .png)")
    args = p.parse_args()
    result = json.loads(Path(args.json).read_text())
    print_table(result)
    plot = args.plot or str(Path(args.json).with_suffix(".png"))
    plot_results(result, plot)
    print(f"wrote {plot}")


if __name__ == "__main__":
    main()
