"""Packed prefill on the static decode path (serving.packed_prefill): prompts of mixed lengths, fresh
and reusing a cached prefix in the same pack, land in the decode buffers exactly as each prompt's own
prefill computes them, and decode greedily as transformers' generate does; FlashAttention's varlen
kernel (where installed, on a GPU) attends as the per-prompt fallback does."""

from __future__ import annotations

import pytest
import torch
from serving_exports import tiny_llama  # tests/serving, on sys.path through conftest
from transformers import DynamicCache

from serving import attention
from serving.packed_prefill import NAME, Pack, PackedPrefiller, packed_attention
from serving.prefix_cache import PrefixCache
from serving.requests import SamplingParams
from serving.static_decode import StaticBatch

VOCAB = 96
GREEDY = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module", params=["sdpa", attention.NAME])
def model(request):
    """Both attentions the engine uses, as the per-prompt fallback: sdpa (GPU) and serving.attention (CPU)."""
    m = tiny_llama(VOCAB)  # grouped-query: 4 heads, 2 key/value heads
    m.set_attn_implementation(attention.register() if request.param == attention.NAME else "sdpa")
    return m


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """The reference: the prompt prefilled on its own cache, and its last token's logits."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
    return cache, logits


def _generate(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n
    )
    return out[0, len(prompt) :].tolist()


def _decode(batch: StaticBatch, first: list[int], steps: int) -> list[list[int]]:
    """Each row's tokens: the one sampled from its prompt, then `steps` static decode steps."""
    tokens = [[t] for t in first]
    with torch.inference_mode():
        for _ in range(steps):
            for row, t in enumerate(batch.ids(batch.launch())):
                tokens[row].append(t)
    return tokens


def test_a_mixed_pack_lands_in_the_buffers_and_decodes_as_generate(model):
    batch = StaticBatch(model, capacity=8, context=128, graphs=False)
    cache = PrefixCache(4096, min_tokens=8)
    prefiller = PackedPrefiller(batch, cache)
    earlier = _prompts([30], seed=1)[0]
    with torch.inference_mode():
        _, before = prefiller.run([earlier], [GREEDY], [0])
    # One pack: a prompt that reuses the first 30 tokens, a one-token prompt, a short and a long one.
    prompts = [earlier + [5, 6, 7, 8, 9], *_prompts([1, 7, 61], seed=2)]
    with torch.inference_mode():
        reused, first = prefiller.run(prompts, [GREEDY] * 4, [0] * 4)
    assert reused == [30, 0, 0, 0]
    for row, prompt in enumerate(prompts, start=1):
        alone, logits = _alone(model, prompt)
        n = len(prompt)
        for layer, ref in enumerate(alone.layers):
            torch.testing.assert_close(batch.key_buffers[layer][row, :, :n], ref.keys[0])
            torch.testing.assert_close(batch.value_buffers[layer][row, :, :n], ref.values[0])
        assert first[row - 1] == int(logits.argmax())
    decoded = _decode(batch, before + first, steps=7)
    for row, prompt in enumerate([earlier, *prompts]):
        assert decoded[row] == _generate(model, prompt, 8)


def test_without_reuse_the_pack_attends_over_its_own_computed_keys():
    pack = Pack.build([3, 5], [0, 0], first_row=2, device="cpu", base_attention=None)
    assert pack.key_rows is None and pack.masks == [None, None]
    assert pack.rows.tolist() == [2, 2, 2, 3, 3, 3, 3, 3] and pack.columns.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert pack.cu_queries.tolist() == [0, 3, 8]
    reusing = Pack.build([4, 2], [3, 0], first_row=0, device="cpu", base_attention=None)
    assert reusing.rows.tolist() == [0, 1, 1] and reusing.columns.tolist() == [3, 0, 1]
    assert reusing.key_rows.tolist() == [0, 0, 0, 0, 1, 1] and reusing.cu_keys.tolist() == [0, 4, 6]
    assert reusing.masks[0].tolist() == [[[[True, True, True, True]]]] and reusing.masks[1] is None


