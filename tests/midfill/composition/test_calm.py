"""midfill/composition/calm.py: layer pairs, causal position-aligned bridges, separate caches, training."""

from __future__ import annotations

import pytest
import torch

from midfill.composition import (
    calm_bridge_parameters,
    calm_layer_pairs,
    greedy_generate,
    num_trainable,
    trainable_named_parameters,
    trainable_parameters,
)

from .helpers import compose, randomize_bridge, tiny_llama, tokens


def test_pairs_take_every_kth_augmenting_layer_and_spread_the_anchor_layers():
    assert calm_layer_pairs(augment_layers=24, anchor_layers=32, spacing=4) == [
        (3, 4),
        (7, 9),
        (11, 15),
        (15, 20),
        (19, 25),
        (23, 31),
    ]
    assert calm_layer_pairs(augment_layers=4, anchor_layers=4, spacing=2) == [(1, 1), (3, 3)]
    assert calm_layer_pairs(augment_layers=8, anchor_layers=4, spacing=4, count=1) == [(3, 3)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(augment_layers=3, anchor_layers=8, spacing=4), "layerSpacing"),
        (dict(augment_layers=8, anchor_layers=8, spacing=4, count=3), "numCompositionLayers"),
        (dict(augment_layers=8, anchor_layers=1, spacing=2), "numCompositionLayers"),
    ],
)
def test_impossible_layer_geometry_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        calm_layer_pairs(**kwargs)


def test_parents_must_share_the_vocabulary():
    anchor = tiny_llama(hidden=32, layers=2, seed=0)
    other = tiny_llama(hidden=32, layers=2, seed=1)
    other.resize_token_embeddings(80)
    with pytest.raises(ValueError, match="tokenizer"):
        compose(anchor, other, mode="calm", layer_spacing=2)


def test_a_fresh_composition_computes_the_anchor(parents):
    anchor, augment = parents
    model = compose(anchor, augment, mode="calm", layer_spacing=2)
    ids = tokens(2, 12, seed=0)
    assert torch.equal(model(ids).logits, anchor(ids).logits)


def test_trainable_parameters_match_the_formula(parents):
    anchor, augment = parents
    model = compose(anchor, augment, mode="calm", layer_spacing=2)
    assert model.pairs == [(1, 1), (3, 3)]
    expected = calm_bridge_parameters(pairs=2, augment_dim=32, anchor_dim=64)
    assert expected == 2 * (32 * 64 + 4 * 64**2 + 3 * 64)
    assert num_trainable(model) == expected
    assert {name.split(".")[0] for name, _ in trainable_named_parameters(model)} == {"bridges"}


def test_anchor_position_t_never_sees_augmenting_states_after_t(parents):
    """Both models normally read the same tokens, so changing tokens after t would also change the
    anchor's own input there, and the anchor's causal self-attention alone would keep positions <= t
    unchanged even with a leaking bridge. Changing only what the augmenting model reads isolates
    the bridge's mask."""
    anchor, augment = parents
    model = compose(anchor, augment, mode="calm", layer_spacing=2)
    randomize_bridge(model)
    ids = tokens(2, 16, seed=1)
    t = 7
    changed = ids.clone()
    changed[:, t + 1 :] = tokens(2, 16 - t - 1, seed=2)
    with torch.no_grad():
        base = model(ids).logits
        moved = model(ids, augment_input_ids=changed).logits
    assert torch.equal(base[:, : t + 1], moved[:, : t + 1])
    # ... and the bridge does carry the augmenting model's states: later positions do change.
    assert (base[:, t + 1 :] - moved[:, t + 1 :]).abs().max() > 1e-3


def test_incremental_decoding_with_caches_equals_full_recomputation(parents):
    anchor, augment = parents
    model = compose(anchor, augment, mode="calm", layer_spacing=2)
    randomize_bridge(model)
    prompt = tokens(3, 9, seed=3)
    cached = greedy_generate(model, prompt, max_new_tokens=12)
    full = greedy_generate(model, prompt, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-4, atol=1e-4)
    # The caches are separate objects of each model's own depth.
    cache = model.new_cache()
    model(prompt, cache=cache)
    assert cache.anchor is not cache.augment
    assert cache.anchor.get_seq_length() == cache.augment.get_seq_length() == 9
    assert all(k.shape[2] == 9 for k, _ in cache.bridge)


def test_left_padded_rows_compute_what_they_compute_alone(parents):
    anchor, augment = parents
    model = compose(anchor, augment, mode="calm", layer_spacing=2)
    randomize_bridge(model)
    short, long = tokens(1, 6, seed=4), tokens(1, 9, seed=5)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    with torch.no_grad():
        together = model(batch, attention_mask=mask).logits
        alone = model(short).logits
    torch.testing.assert_close(together[0, 3:], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together[1], model(long).logits[0], rtol=1e-4, atol=1e-4)


def test_training_moves_only_the_bridge(parents):
    anchor, augment = parents
    model = compose(anchor, augment, mode="calm", layer_spacing=2)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("anchor.", "augment.")) for n in frozen)
    bridge_before = {name: p.detach().clone() for name, p in trainable_named_parameters(model)}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    ids = tokens(4, 12, seed=6)
    for _ in range(3):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == name.startswith("bridges."), name
        optimizer.step()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for _, p in trainable_named_parameters(model)}
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, bridge_before[name]), f"bridge {name} did not train"
    assert not model.anchor.training and not model.augment.training


def test_the_sample_trainingrun_builds_over_tiny_parents(parents, repo_root):
    from midfill.api import load_file
    from midfill.composition import build_composed_model

    (run,) = load_file(repo_root / "manifests/samples/trainingrun-calm.yaml")
    spec = run.spec.model.composition
    anchor, augment = parents
    model = build_composed_model(spec, anchor, augment)  # layerSpacing 4, numHeads 16
    assert model.pairs == [(3, 3)]
    assert model.bridges[0].cross.num_heads == 16
    with pytest.raises(ValueError, match="numHeads"):
        build_composed_model(spec.model_copy(update={"num_heads": 5}), anchor, augment)
