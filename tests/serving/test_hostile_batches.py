"""Hostile batch input files, uploaded and submitted through the gateway: a line of 20 MB, bytes that are not
UTF-8, JSON nested 100,000 deep, more requests than a batch may hold, file names that try to climb out of the
files folder. Each fails its batch with the error that names it (or is stored harmlessly), in bounded memory and
time, and the gateway goes on serving."""
from __future__ import annotations

import os
import re
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest

from batch_files import chat_line, write_jsonl
from stack import GatewayThread, gateway_settings

MAX_UPLOAD = 32 * 1024 * 1024
MAX_REQUESTS = 1000
FILE_ID = re.compile(r"file-[0-9a-f]{24}")


@pytest.fixture(scope="module")
def gateway_url(database_url, broker_url, files_dir):
    # No worker: batches are validated on the gateway.
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir,
                                       max_upload_bytes=MAX_UPLOAD, max_batch_requests=MAX_REQUESTS)).start()
    yield g.url
    g.stop()


@pytest.fixture(scope="module")
def api(gateway_url):
    with httpx.Client(base_url=f"{gateway_url}/v1", timeout=60) as client:
        yield client


def upload(api, path: Path, filename: str = "in.jsonl") -> dict:
    with path.open("rb") as fp:   # httpx streams the file part from disk
        resp = api.post("/files", data={"purpose": "batch"}, files={"file": (filename, fp, "application/jsonl")})
    assert resp.status_code == 200, resp.text
    return resp.json()


def submit(api, path: Path, timeout: float = 30.0) -> dict:
    """Upload, create the batch, and wait until its validation is over."""
    file = upload(api, path)
    resp = api.post("/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                      "completion_window": "24h"})
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    deadline = time.monotonic() + timeout
    while batch["status"] == "validating":
        assert time.monotonic() < deadline, "validation did not finish"
        time.sleep(0.05)
        batch = api.get(f"/batches/{batch['id']}").json()
    return batch


def first_error(batch: dict) -> dict:
    assert batch["status"] == "failed", batch
    assert batch["request_counts"]["total"] == 0
    return batch["errors"]["data"][0]


def assert_still_serving(api) -> None:
    assert api.get("/files").status_code == 200


def test_a_20_mb_line_fails_the_batch_as_line_too_long_in_bounded_memory(api, tmp_path):
    path = tmp_path / "one-huge-line.jsonl"
    with path.open("wb") as fp:   # one line, no newline anywhere
        fp.write(b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"pad": "')
        for _ in range(20):
            fp.write(b"x" * (1024 * 1024))
    assert path.stat().st_size > 20 * 1024 * 1024

    tracemalloc.start()
    try:
        batch = submit(api, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    error = first_error(batch)
    assert (error["code"], error["line"]) == ("line_too_long", 1), error
    # Upload and validation both stream: the line is never held whole (it alone is 20 MB).
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB while handling a 20 MiB line"
    assert_still_serving(api)


@pytest.mark.parametrize("bad_line, line", [
    (b'{"custom_id": "\xff\xfe", "method": "POST", "url": "/v1/chat/completions", "body": {}}', 2),
    (b"\xc3\x28 not utf-8 at all", 2),
    (b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "\xed\xa0\x80"}}', 2),
])
def test_invalid_utf8_fails_the_batch_naming_the_line(api, tmp_path, bad_line, line):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a")])
    path.write_bytes(path.read_bytes() + bad_line + b"\n")
    error = first_error(submit(api, path))
    assert (error["code"], error["line"]) == ("invalid_utf8", line), error


def test_a_utf16_file_fails_as_invalid_utf8(api, tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes('{"custom_id": "a"}\n'.encode("utf-16"))
    error = first_error(submit(api, path))
    assert (error["code"], error["line"]) == ("invalid_utf8", 1), error


@pytest.mark.parametrize("depth", [100, 100_000])
@pytest.mark.parametrize("open_, close", [("[", "]"), ('{"a": ', "}")])
def test_deeply_nested_json_fails_the_batch_as_invalid_json(api, tmp_path, depth, open_, close):
    body = open_ * depth + "1" * (open_ != "[") + close * depth
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ' + body + "}"
    path = write_jsonl(tmp_path / "deep.jsonl", [chat_line("ok"), line])
    error = first_error(submit(api, path))
    assert (error["code"], error["line"]) == ("invalid_json_line", 2), error
    assert "nested" in error["message"]
    assert_still_serving(api)


def test_more_lines_than_a_batch_may_hold_fail_fast_as_too_many_requests(api, tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [chat_line(f"r{i}") for i in range(5 * MAX_REQUESTS)])
    file = upload(api, path)
    started = time.monotonic()
    batch = api.post("/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h"}).json()
    while batch["status"] == "validating":
        assert time.monotonic() - started < 10
        time.sleep(0.02)
        batch = api.get(f"/batches/{batch['id']}").json()
    elapsed = time.monotonic() - started
    error = first_error(batch)
    # It stops reading at the first line past the limit: the rest of the file is never parsed.
    assert (error["code"], error["line"]) == ("too_many_requests", MAX_REQUESTS + 1), error
    assert elapsed < 5, f"{elapsed:.1f} s to refuse an over-long batch"


@pytest.mark.parametrize("filename, shown", [
    ("../../etc/passwd", "passwd"),
    ("/abs/path", "path"),
    ("..\\..\\win", "win"),
    ("..\\\\..\\\\escaped-win", "escaped-win"),
    ("C:\\Windows\\system.ini", "system.ini"),
    ("a/b/../../../../up.jsonl", "up.jsonl"),
])
def test_path_like_file_names_are_shown_as_their_last_part_and_never_used_as_paths(api, tmp_path, files_dir,
                                                                                  filename, shown):
    content = (write_jsonl(tmp_path / "in.jsonl", [chat_line("a")])).read_bytes()
    before = set(files_dir.iterdir())
    targets = traversal_targets(files_dir, filename)
    targets_before = {target: fingerprint(target) for target in targets}
    # Written by hand, as a hostile client would: the name goes into the part header exactly as given.
    boundary = "hostile-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    resp = api.post("/files", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 200, resp.text
    file = resp.json()
    assert file["filename"] == shown
    assert FILE_ID.fullmatch(file["id"])
    assert api.get(f"/files/{file['id']}").json()["filename"] == shown

    # Stored under the server's id, in the files folder, and nowhere else.
    assert set(files_dir.iterdir()) - before == {files_dir / file["id"]}
    assert (files_dir / file["id"]).read_bytes() == content
    assert api.get(f"/files/{file['id']}/content").content == content
    assert {target: fingerprint(target) for target in targets} == targets_before


def traversal_targets(files_dir: Path, filename: str) -> set[Path]:
    """Where a server that used the client's name as a path would have written: below, beside or above its files
    folder (with either separator), or where the name points by itself."""
    names = {filename, filename.replace("\\", "/"), filename.replace("\\\\", "/").replace("\\", "/")}
    targets = set()
    for name in names:
        targets |= {Path(os.path.normpath(files_dir / name)), Path(os.path.normpath(Path.cwd() / name)),
                    files_dir / Path(name).name, files_dir.parent / Path(name).name}
    return targets


def fingerprint(path: Path) -> tuple | None:
    """Whether the path exists, and if so its size and modification time (/etc/passwd does exist)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns
