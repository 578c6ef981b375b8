"""Process groups and model wrapping: DDP replicates, FSDP2 (`fully_shard`) shards large models.

Kept apart from model.py so the model reads like the paper and parallelism is one swap.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup() -> Dist:
    """Join the torchrun job (nccl on GPUs, gloo on CPUs); a plain `python -m trainer` is world 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30))
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, *, strategy: str, d: Dist, mixed_bf16: bool) -> torch.nn.Module:
    """Move to the device and wrap for the strategy (no wrapper in a single process). A model on the
    meta device (FSDP2's path, trainer.weights) stays there: trainer.weights.materialize gives it
    storage, shard by shard, after this."""
    if not any(p.is_meta for p in model.parameters()):
        model.to(d.device)
    if not d.enabled or d.world_size == 1:
        return model
    if strategy == "fsdp":
        return shard(model, mixed_bf16=mixed_bf16)
    ids = [d.local_rank] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


# What a selectively checkpointed block keeps from its forward: the matmul outputs (and attention's),
# the expensive products; norms, activations, RoPE and elementwise ops are recomputed in the backward.
_SAVED_IN_SELECTIVE = (
    "mm",
    "addmm",
    "bmm",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
)


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    name = getattr(getattr(op, "_overloadpacket", op), "__name__", "")
    return CheckpointPolicy.MUST_SAVE if name in _SAVED_IN_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_activations(model: torch.nn.Module, mode: str) -> None:
    """training.activationCheckpointing on a transformers decoder, before wrapping (so FSDP2 units
    enclose checkpointed blocks): none, full (each block recomputed from its input), or selective
    (each block keeps its matmul outputs and recomputes the rest, `_SAVED_IN_SELECTIVE`)."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"training.activationCheckpointing: {mode!r} is not one of none, full, selective")
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before activation_checkpointing_enable (a GPU image's own copy)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard(model: torch.nn.Module, *, mixed_bf16: bool) -> torch.nn.Module:
    """FSDP2 over the process group: one unit per decoder block, then the rest."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_bf16
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside torch.compile and DDP wrappers (FSDP2 keeps the module itself)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum floats over ranks."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
