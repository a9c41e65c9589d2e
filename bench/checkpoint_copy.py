"""Time one KV checkpoint copy (device pool -> host store) of N tokens at several layer-group sizes.

engine/checkpoint.py copies a step's tokens a group of layers at a time, sized by COPY_GROUP_BYTES;
this measures that choice against one layer per copy and one copy for all layers, on SmolLM2-135M's
KV shape (30 layers, 3 KV heads of 64) with block-structured slots, as the engine's are.

    python bench/checkpoint_copy.py [--device cpu|cuda] [--tokens 1 64 2048]
"""
from __future__ import annotations

import argparse
import time

import torch

import engine.checkpoint as checkpoint
from engine.checkpoint import Checkpointer, HostKVStore
from engine.kv_cache import KVCache
from engine.model_config import ModelConfig

SMOLLM2_KV = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)
BLOCK = 16


# Up to this many tokens are copied as a step of decodes (one token in each of that many requests'
# blocks); more, as one prefill chunk (whole blocks).
DECODE_BATCH = 64


def block_slots(num_tokens: int, num_blocks: int, one_per_block: bool, generator: torch.Generator) -> list[int]:
    """Slots of num_tokens tokens: whole random blocks (a prefill chunk), or one token in each of
    num_tokens random blocks (a step of decodes)."""
    blocks = torch.randperm(num_blocks, generator=generator)
    if one_per_block:
        return (blocks[:num_tokens] * BLOCK).tolist()
    count = -(-num_tokens // BLOCK)
    return (blocks[:count].unsqueeze(1) * BLOCK + torch.arange(BLOCK)).flatten()[:num_tokens].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 2048])
    p.add_argument("--blocks", type=int, default=4096, help="device pool blocks (the store gets twice)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cache = KVCache(SMOLLM2_KV, args.blocks, BLOCK, dtype, device)
    cache.slots.normal_()
    store = HostKVStore(cache, 2 * args.blocks, pin=device.type == "cuda")
    copier = Checkpointer(cache, store, device)
    layer_bytes = cache.slots[0, :, :1].numel() * cache.slots.element_size()  # one token, one layer-kind
    g = torch.Generator().manual_seed(0)
    for n in args.tokens:
        decodes = n <= DECODE_BATCH
        dev = block_slots(n, args.blocks, one_per_block=decodes, generator=g)
        host = block_slots(n, 2 * args.blocks, one_per_block=decodes, generator=g)
        sizes = {"per layer": layer_bytes * n, "grouped (engine)": checkpoint.COPY_GROUP_BYTES,
                 "all layers at once": 1 << 62}
        for name, group_bytes in sizes.items():
            checkpoint.COPY_GROUP_BYTES = group_bytes
            ready = None
            if device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            copier._copy(dev, host, ready)  # warm-up
            reps = 100 if n < 1024 else 10
            start = time.perf_counter()
            for _ in range(reps):
                copier._copy(dev, host, ready)
            print(f"{n:5d} tokens  {name:20s} {(time.perf_counter() - start) / reps * 1e3:8.3f} ms")
        checkpoint.COPY_GROUP_BYTES = sizes["grouped (engine)"]
    copier.close()


if __name__ == "__main__":
    main()
