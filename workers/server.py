"""The worker's internal HTTP endpoint: the gateway sends online generation here and reads the outputs back as
they come (one JSON object per line). OpenAI formatting, keys and routing are the gateway's business."""
from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from engine.errors import InvalidRequestError
from workers.engine_host import EngineHost

NDJSON = "application/x-ndjson"


def create_worker_app(host: EngineHost, internal_token: str | None = None) -> FastAPI:
    app = FastAPI(title="ConServe worker", docs_url=None, redoc_url=None, openapi_url=None)

    def authorised(request: Request) -> bool:
        if internal_token is None:
            return True
        given = request.headers.get("x-conserve-internal-token", "")
        return secrets.compare_digest(given.encode(), internal_token.encode())

    @app.get("/internal/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": host.model_name, "max_model_len": host.max_model_len}

    @app.post("/internal/generate")
    async def generate(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "wrong or missing internal token", "authentication_error")
        try:
            body = await request.json()
            prompt, params = body["prompt"], body.get("params", {})
            request_class = body.get("request_class", "online")
            if not isinstance(params, dict):
                raise InvalidRequestError("params must be an object")
            stream = host.submit(prompt, params, request_class, body.get("request_id"))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:  # not UTF-8: not JSON
            return _error(400, f"malformed internal request: {exc}", "invalid_request_error")
        except InvalidRequestError as exc:
            return _error(400, str(exc), "invalid_request_error")

        async def lines():
            async for event in host.events(stream, request_class):
                yield json.dumps(event, ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type=NDJSON)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(host.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status)
