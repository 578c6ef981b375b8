"""The static decode path (serving.static_decode) on the CPU, where it runs without graphs: greedy
tokens equal transformers' generate while rows join, leave and cross width buckets; stops, limits,
cancellation, prefix reuse, usage and streaming behave as on the dynamic path."""

from __future__ import annotations

import asyncio
import threading

import pytest
from greedy import greedy_reference as _reference
from transformers import AutoModelForCausalLM

from serving.engine import Engine, SamplingParams
from serving.static_decode import bucket_for, supports, width_buckets


@pytest.fixture(scope="module")
def static(tiny_export):
    # max_batch_size 4 < the prompts below: later requests join as earlier ones leave.
    eng = Engine.from_export(tiny_export, max_batch_size=4, decode_path="static")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference_model(tiny_export):
    return AutoModelForCausalLM.from_pretrained(str(tiny_export), attn_implementation="sdpa").eval()


def _prompts(engine: Engine) -> list[list[int]]:
    import sysconfig
    from pathlib import Path

    source = (Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text()
    prefixes = [
        "x = ",
        "def add(a, b):\n    ",
        source[3000:3400],
        "for i in range(10):\n",
        source[5000:5150],
        "class A:\n    ",
    ]
    return [engine.encode(engine.infill_prompt(p, "\n    return result\n")) for p in prefixes]


def _concurrently(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]):
    results = [None] * len(jobs)

    def one(i: int) -> None:
        results[i] = engine.generate(*jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_buckets_cover_every_batch_and_length():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert width_buckets(256) == (128, 256)
    assert width_buckets(300) == (128, 256, 300)
    assert width_buckets(100) == (100,)


def test_models_with_sliding_window_layers_keep_the_dynamic_path():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tiny = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 64,
    }
    assert supports(LlamaForCausalLM(LlamaConfig(**tiny))) is None
    assert supports(Qwen2ForCausalLM(Qwen2Config(**tiny, use_sliding_window=False))) is None
    assert "sliding" in supports(MistralForCausalLM(MistralConfig(**tiny, sliding_window=16)))


def test_the_static_path_is_used_where_asked(static, tiny_export):
    assert static._static is not None and static.decode_path == "cpu"
    auto = Engine.from_export(tiny_export, max_batch_size=2)
    try:
        assert auto._static is None  # on a CPU auto keeps the dynamic path
    finally:
        auto.close()
    with pytest.raises(ValueError, match="decode_path"):
        Engine.from_export(tiny_export, decode_path="graphs")


def test_greedy_equals_generate_while_rows_join_leave_and_grow_past_a_width_bucket(static, reference_model):
    prompts = _prompts(static)
    assert max(map(len, prompts)) < 128 < max(map(len, prompts)) + 40  # the long one crosses the 128 bucket
    lengths = [40, 6, 40, 12, 3, 25]  # short requests leave early, waiting ones take their rows
    steps = static.steps
    results = _concurrently(static, [(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, lengths, strict=True)])
    assert static.steps - steps < sum(r.completion_tokens for r in results)  # rows shared steps
    for ids, n, result in zip(prompts, lengths, results, strict=True):
        assert result.token_ids == _reference(reference_model, static, ids, n)
        assert result.prompt_tokens == len(ids) and result.completion_tokens == len(result.token_ids)
    assert static.stats() == {"running": 0, "waiting": 0}


def test_stop_string_and_stop_token_end_the_request(static, reference_model):
    ids = _prompts(static)[1]
    full = static.generate(ids, SamplingParams(max_tokens=12))
    stop = static.tokenizer.decode(full.token_ids[3:5])
    cut = static.generate(ids, SamplingParams(max_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert full.finish_reason == "length" and full.token_ids == _reference(reference_model, static, ids, 12)


def test_an_edited_prompt_reuses_keys_values_on_the_static_path(static, reference_model):
    import sysconfig
    from pathlib import Path

    text = (Path(sysconfig.get_paths()["stdlib"]) / "fnmatch.py").read_text()[1000:1400]
    before = static.encode(static.infill_prompt(text, "\n"))
    after = static.encode(static.infill_prompt(text + "y = ", "\n"))
    static.generate(before, SamplingParams(max_tokens=4))
    second = static.generate(after, SamplingParams(max_tokens=10))
    assert second.cached_tokens >= 64
    assert second.token_ids == _reference(reference_model, static, after, 10)


def test_cancel_frees_the_row_and_the_others_continue(static, reference_model):
    prompts = _prompts(static)
    handle = static.submit(prompts[0], SamplingParams(max_tokens=200), lambda out: None)
    other = static.generate(prompts[3], SamplingParams(max_tokens=15))
    handle.cancel()
    assert other.token_ids == _reference(reference_model, static, prompts[3], 15)
    for _ in range(100):
        if handle.done:
            break
        threading.Event().wait(0.05)
    assert handle.done and static.stats() == {"running": 0, "waiting": 0}


def test_nothing_reaches_a_request_after_its_finish(static):
    """When a request finishes (here: cancelled), the step after its last one is already launched
    (overlap); that step's token for it must be dropped, not delivered after the finish."""
    prompts = _prompts(static)
    outs = []
    started, done = threading.Event(), threading.Event()

    def collect(out) -> None:
        outs.append(out)
        if len(outs) >= 3:  # it has been in launched steps (its first token comes from its prefill)
            started.set()
        if out.finished:
            done.set()

    handle = static.submit(prompts[1], SamplingParams(max_tokens=200), collect)
    other = threading.Thread(target=static.generate, args=(prompts[3], SamplingParams(max_tokens=40)))
    other.start()  # keeps the engine stepping after the cancel
    assert started.wait(30)
    handle.cancel()
    other.join(timeout=60)
    assert done.wait(30)
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert outs[-1].finish_reason == "cancelled"


def test_streaming_yields_each_token_then_the_usage(static):
    ids = _prompts(static)[5]

    async def collect():
        return [out async for out in static.stream(ids, SamplingParams(max_tokens=7))]

    outs = asyncio.run(collect())
    assert outs[-1].finished and outs[-1].completion_tokens == 7 and outs[-1].prompt_tokens == len(ids)
    streamed = [t for o in outs for t in o.token_ids]
    assert streamed == static.generate(ids, SamplingParams(max_tokens=7)).token_ids


@pytest.mark.gpu
def test_on_a_gpu_the_graphs_replay_and_greedy_equals_generate(tiny_export):
    eng = Engine.from_export(tiny_export, device="cuda", max_batch_size=4)
    try:
        assert eng.decode_path == "cuda-graphs"
        prompts = _prompts(eng)
        lengths = [20, 6, 20, 12, 3, 16]
        results = _concurrently(eng, [(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, lengths, strict=True)])
        for ids, n, result in zip(prompts, lengths, results, strict=True):
            assert result.token_ids == _reference(eng.model, eng, ids, n)
        seeded = [
            eng.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=5)) for _ in range(2)
        ]
        assert seeded[0].token_ids == seeded[1].token_ids
    finally:
        eng.close()
