"""OpenAI-compatible request models (checked strictly, so a bad request fails with a message naming the
parameter and what to change) and builders for OpenAI-shaped responses, as plain dicts.

Conventions, as in OpenAI's API:
- JSON null means "the default" for every optional parameter. For max_tokens the default is "as many
  as fit in the context" (chat) or 16 (completions), but an explicit null asks for as many as fit in
  both, as vLLM does; the worker resolves None against the prompt's length.
- Parameters OpenAI defines but we do not implement are rejected with a message of their own, unless
  the value asks for exactly what we do anyway (presence_penalty 0, logprobs false, response_format
  {"type": "text"}, n 1, store false, ...), which is accepted and ignored so that stock clients work.
- `user` and `metadata` are accepted and ignored: they only label a request for the provider.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4   # OpenAI's limit
_ROLES = ("system", "developer", "user", "assistant")
_INT64 = 2 ** 63

# strict: no coercion, so "temperature": "hot" and "max_tokens": true are errors, not 0.0 and 1.
# allow_inf_nan=False: Python's JSON parser accepts NaN and Infinity; no sampling parameter means them.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _bad(message: str, param: str) -> PydanticCustomError:
    """A whole-request problem the error handler reports with `param`; ctx carries both (the message
    goes through ctx because pydantic formats the template with it)."""
    return PydanticCustomError("invalid_request", "{message}", {"message": message, "param": param})


# --- parameters we do not implement --------------------------------------------------------------

def _is_null(v: Any) -> bool:
    return v is None


def _is_false(v: Any) -> bool:
    return v is None or v is False


def _is_zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


def _is_one(v: Any) -> bool:
    return v is None or (type(v) is int and v == 1)


def _is_empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _is_none_choice(v: Any) -> bool:
    return v is None or v == "none"


_NO_TOOLS = "tool calling is not supported; remove {name}"
# name -> (accepts this value as a no-op, what to tell the client otherwise)
_Unsupported = dict[str, tuple[Callable[[Any], bool], str]]
_COMMON_UNSUPPORTED: _Unsupported = {
    "n": (_is_one, "only n=1 is supported; send one request per completion"),
    "presence_penalty": (_is_zero, "presence_penalty is not supported; remove it or set it to 0"),
    "frequency_penalty": (_is_zero, "frequency_penalty is not supported; remove it or set it to 0"),
    "logit_bias": (_is_empty, "logit_bias is not supported; remove it"),
}
_CHAT_UNSUPPORTED: _Unsupported = _COMMON_UNSUPPORTED | {
    "logprobs": (_is_false, "logprobs are not supported; remove logprobs or set it to false"),
    "top_logprobs": (_is_null, "top_logprobs is not supported (logprobs are not returned); remove it"),
    "tools": (_is_empty, _NO_TOOLS),
    "tool_choice": (_is_none_choice, _NO_TOOLS),
    "functions": (_is_empty, _NO_TOOLS),
    "function_call": (_is_none_choice, _NO_TOOLS),
    "parallel_tool_calls": (_is_null, _NO_TOOLS),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        'only response_format {"type": "text"} is supported (no JSON mode or structured '
                        "outputs); remove response_format"),
    "audio": (_is_null, "audio output is not supported; remove audio"),
    "modalities": (lambda v: v is None or v == ["text"], 'only modalities ["text"] is supported; remove modalities'),
    "prediction": (_is_null, "predicted outputs are not supported; remove prediction"),
    "store": (_is_false, "completions are not stored; remove store or set it to false"),
    "metadata": (lambda v: v is None or isinstance(v, dict), "metadata must be an object of strings"),
}
_COMPLETION_UNSUPPORTED: _Unsupported = _COMMON_UNSUPPORTED | {
    "echo": (_is_false, "echo is not supported; remove it or set it to false"),
    "logprobs": (_is_null, "logprobs are not supported; remove logprobs"),
    "suffix": (lambda v: v is None or v == "", "suffix (insertion) is not supported; remove it"),
    "best_of": (_is_one, "only best_of=1 is supported; remove best_of"),
}
# A stock client may send these as null; null means "the default", so drop them before validation.
_NULL_MEANS_DEFAULT = ("stream", "stream_options", "temperature", "top_p", "stop", "seed", "user",
                       "ignore_eos", "top_k", "min_tokens")


def _strip_unsupported(data: Any, table: _Unsupported) -> Any:
    if not isinstance(data, dict):
        return data   # pydantic reports "must be an object"
    kept = {}
    for name, value in data.items():
        if name in table:
            accepts, message = table[name]
            if not accepts(value):
                raise _bad(message.replace("{name}", name), name)
        elif not (value is None and name in _NULL_MEANS_DEFAULT):
            kept[name] = value
    return kept


# --- shared fields ------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool | None = False
    include_obfuscation: bool | None = None   # accepted and ignored: chunks carry no obfuscation field


class _GenerationRequest(BaseModel):
    """What chat and legacy completion requests share: the model and the sampling parameters."""
    model_config = _STRICT

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    user: str | None = None   # accepted and ignored: it labels the end user for the provider
    # vLLM's extensions
    ignore_eos: bool = False
    top_k: int = Field(0, ge=-1)   # 0 or -1: no top-k cut
    min_tokens: int = Field(0, ge=0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError(f"must be a string or a list of at most {MAX_STOP_SEQUENCES} strings")
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(v)}")
        if not all(v):
            raise ValueError("stop sequences must not be empty strings")
        return v

    def _check_common(self, max_tokens: int | None, max_param: str) -> None:
        if self.stream_options is not None and not self.stream:
            raise _bad("stream_options is only allowed when stream is true; set stream to true or "
                       "remove stream_options", "stream_options")
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise _bad(f"min_tokens ({self.min_tokens}) must not exceed {max_param} ({max_tokens})",
                       "min_tokens")

    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None) -> dict[str, Any]:
        # Exactly the keys engine.SamplingParams.from_dict takes; max_tokens None is resolved by the
        # worker to what fits in the context.
        return {
            "max_tokens": max_tokens,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
        }


# --- chat --------------------------------------------------------------------------------------

# Message fields that only carry tool calls or audio: fine when null or empty (the SDK echoes them
# back that way), rejected otherwise.
_MESSAGE_UNSUPPORTED = ("tool_calls", "tool_call_id", "function_call", "audio", "refusal", "annotations")


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: str
    content: str   # text parts are joined into one string before validation
    name: str | None = None   # accepted and ignored: the chat template has no place for it

    @model_validator(mode="before")
    @classmethod
    def _no_tool_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("role") in ("tool", "function"):
            # the role's own error says it better than "tool_call_id is not supported"
            return {k: v for k, v in data.items() if k not in _MESSAGE_UNSUPPORTED}
        for name in _MESSAGE_UNSUPPORTED:
            value = data.get(name)
            if value is not None and value != [] and value != "":
                raise ValueError(f"{name} is not supported in messages (no tool calling or audio); remove it")
        return {k: v for k, v in data.items() if k not in _MESSAGE_UNSUPPORTED}

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, v: Any) -> Any:
        if v in ("tool", "function"):
            raise ValueError(f"'{v}' messages are not supported (no tool calling); "
                             f"use one of {', '.join(_ROLES)}")
        if v not in _ROLES:
            raise ValueError(f"must be one of {', '.join(_ROLES)}")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if isinstance(v, list):
            v = "".join(_text_part(i, part) for i, part in enumerate(v))
        elif not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        if not v.strip():
            raise ValueError("must not be empty; send some text")
        return v


def _text_part(index: int, part: Any) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ValueError(f"part [{index}] must be an object like {{\"type\": \"text\", \"text\": \"...\"}}")
    kind = part["type"]
    if kind != "text":
        raise ValueError(f"part [{index}] has type '{kind}'; only text parts are supported "
                         "(no image, audio or file input)")
    if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
        raise ValueError(f"part [{index}] must be {{\"type\": \"text\", \"text\": <string>}}")
    return part["text"]


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _strip_unsupported(data, _CHAT_UNSUPPORTED)

    @field_validator("messages", mode="before")
    @classmethod
    def _some_messages(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must contain at least one message")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise _bad(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                       f"({self.max_completion_tokens}) disagree; send only max_completion_tokens",
                       "max_tokens")
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        self._check_common(self.resolved_max_tokens(), param)
        return self

    def resolved_max_tokens(self) -> int | None:
        # max_tokens is OpenAI's deprecated name for max_completion_tokens.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_prompt(self) -> list[dict[str, str]]:
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in self.messages]

    def sampling_params(self) -> dict[str, Any]:
        return self._sampling(self.resolved_max_tokens())


# --- legacy completions --------------------------------------------------------------------------

class CompletionRequest(_GenerationRequest):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)   # OpenAI's default here; null: as many as fit

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _strip_unsupported(data, _COMPLETION_UNSUPPORTED)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # OpenAI's prompt is a string, a list of strings, a list of token ids or a list of those;
        # a batch of one is that one prompt.
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]
        if isinstance(v, str):
            if not v:
                raise ValueError("must not be empty")
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of token ids")
        if not v:
            raise ValueError("must not be empty")
        if all(isinstance(p, (str, list)) for p in v):
            raise ValueError(f"only one prompt per request is supported, got {len(v)}; "
                             "send one request per prompt (or use /v1/batches)")
        if not all(type(t) is int and t >= 0 for t in v):
            raise ValueError("must be a string or a list of token ids (integers >= 0)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        self._check_common(self.max_tokens, "max_tokens")
        return self

    def engine_prompt(self) -> str | list[int]:
        return self.prompt

    def sampling_params(self) -> dict[str, Any]:
        return self._sampling(self.max_tokens)


# --- responses ----------------------------------------------------------------------------------
# finish_reason is passed through as the engine gives it: "stop", "length", or "abort" when the request
# was cut short (its client went away, or the server is shutting down). "abort" is not one of OpenAI's
# values; the gateway should answer an engine failure with an error rather than a finish_reason.

FinishReason = str | None


def new_completion_id(kind: Literal["chat", "text"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    """`created`: whole seconds since the epoch."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(completion_id: str, model: str, created: int, text: str,
                    finish_reason: FinishReason, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def chat_chunk(completion_id: str, model: str, created: int, *, content: str | None = None,
               first: bool = False, finish_reason: FinishReason = None,
               include_usage: bool = False) -> dict[str, Any]:
    """One streamed piece. The first chunk carries the role; the last, an empty delta and the
    finish_reason. With include_usage every chunk has "usage": null, as OpenAI sends it."""
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
        delta["content"] = content or ""
    elif content is not None:
        delta["content"] = content
    chunk: dict[str, Any] = {
        "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def chat_usage_chunk(completion_id: str, model: str, created: int, usage: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk of a stream with include_usage: no choices, only the totals."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage}


def text_completion(completion_id: str, model: str, created: int, text: str,
                    finish_reason: FinishReason, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def text_completion_chunk(completion_id: str, model: str, created: int, *, text: str = "",
                          finish_reason: FinishReason = None, include_usage: bool = False) -> dict[str, Any]:
    # Streamed completions reuse the object name "text_completion", as OpenAI does.
    chunk: dict[str, Any] = {
        "id": completion_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def text_completion_usage_chunk(completion_id: str, model: str, created: int,
                                usage: dict[str, int]) -> dict[str, Any]:
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [], "usage": usage}


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "conserve"}


def model_list(models: list[str], created: int) -> dict[str, Any]:
    """GET /v1/models."""
    return {"object": "list", "data": [model_card(m, created) for m in models]}
