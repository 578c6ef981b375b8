"""midfill/composition/state.py: a saved composition holds the bridge only and names its parents."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from midfill.composition import (
    load_composed,
    read_manifest,
    save_composed,
    trainable_named_parameters,
    trainable_parameters,
)

from .helpers import compose, randomize_bridge, tokens


def _train(model, *, steps: int = 2, **context) -> None:
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    ids = tokens(2, 10, seed=1)
    for _ in range(steps):
        logits = model(ids[:, :-1], **context).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "spec",
    [
        dict(mode="calm", layer_spacing=2),
        dict(mode="codet5p", cross_attention_layers=2, encoder_trainable=True),
        dict(mode="codet5p", encoder_trainable=False),
    ],
    ids=["calm", "codet5p-encoder-trainable", "codet5p-encoder-frozen"],
)
def test_round_trip_without_frozen_weights(parents, tmp_path, spec):
    anchor, augment = parents
    anchor.save_pretrained(tmp_path / "anchor")
    augment.save_pretrained(tmp_path / "augment")
    model = compose(anchor, augment, anchor=str(tmp_path / "anchor"), augment=str(tmp_path / "augment"), **spec)
    randomize_bridge(model)
    context = {"encoder_input_ids": tokens(2, 7, seed=2)} if spec["mode"] == "codet5p" else {}
    _train(model, **context)

    folder = save_composed(model, tmp_path / "bridge")
    saved = load_file(str(folder / "bridge.safetensors"))
    assert set(saved) == {name for name, _ in trainable_named_parameters(model)}
    assert not any(name.startswith("anchor.") for name in saved)
    manifest = read_manifest(folder)
    assert manifest["parents"]["anchor"]["ref"] == str(tmp_path / "anchor")
    assert manifest["composition"]["mode"] == spec["mode"]

    restored = load_composed(folder)
    ids = tokens(2, 8, seed=3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(ids, **context).logits, model(ids, **context).logits, rtol=0, atol=0)


def test_references_can_name_the_resolved_registry_version(parents, tmp_path):
    anchor, augment = parents
    model = compose(anchor, augment, mode="calm", layer_spacing=2, anchor="models:/big@champion")
    save_composed(model, tmp_path, anchor_ref="models:/big/3")
    assert read_manifest(tmp_path)["parents"]["anchor"]["ref"] == "models:/big/3"
    seen = []

    def load_parent(ref):
        seen.append(ref)
        return {"models:/big/3": anchor, "/models/augment": augment}[ref]

    load_composed(tmp_path, load_parent=load_parent)
    assert seen == ["models:/big/3", "/models/augment"]


def test_a_different_parent_is_refused(parents, tmp_path):
    anchor, augment = parents
    anchor.save_pretrained(tmp_path / "anchor")
    augment.save_pretrained(tmp_path / "augment")
    model = compose(
        anchor,
        augment,
        mode="calm",
        layer_spacing=2,
        anchor=str(tmp_path / "anchor"),
        augment=str(tmp_path / "augment"),
    )
    save_composed(model, tmp_path / "bridge")
    with torch.no_grad():
        anchor.lm_head.weight.add_(1.0)
    anchor.save_pretrained(tmp_path / "anchor")  # the "same" path now holds other weights
    with pytest.raises(ValueError, match="fingerprint"):
        load_composed(tmp_path / "bridge")


def test_an_unfinished_save_is_not_a_composition(tmp_path):
    with pytest.raises(ValueError, match="composition.json"):
        read_manifest(tmp_path)
    (tmp_path / "composition.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        read_manifest(tmp_path)
