"""Serving throughput: the Ray Serve endpoint vs sequential `model.generate` in-process.

Model: by default the debug size from docs/cpu-notes.md (Llama, 4 layers, hidden 256, 4 heads, BPE vocab 8192
trained on stdlib sources; --layers/--hidden/--heads for another), random init (throughput does not depend on
the weights). Requests: infill prompts of ~430 tokens cut from stdlib files, 32 new tokens each, greedy; the
prefix cache is off (the same prompts recur across runs, and prefix_reuse measures it). Baseline: sequential
`generate` as transformers loads the model (sdpa attention), in float32 and in bfloat16.

This VM's speed drifts by up to 2x within minutes, so nothing is compared across minutes: every
round measures both baselines and then the engine (in-process, then the endpoint), and each speedup
is taken against the faster baseline of its own round. The summary is the median over rounds.
One run; JSON to bench/results/serve_throughput.json. Run under the shared CPU lock:

    flock /tmp/midfill-cpu.lock .venv/bin/python bench/serve_throughput.py

On a GPU, `--device cuda` runs the baselines, the engine and the endpoint's replica there (results
to serve_throughput_cuda.json); `--parts engine` skips the Ray endpoint where Ray is not installed
(bench/gpu/run.sh, the prepared check for a lent GPU machine). `--decode-paths static,dynamic`
measures the engine once per decode path (serving.static_decode vs serving.kv_slots; default: the
device's auto choice); for the static path the cost model also times its step (graph replay on a GPU)
and divides it by the weight-read floor (weight bytes / the device's measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as _stdlib_platform  # noqa: F401  (the stdlib one; we have no package of that name)
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from serve_common import ROOT, corpus, hardware, load_baseline_model, on_fresh_thread, summary
from serve_costs import bounds, cost_model

# isort: split
# On sys.path through serve_common (tests/serving).
from ray_helpers import local_serve
from serving_exports import build_export

PROMPT_TOKENS, SUFFIX_TOKENS, NEW_TOKENS = 430, 110, 32


def make_requests(tokenizer, texts: list[str], n: int) -> list[tuple[str, str]]:
    """(prefix, suffix) pairs whose infill prompt is ~PROMPT_TOKENS tokens."""
    out = []
    for text in texts[::-1]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) < 3 * PROMPT_TOKENS:
            continue
        cut = len(ids) // 2
        prefix = tokenizer.decode(ids[cut - (PROMPT_TOKENS - SUFFIX_TOKENS - 6) : cut])
        suffix = tokenizer.decode(ids[cut + 20 : cut + 20 + SUFFIX_TOKENS])
        out.append((prefix, suffix))
        if len(out) == n:
            return out
    raise RuntimeError("not enough long files for the requests")


def baseline(model, tokenizer, prompts: list[str], stop_ids: list[int]) -> tuple[dict, list[list[int]]]:
    """Sequential HF generate, greedy, one request at a time, on the model's device."""
    lat, total, outs = [], 0, []
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = gen[0, ids.shape[1] :].tolist()  # on a GPU this waits for the last kernel: the latency is whole
        lat.append(time.perf_counter() - t0)
        total += len(new)
        outs.append(new)
    return summary(lat, total, time.perf_counter() - start), outs


def engine_in_process(engine, prompts: list[str], concurrency: int) -> dict:
    """The engine without HTTP or Ray, to separate batching from transport overhead."""
    from serving.engine import SamplingParams

    todo = list(range(len(prompts)))
    lock, lat, total = threading.Lock(), [], [0]

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            t0 = time.perf_counter()
            c = engine.generate(engine.encode(prompts[i]), SamplingParams(max_tokens=NEW_TOKENS))
            with lock:
                lat.append(time.perf_counter() - t0)
                total[0] += c.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(lat, total[0], time.perf_counter() - start)


