"""Reusing recent prompts' keys/values: what is found, what is kept, and that a prefill from reused
keys/values gives the logits of a full prefill."""

from __future__ import annotations

import pytest
import torch
from serving_exports import tiny_llama  # tests/serving, on sys.path through conftest
from transformers import DynamicCache

from serving.prefill import Prefiller
from serving.prefix_cache import PrefixCache

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB)


def _prefilled(model, prompt: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    return cache


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_lookup_finds_the_longest_common_prefix_and_leaves_a_token_to_prefill(model):
    cache = PrefixCache(1000, min_tokens=8)
    a, b = _tokens(1, 40), _tokens(2, 40)
    cache.store(a, _prefilled(model, a))
    cache.store(b, _prefilled(model, b))
    assert cache.lookup(a[:30] + _tokens(3, 10)).tokens == 30
    assert cache.lookup(b[:12] + _tokens(4, 5)).tokens == 12
    assert cache.lookup(a).tokens == 39  # the same prompt again: its last token is still prefilled
    assert cache.lookup(a[:5] + _tokens(5, 30)).tokens == 0  # under min_tokens: not worth it
    assert cache.lookup(_tokens(6, 40)).tokens == 0
    assert cache.hits == 3 and cache.reused_tokens == 30 + 12 + 39


def test_store_keeps_within_its_token_budget_least_recently_used_first(model):
    cache = PrefixCache(100, min_tokens=8)
    a, b, c = _tokens(1, 40), _tokens(2, 40), _tokens(3, 40)
    cache.store(a, _prefilled(model, a))
    cache.store(b, _prefilled(model, b))
    assert cache.lookup(a[:20] + [1]).tokens == 20  # a is now the most recently used
    cache.store(c, _prefilled(model, c))  # 120 > 100: b goes
    assert cache.tokens == 80
    assert cache.lookup(b[:20] + [1]).tokens == 0
    assert cache.lookup(a[:20] + [1]).tokens == 20 and cache.lookup(c[:20] + [1]).tokens == 20
    longer = a + _tokens(4, 10)
    cache.store(longer, _prefilled(model, longer))  # covers a, which is dropped rather than kept twice
    assert cache.tokens == 40 + 50
    cache.max_tokens = 0  # disabled while running: nothing is found, everything goes on the next store
    assert cache.lookup(longer).tokens == 0
    cache.store(c, _prefilled(model, c))
    assert cache.tokens == 0


def test_prefill_from_reused_keys_values_equals_a_full_prefill(model):
    prefix_cache = PrefixCache(1000, min_tokens=8)
    prefiller = Prefiller(model, pad_id=0, prefix_cache=prefix_cache)
    first = _tokens(1, 60)
    edited = first[:45] + _tokens(2, 20)  # the user typed: the tail of the prompt changed
    with torch.inference_mode():
        prefiller.run([first])
        [(indices, reused)] = prefiller.run([edited])
        [(_, full)] = Prefiller(model, pad_id=0, prefix_cache=None).run([edited])
    assert indices == [0] and reused.cached_tokens == [45] and full.cached_tokens == [0]
    torch.testing.assert_close(reused.logits, full.logits, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(reused.cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)


def test_a_group_mixes_fresh_and_reusing_prompts(model):
    prefiller = Prefiller(model, pad_id=0, prefix_cache=PrefixCache(1000, min_tokens=8))
    seen = _tokens(1, 50)
    with torch.inference_mode():
        prefiller.run([seen])
        passes = prefiller.run([_tokens(2, 30), seen[:40] + [5, 6], _tokens(3, 12)])
    assert [indices for indices, _ in passes] == [[0, 2], [1]]
    assert passes[0][1].mask.tolist()[1] == [0] * 18 + [1] * 12  # left-padded to the group's longest
    assert passes[1][1].cached_tokens == [40]
