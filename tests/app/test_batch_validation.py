"""Batch input files checked line by line as OpenAI checks them when a batch is created (each problem
with its code, line and parameter), read in bounded pieces whatever the file holds; then the second
pass that hands the requests out in shards per model."""
from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from app.batch_validation import (
    MAX_ERRORS,
    MAX_JSON_DEPTH,
    iter_batch_requests,
    validate_batch_file,
)
from app.openai_schemas import ChatCompletionRequest, CompletionRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_line(custom_id: str = "req-1", model: str = "m", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": "Hi"}], **body}}


def completion_line(custom_id: str = "req-1", model: str = "m", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": COMPLETIONS,
            "body": {"model": model, "prompt": "Once upon a time", **body}}


def write_lines(path: Path, lines: list[Any], *, end: str = "\n") -> Path:
    path.write_bytes("".join((json.dumps(x) if not isinstance(x, str) else x) + end
                             for x in lines).encode())
    return path


def only_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(errors) == 1, errors
    return errors[0]


# --- valid files ------------------------------------------------------------------------------------

def test_a_valid_chat_file_has_no_errors(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line(f"r{i}") for i in range(3)])
    assert validate_batch_file(path, CHAT) == []


def test_a_valid_completions_file_has_no_errors(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [completion_line("a"), completion_line("b", prompt=[1, 2, 3])])
    assert validate_batch_file(path, COMPLETIONS) == []


def test_last_line_without_a_newline_crlf_line_ends_and_a_bom_are_accepted(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps(chat_line(f"r{i}")) for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    assert validate_batch_file(path, CHAT) == []
    assert [r["line"] for r in iter_batch_requests(path, CHAT, 10)] == [1, 2, 3]


def test_blank_lines_in_the_middle_and_at_the_end_are_skipped_but_counted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(chat_line("a")) + "\n\n   \n" + json.dumps(chat_line("b", stream=True))
                    + "\n\n")
    error = only_error(validate_batch_file(path, CHAT))
    assert error["line"] == 4   # blank lines still count toward line numbers


def test_a_line_of_exactly_the_byte_limit_is_accepted(tmp_path):
    base = json.dumps(chat_line("a", user=""))
    limit = 300
    line = json.dumps(chat_line("a", user="u" * (limit - len(base))))
    assert len(line.encode()) == limit
    path = tmp_path / "in.jsonl"
    path.write_text(line + "\n")
    assert validate_batch_file(path, CHAT, max_line_bytes=limit) == []
    path.write_text(line + "\r\n")
    assert validate_batch_file(path, CHAT, max_line_bytes=limit) == []
    path.write_text(line)
    assert validate_batch_file(path, CHAT, max_line_bytes=limit) == []
    assert only_error(validate_batch_file(path, CHAT, max_line_bytes=limit - 1))["code"] == "line_too_long"


