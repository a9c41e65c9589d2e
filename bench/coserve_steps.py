"""The co-serving benchmark's per-step view (`coserve.py --step-trace N`): the engine's step trace cut
to the measured window, and how the steps `conserve` sized to the TPOT SLO ran against their prediction."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np


def window_steps(records, engine_start_s: float, t0: float, t1: float) -> list[dict]:
    """The records of steps planned between t0 and t1 (time.monotonic()), with at_s from t0. The engine
    keeps only its last --step-trace steps: a window that held more starts later than t0."""
    steps = []
    for r in records:
        at = engine_start_s + r.at_s
        if t0 <= at <= t1:
            steps.append(asdict(r) | {"at_s": round(at - t0, 4)})
    return steps


def summarise_steps(steps: list[dict], slo_tpot_s: float) -> dict:
    """Steps sized to the TPOT SLO (a prediction was made for them) that ran to the end: how their
    measured time compares with the prediction, the prediction corrected by the scheduler's time_scale,
    and the SLO; split into decode-only steps and the rest."""
    summary: dict = {"steps": len(steps)}
    sized = [s for s in steps if s["predicted_s"] is not None and s["committed"]]
    for name, group in (("sized", sized), ("sized_decode_only", [s for s in sized if s["decodes"] == s["seqs"]]),
                        ("sized_other", [s for s in sized if s["decodes"] < s["seqs"]])):
        if not group:
            summary[name] = None
            continue
        raw = np.array([s["seconds"] / s["predicted_s"] for s in group])
        corrected = np.array([s["seconds"] / (s["predicted_s"] * s["time_scale"]) for s in group])
        seconds = np.array([s["seconds"] for s in group])
        summary[name] = {
            "count": len(group),
            "seconds_p50": round(float(np.median(seconds)), 5),
            "measured_over_predicted_p50": round(float(np.median(raw)), 3),
            "measured_over_corrected_p50": round(float(np.median(corrected)), 3),
            "measured_over_corrected_p90": round(float(np.percentile(corrected, 90)), 3),
            "over_slo_fraction": round(float(np.mean(seconds > slo_tpot_s)), 3),
            "seqs_p50": float(np.median([s["seqs"] for s in group])),
        }
    return summary


def describe(summary: dict) -> str:
    sized = summary.get("sized")
    if not sized:
        return f"{summary['steps']} steps, none sized to the TPOT SLO"
    return (f"{summary['steps']} steps, {sized['count']} sized to the TPOT SLO: median "
            f"{sized['seconds_p50'] * 1e3:.1f} ms, measured / corrected prediction p50 "
            f"{sized['measured_over_corrected_p50']:.2f} p90 {sized['measured_over_corrected_p90']:.2f}, "
            f"{sized['over_slo_fraction']:.0%} over the SLO")
