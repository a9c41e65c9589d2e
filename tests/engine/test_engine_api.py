"""The engine's public API: abort (blocks returned, streams closed), clear errors for bad input while
everyone else is served, async streams, shutdown, and the statistics it reports."""
from __future__ import annotations

import asyncio
import threading

import pytest

from engine.errors import EngineError, InvalidRequestError
from engine.output import RequestOutput, RequestStream
from engine.sampling_params import SamplingParams
from tiny_models import prompt_of

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# Runs for thousands of steps unless aborted, so an abort always lands mid-generation.
ENDLESS = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
LONG_CONTEXT = dict(max_model_len=4096, num_kv_blocks=512)
IDLE = {"online": 0, "offline": 0}


def finish_within(stream: RequestStream, seconds: float = 30.0) -> list[RequestOutput]:
    """Every output of stream, failing the test (rather than hanging it) if it has not ended in time."""
    outputs: list[RequestOutput] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            outputs.extend(stream)
        except BaseException as e:  # handed to the test thread below
            errors.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    if reader.is_alive():
        pytest.fail(f"stream {stream.request_id} did not end within {seconds} s")
    if errors:
        raise errors[0]
    return outputs


PROMPT = prompt_of(5, seed=30)


@pytest.fixture(scope="module")
def expected(tiny) -> list[int]:
    """The greedy output a healthy engine gives for PROMPT."""
    return tiny.reference_greedy(PROMPT, GREEDY.max_tokens)


# ---- abort --------------------------------------------------------------------------------------

def test_abort_while_waiting_and_while_running_frees_every_block(tiny, wait_for_stats):
    with tiny.engine(max_num_seqs=1, **LONG_CONTEXT) as engine:
        total = engine.stats().num_free_blocks
        running = engine.submit(prompt_of(20, seed=31), ENDLESS)
        first = next(running)  # it has been prefilled and holds blocks
        waiting = engine.submit(prompt_of(12, seed=32), ENDLESS)
        wait_for_stats(engine, lambda s: s.num_waiting["online"] == 1 and s.num_free_blocks < total)

        engine.abort(waiting.request_id)
        waited = finish_within(waiting)
        assert len(waited) == 1
        assert (waited[0].finish_reason, waited[0].token_ids) == ("abort", [])

        engine.abort(running.request_id)
        outputs = [first, *finish_within(running)]
        final = outputs[-1]
        assert final.finished and final.finish_reason == "abort"
        assert 1 <= len(final.token_ids) < ENDLESS.max_tokens
        assert [t for o in outputs for t in o.new_token_ids] == final.token_ids

        stats = wait_for_stats(engine, lambda s: s.num_free_blocks == total)
        assert (stats.num_running, stats.num_waiting, stats.kv_usage) == (IDLE, IDLE, 0.0)


def test_abort_in_the_middle_of_a_chunked_prefill_frees_every_block(tiny, wait_for_stats):
    with tiny.engine(max_num_batched_tokens=8, **LONG_CONTEXT) as engine:
        total = engine.stats().num_free_blocks
        stream = engine.submit(prompt_of(400, seed=33), ENDLESS)
        wait_for_stats(engine, lambda s: s.num_free_blocks < total)
        stream.cancel()
        assert finish_within(stream)[-1].finish_reason == "abort"
        wait_for_stats(engine, lambda s: s.num_free_blocks == total)


def test_aborting_one_request_leaves_the_others_unchanged(tiny, expected, wait_for_stats):
    with tiny.engine(**LONG_CONTEXT) as engine:
        total = engine.stats().num_free_blocks
        doomed = engine.submit(prompt_of(9, seed=34), ENDLESS)
        next(doomed)
        others = [engine.submit(PROMPT, GREEDY) for _ in range(2)]
        engine.abort(doomed.request_id)
        engine.abort("no-such-request")  # unknown ids are ignored
        assert finish_within(doomed)[-1].finish_reason == "abort"
        assert [finish_within(s)[-1].token_ids for s in others] == [expected, expected]
        assert engine.generate([PROMPT], GREEDY)[0].token_ids == expected
        wait_for_stats(engine, lambda s: s.num_free_blocks == total)


