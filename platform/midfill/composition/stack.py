"""Run a transformers Llama one decoder layer at a time.

Composition reads and changes the residual stream *between* decoder layers, which
`LlamaForCausalLM.forward` does not expose. `Stack` does what `LlamaModel.forward` does
(embed → rotary embeddings + attention mask → layers → final norm → lm head), in pieces, calling
the model's own modules so the frozen parent computes exactly what it computes alone.
Checked against transformers 5.23 (`LlamaDecoderLayer.forward(hidden_states, attention_mask,
position_ids, past_key_values, use_cache, position_embeddings, **kwargs)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask


@dataclass
class LayerInputs:
    """What every decoder layer of one forward pass shares."""

    mask: torch.Tensor | None  # self-attention mask in the model's attention implementation's form
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B, T, head_dim)
    position_ids: torch.Tensor  # (B, T) or (1, T)
    cache: DynamicCache | None  # this model's own KV cache (never shared with the other model)
    causal: bool


def position_ids_for(
    attention_mask: torch.Tensor | None, *, past: int, length: int, device: torch.device
) -> torch.Tensor:
    """Positions of the new tokens: count of real tokens before each one (left padding aware)."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).unsqueeze(0)  # (1, T)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, past + T)
    return positions.clamp(min=0)[:, -length:]  # (B, T)


class Stack:
    """A frozen-or-not `LlamaForCausalLM` seen as: begin → layer(0..L-1) → logits."""

    def __init__(self, lm: LlamaForCausalLM) -> None:
        if not hasattr(lm, "model") or not hasattr(lm.model, "layers"):
            raise ValueError(f"composition needs a Llama-style causal LM (model.layers), got {type(lm).__name__}")
        self.lm = lm
        self.body = lm.model

    @property
    def config(self):
        return self.lm.config

    @property
    def num_layers(self) -> int:
        return len(self.body.layers)

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    def begin(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        causal: bool = True,
    ) -> tuple[torch.Tensor, LayerInputs]:
        """Token embeddings (B, T, D) and the per-pass layer inputs.

        attention_mask: (B, past + T), 1 for real tokens, 0 for padding (as in transformers).
        causal=False runs the decoder as a bidirectional encoder (CodeT5+): the padding mask is
        always materialised and `is_causal=False` is passed down, because sdpa would otherwise
        fall back to its built-in causal mask when no mask tensor is given.
        """
        x = self.body.embed_tokens(input_ids)  # (B, T, D)
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = position_ids_for(attention_mask, past=past, length=x.shape[1], device=x.device)
        if causal:
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=x,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
            )
        else:
            assert cache is None, "a bidirectional encoder runs once over its whole input"
            mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=x,
                attention_mask=attention_mask,
                allow_is_bidirectional_skip=False,
            )
        rope = self.body.rotary_emb(x, position_ids=position_ids)
        return x, LayerInputs(mask=mask, rope=rope, position_ids=position_ids, cache=cache, causal=causal)

    def layer(self, index: int, x: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Decoder layer `index` on the residual stream x (B, T, D) → (B, T, D)."""
        return self.body.layers[index](
            x,
            attention_mask=inputs.mask,
            position_ids=inputs.position_ids,
            past_key_values=inputs.cache,
            use_cache=inputs.cache is not None,
            position_embeddings=inputs.rope,
            is_causal=inputs.causal,
        )

    def self_attention(self, index: int, h: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Only the self-attention of layer `index` on an already normalised input h (B, T, D)."""
        out, _ = self.body.layers[index].self_attn(
            hidden_states=h,
            attention_mask=inputs.mask,
            position_ids=inputs.position_ids,
            past_key_values=inputs.cache,
            use_cache=inputs.cache is not None,
            position_embeddings=inputs.rope,
            is_causal=inputs.causal,
        )
        return out  # (B, T, D)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) residual stream after the last layer → (B, T, V) logits."""
        return self.lm.lm_head(self.body.norm(x))

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)


def freeze(module: nn.Module) -> None:
    """Frozen parents: no gradients, eval mode (no dropout), weights never in the optimizer."""
    module.requires_grad_(False)
    module.eval()
