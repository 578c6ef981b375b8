"""midfill/composition/codet5p.py: bidirectional encoder, cross-attention in the top anchor layers."""

from __future__ import annotations

import pytest
import torch

from midfill.composition import (
    codet5p_bridge_parameters,
    greedy_generate,
    num_trainable,
    top_layers,
    trainable_named_parameters,
    trainable_parameters,
)

from .helpers import compose, randomize_bridge, tiny_llama, tokens


def test_top_layers():
    assert top_layers(anchor_layers=32, count=1) == [31]
    assert top_layers(anchor_layers=4, count=2) == [2, 3]
    with pytest.raises(ValueError, match="crossAttentionLayers"):
        top_layers(anchor_layers=4, count=5)


def test_a_fresh_composition_computes_the_anchor(parents):
    anchor, encoder = parents
    model = compose(anchor, encoder, mode="codet5p", cross_attention_layers=2)
    ids = tokens(2, 10, seed=0)
    assert torch.equal(model(ids, encoder_input_ids=tokens(2, 7, seed=1)).logits, anchor(ids).logits)


@pytest.mark.parametrize("trainable", [True, False])
def test_trainable_parameters_match_the_formula(trainable):
    anchor, encoder = tiny_llama(hidden=64, layers=4, seed=0), tiny_llama(hidden=32, layers=3, seed=1)
    encoder_body = sum(p.numel() for p in encoder.model.parameters())
    model = compose(anchor, encoder, mode="codet5p", cross_attention_layers=2, encoder_trainable=trainable)
    bridge = codet5p_bridge_parameters(layers=2, encoder_dim=32, anchor_dim=64)
    assert bridge == 32 * 64 + 64 + 2 * 4 * 64**2
    assert num_trainable(model) == bridge + (encoder_body if trainable else 0)
    owners = {name.split(".")[0] for name, _ in trainable_named_parameters(model)}
    assert owners == ({"proj", "cross", "encoder"} if trainable else {"proj", "cross"})
    assert not any(name.startswith("encoder.lm_head") for name, _ in trainable_named_parameters(model))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_encoder_is_bidirectional_and_masks_padding(attn):
    anchor = tiny_llama(hidden=64, layers=4, seed=0, attn=attn)
    encoder = tiny_llama(hidden=32, layers=2, seed=1, attn=attn)
    model = compose(anchor, encoder, mode="codet5p", cross_attention_layers=2)
    randomize_bridge(model)
    ctx = tokens(2, 8, seed=2)
    with torch.no_grad():
        enc = model.encode(ctx)
        last_changed = ctx.clone()
        last_changed[:, -1] = (ctx[:, -1] % 60) + 1
        # No causal mask in the encoder: its first position sees the last token.
        assert (model.encode(last_changed)[:, 0] - enc[:, 0]).abs().max() > 1e-4
        # Padding appended to the context (masked) changes nothing.
        padded = torch.cat([ctx, torch.zeros(2, 3, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(2, 8), torch.zeros(2, 3)], 1).long()
        ids = tokens(2, 6, seed=3)
        base = model(ids, encoder_input_ids=ctx).logits
        with_pad = model(ids, encoder_input_ids=padded, encoder_attention_mask=mask).logits
    torch.testing.assert_close(with_pad, base, rtol=1e-4, atol=1e-4)
    # The decoder's first position already sees the whole context (not causal over encoder states).
    with torch.no_grad():
        moved = model(ids, encoder_input_ids=last_changed).logits
    assert (moved[:, 0] - base[:, 0]).abs().max() > 1e-4


def test_incremental_decoding_with_caches_equals_full_recomputation(parents):
    anchor, encoder = parents
    model = compose(anchor, encoder, mode="codet5p", cross_attention_layers=2)
    randomize_bridge(model)
    ctx, prompt = tokens(3, 11, seed=4), tokens(3, 5, seed=5)
    cached = greedy_generate(model, prompt, max_new_tokens=12, encoder_input_ids=ctx)
    full = greedy_generate(model, prompt, max_new_tokens=12, use_cache=False, encoder_input_ids=ctx)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trainable", [True, False])
def test_training_moves_only_the_bridge_and_an_allowed_encoder(parents, trainable):
    anchor, encoder = parents
    model = compose(anchor, encoder, mode="codet5p", cross_attention_layers=1, encoder_trainable=trainable)
    allowed = ("proj.", "cross.", "encoder.model.") if trainable else ("proj.", "cross.")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith(allowed)}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    assert model.encoder.training == trainable
    ctx, ids = tokens(4, 9, seed=6), tokens(4, 8, seed=7)
    for _ in range(3):
        logits = model(ids[:, :-1], encoder_input_ids=ctx).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == name.startswith(allowed), name
        optimizer.step()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for _, p in trainable_named_parameters(model)}
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
    assert not model.anchor.training
