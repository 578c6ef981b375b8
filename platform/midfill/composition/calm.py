"""CALM: compose a frozen anchor model B with a frozen augmenting model A (Bansal et al., 2024).

Both models read the same tokens. For n layer pairs (i in A, j in B), uniformly spaced,

    B_j ← B_j + f_cross(f_proj(A_i), B_j)          (feeds B's layer j+1)

where the cross-attention is causal and position-aligned: B at position t sees A's states at
positions <= t only. The public reference code got two things wrong that we do not copy: it had no
causal mask here (so training let position t read A's future) and it shared one KV cache between
both models. Here each model keeps its own cache, and the bridge keys/values of A's states (a
per-position function of A_i, so caching them is the same as caching A_i, only cheaper) are cached
too, so that incremental decoding computes exactly what full recomputation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from midfill.composition.bridge import CalmBridge, causal_cross_mask
from midfill.composition.stack import Stack, freeze


def calm_layer_pairs(
    *, augment_layers: int, anchor_layers: int, spacing: int, count: int | None = None
) -> list[tuple[int, int]]:
    """The (i in A, j in B) layer pairs, 0-based: A's every `spacing`-th layer (its 4th, 8th, ...
    for spacing 4) and as many of B's layers spread evenly, the last pair on both last layers when
    count is the default.

    >>> calm_layer_pairs(augment_layers=8, anchor_layers=12, spacing=4)
    [(3, 5), (7, 11)]
    """
    n = count if count is not None else augment_layers // spacing
    if n < 1:
        raise ValueError(
            f"composition.layerSpacing: {spacing} is more than the augmenting model's {augment_layers} layers; "
            "lower layerSpacing"
        )
    if n * spacing > augment_layers:
        raise ValueError(
            f"composition.numCompositionLayers × layerSpacing = {n}×{spacing} exceeds the augmenting model's "
            f"{augment_layers} layers; lower one of them"
        )
    if n > anchor_layers:
        raise ValueError(
            f"composition.numCompositionLayers: {n} pairs but the anchor has {anchor_layers} layers; lower it"
        )
    return [(spacing * (m + 1) - 1, (m + 1) * anchor_layers // n - 1) for m in range(n)]


def calm_bridge_parameters(*, pairs: int, augment_dim: int, anchor_dim: int) -> int:
    """Trainable parameters of n CALM bridges: n·(D_A·D_B + 4·D_B² + 3·D_B).

    Per pair: f_proj D_A·D_B weights + D_B bias; q, k, v, o projections 4·D_B²; two RMSNorm gains
    2·D_B. docs/research.md's estimate n·(D_A·D_B + 3·D_B²) leaves out one of the four attention
    projections and the O(D_B) terms.
    """
    return pairs * (augment_dim * anchor_dim + 4 * anchor_dim**2 + 3 * anchor_dim)


@dataclass
class CalmCache:
    """Incremental-decoding state: one KV cache per model, plus the bridge keys/values of A's states."""

    anchor: DynamicCache
    augment: DynamicCache
    bridge: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # per pair, (B, H, S, hd)

    def extend_bridge(self, pair: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys/values (B, H, T, hd) of pair `pair`; return all so far."""
        old = self.bridge[pair]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.bridge[pair] = (k, v)
        return k, v


@dataclass
class ComposedOutput:
    logits: torch.Tensor  # (B, T, V)
    cache: object | None


class CalmModel(nn.Module):
    """Frozen anchor + frozen augmenting model + trainable CALM bridges (`bridges.*` only)."""

    mode = "calm"

    def __init__(
        self,
        anchor: LlamaForCausalLM,
        augment: LlamaForCausalLM,
        *,
        pairs: list[tuple[int, int]],
        num_heads: int,
    ) -> None:
        super().__init__()
        if anchor.config.vocab_size != augment.config.vocab_size:
            raise ValueError(
                f"composition: anchor and augment must share one tokenizer (both read the same tokens); "
                f"vocab sizes {anchor.config.vocab_size} != {augment.config.vocab_size}"
            )
        freeze(anchor)
        freeze(augment)
        self.anchor, self.augment = anchor, augment
        self._b, self._a = Stack(anchor), Stack(augment)
        self.pairs = list(pairs)
        self.bridges = nn.ModuleList(
            CalmBridge(self._a.hidden_size, self._b.hidden_size, num_heads, eps=anchor.config.rms_norm_eps)
            for _ in self.pairs
        )
        self._pair_of_augment = {i: m for m, (i, _) in enumerate(self.pairs)}
        self._pair_of_anchor = {j: m for m, (_, j) in enumerate(self.pairs)}

    def train(self, mode: bool = True) -> CalmModel:
        super().train(mode)
        self.anchor.eval()  # frozen parents never switch to training behaviour
        self.augment.eval()
        return self

    def new_cache(self) -> CalmCache:
        return CalmCache(anchor=self._b.new_cache(), augment=self._a.new_cache(), bridge=[None] * len(self.pairs))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: CalmCache | None = None,
        augment_input_ids: torch.Tensor | None = None,
    ) -> ComposedOutput:
        """Logits (B, T, V) of the composed model for input_ids (B, T).

        attention_mask: (B, past + T) padding mask, shared by both models.
        cache: from `new_cache()`; pass the same object on every decoding step.
        augment_input_ids: only for tests of the bridge's causal mask: lets A read a sequence
            that differs from B's. In CALM both models read the same tokens (the default), so a
            change after position t would also change B's own input there, and B's causal
            self-attention alone would hide a leaky bridge.
        """
        a_ids = input_ids if augment_input_ids is None else augment_input_ids
        if a_ids.shape != input_ids.shape:
            raise ValueError(f"augment_input_ids: shape {tuple(a_ids.shape)} != input_ids {tuple(input_ids.shape)}")
        T = input_ids.shape[1]

        # 1. The augmenting model A, frozen, up to its last composed layer: bridge keys/values of A_i.
        a, a_inputs = self._a.begin(a_ids, attention_mask=attention_mask, cache=cache.augment if cache else None)
        memory: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(self.pairs)  # type: ignore[list-item]
        for i in range(max(self._pair_of_augment) + 1):
            a = self._a.layer(i, a, a_inputs)  # (B, T, D_A)
            if i in self._pair_of_augment:
                m = self._pair_of_augment[i]
                k, v = self.bridges[m].keys_values(a)  # (B, H, T, hd)
                memory[m] = cache.extend_bridge(m, k, v) if cache else (k, v)  # (B, H, S, hd)

        # 2. The anchor B, frozen, with each bridge added after its layer j.
        S = memory[0][0].shape[2]  # past + T positions of A seen so far
        mask = causal_cross_mask(query_length=T, key_length=S, key_padding=attention_mask, device=input_ids.device)
        x, b_inputs = self._b.begin(input_ids, attention_mask=attention_mask, cache=cache.anchor if cache else None)
        for j in range(self._b.num_layers):
            x = self._b.layer(j, x, b_inputs)  # (B, T, D_B)
            if j in self._pair_of_anchor:
                m = self._pair_of_anchor[j]
                x = self.bridges[m](x, *memory[m], mask)  # B_j + f_cross(f_proj(A_i), B_j)
        return ComposedOutput(logits=self._b.logits(x), cache=cache)
