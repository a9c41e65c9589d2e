"""The Batch API's shapes: output and error file lines as OpenAI writes them, and the Batch and File
objects, checked against the openai SDK's own types."""
from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from openai.types import Batch, FileObject

from app.batch_output import (
    batch_error,
    batch_object,
    epoch_seconds,
    error_line,
    file_object,
    output_line,
    write_jsonl,
)
from app.file_storage import FileStorage, new_file_id

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
T0_EPOCH = 1735787045


def _batch(**overrides: Any) -> SimpleNamespace:
    fields: dict[str, Any] = {
        "id": "batch_abc", "endpoint": "/v1/chat/completions", "errors": None,
        "input_file_id": "file-" + "a" * 24, "completion_window": "24h", "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": T0, "in_progress_at": None,
        "expires_at": T0 + timedelta(hours=24), "finalizing_at": None, "completed_at": None,
        "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "metadata_": None,
    }
    fields.update(overrides)
    return SimpleNamespace(**fields)


# --- output and error lines ---------------------------------------------------------------------

def test_output_line_carries_the_response_under_the_request_id():
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
    assert output_line("batch_req_1", "my-id", 200, body) == {
        "id": "batch_req_1", "custom_id": "my-id",
        "response": {"status_code": 200, "request_id": "batch_req_1", "body": body},
        "error": None,
    }


def test_error_line_for_a_request_the_batch_never_ran_has_no_response():
    line = error_line("batch_req_2", "c", error=batch_error("batch_expired", "the batch expired first"))
    assert line == {"id": "batch_req_2", "custom_id": "c", "response": None,
                    "error": {"code": "batch_expired", "message": "the batch expired first"}}


def test_error_line_for_a_request_the_engine_refused_has_the_400_response():
    body = {"error": {"message": "prompt too long", "type": "invalid_request_error", "param": None,
                      "code": None}}
    line = error_line("batch_req_3", "c", status_code=400, body=body)
    assert line["response"] == {"status_code": 400, "request_id": "batch_req_3", "body": body}
    assert line["error"] is None


def test_error_line_keeps_only_code_and_message_of_the_error():
    line = error_line("r", "c", error={"code": "batch_cancelled", "message": "cancelled", "extra": 1})
    assert line["error"] == {"code": "batch_cancelled", "message": "cancelled"}


def test_error_line_needs_a_response_or_an_error():
    with pytest.raises(ValueError):
        error_line("r", "c")


def test_write_jsonl_writes_compact_utf8_json_one_per_line_and_counts_bytes():
    fp = io.BytesIO()
    lines = [output_line("r1", "ü-1", 200, {"text": "héllo ✓"}),
             error_line("r2", "c2", error=batch_error("batch_cancelled", "x"))]
    written = write_jsonl(fp, lines)
    data = fp.getvalue()
    assert written == len(data)
    assert data.endswith(b"\n") and data.count(b"\n") == 2
    assert "héllo ✓".encode() in data   # UTF-8, not \\u escapes
    assert b", " not in data and b": " not in data
    assert [json.loads(x) for x in data.decode().splitlines()] == lines


def test_write_jsonl_of_nothing_writes_nothing():
    fp = io.BytesIO()
    assert write_jsonl(fp, iter(())) == 0
    assert fp.getvalue() == b""


def test_write_jsonl_refuses_nan_which_is_not_json():
    with pytest.raises(ValueError):
        write_jsonl(io.BytesIO(), [{"x": float("nan")}])


def test_write_jsonl_streams_into_a_storage_writer(tmp_path):
    storage = FileStorage(tmp_path)
    file_id = new_file_id()
    lines = (output_line(f"r{i}", f"c{i}", 200, {"i": i}) for i in range(1000))
    with storage.writer(file_id) as fp:
        written = write_jsonl(fp, lines)
    assert storage.size(file_id) == written
    with storage.open(file_id) as fp:
        assert sum(1 for _ in fp) == 1000


# --- Batch object ---------------------------------------------------------------------------------

