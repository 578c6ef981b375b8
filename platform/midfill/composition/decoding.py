"""Greedy decoding of a composed model, with its caches or by full recomputation (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midfill.composition.build import ComposedModel


@dataclass
class Greedy:
    tokens: torch.Tensor  # (B, T + new): the prompt and the generated tokens
    logits: torch.Tensor  # (B, new, V): the logits each new token was chosen from


@torch.no_grad()
def greedy_generate(
    model: ComposedModel,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    use_cache: bool = True,
    eos_token_id: int | None = None,
    **context,
) -> Greedy:
    """Greedy continuation of input_ids (B, T), unpadded.

    use_cache=True feeds one token per step through `model.new_cache()` (a KV cache per model plus
    the bridge's cached keys/values); use_cache=False reruns the whole sequence every step.
    `context` goes to every forward call (codet5p: encoder_input_ids, encoder_attention_mask).
    Rows that produced eos_token_id keep emitting it; decoding stops when all rows have.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens: must be at least 1")
    cache = model.new_cache() if use_cache else None
    tokens, step_logits = input_ids, []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    feed = input_ids
    for _ in range(max_new_tokens):
        out = model(feed, cache=cache, **context)
        logits = out.logits[:, -1]  # (B, V)
        step_logits.append(logits)
        nxt = logits.argmax(-1)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        feed = nxt[:, None] if use_cache else tokens
        if eos_token_id is not None and bool(done.all()):
            break
    return Greedy(tokens=tokens, logits=torch.stack(step_logits, dim=1))
