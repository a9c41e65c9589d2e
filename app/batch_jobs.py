"""Creating a batch from an uploaded file: shared by the API (`POST /v1/batches`) and the dashboard's upload."""
from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy.orm import Session

from app.batch_store import create_batch, get_file
from app.db import utcnow
from app.errors import invalid_request, not_found
from app.file_storage import is_file_id
from app.models import Batch

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def create_batch_for_file(session: Session, owner: str | None, input_file_id: str, endpoint: str,
                          completion_window: str = "24h", metadata: dict[str, str] | None = None) -> Batch:
    """A new batch in `validating` (the caller starts its validation); OpenAIError for a file that is not
    the caller's, not a batch input, or an endpoint or window the platform does not offer."""
    file = get_file(session, input_file_id, owner) if is_file_id(input_file_id) else None
    if file is None:
        raise not_found(f"No such File object: {input_file_id}", param="input_file_id")
    if file.purpose != "batch":
        raise invalid_request(f"file {file.id} has purpose {file.purpose!r}; upload it with purpose 'batch'",
                              param="input_file_id")
    if endpoint not in ENDPOINTS:
        raise invalid_request(f"endpoint must be one of {list(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    if completion_window not in COMPLETION_WINDOWS:
        raise invalid_request(f"completion_window must be one of {list(COMPLETION_WINDOWS)}",
                              param="completion_window")
    now = utcnow()
    return create_batch(session, batch_id="batch_" + secrets.token_hex(12), owner=owner, endpoint=endpoint,
                        input_file_id=file.id, completion_window=completion_window, metadata=metadata,
                        expires_at=now + COMPLETION_WINDOWS[completion_window], now=now)
