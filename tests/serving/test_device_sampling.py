"""Sampling on the device (serving.sampling) and through the static path: the draw follows the
distribution, a seed reproduces a request whatever shares its steps, top-p and greedy rows behave."""

from __future__ import annotations

import threading

import pytest
import torch

from serving import sampling
from serving.engine import Engine, SamplingParams


def _draw(logits, temperature, top_p, seeds, counters):
    n = len(seeds)
    return sampling.sample(
        logits,
        torch.full((n,), temperature),
        torch.full((n,), top_p),
        sampling.seed_keys(torch.tensor(seeds)),
        torch.tensor(counters),
    )


def test_uniforms_are_inside_the_open_interval_and_depend_on_every_input():
    keys = sampling.seed_keys(torch.tensor([0, 1, 2**40]))
    u = sampling.uniforms(keys, torch.tensor([0, 0, 0]), 5000)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])  # low and high seed bits both count
    later = sampling.uniforms(keys, torch.tensor([1, 1, 1]), 5000)
    assert not torch.equal(u, later)


def test_the_draw_follows_softmax_of_logits_over_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (probs.log() * 0.7).expand(4000, 4)  # temperature 0.7 undoes the 0.7 scaling
    ids = _draw(logits, 0.7, 1.0, list(range(4000)), [3] * 4000)
    freq = torch.bincount(ids, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_top_p_keeps_the_smallest_set_reaching_p_and_temperature_zero_is_argmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4)
    ids = _draw(logits, 1.0, 0.75, list(range(2000)), [0] * 2000)
    seen = set(ids.tolist())
    assert seen == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 reaches it: the third token is cut
    assert set(_draw(logits[:50], 1.0, 1e-6, list(range(50)), [0] * 50).tolist()) == {0}
    noisy = torch.randn(8, 100)
    assert torch.equal(_draw(noisy, 0.0, 1.0, list(range(8)), [0] * 8), noisy.argmax(dim=-1))


def test_greedy_and_sampled_rows_share_one_batch():
    logits = torch.randn(6, 300)
    temperature = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 1.0])
    ids = sampling.sample(
        logits, temperature, torch.ones(6), sampling.seed_keys(torch.arange(6)), torch.zeros(6, dtype=torch.long)
    )
    assert torch.equal(ids[[0, 2, 4]], logits[[0, 2, 4]].argmax(dim=-1))
    alone = sampling.sample(
        logits[3:4],
        temperature[3:4],
        torch.ones(1),
        sampling.seed_keys(torch.tensor([3])),
        torch.zeros(1, dtype=torch.long),
    )
    assert ids[3] == alone[0]  # a row's draw does not depend on its batch mates


@pytest.fixture(scope="module")
def static(tiny_export):
    eng = Engine.from_export(tiny_export, max_batch_size=4, decode_path="static")
    yield eng
    eng.close()


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_busy_batch(static):
    ids = static.encode(static.infill_prompt("def parse(text):\n    ", "\n    return words\n"))
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    alone = static.generate(ids, params)
    others = [
        threading.Thread(target=static.generate, args=(ids[: 5 + i], SamplingParams(max_tokens=30, temperature=1.0)))
        for i in range(3)
    ]
    for t in others:
        t.start()
    busy = static.generate(ids, params)
    for t in others:
        t.join(timeout=60)
    assert busy.token_ids == alone.token_ids
    other_seed = static.generate(ids, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=4321))
    assert other_seed.token_ids != alone.token_ids
    unseeded = [static.generate(ids, SamplingParams(max_tokens=20, temperature=1.0)).token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # no seed: a fresh one per request
