"""bench/throughput.py end to end on a tiny random-weight model: both systems load in their own
processes, run in interleaved rounds, and (in float32) generate the same tokens."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "throughput.py"


def save_char_model(path: Path) -> None:
    """A 2-layer Llama and a one-character-per-token tokenizer covering the benchmark's text, so that
    its prompt windows tokenize to distinct ids."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from throughput import TEXT
    finally:
        sys.path.remove(str(SCRIPT.parent))
    chars = sorted(set(TEXT))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    rust = RustTokenizer(WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    # initializer_range 0.1, as the engine tests' tiny models: each greedy choice then has a clear
    # winner, so two correct float32 implementations agree on all of them.
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    assert len(vocab) <= config.vocab_size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)


def test_interleaved_rounds_in_separate_processes(tmp_path):
    save_char_model(tmp_path / "model")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), "--model", str(tmp_path / "model"),
         "--dtype", "float32", "--num-prompts", "3", "--input-len", "12", "--output-len", "5", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())

    # Both systems ran twice, one round after the other: engine, transformers, engine, transformers.
    rounds = [line for line in run.stderr.splitlines() if "] round " in line]
    assert [line.split("]")[0] + "]" for line in rounds] == ["[engine]", "[transformers]"] * 2
    assert len(result["runs_seconds"]["engine"]) == len(result["runs_seconds"]["transformers"]) == 2
    for ratio, e, t in zip(result["ratio_by_round"], result["runs_seconds"]["engine"],
                           result["runs_seconds"]["transformers"]):
        # the stored seconds are rounded to 1 ms
        assert ratio == pytest.approx(t / e, rel=0.0006 / e + 0.0006 / t + 0.001)
    seconds = result["seconds"]["engine"]
    assert seconds in result["runs_seconds"]["engine"]
    assert result["engine_tok_s"] == pytest.approx(3 * 5 / seconds, rel=0.0006 / seconds + 0.001)
    # float32 on the same weights: the engine and transformers agree token for token.
    assert result["greedy_agreement_first16_engine_vs_transformers"] == 1.0
