"""Tiny random-weight Llama-family models built in memory, the engines that serve them, and
transformers' greedy output on the same weights as the reference."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import LoadedModel
from engine.model_config import ModelConfig
from engine.tokenizer import Tokenizer

TINY_LLAMA = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=10000.0,
    bos_token_id=1, eos_token_id=2,
    # Five times the usual 0.02, so each next-token distribution has a clear winner (top-1/top-2 logit
    # gaps of 1e-2 rather than 1e-3): two correct float32 implementations then agree on every greedy
    # choice, and a real bug (wrong position, wrong mask) moves the logits by far more than the gap.
    initializer_range=0.1,
)

# The device the engine tests run their engines on: the CPU (CI), or CONSERVE_TEST_DEVICE=cuda to run the
# same suite through the engine's CUDA path (the transformers reference stays on the CPU).
TEST_DEVICE = os.environ.get("CONSERVE_TEST_DEVICE", "cpu")

# Engine settings for exact comparisons: float32, blocks small enough that short prompts already span
# several of them.
# A short profile: tiny models' steps take about a millisecond, so a second holds plenty of samples.
EXACT = dict(dtype="float32", device=TEST_DEVICE, block_size=8, num_kv_blocks=64, profile_seconds=1.0)


@dataclass
class TinyModel:
    hf: Any                       # transformers *ForCausalLM in eval mode: the reference
    config: ModelConfig           # the engine's view of hf.config
    tokenizer: Tokenizer | None = None

    def loaded(self) -> LoadedModel:
        """A fresh LoadedModel each call (the engine empties the tensor dict it is given). Tied models
        ship no lm_head tensor, as real checkpoints do, so the engine must tie it itself."""
        tensors = {name: t.detach().clone() for name, t in self.hf.state_dict().items()
                   if not (name == "lm_head.weight" and self.config.tie_word_embeddings)}
        return LoadedModel(self.config, tensors, self.tokenizer, "tiny")

    def engine(self, **settings: Any) -> Engine:
        """An engine on this model: float32 on TEST_DEVICE unless settings say otherwise."""
        return Engine(EngineConfig(**(EXACT | settings)), loaded=self.loaded())

    def with_eos(self, *eos_token_ids: int) -> "TinyModel":
        """The same weights with other end-of-sequence ids (used when the model has no tokenizer)."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, eos_token_ids=eos_token_ids))

    @torch.inference_mode()
    def reference_greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """transformers' greedy continuation of prompt, never stopping early.

        eos is switched off rather than held back with min_new_tokens: min_new_tokens works by
        banning eos, which changes the choice wherever eos is the argmax, while the engine's
        ignore_eos only stops it from ending generation."""
        ids = torch.tensor([list(prompt)])
        out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    @torch.inference_mode()
    def reference_logits(self, prompt: Sequence[int], output: Sequence[int]) -> torch.Tensor:
        """transformers' next-token logits [len(output), vocab] at each output position, teacher-forced."""
        ids = torch.tensor([list(prompt) + list(output)])
        logits = self.hf(ids).logits[0]
        return logits[len(prompt) - 1: len(prompt) - 1 + len(output)].float()


def build_tiny_model(model_type: str = "llama", *, seed: int = 0, tokenizer: Tokenizer | None = None,
                     **overrides: Any) -> TinyModel:
    """A random-weight model of transformers' own class, so the reference is transformers itself."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[model_type]
    hf_config = config_cls(**(TINY_LLAMA | overrides))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = model_cls(hf_config).eval()
    hf.generation_config.eos_token_id = None
    return TinyModel(hf, ModelConfig.from_hf_dict(hf_config.to_dict()), tokenizer)


def prompt_of(length: int, seed: int = 0, vocab_size: int = TINY_LLAMA["vocab_size"]) -> list[int]:
    """A reproducible random prompt of token ids (ids 0-2, the special ones, left out)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (length,), generator=g).tolist()
