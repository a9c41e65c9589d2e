"""How busy the GPU is while the engine serves a batch: kernel time against wall time, and kernel
launches per step, from torch.profiler (CUDA only).

    python bench/gpu_busy.py [--model HF_DIR_OR_GGUF] [--prompts 64] [--input-len 128] [--output-len 32]
        [--decode-graphs on|off]

A low busy fraction with hundreds of launches a step means the steps are bound by Python and launch
overhead, not by the GPU (on an H200 with SmolLM2-135M's shape: 12% busy, 335 launches a step).
"""
from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF directory or .gguf file (default: the bundled SmolLM2 GGUF)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--decode-graphs", choices=("on", "off"), default="on",
                   help="replay decode steps from CUDA graphs (the engine's default on CUDA) or run them eagerly")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine import Engine, EngineConfig, SamplingParams
    if not torch.device(args.device).type == "cuda" or not torch.cuda.is_available():
        sys.exit("gpu_busy.py: needs a CUDA device")
    loading = time.perf_counter()
    engine = Engine(EngineConfig(model=args.model, device=args.device, kv_cache_bytes=1 << 30,
                                 decode_graphs=args.decode_graphs))
    loading = time.perf_counter() - loading
    vocab = engine.model_config.vocab_size
    prompts = [[(7 * i + j) % (vocab - 100) + 100 for j in range(args.input_len)] for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    try:
        # Warm-up at the full batch: lazy initialisation, and the decode graphs of the measured runs'
        # bucket are captured here rather than inside them.
        engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        before = engine.stats().num_steps
        start = time.perf_counter()
        engine.generate(prompts, params)
        plain = time.perf_counter() - start
        plain_steps = engine.stats().num_steps - before
        before = engine.stats().num_steps
        # CUPTI records the engine thread's kernels; CPU operators are recorded on this thread only.
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            engine.generate(prompts, params)
            wall = time.perf_counter() - start
        steps = engine.stats().num_steps - before
    finally:
        engine.shutdown()
    events = prof.key_averages()
    kernel_s = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 1e6
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    graph_launches = sum(e.count for e in events if e.key in ("cudaGraphLaunch", "cuGraphLaunch"))
    generated = args.prompts * args.output_len
    print(f"decode graphs {args.decode_graphs}: unprofiled {plain_steps} steps in {plain:.3f} s "
          f"({plain / plain_steps * 1e3:.2f} ms a step, {generated / plain:.0f} generated tok/s); profiled "
          f"{steps} steps in {wall:.3f} s, kernel time {kernel_s:.3f} s ({kernel_s / wall:.0%} busy); "
          f"{launches / steps:.0f} kernel launches and {graph_launches / steps:.0f} graph launches a step")
    graphs = engine.runner.graphs
    captured = (f"; {len(graphs.buckets)} graph buckets captured in {graphs.capture_seconds:.2f} s"
                if graphs is not None else "")
    print(f"engine start-up (load, cost-model profile) {loading:.1f} s{captured}")
    try:
        print(events.table(sort_by="self_device_time_total", row_limit=12))
    except (AttributeError, KeyError):  # torch releases before the cuda -> device renaming
        print(events.table(sort_by="self_cuda_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