async def endpoint(url: str, pairs: list[tuple[str, str]], concurrency: int) -> tuple[dict, dict[int, str]]:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(pairs)):
        queue.put_nowait(i)
    lat, total, texts, errors, cached = [], 0, {}, 0, 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal total, errors, cached
        while not queue.empty():
            i = queue.get_nowait()
            prefix, suffix = pairs[i]
            t0 = time.perf_counter()
            r = await client.post(
                f"{url}/v1/completions",
                json={"prompt": prefix, "suffix": suffix, "max_tokens": NEW_TOKENS, "temperature": 0},
            )
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1
                continue
            body = r.json()
            total += body["usage"]["completion_tokens"]
            cached += body["usage"]["prompt_tokens_details"]["cached_tokens"]
            texts[i] = body["choices"][0]["text"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    result = summary(lat, total, wall)
    result["errors"] = errors
    result["cached_prompt_tokens"] = cached  # the prompts are distinct: the prefix cache should not help
    return result, texts


BASELINE_REQUESTS = 16  # per round: enough for a stable tokens/s, short enough to interleave


def baselines_now(models: dict, tokenizer, prompts: list[str], stop_ids: list[int]) -> dict:
    """Sequential `generate` in every dtype, on the first BASELINE_REQUESTS prompts."""
    return {
        dtype: baseline(model, tokenizer, prompts[:BASELINE_REQUESTS], stop_ids)[0] for dtype, model in models.items()
    }


def with_ratios(runs: dict, base: dict) -> dict:
    """Speedups against this round's fastest sequential baseline (of any dtype: the strictest)."""
    reference = max(b["tokens_per_s"] for b in base.values())
    for res in runs.values():
        res["speedup_vs_baseline"] = round(res["tokens_per_s"] / reference, 2)
    return {"baselines": base, "reference_tokens_per_s": reference, "runs": runs}


def measure_engine(
    export: Path,
    dtype: str,
    prompts: list[str],
    opts,
    base_models: dict,
    tokenizer,
    stop_ids,
    decode_path: str = "auto",
) -> dict:
    """The engine in-process (no HTTP or Ray): rounds of baselines, then concurrency 1, 8 and 32 and the
    ablation without prefill groups; then its cost model. A fresh engine per round, closed before the
    next baselines and the cost model run (on_fresh_thread says why)."""
    from serving.engine import Engine

    rounds = []
    for r in range(opts.rounds):
        base = on_fresh_thread(baselines_now, base_models, tokenizer, prompts, stop_ids)
        engine = on_fresh_thread(
            Engine.from_export,
            export,
            dtype=dtype,
            device=opts.device,
            max_batch_size=opts.max_batch_size,
            prefix_cache_tokens=0,
            # Only when asked: an engine from before decode paths (an A/B against an older checkout) runs too.
            **({} if decode_path == "auto" else {"decode_path": decode_path}),
        )
        try:
            engine_in_process(engine, prompts[:4], 4)  # warm-up
            runs = {str(c): engine_in_process(engine, prompts if c > 1 else prompts[:16], c) for c in (1, 8, 32)}
            engine.max_prefill_tokens = 1  # the ablation; this engine is discarded after it
            for c in (8, 32):
                runs[f"{c}_one_prefill_per_step"] = engine_in_process(engine, prompts, c)
        finally:
            engine.close()
        rounds.append(with_ratios(runs, base))
        rounds[-1]["decode_path"] = getattr(engine, "decode_path", "dynamic (no decode paths)")
        # A lone request against sequential generate in the same dtype (both: prefill + NEW_TOKENS tokens).
        same = base.get(dtype) or next(iter(base.values()))
        rounds[-1]["single_request_latency_over_generate"] = round(
            runs["1"]["p50_latency_s"] / same["p50_latency_s"], 2
        )
        print(f"engine in-process {dtype} {decode_path} round {r}", rounds[-1], flush=True)
    costs = on_fresh_thread(cost_model, engine, prompts)  # the engine's thread has ended
    print(f"cost model {dtype}", costs, flush=True)
    return {"rounds": rounds, "cost_model": costs, "bounds": bounds(costs, NEW_TOKENS)}


def measure_endpoint(
    export: Path, dtype: str, pairs, prompts, opts, base_models: dict, tokenizer, stop_ids, expected, work: Path
) -> dict:
    """The Ray Serve endpoint (1 replica) over HTTP, rounds interleaved with the baselines."""
    from serving.app import build_app

    args = {
        "model_uri": str(export),
        "auth_disabled": True,
        "max_batch_size": opts.max_batch_size,
        "max_ongoing_requests": 64,
        "max_new_tokens": 64,
        "num_cpus": 2,
        "prefix_cache_tokens": 0,
        "num_gpus": 1 if opts.device == "cuda" else 0,
    }
    os.environ["MIDFILL_SERVE_DTYPE"] = dtype  # inherited by the Ray workers started below
    os.environ["MIDFILL_SERVE_DEVICE"] = opts.device
    os.environ["MIDFILL_STATE_DIR"] = str(work / "state")
    rounds = []
    with local_serve(build_app(args), num_cpus=4) as url:
        asyncio.run(endpoint(url, pairs[:4], 4))  # warm-up
        for r in range(opts.rounds):
            base = on_fresh_thread(baselines_now, base_models, tokenizer, prompts, stop_ids)
            runs = {}
            for c in (1, 8, 32):
                subset = pairs[:16] if c == 1 else pairs
                res, texts = asyncio.run(endpoint(url, subset, c))
                same = sum(texts.get(i) == expected[i] for i in range(len(subset)))
                res["greedy_matches_baseline"] = f"{same}/{len(subset)}"  # vs generate in the same dtype
                runs[str(c)] = res
            round_ = with_ratios(runs, base)
            round_["p95_at_8_over_single_latency"] = round(runs["8"]["p95_latency_s"] / runs["1"]["p50_latency_s"], 2)
            rounds.append(round_)
            print(f"endpoint {dtype} round {r}", round_, flush=True)
    return {"rounds": rounds}


def median_over_rounds(rounds: list[dict], key: str) -> dict:
    """Per run: the median, min and max of `key` over the rounds."""
    out = {}
    for run in rounds[0]["runs"]:
        values = [r["runs"][run][key] for r in rounds]
        out[run] = {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}
    return out


def parse_options() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of baselines and measurements")
    ap.add_argument(
        "--dtypes", default="float32,bfloat16", help="dtypes to measure (MIDFILL_SERVE_DTYPE for the endpoint)"
    )
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument(
        "--layers", type=int, default=4, help="model size (default: the debug recipe's; a GPU can take a larger one)"
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the baselines, the engine and the replica run"
    )
    ap.add_argument(
        "--decode-paths", default="auto", help="engine decode paths to measure: auto, static, dynamic, comma-separated"
    )
    ap.add_argument("--baseline-dtypes", default="float32,bfloat16", help="dtypes of the sequential generate baselines")
    ap.add_argument(
        "--parts", default="engine,endpoint", help="engine (in-process), endpoint (Ray Serve over HTTP), or both"
    )
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/serve_throughput[_cuda].json")
    opts = ap.parse_args()
    opts.dtype_list, opts.part_set = opts.dtypes.split(","), set(opts.parts.split(","))
    if not opts.part_set or opts.part_set - {"engine", "endpoint"}:
        ap.error(f"--parts: expected engine, endpoint or engine,endpoint (got {opts.parts!r})")
    if opts.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    suffix = "" if opts.device == "cpu" else f"_{opts.device}"
    opts.out = opts.out or ROOT / "bench" / "results" / f"serve_throughput{suffix}.json"
    return opts


@dataclass
class Workload:
    """The model every part measures and the requests they send."""

    work: Path
    export: Path
    tokenizer: object
    stop_ids: list[int]
    pairs: list[tuple[str, str]]  # (prefix, suffix), for the endpoint
    prompts: list[str]  # the same requests as infill prompts, for the engine and the baselines
    prompt_lens: list[int]


def prepare(opts: argparse.Namespace) -> Workload:
    """Build the random-init export (on a fresh thread) and cut the requests from stdlib files."""
    from transformers import AutoTokenizer

    from midfill.export import read_metadata
    from midfill.fim import get_format

    work = Path(tempfile.mkdtemp(prefix="mfbench"))
    export = on_fresh_thread(
        build_export,
        work / "model",
        layers=opts.layers,
        hidden=opts.hidden,
        heads=opts.heads,
        vocab_size=8192,
        max_context=512,
        texts=corpus(),
    )
    tokenizer, meta = AutoTokenizer.from_pretrained(str(export)), read_metadata(export)
    fim = get_format(meta.fim_format)
    stop_ids = sorted(tokenizer.convert_tokens_to_ids(meta.stop_tokens or list(fim.stop_tokens)))
    pairs = make_requests(tokenizer, corpus(), opts.requests)
    prompts = [fim.infill_prompt(p, s) for p, s in pairs]
    prompt_lens = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    print(f"{len(prompts)} requests, prompt tokens mean {statistics.mean(prompt_lens):.0f}", flush=True)
    return Workload(work, export, tokenizer, stop_ids, pairs, prompts, prompt_lens)


def full_baselines(base_models: dict, load: Workload) -> tuple[dict, dict]:
    """Sequential generate over all requests in every baseline dtype, and its texts (what the
    endpoint's greedy answers are compared with)."""
    full_baseline, expected = {}, {}
    for dtype, model in base_models.items():
        full_baseline[dtype], ids = on_fresh_thread(baseline, model, load.tokenizer, load.prompts, load.stop_ids)
        expected[dtype] = [load.tokenizer.decode([t for t in out if t not in load.stop_ids]) for out in ids]
        print(f"baseline {dtype}, all requests", full_baseline[dtype], flush=True)
    return full_baseline, expected


def speedup_summary(results: dict) -> dict:
    """Medians over rounds of every run's speedup (and the endpoint's latency ratio)."""
    summary_ = {}
    for kind in ("engine_in_process", "endpoint"):
        for dtype, measured in results[kind].items():
            summary_[f"{kind} {dtype}"] = median_over_rounds(measured["rounds"], "speedup_vs_baseline")
    for dtype, measured in results["endpoint"].items():
        values = [r["p95_at_8_over_single_latency"] for r in measured["rounds"]]
        summary_[f"endpoint {dtype} p95_at_8_over_single_latency"] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return summary_


def main() -> None:
    opts = parse_options()
    torch.set_num_threads(2)
    load = prepare(opts)
    tokenizer, prompts, stop_ids = load.tokenizer, load.prompts, load.stop_ids
    base_models = {
        dtype: on_fresh_thread(load_baseline_model, load.export, dtype, opts.device)
        for dtype in opts.baseline_dtypes.split(",")
    }
    full_baseline, expected = full_baselines(base_models, load)
    results = {
        "model": {
            "layers": opts.layers,
            "hidden": opts.hidden,
            "heads": opts.heads,
            "vocab": tokenizer.vocab_size,
            "init": "random",
            "max_context": 512,
        },
        "requests": len(prompts),
        "prompt_tokens_mean": round(statistics.mean(load.prompt_lens)),
        "new_tokens": NEW_TOKENS,
        **hardware(opts.device),
        "torch_threads": 2,
        "rounds": opts.rounds,
        "baseline_requests_per_round": BASELINE_REQUESTS,
        "baseline_sequential_generate_all_requests": full_baseline,
        "engine_in_process": {},
        "endpoint": {},
    }
    if "endpoint" in opts.part_set:
        from serving.settings import ServingSettings  # pydantic-settings: not on every GPU image

        results["endpoint_default_dtype"] = ServingSettings(serve_device=opts.device).device_and_dtype()[1]
    paths = opts.decode_paths.split(",")
    for dtype in opts.dtype_list if "engine" in opts.part_set else ():
        for path in paths:  # keyed by dtype alone for the device's default path, as before
            key = dtype if path == "auto" else f"{dtype} {path}"
            results["engine_in_process"][key] = measure_engine(
                load.export, dtype, prompts, opts, base_models, tokenizer, stop_ids, path
            )
    for dtype in opts.dtype_list if "endpoint" in opts.part_set else ():
        results["endpoint"][dtype] = measure_endpoint(
            load.export, dtype, load.pairs, prompts, opts, base_models, tokenizer, stop_ids, expected[dtype], load.work
        )
    results["summary_speedup_vs_fastest_baseline"] = summary_ = speedup_summary(results)
    print("summary", json.dumps(summary_, indent=1), flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
