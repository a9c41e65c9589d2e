"""What a caller may submit as a prompt, and how each kind becomes token ids."""
from __future__ import annotations

from typing import Any, Sequence

from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer

# Raw text, token ids, or chat messages ({"role", "content"} dicts).
Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


def prompt_token_ids(prompt: Prompt, tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    """Token ids of a non-empty prompt; InvalidRequestError for anything else."""
    if isinstance(prompt, str):
        ids = _need(tokenizer).encode(prompt) if prompt else []
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = _need(tokenizer).apply_chat_template(list(prompt))
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        if any(not 0 <= t < vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})")
    else:
        raise InvalidRequestError("prompt must be text, a list of token ids, or a list of chat messages")
    if not ids:
        raise InvalidRequestError("prompt is empty")
    return ids


def _need(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer; send token ids")
    return tokenizer
