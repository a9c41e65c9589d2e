"""Online overload, bounded and on loopback: clients at 2x and 5x what the gateway admits. The gateway stays
up and answers its health check, excess requests get 429 at once instead of queueing, accepted requests
keep their TTFT SLO, and the gateway's memory stays bounded. Figures go to test-artifacts/overload.json."""
from __future__ import annotations

import asyncio
import json
import resource
import time

import httpx
import pytest

from browser import ARTIFACTS
from stack import MODEL_NAME, GatewayThread, gateway_settings
from workers.latency_window import percentile

CAPACITY = 4            # online requests the gateway admits at once (one worker)
REQUESTS_PER_CLIENT = 6
SLO_TTFT_S = 1.0


@pytest.fixture(scope="module")
def admitting(database_url, broker_url, files_dir, start_worker):
    start_worker("w-load").wait_registered()
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir,
                                       max_inflight_per_worker=CAPACITY)).start()
    g.wait_for_workers(1)
    yield g
    g.stop()


async def one_request(client: httpx.AsyncClient) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 48,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return {"status": resp.status_code, "answered_s": time.monotonic() - started}
        ttft = None
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and ttft is None and '"content"' in line:
                ttft = time.monotonic() - started
        return {"status": 200, "ttft_s": ttft, "e2e_s": time.monotonic() - started}


async def load(url: str, clients: int) -> tuple[list[dict], list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        health: list[int] = []
        stop = asyncio.Event()

        async def probe():
            while not stop.is_set():
                health.append((await client.get("/health")).status_code)
                await asyncio.sleep(0.1)

        async def closed_loop():
            return [await one_request(client) for _ in range(REQUESTS_PER_CLIENT)]

        prober = asyncio.create_task(probe())
        per_client = await asyncio.gather(*(closed_loop() for _ in range(clients)))
        stop.set()
        await prober
    return [r for results in per_client for r in results], health


@pytest.mark.parametrize("factor", [2, 5])
def test_overload_is_refused_quickly_and_admitted_requests_keep_their_slo(admitting, factor):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results, health = asyncio.run(load(admitting.url, CAPACITY * factor))
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024

    statuses = {r["status"] for r in results}
    assert statuses <= {200, 429}, statuses  # nothing else: no 5xx, no timeouts
    accepted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert accepted and refused
    assert all(code == 200 for code in health) and health
    ttft_p99 = percentile([r["ttft_s"] for r in accepted], 99)
    refusal_p99 = percentile([r["answered_s"] for r in refused], 99)
    assert ttft_p99 < SLO_TTFT_S
    assert refusal_p99 < 1.0  # refused at once, not after waiting in a queue for a slot
    assert rss_growth_mb < 100

    ARTIFACTS.mkdir(exist_ok=True)
    figures = {"factor": factor, "clients": CAPACITY * factor, "requests": len(results), "accepted": len(accepted),
               "refused_429": len(refused), "accepted_ttft_p50_s": percentile([r["ttft_s"] for r in accepted], 50),
               "accepted_ttft_p99_s": ttft_p99, "refusal_p99_s": refusal_p99,
               "health_checks": len(health), "rss_growth_mb": rss_growth_mb}
    path = ARTIFACTS / "overload.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(previous | {f"{factor}x": figures}, indent=2))
