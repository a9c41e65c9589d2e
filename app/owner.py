"""Who owns a file or batch: a hash of the API key that created it (keys themselves are never stored), or
None when the API is open. Every read filters by it, so one key never sees another key's jobs."""
from __future__ import annotations

import hashlib

from fastapi import Depends

from app.auth import require_api_key


def owner_of(api_key: str | None) -> str | None:
    if api_key is None:
        return None
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def current_owner(api_key: str | None = Depends(require_api_key)) -> str | None:
    return owner_of(api_key)
