"""The gateway's OpenAPI document as the gateway really answers: FastAPI documents a 422 for bad input, but
every error here is OpenAI-shaped (app/errors.py) and bad input is a 400. This rewrites the generated
document once: 422 becomes 400 with OpenAI's error object, the /v1 routes declare the Bearer key and the
errors they can give (401, 404, 413, 429, 502, 503), the upload describes its multipart form, the download
its bytes, a stream its events, and the generation requests what their validators take beyond the field
types (null for the default, a lone stop string, text parts, ...). Schemathesis runs against this document
(tests/serving/test_schemathesis.py)."""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from app.openai_schemas import _NULL_MEANS_DEFAULT, _ROLES, MAX_STOP_SEQUENCES

ERROR_SCHEMA = "ErrorResponse"
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}
_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
_ERROR_OBJECT = {
    "type": "object",
    "title": ERROR_SCHEMA,
    "description": "OpenAI's error object: what went wrong, in words, and the request field to blame.",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": _NULLABLE_STRING, "code": _NULLABLE_STRING},
    }},
}
_DESCRIPTIONS = {
    400: "Invalid request: the message says what to change and `param` names the field",
    401: "Missing or wrong API key (when the gateway has keys: CONSERVE_API_KEYS)",
    404: "No such model, file, batch or endpoint",
    413: "The upload is larger than CONSERVE_MAX_UPLOAD_BYTES",
    429: "Every worker of the model is at capacity; retry after Retry-After",
    502: "A worker failed the request",
    503: "No worker of the model is alive or reachable; retry shortly",
}
_GENERATION = {"/v1/chat/completions", "/v1/completions"}
_BEARER = "BearerKey"


def install_openapi(app: FastAPI) -> None:
    """Serve the corrected document at /openapi.json (and in /docs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # FastAPI's own generator (it caches its document in app.openapi_schema), then ours over it.
            app.openapi_schema = describe_reality(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def describe_reality(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of FastAPI's document with the gateway's real error responses."""
    schema = copy.deepcopy(schema)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas[ERROR_SCHEMA] = _ERROR_OBJECT
    components.setdefault("securitySchemes", {})[_BEARER] = {
        "type": "http", "scheme": "bearer",
        "description": "One of CONSERVE_API_KEYS; any value while the gateway has none"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _error(400)
            if path.startswith("/v1/"):
                _describe_v1(path, method, operation, responses)
    _document_accepted_inputs(schemas)
    # FastAPI's validation-error schemas are no longer referenced.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return schema


def _describe_v1(path: str, method: str, operation: dict[str, Any], responses: dict[str, Any]) -> None:
    operation["security"] = [{_BEARER: []}]
    statuses = [401]
    if path in _GENERATION:
        statuses += [404, 429, 502, 503]   # model_not_found; every worker busy; a worker failed; none alive
        responses["200"]["content"] = {
            "application/json": {"schema": {"type": "object"}},
            # With "stream": true. Before OpenAPI 3.2 a stream's schema describes each event: its data is a
            # JSON chunk, an error object (the worker failed mid-stream) or, last, [DONE].
            "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                             "properties": {"data": {"type": "string"}}}}}
    if "{" in path or (path == "/v1/batches" and method == "post"):
        statuses.append(404)   # an unknown id (for a batch: its input file)
    if path == "/v1/files" and method == "post":
        statuses += [400, 413]
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "JSONL, one request a line"},
                           "purpose": {"type": "string", "enum": ["batch"]}}}}}}
    if path == "/v1/files/{file_id}/content":
        responses["200"]["content"] = {"application/octet-stream": {"schema": {"type": "string",
                                                                               "format": "binary"}}}
    for status in statuses:
        responses.setdefault(str(status), _error(status))


def _error(status: int) -> dict[str, Any]:
    return {"description": _DESCRIPTIONS[status], "content": {"application/json": {"schema": _ERROR_REF}}}


def _document_accepted_inputs(schemas: dict[str, Any]) -> None:
    """What the request models take and refuse beyond their field types (openai_schemas.py: validators), as
    OpenAI documents it: null for "the default", a lone stop string, a prompt as a batch of one, message content
    as text parts; at least one message, known roles, no empty text."""
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    text = {"type": "string", "minLength": 1}
    chat = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    if "messages" in chat:
        chat["messages"]["minItems"] = 1
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schemas.get(name, {}).get("properties", {})
        if "stop" in properties:
            properties["stop"] = _keep_labels(properties["stop"], {"anyOf": [
                text, {"type": "array", "items": text, "maxItems": MAX_STOP_SEQUENCES}]})
        for field in _NULL_MEANS_DEFAULT:
            if field in properties and not _nullable(properties[field]):
                field_schema = properties[field]
                labels = {k: field_schema.pop(k) for k in ("title", "default", "description") if k in field_schema}
                properties[field] = {"anyOf": [field_schema, {"type": "null"}], **labels}
    prompt = schemas.get("CompletionRequest", {}).get("properties", {})
    if "prompt" in prompt:
        prompt["prompt"] = _keep_labels(prompt["prompt"], {"anyOf": [
            text, token_ids,
            {"type": "array", "items": {"anyOf": [text, token_ids]}, "minItems": 1, "maxItems": 1,
             "description": "a batch of one prompt"}]})
    message = schemas.get("ChatMessage", {}).get("properties", {})
    if "role" in message:
        message["role"] = _keep_labels(message["role"], {"type": "string", "enum": list(_ROLES)})
    if "content" in message:
        part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
        message["content"] = _keep_labels(message["content"], {"anyOf": [
            {"type": "string", "pattern": r"\S", "description": "not only whitespace"},
            {"type": "array", "items": part, "minItems": 1}]})


def _nullable(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null" or any(s.get("type") == "null" for s in schema.get("anyOf", []))


def _keep_labels(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return new | {k: old[k] for k in ("title", "default", "description") if k in old}
