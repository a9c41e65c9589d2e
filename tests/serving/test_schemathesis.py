"""Schemathesis against the gateway's own OpenAPI document (what /openapi.json serves): requests generated from it,
valid and invalid, reach a real gateway with a real worker behind it, and every answer is one the document declares:
never a 5xx, every error in OpenAI's shape {"error": {"message", "type", "param", "code"}}. Generated max_tokens
can be huge; the worker ends every request at its 512-token context, so none runs long. Multipart uploads and
streams get hand-written cases below."""
from __future__ import annotations

import copy

import httpx
import pytest
import schemathesis

from app.main import create_app
from stack import MODEL_NAME, GatewayThread, gateway_settings

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_ROUTES = r"^/v1/(chat/completions|completions|models|models/\{model_id\}|batches.*|files|files/\{file_id\})$"


def fuzzing_schema() -> dict:
    """The gateway's document, with generation requests naming the served model: any other name is a 404 at
    the gateway, and the point is to get past it to the worker's own checks (the document cannot know which
    models a deployment serves)."""
    document = copy.deepcopy(create_app(gateway_settings("sqlite://")).openapi())
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        document["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [MODEL_NAME]}
    return document


# At most 30 generated requests per operation (plus Schemathesis's explicit and coverage cases), the same ones
# every run; the key goes where the document declares it (BearerKey), so cases that leave it out stay without it.
CONFIG = schemathesis.Config.from_dict({
    "auth": {"openapi": {"BearerKey": {"bearer": KEY}}},
    "generation": {"max-examples": 30, "deterministic": True},
    "request-timeout": 60,
})
schema = (schemathesis.openapi.from_dict(fuzzing_schema(), config=CONFIG)
          .include(path_regex=JSON_ROUTES).exclude(method="POST", path="/v1/files"))


@pytest.fixture(scope="module")
def platform(database_url, broker_url, files_dir, start_worker):
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir,
                                       api_keys=[KEY])).start()
    start_worker("w-fuzz").wait_registered()
    g.wait_for_workers(1)
    yield g
    g.stop()


def assert_openai_error(content_type: str, body) -> dict:
    assert content_type.startswith("application/json"), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    return error


@schema.parametrize()
def test_generated_requests_get_documented_answers_and_openai_shaped_errors(case, platform):
    response = case.call(base_url=platform.url)
    # The document gives types and bounds; the gateway and the worker also refuse what they cannot do (a prompt
    # past the context, min_tokens past max_tokens, 1.0 where an integer is due): a schema-valid 400 is fine here.
    case.validate_response(response, transport_kwargs={"base_url": platform.url},
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response.headers["content-type"][0], response.json())


