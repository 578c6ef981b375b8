"""Training throughput: our loop (trainer.loop.train) vs a plain transformers `Trainer`, same model,
data and sequence length, in one process; plus packing efficiency.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/train_throughput.py [--steps 12] [--no-compile]

Model: the `debug` recipe (5.3M params, vocab 8192 BPE trained on the stdlib). Data: stdlib sources,
CodeGen2 50/50 causal/span mixture packed to 512 tokens, 8 sequences per step (4096 tokens).
The baseline trains on the same packed sequences, pre-built (so it does no tokenisation or packing
while timed; ours packs on the fly). Each variant runs `--steps` warm-up steps, then `--steps`
timed steps. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from midfill.api.trainingrun import DataSpec, ModelSpec, ObjectiveSpec, TrainingSpec
from trainer import loop
from trainer import tokenizer as toklib
from trainer.data import Corpus, DocumentStream, read_text
from trainer.model import build_model
from trainer.objectives import Packer
from trainer.parallel import Dist
from trainer.recipes import get_recipe

SEQ, MICRO, SEED = 512, 8, 1234
OUT = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def setup():
    corpus = Corpus.from_spec(DataSpec.model_validate({"sources": [{"uri": "stdlib://", "include": ["*.py"]}]}))
    texts = (t for f in corpus.train[0] if (t := read_text(f)))
    bpe = toklib.train_bpe(toklib.take_bytes(texts, 32_000_000), vocab_size=8192, num_mask_tokens=8)
    objective = ObjectiveSpec.model_validate(
        {"causalLM": {"weight": 0.5}, "spanCorruption": {"weight": 0.5, "maxSpans": 3, "singleLineProbability": 0.5}}
    )
    return corpus, bpe, objective


def packer(corpus, bpe, objective, *, epochs=None, files=None):
    stream = DocumentStream([files or corpus.train[0]], [1.0], seed=SEED, rank=0, world_size=1, epochs=epochs)
    return Packer(stream, bpe, objective, seq_length=SEQ, num_mask_tokens=8, seed=SEED)


def fresh_model(bpe):
    model, _ = build_model(
        ModelSpec(), get_recipe("debug"), init_dir=None, vocab_size=bpe.get_vocab_size(), eos_id=0, pad_id=1, seed=SEED
    )
    return model


def ours(corpus, bpe, objective, *, steps: int, compile_model: bool, micro: int | None = None) -> dict:
    micro = micro or MICRO
    model = fresh_model(bpe)
    spec = TrainingSpec(
        seq_length=SEQ,
        global_batch_tokens=SEQ * micro,
        micro_batch_size=micro,
        steps=2 * steps,
        learning_rate=1e-3,
        warmup_steps=2,
        log_interval_steps=steps,
        eval_interval_steps=10**6,
        compile=compile_model,
    )
    if compile_model:
        model = torch.compile(model)
    opt = loop.make_optimizer(model, spec, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: loop.lr_factor(s, warmup=2, total=2 * steps, schedule="cosine", floor=0.1)
    )
    logs: list[dict] = []
    t0 = time.perf_counter()
    loop.train(
        model=model,
        optimizer=opt,
        scheduler=sched,
        packer=packer(corpus, bpe, objective),
        spec=spec,
        state=loop.LoopState(),
        total_steps=2 * steps,
        accum=1,
        pad_id=1,
        document_mask=False,
        bf16=loop.use_bf16("auto", torch.device("cpu")),
        d=Dist(),
        hooks=loop.LoopHooks(on_log=lambda s, m: logs.append(m), on_eval=lambda s: None, on_checkpoint=lambda s: None),
        checkpoint_interval=10**6,
        compiled=compile_model,
    )
    return {
        "tokens_per_second": logs[-1]["tokens_per_second"],
        "final_loss": logs[-1]["loss"],
        "wall_s": time.perf_counter() - t0,
        "compile": compile_model,
        "micro_batch": micro,
    }


def hf_trainer(corpus, bpe, objective, *, steps: int) -> dict:
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    p = packer(corpus, bpe, objective)
    seqs = [p.next() for _ in range(2 * steps * MICRO)]

    class Packed(torch.utils.data.Dataset):
        def __len__(self):
            return len(seqs)

        def __getitem__(self, i):
            ids = torch.tensor(seqs[i].ids)
            labels = ids.masked_fill(torch.tensor(seqs[i].segments) == 0, -100)
            return {"input_ids": ids, "labels": labels}

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=MICRO,
            max_steps=2 * steps,
            learning_rate=1e-3,
            warmup_steps=2,
            lr_scheduler_type="cosine",
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            bf16=True,
            use_cpu=True,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            seed=SEED,
            disable_tqdm=True,
        )
        t0 = time.perf_counter()
        trainer = Trainer(model=fresh_model(bpe), args=args, train_dataset=Packed(), callbacks=[Clock()])
        result = trainer.train()
    elapsed = marks[2 * steps] - marks[steps]
    return {
        "tokens_per_second": steps * MICRO * SEQ / elapsed,
        "final_loss": result.training_loss,
        "wall_s": time.perf_counter() - t0,
    }


def packing(corpus, bpe, objective) -> dict:
    """Share of non-pad tokens: our endless training stream, one finite pass over the held-out files,
    and for reference one-document-per-sequence padding (what unpacked training would do)."""
    stream = packer(corpus, bpe, objective)
    seqs = [stream.next() for _ in range(400)]
    endless = sum(sum(1 for s in q.segments if s) for q in seqs) / (len(seqs) * SEQ)
    val = packer(corpus, bpe, objective, epochs=1, files=corpus.validation)
    vals = list(iter(val.next, None))
    finite = sum(sum(1 for s in q.segments if s) for q in vals) / (len(vals) * SEQ) if vals else None
    real = unpadded = 0
    for f in corpus.validation:
        n = len(bpe.encode(read_text(f) or "").ids) + 1
        real += n
        unpadded += -(-n // SEQ) * SEQ
    return {
        "endless_stream": endless,
        "one_pass_validation": finite,
        "unpacked_reference": real / unpadded if unpadded else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    corpus, bpe, objective = setup()
    results = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "seq_length": SEQ,
        "micro_batch": MICRO,
        "steps_timed": args.steps,
        "bf16_autocast": loop.use_bf16("auto", torch.device("cpu")),
        "torch": torch.__version__,
    }
    results["baseline_hf_trainer"] = hf_trainer(corpus, bpe, objective, steps=args.steps)
    print("baseline", results["baseline_hf_trainer"], flush=True)
    results["ours_eager"] = ours(corpus, bpe, objective, steps=args.steps, compile_model=False)
    print("ours eager", results["ours_eager"], flush=True)
    if not args.no_compile:
        results["ours_compiled"] = ours(corpus, bpe, objective, steps=args.steps, compile_model=True)
        print("ours compiled", results["ours_compiled"], flush=True)
    base = results["baseline_hf_trainer"]["tokens_per_second"]
    results["speedup"] = {
        k: results[k]["tokens_per_second"] / base for k in ("ours_eager", "ours_compiled") if k in results
    }
    results["packing_efficiency"] = packing(corpus, bpe, objective)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"speedup": results["speedup"], "packing": results["packing_efficiency"]}, indent=2))


if __name__ == "__main__":
    main()
