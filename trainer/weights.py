"""Initial weights without a full model in memory: built on the meta device, sharded (FSDP2), then
materialised one parameter at a time, each rank keeping only its shard.

Random weights are a function of (seed, parameter name) alone -- each parameter draws from its own
generator, seeded from both -- so every world size, strategy and shard layout gets the same weights
for the same seed; a single process builds them the same way (trainer.model.build_model). The
distribution is transformers' Llama init: normal(0, initializer_range) for every matrix and the
embedding (its padding row zeroed), ones for the RMSNorm weights, zeros for biases.

`model.init` weights are read from the export's safetensors shard by shard: each rank reads only
the rows of its shard of each tensor (`safe_open(...).get_slice`), never the whole file.

Peak host memory while materialising: one full parameter (the largest, the embedding: vocab x
hidden fp32, ~0.5 GB for the 7b recipe), on top of the rank's shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: stable across processes and Python runs (no hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name -> (module holding it, attribute); tied parameters under their first name."""
    out: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            out[f"{mod_name}.{attr}" if mod_name else attr] = (module, attr)
    return out


def _tied(model: nn.Module) -> list[tuple[tuple[nn.Module, str], list[tuple[nn.Module, str]]]]:
    """Parameters held by several modules (tied embeddings): (first holder, the other holders)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((module, attr))
    return [(h[0], h[1:]) for h in holders.values() if len(h) > 1]


def initial_value(name: str, module: nn.Module, attr: str, shape: torch.Size, *, seed: int, std: float) -> torch.Tensor:
    """The full fp32 initial value of one parameter, on the CPU (module docstring)."""
    if attr == "bias":
        return torch.zeros(shape)
    if "Norm" in type(module).__name__:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(param_seed(seed, name))
    value = torch.empty(shape).normal_(0.0, std, generator=g)
    padding = getattr(module, "padding_idx", None)
    if isinstance(module, nn.Embedding) and padding is not None:
        value[padding] = 0.0
    return value


def _local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """(first row, rows) of this rank's shard of an FSDP2 (DTensor, Shard(0)) parameter; None when
    the parameter is whole. FSDP2 shards dim 0 as torch.chunk does: ceil(n / world) rows per rank."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return None
    placements = param.placements
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(f"unsupported sharding {placements} (FSDP2 shards dim 0 on a 1-D mesh)")
    n, world = param.shape[0], mesh.size()
    per_rank = -(-n // world)
    start = min(n, mesh.get_local_rank() * per_rank)
    return start, min(per_rank, n - start)


def _write(param: torch.Tensor, full_or_rows: torch.Tensor) -> None:
    local = param.to_local() if hasattr(param, "to_local") else param
    local.copy_(full_or_rows.to(local.dtype))


def _rotary_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute the RoPE frequencies (non-persistent buffers: to_empty leaves them garbage)."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            fresh = type(module)(config=module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, *, seed: int, init_dir: Path | None = None) -> None:
    """Give a meta-device model (sharded by FSDP2 or whole) real storage on `device` and its initial
    weights: seeded random ones, or `init_dir`'s safetensors, each rank reading only its rows."""
    tied = _tied(model)
    model.to_empty(device=device)
    for first, others in tied:  # to_empty gives each module its own new tensor: tie them again
        shared = getattr(*first)
        for module, attr in others:
            if getattr(module, attr) is not shared:
                setattr(module, attr, shared)
    _rotary_buffers(model, device)
    std = getattr(model.config, "initializer_range", 0.02)
    reader = SafetensorsRows(init_dir) if init_dir is not None else None
    for name, (module, attr) in _owners(model).items():
        param = getattr(module, attr)
        rows = _local_rows(param)
        if reader is not None:
            _write(param, reader.rows(name, rows))
            continue
        full = initial_value(name, module, attr, param.shape, seed=seed, std=std)
        _write(param, full if rows is None else full.narrow(0, rows[0], rows[1]))
        del full  # one full parameter at a time


class SafetensorsRows:
    """Rows of the tensors of an export (model.safetensors, or shards with an index), read lazily."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            from safetensors import safe_open

            single = folder / "model.safetensors"
            if not single.is_file():
                raise ValueError(f"model.init: {folder} has no model.safetensors; export it with midfill")
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def rows(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise ValueError(f"model.init: the export has no tensor {name!r}; it is not this architecture")
        with safe_open(self.files[name], framework="pt") as f:
            part = f.get_slice(name)
            return part[:] if rows is None else part[rows[0] : rows[0] + rows[1]]

    def shape(self, name: str) -> list[int]:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return list(f.get_slice(name).get_shape())


def host_rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
