"""The decode batch's key/value cache: preallocated buffers that requests join and leave.

Layout: per model layer, one (rows, heads, columns, head_dim) buffer for keys and one for values,
plus a (rows, columns) attention mask. Rows are left-padded so that every running request's newest
token sits in the same column: a decode step writes all rows at one column and copies nothing else.
(The growing `DynamicCache` re-copies the whole cache with `torch.cat` every step, and the engine
used to splice every joining request in the same way; on 2 CPU cores a 32-row decode step of the
debug model took 20-29 ms that way and 13-14 ms with these buffers, side by side in one profile --
docs/benchmarks.md, serve_throughput.)

- A joining request's prefilled keys/values are copied into the next free row, right-aligned to the
  write column (if its prompt is longer than the columns in use, the other rows shift right once).
- A leaving request's row is filled by moving the last row into it; `remove` returns the new order.
- When the write column reaches the end, the columns that are padding in every row are dropped
  (compaction); rows never exceed the model's context, so there is always room after it.

Padding columns hold zeros or stale (finite) keys/values and are masked; the model sees the active
block through `cache`, a transformers `DynamicCache` whose layers are views into the buffers, so any
decoder that uses the standard Cache API runs on it unchanged.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer's view: `update` writes the step's keys/values at the write column of every row."""

    def __init__(self, owner: DecodeBatchCache, index: int) -> None:
        super().__init__()
        self._owner, self._index = owner, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = self._owner._write(self._index, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._owner.cols

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.cols + query_length, 0


class DecodeBatchCache:
    """Keys/values of the running requests, one row each (see the module docstring).

    `column_capacity` must be at least the longest row a request can reach (prompt + max_tokens <=
    the model's context); the slack above it only makes compactions rarer.
    """

    def __init__(self, column_capacity: int, *, slack: int = 64) -> None:
        self.column_capacity = column_capacity + slack
        self.slack = slack
        self.rows = 0
        self.cols = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self.cache = DynamicCache()
        self.compactions = 0

    # -- what a decode step uses --------------------------------------------------------------------
    def begin_step(self) -> torch.Tensor:
        """Make room for one column and return the step's (rows, cols + 1) attention mask."""
        if self.cols + 1 > self.column_capacity:
            self.compact()
        if self.cols + 1 > self.column_capacity:
            raise RuntimeError(f"a request outgrew the key/value buffer ({self.column_capacity} columns)")
        self._mask[: self.rows, self.cols] = 1
        return self._mask[: self.rows, : self.cols + 1]

    def end_step(self) -> None:
        self.cols += 1

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = keys.shape[2]
        self._keys[layer][: self.rows, :, self.cols : self.cols + q] = keys
        self._values[layer][: self.rows, :, self.cols : self.cols + q] = values
        end = self.cols + q
        return self._keys[layer][: self.rows, :, :end], self._values[layer][: self.rows, :, :end]

    # -- joining and leaving ------------------------------------------------------------------------
    def add(self, prefilled: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of a prefill: `prefilled` holds (g, H, t, D) per layer, left-padded as `mask` (g, t)."""
        g, t = mask.shape
        if t > self.column_capacity - self.slack:
            raise ValueError(f"a prompt of {t} tokens does not fit the {self.column_capacity - self.slack}-column buffer")
        first = prefilled.layers[0].keys
        if not self._keys:
            self._allocate(prefilled, rows=g)
        self._grow_rows(self.rows + g)
        if t > self.cols:
            self._shift_right(t - self.cols)
        rows, start = slice(self.rows, self.rows + g), self.cols - t
        keep = mask[:, None, :, None].to(first.dtype)  # padded prompt positions become zeros
        for layer, source in enumerate(prefilled.layers):
            for buf, new in ((self._keys[layer], source.keys), (self._values[layer], source.values)):
                buf[rows, :, :start] = 0
                buf[rows, :, start : self.cols] = new * keep
        self._mask[rows, :start] = 0
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
        elif self._leading_padding() >= self.slack:
            self.compact()  # do not keep attending over columns nobody uses
        return order

    def clear(self) -> None:
        self.rows = self.cols = 0

    def compact(self) -> None:
        """Drop the columns that are padding in every row."""
        lead = self._leading_padding()
        if lead == 0:
            return
        width = self.cols - lead
        for buf in (*self._keys, *self._values):
            buf[: self.rows, :, :width] = buf[: self.rows, :, lead : self.cols].clone()
        self._mask[: self.rows, :width] = self._mask[: self.rows, lead : self.cols].clone()
        self.cols = width
        self.compactions += 1

    # -- storage ------------------------------------------------------------------------------------
    def _leading_padding(self) -> int:
        if self.rows == 0:
            return self.cols
        real = self._mask[: self.rows, : self.cols]
        return int((real.cumsum(dim=1) == 0).sum(dim=1).min())

    def _allocate(self, prefilled: DynamicCache, *, rows: int) -> None:
        for layer in prefilled.layers:
            _, heads, _, dim = layer.keys.shape
            shape = (rows, heads, self.column_capacity, dim)
            self._keys.append(layer.keys.new_zeros(shape))
            self._values.append(layer.values.new_zeros(shape))
        self._mask = torch.zeros(rows, self.column_capacity, dtype=torch.long, device=prefilled.layers[0].keys.device)
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

    def _shift_right(self, by: int) -> None:
        """Move the used columns right so a longer prompt fits left of the write column (the new
        width is that prompt's length, which always fits)."""
        if self.rows:
            for buf in (*self._keys, *self._values):
                buf[: self.rows, :, by : by + self.cols] = buf[: self.rows, :, : self.cols].clone()
            self._mask[: self.rows, by : by + self.cols] = self._mask[: self.rows, : self.cols].clone()
            self._mask[: self.rows, :by] = 0
        self.cols += by
