"""The static decode path: a fixed-shape decode step over key/value buffers allocated once, replayed
from CUDA graphs on a GPU.

Why: on a GPU the dynamic path (serving.kv_slots) is bound by the host, not the device -- transformers'
module-by-module forward, a mask built per step, a host sync per step for the sampled ids -- so a
step took as long at 1 row as at 32 (docs/benchmarks.md). Here every tensor a step touches has a
fixed address and shape, so the whole step (forward, cache write, sampling) is captured once per
shape into a CUDA graph at load and replayed with one launch:

- Buffers: per layer, keys and values of (capacity, kv_heads, context, head_dim), allocated once at
  the model's full context. Row r holds its request's tokens at columns 0..n-1 (no left padding):
  a step writes each row's new key/value at that row's own position (a scatter by index tensor).
- Shapes: the running rows occupy rows 0..n-1; a step runs the smallest batch bucket
  (1, 2, 4, 8, 16, 32, 64) >= n and the smallest width bucket (powers of two, then the context) >= the
  longest row. Rows beyond n are idle padding that writes only into its own (unused) row. Width
  buckets keep a step from reading the whole context's keys/values when rows are short: at 32 rows
  of ~460 tokens a 1B model's full 2048-token cache is ~4x the bytes of the used part.
- Inputs live in device tensors (tokens, positions, sampling parameters); the mask is computed inside
  the step from the positions. The step samples (serving.sampling) and writes the sampled ids into
  the next step's token input on the device, so the host only reads them back (one small copy).
- Rows join (serving.packed_prefill writes their prompts' keys/values straight into the next free
  rows) and leave (the last row moves into the gap) between steps, as on the dynamic path.

On a CPU the same step runs eagerly (that is how it is tested against transformers' generate); the
engine keeps the dynamic path there by default, whose width follows the rows exactly (faster on a CPU,
where attention over unused columns is not free).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from serving import sampling
from serving.kv_slots import OwnedLayer

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_WIDTH = 128


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (the last bucket when n exceeds them all)."""
    return next((b for b in buckets if b >= n), buckets[-1])


def width_buckets(context: int) -> tuple[int, ...]:
    """Powers of two from MIN_WIDTH below the context, then the context itself."""
    widths, w = [], MIN_WIDTH
    while w < context:
        widths.append(w)
        w *= 2
    return (*widths, context)


@dataclass
class Launched:
    """A step in flight: where its sampled ids land on the host, and the event that says they have."""

    host: torch.Tensor
    event: torch.cuda.Event | None


class _RowLayer(OwnedLayer):
    """The static batch's layer: each row's key/value is written at its own position."""

    def get_seq_length(self) -> int:
        return 0  # unused: the step passes positions and a 4-D mask

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner._shape[1], 0


