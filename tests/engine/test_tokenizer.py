"""The tokenizer wrapper: the bundled SmolLM2 tokenizer from GGUF, and one built from a Hugging Face directory."""
from __future__ import annotations

import json

import pytest

from engine.bundled import default_model_path
from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer

TEXT = "Héllo wörld! 你好，世界。 Emoji: 🎉👍🏽 — naïve café, ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\tindented"


@pytest.fixture(scope="module")
def tok(bundled_model) -> Tokenizer:
    return bundled_model.tokenizer


def test_encode_decode_round_trip(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert ids == tok.encode(TEXT)


def test_encode_adds_no_special_tokens_for_smollm2(tok):
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.bos_token_id == 1 and 1 not in tok.encode("Hello")


def test_chat_template_has_system_preamble_and_generation_prompt(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # Special tokens in the rendered template become their single ids, not text pieces.
    assert ids[0] == 1 and ids.count(2) == 2


def test_own_system_message_replaces_the_default(tok):
    ids = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "SmolLM" not in text


def test_content_parts_equal_plain_content(tok):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == \
        tok.apply_chat_template([{"role": "user", "content": "Hello there"}])


@pytest.mark.parametrize("messages", [
    [],
    "Hello",
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": 3}],
    ["just a string"],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
])
def test_malformed_messages_are_invalid_requests(tok, messages):
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(messages)


def test_eos_ids_are_the_end_of_turn_token(tok):
    assert 2 in tok.eos_token_ids
    assert tok.convert_ids_to_tokens([2]) == ["<|im_end|>"]


def test_vocabulary_and_special_ids(tok):
    assert tok.vocab_size == 49152
    assert {0, 1, 2} <= set(tok.all_special_ids)
    assert tok.decode([1, 19556, 2]) == "Hello"
    assert tok.decode([1, 19556, 2], skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"


def save_word_tokenizer(path, chat_template: str | None = None) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|eot_id|>": 3, "hello": 4, "world": 5}
    rust = RustTokenizer(WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 additional_special_tokens=["<|eot_id|>"])
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(path)


def test_hf_directory_eos_ids_include_generation_config_and_end_of_turn(tmp_path):
    save_word_tokenizer(tmp_path, "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))

    tok = Tokenizer.from_hf_dir(tmp_path)

    assert tok.eos_token_ids == {2, 3, 5}
    assert tok.apply_chat_template([{"role": "user", "content": "hello world"}]) == [4, 5, 3]


def test_model_without_chat_template_refuses_chat(tmp_path):
    save_word_tokenizer(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_token_ids == {2}
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_template_exceptions_are_invalid_requests(tmp_path):
    save_word_tokenizer(tmp_path, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                                  "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(InvalidRequestError, match="first must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hello"}])


@pytest.mark.bundled
def test_gguf_tokenizer_cached_on_disk_behaves_as_the_freshly_converted_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_model_path()
    converted = Tokenizer.from_gguf(path)  # an empty cache: converts, then saves
    [entry] = (tmp_path / "conserve" / "tokenizers").iterdir()
    assert (entry / "tokenizer.json").is_file()
    cached = Tokenizer.from_gguf(path)
    assert cached._hf.name_or_path == str(entry)  # really read back from the cache

    text = "Lighthouses: ünïcödé, emoji 🚢, code `x = 1`\n\tand <|im_end|> inside text."
    assert cached.encode(text) == converted.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert cached.apply_chat_template(chat) == converted.apply_chat_template(chat)
    assert cached.eos_token_ids == converted.eos_token_ids
    assert (cached.vocab_size, cached.bos_token_id, cached.all_special_ids) == (
        converted.vocab_size, converted.bos_token_id, converted.all_special_ids)
    ids = converted.encode(text)
    assert cached.decode(ids) == converted.decode(ids)
    assert cached.decode(ids, skip_special_tokens=False) == converted.decode(ids, skip_special_tokens=False) == text
