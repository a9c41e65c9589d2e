"""Streaming detokenisation with the bundled tokenizer: UTF-8 safety, spacing, stop strings, flush."""
from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

MIXED = "Héllo wörld! 你好，世界。 Emoji: 🎉👍🏽 🇫🇷 — naïve café, ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n  indented   spaces"


@pytest.fixture(scope="module")
def tok(bundled_model) -> Tokenizer:
    return bundled_model.tokenizer


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": "Say something."}])


def stream(tok, prompt, ids, **kwargs) -> tuple[list[str], bool, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas, stopped = [], False
    for i in ids:
        delta, stopped = detok.add(i)
        deltas.append(delta)
        if stopped:
            break
    return deltas, stopped, detok


def test_deltas_concatenate_to_the_full_decode_without_broken_characters(tok, prompt):
    ids = tok.encode(MIXED)
    # The text must really split characters across tokens, or this test would prove nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)

    deltas, stopped, detok = stream(tok, prompt, ids)
    tail = detok.flush()

    assert not stopped and tail == ""
    assert "".join(deltas) == tok.decode(ids) == MIXED == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_are_skipped_or_kept_on_request(tok, prompt):
    ids = tok.encode("Hi there") + [2]
    assert "".join(stream(tok, prompt, ids)[0]) == "Hi there"
    kept, _, _ = stream(tok, prompt, ids, skip_special_tokens=False)
    assert "".join(kept) == "Hi there<|im_end|>"


def test_stop_string_spanning_tokens_truncates_before_it(tok, prompt):
    stop = "END OF ANSWER"
    assert len(tok.encode(stop)) > 1
    ids = tok.encode("The answer is 42. END OF ANSWER and then more text")

    deltas, stopped, detok = stream(tok, prompt, ids, stop=[stop])

    assert stopped
    assert "".join(deltas) == detok.text == "The answer is 42. "
    assert len(deltas) < len(ids)
    assert detok.add(tok.encode(" more")[0]) == ("", True) and detok.flush() == ""


def test_stop_string_can_be_kept_in_the_output(tok, prompt):
    ids = tok.encode("Count: one, two, three, four")
    deltas, stopped, _ = stream(tok, prompt, ids, stop=["two,"], include_stop_str_in_output=True)
    assert stopped and "".join(deltas) == "Count: one, two,"


def test_earliest_of_several_stop_strings_wins(tok, prompt):
    ids = tok.encode("alpha beta gamma delta")
    deltas, stopped, _ = stream(tok, prompt, ids, stop=["delta", "beta"])
    assert stopped and "".join(deltas) == "alpha "


def test_stop_string_inside_a_single_token_is_found(tok, prompt):
    ids = tok.encode("Hello world")
    deltas, stopped, _ = stream(tok, prompt, ids, stop=["orl"])
    assert stopped and "".join(deltas) == "Hello w"


def test_held_back_stop_prefix_is_emitted_once_it_cannot_match(tok, prompt):
    text = "Go to the END OF the line."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt, stop=["END OF ANSWER"])
    emitted, held_back = "", False
    for n, i in enumerate(ids, start=1):
        delta, stopped = detok.add(i)
        emitted += delta
        assert not stopped
        if tok.decode(ids[:n]).endswith(" END OF"):
            assert emitted == "Go to the "  # "END OF" could still become the stop string
            held_back = True
    assert held_back
    assert emitted + detok.flush() == text


def test_flush_returns_text_held_back_when_generation_ends(tok, prompt):
    ids = tok.encode("It ends with END OF")
    deltas, stopped, detok = stream(tok, prompt, ids, stop=["END OF ANSWER"])
    assert not stopped and "".join(deltas) == "It ends with "
    assert detok.flush() == "END OF"
    assert detok.text == "It ends with END OF"


def test_flush_returns_an_incomplete_character_as_decoded(tok, prompt):
    ids = tok.encode("ok 🎉")
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    deltas, _, detok = stream(tok, prompt, ids[:cut])
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids[:cut])


def test_long_generation_decodes_windows_not_the_whole_text(tok, prompt):
    class WindowRecordingTokenizer:
        """The real tokenizer, remembering the longest id list it was asked to decode."""
        longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    recording = WindowRecordingTokenizer()
    ids = tok.encode(MIXED * 20)
    deltas, _, detok = stream(recording, prompt, ids)
    assert "".join(deltas) + detok.flush() == MIXED * 20
    assert len(ids) > 300 and recording.longest < 16
