"""Model loading: the bundled GGUF, Hugging Face directories, synthetic GGUF files, and the errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.bundled import default_model_path
from engine.errors import ModelLoadError
from engine.loader import load_model, model_name
from engine.weights_gguf import load_gguf
from engine.weights_hf import load_hf_dir


def tiny_llama(model_type: str = "llama", **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[model_type]
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    torch.manual_seed(0)
    return model_cls(config_cls(**settings)).eval()


def save_tiny_tokenizer(path: Path) -> None:
    """A word-level tokenizer over 128 ids: enough for load_model to find one in an HF directory."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 128)}
    rust = RustTokenizer(WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def reference_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if not k.endswith("inv_freq") and not (k == "lm_head.weight" and model.config.tie_word_embeddings)}


def test_bundled_gguf_has_smollm2_config(bundled_model):
    c = bundled_model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.head_dim, c.intermediate_size) == (49152, 64, 1536)
    assert c.tie_word_embeddings and "lm_head.weight" not in bundled_model.tensors
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1
    assert bundled_model.name == "SmolLM2-135M-Instruct"
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in bundled_model.tensors.values())


def test_gguf_weights_match_transformers(bundled_model):
    # transformers' own GGUF conversion (what from_pretrained(gguf_file=...) runs, minus building a
    # model) dequantises and reverses llama.cpp's q/k permutation; ours must agree exactly.
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    c = bundled_model.config
    with torch.device("meta"):  # only its parameter names are used
        skeleton = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=True))
    reference = load_gguf_checkpoint(str(default_model_path()), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(reference) == set(bundled_model.tensors)
    for name, tensor in bundled_model.tensors.items():
        assert torch.allclose(tensor, reference[name]), name


@pytest.mark.parametrize("model_type,tied,shard", [("llama", False, True), ("mistral", True, False)])
def test_hf_directory_round_trips(tmp_path, model_type, tied, shard):
    model = tiny_llama(model_type, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    save_tiny_tokenizer(tmp_path)

    loaded = load_model(tmp_path, torch.float32)

    assert loaded.name == tmp_path.name
    assert (loaded.config.num_hidden_layers, loaded.config.num_key_value_heads, loaded.config.head_dim) == (2, 2, 16)
    assert loaded.config.tie_word_embeddings is tied and loaded.config.rope_theta == 50000.0
    reference = reference_state(model)
    assert set(loaded.tensors) == set(reference)
    for name, tensor in loaded.tensors.items():
        assert torch.equal(tensor, reference[name]), name
    assert loaded.tokenizer.eos_token_ids == {2}


def test_hf_directory_converts_to_the_requested_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    _, tensors = load_hf_dir(tmp_path, torch.bfloat16)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def rest_is(base: str, suffix: str) -> bool:
    return base.endswith("." + suffix)


def write_llama_gguf(path: Path, model, rope_freqs: np.ndarray | None = None) -> None:
    """Write an HF Llama the way llama.cpp's convert_hf_to_gguf.py does: renamed, q/k rows permuted."""
    import gguf

    c = model.config

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, t in reference_state(model).items():
        base = name[: -len(".weight")]
        if base.startswith("model.layers."):
            i, rest = base[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{layer[rest]}"
        else:
            gname = names[base]
        a = t.numpy()
        if rest_is(base, "q_proj"):
            a = permute(a, c.num_attention_heads)
        elif rest_is(base, "k_proj"):
            a = permute(a, c.num_key_value_heads)
        # q/k stay F32 so the un-permutation is checked exactly; the rest exercise F16 and Q8_0.
        if rest_is(base, "gate_proj"):
            w.add_tensor(gname + ".weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif a.ndim == 2 and not rest_is(base, "q_proj") and not rest_is(base, "k_proj"):
            w.add_tensor(gname + ".weight", a.astype(np.float16))
        else:
            w.add_tensor(gname + ".weight", a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_q_k_rows_are_unpermuted_back_to_hf_layout(tmp_path):
    model = tiny_llama()
    write_llama_gguf(tmp_path / "tiny.gguf", model)

    config, tensors = load_gguf(tmp_path / "tiny.gguf", torch.float32)

    assert not config.tie_word_embeddings and config.num_key_value_heads == 2 and config.rope_theta == 50000.0
    reference = reference_state(model)
    assert set(tensors) == set(reference)
    for name, tensor in tensors.items():
        if "q_proj" in name or "k_proj" in name or tensor.ndim == 1:
            assert torch.equal(tensor, reference[name]), name
        else:  # F16 / Q8_0 rounding
            assert torch.allclose(tensor, reference[name], atol=2e-3, rtol=2e-2), name


def test_gguf_rope_freqs_tensor_becomes_llama3_rope_scaling(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=50000.0,
                            max_position_embeddings=131072, rope_scaling=dict(scaling))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / (50000.0 ** (torch.arange(0, 16, 2).float() / 16))
    write_llama_gguf(tmp_path / "l3.gguf", tiny_llama(), rope_freqs=(plain / scaled).numpy())

    config, _ = load_gguf(tmp_path / "l3.gguf", torch.float32)

    assert config.rope_scaling == scaling


def test_model_name_drops_the_quantisation_tag():
    assert model_name(Path("/m/Llama-3.2-1B-Instruct-Q4_K_M.gguf")) == "Llama-3.2-1B-Instruct"
    assert model_name(Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert model_name(Path("/m/mistral-7b-v0.1.f16.gguf")) == "mistral-7b-v0.1"


def test_missing_path_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere", torch.float32)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_model(tmp_path, torch.float32)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="gpt2"):
        load_gguf(tmp_path / "g.gguf", torch.float32)


def test_attention_biases_are_refused_rather_than_dropped(tmp_path):
    tiny_llama(attention_bias=True).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="bias"):
        load_hf_dir(tmp_path, torch.float32)


@pytest.mark.parametrize("name,content", [("weights.bin", b"\0" * 16), ("notes.txt", b"hello"),
                                          ("broken.gguf", b"not a gguf file")])
def test_unreadable_files_are_model_load_errors(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / name, torch.float32)


def test_directory_without_safetensors_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_hf_dir(tmp_path, torch.float32)


def test_unsupported_dtype_is_refused():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(None, torch.int8)
