"""Receives a multipart/form-data upload (OpenAI's `POST /v1/files`: a `file` part and a `purpose` field) as a
stream: the file part goes straight to disk chunk by chunk and the upload is refused the moment it passes the
size limit, so neither memory nor disk can be filled by one request."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import OpenAIError, invalid_request
from app.file_storage import FileStorage

MAX_FIELD_BYTES = 1024  # the form's plain fields (purpose) are tiny
MAX_FILENAME_CHARS = 255


@dataclass
class Upload:
    filename: str | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


async def receive_upload(request: Request, storage: FileStorage, file_id: str, max_bytes: int) -> Upload:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise invalid_request("upload the file as multipart/form-data with a 'file' part and a 'purpose' field")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise _too_large(max_bytes)

    upload = Upload()
    state: dict = {"headers": {}, "name": None, "field": bytearray(), "header_field": b"", "header_value": b"",
                   "ended": False}
    too_large = False

    with storage.writer(file_id) as out:
        def on_header_field(data: bytes, start: int, end: int) -> None:
            state["header_field"] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            state["header_value"] += data[start:end]

        def on_header_end() -> None:
            state["headers"][state["header_field"].lower()] = state["header_value"]
            state["header_field"], state["header_value"] = b"", b""

        def on_headers_finished() -> None:
            _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
            state["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
            if state["name"] == "file":
                filename = disposition.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
                # Display only (never a path): keep the last path component, printable, bounded.
                filename = filename.replace("\\", "/").rsplit("/", 1)[-1]
                upload.filename = "".join(c for c in filename if c.isprintable())[:MAX_FILENAME_CHARS] or "upload.jsonl"

        def on_part_data(data: bytes, start: int, end: int) -> None:
            nonlocal too_large
            if state["name"] == "file":
                upload.size += end - start
                if upload.size > max_bytes:
                    too_large = True
                    return
                out.write(data[start:end])
            else:
                state["field"] += data[start:end]
                if len(state["field"]) > MAX_FIELD_BYTES:
                    raise invalid_request(f"form field '{state['name']}' is too long")

        def on_part_end() -> None:
            if state["name"] != "file" and state["name"]:
                upload.fields[state["name"]] = state["field"].decode("utf-8", "replace")
            state["headers"], state["name"], state["field"] = {}, None, bytearray()

        def on_end() -> None:
            state["ended"] = True

        parser = MultipartParser(params[b"boundary"], callbacks={
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end})
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if too_large:
                    raise _too_large(max_bytes)  # leaving the writer discards the partial file
            parser.finalize()
        except MultipartParseError as exc:
            raise invalid_request(f"malformed multipart body: {exc}") from exc
        # The parser takes a body that stops short of its closing boundary as if it were whole; so would we,
        # and keep a truncated file.
        if not state["ended"]:
            raise invalid_request("malformed multipart body: it ends before the closing boundary "
                                  f"(--{params[b'boundary'].decode('latin-1')}--); the upload is incomplete")
        if upload.filename is None:
            raise invalid_request("the upload has no 'file' part", param="file")
    return upload


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(f"the file is larger than the {max_bytes:,}-byte limit (CONSERVE_MAX_UPLOAD_BYTES)",
                       status_code=413, param="file", code="file_too_large")
