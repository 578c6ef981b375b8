"""Spec → composed model: the one place that reads `spec.model.composition`."""

from __future__ import annotations

import hashlib

import torch
from transformers import LlamaForCausalLM

from midfill.api.trainingrun import CompositionSpec
from midfill.composition.calm import CalmModel, calm_layer_pairs
from midfill.composition.codet5p import CodeT5pModel, top_layers

ComposedModel = CalmModel | CodeT5pModel


def parent_fingerprint(model: torch.nn.Module, *, sample: int = 4096) -> str:
    """A cheap identity of a parent's weights: sha256 over every tensor's name, shape, dtype and its
    first and last `sample` values. Loading a bridge against a different parent (a moved registry
    alias, a retrained export) then fails loudly instead of composing with the wrong weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        head, tail = flat[:sample], flat[-sample:]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(head.float().cpu().numpy().tobytes())
        digest.update(tail.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def build_composed_model(spec: CompositionSpec, anchor: LlamaForCausalLM, augment: LlamaForCausalLM) -> ComposedModel:
    """The composed model of `spec` over two loaded parents (transformers Llama causal LMs).

    Both parents are frozen in place (requires_grad False, eval mode); only the bridge — and, in
    codet5p mode with encoderTrainable, the encoder — is left trainable. Raises ValueError naming
    the composition field when the geometry does not fit the parents.
    """
    num_heads = spec.num_heads or anchor.config.num_attention_heads
    anchor_fp, augment_fp = parent_fingerprint(anchor), parent_fingerprint(augment)
    if spec.mode == "calm":
        pairs = calm_layer_pairs(
            augment_layers=augment.config.num_hidden_layers,
            anchor_layers=anchor.config.num_hidden_layers,
            spacing=spec.layer_spacing,
            count=spec.num_composition_layers,
        )
        model: ComposedModel = CalmModel(anchor, augment, pairs=pairs, num_heads=num_heads)
    else:
        layers = top_layers(anchor_layers=anchor.config.num_hidden_layers, count=spec.cross_attention_layers)
        model = CodeT5pModel(
            anchor, augment, cross_layers=layers, num_heads=num_heads, encoder_trainable=spec.encoder_trainable
        )
    model.spec = spec
    # Taken before any training: a trainable encoder changes, its starting point does not.
    model.parent_fingerprints = {"anchor": anchor_fp, "augment": augment_fp}
    return model
