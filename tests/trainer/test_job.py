"""End to end: real torchrun (gloo, 2 processes), real MLflow on SQLite, real DCP checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from outside import kill_when, progress_reached, start
from safetensors.torch import load_file as load_safetensors
from tiny_runs import tiny_run, write_run

from midfill import fim
from midfill.api import EXIT_CODE_INVALID_CONFIG
from midfill.export import read_metadata
from midfill.progress import RUN_TAG_ATTEMPT, RUN_TAG_UID, read_progress, read_result
from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, Registry

pytestmark = pytest.mark.timeout(300)


def _trainer(
    root: Path, run_file: Path, *, uid: str, attempt: int = 1, nproc: int = 1, **env: str
) -> subprocess.CompletedProcess:
    cmd, full_env = _command(root, run_file, uid=uid, attempt=attempt, nproc=nproc, **env)
    return subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=240)


def _command(
    root: Path, run_file: Path, *, uid: str, attempt: int = 1, nproc: int = 1, **env: str
) -> tuple[list[str], dict[str, str]]:
    full_env = {
        **os.environ,
        "MIDFILL_STATE_DIR": str(root / "state"),
        "MIDFILL_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "trainer",
            "--run-file",
            str(run_file),
        ]
    else:
        cmd = [sys.executable, "-m", "trainer", "--run", str(run_file)]
    cmd += ["--uid", uid, "--attempt", str(attempt)]
    return cmd, full_env


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run_file = write_run(root / "run.yaml", tiny_run("tiny-ddp"))
    proc = _trainer(root, run_file, uid="uid-ddp", nproc=2)
    _ok(proc)
    return root, run_file


def test_torchrun_two_processes_train_and_the_loss_falls(ddp_run):
    root, _ = ddp_run
    run_dir = root / "state" / "runs" / "tiny-ddp"
    progress = read_progress(run_dir)
    assert progress.step == progress.total_steps == 30 and progress.checkpoint_step == 30
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}")
    run = registry.client.get_run(progress.mlflow_run_id)
    assert run.data.tags[RUN_TAG_UID] == "uid-ddp" and run.data.tags[RUN_TAG_ATTEMPT] == "1"
    assert {"loss", "val_loss", "lr", "tokens_per_second", "grad_norm", "step", "line_infill_exact_match"} <= set(
        run.data.metrics
    )
    assert run.data.params["world_size"] == "2" and run.data.params["attn_implementation"] == "sdpa"
    losses = [
        m.value for m in sorted(registry.client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    ]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    complete = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert complete == ["step-00000020", "step-00000030"]
    assert len(list((run_dir / "checkpoints" / "step-00000030").glob("rank-*.pt"))) == 2


def test_export_loads_with_transformers_and_infills(ddp_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = ddp_run
    result = read_result(root / "state" / "runs" / "tiny-ddp")
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}")
    info = registry.resolve_uri(result.uri)
    assert info.tags[TAG_RUN_NAME] == "tiny-ddp" and info.tags[TAG_ATTEMPT] == "1" and info.tags["team"] == "test"
    folder = registry.download(info, tmp_path)
    meta = read_metadata(folder)
    assert meta.fim_format == "codegen2" and meta.sentinels["eom"] == fim.EOM and meta.stop_tokens == [fim.EOM, fim.EOS]
    assert meta.max_context == 128 and meta.step == 30 and meta.recipe == "debug"
    assert meta.training_run.uid == "uid-ddp" and meta.data_hash == info.tags[TAG_DATA_HASH]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = fim.CODEGEN2.infill_prompt("def add(a, b):\n", "\n\nprint(add(1, 2))\n")
    ids = tok(prompt, return_tensors="pt")
    stop = tok.convert_tokens_to_ids(list(fim.CODEGEN2.stop_tokens))
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :]
    assert len(new) >= 1
    assert isinstance(tok.decode(new, skip_special_tokens=True), str)


def test_a_retry_after_success_registers_nothing_new(ddp_run):
    root, run_file = ddp_run
    proc = _trainer(
        root, run_file, uid="uid-ddp", attempt=2
    )  # one process now: the data order restarts, weights resume
    _ok(proc)
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}")
    assert [v.version for v in registry.versions("tiny-ddp")] == ["1"]
    assert read_result(root / "state" / "runs" / "tiny-ddp").version == "1"


def test_a_crash_between_registration_and_result_is_retried_safely(tmp_path):
    doc = tiny_run("tiny-reg", steps=10)
    doc["spec"]["evaluation"] = {"suites": ["line-em", "left-to-right"], "limit": 4, "maxNewTokens": 8}
    run_file = write_run(tmp_path / "run.yaml", doc)
    crashed = _trainer(tmp_path, run_file, uid="uid-reg", MIDFILL_KILL_AFTER_REGISTER="1")
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    run_dir = tmp_path / "state" / "runs" / "tiny-reg"
    assert read_result(run_dir) is None
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(registry.versions("tiny-reg")) == 1
    _ok(_trainer(tmp_path, run_file, uid="uid-reg"))  # same attempt again (e.g. the pod restarted)
    assert [v.version for v in registry.versions("tiny-reg")] == ["1"]
    assert read_result(run_dir).version == "1"
    runs = registry.client.search_runs([registry.client.get_experiment_by_name("midfill").experiment_id])
    assert len(runs) == 1  # the retry of the same uid+attempt reused the MLflow run
    # spec.evaluation ran once, on the registered version, after the retry (the crash came before it).
    version = registry.get("tiny-reg", version="1")
    assert float(version.tags["eval.line-em.tasks"]) == 4
    assert 0.0 <= float(version.tags["eval.line-em.exact_match"]) <= 1.0
    assert float(version.tags["eval.left-to-right.loss"]) > 0
    _ok(_trainer(tmp_path, run_file, uid="uid-reg"))  # yet another retry evaluates nothing again
    eval_runs = registry.client.search_runs([registry.client.get_experiment_by_name("midfill-eval").experiment_id])
    assert sorted(r.data.tags["midfill.suite"] for r in eval_runs) == ["left-to-right", "line-em"]


def test_kill_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Tolerance: exact (bitwise) equality. Same seed, steps, thread count; data position,
    optimizer, scheduler and RNG all come back from the checkpoint at step 10. The trainer is
    SIGKILLed from outside once its progress says step 15."""
    doc = tiny_run("tiny-resume")
    straight_root, killed_root = tmp_path / "straight", tmp_path / "killed"
    straight_root.mkdir(), killed_root.mkdir()
    _ok(_trainer(straight_root, write_run(straight_root / "run.yaml", doc), uid="u"))
    run_file = write_run(killed_root / "run.yaml", doc)
    cmd, env = _command(killed_root, run_file, uid="u")
    run_dir = killed_root / "state" / "runs" / "tiny-resume"
    killed = kill_when(
        start(cmd, cwd=killed_root, env=env), progress_reached(run_dir, 15)
    )  # from outside, between checkpoints 10 and 20
    assert killed.returncode == -9
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000010"]
    (ckpt / "step-00000020").mkdir()  # a torn checkpoint newer than the good one: must be skipped
    (ckpt / "step-00000020" / "__0_0.distcp").write_bytes(b"torn")
    resumed = _trainer(killed_root, run_file, uid="u", attempt=2)
    _ok(resumed)
    assert "resumed from" in resumed.stderr and "step-00000010" in resumed.stderr
    a = load_safetensors(straight_root / "state" / "runs" / "tiny-resume" / "export" / "model.safetensors")
    b = load_safetensors(killed_root / "state" / "runs" / "tiny-resume" / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow  # ~40 s: two processes train for 12 s of budget
def test_two_ranks_fit_a_time_budget_alike_and_report_the_fitted_step_count(tmp_path):
    """Planned for 100,000 steps, budgeted 12 s: both ranks stop at the same fitted step (a rank that
    disagreed would hang in a collective and fail the run), which progress.json reports as the total."""
    run_file = write_run(tmp_path / "run.yaml", tiny_run("tiny-budget", steps=100_000, timeBudgetMinutes=0.2))
    proc = _trainer(tmp_path, run_file, uid="u", nproc=2)
    _ok(proc)
    assert "time budget 12 s:" in proc.stderr
    progress = read_progress(tmp_path / "state" / "runs" / "tiny-budget")
    assert progress is not None and progress.step == progress.total_steps < 100_000
    assert (tmp_path / "state" / "runs" / "tiny-budget" / "export" / "model.safetensors").exists()


def test_invalid_config_exits_78_with_one_line_naming_the_field(tmp_path, capsys, monkeypatch):
    from trainer.__main__ import main

    monkeypatch.setenv("MIDFILL_STATE_DIR", str(tmp_path / "state"))
    bad = tiny_run("bad")
    bad["spec"]["training"]["seqLenght"] = 64
    assert main(["--run", str(write_run(tmp_path / "bad.yaml", bad))]) == EXIT_CODE_INVALID_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "spec.training.seqLenght" in err
    too_long = tiny_run("too-long", seqLength=1024, globalBatchTokens=4096)
    too_long["spec"]["model"]["architecture"] = {}
    assert main(["--run", str(write_run(tmp_path / "long.yaml", too_long)), "--check"]) == EXIT_CODE_INVALID_CONFIG
    assert "training.seqLength" in capsys.readouterr().err
    no_data = tiny_run("no-data")
    no_data["spec"]["data"]["sources"] = [{"uri": str(tmp_path / "nothing-here")}]
    assert main(["--run", str(write_run(tmp_path / "nodata.yaml", no_data)), "--check"]) == EXIT_CODE_INVALID_CONFIG
    assert "data.sources[0].uri" in capsys.readouterr().err


def test_a_global_batch_that_does_not_split_over_the_processes_exits_78(tmp_path, capsys, monkeypatch):
    """3 sequences per step cannot split into micro-batches of 2 on one process, nor over 2 processes
    (the API checks only the multiple of seqLength); --check counts the spec's planned processes."""
    from trainer.__main__ import main

    monkeypatch.setenv("MIDFILL_STATE_DIR", str(tmp_path / "state"))
    uneven = tiny_run("uneven", globalBatchTokens=192, microBatchSize=2)
    assert main(["--run", str(write_run(tmp_path / "uneven.yaml", uneven)), "--check"]) == EXIT_CODE_INVALID_CONFIG
    assert "training.globalBatchTokens: 192 must be a multiple of seqLength x microBatchSize x processes = 128" in (
        capsys.readouterr().err
    )
    two = tiny_run("two", globalBatchTokens=256, microBatchSize=4)
    two["spec"]["parallelism"] = {"numNodes": 2}
    assert main(["--run", str(write_run(tmp_path / "two.yaml", two)), "--check"]) == EXIT_CODE_INVALID_CONFIG
    assert "processes = 512" in capsys.readouterr().err
    two["spec"]["training"]["globalBatchTokens"] = 512
    assert main(["--run", str(write_run(tmp_path / "two.yaml", two)), "--check"]) == 0


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    doc = tiny_run("tiny-fsdp", steps=10)
    doc["spec"]["parallelism"] = {"strategy": "fsdp"}
    _ok(_trainer(tmp_path, write_run(tmp_path / "run.yaml", doc), uid="uid-fsdp", nproc=2))
    result = read_result(tmp_path / "state" / "runs" / "tiny-fsdp")
    assert result.version == "1"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "state" / "runs" / "tiny-fsdp" / "export")
    assert model.config.num_hidden_layers == 2
    # the same run, longer, in one process: the sharded checkpoint of step 10 resumes at another world size
    doc["spec"]["training"]["steps"] = 12
    longer = _trainer(tmp_path, write_run(tmp_path / "run.yaml", doc), uid="uid-fsdp-2", attempt=2)
    _ok(longer)
    assert "resumed from" in longer.stderr and "step-00000010" in longer.stderr
    assert "world size changed since the checkpoint" in longer.stderr
