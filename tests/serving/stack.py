"""A real platform for end-to-end tests: worker processes (`conserve worker`) serving a tiny random-weight chat
model, and the gateway app on a loopback port in this process, sharing a SQLite job store."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from app.db import make_engine, make_session_factory
from app.main import create_app
from app.settings import Settings
from app.worker_registry import alive_workers

REPO = Path(__file__).resolve().parents[2]
INTERNAL_TOKEN = "test-internal-token"
MODEL_NAME = "tiny-chat"
# Words the tiny tokenizer knows; anything else becomes <unk>.
WORDS = ["hello", "world", "what", "is", "the", "capital", "of", "france", "paris", "user", "assistant", "system"]


def save_tiny_chat_model(path: Path, context: int = 512) -> Path:
    """A 2-layer random Llama with a word-level tokenizer and a chat template, as a Hugging Face directory;
    `context` positions long."""
    import torch
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    vocab |= {f"w{i}": i for i in range(len(vocab), 128)}
    rust = RustTokenizer(WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gateway_settings(database_url: str, **overrides) -> Settings:
    """Gateway settings for tests: workers count as dead after 3 s of silence (they beat every 0.5 s here),
    shard leases lapse after 3 s (workers renew every second)."""
    return Settings(**{"database_url": database_url, "internal_token": INTERNAL_TOKEN, "worker_stale_after_s": 3.0,
                       "shard_lease_s": 3.0, "batch_maintenance_interval_s": 0.2} | overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`conserve worker` as a child process; ready once it has registered in the store."""

    def __init__(self, model_dir: Path, database_url: str, worker_id: str, profile_dir: Path, *extra: str,
                 broker_url: str = "redis://127.0.0.1:6379/0"):
        cmd = [sys.executable, "-m", "workers.cli", "worker", "--model", str(model_dir), "--served-model-name",
               MODEL_NAME, "--device", "cpu", "--dtype", "float32", "--database-url", database_url,
               "--worker-id", worker_id, *extra]
        env = os.environ | {"CONSERVE_INTERNAL_TOKEN": INTERNAL_TOKEN, "CONSERVE_PROFILE_SECONDS": "1",
                            "CONSERVE_PROFILE_CACHE_DIR": str(profile_dir), "CONSERVE_HEARTBEAT_INTERVAL_S": "0.5",
                            "OMP_NUM_THREADS": "1", "CONSERVE_BROKER_URL": broker_url,
                            "CONSERVE_SHARD_LEASE_S": "3"}
        self.worker_id = worker_id
        self.database_url = database_url
        self.process = subprocess.Popen(cmd, env=env, cwd=REPO)

    def wait_registered(self, timeout: float = 60.0) -> "WorkerProcess":
        db = make_engine(self.database_url)
        sessions = make_session_factory(db)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"worker {self.worker_id} exited with code {self.process.returncode}")
                with sessions() as s:
                    if any(w.id == self.worker_id for w in alive_workers(s, stale_after_s=10)):
                        return self
                time.sleep(0.1)
        finally:
            db.dispose()
        raise TimeoutError(f"worker {self.worker_id} did not register within {timeout} s")

    @property
    def url(self) -> str:
        db = make_engine(self.database_url)
        try:
            with make_session_factory(db)() as s:
                return next(w.url for w in alive_workers(s, stale_after_s=3600) if w.id == self.worker_id)
        finally:
            db.dispose()

    def kill(self) -> None:
        """SIGKILL: no goodbye, no offline mark; the gateway must notice by itself."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class GatewayThread:
    """The gateway app served by uvicorn on a loopback port, on a thread of the test process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "GatewayThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def wait_for_workers(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/health").json().get("workers") == count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the gateway did not see {count} workers")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
