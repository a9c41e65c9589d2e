"""Who is looking at the dashboard. Browsers cannot send a Bearer header on a plain link, so the keys the
person typed at /ui/login travel in HttpOnly, SameSite=Strict cookies: the API key (jobs pages; needed only
when CONSERVE_API_KEYS is set) and the admin key (admin page; always needed, CONSERVE_ADMIN_KEY)."""
from __future__ import annotations

import hmac

from fastapi import Request

from app.auth import key_matches
from app.owner import owner_of

API_COOKIE = "conserve_key"
ADMIN_COOKIE = "conserve_admin"


class LoginRequired(Exception):
    """The page needs a key the browser has not presented; answered with the login page (401)."""

    def __init__(self, admin: bool, message: str):
        super().__init__(message)
        self.admin = admin
        self.message = message


def ui_owner(request: Request) -> str | None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return None
    key = request.cookies.get(API_COOKIE, "")
    if not key or not key_matches(key, keys):
        raise LoginRequired(False, "Enter an API key to see its jobs.")
    return owner_of(key)


def is_admin(request: Request) -> bool:
    admin_key = request.app.state.settings.admin_key
    if not admin_key:
        return False
    given = request.cookies.get(ADMIN_COOKIE, "")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        given = token.strip()
    return hmac.compare_digest(given.encode(), admin_key.encode())


def require_admin(request: Request) -> None:
    if not request.app.state.settings.admin_key:
        raise LoginRequired(True, "The admin view is off: start the gateway with CONSERVE_ADMIN_KEY set.")
    if not is_admin(request):
        raise LoginRequired(True, "The admin view needs the admin key.")
