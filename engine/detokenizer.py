"""Turns generated token ids into streamable text deltas, one token at a time, and applies stop strings."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# How many prompt tokens seed the decode window: enough context for the first generated token's
# leading space (SentencePiece drops it at the start of a decode) and for a character split across
# the prompt/output boundary. vLLM uses the same number.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request streaming decoder.

    Decodes a short sliding window of ids rather than the whole output each step (which would be
    O(n^2)): `prefix` ids [prefix_offset, read_offset) were emitted already and give the new ids
    their context, so the delta is decode(prefix + new) minus decode(prefix). Text is held back
    while it ends in U+FFFD (an incomplete UTF-8 character) or in a possible start of a stop string.
    """

    def __init__(self, tokenizer: _Decoder, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._decoded = ""  # all output text decoded so far, including what is held back for stop strings
        self._emitted = 0  # length of the prefix of _decoded already handed out
        self._stopped = False

    @property
    def text(self) -> str:
        """Output text emitted so far: the concatenation of every delta returned."""
        return self._decoded[: self._emitted]

    @property
    def stopped(self) -> bool:
        """True once a stop string has been matched; later tokens produce no text."""
        return self._stopped

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token; returns the text that is now safe to emit and whether a stop string hit."""
        if self._stopped:
            return "", True
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # Nothing printable yet (a special token being skipped, or half a character).
            return "", False
        self._decoded += new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=False), self._stopped

    def flush(self) -> str:
        """All text still held back, for when generation ends for another reason (length, eos)."""
        if self._stopped:
            return ""
        if self._read_offset < len(self._ids):
            prefix_text = self._decode(self._prefix_offset, self._read_offset)
            new_text = self._decode(self._prefix_offset, len(self._ids))
            self._decoded += new_text[len(prefix_text):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=True)

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _release(self, final: bool) -> str:
        """Advance the emitted mark as far as stop strings allow and return the text passed over."""
        end = len(self._decoded)
        if self._stop:
            hit = self._find_stop()
            if hit is not None:
                self._stopped = True
                end = hit
                self._decoded = self._decoded[:end]
            elif not final:
                end -= self._stop_prefix_len()
        delta = self._decoded[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _find_stop(self) -> int | None:
        """End of the output (before or after the earliest stop string) if one now appears, else None."""
        best: tuple[int, int] | None = None
        for s in self._stop:
            # Only the unemitted tail can hold a new match; a match may start inside held-back text.
            i = self._decoded.find(s, max(0, self._emitted - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, len(s))
        if best is None:
            return None
        return best[0] + best[1] if self._include_stop else best[0]

    def _stop_prefix_len(self) -> int:
        """Length of the longest unemitted tail of the text that could still grow into a stop string."""
        tail_room = len(self._decoded) - self._emitted
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, tail_room), longest, -1):
                if self._decoded.endswith(s[:n]):
                    longest = n
                    break
        return longest
