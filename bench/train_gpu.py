"""Training throughput as a job runs it (trainer.loop.train), for the prepared GPU check (bench/gpu/run.sh):
tokens/s, tokens/s per device, MFU, peak GPU memory and host memory per rank.

    python bench/train_gpu.py --recipe 1b --out R.json                     # default settings (compile auto)
    python bench/train_gpu.py --recipe 1b --document-mask --out R.json     # packed documents (flex on CUDA)
    torchrun --nproc-per-node 1 bench/train_gpu.py --recipe 7b --layers 4 --fsdp --out R.json

The model is built as trainer.job builds it (build_model, trainer.weights, parallel.checkpoint_activations,
torch.compile per training.compile); --fsdp builds it on the meta device and shards it with FSDP2 even in
one process (parallel.shard), recording host memory before loading (the model on meta), after
materialising the shards, and at peak. The data is random token rows cut into documents of random
length (the packer is not what is measured: it makes ~218k tokens/s on one core, issue 19). The first
step (compilation) is left out; `--steps` steps are timed after `--warmup` more.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from midfill import memory
from midfill.api.trainingrun import Architecture, ModelSpec, TrainingSpec
from trainer import flops, loop, parallel, weights
from trainer.model import build_model, is_on_meta, num_params
from trainer.objectives import Packed
from trainer.recipes import get_recipe

VOCAB = 32000


class RandomDocuments:
    """Rows of random tokens, each cut into 1-4 documents (what documentMask then masks apart)."""

    def __init__(self, seq: int, rank: int) -> None:
        self.seq, self.g = seq, torch.Generator().manual_seed(100 + rank)

    def next(self) -> Packed:
        ids = torch.randint(3, VOCAB, (self.seq,), generator=self.g).tolist()
        cuts = sorted(torch.randint(1, self.seq, (int(torch.randint(0, 4, (1,), generator=self.g)),), generator=self.g))
        segments, piece, bounds = [], 1, [int(c) for c in cuts] + [self.seq]
        start = 0
        for end in bounds:
            segments += [piece] * (end - start)
            piece, start = piece + 1, end
        return Packed(ids=ids, segments=segments[: self.seq])


def peak_host_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def memory_estimate_gb(recipe, args: argparse.Namespace, world_size: int, *, bf16: bool, cuda: bool) -> float:
    """What `midfill validate` would predict for this run (midfill.memory), beside the measured peak."""
    layout = memory.Layout(
        vocab_size=VOCAB, fsdp=args.fsdp, world_size=world_size, nproc_per_node=world_size,
        tokens_per_micro_batch=args.seq * args.micro, activation_checkpointing=args.activation_checkpointing,
        fp32=not bf16, on_gpu=cuda,
    )  # fmt: skip
    return memory.estimate_for(recipe, layout).per_gpu / 1e9


def run(args: argparse.Namespace) -> dict:
    d = parallel.setup()
    spec = TrainingSpec(
        seq_length=args.seq,
        global_batch_tokens=args.seq * args.micro * d.world_size,
        micro_batch_size=args.micro,
        steps=1 + args.warmup + args.steps,
        warmup_steps=1,
        log_interval_steps=1,
        compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
    )
    bf16 = loop.use_bf16("auto", d.device)
    recipe = get_recipe(args.recipe).with_overrides(
        Architecture(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.heads)
        if args.hidden
        else Architecture(num_layers=args.layers)
    )
    host = {"before_build_gb": weights.host_rss_bytes() / 1e9}
    model, attn = build_model(
        ModelSpec(), recipe, init_dir=None, vocab_size=VOCAB, eos_id=0, pad_id=1, seed=1, bf16=bf16,
        on_meta=args.fsdp, document_mask=args.document_mask,
    )  # fmt: skip
    parallel.checkpoint_activations(model, spec.activation_checkpointing)
    host["before_loading_gb"] = weights.host_rss_bytes() / 1e9  # on meta with --fsdp: no weights yet
    per_token = flops.flops_per_token(model, seq_length=args.seq)
    if args.fsdp:
        parallel.shard(model, mixed_bf16=bf16 and d.device.type == "cuda")
        weights.materialize(model, d.device, seed=1)
    else:
        model = parallel.wrap(model, strategy="ddp", d=d, mixed_bf16=False)
    assert not is_on_meta(model)
    host["after_materialising_gb"] = weights.host_rss_bytes() / 1e9
    compiled = spec.compile_on(d.device.type)
    if compiled:
        model = torch.compile(model)
    optimizer = loop.make_optimizer(model, spec, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    logs: list[dict] = []
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loop.train(
        model=model, optimizer=optimizer, scheduler=scheduler, packer=RandomDocuments(args.seq, d.rank),  # type: ignore[arg-type]
        spec=spec, state=loop.LoopState(), total_steps=spec.total_steps(), accum=1, pad_id=1,
        document_mask=args.document_mask, bf16=bf16, d=d, flat=loop.is_flash(attn), block_mask=loop.is_flex(attn),
        hooks=loop.LoopHooks(on_log=lambda s, m: logs.append(m), on_eval=lambda s: None, on_checkpoint=lambda s: None),
        checkpoint_interval=10**9, compiled=compiled,
        flops_per_token=per_token, peak_tflops=flops.peak_tflops(d.device, bf16=bf16, override=args.peak_tflops),
    )  # fmt: skip
    timed = logs[1 + args.warmup :]
    tps = sum(m["tokens_per_second"] for m in timed) / len(timed)
    result = {
        "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "recipe": recipe.name,
        "layers": recipe.num_layers,
        "params": num_params(parallel.unwrap(model)),
        "seq_length": args.seq,
        "micro_batch": args.micro,
        "world_size": d.world_size,
        "attention": attn,
        "bf16": bf16,
        "compiled": compiled,
        "document_mask": args.document_mask,
        "fsdp_meta_init": args.fsdp,
        "activation_checkpointing": args.activation_checkpointing,
        "flops_per_token": per_token,
        "tokens_per_second": tps,
        "tokens_per_second_per_device": tps / d.world_size,
        "mfu": flops.mfu(
            tps / d.world_size, per_token, flops.peak_tflops(d.device, bf16=bf16, override=args.peak_tflops)
        ),
        "final_loss": logs[-1]["loss"],
        "wall_s": time.perf_counter() - start,
        "host_memory_per_rank": {**host, "peak_gb": peak_host_gb()},
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(d.device) / 1e9 if d.device.type == "cuda" else None,
        "estimated_gpu_memory_gb": memory_estimate_gb(
            recipe, args, d.world_size, bf16=bf16, cuda=d.device.type == "cuda"
        ),
    }
    parallel.teardown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="1b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the recipe's (e.g. 7b with 4)")
    parser.add_argument("--hidden", type=int, default=None, help="a smaller width (CPU dry runs)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--document-mask", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="meta-device init + FSDP2, as strategy: fsdp")
    parser.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