def test_batch_object_matches_openais_batch_type():
    obj = batch_object(_batch(), {"total": 0, "completed": 0, "failed": 0})
    parsed = Batch.model_validate(obj)
    assert parsed.id == "batch_abc"
    assert parsed.object == "batch"
    assert parsed.created_at == T0_EPOCH
    assert parsed.expires_at == T0_EPOCH + 24 * 3600
    assert obj["errors"] is None and obj["metadata"] is None
    assert set(obj) == {"id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
                        "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
                        "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                        "cancelled_at", "request_counts", "metadata"}


def test_a_completed_batch_has_every_timestamp_counts_files_and_metadata():
    times = {name: T0 + timedelta(seconds=i) for i, name in enumerate(
        ("created_at", "in_progress_at", "finalizing_at", "completed_at"))}
    obj = batch_object(_batch(status="completed", output_file_id="file-" + "b" * 24,
                              error_file_id="file-" + "c" * 24, metadata_={"team": "eval"}, **times),
                       {"total": 10, "completed": 9, "failed": 1})
    parsed = Batch.model_validate(obj)
    assert parsed.status == "completed"
    assert (parsed.created_at, parsed.in_progress_at, parsed.finalizing_at, parsed.completed_at) == (
        T0_EPOCH, T0_EPOCH + 1, T0_EPOCH + 2, T0_EPOCH + 3)
    assert parsed.request_counts is not None
    counts = parsed.request_counts
    assert (counts.total, counts.completed, counts.failed) == (10, 9, 1)
    assert parsed.metadata == {"team": "eval"}
    assert parsed.output_file_id == "file-" + "b" * 24


def test_a_failed_batch_lists_its_validation_errors():
    errors = [{"code": "invalid_json_line", "message": "not JSON", "param": None, "line": 3},
              {"code": "empty_file", "message": "no requests", "param": None, "line": None}]
    obj = batch_object(_batch(status="failed", errors=errors, failed_at=T0), {})
    parsed = Batch.model_validate(obj)
    assert obj["errors"] == {"object": "list", "data": errors}
    assert parsed.errors is not None and parsed.errors.data is not None
    assert parsed.errors.data[0].line == 3 and parsed.errors.data[0].code == "invalid_json_line"
    assert obj["request_counts"] == {"total": 0, "completed": 0, "failed": 0}   # missing counts are 0


def test_an_empty_error_list_renders_as_null():
    assert batch_object(_batch(errors=[]), {})["errors"] is None


def test_naive_datetimes_are_taken_as_utc_as_sqlite_returns_them():
    obj = batch_object(_batch(created_at=T0.replace(tzinfo=None)), {})
    assert obj["created_at"] == T0_EPOCH


def test_epoch_seconds_takes_datetimes_numbers_and_none():
    assert epoch_seconds(None) is None
    assert epoch_seconds(T0) == T0_EPOCH
    assert epoch_seconds(T0.astimezone(timezone(timedelta(hours=5)))) == T0_EPOCH
    assert epoch_seconds(T0_EPOCH + 0.9) == T0_EPOCH
    assert isinstance(epoch_seconds(T0), int)


@pytest.mark.parametrize("status", ["validating", "failed", "in_progress", "finalizing", "completed",
                                    "expired", "cancelling", "cancelled"])
def test_every_batch_status_is_one_openai_knows(status):
    assert Batch.model_validate(batch_object(_batch(status=status), {})).status == status


# --- File object ----------------------------------------------------------------------------------

def test_file_object_matches_openais_file_type():
    file = SimpleNamespace(id="file-" + "d" * 24, bytes=1234, created_at=T0, filename="input.jsonl",
                           purpose="batch")
    obj = file_object(file)
    parsed = FileObject.model_validate(obj)
    assert (parsed.id, parsed.bytes, parsed.created_at, parsed.filename, parsed.purpose, parsed.status) == (
        "file-" + "d" * 24, 1234, T0_EPOCH, "input.jsonl", "batch", "processed")
    assert obj == {"id": "file-" + "d" * 24, "object": "file", "bytes": 1234, "created_at": T0_EPOCH,
                   "filename": "input.jsonl", "purpose": "batch", "status": "processed",
                   "expires_at": None, "status_details": None}


def test_output_files_render_with_the_batch_output_purpose():
    file = SimpleNamespace(id="file-" + "e" * 24, bytes=0, created_at=T0, filename="batch_abc_output.jsonl",
                           purpose="batch_output")
    assert FileObject.model_validate(file_object(file)).purpose == "batch_output"
