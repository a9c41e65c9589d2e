"""OpenAI-shaped errors for the gateway: every failure, ours or the framework's, reaches the client as
{"error": {"message", "type", "param", "code"}} with a message that says what to change, because the
OpenAI SDKs and their users read exactly those fields."""
from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# How many validation problems one message lists; the rest would only bury the first.
_MAX_LISTED_ERRORS = 5
# Where FastAPI says a request value came from; the path after it is what the client wrote.
_SOURCES = {"body", "query", "path", "header", "cookie"}


class OpenAIError(Exception):
    """An error the client should see as is: raise it anywhere in a route."""

    def __init__(self, message: str, *, status_code: int = 400, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status_code=400, param=param, code=code)


def authentication_error(message: str = "Incorrect API key provided; send it as 'Authorization: Bearer <key>'",
                         code: str | None = "invalid_api_key") -> OpenAIError:
    # OpenAI answers a missing or wrong key with 401 and type invalid_request_error (not a type of its own).
    return OpenAIError(message, status_code=401, code=code,
                       headers={"WWW-Authenticate": "Bearer"})


def permission_denied(message: str) -> OpenAIError:
    return OpenAIError(message, status_code=403)


def not_found(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status_code=404, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    return not_found(f"The model '{model}' does not exist; GET /v1/models lists the models served here",
                     param="model", code="model_not_found")


def overloaded(message: str = "The server is overloaded; retry shortly", *, status_code: int = 503,
               retry_after_s: int | None = None) -> OpenAIError:
    # 429 and 503 are both retried by the OpenAI SDKs, which honour Retry-After.
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return OpenAIError(message, status_code=status_code, type=SERVER_ERROR, code="overloaded", headers=headers)


def upstream_error(message: str = "The worker serving this model failed; retry the request",
                   *, status_code: int = 502) -> OpenAIError:
    return OpenAIError(message, status_code=status_code, type=SERVER_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error response OpenAI-shaped. Call it once, before the app serves."""
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # A route that crashes is caught by this middleware (which sits inside Starlette's outermost
    # ServerErrorMiddleware), logged once and answered with a bare 500. The Exception handler is the
    # fallback for middleware added later, outside it; the server logs those itself.
    app.add_middleware(_CatchAll)
    app.add_exception_handler(Exception, _unhandled_fallback)


def _json(status_code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers=headers)


async def _openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return _json(exc.status_code, exc.body(), exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation_errors(list(exc.errors()))
    return _json(400, error_body(message, INVALID_REQUEST, param))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers) if exc.headers else {}
    if status == 405 and (allowed := _allowed_methods(request)):
        headers = {k: v for k, v in headers.items() if k.lower() != "allow"} | {"Allow": allowed}
    default_phrase = _phrase(status)
    message = exc.detail if isinstance(exc.detail, str) and exc.detail != default_phrase else None
    if message is None:
        where = f"{request.method} {request.url.path}"
        if status == 404:
            message = f"Invalid URL ({where}); no such endpoint"
        elif status == 405:
            allowed = next((v for k, v in headers.items() if k.lower() == "allow"), None)
            message = f"Method not allowed ({where})" + (f"; allowed: {allowed}" if allowed else "")
        else:
            message = default_phrase or f"HTTP {status}"
    kind = SERVER_ERROR if status >= 500 else INVALID_REQUEST
    return _json(status, error_body(message, kind), headers or None)


def _allowed_methods(request: Request) -> str:
    """Every method the request's path answers to. Starlette's 405 names only the methods of the first route
    whose path matched, and FastAPI makes one route per method (GET /v1/files, POST /v1/files), so its Allow
    header left out the others. Each method is tried against the routes (included routers nest theirs)."""
    routes = request.app.router.routes
    return ", ".join(method for method in _METHODS
                     if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes))


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def _unhandled_fallback(request: Request, exc: Exception) -> JSONResponse:
    return _json(500, _INTERNAL)


_INTERNAL = error_body("internal server error", SERVER_ERROR)


class _CatchAll:
    """Turn an exception escaping a route into a 500 without its text: tracebacks can leak prompts,
    paths and keys. Once a response has started (a stream) there is nothing left to answer with, so
    the exception goes on to the server, which drops the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await _json(500, _INTERNAL)(scope, receive, send)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message for pydantic/FastAPI errors, and the top-level field to blame (OpenAI's
    `param`). Our schemas may name the field themselves in the error's ctx["param"]."""
    if not errors:
        return "invalid request", None
    messages = [_describe(e) for e in errors[:_MAX_LISTED_ERRORS]]
    if len(errors) > _MAX_LISTED_ERRORS:
        messages.append(f"and {len(errors) - _MAX_LISTED_ERRORS} more problem(s)")
    return "; ".join(messages), _param_of(errors[0])


def _split(loc: tuple[Any, ...]) -> tuple[str, list[Any]]:
    """("body", "messages", 2, "content") -> ("body", ["messages", 2, "content"])."""
    if loc and loc[0] in _SOURCES:
        return str(loc[0]), list(loc[1:])
    return "body", list(loc)


def _param_of(error: dict[str, Any]) -> str | None:
    ctx = error.get("ctx") or {}
    if ctx.get("param"):
        return str(ctx["param"])
    if error.get("type") == "json_invalid":
        return None
    _, path = _split(tuple(error.get("loc", ())))
    return path[0] if path and isinstance(path[0], str) else None


def _path_text(path: list[Any]) -> str:
    # messages[2].content, as the OpenAI API writes it
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    loc = tuple(error.get("loc", ()))
    ctx = error.get("ctx") or {}
    raw = error.get("input")
    msg = str(error.get("msg", "invalid value"))
    if kind == "json_invalid":
        position = f" (at character {loc[1]})" if len(loc) > 1 else ""
        return (f"could not parse the JSON body: {ctx.get('error', 'invalid JSON')}{position}; "
                "send a valid JSON object")
    if ctx.get("param"):
        return msg   # our schemas' cross-field checks word the whole message
    source, path = _split(loc)
    if not path:
        if kind == "missing":
            return "the request body is empty; send a JSON object"
        if isinstance(raw, (bytes, bytearray)):
            return "the request body must be JSON, sent with the header 'Content-Type: application/json'"
        return f"the request body must be a JSON object, got {json_kind(raw)}"
    where = _path_text(path) if source == "body" else f"{source} parameter {_path_text(path)}"
    if kind == "extra_forbidden":
        return f"{where}: unrecognized request argument; remove it"
    if kind == "missing":
        return f"{where}: this field is required"
    if kind in ("model_attributes_type", "model_type", "dict_type"):
        return f"{where}: must be a JSON object{_shown(raw)}"
    if msg.startswith("Value error, "):
        return f"{where}: {msg[len('Value error, '):]}"
    return f"{where}: {msg}{_shown(raw)}"


def _shown(value: Any) -> str:
    """The offending value, when short enough to help ("temperature: ... (got "hot")")."""
    if isinstance(value, (dict, list)) and value:
        return ""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return ""
    return f" (got {text})" if len(text) <= 60 else ""


def json_kind(value: Any) -> str:
    """How to name a JSON value's type in a message ("an object", "a string", ...)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__


def _phrase(status: int) -> str | None:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return None