def test_shutdown_ends_every_open_stream_with_abort(tiny):
    engine = tiny.engine(**LONG_CONTEXT)
    running = engine.submit(prompt_of(7, seed=35), ENDLESS)
    next(running)
    just_submitted = engine.submit(prompt_of(7, seed=36), ENDLESS)
    engine.shutdown()
    assert finish_within(running, 5)[-1].finish_reason == "abort"
    # A request the engine thread had not yet picked up must not be left hanging either.
    assert finish_within(just_submitted, 5)[-1].finish_reason == "abort"
    with pytest.raises(InvalidRequestError, match="shut down"):
        engine.submit(PROMPT, GREEDY)


# ---- bad input ----------------------------------------------------------------------------------

MAX_MODEL_LEN = 32
VOCAB = 384

BAD_REQUESTS = {
    "empty_text": (dict(prompt=""), "prompt is empty"),
    "empty_token_list": (dict(prompt=[]), "prompt is empty"),
    "prompt_fills_the_context": (dict(prompt=prompt_of(32)), "prompt has 32 tokens but the context holds 32"),
    "prompt_beyond_the_context": (dict(prompt=prompt_of(100)), "prompt has 100 tokens but the context holds 32"),
    "token_id_at_vocab_size": (dict(prompt=[5, VOCAB]), r"token ids must be in \[0, 384\)"),
    "negative_token_id": (dict(prompt=[-1, 5]), r"token ids must be in \[0, 384\)"),
    "float_token": (dict(prompt=[5, 1.5]), "prompt must be text, a list of token ids, or a list of chat messages"),
    "bool_token": (dict(prompt=[True]), "prompt must be text, a list of token ids, or a list of chat messages"),
    "text_without_tokenizer": (dict(prompt="hello"), "no tokenizer; send token ids"),
    "max_tokens_zero": (dict(max_tokens=0), r"max_tokens must be an integer >= 1, got 0"),
    "max_tokens_negative": (dict(max_tokens=-5), r"max_tokens must be an integer >= 1, got -5"),
    "max_tokens_not_int": (dict(max_tokens=2.5), r"max_tokens must be an integer >= 1, got 2.5"),
    "temperature_negative": (dict(temperature=-0.5), r"temperature must be a number between 0 and 100, got -0.5"),
    "top_p_zero": (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    "top_p_above_one": (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    "top_k_below_minus_one": (dict(top_k=-2), r"top_k must be an integer >= -1"),
    "min_tokens_above_max_tokens": (dict(min_tokens=9, max_tokens=8), "min_tokens must be an integer between 0 and"),
    "empty_stop_string": (dict(stop=[""]), "stop must be a list of non-empty strings"),
    "negative_stop_token": (dict(stop_token_ids=[-3]), "stop_token_ids must be a list of non-negative integers"),
    "stop_not_a_list": (dict(stop=5), "stop must be a list of non-empty strings, got 5"),
    "stop_token_ids_not_a_list": (dict(stop_token_ids=7), "stop_token_ids must be a list of non-negative integers"),
    "seed_not_int": (dict(seed="7"), "seed must be an integer"),
    "unknown_request_class": (dict(request_class="batch"), "request_class must be 'online' or 'offline', got 'batch'"),
}


@pytest.fixture(scope="module")
def short_context_engine(tiny):
    with tiny.engine(max_model_len=MAX_MODEL_LEN) as engine:
        yield engine


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_refused_with_a_clear_error_and_others_are_served(short_context_engine, expected, case):
    engine = short_context_engine
    fields, message = BAD_REQUESTS[case]
    kwargs = dict(fields)
    prompt = kwargs.pop("prompt", PROMPT)
    request_class = kwargs.pop("request_class", "online")
    good = engine.submit(PROMPT, GREEDY)  # in flight while the bad one is refused
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit(prompt, SamplingParams(**({"max_tokens": 8} | kwargs)), request_class=request_class)
    assert finish_within(good)[-1].token_ids == expected
    assert engine.generate([PROMPT], GREEDY)[0].token_ids == expected


def test_generation_stops_with_length_where_the_context_ends(short_context_engine):
    params = SamplingParams(max_tokens=50, temperature=0.0)
    out = short_context_engine.generate([prompt_of(MAX_MODEL_LEN - 3)], params)[0]
    assert (out.finish_reason, len(out.token_ids)) == ("length", 3)


def test_unknown_sampling_parameter_is_named():
    with pytest.raises(InvalidRequestError, match=r"unknown sampling parameter\(s\) \['max_tokns'\].*max_tokens"):
        SamplingParams.from_dict({"max_tokns": 5, "temperature": 0.0})


def test_from_dict_validates_values():
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams.from_dict({"temperature": -1})
    assert SamplingParams.from_dict({"max_tokens": 3, "stop": "END"}).stop == ["END"]


def test_null_stop_lists_mean_no_stops():
    params = SamplingParams.from_dict({"stop": None, "stop_token_ids": None})
    assert (params.stop, params.stop_token_ids) == ([], [])


def test_stop_token_id_beyond_the_vocabulary_never_fails_other_requests(short_context_engine, expected):
    # min_tokens makes the sampler hold stop ids back, which once indexed the logits with this id and
    # failed the whole step. Refusing the id up front would be as good as serving the request.
    engine = short_context_engine
    good = engine.submit(PROMPT, GREEDY)
    odd_params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, min_tokens=2,
                                stop_token_ids=[VOCAB + 1000])
    try:
        odd = engine.submit(PROMPT, odd_params)
    except InvalidRequestError as e:
        assert "stop_token_ids" in str(e)
        odd = None
    assert finish_within(good)[-1].token_ids == expected
    if odd is not None:
        final = finish_within(odd)[-1]
        assert (final.finish_reason, final.token_ids) == ("length", expected)


def test_duplicate_request_id_is_refused(tiny, expected):
    with tiny.engine(**LONG_CONTEXT) as engine:
        first = engine.submit(PROMPT, ENDLESS, request_id="same")
        with pytest.raises(InvalidRequestError, match="request id 'same' is already in use"):
            engine.submit(PROMPT, GREEDY, request_id="same")
        first.cancel()
        assert finish_within(first)[-1].finish_reason == "abort"


def test_generate_needs_one_params_or_one_per_prompt(tiny):
    with tiny.engine() as engine:
        with pytest.raises(InvalidRequestError, match="one per prompt"):
            engine.generate([PROMPT, PROMPT], [GREEDY])


# ---- settings a step can never serve -----------------------------------------------------------
# Without chunked prefill a step must hold a request's whole uncomputed part: its prompt at first, its
# prompt plus output after a preemption. vLLM refuses max_num_batched_tokens below max_model_len in that
# mode; refusing such requests at submit would also do. Queueing them for a step that can never come
# (holding up everyone behind them) would not.

def engine_unless_refused(tiny, **settings):
    """The engine, or None where the settings themselves are refused with an error that names the budget."""
    try:
        return tiny.engine(**settings)
    except (EngineError, ValueError) as e:
        assert "max_num_batched_tokens" in str(e)
        return None


def test_without_chunked_prefill_a_prompt_beyond_the_step_budget_is_refused(tiny, expected):
    engine = engine_unless_refused(tiny, enable_chunked_prefill=False, max_num_batched_tokens=16)
    if engine is None:
        return
    with engine:
        with pytest.raises(InvalidRequestError, match="20 tokens"):
            engine.submit(prompt_of(20, seed=60), GREEDY)
        assert engine.generate([PROMPT], GREEDY)[0].token_ids == expected


def test_without_chunked_prefill_a_request_preempted_after_outgrowing_the_step_budget_finishes(tiny):
    engine = engine_unless_refused(tiny, enable_chunked_prefill=False, max_num_batched_tokens=32, num_kv_blocks=8)
    if engine is None:
        return
    # 17 + 30 prompt tokens fill 7 of the 8 blocks. As both decode, the 30-token request (admitted last)
    # is preempted once it holds 38 tokens: recomputing them needs more than the 32-token budget.
    prompts = [prompt_of(17, seed=61), prompt_of(30, seed=62)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with engine:
        streams = [engine.submit(p, params) for p in prompts]
        finals = [finish_within(s, 10)[-1] for s in streams]
    for prompt, final in zip(prompts, finals):
        assert final.finish_reason == "length" and final.token_ids
        assert final.token_ids == tiny.reference_greedy(prompt, 16)[: len(final.token_ids)]


# ---- async streams ------------------------------------------------------------------------------

def test_async_stream_yields_deltas_then_one_final_output(tiny_with_real_tokenizer):
    tiny = tiny_with_real_tokenizer
    prompt = prompt_of(6, seed=37, vocab_size=tiny.config.vocab_size)

    async def consume(engine):
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        return [out async for out in engine.submit(prompt, params)]

    with tiny.engine() as engine:
        outputs = asyncio.run(consume(engine))
    final = outputs[-1]
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert final.finish_reason == "length" and len(final.token_ids) == 12
    assert [t for o in outputs for t in o.new_token_ids] == final.token_ids == tiny.reference_greedy(prompt, 12)
    assert "".join(o.delta for o in outputs) == final.text == tiny.tokenizer.decode(final.token_ids)


def test_two_concurrent_async_streams(tiny):
    prompts = [prompt_of(3, seed=38), prompt_of(11, seed=39)]
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)]

    async def consume(engine, prompt, sp, request_class):
        tokens, finals = [], []
        async for out in engine.submit(prompt, sp, request_class=request_class):
            tokens += out.new_token_ids
            finals += [out] if out.finished else []
        return tokens, finals

    async def both(engine):
        return await asyncio.gather(consume(engine, prompts[0], params[0], "online"),
                                    consume(engine, prompts[1], params[1], "offline"))

    with tiny.engine() as engine:
        results = asyncio.run(both(engine))
    for prompt, sp, (tokens, finals) in zip(prompts, params, results):
        assert len(finals) == 1 and finals[0].token_ids == tokens
        assert tokens == tiny.reference_greedy(prompt, sp.max_tokens)


