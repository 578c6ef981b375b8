"""Composition recipes: train a thin bridge between frozen models instead of fine-tuning one.

- calm (Bansal et al., 2024): frozen anchor + frozen augmenting model, cross-attention at evenly
  spaced layer pairs (`calm.py`).
- codet5p (Wang et al., 2023): the augmenting model as a bidirectional encoder, cross-attention in
  the top anchor layers (`codet5p.py`).

Shared by the trainer (training, export) and serving (loading, decoding), which may not import
each other (docs/architecture.md), hence here in the core. Entry points:

    model = build_composed_model(spec.model.composition, anchor_lm, augment_lm)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=...)
    out = model(input_ids)                       # out.logits (B, T, V)
    save_composed(model, folder, anchor_ref=..., augment_ref=...)
    model = load_composed(folder, load_parent=...)

See docs/composition.md.
"""

from midfill.composition.build import ComposedModel, build_composed_model, parent_fingerprint
from midfill.composition.calm import CalmModel, ComposedOutput, calm_bridge_parameters, calm_layer_pairs
from midfill.composition.codet5p import CodeT5pModel, codet5p_bridge_parameters, top_layers
from midfill.composition.decoding import Greedy, greedy_generate
from midfill.composition.state import (
    bridge_state_dict,
    load_bridge_state_dict,
    load_composed,
    num_total,
    num_trainable,
    read_manifest,
    save_composed,
    trainable_named_parameters,
    trainable_parameters,
)

__all__ = [
    "CalmModel",
    "CodeT5pModel",
    "ComposedModel",
    "ComposedOutput",
    "Greedy",
    "bridge_state_dict",
    "build_composed_model",
    "calm_bridge_parameters",
    "calm_layer_pairs",
    "codet5p_bridge_parameters",
    "greedy_generate",
    "load_bridge_state_dict",
    "load_composed",
    "num_total",
    "num_trainable",
    "parent_fingerprint",
    "read_manifest",
    "save_composed",
    "top_layers",
    "trainable_named_parameters",
    "trainable_parameters",
]
