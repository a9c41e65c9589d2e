"""The gateway through the official openai SDK, against a real worker process serving a tiny model."""
from __future__ import annotations

import openai
import pytest

from stack import MODEL_NAME


@pytest.fixture(scope="module")
def client(gateway, start_worker):
    start_worker("w-api").wait_registered()
    gateway.wait_for_workers(1)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    """The same model in an engine of this process: what the gateway's answers must equal (greedy)."""
    from engine import Engine, EngineConfig

    with Engine(EngineConfig(model=str(chat_model_dir), dtype="float32", device="cpu", policy="online-only",
                             kv_cache_bytes=4_000_000)) as engine:
        yield engine


def greedy(engine, prompt, max_tokens):
    from engine import SamplingParams

    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           request_class="online")[0]


MESSAGES = [{"role": "system", "content": "hello"}, {"role": "user", "content": "what is the capital of france"}]


def test_models_lists_what_workers_serve(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_completion_matches_the_engine_and_counts_usage(client, reference):
    expected = greedy(reference, MESSAGES, 12)
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == expected.num_prompt_tokens
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == expected.num_prompt_tokens + 12
    assert resp.id.startswith("chatcmpl-") and resp.model == MODEL_NAME


def test_streamed_chat_joins_to_the_same_answer_with_usage_last(client, reference):
    expected = greedy(reference, MESSAGES, 10)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_with_text_and_token_prompts(client, reference):
    expected = greedy(reference, "hello world", 6)
    resp = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == expected.text
    assert resp.usage.completion_tokens == 6
    streamed = client.completions.create(model=MODEL_NAME, prompt=[1, 5, 6, 7], max_tokens=5, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == greedy(reference, [1, 5, 6, 7], 5).text


def test_stop_string_ends_the_answer(client, reference):
    full = greedy(reference, MESSAGES, 12).text.split()
    stop = full[3]
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                          stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "stop"
    assert stop not in resp.choices[0].message.content.split()


def test_seeded_sampling_is_reproducible(client):
    def ask():
        return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              top_p=0.9, seed=1234, extra_body={"ignore_eos": True, "top_k": 20,
                                                                                 "min_tokens": 2}
                                              ).choices[0].message.content

    assert ask() == ask()