# ---- statistics ---------------------------------------------------------------------------------

def test_stats_count_tokens_steps_and_busy_time(tiny, wait_for_stats):
    prompts = [prompt_of(n, seed=40 + n) for n in (2, 5, 13)]
    with tiny.engine() as engine:
        before = engine.stats()
        assert (before.num_steps, before.generation_tokens, before.prompt_tokens) == (0, 0, 0)
        assert before.num_free_blocks == before.num_total_blocks == 64
        outputs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        idle = wait_for_stats(engine, lambda s: s.num_running == IDLE and s.num_free_blocks == 64)
        assert (idle.num_waiting, idle.kv_usage) == (IDLE, 0.0)
    # Counters are added up after a step's outputs go out; once the engine thread has stopped, all are in.
    stats = engine.stats()
    assert stats.generation_tokens == sum(len(o.token_ids) for o in outputs) == 18
    assert stats.prompt_tokens == 2 + 5 + 13
    assert stats.num_steps >= 6 and stats.num_preemptions == 0
    assert 0 < stats.busy_seconds <= stats.uptime_seconds
    for prompt, out in zip(prompts, outputs):
        assert (out.num_prompt_tokens, out.num_output_tokens) == (len(prompt), 6)
        m = out.metrics
        assert 0 <= m.queued <= m.time_to_first_token <= m.e2e and m.num_preemptions == 0


def test_stats_count_running_requests_by_class(tiny, wait_for_stats):
    with tiny.engine(**LONG_CONTEXT) as engine:
        online = engine.submit(prompt_of(4, seed=50), ENDLESS, request_class="online")
        offline = engine.submit(prompt_of(4, seed=51), ENDLESS, request_class="offline")
        busy = wait_for_stats(engine, lambda s: s.num_running == {"online": 1, "offline": 1})
        assert busy.num_free_blocks < busy.num_total_blocks and busy.kv_usage > 0
        online.cancel()
        offline.cancel()
        finish_within(online), finish_within(offline)
        wait_for_stats(engine, lambda s: s.num_running == IDLE and s.num_free_blocks == s.num_total_blocks)


@pytest.mark.parametrize("settings", [
    dict(block_size=0), dict(max_num_seqs=0), dict(max_num_batched_tokens=-5), dict(num_kv_blocks=0),
    dict(dtype="int8"), dict(device="tpu"), dict(gpu_memory_utilization=1.5), dict(decode_graphs="yes"),
    dict(decode_graphs="on", decode_mirror_bytes=1 << 20),
])
def test_bad_engine_settings_are_refused_before_loading(settings):
    from engine.config import EngineConfig
    from engine.engine import Engine
    with pytest.raises(InvalidRequestError):
        Engine(EngineConfig(**settings))


def test_default_host_store_is_twice_the_pool_within_a_share_of_ram_split_between_gpus():
    from engine.engine import HOST_STORE_RAM_SHARE, default_store_blocks
    gib, mib = 1 << 30, 1 << 20
    assert default_store_blocks(1000, mib, 100 * gib, gpus=1) == 2000
    capped = int(HOST_STORE_RAM_SHARE * 100 * gib) // mib
    assert default_store_blocks(10**6, mib, 100 * gib, gpus=1) == capped
    # Eight workers on an eight-GPU host, each seeing every GPU, take an eighth of the share each.
    assert default_store_blocks(10**6, mib, 100 * gib, gpus=8) == int(HOST_STORE_RAM_SHARE * 100 * gib / 8) // mib