def test_a_big_valid_file_is_streamed_with_bounded_memory(tmp_path):
    path = tmp_path / "in.jsonl"
    prompt = "Summarise this text. " * 25
    with open(path, "w") as fp:
        for i in range(20_000):
            line = chat_line(f"request-{i}", model="m" if i < 10_000 else "n", max_tokens=8)
            line["body"]["messages"][0]["content"] = prompt
            fp.write(json.dumps(line) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        errors = validate_batch_file(path, CHAT)
        _, peak_validate = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        count = sum(1 for _ in iter_batch_requests(path, CHAT, 1000))
        _, peak_iterate = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert errors == []
    assert count == 20_000
    # The custom_id index is all that grows: a small fraction of the file.
    assert size > 10_000_000
    assert peak_validate < size / 4, (peak_validate, size)
    assert peak_iterate < 1_000_000, peak_iterate


# --- one error code each, with its line -------------------------------------------------------------

def test_an_empty_file_is_reported_once_for_the_whole_file(tmp_path):
    for content in (b"", b"\n", b"\n  \n\r\n"):
        path = tmp_path / "in.jsonl"
        path.write_bytes(content)
        error = only_error(validate_batch_file(path, CHAT))
        assert error["code"] == "empty_file"
        assert error["line"] is None


def test_a_huge_single_line_is_rejected_fast_with_bounded_memory(tmp_path):
    path = tmp_path / "in.jsonl"
    line_size = 50 * 1024 * 1024
    with open(path, "wb") as fp:
        piece = b"a" * (1024 * 1024)
        for _ in range(line_size // len(piece)):
            fp.write(piece)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        errors = validate_batch_file(path, CHAT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    error = only_error(errors)
    assert error["code"] == "line_too_long"
    assert error["line"] == 1
    assert peak < 5 * 1024 * 1024, peak   # about the 1 MB line limit, never the 50 MB line
    assert elapsed < 10, elapsed


def test_an_over_long_line_is_skipped_and_the_lines_after_it_still_checked(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(chat_line("a")) + "\n" + "x" * 5000 + "\n" + json.dumps(chat_line("a")) + "\n")
    errors = validate_batch_file(path, CHAT, max_line_bytes=1000)
    assert [(e["code"], e["line"]) for e in errors] == [("line_too_long", 2), ("duplicate_custom_id", 3)]


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "in.jsonl"
    good = json.dumps(chat_line("a")).encode()
    bad = json.dumps(chat_line("b")).encode().replace(b"Hi", b"H\xff\xfe")
    path.write_bytes(good + b"\n" + bad + b"\n")
    error = only_error(validate_batch_file(path, CHAT))
    assert error["code"] == "invalid_utf8"
    assert error["line"] == 2
    assert "UTF-8" in error["message"]


@pytest.mark.parametrize("text, says", [
    ('{"custom_id": "a", ', "not valid JSON"),
    ("not json", "not valid JSON"),
    ('[1, 2]', "must be a JSON object, got an array"),
    ('"a string"', "must be a JSON object, got a string"),
    ("42", "must be a JSON object, got a number"),
    ("null", "must be a JSON object, got null"),
])
def test_a_line_that_is_not_a_json_object_is_invalid_json_line(tmp_path, text, says):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a"), text])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"]) == ("invalid_json_line", 2)
    assert says in error["message"]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 100_000])
def test_deeply_nested_json_is_invalid_json_line(tmp_path, depth):
    # the line object is level 1, "metadata" level 2, then the nested arrays
    nested = "[" * (depth - 1) + "]" * (depth - 1)
    line = json.dumps(chat_line("a"))[:-1] + f', "metadata": {nested}}}'
    path = write_lines(tmp_path / "in.jsonl", [line])
    error = only_error(validate_batch_file(path, CHAT, max_line_bytes=1_000_000))
    assert (error["code"], error["line"]) == ("invalid_json_line", 1)
    assert "nested" in error["message"]


def test_nesting_up_to_the_limit_is_fine_and_brackets_inside_strings_do_not_count(tmp_path):
    nested = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    at_limit = json.dumps(chat_line("a"))[:-1] + f', "extra": {nested}}}'
    brackets = chat_line("b")
    brackets["body"]["messages"][0]["content"] = "[{" * 1000
    path = write_lines(tmp_path / "in.jsonl", [at_limit, brackets])
    assert validate_batch_file(path, CHAT) == []


@pytest.mark.parametrize("custom_id, code", [
    (None, "missing_custom_id"),
    ("", "invalid_custom_id"),
    (12, "invalid_custom_id"),
    (["a"], "invalid_custom_id"),
    ("x" * 513, "invalid_custom_id"),
])
def test_missing_or_invalid_custom_id(tmp_path, custom_id, code):
    line = chat_line()
    line["custom_id"] = custom_id
    path = write_lines(tmp_path / "in.jsonl", [chat_line("ok"), line])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"], error["param"]) == (code, 2, "custom_id")


def test_an_absent_custom_id_is_missing_and_512_characters_are_fine(tmp_path):
    line = chat_line()
    del line["custom_id"]
    path = write_lines(tmp_path / "in.jsonl", [line, chat_line("x" * 512)])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"]) == ("missing_custom_id", 1)


def test_a_duplicate_custom_id_names_the_line_it_was_first_used_on(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line(c) for c in ("a", "b", "a", "a")])
    errors = validate_batch_file(path, CHAT)
    assert [(e["code"], e["line"]) for e in errors] == [("duplicate_custom_id", 3),
                                                        ("duplicate_custom_id", 4)]
    assert "line 1" in errors[0]["message"] and '"a"' in errors[0]["message"]


