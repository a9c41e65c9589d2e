"""Batching never changes what a request generates: each prompt alone, all together, in prefill chunks,
mixed with other requests' decodes, capped in number, or preempted and recomputed, the tokens are the same."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tiny_models import prompt_of

NEW_TOKENS = 16
# Mixed lengths, two of them equal (the runner batches equal-length prefills into one attention call)
# and several longer than the 8-token budget and 8-token blocks used below.
PROMPTS = [prompt_of(n, seed=10 + i) for i, n in enumerate([1, 4, 9, 9, 17, 30])]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(tiny) -> list[list[int]]:
    """Each prompt's tokens when it has the engine to itself."""
    with tiny.engine() as engine:
        return [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def test_alone_outputs_are_transformers_greedy(tiny, alone):
    # Teacher-forced: each token is transformers' argmax after the tokens before it (one forward per prompt).
    assert alone == [tiny.reference_logits(p, out).argmax(-1).tolist() for p, out in zip(PROMPTS, alone)]


def test_batched_together_equals_alone(tiny, alone):
    with tiny.engine() as engine:
        outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == alone
    assert all(o.finish_reason == "length" and len(o.token_ids) == NEW_TOKENS for o in outputs)


def test_identical_prompts_batched_together_generate_identical_tokens(tiny, alone):
    with tiny.engine() as engine:
        outputs = engine.generate([PROMPTS[4]] * 4, GREEDY)
    assert [o.token_ids for o in outputs] == [alone[4]] * 4


@pytest.mark.parametrize("budget", [8, 5], ids=["budget8", "budget5_splits_blocks"])
def test_chunked_prefill_equals_alone(tiny, alone, budget):
    # Prompts of 9 to 30 tokens need two to six steps of prefill; a 5-token budget cuts chunks mid-block.
    with tiny.engine(max_num_batched_tokens=budget, enable_chunked_prefill=True) as engine:
        outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == alone


def test_whole_prompt_prefill_without_chunking_equals_alone(tiny, alone):
    # Without chunking, a prompt waits until the budget holds all of it, so steps hold fewer prompts.
    with tiny.engine(max_num_batched_tokens=32, enable_chunked_prefill=False) as engine:
        outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == alone


def test_max_num_seqs_cap_queues_requests_without_changing_outputs(tiny, alone, wait_for_stats):
    with tiny.engine(max_num_seqs=2) as engine:
        outputs = engine.generate(PROMPTS, GREEDY)
        stats = wait_for_stats(engine, lambda s: s.num_running["offline"] == 0)
    assert [o.token_ids for o in outputs] == alone
    # Later requests waited in the queue for a slot.
    assert outputs[-1].metrics.queued > outputs[0].metrics.queued
    assert stats.num_preemptions == 0


def test_prefills_mixed_with_running_decodes_equal_alone(tiny, alone):
    with tiny.engine(max_num_batched_tokens=8) as engine:
        first = engine.submit(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        # Wait until the first request is decoding, then bring in prefills that share its steps.
        early = [next(first) for _ in range(3)]
        assert not any(o.finished for o in early)
        later = [engine.submit(p, GREEDY) for p in PROMPTS[1:]]
        first_final = first.final()
        outputs = [s.final() for s in later]
    assert first_final.token_ids[:NEW_TOKENS] == alone[0]
    assert [o.token_ids for o in outputs] == alone[1:]


@pytest.mark.parametrize("budget", [2048, 8], ids=["whole_prefill", "chunked_prefill"])
def test_free_and_recompute_preemption_keeps_outputs(tiny, alone, budget, wait_for_stats):
    # 8 blocks of 8 tokens: any two of the long requests outgrow the pool while decoding, so the
    # latest admitted is preempted, its blocks freed, and its prompt plus output recomputed later.
    with tiny.engine(num_kv_blocks=8, max_num_batched_tokens=budget) as engine:
        assert engine.stats().num_free_blocks == 8
        outputs = engine.generate(PROMPTS, GREEDY)
        stats = wait_for_stats(engine, lambda s: s.num_free_blocks == 8)
    assert stats.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outputs) == stats.num_preemptions
    assert [o.token_ids for o in outputs] == alone


def test_seeded_sampling_survives_preemption(tiny):
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=100 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    with tiny.engine() as engine:
        alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, params)]
    with tiny.engine(num_kv_blocks=8) as engine:
        outputs = engine.generate(PROMPTS, params)
        assert engine.stats().num_preemptions > 0
    assert [o.token_ids for o in outputs] == alone
