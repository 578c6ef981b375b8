"""The trainable bridge: projection + multi-head cross-attention (docs/research.md §4, §5).

Every bridge block is initialised so that it adds exactly zero (its output projection starts at
zero, as Flamingo's gates and ControlNet's zero convolutions do): a freshly composed model computes
the anchor's own logits, and training moves it away from there only as far as the data asks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention whose queries come from one stream and keys/values from another.

    No rotary embedding: both streams already carry position information, and the CALM/CodeT5+
    cross-attentions are plain dot-product attention. Parameters: 4·D² (q, k, v, o; no biases).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"composition.numHeads: {num_heads} does not divide the anchor width {dim}; pick a divisor"
            )
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.o_proj.weight)  # the block adds 0 until trained

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) → keys, values (B, H, S, hd); cacheable, as they depend on memory only."""
        return self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) attends to k, v (B, H, S, hd); mask (B, 1, T, S) bool, True = may attend."""
        B, T, D = x.shape
        q = self._heads(self.q_proj(x))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class CalmBridge(nn.Module):
    """One CALM layer pair (augmenting layer i → anchor layer j):

        B_j ← B_j + f_cross(f_proj(A_i), B_j)

    f_proj = Linear(D_A → D_B); f_cross = multi-head cross-attention, queries from B_j, keys/values
    from f_proj(A_i). Both streams are RMS-normalised before attending (pre-norm, as every Llama
    block does), since the raw residual streams of the two frozen models differ in scale.
    Parameters: D_A·D_B + D_B (projection) + 2·D_B (norms) + 4·D_B² (attention).
    """

    def __init__(self, augment_dim: int, anchor_dim: int, num_heads: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.proj = nn.Linear(augment_dim, anchor_dim)
        self.norm_kv = nn.RMSNorm(anchor_dim, eps=eps)
        self.norm_q = nn.RMSNorm(anchor_dim, eps=eps)
        self.cross = CrossAttention(anchor_dim, num_heads)

    def keys_values(self, augment_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A_i (B, S, D_A) → keys, values (B, H, S, hd) of f_proj(A_i)."""
        return self.cross.keys_values(self.norm_kv(self.proj(augment_states)))

    def forward(
        self, anchor_states: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """B_j (B, T, D_B) → B_j + f_cross(...) (B, T, D_B)."""
        return anchor_states + self.cross(self.norm_q(anchor_states), k, v, mask)


def causal_cross_mask(
    *, query_length: int, key_length: int, key_padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(B or 1, 1, T, S) bool: the query at absolute position t (the last T of S positions) sees keys
    at positions s <= t only — CALM's position alignment (the public reference code had no mask).

    key_padding: (B, S), 1 for real tokens. A padded query may still see its own position, so that
    no row is fully masked (a fully masked row makes sdpa return NaN); its output is never used.
    """
    past = key_length - query_length
    q_pos = torch.arange(past, key_length, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(key_length, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if key_padding is not None:
        real = key_padding.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        mask = mask & (real | (k_pos == q_pos)[None, None])
    return mask


def padding_cross_mask(
    key_padding: torch.Tensor | None, *, batch: int, key_length: int, device: torch.device
) -> torch.Tensor:
    """(B, 1, 1, S) bool for attending to encoder states: every real encoder position, no causality."""
    if key_padding is None:
        return torch.ones(batch, 1, 1, key_length, dtype=torch.bool, device=device)
    real = key_padding.to(device=device, dtype=torch.bool)
    if not real.any(-1).all():
        raise ValueError("encoder_attention_mask: every row needs at least one real (1) token")
    return real[:, None, None, :]
