"""Checking an uploaded batch input file (JSONL, one request a line) as OpenAI does when a batch is
created, and reading the checked file again to hand its requests out in shards.

A line is `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`,
where body is the request the endpoint takes. The file is read in bounded pieces: a line longer than
the limit is never held in memory whole, and neither is the file.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from app.errors import describe_validation_errors, json_kind
from app.openai_schemas import ChatCompletionRequest, CompletionRequest

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BATCH_ENDPOINTS: dict[str, type[BaseModel]] = {
    CHAT_COMPLETIONS: ChatCompletionRequest,
    COMPLETIONS: CompletionRequest,
}
MAX_REQUESTS = 50_000
MAX_LINE_BYTES = 1_000_000
MAX_CUSTOM_ID_CHARS = 512
MAX_JSON_DEPTH = 32
MAX_ERRORS = 100   # errors listed; the file is read no further once there are this many
_SKIP_PIECE = 1 << 18   # how much of an over-long line is read at a time while skipping it
_BOM = b"\xef\xbb\xbf"


class _Invalid(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def validate_batch_file(path: Path, endpoint: str, *, max_requests: int = MAX_REQUESTS,
                        max_line_bytes: int = MAX_LINE_BYTES, max_model_len: int | None = None,
                        models: Container[str] | None = None) -> list[dict[str, Any]]:
    """The file's problems, first ones first: each {"code", "message", "param", "line"} (line
    1-based, None for the whole file), at most MAX_ERRORS of them; an empty list means the batch
    can run. One error is reported per line (its first problem). `models`, when given, are the
    models a request may name (others: "model_not_found")."""
    schema = _schema(endpoint)
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}   # custom_id -> the line it was first used on
    requests = 0
    with open(path, "rb") as fp:
        for line_no, raw in _lines(fp, max_line_bytes):
            if raw is not None and not raw.strip():
                continue   # blank lines are tolerated anywhere
            requests += 1
            if requests > max_requests:
                errors.append(_error("too_many_requests",
                                     f"the file has more than {max_requests} requests; split it into "
                                     f"several batches of at most {max_requests}", None, line_no))
                break
            try:
                _check_line(raw, schema, endpoint, seen, line_no, max_line_bytes, max_model_len, models)
            except _Invalid as exc:
                errors.append(_error(exc.code, exc.message, exc.param, line_no))
                if len(errors) >= MAX_ERRORS:
                    break
    if requests == 0:
        errors.append(_error("empty_file", "the file has no requests; upload a JSONL file with one "
                             "request per line", None, None))
    return errors


def iter_batch_requests(path: Path, endpoint: str, shard_size: int, *,
                        max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[dict[str, Any]]:
    """The requests of a file that validate_batch_file accepted, in file order: {"line",
    "custom_id", "request_id", "shard", "model", "body"}. Consecutive requests for the same model
    share a shard of at most shard_size; shards are numbered 0, 1, 2, ... across the batch. `body`
    is the parsed request, `model_dump(exclude_unset=True)`, which the endpoint's schema parses
    again unchanged. A line that does not pass (the file changed since) raises ValueError."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    schema = _schema(endpoint)
    shard = -1
    shard_model: str | None = None
    in_shard = 0
    with open(path, "rb") as fp:
        for line_no, raw in _lines(fp, max_line_bytes):
            if raw is not None and not raw.strip():
                continue
            try:
                line = _parse_line(raw, max_line_bytes)
                custom_id = line.get("custom_id")
                if not isinstance(custom_id, str) or not custom_id:
                    raise _Invalid("invalid_custom_id", "custom_id must be a non-empty string")
                request = _parse_body(line.get("body"), schema)
            except _Invalid as exc:
                raise ValueError(f"line {line_no} of the batch input file is invalid ({exc.code}): "
                                 f"{exc.message}") from None
            model = request.model   # type: ignore[attr-defined]
            if model != shard_model or in_shard >= shard_size:
                shard += 1
                shard_model = model
                in_shard = 0
            in_shard += 1
            yield {"line": line_no, "custom_id": custom_id, "request_id": new_batch_request_id(),
                   "shard": shard, "model": model, "body": request.model_dump(exclude_unset=True)}


def new_batch_request_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


# --- reading lines --------------------------------------------------------------------------------

