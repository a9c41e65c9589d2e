"""Bearer API keys for /v1/*: checked in constant time against every configured key (no early exit that
would tell an attacker which key a prefix matches)."""
from __future__ import annotations

import hmac

from fastapi import Request

from app.errors import authentication_error


def key_matches(given: str, keys: list[str]) -> bool:
    given_bytes = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode())
    return matched


def require_api_key(request: Request) -> str | None:
    """The caller's key, or None when the API is open (no keys configured)."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise authentication_error("You didn't provide an API key; send it as 'Authorization: Bearer <key>'")
    if not key_matches(token.strip(), keys):
        raise authentication_error()
    return token.strip()
