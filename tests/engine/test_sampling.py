"""Sampling and stopping: seeds, temperature, top-k and top-p (in the engine and on forced distributions),
stop token ids, eos, min_tokens, max_tokens, stop strings and streamed text."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.request import Request, RequestClass
from engine.sampler import GREEDY_BLOCK, sample
from engine.sampling_params import SamplingParams
from tiny_models import prompt_of

PROMPT = prompt_of(6, seed=20)
OTHERS = [prompt_of(n, seed=21 + n) for n in (1, 9, 17)]


def sampled(seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(**({"max_tokens": 16, "temperature": 1.0, "seed": seed, "ignore_eos": True} | kw))


GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny):
    with tiny.engine() as e:
        yield e


@pytest.fixture(scope="module")
def greedy_tokens(engine) -> list[int]:
    return engine.generate([PROMPT], GREEDY)[0].token_ids


# ---- seeds ------------------------------------------------------------------------------------

def test_same_seed_same_tokens(engine):
    first, second = engine.generate([PROMPT, PROMPT], sampled(7))
    third = engine.generate([PROMPT], sampled(7))[0]
    assert first.token_ids == second.token_ids == third.token_ids
    assert len(first.token_ids) == 16


def test_seeded_tokens_do_not_depend_on_batch_or_submission_order(engine):
    alone = engine.generate([PROMPT], sampled(7))[0].token_ids
    others = [GREEDY, sampled(None), sampled(8, temperature=0.7, top_k=20)]
    batched = engine.generate([*OTHERS, PROMPT], [*others, sampled(7)])[-1]
    reordered = engine.generate([PROMPT, *reversed(OTHERS)], [sampled(7), *reversed(others)])[0]
    assert batched.token_ids == alone
    assert reordered.token_ids == alone


def test_different_seeds_give_different_tokens(engine):
    outputs = engine.generate([PROMPT] * 3, [sampled(1), sampled(2), sampled(3)])
    assert len({tuple(o.token_ids) for o in outputs}) == 3


def test_unseeded_sampling_varies_between_requests(engine):
    outputs = engine.generate([PROMPT] * 2, sampled(None))
    assert outputs[0].token_ids != outputs[1].token_ids


# ---- filters in the engine ----------------------------------------------------------------------

def test_sampling_differs_from_greedy(engine, greedy_tokens):
    # Guards the two tests below: at temperature 1 this model's choices are not all greedy ones.
    assert engine.generate([PROMPT], sampled(7))[0].token_ids != greedy_tokens


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_top_k_one_is_greedy(engine, greedy_tokens, temperature):
    out = engine.generate([PROMPT], sampled(7, top_k=1, temperature=temperature))[0]
    assert out.token_ids == greedy_tokens


def test_tiny_top_p_is_greedy(engine, greedy_tokens):
    out = engine.generate([PROMPT], sampled(7, top_p=1e-6))[0]
    assert out.token_ids == greedy_tokens


def test_sampled_tokens_stay_within_top_k_of_the_reference_logits(tiny, engine):
    outputs = engine.generate([PROMPT] * 4, [sampled(s, top_k=3, temperature=2.0, max_tokens=24) for s in range(4)])
    outside, not_argmax = [], 0
    for out in outputs:
        logits = tiny.reference_logits(PROMPT, out.token_ids)
        top3 = logits.topk(3, dim=-1).indices.tolist()
        outside += [(i, t) for i, t in enumerate(out.token_ids) if t not in top3[i]]
        not_argmax += sum(t != top3[i][0] for i, t in enumerate(out.token_ids))
    assert outside == []
    assert not_argmax > 0  # a hot temperature spreads the picks over more than the argmax


# ---- the sampler on forced distributions --------------------------------------------------------

PROBS = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04, 0.0, 0.0, 0.0])
DRAWS = 4000


def draw(params: SamplingParams, n: int = DRAWS, probs: torch.Tensor = PROBS) -> Counter:
    """n tokens the sampler picks, one row at a time, from logits whose softmax is probs."""
    request = Request("r", [0], params, RequestClass.ONLINE, frozenset(), max_model_len=1 << 20)
    logits = probs.log().unsqueeze(0)
    return Counter(sample(logits.clone(), [request])[0] for _ in range(n))


def assert_frequencies(counts: Counter, expected: list[float]) -> None:
    # Within 5 standard deviations of each expected probability (the draws are seeded: no flakes).
    for token, p in enumerate(expected):
        sd = math.sqrt(max(p * (1 - p), 1e-12) / DRAWS)
        assert abs(counts[token] / DRAWS - p) <= 5 * sd + 1e-9, (token, counts[token] / DRAWS, p)


def test_temperature_one_draws_the_model_distribution():
    counts = draw(sampled(0))
    assert set(counts) == {0, 1, 2, 3, 4}
    assert_frequencies(counts, PROBS.tolist())


def test_low_temperature_sharpens_the_distribution():
    counts = draw(sampled(0, temperature=0.5))
    sharpened = PROBS ** 2 / (PROBS ** 2).sum()  # p^(1/T)
    assert_frequencies(counts, sharpened.tolist())


def test_top_k_draws_only_the_k_likeliest_renormalised():
    counts = draw(sampled(0, top_k=2))
    assert set(counts) == {0, 1}
    assert_frequencies(counts, [0.4 / 0.7, 0.3 / 0.7])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 + 0.3 = 0.7 < 0.75, so the nucleus needs token 2 as well (0.9), and no more.
    counts = draw(sampled(0, top_p=0.75))
    assert set(counts) == {0, 1, 2}
    assert_frequencies(counts, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9])


def test_top_k_and_top_p_together_apply_both_cuts():
    counts = draw(sampled(0, top_k=3, top_p=0.5))  # top_k keeps 0-2, then 0.4 < 0.5 needs token 1
    assert set(counts) == {0, 1}


def test_greedy_and_sampled_rows_in_one_batch():
    greedy = Request("g", [0], GREEDY, RequestClass.ONLINE, frozenset(), max_model_len=1 << 20)
    hot = Request("s", [0], sampled(3, top_k=2), RequestClass.ONLINE, frozenset(), max_model_len=1 << 20)
    logits = torch.stack([torch.tensor([0.1, 0.2, 3.0, 0.3]), torch.tensor([5.0, 4.9, -2.0, -3.0])])
    picks = [sample(logits.clone(), [greedy, hot]) for _ in range(200)]
    assert all(g == 2 for g, _ in picks)
    assert {s for _, s in picks} == {0, 1}


def test_min_tokens_bans_stop_ids_in_the_sampler_and_skips_ids_beyond_the_vocabulary():
    params = SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2, stop_token_ids=[0, 99])
    request = Request("r", [0], params, RequestClass.ONLINE, frozenset({2}), max_model_len=1 << 20)
    assert sample(PROBS.log().unsqueeze(0), [request]) == [1]  # 0 (stop id) and 2 (eos) held back
    request.append_token(1)
    request.append_token(1)
    assert sample(PROBS.log().unsqueeze(0), [request]) == [0]  # min_tokens reached


def test_seeded_sampler_rows_repeat_whatever_else_is_in_the_batch():
    def run(batch_size: int) -> list[int]:
        reqs = [Request(f"r{i}", [0], sampled(11 if i == 0 else None), RequestClass.ONLINE, frozenset(), 1 << 20)
                for i in range(batch_size)]
        logits = PROBS.log().expand(batch_size, -1)
        return [sample(logits.clone(), reqs)[0] for _ in range(50)]

    assert run(1) == run(5)


# ---- stopping -----------------------------------------------------------------------------------

def first_new_token_at(tokens: list[int], minimum: int) -> int:
    """Index of the first token at or after minimum that does not occur before it."""
    return next(i for i in range(minimum, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_gives_length_with_exactly_that_many_tokens(engine, greedy_tokens, max_tokens):
    out = engine.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert out.token_ids == greedy_tokens[:max_tokens]
    assert out.num_output_tokens == max_tokens


def test_stop_token_id_ends_generation_with_stop(engine, greedy_tokens):
    k = first_new_token_at(greedy_tokens, 4)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop_token_ids=[greedy_tokens[k]])
    out = engine.generate([PROMPT], params)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy_tokens[: k + 1]  # the stop token is reported, then nothing more


def test_eos_stops_unless_ignore_eos(tiny, greedy_tokens):
    k = first_new_token_at(greedy_tokens, 4)
    with tiny.with_eos(greedy_tokens[k]).engine() as engine:
        stopped, ignored = engine.generate(
            [PROMPT, PROMPT], [SamplingParams(max_tokens=16, temperature=0.0),
                               SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)])
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", greedy_tokens[: k + 1])
    assert (ignored.finish_reason, ignored.token_ids) == ("length", greedy_tokens)


@torch.inference_mode()
def reference_with_min_tokens(tiny, prompt: list[int], stop: int, min_tokens: int, max_tokens: int) -> list[int]:
    """Greedy with transformers, the stop token banned until min_tokens tokens exist, stopping on it after."""
    ids = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        logits = tiny.hf(torch.tensor([ids])).logits[0, -1]
        if len(out) < min_tokens:
            logits[stop] = float("-inf")
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token == stop:
            break
    return out


def min_tokens_case(tiny, greedy_tokens: list[int]) -> tuple[int, int, list[int]]:
    """A token greedy decoding emits early, a min_tokens past that point, and the reference output with
    the token held back until then, chosen so that the reference does emit it later and stop there."""
    for k in range(1, 12):
        stop = greedy_tokens[k]
        if stop in greedy_tokens[:k]:
            continue
        expected = reference_with_min_tokens(tiny, PROMPT, stop, k + 2, 24)
        if expected[-1] == stop:
            return stop, k + 2, expected
    pytest.fail("no early greedy token recurs after min_tokens: choose another PROMPT")


@pytest.mark.parametrize("how", ["eos", "stop_token_ids"])
def test_min_tokens_holds_back_stopping_until_reached(tiny, greedy_tokens, how):
    stop, min_tokens, expected = min_tokens_case(tiny, greedy_tokens)
    assert stop in greedy_tokens[:min_tokens] and stop not in expected[:min_tokens]
    params = SamplingParams(max_tokens=24, temperature=0.0, min_tokens=min_tokens,
                            stop_token_ids=[stop] if how == "stop_token_ids" else [],
                            ignore_eos=how == "stop_token_ids")
    with (tiny.with_eos(stop) if how == "eos" else tiny).engine() as engine:
        out = engine.generate([PROMPT], params)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == expected and len(expected) > min_tokens


# ---- stop strings and streamed text (real tokenizer) ----------------------------------------------

COUNT = [{"role": "user", "content": "Count from 1 to 10."}]
STOP_CASES = {
    "plain": dict(),
    "stop": dict(stop=["4."]),
    "stop_spanning_tokens": dict(stop=["3\n4"]),
    "earliest_of_several": dict(stop=["5.", "3."]),
    "include_stop": dict(stop=["4."], include_stop_str_in_output=True),
    "never_seen": dict(stop=["zebra"]),
}


@pytest.fixture(scope="module")
def counting(smollm2_engine):
    """Every stop case of the bundled model counting, run as one batch (greedy, so batch-independent),
    each as a stream whose deltas are kept."""
    streams = {name: smollm2_engine.stream(COUNT, SamplingParams(max_tokens=24, temperature=0.0, **kw))
               for name, kw in STOP_CASES.items()}
    return {name: list(s) for name, s in streams.items()}


def test_counting_reference_contains_the_stop_strings(counting):
    text = counting["plain"][-1].text
    assert text.startswith("1. 1\n2. 2\n3. 3\n4. 4\n5. 5"), text
    assert counting["plain"][-1].finish_reason == "length"


@pytest.mark.parametrize("case", ["stop", "stop_spanning_tokens", "earliest_of_several", "include_stop"])
def test_stop_string_truncates_text_and_ends_with_stop(smollm2, counting, case):
    reference = counting["plain"][-1]
    out = counting[case][-1]
    stops = STOP_CASES[case]["stop"]
    at, stop = min((reference.text.index(s), s) for s in stops)
    kept = at + len(stop) if STOP_CASES[case].get("include_stop_str_in_output") else at
    assert out.finish_reason == "stop"
    assert out.text == reference.text[:kept]
    # Generation ended on the token that completed the stop string, not later.
    n = len(out.token_ids)
    assert out.token_ids == reference.token_ids[:n]
    decode = smollm2.tokenizer.decode
    assert stop in decode(out.token_ids) and stop not in decode(out.token_ids[:-1])


def test_stop_string_that_never_appears_changes_nothing(counting):
    out, reference = counting["never_seen"][-1], counting["plain"][-1]
    assert (out.finish_reason, out.text, out.token_ids) == ("length", reference.text, reference.token_ids)


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_streamed_deltas_concatenate_to_the_final_text(counting, case):
    outputs = counting[case]
    final = outputs[-1]
    assert final.finished and not any(o.finished for o in outputs[:-1])
    assert "".join(o.delta for o in outputs) == final.text
    assert [t for o in outputs for t in o.new_token_ids] == final.token_ids


@pytest.mark.parametrize("seed", range(4))
def test_streamed_deltas_of_random_byte_level_tokens_keep_characters_whole(tiny_with_real_tokenizer, seed):
    # Random ids from a byte-level vocabulary split many multi-byte characters across tokens.
    tiny = tiny_with_real_tokenizer
    prompt = prompt_of(5, seed=seed, vocab_size=tiny.config.vocab_size)
    with tiny.engine() as engine:
        outputs = list(engine.stream(prompt, sampled(seed, max_tokens=40)))
    final = outputs[-1]
    assert len(final.token_ids) == 40
    assert "".join(o.delta for o in outputs) == final.text == tiny.tokenizer.decode(final.token_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1100, 4096, 5000])
def test_greedy_rows_pick_the_first_largest_logit_as_argmax_does(dtype, vocab):
    """Greedy rows are reduced block by block on the CPU: ties inside a block, across blocks and with
    the short tail after the last whole block must still give argmax's first index."""
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    top = logits.amax(dim=-1)
    for row, places in enumerate([[], [3, 9], [GREEDY_BLOCK - 1, GREEDY_BLOCK], [vocab - 1],
                                     [vocab - 1, 2], [vocab - 2, vocab - 1]]):
        for place in places:
            logits[row, place] = top[row]
    requests = [Request(f"r{i}", [1], GREEDY, RequestClass.ONLINE, frozenset(), 1 << 20) for i in range(6)]
    assert sample(logits, requests) == logits.float().argmax(dim=-1).tolist()
