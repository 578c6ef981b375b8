"""CodeT5+-style composition: a shallow bidirectional encoder + a frozen deep decoder (Wang et al., 2023).

The augmenting model runs as an encoder over a context (no causal mask, padding mask applied); its
final states are projected to the decoder width once, `proj = Linear(d_enc → d_dec)`, and
cross-attention is added to the top L layers of the frozen anchor (CodeT5+ uses L = 1; more layers or
gating gave no significant gain there).

CodeT5+'s decoder block is GPT-J's parallel form,

    h = ln(x);  out = x + self_attn(h) + cross_attn(q=h, kv=proj(enc)) + mlp(h)

but a Llama block is sequential (attention, then an MLP with its own norm). We keep what the
parallel form says about the cross-attention — it reads the same normalised input h as the
self-attention and adds to the same residual — and leave the frozen MLP where the anchor has it:

    h = input_norm(x);  x = x + self_attn(h) + cross_attn(q=h, kv=proj(enc));  out = x + mlp(post_norm(x))

So with the cross-attention at zero (its initial state) the block is exactly the anchor's layer.
The cross-attention is not causal: every decoder position sees every real encoder position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from midfill.composition.bridge import CrossAttention, padding_cross_mask
from midfill.composition.calm import ComposedOutput
from midfill.composition.stack import Stack, freeze


def top_layers(*, anchor_layers: int, count: int) -> list[int]:
    """The 0-based anchor layers that get cross-attention: the top `count`."""
    if count > anchor_layers:
        raise ValueError(
            f"composition.crossAttentionLayers: {count} but the anchor has {anchor_layers} layers; lower it"
        )
    return list(range(anchor_layers - count, anchor_layers))


def codet5p_bridge_parameters(*, layers: int, encoder_dim: int, anchor_dim: int) -> int:
    """Trainable bridge parameters (the encoder's own come on top when it is trainable):
    one projection d_enc·d_dec + d_dec, and 4·d_dec² (q, k, v, o) per cross-attention layer."""
    return encoder_dim * anchor_dim + anchor_dim + layers * 4 * anchor_dim**2


@dataclass
class CodeT5pCache:
    """Decoder KV cache, plus the cross-attention keys/values of the encoder (computed once)."""

    anchor: DynamicCache
    memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per cross layer, (B, H, S, hd)
    memory_mask: torch.Tensor | None = None  # (B, 1, 1, S)


class CodeT5pModel(nn.Module):
    """Trainable encoder (or frozen, per spec) + projection + cross-attention in the top anchor layers."""

    mode = "codet5p"

    def __init__(
        self,
        anchor: LlamaForCausalLM,
        encoder: LlamaForCausalLM,
        *,
        cross_layers: list[int],
        num_heads: int,
        encoder_trainable: bool,
    ) -> None:
        super().__init__()
        if anchor.config.vocab_size != encoder.config.vocab_size:
            raise ValueError(
                f"composition: anchor and augment must share one tokenizer; vocab sizes "
                f"{anchor.config.vocab_size} != {encoder.config.vocab_size}"
            )
        freeze(anchor)
        freeze(encoder)
        if encoder_trainable:
            # The encoder body only: its lm_head is never used (unless tied to the embeddings).
            encoder.model.requires_grad_(True)
        self.encoder_trainable = encoder_trainable
        self.anchor, self.encoder = anchor, encoder
        self._b, self._e = Stack(anchor), Stack(encoder)
        self.cross_layers = list(cross_layers)
        self.proj = nn.Linear(self._e.hidden_size, self._b.hidden_size)
        self.cross = nn.ModuleList(CrossAttention(self._b.hidden_size, num_heads) for _ in self.cross_layers)
        self._cross_of_layer = {j: c for c, j in enumerate(self.cross_layers)}

    def train(self, mode: bool = True) -> CodeT5pModel:
        super().train(mode)
        self.anchor.eval()
        if not self.encoder_trainable:
            self.encoder.eval()
        return self

    def new_cache(self) -> CodeT5pCache:
        return CodeT5pCache(anchor=self._b.new_cache())

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional encoder over input_ids (B, S) → proj(enc) (B, S, D_dec)."""
        e, inputs = self._e.begin(input_ids, attention_mask=attention_mask, causal=False)
        for i in range(self._e.num_layers):
            e = self._e.layer(i, e, inputs)  # (B, S, D_enc)
        return self.proj(self._e.final_norm(e))  # (B, S, D_dec)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        encoder_input_ids: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: CodeT5pCache | None = None,
    ) -> ComposedOutput:
        """Decoder logits (B, T, V) for input_ids (B, T) given the encoder's context (B, S).

        The encoder inputs are needed on the first call only when a cache is used.
        """
        if cache is not None and cache.memory is not None:
            memory, cross_mask = cache.memory, cache.memory_mask
        else:
            if encoder_input_ids is None:
                raise ValueError("encoder_input_ids: required (the context the encoder reads)")
            enc = self.encode(encoder_input_ids, encoder_attention_mask)  # (B, S, D_dec)
            memory = [c.keys_values(enc) for c in self.cross]  # each (B, H, S, hd)
            cross_mask = padding_cross_mask(
                encoder_attention_mask, batch=enc.shape[0], key_length=enc.shape[1], device=enc.device
            )
            if cache is not None:
                cache.memory, cache.memory_mask = memory, cross_mask

        x, inputs = self._b.begin(input_ids, attention_mask=attention_mask, cache=cache.anchor if cache else None)
        for j in range(self._b.num_layers):
            if j not in self._cross_of_layer:
                x = self._b.layer(j, x, inputs)  # (B, T, D)
                continue
            c = self._cross_of_layer[j]
            layer = self.anchor.model.layers[j]
            h = layer.input_layernorm(x)  # (B, T, D)
            x = x + self._b.self_attention(j, h, inputs) + self.cross[c](h, *memory[c], cross_mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return ComposedOutput(logits=self._b.logits(x), cache=cache)
