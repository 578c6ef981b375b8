"""Packed prefill for the static decode path: a group's prompts in one forward pass without padding,
their keys/values written straight into the decode buffers (serving.static_decode).

Why: the dynamic path's prefill (serving.prefill) left-pads a group to its longest prompt, so a group
of one 60-token and one 900-token prompt computes 1,800 positions for 960 real ones, and its keys/values
are then copied, row by row, out of a temporary cache into the decode buffers. Here:

- **Packing**: the prompts' tokens are concatenated into one sequence of sum(lengths) tokens, each
  with its own position (0..n-1 within its prompt), so nothing is computed for padding.
- **Attention per prompt** ("varlen"): a token attends only to its own prompt, causally. With
  FlashAttention installed (and a CUDA half-precision model) that is one `flash_attn_varlen_func`
  call per layer over cumulative sequence lengths; otherwise the model's own attention (sdpa on a
  GPU, serving.attention on a CPU) runs once per prompt on its slice of the packed sequence.
- **Written in place**: each layer's keys/values are scattered straight into the static batch's
  buffers -- prompt j's token i into row (first free row + j), column i -- by one index write per
  layer; there is no temporary cache and no copy afterwards.
- **Prefix reuse**: a prompt that starts like a recent one (serving.prefix_cache) gets the reused
  keys/values copied into its row first and is packed with only its remaining tokens; its queries
  then attend over its whole row (reused + new: causal aligned at the bottom right, as FlashAttention
  does for shorter queries). Such prompts share the pack with fresh ones.

The forward runs with the model's attention switched to `NAME` (registered with transformers,
without a mask builder, so no (tokens x tokens) mask is built) and switched back right after; the
per-pack index tensors reach the attention function as the `packed_prompts` keyword, which
transformers passes through to it. Engine thread only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from serving.kv_slots import OwnedLayer
from serving.prefix_cache import PrefixCache, Reuse
from serving.static_decode import StaticBatch, sample_first

NAME = "midfill_packed"
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@dataclass
class Pack:
    """Where a pack's tokens sit. Queries: the tokens computed now, prompt after prompt; keys: what
    each prompt's queries attend to (its whole row -- the reused part too)."""

    rows: torch.Tensor  # (T,) buffer row of each computed token
    columns: torch.Tensor  # (T,) its column in that row = its position in its prompt
    key_rows: torch.Tensor | None  # (K,) rows/columns of the keys to attend; None: the computed ones
    key_columns: torch.Tensor | None
    query_lengths: list[int]  # per prompt: tokens computed now
    key_lengths: list[int]  # per prompt: tokens attended (reused + computed)
    cu_queries: torch.Tensor  # (g + 1,) int32 cumulative query_lengths (FlashAttention's cu_seqlens_q)
    cu_keys: torch.Tensor  # (g + 1,) int32 cumulative key_lengths
    masks: list[torch.Tensor | None]  # per prompt, for the fallback: None (plain causal) or (1, 1, q, k)
    base_attention: Callable  # the model's own attention function (the per-prompt fallback)

    @classmethod
    def build(cls, lengths: list[int], reused: list[int], *, first_row: int, device, base_attention) -> Pack:
        rows, columns, key_rows, key_columns = [], [], [], []
        for j, (n, c) in enumerate(zip(lengths, reused, strict=True)):
            rows += [first_row + j] * (n - c)
            columns += range(c, n)
            key_rows += [first_row + j] * n
            key_columns += range(n)
        queries = [n - c for n, c in zip(lengths, reused, strict=True)]

        def tensor(values: list[int], dtype=torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        def cumulative(values: list[int]) -> torch.Tensor:
            return tensor([0, *values], dtype=torch.int32).cumsum(0, dtype=torch.int32)

        any_reuse = any(reused)
        # A prompt with reused keys has fewer queries than keys: its queries are the last ones.
        masks = [
            None if n == q else torch.ones(q, n, dtype=torch.bool, device=device).tril(n - q)[None, None]
            for n, q in zip(lengths, queries, strict=True)
        ]
        return cls(
            rows=tensor(rows),
            columns=tensor(columns),
            key_rows=tensor(key_rows) if any_reuse else None,
            key_columns=tensor(key_columns) if any_reuse else None,
            query_lengths=queries,
            key_lengths=list(lengths),
            cu_queries=cumulative(queries),
            cu_keys=cumulative(lengths),
            masks=masks,
            base_attention=base_attention,
        )


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    packed_prompts: Pack,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract over a pack: query (1, heads, T, dim), key/value (1, kv heads,
    K, dim) -> (1, T, heads, dim), each prompt attending causally to its own keys only."""
    pack = packed_prompts
    # What the kernel call below covers; anything else (soft-capping, attention sinks) goes per prompt.
    plain = dropout == 0 and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
    if plain and query.is_cuda and query.dtype in FLASH_DTYPES and flash_available():
        return _flash_varlen(query, key, value, pack, scaling), None
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    q_at = k_at = 0
    for nq, nk, mask in zip(pack.query_lengths, pack.key_lengths, pack.masks, strict=True):
        part, _ = pack.base_attention(
            module,
            query[:, :, q_at : q_at + nq],
            key[:, :, k_at : k_at + nk],
            value[:, :, k_at : k_at + nk],
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
            **kwargs,
        )
        out[:, q_at : q_at + nq] = part
        q_at, k_at = q_at + nq, k_at + nk
    return out, None


def _flash_varlen(query, key, value, pack: Pack, scaling) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    # FlashAttention takes (tokens, heads, dim) and handles grouped-query heads itself; with fewer
    # queries than keys its causal mask is aligned at the bottom right (flash-attn >= 2.1).
    out = flash_attn_varlen_func(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens_q=pack.cu_queries,
        cu_seqlens_k=pack.cu_keys,
        max_seqlen_q=max(pack.query_lengths),
        max_seqlen_k=max(pack.key_lengths),
        softmax_scale=scaling,
        causal=True,
    )
    return out[None]


def register() -> str:
    """Make `NAME` known to transformers (idempotent). No mask builder: the pack needs no mask."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, packed_attention)
    return NAME


@contextmanager
def attention_switched(model, name: str) -> Iterator[Callable]:
    """Run the model with attention `name` for the block; yields the function it had before."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        # "eager" is each model's own function, not registered: sdpa computes the same.
        yield ALL_ATTENTION_FUNCTIONS[before] if before in ALL_ATTENTION_FUNCTIONS else sdpa_attention_forward
    finally:
        config._attn_implementation = before


class _PackLayer(OwnedLayer):
    def get_seq_length(self) -> int:
        return 0  # unused: the forward passes positions, and the pack builds no mask


class PackedPrefiller:
    """Prefills prompts into the next free rows of `batch` (see the module docstring); `prefix_cache`
    may be None (no reuse)."""

    def __init__(self, batch: StaticBatch, prefix_cache: PrefixCache | None) -> None:
        self.batch, self.prefix_cache = batch, prefix_cache
        self.model = batch.model
        self._cache = DynamicCache()
        self._cache.layers = [_PackLayer(self, i) for i in range(len(batch.key_buffers))]
        self._cache.layer_class_to_replicate = None
        self._pack: Pack | None = None
        register()

    def run(self, prompts: list[list[int]], params: list, seeds: list[int]) -> tuple[list[int], list[int]]:
        """Prefill `prompts` as new rows of the batch, in this order; returns per prompt the tokens
        whose keys/values were reused and the first token sampled from its prompt."""
        self.batch.check_fits([len(p) for p in prompts])
        reuse = [self.prefix_cache.lookup(p) for p in prompts] if self.prefix_cache else [Reuse()] * len(prompts)
        first_row = self.batch.rows
        for j, r in enumerate(reuse):
            if r.tokens:
                self._place_reused(first_row + j, r)
        lengths, reused = [len(p) for p in prompts], [r.tokens for r in reuse]
        ids = [t for p, c in zip(prompts, reused, strict=True) for t in p[c:]]
        with attention_switched(self.model, NAME) as base:
            self._pack = pack = Pack.build(
                lengths, reused, first_row=first_row, device=self.batch.device, base_attention=base
            )
            try:
                logits = self.model(
                    input_ids=torch.tensor([ids], device=self.batch.device),
                    position_ids=pack.columns[None],
                    past_key_values=self._cache,
                    use_cache=True,
                    logits_to_keep=pack.cu_queries[1:].long() - 1,  # each prompt's last token
                    packed_prompts=pack,
                ).logits[0]
            finally:
                self._pack = None
        if self.prefix_cache:
            for j, prompt in enumerate(prompts):
                self.prefix_cache.store_layers(
                    prompt, self.batch.key_buffers, self.batch.value_buffers, row=first_row + j, start=0
                )
        first = sample_first(logits, lengths, params, seeds)
        self.batch.admit(lengths, first, params, seeds)
        return reused, first

    def _place_reused(self, row: int, reuse: Reuse) -> None:
        n = reuse.tokens
        for buf, kept in (
            *zip(self.batch.key_buffers, reuse.entry.keys, strict=True),
            *zip(self.batch.value_buffers, reuse.entry.values, strict=True),
        ):
            buf[row, :, :n] = kept[0, :, :n]

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's computed keys/values (1, kv heads, T, dim) into their rows and columns; returns
        what the pack attends to."""
        pack = self._pack
        k_buf, v_buf = self.batch.key_buffers[layer], self.batch.value_buffers[layer]
        # buf[rows, :, columns] is (T, kv heads, dim): the index pair picks one (row, column) per token.
        k_buf[pack.rows, :, pack.columns] = keys[0].transpose(0, 1)
        v_buf[pack.rows, :, pack.columns] = values[0].transpose(0, 1)
        if pack.key_rows is None:
            return keys, values
        return (
            k_buf[pack.key_rows, :, pack.key_columns].transpose(0, 1)[None],
            v_buf[pack.key_rows, :, pack.key_columns].transpose(0, 1)[None],
        )
