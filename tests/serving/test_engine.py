"""The engine without Ray: batching must not change greedy tokens; stops, limits and cancellation."""

from __future__ import annotations

import asyncio
import queue
import threading

import pytest
import torch
from engine_watch import wait_idle
from greedy import greedy_reference as _reference
from transformers import AutoModelForCausalLM

from serving import attention
from serving.engine import Engine, PromptTooLong, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_export):
    eng = Engine.from_export(tiny_export, max_batch_size=8)
    yield eng
    eng.close()


PREFIXES = [
    "def add(a, b):\n    ",
    "import os\n\nclass Config:\n    def __init__(self, path):\n        self.path = ",
    "for i in range(10):\n",
    "x = ",
    "def parse(text):\n    '''Split text into words.'''\n    words = []\n    for line in text.splitlines():\n        ",
    "if __name__ == '__main__':\n    ",
]


def _prompts(engine: Engine) -> list[list[int]]:
    return [engine.encode(engine.infill_prompt(p, "\n    return result\n")) for p in PREFIXES]


@pytest.fixture(scope="module")
def reference_model(tiny_export):
    """The same weights as transformers loads them by default (sdpa attention): the engine on a CPU
    uses serving.attention, so the reference must not share its model."""
    return AutoModelForCausalLM.from_pretrained(str(tiny_export), attn_implementation="sdpa").eval()


def test_the_engine_on_a_cpu_uses_its_own_attention(engine):
    assert engine.model.config._attn_implementation == attention.NAME


def _run_concurrently(engine: Engine, prompts: list[list[int]], params: SamplingParams):
    results = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = engine.generate(prompts[i], params)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_batched_greedy_equals_sequential_generate(engine, reference_model):
    prompts = _prompts(engine)
    steps_before = engine.steps
    results = _run_concurrently(engine, prompts, SamplingParams(max_tokens=24))
    # Requests shared decode steps: far fewer steps than tokens generated.
    assert engine.steps - steps_before < sum(r.completion_tokens for r in results)
    for ids, result in zip(prompts, results, strict=True):
        assert result.token_ids == _reference(reference_model, engine, ids, 24)
        assert result.text == engine.tokenizer.decode(result.token_ids)
        assert result.prompt_tokens == len(ids)


def test_an_edited_prompt_reuses_the_earlier_prompts_work_and_decodes_the_same(engine, reference_model):
    import sysconfig
    from pathlib import Path

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[2000:2600]
    before = engine.encode(engine.infill_prompt(text, "\n    return result\n"))
    after = engine.encode(engine.infill_prompt(text + "x = ", "\n    return result\n"))  # the user typed
    common = next(i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b)
    assert common >= 64
    first = engine.generate(before, SamplingParams(max_tokens=8))
    second = engine.generate(after, SamplingParams(max_tokens=8))
    assert first.cached_tokens == 0  # nothing like it was seen before
    assert second.cached_tokens == common
    assert second.token_ids == _reference(reference_model, engine, after, 8)


def test_max_tokens_is_honoured(engine):
    result = engine.generate(_prompts(engine)[0], SamplingParams(max_tokens=5))
    assert (result.finish_reason, result.completion_tokens, len(result.token_ids)) == ("length", 5, 5)


def test_stop_string_cuts_the_text(engine):
    ids = _prompts(engine)[1]
    full = engine.generate(ids, SamplingParams(max_tokens=40)).text
    stop = full[10:13]
    assert stop.strip(), "the gibberish should hold a printable stop candidate"
    cut = engine.generate(ids, SamplingParams(max_tokens=40, stop=("@@never@@", stop)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_stop_token_from_metadata_ends_the_completion(engine, tiny_export):
    ids = _prompts(engine)[2]
    greedy = engine.generate(ids, SamplingParams(max_tokens=20)).token_ids
    k = next(i for i, t in enumerate(greedy) if i >= 3 and t not in greedy[:i])
    stop_token = engine.tokenizer.convert_ids_to_tokens(greedy[k])
    meta = engine.metadata.model_copy(update={"stop_tokens": [stop_token]})
    other = Engine(engine.model, engine.tokenizer, meta, max_batch_size=2)
    try:
        result = other.generate(ids, SamplingParams(max_tokens=20))
    finally:
        other.close()
    assert result.finish_reason == "stop"
    assert result.token_ids == greedy[:k]
    assert result.completion_tokens == k + 1  # the stop token is counted, not returned


def test_sampling_differs_from_greedy_and_is_seeded(engine):
    ids = _prompts(engine)[3]
    greedy = engine.generate(ids, SamplingParams(max_tokens=12)).token_ids
    a = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=7)).token_ids
    b = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=7)).token_ids
    c = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=8)).token_ids
    narrow = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=3)).token_ids
    assert a == b  # same seed, same tokens
    assert a != c  # another seed, other tokens (random weights: the distribution is nearly flat)
    assert a != greedy  # temperature > 0 samples
    assert narrow == greedy  # a nucleus of one token is the argmax


