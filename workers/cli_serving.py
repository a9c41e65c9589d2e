"""`conserve worker`, `conserve gateway`, `conserve serve` and `conserve migrate`: the platform's processes.

Flags override the `CONSERVE_*` environment variables, which override the defaults (app/settings.py,
workers/settings.py)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

ENGINE_FLAGS = ("model", "served_model_name", "device", "dtype", "policy", "slo_ttft_ms", "slo_tpot_ms",
                "kv_cache_bytes", "checkpoint_bytes", "decode_mirror_bytes", "decode_graphs", "native_decode", "max_num_seqs",
                "max_model_len")


def add_commands(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="run one engine worker (one per accelerator)")
    _database_flag(worker)
    _engine_flags(worker)
    worker.add_argument("--host", dest="worker_host", help="interface to listen on (default 127.0.0.1)")
    worker.add_argument("--port", dest="worker_port", type=int, help="port to listen on (default: any free one)")
    worker.add_argument("--url", dest="worker_url", help="URL the gateway reaches this worker at")
    worker.add_argument("--worker-id", help="stable id (default: <hostname>-<device>-<port>)")
    worker.set_defaults(run=_worker)

    gateway = commands.add_parser("gateway", help="run the OpenAI-compatible gateway (migrates the store first)")
    _database_flag(gateway)
    _listen_flags(gateway)
    gateway.set_defaults(run=_gateway)

    serve = commands.add_parser("serve", help="run the whole platform on this machine: gateway and one worker")
    serve.add_argument("--data-dir", help="where the store, files and broker live (default ~/.local/share/conserve)")
    _database_flag(serve)
    _listen_flags(serve)
    _engine_flags(serve)
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="create or upgrade the job store's schema")
    _database_flag(migrate)
    migrate.set_defaults(run=_migrate)


def _database_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="SQLAlchemy URL of the job store (default: SQLite in ~/.local/share/conserve)")


def _listen_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a Hugging Face model directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", help="the model name clients ask for (default: the model's own)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="default for `worker`: auto (bfloat16 where the device computes it natively, else float32); "
                        "float32 for `serve`")
    p.add_argument("--policy", choices=("conserve", "priority", "fcfs", "online-only"), help="default conserve")
    p.add_argument("--slo-ttft-ms", type=float, help="online time-to-first-token target (default 1000)")
    p.add_argument("--slo-tpot-ms", type=float, help="online time-per-output-token target (default 100)")
    p.add_argument("--kv-cache-bytes", type=int, help="KV cache size (default: 1 GiB on CPU, free memory on CUDA)")
    p.add_argument("--checkpoint-bytes", type=int,
                   help="host KV checkpoint store (default: twice the KV cache, at most 40%% of RAM split "
                        "between the GPUs seen; 0 turns it off)")
    p.add_argument("--decode-mirror-bytes", type=int,
                   help="CPU decode mirror, a contiguous copy of decoding sequences' KV (default: twice the KV "
                        "cache, at most 20%% of RAM, on CPU where the native decode kernel is off; off on CUDA; "
                        "0 turns it off)")
    p.add_argument("--decode-graphs", choices=("auto", "on", "off"),
                   help="replay decode steps from CUDA graphs (default auto: on CUDA, unless a decode mirror "
                        "is asked for)")
    p.add_argument("--native-decode", choices=("auto", "on", "off"),
                   help="decode attention by a C kernel built with this machine's compiler, reading the KV pool "
                        "in place, and the layers' norms, SiLU and rotary embedding by its row ops (default "
                        "auto: on CPU where it builds, unless a decode mirror is asked for)")
    p.add_argument("--max-num-seqs", type=int, help="most requests running at once (default 128)")
    p.add_argument("--max-model-len", type=int, help="context length cap (default: the model's)")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from workers.run_worker import run_worker
    from workers.settings import WorkerSettings

    _logging()
    settings = WorkerSettings(**_given(args, ("database_url", "worker_host", "worker_port", "worker_url",
                                              "worker_id") + ENGINE_FLAGS))
    return _engine_errors_exit(parser, "worker", lambda: run_worker(settings))


def _gateway(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import uvicorn

    from app.main import create_app
    from app.migrate import migrate
    from app.settings import Settings

    _logging()
    settings = Settings(**_given(args, ("database_url", "host", "port")))
    migrate(settings.database_url)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from workers.embedded import serve

    _logging()
    return serve(_given(args, ("data_dir", "database_url", "host", "port")), _given(args, ENGINE_FLAGS))


def _migrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from app.migrate import migrate
    from app.settings import Settings

    _logging()
    settings = Settings(**_given(args, ("database_url",)))
    migrate(settings.database_url)
    print(f"job store at {settings.database_url} is up to date", file=sys.stderr)
    return 0


def _engine_errors_exit(parser: argparse.ArgumentParser, name: str, run) -> int:
    from engine.errors import InvalidRequestError, ModelLoadError

    try:
        run()
    except (InvalidRequestError, ModelLoadError, FileNotFoundError) as exc:
        parser.exit(2, f"conserve {name}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130
    return 0