@pytest.mark.parametrize("method", ["GET", "post", None, 1])
def test_a_method_other_than_post_is_invalid_method(tmp_path, method):
    line = chat_line()
    if method is None:
        del line["method"]
    else:
        line["method"] = method
    path = write_lines(tmp_path / "in.jsonl", [line])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"], error["param"]) == ("invalid_method", 1, "method")


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions/", "/v1/embeddings", None])
def test_a_url_other_than_the_batch_endpoint_is_mismatched_url(tmp_path, url):
    line = chat_line()
    if url is None:
        del line["url"]
    else:
        line["url"] = url
    path = write_lines(tmp_path / "in.jsonl", [line])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"], error["param"]) == ("mismatched_url", 1, "url")
    assert CHAT in error["message"]


@pytest.mark.parametrize("body, message", [
    (None, "body is required"),
    ([1], "body must be a JSON object, got an array"),
    ("hi", "body must be a JSON object, got a string"),
])
def test_a_body_that_is_not_an_object_is_invalid_request(tmp_path, body, message):
    line = chat_line()
    line["body"] = body
    path = write_lines(tmp_path / "in.jsonl", [line])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"], error["param"]) == ("invalid_request", 1, "body")
    assert message in error["message"]


@pytest.mark.parametrize("extra, param, says", [
    ({"temperature": "hot"}, "body.temperature", "temperature"),
    ({"messages": []}, "body.messages", "at least one message"),
    ({"n": 2}, "body.n", "only n=1"),
    ({"tools": [{"type": "function"}]}, "body.tools", "tool calling"),
    ({"bogus": 1}, "body.bogus", "unrecognized request argument"),
])
def test_a_body_the_chat_schema_refuses_is_invalid_request_with_the_field_message(tmp_path, extra, param,
                                                                                  says):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a"), chat_line("b", **extra)])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"], error["param"]) == ("invalid_request", 2, param)
    assert says in error["message"]


def test_a_chat_body_sent_to_the_completions_endpoint_is_invalid_request(tmp_path):
    line = chat_line()
    line["url"] = COMPLETIONS
    path = write_lines(tmp_path / "in.jsonl", [line])
    error = only_error(validate_batch_file(path, COMPLETIONS))
    assert error["code"] == "invalid_request"
    assert error["param"] in ("body.messages", "body.prompt")


def test_a_missing_model_is_invalid_request(tmp_path):
    line = completion_line()
    del line["body"]["model"]
    path = write_lines(tmp_path / "in.jsonl", [line])
    error = only_error(validate_batch_file(path, COMPLETIONS))
    assert (error["code"], error["param"]) == ("invalid_request", "body.model")
    assert "model: this field is required" in error["message"]


def test_a_streaming_request_is_invalid_request_because_batches_do_not_stream(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a", stream=False), chat_line("b", stream=True)])
    error = only_error(validate_batch_file(path, CHAT))
    assert (error["code"], error["line"], error["param"]) == ("invalid_request", 2, "body.stream")
    assert "stream" in error["message"]


def test_max_tokens_beyond_the_models_context_is_invalid_request(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        chat_line("a", max_tokens=2048),
        chat_line("b", max_tokens=2049),
        chat_line("c", max_completion_tokens=4096),
        chat_line("d"),
    ])
    errors = validate_batch_file(path, CHAT, max_model_len=2048)
    assert [(e["code"], e["line"], e["param"]) for e in errors] == [
        ("invalid_request", 2, "body.max_tokens"),
        ("invalid_request", 3, "body.max_completion_tokens"),
    ]
    assert "2049" in errors[0]["message"] and "2048" in errors[0]["message"]
    assert validate_batch_file(path, CHAT) == []   # no limit given: not checked


def test_completions_max_tokens_beyond_the_models_context_is_invalid_request(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [completion_line("a", max_tokens=100), completion_line("b")])
    error = only_error(validate_batch_file(path, COMPLETIONS, max_model_len=50))
    assert (error["code"], error["line"], error["param"]) == ("invalid_request", 1, "body.max_tokens")