def test_the_engine_static_path_runs_packed_prefill(tiny_export):
    from serving.engine import Engine

    eng = Engine.from_export(tiny_export, max_batch_size=4, decode_path="static")
    try:
        assert isinstance(eng._packed, PackedPrefiller)
        eng.generate(eng.encode("def f(x):\n    return"), SamplingParams(max_tokens=2))
        assert eng.model.config._attn_implementation == attention.NAME  # switched back after the pack
    finally:
        eng.close()
    dynamic = Engine.from_export(tiny_export, max_batch_size=4, decode_path="dynamic")
    try:
        assert dynamic._packed is None  # the dynamic (CPU) path keeps its left-padded prefill
    finally:
        dynamic.close()


def _random_pack(device: str, dtype: torch.dtype):
    """A pack of 4 prompts (one reusing a prefix: fewer queries than keys), 8 query heads over 2 key/value heads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    pack = Pack.build(
        [37, 1, 200, 64], [0, 0, 0, 40], first_row=0, device=device, base_attention=sdpa_attention_forward
    )
    t, k = sum(pack.query_lengths), sum(pack.key_lengths)
    q = torch.randn(1, 8, t, 64, device=device, dtype=dtype)
    key, value = (torch.randn(1, 2, k, 64, device=device, dtype=dtype) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    return module, q, key, value, pack


def _by_hand(q, key, value, pack: Pack) -> torch.Tensor:
    """Softmax attention written out, prompt by prompt, queries aligned to the last keys."""
    out, q_at, k_at = [], 0, 0
    for nq, nk in zip(pack.query_lengths, pack.key_lengths, strict=True):
        qq = q[0, :, q_at : q_at + nq].float()
        kk, vv = (x[0, :, k_at : k_at + nk].float().repeat_interleave(4, 0) for x in (key, value))
        scores = (qq @ kk.transpose(-1, -2) * 0.125).masked_fill(
            ~torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq), float("-inf")
        )
        out.append((scores.softmax(-1) @ vv).transpose(0, 1))
        q_at, k_at = q_at + nq, k_at + nk
    return torch.cat(out)[None]


def test_the_per_prompt_fallback_attends_within_each_prompt():
    module, q, key, value, pack = _random_pack("cpu", torch.float32)
    out, _ = packed_attention(module, q, key, value, None, scaling=0.125, packed_prompts=pack)
    torch.testing.assert_close(out, _by_hand(q, key, value, pack))


@pytest.mark.gpu
def test_flash_varlen_attends_within_each_prompt():
    pytest.importorskip("flash_attn")
    module, q, key, value, pack = _random_pack("cuda", torch.bfloat16)
    out, _ = packed_attention(module, q, key, value, None, scaling=0.125, packed_prompts=pack)
    torch.testing.assert_close(out.float(), _by_hand(q, key, value, pack), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_on_a_gpu_a_half_precision_pack_matches_each_prompt_alone():
    """The engine's GPU setting (bfloat16, sdpa): FlashAttention's varlen kernel where installed,
    else sdpa per prompt."""
    model = tiny_llama(VOCAB).to("cuda", torch.bfloat16)
    model.set_attn_implementation("sdpa")
    batch = StaticBatch(model, capacity=4, context=128, graphs=False)
    prompts = _prompts([50, 3, 90], seed=3)
    with torch.inference_mode():
        PackedPrefiller(batch, None).run(prompts, [GREEDY] * 3, [0] * 3)
        for row, prompt in enumerate(prompts):
            alone = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([prompt], device="cuda"), past_key_values=alone, use_cache=True)
            for layer, ref in enumerate(alone.layers):
                got = batch.key_buffers[layer][row, :, : len(prompt)].float()
                torch.testing.assert_close(got, ref.keys[0].float(), atol=3e-2, rtol=3e-2)
    assert NAME != model.config._attn_implementation
