"""The OpenAI request models, through a small FastAPI app as the gateway will use them: what reaches the
engine, and the 400s (with `param` and a message saying what to change) for what does not; then the
response builders, checked against the openai SDK's own types."""
from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from app import openai_schemas as S
from app.errors import install_error_handlers


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    def chat(req: S.ChatCompletionRequest) -> dict[str, Any]:
        return {"prompt": req.engine_prompt(), "params": req.sampling_params(),
                "include_usage": req.include_usage()}

    @app.post("/v1/completions")
    def complete(req: S.CompletionRequest) -> dict[str, Any]:
        return {"prompt": req.engine_prompt(), "params": req.sampling_params(),
                "include_usage": req.include_usage()}

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(_app())


HI = [{"role": "user", "content": "Hi!"}]


def chat(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "m", "messages": HI} | body)


def complete(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "m", "prompt": "Once"} | body)


def bad(resp: httpx.Response, param: str | None, *says: str) -> str:
    """Assert an OpenAI-shaped 400 blaming `param` whose message contains each of `says`."""
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    for text in says:
        assert text in error["message"], error["message"]
    return error["message"]


# --- chat: what reaches the engine ---------------------------------------------------------------

def test_valid_chat_maps_to_engine_prompt_and_params(client: TestClient) -> None:
    resp = chat(client, messages=[{"role": "developer", "content": "Be brief."},
                                  {"role": "user", "content": "Hi!", "name": "ann"},
                                  {"role": "assistant", "content": "Hello."},
                                  {"role": "user", "content": "Capital of France?"}],
                temperature=0, top_p=0.9, max_tokens=32, stop="\n", seed=7, user="u-1",
                top_k=40, min_tokens=2, ignore_eos=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["prompt"] == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi!"},
                              {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "Capital of France?"}]
    assert body["params"] == {"max_tokens": 32, "temperature": 0.0, "top_p": 0.9, "top_k": 40, "seed": 7,
                              "stop": ["\n"], "ignore_eos": True, "min_tokens": 2}
    assert body["include_usage"] is False


def test_defaults_and_nulls_mean_openai_defaults(client: TestClient) -> None:
    defaults = {"max_tokens": None, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None,
                "stop": [], "ignore_eos": False, "min_tokens": 0}
    assert chat(client).json()["params"] == defaults
    nulls = dict.fromkeys(["temperature", "top_p", "stop", "seed", "max_tokens", "stream",
                           "stream_options", "user", "top_k", "min_tokens"])
    assert chat(client, **nulls).json()["params"] == defaults


def test_max_completion_tokens_takes_precedence(client: TestClient) -> None:
    assert chat(client, max_completion_tokens=9).json()["params"]["max_tokens"] == 9
    assert chat(client, max_tokens=9, max_completion_tokens=9).json()["params"]["max_tokens"] == 9
    assert chat(client, max_tokens=None, max_completion_tokens=5).json()["params"]["max_tokens"] == 5
    bad(chat(client, max_tokens=5, max_completion_tokens=7), "max_tokens",
        "disagree", "send only max_completion_tokens")


def test_text_content_parts_are_joined(client: TestClient) -> None:
    parts = [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}]
    resp = chat(client, messages=[{"role": "user", "content": parts}])
    assert resp.json()["prompt"] == [{"role": "user", "content": "Capital of France?"}]


def test_stream_options_need_stream(client: TestClient) -> None:
    bad(chat(client, stream_options={"include_usage": True}), "stream_options", "stream is true")
    resp = chat(client, stream=True, stream_options={"include_usage": True})
    assert resp.json()["include_usage"] is True
    assert chat(client, stream=True, stream_options={"include_obfuscation": False}).json()["include_usage"] is False


# --- chat: rejected requests ---------------------------------------------------------------------

@pytest.mark.parametrize("field,value,says", [
    ("max_tokens", True, "valid integer"),          # a bool is not an int
    ("max_tokens", 1.5, "valid integer"),
    ("temperature", "hot", 'got "hot"'),            # no string-to-number coercion
    ("temperature", "0.5", "valid number"),
    ("top_k", False, "valid integer"),
    ("stream", "yes", "valid boolean"),
    ("seed", "7", "valid integer"),
    ("model", 3, "valid string"),
])
def test_wrong_types_are_errors(client: TestClient, field: str, value: Any, says: str) -> None:
    message = bad(chat(client, **{field: value}), field, says)
    assert message.startswith(f"{field}: ")