def test_a_model_not_served_is_model_not_found_when_the_models_are_given(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a", model="m"), chat_line("b", model="other")])
    error = only_error(validate_batch_file(path, CHAT, models={"m"}))
    assert (error["code"], error["line"], error["param"]) == ("model_not_found", 2, "body.model")
    assert validate_batch_file(path, CHAT) == []


def test_more_requests_than_allowed_is_too_many_requests_and_stops_reading(tmp_path):
    lines = [chat_line(f"r{i}") for i in range(5)] + ["not json"] * 3
    path = write_lines(tmp_path / "in.jsonl", lines)
    error = only_error(validate_batch_file(path, CHAT, max_requests=5))
    assert (error["code"], error["line"]) == ("too_many_requests", 6)
    assert validate_batch_file(write_lines(tmp_path / "ok.jsonl", lines[:5]), CHAT, max_requests=5) == []


def test_blank_lines_do_not_count_as_requests(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a"), "", chat_line("b"), ""])
    assert validate_batch_file(path, CHAT, max_requests=2) == []


def test_at_most_a_hundred_errors_are_listed(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", ["not json"] * 250)
    errors = validate_batch_file(path, CHAT)
    assert len(errors) == MAX_ERRORS == 100
    assert [e["line"] for e in errors] == list(range(1, 101))


def test_each_error_has_exactly_code_message_param_and_line(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", ["[]", chat_line("a", temperature=5)])
    for error in validate_batch_file(path, CHAT):
        assert set(error) == {"code", "message", "param", "line"}
        assert isinstance(error["message"], str) and error["message"]
        json.dumps(error)


def test_an_unknown_endpoint_is_a_programming_error(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line()])
    with pytest.raises(ValueError, match="not a batch endpoint"):
        validate_batch_file(path, "/v1/embeddings")
    with pytest.raises(ValueError, match="not a batch endpoint"):
        list(iter_batch_requests(path, "/v1/embeddings", 10))


# --- the second pass ------------------------------------------------------------------------------

def test_requests_come_with_their_line_custom_id_and_a_fresh_request_id(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a"), "", chat_line("b")])
    rows = list(iter_batch_requests(path, CHAT, 10))
    assert [(r["line"], r["custom_id"], r["model"], r["shard"]) for r in rows] == [(1, "a", "m", 0),
                                                                                  (3, "b", "m", 0)]
    for row in rows:
        assert set(row) == {"line", "custom_id", "request_id", "shard", "model", "body"}
        assert row["request_id"].startswith("batch_req_")
        assert len(row["request_id"]) == len("batch_req_") + 32
        int(row["request_id"][len("batch_req_"):], 16)
    assert rows[0]["request_id"] != rows[1]["request_id"]


def test_shards_group_consecutive_requests_of_the_same_model_up_to_the_shard_size(tmp_path):
    models = ["a"] * 5 + ["b"] * 2 + ["a"] * 1 + ["c"] * 3
    path = write_lines(tmp_path / "in.jsonl", [chat_line(f"r{i}", model=m) for i, m in enumerate(models)])
    rows = list(iter_batch_requests(path, CHAT, 2))
    assert [(r["model"], r["shard"]) for r in rows] == [
        ("a", 0), ("a", 0), ("a", 1), ("a", 1), ("a", 2),
        ("b", 3), ("b", 3),
        ("a", 4),
        ("c", 5), ("c", 5), ("c", 6),
    ]


def test_shard_size_must_be_positive(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line()])
    with pytest.raises(ValueError):
        list(iter_batch_requests(path, CHAT, 0))


def test_bodies_are_the_validated_requests_and_parse_again_unchanged(tmp_path):
    chat = chat_line("a", max_tokens=5, temperature=0, stop="x", n=1, logprobs=False, seed=None)
    chat["body"]["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                             {"type": "text", "text": "there"}]}]
    path = write_lines(tmp_path / "chat.jsonl", [chat])
    (row,) = iter_batch_requests(path, CHAT, 10)
    body = row["body"]
    # unset fields and accepted no-op fields are left out; values come out normalised
    assert body == {"model": "m", "messages": [{"role": "user", "content": "Hi there"}],
                    "max_tokens": 5, "temperature": 0, "stop": ["x"]}
    json.dumps(body)
    again = ChatCompletionRequest.model_validate(body)
    assert again.model_dump(exclude_unset=True) == body
    assert again.sampling_params() == ChatCompletionRequest.model_validate(chat["body"]).sampling_params()

    completion = completion_line("b", prompt=[[1, 2, 3]], max_tokens=None)
    path = write_lines(tmp_path / "completions.jsonl", [completion])
    (row,) = iter_batch_requests(path, COMPLETIONS, 10)
    assert row["body"] == {"model": "m", "prompt": [1, 2, 3], "max_tokens": None}
    assert CompletionRequest.model_validate(row["body"]).sampling_params()["max_tokens"] is None


def test_the_second_pass_refuses_a_file_that_changed_into_an_invalid_one(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a"), "not json"])
    rows = iter_batch_requests(path, CHAT, 10)
    assert next(rows)["custom_id"] == "a"
    with pytest.raises(ValueError, match="line 2"):
        next(rows)
