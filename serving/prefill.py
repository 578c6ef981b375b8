"""Prompt processing for the engine: grouped prefill, and reuse of recent prompts' keys/values.

A group of waiting prompts without reusable work is prefilled in one forward pass, left-padded to
its longest prompt (~15-20% cheaper per prompt than one at a time on CPU). A prompt that starts like
a recent one (serving.prefix_cache) is prefilled alone, from the reused keys/values on. Either way
the result is a `Prefilled`: the prompts' keys/values, left-padded as the decode batch stores them
(serving.kv_slots), and the logits of each prompt's last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from serving.prefix_cache import PrefixCache


@dataclass
class Prefilled:
    cache: DynamicCache  # (g, heads, width, head_dim) per layer
    mask: torch.Tensor  # (g, width): 1 = prompt token, 0 = left padding
    logits: torch.Tensor  # (g, vocab): next-token logits of each prompt
    cached_tokens: list[int]  # per prompt: tokens whose keys/values were reused, not computed


class Prefiller:
    """Runs prefills for the engine thread; `prefix_cache` may be None (no reuse)."""

    def __init__(self, model, *, pad_id: int, prefix_cache: PrefixCache | None) -> None:
        self.model, self.pad_id, self.prefix_cache = model, pad_id, prefix_cache
        self.device = next(model.parameters()).device

    def run(self, prompts: list[list[int]]) -> list[tuple[list[int], Prefilled]]:
        """Prefill `prompts`; returns (indices into prompts, their Prefilled) per forward pass."""
        reuse = [self.prefix_cache.lookup(p) for p in prompts] if self.prefix_cache else []
        fresh = [i for i in range(len(prompts)) if not reuse or reuse[i].tokens == 0]
        out = []
        if fresh:
            out.append((fresh, self._group([prompts[i] for i in fresh])))
        for i in sorted(set(range(len(prompts))) - set(fresh)):
            out.append(([i], self._reusing(prompts[i], reuse[i])))
        return out

    def _group(self, prompts: list[list[int]]) -> Prefilled:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        cache = DynamicCache(config=self.model.config)
        padded = not bool(mask.all())
        logits = self.model(
            input_ids=ids,
            attention_mask=mask if padded else None,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0) if padded else None,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if self.prefix_cache:
            for row, prompt in enumerate(prompts):
                self.prefix_cache.store(prompt, cache, row=row, start=width - len(prompt))
        return Prefilled(cache, mask, logits, [0] * len(prompts))

    def _reusing(self, prompt: list[int], reuse) -> Prefilled:
        cache = self.prefix_cache.start_cache(reuse, self.model.config)
        # Positions and the causal mask follow from the cache's length (transformers' cache_position).
        logits = self.model(
            input_ids=torch.tensor([prompt[reuse.tokens :]], device=self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        self.prefix_cache.store(prompt, cache)
        return Prefilled(
            cache, torch.ones(1, len(prompt), dtype=torch.long, device=self.device), logits, [reuse.tokens]
        )
