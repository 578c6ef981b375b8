"""Sampling for a whole decode batch on the device: greedy, temperature and top-p in one sequence of
tensor operations, with no host synchronisation and no per-request `torch.Generator`.

Why not a generator per request (what the engine's dynamic path does on the CPU): a generator is
host state, so sampling a batch meant one `multinomial` call per row, and on a GPU every row's draw
would be another kernel launch plus a transfer. Here the randomness is a counter-based hash of
(request seed, position of the sampled token, vocabulary index), computed for the whole batch at
once. A request's draws therefore depend only on its own seed and on how far it got -- not on which
other requests share its steps -- so a seeded request gives the same tokens alone or in any batch,
and the whole thing can be captured in a CUDA graph.
(`sample_rows`, at the end, is that host sampler: the dynamic path's and the composed engine's.)

The draw is the exponential race ("Gumbel-max"): argmax(p_i / E_i) with E_i ~ Exp(1) picks index i
with probability p_i, the same distribution as multinomial(p) in one pass.
"""

from __future__ import annotations

import torch

from serving.requests import SamplingParams

_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31, so that a 32-bit value times one of them fits a signed 64-bit integer:
# the hash is exact integer arithmetic on every device (no reliance on overflow behaviour).
_MUL_A = 0x7FEB352D
_MUL_B = 0x2C1B3C6D
_GOLDEN = 0x9E3779B1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Fold 63-bit seeds (int64) into 32-bit keys; both halves matter."""
    return _mix((seeds & _MASK32) ^ _mix((seeds >> 32) & _MASK32))


def uniforms(keys: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 in (0, 1): a deterministic function of (key, counter, vocabulary index)."""
    row = _mix((keys + counters * _GOLDEN) & _MASK32)
    index = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * _GOLDEN) & _MASK32
    bits = _mix(row[:, None] ^ index[None, :]) >> 8  # 24 bits: exact in float32, never 0 or 1 below
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
) -> torch.Tensor:
    """Next token per row of `logits` (B, vocab). Rows with temperature 0 take the argmax; the others
    draw from softmax(logits / temperature) cut to the smallest set of top tokens whose probability
    reaches top_p (the top token always stays). `keys` from `seed_keys`, `counters` (B,) the position
    of the token being sampled."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    race = probs.masked_fill(keep.logical_not(), 0.0) / -torch.log(uniforms(keys, counters, logits.shape[-1]))
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)


def sample_rows(logits: torch.Tensor, rows: list[tuple[SamplingParams, torch.Generator | None]]) -> list[int]:
    """The dynamic path's sampler, on the host: one token per row of `logits` (B, vocab). Greedy rows
    take the argmax; sampled rows use temperature and top-p with the request's own generator."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()
    for i, (params, generator) in enumerate(rows):
        if params.temperature <= 0:
            continue
        # On the CPU: the request's generator lives there, and one row is cheap to move.
        probs = torch.softmax(logits[i].cpu() / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens[i] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens
