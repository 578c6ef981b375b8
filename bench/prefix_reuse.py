"""Editor traffic: the engine with and without the prefix cache vs sequential `model.generate`.

An editor resends the file around the cursor as the user types. Here 8 editing sessions (8 stdlib
files, the cursor at a line start mid-file: ~320 prefix + ~100 suffix tokens) each type the next
line 2 characters at a time and ask for a 16-token completion after every burst (12 requests per
session, one at a time), with 1 and with 4 sessions at once. Same debug-size random-init model as
serve_throughput, in the dtype the endpoint serves in on this machine. One run; JSON to bench/results/prefix_reuse.json:

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/prefix_reuse.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from serve_common import corpus, load_baseline_model, on_fresh_thread, summary
from serving_exports import build_export  # put on sys.path by serve_common
from transformers import AutoTokenizer

from midfill.export import read_metadata
from midfill.fim import get_format
from serving.engine import Engine, SamplingParams
from serving.settings import ServingSettings

ROOT = Path(__file__).resolve().parents[1]
PREFIX_TOKENS, SUFFIX_TOKENS, NEW_TOKENS, BURST, BURSTS = 320, 100, 16, 2, 12


def sessions(tokenizer, texts: list[str], n: int) -> list[list[tuple[str, str]]]:
    """Per session, the (prefix, suffix) of each request as the user types the next line."""
    out = []
    for text in texts[::-1]:
        lines = text.splitlines(keepends=True)
        mid = len(lines) // 2
        # the first line from the middle on that has something to type
        at = next((i for i in range(mid, len(lines)) if len(lines[i].strip()) >= BURST * BURSTS), None)
        if at is None:
            continue
        before, line, after = "".join(lines[:at]), lines[at], "".join(lines[at + 1 :])
        prefix_ids = tokenizer.encode(before, add_special_tokens=False)
        suffix_ids = tokenizer.encode(after, add_special_tokens=False)
        if len(prefix_ids) < PREFIX_TOKENS or len(suffix_ids) < SUFFIX_TOKENS:
            continue
        prefix = tokenizer.decode(prefix_ids[-PREFIX_TOKENS:])
        suffix = tokenizer.decode(suffix_ids[:SUFFIX_TOKENS])
        out.append([(prefix + line[: BURST * (k + 1)], suffix) for k in range(BURSTS)])
        if len(out) == n:
            return out
    raise RuntimeError("not enough files for the sessions")


def run_engine(engine: Engine, work: list[list[list[int]]], concurrency: int) -> dict:
    """Sessions taken by `concurrency` clients; each client sends its session's requests in order."""
    todo, lock, lat, total = list(range(len(work))), threading.Lock(), [], [0]
    cached = [0]

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                session = work[todo.pop(0)]
            for ids in session:
                t0 = time.perf_counter()
                c = engine.generate(ids, SamplingParams(max_tokens=NEW_TOKENS))
                with lock:
                    lat.append(time.perf_counter() - t0)
                    total[0] += c.completion_tokens
                    cached[0] += c.cached_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = summary(lat, total[0], time.perf_counter() - start)
    result["cached_prompt_tokens"] = cached[0]
    return result


def sequential_generate(model, tokenizer, work: list[list[list[int]]], stop: list[int]) -> dict:
    lat, total = [], 0
    start = time.perf_counter()
    for session in work:
        for ids in session:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=tokenizer.pad_token_id,
                )
            lat.append(time.perf_counter() - t0)
            total += out.shape[1] - x.shape[1]
    return summary(lat, total, time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix_reuse.json")
    opts = ap.parse_args()

    torch.set_num_threads(2)
    dtype = ServingSettings().device_and_dtype()[1]  # what the endpoint serves in on this machine
    work_dir = Path(tempfile.mkdtemp(prefix="mfbench"))
    export = on_fresh_thread(
        build_export,
        work_dir / "debug",
        layers=4,
        hidden=256,
        heads=4,
        vocab_size=8192,
        max_context=512,
        texts=corpus(),
    )
    tokenizer, fim = AutoTokenizer.from_pretrained(str(export)), get_format(read_metadata(export).fim_format)
    stop = sorted(tokenizer.convert_tokens_to_ids(list(fim.stop_tokens)))
    plan = sessions(tokenizer, corpus(), opts.sessions)
    work = [
        [tokenizer.encode(fim.infill_prompt(p, s), add_special_tokens=False) for p, s in session] for session in plan
    ]
    lengths = [len(ids) for session in work for ids in session]
    print(
        f"{len(work)} sessions x {BURSTS} requests, prompt tokens mean {statistics.mean(lengths):.0f}, {dtype}",
        flush=True,
    )
    base_models = {d: on_fresh_thread(load_baseline_model, export, d) for d in ("float32", "bfloat16")}

    # This VM's speed drifts by up to 2x within minutes: every configuration runs in each of
    # `rounds` interleaved rounds and keeps its best run (as timeit keeps the minimum). The baseline
    # is the faster of float32 and bfloat16 `generate`; each round's engine is closed before the
    # next baselines run (serve_common.on_fresh_thread says why).
    best: dict[str, dict] = {}

    def keep(name: str, res: dict) -> None:
        print(name, res, flush=True)
        if name not in best or res["tokens_per_s"] > best[name]["tokens_per_s"]:
            best[name] = res

    for _ in range(opts.rounds):
        for d, model in base_models.items():
            keep(f"baseline_{d}", on_fresh_thread(sequential_generate, model, tokenizer, work, stop))
        engine = on_fresh_thread(Engine.from_export, export, dtype=dtype, max_batch_size=32)
        try:
            for c in (1, opts.concurrency):
                for name, tokens in (("engine_no_prefix_cache", 0), ("engine_prefix_cache_8192", 8192)):
                    engine.prefix_cache.clear()
                    engine.prefix_cache.max_tokens = tokens
                    keep(f"{name}/{c}", run_engine(engine, work, c))
        finally:
            engine.close()
    baselines = {d: best.pop(f"baseline_{d}") for d in base_models}
    base = max(baselines.values(), key=lambda r: r["tokens_per_s"])
    runs: dict[str, dict[str, dict]] = {"engine_no_prefix_cache": {}, "engine_prefix_cache_8192": {}}
    for key, res in best.items():
        name, c = key.split("/")
        res["speedup_vs_baseline"] = round(res["tokens_per_s"] / base["tokens_per_s"], 2)
        runs[name][c] = res

    results = {
        "model": {
            "layers": 4,
            "hidden": 256,
            "heads": 4,
            "vocab": tokenizer.vocab_size,
            "init": "random",
            "max_context": 512,
        },
        "dtype": dtype,
        "sessions": len(work),
        "requests_per_session": BURSTS,
        "chars_per_burst": BURST,
        "rounds_best_of": opts.rounds,
        "prompt_tokens_mean": round(statistics.mean(lengths)),
        "prompt_tokens_total": sum(lengths),
        "new_tokens": NEW_TOKENS,
        "baseline_sequential_generate": baselines,
        "baseline_tokens_per_s_reference": base["tokens_per_s"],
        **runs,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
