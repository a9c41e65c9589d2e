"""OpenAI's Batch API shapes: the lines of a batch's output and error files, and the Batch and File
objects that /v1/batches and /v1/files answer with. Plain dicts, from any object with the right
attributes (the store's rows, or test doubles)."""
from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, BinaryIO

_TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
               "failed_at", "expired_at", "cancelling_at", "cancelled_at")


# --- output and error file lines ------------------------------------------------------------------

def output_line(request_id: str, custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """A request the endpoint answered: its response, as the endpoint would have sent it."""
    return {"id": request_id, "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None}


def error_line(request_id: str, custom_id: str, *, status_code: int | None = None,
               body: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request that failed. Either the endpoint refused it (status_code and OpenAI's error body,
    e.g. 400 {"error": {...}}), or it never ran (error {"code", "message"}, e.g. batch_expired,
    batch_cancelled), or both."""
    if status_code is None and error is None:
        raise ValueError("an error line needs a status_code (with its body) or an error")
    response = None
    if status_code is not None:
        response = {"status_code": status_code, "request_id": request_id, "body": body}
    return {"id": request_id, "custom_id": custom_id, "response": response,
            "error": None if error is None else {"code": error.get("code"), "message": error.get("message")}}


def batch_error(code: str, message: str) -> dict[str, str]:
    """The `error` of an error line for a request the batch never ran."""
    return {"code": code, "message": message}


def write_jsonl(fp: BinaryIO, lines: Iterable[dict[str, Any]]) -> int:
    """Write each line as compact UTF-8 JSON followed by a newline; returns the bytes written.
    NaN and infinities are refused (ValueError): they are not JSON."""
    written = 0
    for line in lines:
        data = json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        fp.write(data)
        fp.write(b"\n")
        written += len(data) + 1
    return written


# --- Batch and File objects -----------------------------------------------------------------------

def epoch_seconds(value: datetime | int | float | None) -> int | None:
    """Whole seconds since the epoch; a naive datetime is taken as UTC (SQLite keeps no zone)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp())
    return int(value)


def batch_object(batch: Any, counts: dict[str, int]) -> dict[str, Any]:
    """OpenAI's Batch object. `counts`: total, completed and failed requests (missing ones are 0)."""
    errors = batch.errors
    obj: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": [_batch_error(e) for e in errors]} if errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
    }
    for name in _TIMESTAMPS:
        obj[name] = epoch_seconds(getattr(batch, name))
    obj["request_counts"] = {"total": int(counts.get("total", 0)),
                             "completed": int(counts.get("completed", 0)),
                             "failed": int(counts.get("failed", 0))}
    obj["metadata"] = dict(batch.metadata_) if batch.metadata_ is not None else None
    return obj


def _batch_error(error: dict[str, Any]) -> dict[str, Any]:
    return {"code": error.get("code"), "message": error.get("message"), "param": error.get("param"),
            "line": error.get("line")}


def file_object(file: Any) -> dict[str, Any]:
    """OpenAI's File object."""
    return {"id": file.id, "object": "file", "bytes": int(file.bytes),
            "created_at": epoch_seconds(file.created_at), "filename": file.filename,
            "purpose": file.purpose, "status": "processed", "expires_at": None, "status_details": None}
