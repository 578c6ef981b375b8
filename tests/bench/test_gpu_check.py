"""bench/gpu/run.sh, the prepared GPU check, runs end to end -- on the CPU (MIDFILL_CHECK_DEVICE=cpu,
a tiny model): it is run rarely, on a lent machine with minutes to spare, so it must not rot here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)  # every step of the check, serving and training, on a shared CPU
def test_the_gpu_check_runs_its_steps_and_writes_results(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "MIDFILL_CHECK_DEVICE": "cpu",
        "LIMIT_SCALE": "4",  # the limits are sized for a GPU; a shared CPU runs the tiny model slower
        "BENCH_ARGS": (
            "--layers 2 --hidden 64 --heads 4 --requests 32 --rounds 1 --dtypes float32 --baseline-dtypes float32"
        ),
        "TRAIN_ARGS": "--hidden 64 --heads 4 --layers 2 --seq 64 --micro 2 --steps 2 --warmup 1 --compile false",
        "INFILL_ARGS": "--dry-run",  # the 125m infill recipe shrunk to the debug geometry, 2 steps, 2 tasks
        "MIDFILL_STATE_DIR": str(tmp_path / "state"),
        "WHEEL_DIRS": "",  # this environment has everything; wheels fetched for a GPU box's Python would not fit it
        "WHEELS": str(tmp_path / "wheels"),
    }
    done = subprocess.run(["bash", "bench/gpu/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "failed steps: 0" in done.stdout
    assert "torch" in (tmp_path / "environment.txt").read_text()
    assert re.search(
        r"\d+ (passed|skipped)", (tmp_path / "gpu-tests.log").read_text()
    )  # collected and ran (or skipped)
    for size in ("100m", "1b"):  # both decode paths, the static one with its step over the weight-read floor
        measured = json.loads((tmp_path / f"serve_throughput_cpu_{size}.json").read_text())["engine_in_process"]
        assert measured["float32 dynamic"]["rounds"][0]["runs"]["32"]["tokens_per_s"] > 0
        static = measured["float32 static"]
        assert static["cost_model"]["static_step_over_floor_32_rows"] > 0
        assert static["rounds"][0]["single_request_latency_over_generate"] > 0
    for name in ("1b", "1b_eager", "1b_docmask", "7b4_fsdp"):  # training: tokens/s, MFU fields, memory per rank
        trained = json.loads((tmp_path / f"train_cpu_{name}.json").read_text())
        assert trained["tokens_per_second_per_device"] > 0 and "mfu" in trained
        assert trained["host_memory_per_rank"]["peak_gb"] > 0
    sharded = json.loads((tmp_path / "train_cpu_7b4_fsdp.json").read_text())
    assert sharded["fsdp_meta_init"] and sharded["world_size"] == 1
    assert json.loads((tmp_path / "train_cpu_1b_docmask.json").read_text())["document_mask"]
    infill = json.loads((tmp_path / "infill_recipe_125m.json").read_text())  # trained, then scored by line-em
    assert infill["dry_run"] and infill["steps_done"] == 2 and infill["line_em"]["tasks"] == 2
    assert set(infill["line_em"]) >= {"stop_rate", "stop_string_rate", "length_rate", "whitespace_rate"}
    if importlib.util.find_spec("ray") is not None:  # the endpoint joins where Ray Serve is installed
        summary = json.loads((tmp_path / "serve_throughput_cpu.json").read_text())[
            "summary_speedup_vs_fastest_baseline"
        ]
        assert summary["endpoint float32"]["32"]["median"] > 0
