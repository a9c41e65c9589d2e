"""How well the step-latency model fits this device: profile twice (different random step shapes), fit
on the first, and report the mean relative error on its own samples and on the second's, for the
model as the engine fits it and with one term left out.

    python bench/cost_model_fit.py [--model HF_DIR_OR_GGUF] [--device cpu|cuda] [--seconds 6]
        [--max-batched-tokens 2048] [--without per_prefill_step] [--json PATH]

The profiles are the engine's own (engine/profiler.py), with the limits an engine with these settings
profiles at start-up. Held-out error is what the scheduler lives with: a step it plans is one the
profile never timed. On an H200 (decode steps replayed from CUDA graphs, the rest eager) leaving out
`per_prefill_step` raised the held-out error from 10% to 41%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import fields


def main() -> int:
    from engine.cost_model import CostModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF directory or .gguf file (default: the bundled SmolLM2 GGUF)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--seconds", type=float, default=6.0, help="time spent on each of the two profiles")
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-blocks", type=int, default=2048)
    p.add_argument("--without", default="per_prefill_step", choices=[f.name for f in fields(CostModel)],
                   help="the term to leave out in the comparison fit")
    p.add_argument("--json", help="where to write the figures")
    args = p.parse_args()
    if args.seconds <= 0:
        p.error("--seconds must be > 0")

    from engine import Engine, EngineConfig
    from engine.profiler import profile_cost_model

    # The engine's pieces built on this thread, which then times the steps: on the CPU a second thread
    # running steps starts a second OpenMP team, and both slow down (bench/README.md).
    engine = Engine.__new__(Engine)
    engine.config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, policy="priority",
                                 num_kv_blocks=args.kv_blocks, max_num_batched_tokens=args.max_batched_tokens)
    engine.config.validate()
    engine._build(None)
    limits = dict(max_tokens=args.max_batched_tokens, max_seqs=min(engine.config.max_num_seqs, 64),
                  max_context=min(engine.max_model_len, 2048), time_budget_s=args.seconds)
    fitted, train = profile_cost_model(engine.runner, engine.pool, seed=1, **limits)
    _, test = profile_cost_model(engine.runner, engine.pool, seed=2, **limits)
    without = CostModel.fit(train, exclude=[args.without])

    def decode_only(chunks) -> bool:
        return all(p == 1 for p, _ in chunks)

    kinds = (("decode-only", decode_only), ("other", lambda chunks: not decode_only(chunks)))

    result = {"device": str(engine.device), "model": engine.model_name, "samples": [len(train), len(test)],
              "coefficients": fitted.to_dict(), "without": args.without, "fits": {}}
    print(f"{engine.model_name} on {engine.device}: {len(train)} + {len(test)} profiled steps")
    print(f"{'':28} {'in-sample':>10} {'held-out':>10} {'decode-only':>12} {'other steps':>12}")
    for name, model in (("as the engine fits it", fitted), (f"without {args.without}", without)):
        row = {"in_sample": model.mean_relative_error(train), "held_out": model.mean_relative_error(test)}
        for kind, keep in kinds:
            subset = [s for s in test if keep(s[0])]
            row[f"held_out_{kind.replace('-', '_')}"] = model.mean_relative_error(subset) if subset else None
        result["fits"][name] = row
        cells = [f"{v:10.1%}" if v is not None else f"{'-':>10}" for v in row.values()]
        print(f"{name:28} {cells[0]} {cells[1]} {cells[2]:>12} {cells[3]:>12}")
    for kind, keep in kinds:
        times = [seconds for chunks, seconds in test if keep(chunks)]
        if times:
            print(f"held-out {kind} steps: {len(times)}, median {statistics.median(times) * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
