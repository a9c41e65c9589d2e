"""Text <-> token ids and chat templates, wrapping a Hugging Face fast tokenizer (the engine's only transformers use)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError, ModelLoadError

# Tokens chat templates close an assistant turn with; the model emits them instead of (or before) its eos.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _eos_ids_from_json(path: Path) -> list[int]:
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if isinstance(eos, int):
        return [eos]
    return [e for e in eos if isinstance(e, int)] if isinstance(eos, list) else []


class Tokenizer:
    """Encodes prompts, renders chat templates, decodes ids, and knows which ids end generation."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()) -> None:
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ModelLoadError(f"{type(hf_tokenizer).__name__} is not a fast (Rust) tokenizer")
        self._hf = hf_tokenizer
        # Decoding goes straight to the Rust tokenizer: the transformers wrapper costs several times
        # more per call, and the detokenizer makes two calls per generated token.
        self._backend = hf_tokenizer.backend_tokenizer
        self._vocab_size = len(hf_tokenizer)
        eos = {i for i in extra_eos_ids if 0 <= i < self._vocab_size}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        template = hf_tokenizer.chat_template if isinstance(hf_tokenizer.chat_template, str) else ""
        vocab = hf_tokenizer.get_vocab()
        for tok in _END_OF_TURN_TOKENS:
            # Only tokens the template itself writes (after a message) count; a base model's
            # <|endoftext|> without a template is already its eos.
            if tok in template and tok in vocab:
                eos.add(vocab[tok])
        self._eos_ids = frozenset(eos)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Tokenizer of a Hugging Face model directory; also reads eos ids from config.json and generation_config.json."""
        from transformers import AutoTokenizer

        path = Path(path)
        try:
            # local_files_only: a path that is not a model directory must fail, not become a hub id.
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from e
        extra = _eos_ids_from_json(path / "config.json") + _eos_ids_from_json(path / "generation_config.json")
        return cls(hf, extra)

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Tokenizer:
        """Tokenizer embedded in a GGUF file; `metadata` (a GGUFHeader's) saves re-reading it."""
        from transformers import AutoTokenizer

        path = Path(path)
        if metadata is None:
            from engine.gguf_header import read_gguf_header

            metadata = read_gguf_header(path).metadata
        from engine.tokenizer_cache import cached_gguf_tokenizer

        try:
            hf = cached_gguf_tokenizer(path, lambda: AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True))
        except (OSError, ValueError, KeyError, NotImplementedError) as e:
            raise ModelLoadError(f"cannot build a tokenizer from {path}: {e}") from e
        template = metadata.get("tokenizer.chat_template")
        if template and not hf.chat_template:
            hf.chat_template = template
        extra = [metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                       "tokenizer.ggml.eom_token_id") if isinstance(metadata.get(k), int)]
        return cls(hf, extra)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's and model's eos and the chat template's end-of-turn token."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self._vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._hf.all_special_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(self._hf.chat_template)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with BOS/EOS only where the tokenizer's own config adds them (Llama 2 does, SmolLM2 not)."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=True).ids

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt ids for a conversation, ending with the template's assistant generation prompt."""
        if not self._hf.chat_template:
            raise InvalidRequestError("this model has no chat template; send a plain completion prompt instead")
        normalized = [self._check_message(i, m) for i, m in enumerate(self._check_messages(messages))]
        from jinja2 import TemplateError

        try:
            text = self._hf.apply_chat_template(normalized, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:
            # Templates raise_exception() on conversations they reject, e.g. roles that do not alternate.
            raise InvalidRequestError(f"the model's chat template rejected the messages: {e}") from e
        # The rendered text already holds BOS and every special token the template wants.
        return self._backend.encode(text, add_special_tokens=False).ids

    @staticmethod
    def _check_messages(messages: Any) -> Sequence[Any]:
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
            raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        return messages

    @staticmethod
    def _check_message(i: int, m: Any) -> dict[str, str]:
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string such as 'user'")
        if isinstance(content, list):
            # OpenAI's content-parts form; only text parts mean anything to a text model.
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise InvalidRequestError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': str}}")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
        return {"role": role, "content": content}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids, without transformers' clean-up of spaces so that pieces decode consistently with the whole."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self._hf.convert_ids_to_tokens(list(ids))
