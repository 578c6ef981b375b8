"""Train a TrainingRun's recipe in this process for a time budget and score it with `line-em`:
what the prepared GPU check runs for the `125m` variant of the debug recipe (no MLflow, registry or
torchrun there, so the trainer's own pieces are driven directly: the trained tokenizer, packing,
`trainer.loop.train`; the scoring is midfill.evaluation's `line-em`, greedy, on the run's held-out
files, through its ModelInfiller, the in-memory half of what `midfill eval` uses).

    python bench/infill_recipe.py --run manifests/samples/trainingrun-125m-gpu.yaml --device cuda \\
        --max-seconds 300 --out bench/results/gpu/infill_recipe_125m.json
    python bench/infill_recipe.py --run ... --device cpu --dry-run     # tiny: checks the script itself

Training runs under the trainer's time budget (trainer.loop.TimeBudget: --max-seconds, else the
spec's training.timeBudgetMinutes): the step count, at most spec.training.steps, is fitted to the
budget and the learning rate schedule with it; the JSON has the planned and the fitted count.
--dry-run swaps in the debug geometry, 2 steps of 2 x 128 tokens, a 512-token vocabulary and 2 tasks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from midfill import fim
from midfill.api import TrainingRun
from midfill.evaluation.infill import ModelInfiller
from midfill.evaluation.runner import run_infill_suite
from trainer import loop
from trainer import tokenizer as toklib
from trainer.data import Corpus, DocumentStream, read_text
from trainer.model import build_model, num_params
from trainer.objectives import Packer
from trainer.parallel import Dist
from trainer.recipes import get_recipe

DRY_RUN = {
    "model": {"recipe": "debug", "attention": "auto"},
    "tokenizer": {"vocabSize": 512, "trainBytes": 2_000_000},
    "training": {"seqLength": 128, "globalBatchTokens": 256, "microBatchSize": 2, "steps": 2, "warmupSteps": 1},
}


def load_run(path: Path, *, dry_run: bool, steps: int | None) -> TrainingRun:
    doc = yaml.safe_load(path.read_text())
    if dry_run:
        for section, values in DRY_RUN.items():
            doc["spec"][section] = {**doc["spec"].get(section, {}), **values}
    if steps:
        doc["spec"]["training"]["steps"] = steps
    return TrainingRun.model_validate(doc)


def train_tokenizer(run: TrainingRun, corpus: Corpus):
    """(BPE, its Hugging Face tokenizer) trained on the run's training files, as the trainer's rank 0 does."""
    spec = run.spec.tokenizer
    texts = (text for files in corpus.train for f in files if (text := read_text(f)))
    bpe = toklib.train_bpe(
        toklib.take_bytes(texts, spec.train_bytes), vocab_size=spec.vocab_size, num_mask_tokens=spec.num_mask_tokens
    )
    return bpe, toklib.to_hf(bpe, num_mask_tokens=spec.num_mask_tokens)


def train(run: TrainingRun, device: torch.device, *, max_seconds: float) -> dict:
    spec, t = run.spec, run.spec.training
    started = time.monotonic()
    corpus = Corpus.from_spec(spec.data)
    bpe, tok = train_tokenizer(run, corpus)
    bf16 = loop.use_bf16(t.precision, device)
    recipe = get_recipe(spec.model.recipe).with_overrides(spec.model.architecture)
    model, attn = build_model(
        spec.model,
        recipe,
        init_dir=None,
        vocab_size=len(tok),
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        seed=t.seed,
        bf16=bf16,
    )
    model.to(device)
    optimizer = loop.make_optimizer(model, t, device)
    state = loop.LoopState()
    scheduler = loop.make_scheduler(optimizer, t, total_steps=t.steps, state=state)
    stream = DocumentStream(corpus.train, corpus.weights, seed=t.seed, rank=0, world_size=1)
    packer = Packer(
        stream,
        bpe,
        spec.objective,
        seq_length=t.seq_length,
        num_mask_tokens=spec.tokenizer.num_mask_tokens,
        seed=t.seed,
    )
    logs: list[dict] = []
    train_started = time.monotonic()

    def on_log(step: int, metrics: dict[str, float]) -> None:
        logs.append({"step": step, **metrics})
        total = state.total_steps or t.steps
        print(f"step {step}/{total} loss {metrics['loss']:.3f} tok/s {metrics['tokens_per_second']:.0f}", flush=True)

    loop.train(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        packer=packer,
        spec=t,
        state=state,
        total_steps=t.steps,
        accum=t.global_batch_tokens // (t.seq_length * t.micro_batch_size),
        pad_id=tok.pad_token_id,
        document_mask=spec.objective.document_mask,
        bf16=bf16,
        d=Dist(device=device),
        hooks=loop.LoopHooks(on_log=on_log, on_eval=lambda s: None, on_checkpoint=lambda s: None),
        flat=loop.is_flash(attn),
        checkpoint_interval=10**9,
        time_budget_s=max_seconds,
    )
    return {
        "model": model,
        "tok": tok,
        "bf16": bf16,
        "corpus": corpus,
        "report": {
            "recipe": spec.model.recipe,
            "params": num_params(model),
            "attention": attn,
            "bf16": bf16,
            "steps_done": logs[-1]["step"] if logs else 0,
            "steps_planned": t.steps,
            "steps_fitted_to_budget": state.total_steps,
            "tokens": (logs[-1]["step"] if logs else 0) * t.global_batch_tokens,
            "train_seconds": round(time.monotonic() - train_started, 1),
            "tokenizer_and_setup_seconds": round(train_started - started, 1),
            "last_log": logs[-1] if logs else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("manifests/samples/trainingrun-125m-gpu.yaml"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--max-seconds", type=float, help="training time budget (seconds); default the spec's timeBudgetMinutes"
    )
    parser.add_argument("--steps", type=int, help="override spec.training.steps")
    parser.add_argument("--tasks", type=int, default=200, help="line-em tasks (held-out stdlib function bodies)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps, 2 tasks (checks the script)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/infill_recipe.json"))
    args = parser.parse_args()
    run = load_run(args.run, dry_run=args.dry_run, steps=args.steps)
    device = torch.device(args.device)
    budget_minutes = run.spec.training.time_budget_minutes
    max_seconds = args.max_seconds or (budget_minutes * 60 if budget_minutes else None)
    if max_seconds is None:
        parser.error("--max-seconds: no time budget; pass one or set the run's spec.training.timeBudgetMinutes")
    trained = train(run, device, max_seconds=max_seconds)
    held_out = [Path(f.url) for f in trained["corpus"].validation if f.kind == "code"]
    infiller = ModelInfiller(
        trained["model"],
        trained["tok"],
        fim_format=fim.CODEGEN2,
        max_context=run.spec.training.seq_length,
        stop_tokens=list(fim.CODEGEN2.stop_tokens),
        batch_size=16,
        device=str(device),
        bf16=trained["bf16"],
    )
    tasks = 2 if args.dry_run else args.tasks
    started = time.monotonic()
    result = run_infill_suite("line-em", infiller, limit=tasks, files=held_out, max_new_tokens=args.max_new_tokens)
    report = {
        "benchmark": "infill_recipe",
        "run": str(args.run),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dry_run": args.dry_run,
        **trained["report"],
        "eval_seconds": round(time.monotonic() - started, 1),
        "line_em": result.metrics,
        "samples": [{"task": t.task_id, "completion": t.completion, "end": t.end} for t in result.tasks[:10]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1, default=str))


if __name__ == "__main__":
    main()