def test_top_p_samples_only_from_the_nucleus(engine, reference_model):
    """Every sampled token lies in the smallest set of tokens whose probability reaches top_p."""
    ids, top_p = _prompts(engine)[0], 0.3
    for seed in range(3):
        out = engine.generate(ids, SamplingParams(max_tokens=16, temperature=1.0, top_p=top_p, seed=seed)).token_ids
        with torch.no_grad():
            logits = reference_model(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1 :]
        probs = torch.softmax(logits.float(), dim=-1)
        for step, token in enumerate(out):
            mass_above = probs[step][probs[step] > probs[step][token]].sum().item()
            assert mass_above < top_p + 1e-3, (seed, step, mass_above)  # the token is inside the nucleus
        assert len(set(out)) > 1


def test_prompt_longer_than_context_is_rejected_not_truncated(engine):
    with pytest.raises(PromptTooLong, match="shorten the prompt"):
        engine.generate([5] * 300, SamplingParams(max_tokens=1))
    with pytest.raises(PromptTooLong, match="lower max_tokens to 56"):
        engine.generate([5] * 200, SamplingParams(max_tokens=100))


def test_cancel_stops_generation_and_engine_keeps_serving(engine, long_prompt):
    outputs: queue.Queue = queue.Queue()
    handle = engine.submit(long_prompt, SamplingParams(max_tokens=LONG), outputs.put)
    first = outputs.get(timeout=30)
    assert not first.finished
    handle.cancel()
    while not (last := outputs.get(timeout=30)).finished:
        pass
    assert last.finish_reason == "cancelled"
    assert last.completion_tokens < 20
    assert engine.generate(_prompts(engine)[1], SamplingParams(max_tokens=3)).completion_tokens == 3


LONG = 200  # tokens a request would run without a cancellation (checked: it does not stop earlier)


@pytest.fixture(scope="module")
def long_prompt(engine) -> list[int]:
    ids = _prompts(engine)[4]
    control = engine.generate(ids, SamplingParams(max_tokens=LONG))
    assert (control.finish_reason, control.completion_tokens) == ("length", LONG)
    return ids


def test_closing_the_async_stream_cancels_the_request(engine, long_prompt):
    async def consume_two() -> int:
        stream = engine.stream(long_prompt, SamplingParams(max_tokens=LONG))
        seen = 0
        async for out in stream:
            seen += len(out.token_ids)
            if seen >= 2:
                break
        await stream.aclose()  # what Starlette does when the client disconnects
        # Wait with the event loop still running, as a server's does: once the loop is closed, the
        # engine's next delivery fails and cancels the request by another path.
        await asyncio.to_thread(wait_idle, engine)
        return seen

    wait_idle(engine)
    before = engine.steps
    assert asyncio.run(consume_two()) >= 2
    # A few steps may run between the last token read and the engine seeing the cancellation;
    # without it, the request would have run all LONG steps.
    assert engine.steps - before < 20, engine.steps - before


def _counting_wakeups(loop: asyncio.AbstractEventLoop) -> list:
    """Record every callback another thread schedules on `loop` (each is a wake-up of its thread)."""
    calls, schedule = [], loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        calls.append(callback)
        return schedule(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted
    return calls


def test_complete_wakes_the_event_loop_once_and_equals_generate(engine):
    ids, params = _prompts(engine)[1], SamplingParams(max_tokens=12)

    async def both():
        wakeups = _counting_wakeups(asyncio.get_running_loop())
        done = await engine.complete(ids, params)
        by_completion = len(wakeups)
        streamed = [out async for out in engine.stream(ids, params)]
        return done, by_completion, len(wakeups) - by_completion, streamed

    done, by_completion, by_stream, streamed = asyncio.run(both())
    blocking = engine.generate(ids, params)
    assert (done.text, done.token_ids, done.finish_reason) == (
        blocking.text,
        blocking.token_ids,
        blocking.finish_reason,
    )
    assert done.completion_tokens == blocking.completion_tokens and done.prompt_tokens == len(ids)
    assert by_completion == 1 and by_stream == len(streamed) >= 2


def test_cancelling_complete_cancels_the_request(engine, long_prompt):
    async def give_up() -> None:
        task = asyncio.ensure_future(engine.complete(long_prompt, SamplingParams(max_tokens=LONG)))
        while engine.stats()["running"] == 0:
            await asyncio.sleep(0.001)
        task.cancel()  # what Ray Serve does when the client of a non-streaming request disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_idle, engine)  # the loop stays up, as a server's does

    wait_idle(engine)
    before = engine.steps
    asyncio.run(give_up())
    assert engine.steps - before < 20, engine.steps - before


@pytest.mark.gpu
def test_on_a_gpu_batched_greedy_equals_generate(tiny_export):
    eng = Engine.from_export(tiny_export, device="cuda", max_batch_size=8)
    try:
        prompts = _prompts(eng)
        results = _run_concurrently(eng, prompts, SamplingParams(max_tokens=16))
        for ids, result in zip(prompts, results, strict=True):
            assert result.token_ids == _reference(eng.model, eng, ids, 16)
        sampled = eng.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=1))
        assert sampled.completion_tokens >= 1
    finally:
        eng.close()
