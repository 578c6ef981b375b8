"""Run under torchrun (gloo, CPU) by test_weights.py: today's path (whole model, DDP) against FSDP2
with meta-device initialisation, from the same seed, on the same batches; writes what it saw as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_meta_worker.py OUT STEPS
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from midfill.api.trainingrun import Architecture, ModelSpec, TrainingSpec
from trainer import loop, parallel, weights
from trainer.model import build_model
from trainer.objectives import Packed
from trainer.recipes import get_recipe

SEED, VOCAB, SEQ, MICRO = 7, 512, 64, 2
GEOMETRY = Architecture(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96)


class Sequences:
    """The data: random token rows cut into 1-3 documents, the same stream for every model on a rank."""

    def __init__(self, rank: int) -> None:
        self.g = torch.Generator().manual_seed(1000 + rank)

    def next(self) -> Packed:
        ids = torch.randint(2, VOCAB, (SEQ,), generator=self.g).tolist()
        cut = int(torch.randint(8, SEQ - 8, (1,), generator=self.g))
        return Packed(ids=ids, segments=[1] * cut + [2] * (SEQ - cut))


def build(d: parallel.Dist, *, strategy: str, init_dir: Path | None = None) -> torch.nn.Module:
    model, _ = build_model(
        ModelSpec(),
        get_recipe("debug").with_overrides(GEOMETRY),
        init_dir=init_dir,
        vocab_size=VOCAB,
        eos_id=0,
        pad_id=1,
        seed=SEED,
        bf16=False,
        on_meta=strategy == "fsdp",
    )
    model = parallel.wrap(model, strategy=strategy, d=d, mixed_bf16=False)
    if strategy == "fsdp":
        weights.materialize(model, d.device, seed=SEED, init_dir=init_dir)
    return model


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference between two full state dicts (b is empty on ranks other than 0: the gather
    with cpu_offload hands the full weights to rank 0 only)."""
    if not b:
        return float("nan")
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def train(model: torch.nn.Module, d: parallel.Dist, steps: int) -> list[float]:
    spec = TrainingSpec(
        seq_length=SEQ,
        global_batch_tokens=SEQ * MICRO * d.world_size * 2,
        micro_batch_size=MICRO,
        steps=steps,
        learning_rate=3e-3,
        warmup_steps=1,
        log_interval_steps=1,
        compile=False,
    )
    optimizer = loop.make_optimizer(model, spec, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    losses: list[float] = []
    loop.train(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        packer=Sequences(d.rank),  # type: ignore[arg-type]
        spec=spec,
        state=loop.LoopState(),
        total_steps=steps,
        accum=2,
        pad_id=1,
        document_mask=True,
        bf16=False,
        d=d,
        hooks=loop.LoopHooks(
            on_log=lambda s, m: losses.append(m["loss"]), on_eval=lambda s: None, on_checkpoint=lambda s: None
        ),
        checkpoint_interval=10**6,
    )
    return losses


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    d = parallel.setup()
    today = build(d, strategy="ddp")
    meta = build(d, strategy="fsdp")
    report: dict = {"world_size": d.world_size}
    report["initial_max_difference"] = max_difference(parallel.unwrap(today).state_dict(), full_weights(meta))
    # model.init read shard by shard: today's weights exported, then loaded into a meta model
    folder = Path(tempfile.gettempdir()) / f"fsdp-meta-init-{out.stem}"
    if d.is_main:
        parallel.unwrap(today).save_pretrained(folder)
    d.barrier()
    loaded = build(d, strategy="fsdp", init_dir=folder)
    report["init_max_difference"] = max_difference(parallel.unwrap(today).state_dict(), full_weights(loaded))
    del loaded
    report["losses_today"] = train(today, d, steps)
    report["losses_meta_fsdp"] = train(meta, d, steps)
    report["final_max_difference"] = max_difference(parallel.unwrap(today).state_dict(), full_weights(meta))
    if d.is_main:
        out.write_text(json.dumps(report, indent=2))
    dist.barrier()
    parallel.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
