"""Detokenization per decode step: re-decoding each row's whole output (the engine before
serving.detokenize) vs its incremental decoding, side by side in one run.

The debug BPE tokenizer of serve_throughput (vocab 8192 trained on stdlib sources). 32 rows, as a
decode step at batch 32: each row's completion is N real tokens from the middle of a different
stdlib file, fed one token at a time; the cost is the mean over the completion's N steps, summed
over the rows. Both ways at every length run in each of `--repeats` rounds and keep their fastest
(this VM's speed drifts). One run; JSON to bench/results/detokenize.json:

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/detokenize.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from serve_common import corpus
from serving_exports import build_export  # put on sys.path by serve_common
from transformers import AutoTokenizer

from serving.detokenize import IncrementalDetokenizer

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (16, 32, 128, 512)  # 16: the editor completions of prefix_reuse


def completions(tokenizer, texts: list[str], rows: int, n: int) -> list[list[int]]:
    """Per row, n token ids from the middle of a stdlib file."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= 2 * n:
            out.append(ids[len(ids) // 2 :][:n])
        if len(out) == rows:
            return out
    raise RuntimeError(f"not enough files with {2 * n} tokens")


def full_redecode(tokenizer, rows: list[list[int]]) -> list[str]:
    """The engine before: every step decodes each row's whole output so far."""
    outs: list[list[int]] = [[] for _ in rows]
    texts = [""] * len(rows)
    for step in range(len(rows[0])):
        for r, ids in enumerate(rows):
            outs[r].append(ids[step])
            texts[r] = tokenizer.decode(outs[r], skip_special_tokens=False)
    return texts


def incremental(tokenizer, rows: list[list[int]]) -> list[str]:
    detoks = [IncrementalDetokenizer(tokenizer) for _ in rows]
    texts = [""] * len(rows)
    for step in range(len(rows[0])):
        for r, ids in enumerate(rows):
            texts[r] = detoks[r].add(ids[step])
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "detokenize.json")
    opts = ap.parse_args()

    # Only the tokenizer is used; a 1-layer model keeps the export quick to build.
    export = build_export(Path(tempfile.mkdtemp(prefix="mfbench")) / "debug", layers=1, vocab_size=8192, texts=corpus())
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    ways = {"full_redecode": full_redecode, "incremental": incremental}
    work = {n: completions(tokenizer, corpus(), opts.rows, n) for n in LENGTHS}
    best = {(n, name): float("inf") for n in LENGTHS for name in ways}
    for _ in range(opts.repeats):  # rounds over every length and way, so a slow minute hits all of them
        for n, rows in work.items():
            for name, way in ways.items():
                t0 = time.perf_counter()
                texts = way(tokenizer, rows)
                best[n, name] = min(best[n, name], (time.perf_counter() - t0) / n)
                assert texts == [tokenizer.decode(ids) for ids in rows]
    results: dict[str, dict] = {}
    print(
        f"{'tokens':>6} {'full re-decode':>15} {'incremental':>12} {'speedup':>8}   (us per decode step, "
        f"{opts.rows} rows)"
    )
    for n in LENGTHS:
        res = {f"{name}_us_per_step": round(best[n, name] * 1e6, 1) for name in ways}
        res["speedup"] = round(best[n, "full_redecode"] / best[n, "incremental"], 1)
        results[str(n)] = res
        print(
            f"{n:>6} {res['full_redecode_us_per_step']:>15} {res['incremental_us_per_step']:>12} {res['speedup']:>7}x"
        )

    out = {
        "tokenizer": {
            "kind": "byte-level BPE",
            "vocab": tokenizer.vocab_size,
            "trained_on": "stdlib sources (serve_common.corpus)",
        },
        "rows": opts.rows,
        "repeats_best_of": opts.repeats,
        "cost": "mean per decode step over an N-token completion, summed over the rows",
        "completion_tokens": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
