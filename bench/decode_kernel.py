"""The native paged decode-attention kernel alone, at throughput.py's batch-64 decode shape on SmolLM2
(9 query heads over 3 KV heads of 64, blocks of 16, 64 sequences of 128-256 tokens, blocks scattered
through a pool of 23,000 slots). "cold" cycles through 30 layers' pools, as a decode step does, so the
keys and values come from memory; "hot" repeats one layer, whose pool then sits in the caches.

    python bench/decode_kernel.py [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.native_kernels import paged_decode_attention  # noqa: E402

SEQS, HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS, SLOTS = 64, 9, 3, 64, 16, 30, 23000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    dtype = getattr(torch, p.parse_args().dtype)
    kernel = paged_decode_attention(dtype, HEAD_DIM)
    g = torch.Generator().manual_seed(0)
    pools = [(torch.randn(KV_HEADS, SLOTS, HEAD_DIM, generator=g).to(dtype),
              torch.randn(KV_HEADS, SLOTS, HEAD_DIM, generator=g).to(dtype)) for _ in range(LAYERS)]
    lens = torch.randint(128, 257, (SEQS,), dtype=torch.int32, generator=g)
    width = 256 // BLOCK + 1
    tables = torch.randperm(SLOTS // BLOCK, generator=g)[: SEQS * width].to(torch.int32).view(SEQS, width)
    q = torch.randn(SEQS, HEADS, HEAD_DIM, generator=g).to(dtype)

    def cold() -> float:
        start = time.perf_counter()
        for keys, values in pools:
            kernel(q, keys, values, tables, lens, BLOCK, HEAD_DIM ** -0.5)
        return (time.perf_counter() - start) / LAYERS

    for _ in range(3):
        cold()
    cold_s = statistics.median(cold() for _ in range(10))
    start = time.perf_counter()
    for _ in range(200):
        kernel(q, pools[0][0], pools[0][1], tables, lens, BLOCK, HEAD_DIM ** -0.5)
    hot_s = (time.perf_counter() - start) / 200
    mb = SEQS * KV_HEADS * lens.float().mean().item() * HEAD_DIM * dtype.itemsize * 2 / 1e6
    print(f"{dtype}: cold {cold_s * 1e3:.2f} ms a layer ({mb / cold_s / 1e3:.1f} GB/s of {mb:.1f} MB), "
          f"hot {hot_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
