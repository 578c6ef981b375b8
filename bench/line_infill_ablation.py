"""Ablation: why the debug recipe answered single-line infills with whitespace, one lever per row.

Each row trains the `debug` sample (manifests/samples/trainingrun-debug.yaml) with one more change
than the row before, same data, seed and held-out files, then scores the export with `line-em`
(midfill.evaluation: single-line holes inside function bodies of held-out stdlib files, the prefix
ending in the line's indentation, greedy, stop string "\\n"): the model's own stop rate, cut by the
stop string, ran to max tokens, whitespace-only, first-line exact match.

Row `baseline` runs the trainer of another git ref (default `main`, extracted with `git archive`)
so "before" is measured, not remembered; `--tokenizer-from ROW` rows reuse that row's trained
tokenizer (to separate the span cut from the tokenizer). One row per call, results accumulate:

    .venv/bin/python bench/line_infill_ablation.py --row baseline --steps 120
    .venv/bin/python bench/line_infill_ablation.py --boundary     # needs rows baseline and indent-token
    .venv/bin/python bench/line_infill_ablation.py --table
    .venv/bin/python bench/line_infill_ablation.py --score .midfill/runs/fim-debug/export   # make demo's model

--boundary measures the cause without a model: the token each line-em prompt ends with (the line's
indentation), and how often that token is followed by code in the training text (every 10th
training file, plain text), for the baseline row's tokenizer and the indent-token row's.

Writes bench/results/line_infill_ablation.json (wall time and the machine's load average per row:
the 2 cores are shared, so read tokens/s, not wall time, across rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "manifests/samples/trainingrun-debug.yaml"
RESULTS = ROOT / "bench/results/line_infill_ablation.json"

# The recipe levers before this change (the sample as it was), so every row states its full spec.
BEFORE = {
    "tokenizer": {"vocabSize": 8192},
    "objective": {
        "causalLM": {"weight": 0.5},
        "spanCorruption": {"weight": 0.5, "maxSpans": 3, "singleLineProbability": 0.5},
    },
    "training": {"learningRate": 0.001, "globalBatchTokens": 4096, "microBatchSize": 8, "seqLength": 512},
}

# name -> (what changes, code to train with, spec overrides on top of BEFORE, tokenizer from row)
ROWS: dict[str, tuple[str, str, dict[str, Any], str | None]] = {
    "baseline": ("main's trainer and recipe", "ref", {}, None),
    "span-cut": ("single-line spans cut after the indentation, without the newline", "tree", {}, "baseline"),
    "indent-token": ("+ indentation as its own pre-token (tokenizer retrained)", "tree", {}, None),
    "single-line-0.8": (
        "+ singleLineProbability 0.8",
        "tree",
        {"objective": {"spanCorruption": {"singleLineProbability": 0.8}}},
        None,
    ),
    "sample": ("the sample as committed (manifests/samples/trainingrun-debug.yaml)", "tree", {"sample": True}, None),
    "fim-heavy": (
        "the sample with 80% of pieces span-corrupted (causalLM 0.2): more <eom> decisions per step",
        "tree",
        {"sample": True, "objective": {"causalLM": {"weight": 0.2}, "spanCorruption": {"weight": 0.8}}},
        None,
    ),
    "lr-3e-3": (
        "the sample with learningRate 0.003 (3x): a 5M-parameter model takes a larger step",
        "tree",
        {"sample": True, "training": {"learningRate": 0.003}},
        None,
    ),
    "vocab-2048": (
        "the sample with vocabSize 2048: half the parameters were embeddings; each token seen 4x as often",
        "tree",
        {"sample": True, "tokenizer": {"vocabSize": 2048}},
        None,
    ),
    "many-holes": (
        "compiled, 80% span-corrupted, every span one line (singleLineProbability 1.0), up to 8 per piece",
        "tree",
        {
            "sample": True,
            "training": {"compile": True},
            "objective": {
                "causalLM": {"weight": 0.2},
                "spanCorruption": {"weight": 0.8, "maxSpans": 8, "singleLineProbability": 1.0},
            },
        },
        None,
    ),
    "full-budget": (
        "many-holes for the issue's whole budget: 1,900 steps (~7.8M tokens) in <= 10 minutes on 2 cores",
        "tree",
        {
            "sample": True,
            "training": {"compile": True, "steps": 1900, "warmupSteps": 100},
            "objective": {
                "causalLM": {"weight": 0.2},
                "spanCorruption": {"weight": 0.8, "maxSpans": 8, "singleLineProbability": 1.0},
            },
        },
        None,
    ),
    "sample-10min": (
        "the sample as committed: full-budget's recipe, one-line spans on code lines only (no comment or "
        "docstring lines), timeBudgetMinutes 10",
        "tree",
        {"sample": True},
        None,
    ),
    "batch-2048": (
        "sample-10min with half the tokens per step (globalBatchTokens 2048): twice the updates in the budget",
        "tree",
        {"sample": True, "training": {"globalBatchTokens": 2048, "microBatchSize": 4, "steps": 3800}},
        None,
    ),
    "batch-2048-16-holes": (
        "batch-2048 with up to 16 one-line holes per piece (maxSpans 16): more <eom> decisions per token",
        "tree",
        {
            "sample": True,
            "training": {"globalBatchTokens": 2048, "microBatchSize": 4, "steps": 3800},
            "tokenizer": {"numMaskTokens": 16},
            "objective": {"spanCorruption": {"maxSpans": 16}},
        },
        None,
    ),
    "batch-2048-32-holes": (
        "batch-2048 with up to 32 one-line holes per piece (maxSpans 32)",
        "tree",
        {
            "sample": True,
            "training": {"globalBatchTokens": 2048, "microBatchSize": 4, "steps": 3800},
            "tokenizer": {"numMaskTokens": 32},
            "objective": {"spanCorruption": {"maxSpans": 32}},
        },
        None,
    ),
    "no-code-lines": (
        "sample-10min's spec and step count, trained by the trainer before the code-lines change (--ref)",
        "ref",
        {"sample": True},
        None,
    ),
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def spec_for(row: str, *, steps: int | None, state: Path) -> dict[str, Any]:
    _, _, over, tokenizer_from = ROWS[row]
    doc = yaml.safe_load(SAMPLE.read_text())
    spec = doc["spec"]
    if not over.get("sample"):
        spec = merge(spec, merge(BEFORE, over))
        spec["objective"] = merge(BEFORE["objective"], over.get("objective", {}))
    else:  # the committed sample, with this row's changes on top
        spec = merge(spec, {k: v for k, v in over.items() if k != "sample"})
    if steps:  # a fixed step count instead of the spec's length or time budget (comparable across trainers)
        spec["training"]["steps"] = steps
        spec["training"].pop("timeBudgetMinutes", None)
        if "warmupSteps" not in over.get("training", {}) and not over.get("sample"):
            spec["training"]["warmupSteps"] = max(1, steps // 10)
    spec["training"]["evalIntervalSteps"] = spec["training"]["steps"]
    spec["checkpoint"] = {"intervalSteps": spec["training"]["steps"], "keepLast": 1}
    spec["registry"] = {"registeredModelName": f"ablation-{row}"}
    spec.pop("evaluation", None)  # scored below, once, the same way for every row
    if tokenizer_from:
        spec["tokenizer"] = {"path": str(state / "runs" / f"ablation-{tokenizer_from}" / "checkpoints" / "tokenizer")}
    doc["metadata"]["name"] = f"ablation-{row}"
    doc["spec"] = spec
    return doc


def extract(ref: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def train(row: str, doc: dict[str, Any], *, state: Path, ref: str) -> float:
    path = state / f"ablation-{row}.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "MIDFILL_STATE_DIR": str(state), "MIDFILL_PROGRESS_BAR": "false"}
    cwd = ROOT
    if ROWS[row][1] == "ref":
        cwd = extract(ref, state / f"code-{ref}")
        env["PYTHONPATH"] = f"{cwd / 'platform'}:{cwd}"  # that tree's midfill and trainer, this venv
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "trainer", "--run", str(path)], check=True, env=env, cwd=cwd)
    return time.monotonic() - start


def score(export: Path, *, tasks: int, max_new_tokens: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from midfill.evaluation.infill import LocalInfiller
    from midfill.evaluation.runner import run_infill_suite

    result = run_infill_suite("line-em", LocalInfiller(export), limit=tasks, max_new_tokens=max_new_tokens)
    samples = [{"task": t.task_id, "completion": t.completion, "end": t.end} for t in result.tasks[:8]]
    return result.metrics, samples


def load_results() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benchmark": "line_infill_ablation", "rows": {}}


def run_row(args: argparse.Namespace) -> None:
    from midfill.hardware import cpu_has_native_bf16

    state = args.state
    state.mkdir(parents=True, exist_ok=True)
    doc = spec_for(args.row, steps=args.steps, state=state)
    load_before = os.getloadavg()[0]
    seconds = train(args.row, doc, state=state, ref=args.ref)
    load_after = os.getloadavg()[0]
    run_dir = state / "runs" / f"ablation-{args.row}"
    progress = json.loads((run_dir / "progress.json").read_text())  # the last logged step
    metrics, samples = score(run_dir / "export", tasks=args.tasks, max_new_tokens=args.max_new_tokens)
    report = load_results()
    report["rows"][args.row] = {
        "change": ROWS[args.row][0],
        "spec": doc["spec"],
        "steps": doc["spec"]["training"]["steps"],
        "train_wall_seconds": round(seconds, 1),
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
        "last_logged": {k: progress.get(k) for k in ("step", "loss", "tokens_per_second")},
        "line_em": metrics,
        "samples": samples,
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "cpu_native_bf16": cpu_has_native_bf16(),  # bf16 autocast (~5x the fp32 tokens/s on these CPUs)
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["rows"][args.row], indent=1)[:3000])


def boundary(state: Path, *, tasks: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from midfill.api.trainingrun import DataSpec
    from midfill.datasplit import stdlib_root
    from midfill.evaluation.suites import heldout_files, line_em_tasks
    from trainer.data import Corpus

    held_out = line_em_tasks(heldout_files(stdlib_root()), limit=tasks)
    corpus = Corpus.from_spec(DataSpec.model_validate({"sources": [{"uri": "stdlib://", "include": ["*.py"]}]}))
    texts = [Path(f.url).read_text(errors="replace") for f in corpus.train[0][::10]]
    out = {}
    for row in ("baseline", "indent-token"):
        tok = AutoTokenizer.from_pretrained(state / "runs" / f"ablation-{row}" / "checkpoints" / "tokenizer")
        last = {tok(t.prefix[-200:], add_special_tokens=False)["input_ids"][-1] for t in held_out}
        seen = followed_by_code = 0
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for a, b in zip(ids, ids[1:], strict=False):
                if a in last:
                    seen += 1
                    followed_by_code += tok.convert_ids_to_tokens(b)[0] not in "ĠĊĉ"  # byte-level space, \n, \t
        out[row] = {
            "prompts": len(held_out),
            "distinct_last_tokens": len(last),
            "occurrences_in_training_text": seen,
            "followed_by_code": round(followed_by_code / max(seen, 1), 4),
        }
    return out


def table() -> str:
    rows = json.loads(RESULTS.read_text())["rows"]
    out = [
        "| row | change | CPU | steps | train wall (load) | own stop | stop string | max tokens | whitespace | "
        "first-line EM | EM |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [r for r in ROWS if r in rows]:
        r = rows[name]
        m = r["line_em"]
        load = "–".join(f"{x:.1f}" for x in r["load_average_1m"])
        cpu = {True: "bf16", False: "fp32"}.get(r.get("cpu_native_bf16"), "?")
        trained = r["last_logged"]["step"]  # a time budget fits fewer than the spec's steps
        steps = f"{trained} of {r['steps']}" if trained != r["steps"] else str(trained)
        out.append(
            f"| {name} | {r['change']} | {cpu} | {steps} | {r['train_wall_seconds']:.0f} s ({load}) | "
            f"{m['stop_rate']:.0%} | {m['stop_string_rate']:.0%} | {m['length_rate']:.0%} | "
            f"{m['whitespace_rate']:.0%} | {m['first_line_exact_match']:.0%} | {m['exact_match']:.0%} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=list(ROWS))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the stored rows")
    parser.add_argument("--boundary", action="store_true", help="the prompt-boundary statistic (no model)")
    parser.add_argument(
        "--score", type=Path, metavar="EXPORT", help="score an export (e.g. make demo's) as the rows are"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="a fixed spec.training.steps, no time budget (warmup = steps / 10 unless the row or sample sets it)",
    )
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ref", default="main", help="git ref whose trainer the baseline row runs")
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "midfill-line-ablation")
    args = parser.parse_args()
    if args.score:
        metrics, samples = score(args.score, tasks=args.tasks, max_new_tokens=args.max_new_tokens)
        print(json.dumps({"line_em": metrics, "samples": samples}, indent=1))
    if args.row:
        run_row(args)
    if args.boundary:
        report = load_results()
        report["boundary"] = boundary(args.state, tasks=args.tasks)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report["boundary"], indent=1))
    if args.table or not (args.row or args.boundary or args.score):
        print(table())


if __name__ == "__main__":
    main()