def test_served_document_declares_400_and_the_openai_error_shape_never_422(platform):
    document = httpx.get(f"{platform.url}/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == error_ref, (method, path, status)
            if path.startswith("/v1/"):
                assert {"401"} <= set(responses) and operation["security"] == [{"BearerKey": []}], (method, path)
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert {"400", "401", "404", "429", "503"} <= set(document["paths"][path]["post"]["responses"])
    assert "HTTPValidationError" not in document["components"]["schemas"]


# ---- hand-written: the routes generated requests do not cover ------------------------------------------------

@pytest.fixture(scope="module")
def api(platform):
    with httpx.Client(base_url=f"{platform.url}/v1", headers=AUTH, timeout=30) as client:
        yield client


def assert_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return assert_openai_error(resp.headers.get("content-type", ""), resp.json())


BOUNDARY = "conserve-test-boundary"
LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def form(*parts: bytes, closed: bool = True) -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if closed else b"")


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def file_part(content: bytes, filename: str = "in.jsonl") -> bytes:
    return (f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode() + content


def post_form(api, body: bytes, content_type: str | None = f"multipart/form-data; boundary={BOUNDARY}"):
    headers = {"content-type": content_type} if content_type is not None else {}
    return api.post("/files", content=body, headers=headers)


@pytest.mark.parametrize("content_type", [
    None,
    "application/json",
    "text/plain",
    "multipart/form-data",                       # no boundary
    "multipart/form-data; boundary=",            # an empty one
    "multipart/mixed; boundary=" + BOUNDARY,
    "application/x-www-form-urlencoded",
])
def test_upload_without_a_usable_multipart_content_type_is_400(api, content_type, files_dir):
    before = sorted(files_dir.iterdir())
    body = form(field("purpose", b"batch"), file_part(LINE))
    assert_error(post_form(api, body, content_type), 400)
    assert sorted(files_dir.iterdir()) == before


@pytest.mark.parametrize("body", [
    pytest.param(form(field("purpose", b"batch"), file_part(LINE), closed=False), id="no-closing-boundary"),
    pytest.param(form(field("purpose", b"batch"), file_part(LINE))[:-40], id="cut-inside-the-file-part"),
    pytest.param(form(field("purpose", b"batch"))[:20], id="cut-inside-the-first-headers"),
    pytest.param(b"--another-boundary\r\n" + file_part(LINE) + b"\r\n--another-boundary--\r\n", id="wrong-boundary"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"not a multipart body at all", id="garbage"),
])
def test_malformed_or_truncated_multipart_body_is_400_and_stores_nothing(api, body, files_dir):
    before = sorted(files_dir.iterdir())
    assert_error(post_form(api, body), 400)
    assert sorted(files_dir.iterdir()) == before


def test_upload_without_a_file_part_is_400_naming_file(api):
    error = assert_error(post_form(api, form(field("purpose", b"batch"))), 400)
    assert error["param"] == "file"


def test_upload_with_a_huge_purpose_field_is_400(api, files_dir):
    before = sorted(files_dir.iterdir())
    error = assert_error(post_form(api, form(field("purpose", b"b" * 5_000_000), file_part(LINE))), 400)
    assert "too long" in error["message"]
    assert sorted(files_dir.iterdir()) == before


def test_upload_without_the_key_is_401_in_openai_shape(platform):
    resp = httpx.post(f"{platform.url}/v1/files", content=form(field("purpose", b"batch"), file_part(LINE)),
                      headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert_error(resp, 401)


def test_well_formed_upload_is_accepted(api):
    resp = post_form(api, form(field("purpose", b"batch"), file_part(LINE)))
    assert resp.status_code == 200, resp.text
    assert resp.json()["bytes"] == len(LINE)


@pytest.mark.parametrize("depth", [900, 100_000])   # under and far over Python's recursion limit
@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/batches"])
def test_deeply_nested_json_bodies_are_400(api, path, depth):
    body = '{"model": "%s", "user": %s}' % (MODEL_NAME, "[" * depth + "]" * depth)
    assert_error(api.post(path, content=body, headers={"content-type": "application/json"}), 400)


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4} | fields


@pytest.mark.parametrize("body", [
    chat(stream=True, stream_options={"include_usage": "yes"}),
    chat(stream=True, max_tokens=0),
    chat(stream="true"),
    chat(stream=True, n=3),
    # a prompt past the context: refused by the worker, before any event
    chat(stream=True, messages=[{"role": "user", "content": " ".join(["hello"] * 600)}]),
    chat(stream=True, model="no-such-model"),
])
def test_bad_streaming_requests_get_an_openai_error_instead_of_a_stream(api, body):
    with api.stream("POST", "/chat/completions", json=body) as resp:
        resp.read()
    assert 400 <= resp.status_code < 500 and not resp.headers["content-type"].startswith("text/event-stream")
    assert_openai_error(resp.headers["content-type"], resp.json())


def test_streams_end_with_done_and_the_gateway_still_serves_after_the_fuzzing(api):
    with api.stream("POST", "/completions", json={"model": MODEL_NAME, "prompt": "hello", "max_tokens": 3,
                                                   "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    assert api.post("/chat/completions", json=chat()).status_code == 200
