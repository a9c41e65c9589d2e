"""Faults mid-batch, with real processes: the broker restarting (empty: no persistence) and the gateway
restarting. The batch completes either way, every custom_id exactly once."""
from __future__ import annotations

import time

import openai
import pytest

from batch_files import chat_line, read_jsonl, write_jsonl
from private_redis import PrivateRedis
from stack import GatewayThread, gateway_settings


@pytest.fixture(scope="module")
def private_redis():
    server = PrivateRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def broker_url(private_redis) -> str:
    """Overrides the shared Redis for this module: these tests kill the broker."""
    return private_redis.url


def progress(client, batch_id):
    batch = client.batches.retrieve(batch_id)
    return batch, batch.request_counts.completed + batch.request_counts.failed


def run_until_completed(client, batch_id, timeout=120.0):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status != "completed":
        assert batch.status in ("validating", "in_progress", "finalizing"), batch
        assert time.monotonic() < deadline, f"batch stuck at {batch.request_counts}"
        time.sleep(0.25)
    return batch


def start_batch(client, tmp_path, name, count):
    lines = [chat_line(f"{name}-{i}", max_tokens=32) for i in range(count)]
    upload = client.files.create(file=write_jsonl(tmp_path / f"{name}.jsonl", lines).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    return batch, lines


def wait_for_progress(client, batch_id, at_least):
    deadline = time.monotonic() + 60
    while progress(client, batch_id)[1] < at_least:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def assert_each_once(client, batch, lines):
    outputs = read_jsonl(client.files.content(batch.output_file_id).text)
    assert sorted(o["custom_id"] for o in outputs) == sorted(line["custom_id"] for line in lines)


def test_batch_completes_across_a_broker_restart_that_lost_every_task(database_url, private_redis, files_dir,
                                                                      start_worker, tmp_path):
    start_worker("w-fault-redis", "--max-num-seqs", "4").wait_registered()
    gateway = GatewayThread(gateway_settings(database_url, broker_url=private_redis.url, files_dir=files_dir)).start()
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=2, timeout=30)
        batch, lines = start_batch(client, tmp_path, "redis", 200)
        wait_for_progress(client, batch.id, 10)
        private_redis.kill()
        time.sleep(1.0)
        private_redis.start()  # same port, empty
        done = run_until_completed(client, batch.id)
        assert done.request_counts.completed == len(lines)
        assert_each_once(client, done, lines)
    finally:
        gateway.stop()


def test_batch_completes_across_a_gateway_restart(database_url, broker_url, files_dir, start_worker, tmp_path):
    start_worker("w-fault-gw", "--max-num-seqs", "4").wait_registered()
    settings = gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir)
    first = GatewayThread(settings).start()
    client = openai.OpenAI(base_url=f"{first.url}/v1", api_key="x", max_retries=0, timeout=30)
    batch, lines = start_batch(client, tmp_path, "gw", 150)
    wait_for_progress(client, batch.id, 10)
    first.stop()  # mid-batch; workers go on writing results to the store

    second = GatewayThread(settings).start()
    try:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key="x", max_retries=0, timeout=30)
        done = run_until_completed(client, batch.id)
        assert done.request_counts.completed == len(lines)
        assert_each_once(client, done, lines)
    finally:
        second.stop()
