"""Notices a restart of the Redis broker. A Redis without persistence (or one that lost its data) comes
back empty, taking the queued shard tasks with it; the job store still knows which shards are queued, so
the gateway sends them again (duplicates are harmless: workers claim shards with a lease). Redis's
run_id changes on every start, which tells a restart from a mere blip in the connection."""
from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)


def redis_client_url(broker_url: str) -> str:
    """kombu's `redis+socket:///path` is redis-py's `unix:///path`."""
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url[len("redis+socket://"):]
    return broker_url


class BrokerWatch:
    def __init__(self, broker_url: str):
        self.client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=2, socket_connect_timeout=2)
        self._run_id: str | None = None

    def restarted(self) -> bool:
        """True once per restart seen since the previous call (False while the broker is unreachable)."""
        try:
            run_id = self.client.info("server")["run_id"]
        except (redis.RedisError, OSError, KeyError):
            return False
        changed = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        if changed:
            log.warning("the broker restarted (new run_id); its queued tasks may be gone")
        return changed

    def close(self) -> None:
        self.client.close()
