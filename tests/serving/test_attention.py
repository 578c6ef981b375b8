"""serving.attention must compute what torch's sdpa computes, for every shape the engine sends it:
a decode step over a padded batch, a causal prompt, a left-padded prompt group, a prompt continued
from reused keys/values, grouped-query heads, and bfloat16."""

from __future__ import annotations

import pytest
import torch
from serving_exports import tiny_llama  # tests/serving, on sys.path through conftest
from transformers import DynamicCache

from serving import attention

VOCAB = 96


@pytest.fixture(scope="module")
def models():
    """The same weights under sdpa (the reference) and serving.attention, in float64: there every
    shape, prompts included, takes serving.attention's own path (float32 prompts are handed to sdpa,
    so comparing them would compare sdpa with itself), and rounding does not blur the comparison.
    The tiny model has grouped-query heads (4 query heads, 2 key/value heads)."""
    reference, ours = tiny_llama(VOCAB).double(), tiny_llama(VOCAB).double()
    ours.set_attn_implementation(attention.register())
    return reference, ours


def _padded_group(lengths: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    rows = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _forward(model, ids, mask=None, cache=None):
    kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)} if mask is not None else {}
    with torch.inference_mode():
        return model(input_ids=ids, past_key_values=cache, use_cache=cache is not None, **kwargs).logits


def test_a_causal_prompt_matches_sdpa(models):
    reference, ours = models
    ids = torch.randint(1, VOCAB, (1, 37), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_forward(ours, ids), _forward(reference, ids), atol=1e-9, rtol=1e-9)


def test_a_left_padded_group_and_its_decode_steps_match_sdpa(models):
    reference, ours = models
    gen = torch.Generator().manual_seed(1)
    ids, mask = _padded_group([5, 19, 12], gen)
    caches = {m: DynamicCache(config=m.config) for m in models}
    got, want = _forward(ours, ids, mask, caches[ours]), _forward(reference, ids, mask, caches[reference])
    real = mask.bool()  # padded positions' logits are never used
    torch.testing.assert_close(got[real], want[real], atol=1e-9, rtol=1e-9)
    positions = mask.sum(1, keepdim=True)
    for _ in range(4):  # one-token steps over the padded cache: the decode path
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        step = torch.randint(1, VOCAB, (3, 1), generator=gen)
        with torch.inference_mode():
            got, want = (
                m(
                    input_ids=step,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=caches[m],
                    use_cache=True,
                ).logits
                for m in (ours, reference)
            )
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
        positions = positions + 1


def test_a_prompt_continued_from_reused_keys_matches_sdpa(models):
    """The prefix cache's case: 10 query tokens over 30 keys, 20 of them already cached."""
    reference, ours = models
    ids = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (ours, reference):
        cache = DynamicCache(config=model.config)
        _forward(model, ids[:, :20], cache=cache)
        outs.append(_forward(model, ids[:, 20:], cache=cache))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-9)


def test_bfloat16_stays_close_to_float32_and_finite_under_full_padding():
    reference, ours = tiny_llama(VOCAB), tiny_llama(VOCAB).to(torch.bfloat16)
    ours.set_attn_implementation(attention.register())
    ids, mask = _padded_group([3, 16], torch.Generator().manual_seed(3))  # row 0: 13 fully padded queries
    got = _forward(ours, ids, mask, DynamicCache(config=ours.config))
    assert torch.isfinite(got).all()
    want = _forward(reference, ids, mask, DynamicCache(config=reference.config))
    real = mask.bool()
    torch.testing.assert_close(got[real].float(), want[real], atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    ("q_len", "kv_len", "padded"), [(1, 40, True), (1, 40, False), (24, 24, False), (24, 24, True), (8, 30, True)]
)
def test_the_matrix_product_path_equals_sdpa_exactly_in_float64(q_len, kv_len, padded):
    """float64 takes the bmm path for prompts too (only float32 prompts go to sdpa), so this checks
    the masking and layout of that path with no rounding in the way."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 4, n, 16, generator=gen, dtype=torch.float64) for n in (q_len, kv_len, kv_len))
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    mask = causal.expand(3, 1, q_len, kv_len).clone()
    if padded:
        mask[0, :, :, :5] = False  # row 0 is left-padded by 5 keys
    got, _ = attention.cpu_attention(
        torch.nn.Module(), q, k, v, mask if padded or q_len < kv_len else None, scaling=0.25
    )
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25).transpose(1, 2)
    keep = mask.any(-1).transpose(1, 2)[..., None].expand_as(want)  # fully masked queries are padding
    torch.testing.assert_close(got[keep], want[keep], atol=1e-10, rtol=1e-10)
