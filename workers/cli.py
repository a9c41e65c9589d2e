"""The `conserve` command line. `conserve chat PROMPT` answers one chat message with the bundled model;
`conserve serve` runs the whole platform (workers/cli_serving.py has it and the other server commands).

stdout carries only the answer, so the command composes in shell pipelines; everything else (loading
messages, warnings, errors) goes to stderr. Bad input exits with code 2, like argparse's own errors.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

BAD_INPUT_EXIT = 2
DTYPES = ("auto", "float32", "bfloat16")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return BAD_INPUT_EXIT
    return args.run(args, parser)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conserve", description="ConServe: LLM online/offline co-serving.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    chat = commands.add_parser("chat", help="answer one chat message and print only the answer")
    chat.add_argument("prompt", type=_non_empty_text, metavar="PROMPT", help="the user's message")
    chat.add_argument("--system", type=_non_empty_text, default=None, help="a system message to put first")
    chat.add_argument("--max-tokens", type=_positive_int, default=256, help="most tokens to generate (default 256)")
    chat.add_argument("--temperature", type=_non_negative_float, default=0.0,
                      help="sampling temperature; 0 (the default) is greedy")
    chat.add_argument("--top-p", type=_unit_interval, default=1.0, help="nucleus sampling cut, in (0, 1]")
    chat.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    # float32 by default: one chat is latency-bound, not throughput-bound, and float32 gives the model's
    # exact answers (bfloat16 rounding can flip near-tied tokens: SmolLM2 then names the wrong capital).
    chat.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="weight and compute dtype (default float32; bfloat16 is faster for big batches on CPUs with AVX-512 BF16 or AMX and on GPUs; auto picks it there)")
    chat.add_argument("--model", type=_existing_path, default=None,
                      help="a Hugging Face model directory or a .gguf file (default: bundled SmolLM2-135M-Instruct)")
    chat.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present, else CPU)")
    chat.set_defaults(run=_chat)

    from workers.cli_serving import add_commands  # argparse only: the heavy imports wait for the command

    add_commands(commands)
    return parser


def _chat(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    messages = [{"role": "user", "content": args.prompt}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})

    # Imported here, not at the top: torch takes seconds to import, and `--help` or an argument error
    # should not pay for it.
    from engine import Engine, EngineConfig, SamplingParams
    from engine.errors import EngineError, InvalidRequestError, ModelLoadError

    # A model path that exists but does not hold a usable model is the caller's mistake too.
    bad_input = (InvalidRequestError, ModelLoadError, ValueError, FileNotFoundError)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        # Anything a library prints while loading belongs on stderr: stdout is the answer alone.
        with contextlib.redirect_stdout(sys.stderr):
            # One online conversation: the co-serving machinery (a step-latency profile on first start,
            # the checkpoint store) has nothing to do here.
            engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                         policy="online-only"))
    except bad_input as exc:
        parser.exit(BAD_INPUT_EXIT, f"conserve chat: error: {exc}\n")

    try:
        # Deltas are written as they arrive so a person watching sees the answer appear.
        for out in engine.stream(messages, params):
            if out.delta:
                sys.stdout.write(out.delta)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except bad_input as exc:
        parser.exit(BAD_INPUT_EXIT, f"conserve chat: error: {exc}\n")
    except EngineError as exc:
        parser.exit(1, f"\nconserve chat: the engine failed: {exc}\n")
    except KeyboardInterrupt:
        return 130
    finally:
        engine.shutdown()
    return 0


# argparse turns the ArgumentTypeError these raise into a usage message and exit code 2.

def _non_empty_text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _positive_int(value: str) -> int:
    number = int(value) if value.lstrip("-").isdigit() else None
    if number is None or number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    number = _float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value!r}")
    return number


def _unit_interval(value: str) -> float:
    number = _float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value!r}")
    return number


def _float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def _existing_path(value: str) -> str:
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"no such file or directory: {value!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
