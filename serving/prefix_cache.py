"""Reusing prompt work across requests: editors resend almost the same prompt as the user types.

An editor's infill prompt is the file around the cursor. Between two keystrokes the part of the
prompt before the edit is unchanged, so its keys/values can be reused and only the rest prefilled --
and prefill is most of a request's cost on a CPU (docs/benchmarks.md). vLLM's automatic prefix
caching does this with hashed blocks; here the last prompts' keys/values are kept whole (LRU,
bounded in tokens) and a new prompt reuses the longest common token prefix with any of them when it
is at least `min_tokens` long. The reused keys/values are what a full prefill computes for those
tokens (same positions, causal attention), up to float rounding.

Owned by the engine thread; not thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class _Entry:
    ids: torch.Tensor  # (t,) token ids
    keys: list[torch.Tensor]  # per layer (1, heads, t, head_dim)
    values: list[torch.Tensor]


@dataclass(frozen=True)
class Reuse:
    """A lookup's answer: reuse the first `tokens` tokens' keys/values of `entry` (0 = prefill it all)."""

    tokens: int = 0
    entry: _Entry | None = None


class PrefixCache:
    """Keys/values of recent prompts, for reuse by prompts that start the same way."""

    def __init__(self, max_tokens: int, *, min_tokens: int = 32) -> None:
        self.max_tokens = max_tokens  # 0 disables; may be lowered while running (evicts on next store)
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self.tokens = 0
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, ids: list[int]) -> Reuse:
        """The longest reusable prefix of `ids`; always leaves at least one token to prefill (its
        logits give the first generated token)."""
        if self.max_tokens <= 0 or not self._entries or len(ids) <= self.min_tokens:
            return Reuse()
        query = torch.tensor(ids)
        best, best_key = 0, None
        for key, entry in self._entries.items():
            n = min(len(entry.ids), len(ids) - 1)
            if n < max(self.min_tokens, best + 1):
                continue
            differs = (entry.ids[:n] != query[:n]).nonzero()
            common = int(differs[0]) if len(differs) else n
            if common > best:
                best, best_key = common, key
        if best < self.min_tokens:
            return Reuse()
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return Reuse(best, self._entries[best_key])

    def start_cache(self, reuse: Reuse, config) -> DynamicCache:
        """A fresh cache holding the reused keys/values (copies: the entry stays intact)."""
        cache = DynamicCache(config=config)
        for layer, keys, values in zip(cache.layers, reuse.entry.keys, reuse.entry.values, strict=True):
            layer.update(keys[:, :, : reuse.tokens].clone(), values[:, :, : reuse.tokens].clone())
        return cache

    def store(self, ids: list[int], cache: DynamicCache, *, row: int = 0, start: int = 0) -> None:
        """Keep the keys/values of prompt `ids`: row `row` of a prefill cache, its tokens from column
        `start` (after the row's left padding)."""
        layers = cache.layers
        self.store_layers(ids, [la.keys for la in layers], [la.values for la in layers], row=row, start=start)

    def store_layers(
        self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], *, row: int, start: int
    ) -> None:
        """As `store`, from per-layer (rows, heads, columns, head_dim) buffers (the static decode path's)."""
        t = len(ids)
        if self.max_tokens <= 0 or t < self.min_tokens or t > self.max_tokens:
            self._evict_to(self.max_tokens)
            return
        new = torch.tensor(ids)
        # An entry that is a prefix of this prompt (or the same prompt) is covered by it from now on.
        for key in [k for k, e in self._entries.items() if len(e.ids) <= t and torch.equal(e.ids, new[: len(e.ids)])]:
            self.tokens -= len(self._entries.pop(key).ids)
        self._evict_to(self.max_tokens - t)
        kept_keys = [k[row : row + 1, :, start : start + t].clone() for k in keys]
        kept_values = [v[row : row + 1, :, start : start + t].clone() for v in values]
        self._entries[self._next_key] = _Entry(new, kept_keys, kept_values)
        self._next_key += 1
        self.tokens += t

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def _evict_to(self, budget: int) -> None:
        while self._entries and self.tokens > max(budget, 0):
            _, oldest = self._entries.popitem(last=False)
            self.tokens -= len(oldest.ids)
