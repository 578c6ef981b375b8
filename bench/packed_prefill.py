"""The static decode path's prefill: packed (serving.packed_prefill) vs left-padded then copied (before).

Before packed prefill, the static path prefilled a group left-padded to its longest prompt
(serving.prefill, as the dynamic path still does) and copied each row's keys/values out of that
temporary cache into the static batch's buffers. This times both ways of getting a group of prompts
of mixed lengths from token ids to rows ready to decode (the forward, the keys/values in the buffers,
the first token sampled), on the same model, the same StaticBatch and the same groups, interleaved
(a round runs both, in alternating order; this VM drifts within minutes). Groups are formed as the
engine admits them (padded tokens <= max_prefill_tokens, 2048), and both ways must pick the same
first tokens. Model: serve_throughput's debug size (random init), midfill_cpu attention, 2 threads.

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/packed_prefill.py   # -> bench/results/packed_prefill.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from serve_throughput import corpus, hardware, on_fresh_thread
from serving_exports import build_export  # put on sys.path by serve_throughput
from transformers import AutoModelForCausalLM, AutoTokenizer

from midfill.hardware import cpu_has_native_bf16
from serving import attention
from serving.packed_prefill import PackedPrefiller
from serving.prefill import Prefiller
from serving.requests import SamplingParams
from serving.static_decode import StaticBatch, sample_first

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 2048  # the engine's max_prefill_tokens: a group's longest prompt x its size
GREEDY = SamplingParams(max_tokens=1)


def mixed_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    """Prompts of 24 to 480 tokens (log-uniform: editors send short and long files), cut from stdlib files."""
    rng = random.Random(seed)
    ids = [t for text in corpus(40) for t in tokenizer.encode(text, add_special_tokens=False)]
    out = []
    for _ in range(n):
        length = int(round(24 * (20 ** rng.random())))
        start = rng.randrange(len(ids) - length)
        out.append(ids[start : start + length])
    return out


def groups_as_admitted(prompts: list[list[int]], rows: int) -> list[list[list[int]]]:
    """The engine's admission rule (Engine._admissions): add prompts while longest x count fits the budget."""
    groups, group = [], []
    for p in prompts:
        if group and (max(map(len, group + [p])) * (len(group) + 1) > BUDGET or len(group) == rows):
            groups.append(group)
            group = []
        group.append(p)
    return [*groups, group]


def left_padded(batch: StaticBatch, prefiller: Prefiller, prompts: list[list[int]]) -> list[int]:
    """What the static path did before: a left-padded forward, then each row copied into the buffers."""
    ((_, done),) = prefiller.run(prompts)
    lengths = [len(p) for p in prompts]
    for j, n in enumerate(lengths):
        row = batch.rows + j
        for layer, source in enumerate(done.cache.layers):
            t = source.keys.shape[2]
            batch.key_buffers[layer][row, :, :n] = source.keys[j, :, t - n :]
            batch.value_buffers[layer][row, :, :n] = source.values[j, :, t - n :]
    params, seeds = [GREEDY] * len(prompts), [0] * len(prompts)
    first = sample_first(done.logits, lengths, params, seeds)
    batch.admit(lengths, first, params, seeds)
    return first


def timed(fn, batch: StaticBatch, groups) -> tuple[float, list[int]]:
    firsts = []
    start = time.perf_counter()
    for group in groups:
        batch.clear()
        firsts += fn(group)
    return time.perf_counter() - start, firsts


def measure(export: Path, dtype: str, prompts: list[list[int]], rounds: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(
        str(export), dtype=getattr(torch, dtype), attn_implementation=attention.register()
    ).eval()
    batch = StaticBatch(model, capacity=32, context=512, graphs=False)
    old, new = Prefiller(model, pad_id=0, prefix_cache=None), PackedPrefiller(batch, None)
    ways = {
        "left_padded_then_copied": lambda g: left_padded(batch, old, g),
        "packed": lambda g: new.run(g, [GREEDY] * len(g), [0] * len(g))[1],
    }
    groups = groups_as_admitted(prompts, batch.capacity)
    real = sum(map(len, prompts))
    padded = sum(max(map(len, g)) * len(g) for g in groups)
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    firsts = {}
    with torch.inference_mode():
        for fn in ways.values():  # warm-up
            timed(fn, batch, groups[:2])
        for r in range(rounds):
            for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
                s, firsts[name] = timed(ways[name], batch, groups)
                seconds[name].append(s)
    agree = sum(a == b for a, b in zip(firsts["packed"], firsts["left_padded_then_copied"], strict=True))
    out = {
        "groups": len(groups),
        "prompt_tokens": real,
        "padded_tokens": padded,
        "first_tokens_agreeing": f"{agree}/{len(prompts)}",
    }
    for name, runs in seconds.items():
        out[name] = {
            "median_s": round(statistics.median(runs), 3),
            "min_s": round(min(runs), 3),
            "prompt_tokens_per_s": round(real / statistics.median(runs)),
        }
    out["packed_over_before"] = round(out["packed"]["median_s"] / out["left_padded_then_copied"]["median_s"], 3)
    pairs = zip(seconds["packed"], seconds["left_padded_then_copied"], strict=True)
    out["packed_over_before_per_round"] = [round(p / b, 3) for p, b in pairs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16" if cpu_has_native_bf16() else "float32")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "packed_prefill.json")
    opts = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="mfbench"))
    export = on_fresh_thread(
        build_export, work / "model", layers=4, hidden=256, heads=4, vocab_size=8192, max_context=512, texts=corpus()
    )
    prompts = mixed_prompts(AutoTokenizer.from_pretrained(str(export)), opts.prompts, seed=0)
    results = {
        "model": {"layers": 4, "hidden": 256, "heads": 4, "vocab": 8192, "init": "random"},
        "prompts": len(prompts),
        "prompt_tokens_min_mean_max": [
            min(map(len, prompts)),
            round(statistics.mean(map(len, prompts))),
            max(map(len, prompts)),
        ],
        **hardware("cpu"),
        "torch_threads": 2,
        "rounds": opts.rounds,
    }
    for dtype in opts.dtypes.split(","):
        results[dtype] = on_fresh_thread(measure, export, dtype, prompts, opts.rounds)
        print(dtype, json.dumps(results[dtype]), flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {opts.out}")


if __name__ == "__main__":
    main()
