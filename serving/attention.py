"""Attention for serving on a CPU: plain batched matrix products over the decode batch's buffers.

Why not torch's `scaled_dot_product_attention` (transformers' "sdpa") on a CPU: its fused CPU kernel
is tuned for long queries. Measured on 2 cores with the debug model (4 heads of 64, ~430 keys; the
numbers are in docs/benchmarks.md, serve_throughput): a 32-row decode step in bfloat16 spends
2.7-3 ms per layer in it where two `bmm`s and a softmax take well under 1 ms, and a left-padded
prompt group in bfloat16 is slower through it than through the products. For float32 prompts it is
as fast as the products, so those still go to it.

The products are only that fast on contiguous inputs: a bfloat16 `bmm` copies a strided input first
(profiled: that copy was half of a 32-row decode step). serving.kv_slots keeps the decode batch's
buffers contiguous for this reason.

Numerics: scores in the model's dtype, as in transformers' own reference ("eager") attention, and
a softmax that accumulates in float32. Masked positions get the dtype's minimum, not -inf, so a
fully padded query row (left padding in a prompt group) stays finite.

Registered with transformers as `midfill_cpu` (`register()`), with the same mask builder as sdpa;
what this path does not cover (dropout, soft-capping, attention sinks) goes to sdpa unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "midfill_cpu"


def cpu_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, heads, q, dim) in, (batch, q, heads, dim) out."""
    batch, heads, q_len, dim = query.shape
    unusual = dropout > 0 or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if unusual or (q_len > 1 and query.dtype == torch.float32):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves several query heads
        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    kv_len = key.shape[2]
    # The scale goes on the queries (q_len x dim) rather than the scores (q_len x kv_len), and the
    # scores stay in the model's dtype: a prompt group's scores are the largest tensors of a prefill,
    # and every extra pass over them in float32 cost more than the products (profiled).
    q = (query * (scaling if scaling is not None else dim**-0.5)).reshape(batch * heads, q_len, dim)
    # flatten(0, 1) is a view when the buffers allow it (kv_slots keeps them contiguous).
    scores = torch.bmm(q, key.transpose(-1, -2).flatten(0, 1)).view(batch, heads, q_len, kv_len)
    if attention_mask is not None and attention_mask.dtype != torch.bool:  # an additive mask (rare)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) + attention_mask
    elif attention_mask is not None:
        scores.masked_fill_(attention_mask.logical_not(), torch.finfo(scores.dtype).min)
    elif q_len > 1:  # no mask means plain causal attention over the keys
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        scores.masked_fill_(causal.logical_not(), torch.finfo(scores.dtype).min)
    # torch's CPU softmax accumulates reduced-precision inputs in float32 (the same result, bit for
    # bit, as a float32 softmax rounded back -- checked on bfloat16).
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch * heads, q_len, kv_len)
    out = torch.bmm(probs, value.flatten(0, 1)).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation=NAME` known to transformers (idempotent); returns NAME."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, cpu_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
