"""Tiny Llama parents (2-4 layers, hidden 32-64) and helpers for the composition tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from midfill.api.trainingrun import CompositionSpec
from midfill.composition import build_composed_model, trainable_named_parameters

VOCAB = 61


def tiny_llama(*, hidden: int, layers: int, seed: int, heads: int = 4, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def randomize_bridge(model: torch.nn.Module, *, seed: int = 7, std: float = 0.3) -> None:
    """A freshly built bridge adds exactly zero (zero-initialised output projections), which would
    make any comparison with the bare anchor pass trivially; give it weights that matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainable_named_parameters(model):
            if name.startswith("encoder."):
                continue  # a trainable codet5p encoder keeps its pretrained weights
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))


def compose(anchor_lm, augment_lm, /, **spec) -> torch.nn.Module:
    spec.setdefault("anchor", "/models/anchor")
    spec.setdefault("augment", "/models/augment")
    return build_composed_model(CompositionSpec(**spec), anchor_lm, augment_lm)


def tokens(batch: int, length: int, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)
