"""Every error the gateway can answer with is OpenAI-shaped: our own OpenAIError, FastAPI's validation
errors (bad JSON, a body that is not an object), Starlette's 404/405, and crashes, which say nothing of
their cause."""
from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app import errors
from app.errors import OpenAIError, error_body, install_error_handlers

SECRET = "sk-secret-in-exception"


class Body(BaseModel):
    model: str


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/echo")
    def echo(body: Body) -> dict[str, str]:
        return {"model": body.model}

    @app.get("/v1/items")
    def items(limit: int = 10) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/v1/crash")
    def crash() -> None:
        raise RuntimeError(f"boom with {SECRET}")

    @app.get("/v1/missing-model")
    def missing_model() -> None:
        raise errors.model_not_found("gpt-9")

    @app.get("/v1/busy")
    def busy() -> None:
        raise errors.overloaded(retry_after_s=2)

    @app.get("/v1/key")
    def key() -> None:
        raise errors.authentication_error()

    @app.get("/v1/upstream")
    def upstream() -> None:
        raise errors.upstream_error()

    @app.get("/v1/teapot")
    def teapot() -> None:
        raise HTTPException(418, detail="no coffee here")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    # raise_server_exceptions=False: see the 500 a real client gets instead of the exception.
    return TestClient(_app(), raise_server_exceptions=False)


def error_of(resp: httpx.Response, status: int, type: str = "invalid_request_error") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type
    return body["error"]


def test_error_body_shape() -> None:
    assert error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}
    assert error_body("m", "t", "p", "c")["error"] == {"message": "m", "type": "t", "param": "p", "code": "c"}


def test_malformed_json(client: TestClient) -> None:
    resp = client.post("/v1/echo", content=b'{"model": ', headers={"content-type": "application/json"})
    error = error_of(resp, 400)
    assert error["param"] is None
    assert error["message"].startswith("could not parse the JSON body")
    assert "send a valid JSON object" in error["message"]


@pytest.mark.parametrize("content,says", [
    (b'["m"]', "must be a JSON object, got an array"),
    (b'"m"', "must be a JSON object, got a string"),
    (b'', "the request body is empty; send a JSON object"),
])
def test_body_not_an_object(client: TestClient, content: bytes, says: str) -> None:
    resp = client.post("/v1/echo", content=content, headers={"content-type": "application/json"})
    assert says in error_of(resp, 400)["message"]


def test_body_without_json_content_type(client: TestClient) -> None:
    resp = client.post("/v1/echo", content=b'{"model": "m"}', headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in error_of(resp, 400)["message"]


def test_validation_error_names_field(client: TestClient) -> None:
    error = error_of(client.post("/v1/echo", json={"model": 5}), 400)
    assert error["param"] == "model" and error["message"] == "model: Input should be a valid string (got 5)"
    error = error_of(client.get("/v1/items", params={"limit": "lots"}), 400)
    assert error["param"] == "limit" and error["message"].startswith("query parameter limit: ")


def test_unknown_route_is_404(client: TestClient) -> None:
    error = error_of(client.post("/v1/nope", json={}), 404)
    assert error["message"] == "Invalid URL (POST /v1/nope); no such endpoint"


def test_wrong_method_is_405(client: TestClient) -> None:
    resp = client.get("/v1/echo")
    error = error_of(resp, 405)
    assert error["message"] == "Method not allowed (GET /v1/echo); allowed: POST"
    assert resp.headers["allow"] == "POST"


def test_http_exception_keeps_its_detail(client: TestClient) -> None:
    assert error_of(client.get("/v1/teapot"), 418)["message"] == "no coffee here"


def test_crash_is_500_without_details(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        resp = client.get("/v1/crash")
    assert resp.status_code == 500
    assert resp.json() == error_body("internal server error", "server_error")
    assert SECRET not in resp.text and "Traceback" not in resp.text and "RuntimeError" not in resp.text
    # ...but the log has all of it, once.
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and SECRET in str(logged[0].exc_info[1])


def test_openai_errors(client: TestClient) -> None:
    error = error_of(client.get("/v1/missing-model"), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert "gpt-9" in error["message"] and "/v1/models" in error["message"]

    resp = client.get("/v1/busy")
    assert error_of(resp, 503, "server_error")["code"] == "overloaded"
    assert resp.headers["retry-after"] == "2"

    resp = client.get("/v1/key")
    assert error_of(resp, 401)["code"] == "invalid_api_key"   # OpenAI's type for a bad key
    assert resp.headers["www-authenticate"] == "Bearer"

    assert error_of(client.get("/v1/upstream"), 502, "server_error")["message"].startswith("The worker")


def test_openai_error_defaults() -> None:
    exc = OpenAIError("bad thing")
    assert (exc.status_code, exc.type, exc.param, exc.code) == (400, "invalid_request_error", None, None)
    assert exc.body() == error_body("bad thing", "invalid_request_error")
    assert errors.invalid_request("x", param="p").body()["error"]["param"] == "p"
    assert errors.overloaded(status_code=429).status_code == 429