def supports(model) -> str | None:
    """Why the static step cannot run this model (None when it can): it assumes every layer attends
    over the full causal context with one standard key/value cache per layer."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        windowed = any(t != "full_attention" for t in layer_types)
    else:  # older configs: a window size, in use unless switched off (Qwen2's use_sliding_window)
        windowed = bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
    return "sliding-window attention layers" if windowed else None


class StaticBatch:
    """The running rows of the static path (see the module docstring). Engine thread only.

    `graphs`: capture every (batch, width) bucket into a CUDA graph now (CUDA only); if capturing
    fails the step runs eagerly and `graphs_active` stays False."""

    def __init__(self, model, *, capacity: int, context: int, graphs: bool) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.context = context
        self.capacity = bucket_for(capacity, BATCH_BUCKETS)
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b <= self.capacity)
        self.widths = width_buckets(context)
        self.rows = 0
        self.steps = 0
        self._lengths: list[int] = []  # per row: tokens in its cache (host mirror of `positions`)
        self._allocate()
        self._shape = (1, self.widths[0])  # (batch bucket, width) of the step being run
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graphs_active = False
        if graphs and self.device.type == "cuda":
            with torch.inference_mode():  # as the engine thread runs: no autograd state in the graphs
                self._capture_all()

    # -- storage --------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        # One forward of one token tells the cache shapes of any decoder that uses the Cache API.
        probe = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(
                input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), past_key_values=probe, use_cache=True
            )
        self.key_buffers, self.value_buffers = [], []
        for layer in probe.layers:
            _, heads, _, dim = layer.keys.shape
            shape = (self.capacity, heads, self.context, dim)
            self.key_buffers.append(layer.keys.new_zeros(shape))
            self.value_buffers.append(layer.values.new_zeros(shape))
        n, dev = self.capacity, self.device
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)  # where each row's next token goes
        self.temperature = torch.zeros(n, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(n, dtype=torch.float32, device=dev)
        self.keys = torch.zeros(n, dtype=torch.long, device=dev)  # sampling.seed_keys per row
        self._columns = torch.arange(self.context, device=dev)
        self.cache = DynamicCache()
        self.cache.layers = [_RowLayer(self, i) for i in range(len(self.key_buffers))]
        self.cache.layer_class_to_replicate = None
        self._host_ids = [torch.zeros(n, dtype=torch.long, pin_memory=dev.type == "cuda") for _ in range(2)]

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, width = self._shape
        where = self.positions[:batch].view(batch, 1, 1, 1).expand(batch, keys.shape[1], 1, keys.shape[3])
        k, v = self.key_buffers[layer][:batch], self.value_buffers[layer][:batch]
        k.scatter_(2, where, keys)
        v.scatter_(2, where, values)
        return k[:, :, :width], v[:, :, :width]

    # -- the step -------------------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        """One decode step at self._shape, device tensors only (what a graph captures)."""
        batch, width = self._shape
        pos = self.positions[:batch]
        mask = (self._columns[:width][None, :] <= pos[:, None])[:, None, None, :]
        logits = self.model(
            input_ids=self.tokens[:batch, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        ids = sampling.sample(logits, self.temperature[:batch], self.top_p[:batch], self.keys[:batch], pos + 1)
        self.tokens[:batch].copy_(ids)
        # Idle padding rows advance too; the clamp keeps their (ignored) writes inside the buffer.
        self.positions[:batch].add_(1).clamp_(max=self.context - 1)
        return ids

    def launch(self) -> Launched:
        """Start advancing every running row by one token, without waiting for the device: the
        sampled ids (rows 0..rows-1 in this order) arrive through `ids(launched)`. The next step can be
        launched first -- it reads this step's ids on the device -- so the host's work on them
        (detokenizing, stop checks) overlaps the next step's compute."""
        longest = max(self._lengths) + 1
        if longest > self.context:  # the engine's length check keeps rows shorter
            raise RuntimeError(f"a request outgrew the key/value buffer ({self.context} tokens a row)")
        self._shape = (bucket_for(self.rows, self.batch_buckets), bucket_for(longest, self.widths))
        captured = self._graphs.get(self._shape)
        if captured is not None:
            graph, ids = captured
            graph.replay()
        else:
            ids = self._forward()
        # The one device->host transfer of the step: the sampled ids, into one of two pinned buffers
        # (the previous step's may still be unread).
        host = self._host_ids[self.steps % 2][: self.rows]
        host.copy_(ids[: self.rows], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._lengths = [n + 1 for n in self._lengths]
        self.steps += 1
        return Launched(host, event)

    @staticmethod
    def ids(launched: Launched) -> list[int]:
        """The sampled ids of a launched step (waits for that step only)."""
        if launched.event is not None:
            launched.event.synchronize()
        return launched.host.tolist()

    def _capture_all(self) -> None:
        try:
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for batch in reversed(self.batch_buckets):  # largest first: smaller ones reuse its pool
                    for width in reversed(self.widths):
                        self._shape = (batch, width)
                        for _ in range(2):  # warm-up outside the graph (allocator, lazy inits)
                            self._forward()
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool, stream=stream):
                            ids = self._forward()
                        self._graphs[self._shape] = (graph, ids)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            self.graphs_active = True
        except Exception:  # a model whose forward cannot be captured still runs, eagerly
            log.exception("capturing the decode step into CUDA graphs failed; the static step runs eagerly")
            self._graphs.clear()
        self.positions.zero_()
        self.tokens.zero_()

    # -- joining and leaving ----------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.capacity - self.rows

    def check_fits(self, lengths: list[int]) -> None:
        """Raise unless prompts of these lengths fit as new rows (free rows, a row's columns)."""
        if len(lengths) > self.free:
            raise RuntimeError(f"{len(lengths)} rows do not fit the static batch ({self.free} free of {self.capacity})")
        for n in lengths:
            if n >= self.context:
                raise ValueError(f"a prompt of {n} tokens does not fit the buffer ({self.context} tokens a row)")

    def admit(self, lengths: list[int], first: list[int], params: list, seeds: list[int]) -> None:
        """Append rows whose prompts' keys/values are already in the next free rows, columns
        0..lengths[j]-1 (serving.packed_prefill writes them there); `first[j]` is the token sampled
        from prompt j, `params[j]` its SamplingParams, `seeds[j]` its seed (request_seed)."""
        self.check_fits(lengths)
        g = len(lengths)
        rows = slice(self.rows, self.rows + g)
        dev = self.device
        self.tokens[rows] = torch.tensor(first, device=dev)
        self.positions[rows] = torch.tensor(lengths, device=dev)
        self.temperature[rows] = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        self.top_p[rows] = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        self.keys[rows] = sampling.seed_keys(torch.tensor(seeds, device=dev))
        self._lengths.extend(lengths)
        self.rows += g

    def remove(self, indices: list[int]) -> list[int]:
        """Drop rows; returns, for each remaining row in its new place, its old index."""
        order = list(range(self.rows))
        for i in sorted(set(indices), reverse=True):
            last = self.rows - 1
            if i != last:
                n = self._lengths[last]
                for buf in (*self.key_buffers, *self.value_buffers):
                    buf[i, :, :n] = buf[last, :, :n]
                for vec in (self.tokens, self.positions, self.temperature, self.top_p, self.keys):
                    vec[i] = vec[last]
                self._lengths[i] = n
                order[i] = order[last]
            order.pop()
            self._lengths.pop()
            self.rows -= 1
        return order

    def clear(self) -> None:
        self.rows = 0
        self._lengths = []


def request_seed(params) -> int:
    """The request's seed, or a fresh random one (63 bits, as an int64 holds)."""
    return params.seed if params.seed is not None else random.getrandbits(63)


def sample_first(logits: torch.Tensor, lengths: list[int], params: list, seeds: list[int]) -> list[int]:
    """The first token of each prefilled prompt, drawn exactly as the static step draws the later ones
    (same seed keys, counter = the token's position), so a seeded request is reproducible end to end."""
    dev = logits.device
    ids = sampling.sample(
        logits,
        torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
        torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
        sampling.seed_keys(torch.tensor(seeds, device=dev)),
        torch.tensor(lengths, device=dev),
    )
    return ids.tolist()
