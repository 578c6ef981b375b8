"""The decode batch's key/value cache: preallocated buffers that requests join and leave.

Layout: per model layer, one (rows, heads, width, head_dim) buffer for keys and one for values, plus
a (rows, width) attention mask. Rows are left-padded so that every running request's newest token
sits in the same column, the write column `cols`: a decode step writes all rows at that column and
copies nothing else. (The growing `DynamicCache` re-copies the whole cache with `torch.cat` every
step, and the engine used to splice every joining request in the same way; a one-off profile on 2
CPU cores measured a 32-row decode step of the debug model at 20-29 ms that way and 13-14 ms with
preallocated buffers, before serving.attention.)

The model sees the whole width, not just the written columns -- as transformers' `StaticCache`
does: the columns right of the write column are masked by causality (the query sits at `cols`).
That keeps every view it gets contiguous (on a CPU a bfloat16 `bmm` copies a strided input first,
serving.attention), at the price of re-allocating when the width changes; so it changes in steps
of `bucket` columns, one copy of the buffers per `bucket` or more decode steps:

- when the write column reaches the width, the columns that are padding in every row are dropped
  and the buffers are re-laid out with between `bucket` + 1 and 2 x `bucket` free columns;
- a joining request's prefilled keys/values are copied into the next free row, right-aligned to the
  write column (if its prompt is longer than the columns in use, the other rows shift right once);
- a leaving request's row is filled by moving the last row into it (`remove` returns the new order);
  once `bucket` columns are padding in every row they are dropped, so nobody attends over them.

Rows never exceed the model's context, so the width never exceeds the context plus 2 x `bucket`.
Padding and unwritten columns hold zeros or stale (finite) keys/values and are masked. The model
reads the buffers through `cache`, a transformers `DynamicCache` whose layers are views into them,
so any decoder that uses the standard Cache API runs on it unchanged.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class OwnedLayer(DynamicLayer):
    """One layer's view for transformers over buffers its owner keeps: `update` hands the step's
    keys/values to `owner._write(index, keys, values)`, which stores them and returns what to attend."""

    def __init__(self, owner, index: int) -> None:
        super().__init__()
        self._owner, self._index = owner, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = self._owner._write(self._index, key_states, value_states)
        return self.keys, self.values


class _SlotLayer(OwnedLayer):
    """The decode batch's layer: the step's keys/values go to the write column of every row."""

    def get_seq_length(self) -> int:
        return self._owner.cols  # where the step's query sits: positions and the causal mask follow

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.width, 0  # the step attends over the whole (contiguous) width


class DecodeBatchCache:
    """Keys/values of the running requests, one row each (see the module docstring).

    `max_row_tokens` must be at least the longest row a request can reach (prompt + max_tokens <=
    the model's context).
    """

    def __init__(self, max_row_tokens: int, *, bucket: int = 32) -> None:
        self.max_row_tokens = max_row_tokens
        self.bucket = bucket
        self.rows = 0
        self.cols = 0  # the write column: every row's next token goes here
        self.width = 0  # columns allocated (and seen by the model)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self.cache = DynamicCache()
        self.relayouts = 0

    # -- what a decode step uses --------------------------------------------------------------------
    def begin_step(self) -> torch.Tensor:
        """Make room for one column and return the step's (rows, width) attention mask."""
        if self.cols + 1 > self.width:
            self._relayout(drop=self._leading_padding())
            if self.cols + 1 > self.max_row_tokens:  # the engine's length check keeps rows shorter
                raise RuntimeError(f"a request outgrew the key/value buffer ({self.max_row_tokens} tokens a row)")
        self._mask[: self.rows, self.cols] = 1
        return self._mask[: self.rows]

    def end_step(self) -> None:
        self.cols += 1

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = keys.shape[2]
        self._keys[layer][: self.rows, :, self.cols : self.cols + q] = keys
        self._values[layer][: self.rows, :, self.cols : self.cols + q] = values
        return self._keys[layer][: self.rows], self._values[layer][: self.rows]

    # -- joining and leaving ------------------------------------------------------------------------
    def add(self, prefilled: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of a prefill: `prefilled` holds (g, H, t, D) per layer, left-padded as `mask` (g, t)."""
        g, t = mask.shape
        if t > self.max_row_tokens:
            raise ValueError(f"a prompt of {t} tokens does not fit the buffer ({self.max_row_tokens} tokens a row)")
        if not self._keys:
            self._allocate(prefilled, rows=g, width=self._width_for(t))
        self._grow_rows(self.rows + g)
        if self.rows == 0 and t + 1 <= self.width <= self._width_for(t):
            self.cols = t  # an empty batch whose width suits the prompt: nothing to move
        elif t > self.cols or self.rows == 0:  # the running rows shift right so the new prompt ends at the write column
            self._relayout(drop=self.cols - t)
        rows, start = slice(self.rows, self.rows + g), self.cols - t
        keep = mask[:, None, :, None].to(self._keys[0].dtype)  # padded prompt positions become zeros
        for layer, source in enumerate(prefilled.layers):
            for buf, new in ((self._keys[layer], source.keys), (self._values[layer], source.values)):
                buf[rows, :, :start] = 0
                buf[rows, :, start : self.cols] = new * keep
        self._mask[rows] = 0
        self._mask[rows, start : self.cols] = mask
        self.rows += g

    def remove(self, indices: list[int]) -> list[int]:
        """Drop rows; returns, for each remaining row in its new place, its old index."""
        order = list(range(self.rows))
        for i in sorted(set(indices), reverse=True):
            last = self.rows - 1
            if i != last:
                for buf in (*self._keys, *self._values):
                    buf[i] = buf[last]
                self._mask[i] = self._mask[last]
                order[i] = order[last]
            order.pop()
            self.rows -= 1
        if self.rows == 0:
            self.cols = 0
        elif self._leading_padding() >= self.bucket:
            self._relayout(drop=self._leading_padding())  # do not keep attending over columns nobody uses
        return order

    def clear(self) -> None:
        self.rows = self.cols = 0

    # -- storage ------------------------------------------------------------------------------------
    def _leading_padding(self) -> int:
        if self.rows == 0:
            return self.cols
        real = self._mask[: self.rows, : self.cols]
        return int((real.cumsum(dim=1) == 0).sum(dim=1).min())

    def _width_for(self, cols: int) -> int:
        """Between bucket + 1 and 2 x bucket free columns after `cols`, in whole buckets."""
        return (cols // self.bucket + 2) * self.bucket

    def _relayout(self, *, drop: int) -> None:
        """Re-lay the used columns into new buffers: `drop` leading columns removed (negative: shift
        right by that much), width re-bucketed around the new write column."""
        cols = self.cols - drop
        width = self._width_for(cols)
        src, dst = max(drop, 0), max(-drop, 0)
        used = self.cols - src

        def moved(buf: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(buf.shape)
            shape[dim] = width
            out = buf.new_zeros(shape)
            out[: self.rows].narrow(dim, dst, used).copy_(buf[: self.rows].narrow(dim, src, used))
            return out

        self._keys = [moved(b, 2) for b in self._keys]
        self._values = [moved(b, 2) for b in self._values]
        self._mask = moved(self._mask, 1)
        self.cols, self.width = cols, width
        self.relayouts += 1

    def _allocate(self, prefilled: DynamicCache, *, rows: int, width: int) -> None:
        self.width = width
        for layer in prefilled.layers:
            _, heads, _, dim = layer.keys.shape
            self._keys.append(layer.keys.new_zeros((rows, heads, self.width, dim)))
            self._values.append(layer.values.new_zeros((rows, heads, self.width, dim)))
        self._mask = torch.zeros(rows, self.width, dtype=torch.long, device=prefilled.layers[0].keys.device)
        self.cache.layers = [_SlotLayer(self, i) for i in range(len(self._keys))]
        self.cache.layer_class_to_replicate = None

    def _grow_rows(self, needed: int) -> None:
        """Double the row capacity until `needed` rows fit (rare: only while the batch grows)."""
        have = self._mask.shape[0]
        if needed <= have:
            return
        new = max(needed, 2 * have)

        def grown(buf: torch.Tensor) -> torch.Tensor:
            out = buf.new_zeros((new, *buf.shape[1:]))
            out[: self.rows] = buf[: self.rows]
            return out

        self._keys = [grown(b) for b in self._keys]
        self._values = [grown(b) for b in self._values]
        self._mask = grown(self._mask)