@pytest.mark.parametrize("field,value,says", [
    ("max_tokens", 0, "greater than or equal to 1"),
    ("max_completion_tokens", -3, "greater than or equal to 1"),
    ("temperature", 2.5, "less than or equal to 2"),
    ("top_p", 0, "greater than 0"),
    ("top_k", -2, "greater than or equal to -1"),
    ("min_tokens", -1, "greater than or equal to 0"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
    ("stop", "", "must not be empty"),
    ("stop", 5, "a string or a list"),
])
def test_out_of_range_values(client: TestClient, field: str, value: Any, says: str) -> None:
    bad(chat(client, **{field: value}), field, f"{field}: ", says)


def test_min_tokens_above_max_tokens(client: TestClient) -> None:
    bad(chat(client, max_tokens=4, min_tokens=5), "min_tokens", "min_tokens (5) must not exceed max_tokens (4)")


def test_missing_and_empty_messages(client: TestClient) -> None:
    bad(client.post("/v1/chat/completions", json={"model": "m"}), "messages", "messages: this field is required")
    bad(client.post("/v1/chat/completions", json={"messages": HI}), "model", "model: this field is required")
    bad(chat(client, messages=[]), "messages", "at least one message")
    bad(chat(client, messages="Hi"), "messages", "messages: ", "valid list")


@pytest.mark.parametrize("content", ["", "   \n", [], [{"type": "text", "text": " "}]])
def test_empty_content(client: TestClient, content: Any) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "user", "content": content}]
    bad(chat(client, messages=messages), "messages", "messages[2].content: must not be empty")


@pytest.mark.parametrize("message,says", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]},
     "messages[0].content: part [0] has type 'image_url'; only text parts are supported"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content: part [0] must be"),
    ({"role": "user", "content": None}, "messages[0].content: must be a string or a list of text parts"),
    ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages[0].role: 'tool' messages are not supported"),
    ({"role": "robot", "content": "x"}, "messages[0].role: must be one of system, developer, user, assistant"),
    ({"role": "assistant", "content": "x", "tool_calls": [{"id": "c1"}]}, "tool_calls is not supported"),
    ({"role": "user", "content": "x", "colour": "red"}, "messages[0].colour: unrecognized request argument"),
])
def test_bad_messages(client: TestClient, message: dict[str, Any], says: str) -> None:
    bad(chat(client, messages=[message]), "messages", says)


def test_sdk_echoed_assistant_message_is_accepted(client: TestClient) -> None:
    # What `ChatCompletionMessage.model_dump()` sends back: tool fields present but null.
    echoed = {"role": "assistant", "content": "Paris.", "refusal": None, "tool_calls": None,
              "function_call": None, "audio": None, "annotations": None}
    resp = chat(client, messages=[*HI, echoed, {"role": "user", "content": "Thanks"}])
    assert resp.status_code == 200, resp.text
    assert resp.json()["prompt"][1] == {"role": "assistant", "content": "Paris."}


def test_unknown_field(client: TestClient) -> None:
    bad(chat(client, temprature=0.5), "temprature", "temprature: unrecognized request argument; remove it")


@pytest.mark.parametrize("field,value,says", [
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tool calling is not supported; remove tools"),
    ("tool_choice", "auto", "tool calling is not supported"),
    ("parallel_tool_calls", False, "tool calling is not supported"),
    ("n", 2, "only n=1 is supported"),
    ("n", True, "only n=1 is supported"),
    ("logprobs", True, "logprobs are not supported"),
    ("top_logprobs", 3, "top_logprobs is not supported"),
    ("response_format", {"type": "json_object"}, 'only response_format {"type": "text"}'),
    ("logit_bias", {"50256": -100}, "logit_bias is not supported"),
    ("presence_penalty", 0.5, "presence_penalty is not supported; remove it or set it to 0"),
    ("frequency_penalty", -1, "frequency_penalty is not supported"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio output is not supported"),
    ("modalities", ["text", "audio"], 'only modalities ["text"]'),
    ("prediction", {"type": "content", "content": "x"}, "predicted outputs are not supported"),
    ("store", True, "not stored"),
])
def test_unsupported_openai_fields_are_named(client: TestClient, field: str, value: Any, says: str) -> None:
    bad(chat(client, **{field: value}), field, says)


@pytest.mark.parametrize("field,value", [
    ("n", 1), ("logprobs", False), ("presence_penalty", 0), ("frequency_penalty", 0.0),
    ("response_format", {"type": "text"}), ("logit_bias", {}), ("tools", []), ("tool_choice", "none"),
    ("store", False), ("metadata", {"run": "a"}), ("modalities", ["text"]), ("user", "u-9"),
    ("top_logprobs", None),
])
def test_default_valued_openai_fields_are_accepted(client: TestClient, field: str, value: Any) -> None:
    resp = chat(client, **{field: value})
    assert resp.status_code == 200, resp.text
    assert resp.json()["params"]["temperature"] == 1.0


# --- legacy completions ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,expected", [
    ("Once upon", "Once upon"), (["Once upon"], "Once upon"), ([1, 2, 3], [1, 2, 3]), ([[4, 5]], [4, 5]),
])
def test_completion_prompts(client: TestClient, prompt: Any, expected: Any) -> None:
    resp = complete(client, prompt=prompt)
    assert resp.status_code == 200, resp.text
    assert resp.json()["prompt"] == expected


def test_completion_params(client: TestClient) -> None:
    assert complete(client).json()["params"]["max_tokens"] == 16   # OpenAI's default for completions
    assert complete(client, max_tokens=None).json()["params"]["max_tokens"] is None   # as many as fit
    params = complete(client, max_tokens=3, temperature=0, stop=["."], seed=1, top_k=-1, echo=False,
                      best_of=1, n=1, suffix=None, logprobs=None, user="u").json()["params"]
    assert params == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": 1,
                      "stop": ["."], "ignore_eos": False, "min_tokens": 0}


@pytest.mark.parametrize("body,param,says", [
    ({"prompt": ["a", "b"]}, "prompt", "only one prompt per request"),
    ({"prompt": [[1], [2]]}, "prompt", "only one prompt per request"),
    ({"prompt": ""}, "prompt", "prompt: must not be empty"),
    ({"prompt": []}, "prompt", "prompt: must not be empty"),
    ({"prompt": [1, True]}, "prompt", "token ids"),
    ({"prompt": [1, -2]}, "prompt", "token ids"),
    ({"prompt": 5}, "prompt", "a string or a list of token ids"),
    ({"echo": True}, "echo", "echo is not supported"),
    ({"logprobs": 2}, "logprobs", "logprobs are not supported"),
    ({"suffix": "end"}, "suffix", "suffix (insertion) is not supported"),
    ({"best_of": 3}, "best_of", "only best_of=1"),
    ({"n": 2}, "n", "only n=1"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ({"messages": HI}, "messages", "unrecognized request argument"),
])
def test_bad_completion_requests(client: TestClient, body: dict[str, Any], param: str, says: str) -> None:
    bad(complete(client, **body), param, says)


def test_sampling_params_are_what_the_engine_takes() -> None:
    pytest.importorskip("torch")   # importing engine/ brings torch; app/ itself never does
    from engine.sampling_params import SamplingParams

    req = S.ChatCompletionRequest.model_validate({"model": "m", "messages": HI, "max_tokens": 8,
                                                  "stop": "x", "top_k": 5, "min_tokens": 1})
    params = SamplingParams.from_dict(req.sampling_params())
    assert (params.max_tokens, params.stop, params.top_k, params.min_tokens) == (8, ["x"], 5, 1)
    completion = S.CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]})
    assert SamplingParams.from_dict(completion.sampling_params()).max_tokens == 16


# --- response builders ---------------------------------------------------------------------------

def test_chat_completion_shape() -> None:
    cid = S.new_completion_id("chat")
    assert cid.startswith("chatcmpl-") and S.new_completion_id("text").startswith("cmpl-")
    assert S.new_completion_id("chat") != cid
    body = S.chat_completion(cid, "smol", 1700000000, "Paris.", "stop", S.usage(12, 3))
    assert body == {
        "id": cid, "object": "chat.completion", "created": 1700000000, "model": "smol",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "Paris." and parsed.usage.total_tokens == 15


def test_chat_chunks_shape() -> None:
    cid, created = S.new_completion_id("chat"), S.now()
    first = S.chat_chunk(cid, "smol", created, first=True, include_usage=True)
    middle = S.chat_chunk(cid, "smol", created, content="Par", include_usage=True)
    last = S.chat_chunk(cid, "smol", created, finish_reason="length", include_usage=True)
    final = S.chat_usage_chunk(cid, "smol", created, S.usage(5, 2))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert middle["choices"][0]["delta"] == {"content": "Par"}
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert first["usage"] is None and "usage" not in S.chat_chunk(cid, "smol", created, content="x")
    assert final == {"id": cid, "object": "chat.completion.chunk", "created": created, "model": "smol",
                     "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    for chunk in (first, middle, last, final):
        assert chunk["object"] == "chat.completion.chunk"
        ChatCompletionChunk.model_validate(chunk)
    assert ChatCompletionChunk.model_validate(first).choices[0].delta.role == "assistant"


def test_text_completion_shapes() -> None:
    cid = S.new_completion_id("text")
    body = S.text_completion(cid, "smol", 1, " upon a time", "length", S.usage(2, 4))
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": " upon a time", "finish_reason": "length", "logprobs": None}]
    assert Completion.model_validate(body).usage.total_tokens == 6
    chunk = S.text_completion_chunk(cid, "smol", 1, text=" upon")
    assert chunk["choices"][0] == {"index": 0, "text": " upon", "finish_reason": None, "logprobs": None}
    Completion.model_validate(S.text_completion_chunk(cid, "smol", 1, finish_reason="stop"))
    usage_chunk = S.text_completion_usage_chunk(cid, "smol", 1, S.usage(2, 4))
    assert usage_chunk["choices"] == [] and Completion.model_validate(usage_chunk).usage.total_tokens == 6


def test_model_list_shape() -> None:
    body = S.model_list(["smol", "llama"], 1700000000)
    assert body == {"object": "list", "data": [
        {"id": "smol", "object": "model", "created": 1700000000, "owned_by": "conserve"},
        {"id": "llama", "object": "model", "created": 1700000000, "owned_by": "conserve"}]}
    assert [Model.model_validate(m).id for m in body["data"]] == ["smol", "llama"]


def test_openai_sdk_sees_param_and_message(client: TestClient) -> None:
    # The SDK as a client: it turns our 400 into BadRequestError with the fields users read.
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=client, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert caught.value.param == "n" and caught.value.type == "invalid_request_error"
    assert "only n=1 is supported" in caught.value.message
