"""What the serving benchmarks share (serve_throughput, prefix_reuse, detokenize): the stdlib corpus,
latency summaries, the fresh-thread rule for torch work, the transformers baseline model and a
record of the hardware. Importing it puts tests/serving (the export builder, the local Ray Serve
helper) on sys.path."""

from __future__ import annotations

import os
import statistics
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from midfill.hardware import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serving"))


def corpus(n_files: int = 120) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 8000)[:n_files]
    return [p.read_text(errors="replace") for p in files]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    return {
        "requests": len(latencies),
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(pct(latencies, 0.95), 3),
    }


def on_fresh_thread(fn, *args, **kwargs):
    """Run fn on a new thread and return its result. Every torch computation of this script goes
    through here or through the engine's own thread, so at most one thread that has run torch ops is
    alive at a time: libgomp gives each such thread its own OpenMP pool, and once the pools hold more
    threads than there are cores it stops spinning and wakes its workers through the kernel for
    every op. Measured on 2 cores: small ops 3x slower in every thread while a second torch thread
    is alive (even idle) -- that alone halved the in-process engine and inflated the cost model's
    decode steps 2-4x in earlier versions of this benchmark. A Ray replica has only the engine's
    thread (the loading thread exits), so this is the condition the endpoint runs in."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def load_baseline_model(export: Path, dtype: str, device: str):
    """The model as a transformers user loads it: default (sdpa) attention, on `device`."""
    from transformers import AutoModelForCausalLM

    return (
        AutoModelForCausalLM.from_pretrained(str(export), dtype=getattr(torch, dtype), attn_implementation="sdpa")
        .to(device)
        .eval()
    )


def hardware(device: str) -> dict:
    """What the numbers were taken on: they change between machines (and between this VM's sessions)."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    out = {
        "device": device,
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "cpu_has_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
    }
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out