def _lines(fp: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line without its end) for each line; None in place of a line longer than
    max_line_bytes, whose rest is skipped a bounded piece at a time. A final newline does not start
    another line. A UTF-8 byte order mark at the start of the file is dropped."""
    line_no = 0
    while True:
        data = fp.readline(max_line_bytes + 1)
        if not data:
            return
        line_no += 1
        if line_no == 1 and data.startswith(_BOM):
            data = data[len(_BOM):]
        if data.endswith(b"\n"):
            yield line_no, data[:-1].removesuffix(b"\r")
        elif len(data) <= max_line_bytes:
            yield line_no, data   # the last line, with no newline after it
        elif data.endswith(b"\r") and fp.peek(1)[:1] == b"\n":   # type: ignore[attr-defined]
            fp.read(1)   # exactly max_line_bytes, then CRLF
            yield line_no, data[:-1]
        else:
            del data
            while (piece := fp.readline(_SKIP_PIECE)) and not piece.endswith(b"\n"):
                pass
            yield line_no, None


def _parse_line(raw: bytes | None, max_line_bytes: int) -> dict[str, Any]:
    if raw is None:
        raise _Invalid("line_too_long", f"the line is longer than {max_line_bytes} bytes; shorten the "
                       "request or split it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid("invalid_utf8", f"the line is not valid UTF-8 (byte {exc.start + 1} of the line); "
                       "save the file as UTF-8") from None
    # No line deeper than MAX_JSON_DEPTH can have fewer opening brackets than that: most lines skip
    # the depth walk. One far deeper than Python's recursion limit makes json raise RecursionError.
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    try:
        value = json.loads(text)
    except RecursionError:
        raise _Invalid("invalid_json_line", f"the line's JSON is nested more than {MAX_JSON_DEPTH} "
                       "levels deep") from None
    except json.JSONDecodeError as exc:
        raise _Invalid("invalid_json_line", f"the line is not valid JSON: {exc.msg} (at character "
                       f"{exc.pos + 1}); each line must be one JSON object") from None
    if not isinstance(value, dict):
        raise _Invalid("invalid_json_line", f"each line must be a JSON object, got {json_kind(value)}")
    if deep and _depth_exceeds(value, MAX_JSON_DEPTH):
        raise _Invalid("invalid_json_line", f"the line's JSON is nested more than {MAX_JSON_DEPTH} "
                       "levels deep")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep (the line's object is level 1); iterative, so
    no Python recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


# --- checking a line ------------------------------------------------------------------------------

def _check_line(raw: bytes | None, schema: type[BaseModel], endpoint: str, seen: dict[str, int],
                line_no: int, max_line_bytes: int, max_model_len: int | None,
                models: Container[str] | None) -> None:
    line = _parse_line(raw, max_line_bytes)

    custom_id = line.get("custom_id")
    if custom_id is None:
        raise _Invalid("missing_custom_id", "custom_id is required: a string that identifies the "
                       "request in the output file", "custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _Invalid("invalid_custom_id", f"custom_id must be a non-empty string, got "
                       f"{json_kind(custom_id) if custom_id != '' else 'an empty string'}", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _Invalid("invalid_custom_id", f"custom_id must be at most {MAX_CUSTOM_ID_CHARS} characters, "
                       f"got {len(custom_id)}", "custom_id")
    first = seen.setdefault(custom_id, line_no)
    if first != line_no:
        raise _Invalid("duplicate_custom_id", f"custom_id {_quoted(custom_id)} is already used on line "
                       f"{first}; each request needs its own custom_id", "custom_id")

    method = line.get("method")
    if method != "POST":
        got = f"got {_quoted(method)}" if isinstance(method, str) else (
            "it is missing" if method is None else f"got {json_kind(method)}")
        raise _Invalid("invalid_method", f"method must be \"POST\"; {got}", "method")

    url = line.get("url")
    if url != endpoint:
        got = f"got {_quoted(url)}" if isinstance(url, str) else (
            "it is missing" if url is None else f"got {json_kind(url)}")
        raise _Invalid("mismatched_url", f"url must be the batch's endpoint \"{endpoint}\"; {got}", "url")

    request = _parse_body(line.get("body"), schema)
    model = request.model   # type: ignore[attr-defined]
    if models is not None and model not in models:
        raise _Invalid("model_not_found", f"the model {_quoted(model)} does not exist; GET /v1/models "
                       "lists the models served here", "body.model")
    if request.stream:   # type: ignore[attr-defined]
        raise _Invalid("invalid_request", "stream must be false or absent: batch requests are not "
                       "streamed", "body.stream")
    if max_model_len is not None:
        if isinstance(request, ChatCompletionRequest):
            max_tokens = request.resolved_max_tokens()
            param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        else:
            max_tokens = request.max_tokens   # type: ignore[attr-defined]
            param = "max_tokens"
        if max_tokens is not None and max_tokens > max_model_len:
            raise _Invalid("invalid_request", f"{param} ({max_tokens}) is more than the model's context "
                           f"length ({max_model_len}); lower it", f"body.{param}")


def _parse_body(body: Any, schema: type[BaseModel]) -> BaseModel:
    if body is None:
        raise _Invalid("invalid_request", "body is required: the request to send to the endpoint", "body")
    if not isinstance(body, dict):
        raise _Invalid("invalid_request", f"body must be a JSON object, got {json_kind(body)}", "body")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors(include_url=False)))
        raise _Invalid("invalid_request", message, f"body.{param}" if param else "body") from None


# --- helpers --------------------------------------------------------------------------------------

def _schema(endpoint: str) -> type[BaseModel]:
    try:
        return BATCH_ENDPOINTS[endpoint]
    except KeyError:
        raise ValueError(f"not a batch endpoint: {endpoint!r}; one of {', '.join(BATCH_ENDPOINTS)}") from None


def _error(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _quoted(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + '..."'
