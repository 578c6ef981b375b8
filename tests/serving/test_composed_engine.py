"""Composed exports in the engine (serving/composed.py): parents loaded by reference through the
registry (MLflow on SQLite), per-request composed caches equal to greedy full recomputation."""

from __future__ import annotations

import json
import queue
import threading

import pytest
import torch
from engine_watch import wait_idle
from serving_exports import build_composed_export, build_export

from midfill.composition import greedy_generate
from midfill.registry import Registry
from serving.engine import Engine, SamplingParams

PREFIXES = ["def add(a, b):\n    ", "for i in range(10):\n", "x = ", "class Config:\n    def __init__(self):\n        "]


def _composed_export(root, tiny_export, *, mode: str, uri: str):
    """A composition of a registered anchor (models:/anchor/1) and a local augmenting export, with a
    bridge of random weights (a fresh one adds exactly zero and would hide a broken bridge)."""
    augment_dir = build_export(root / "augment", hidden=32, layers=2, heads=4, max_context=256, seed=1)
    if not Registry(uri).versions("anchor"):
        Registry(uri).register(name="anchor", source=str(tiny_export), run_uid="uid-anchor")
    return build_composed_export(root / mode, mode=mode, anchor=tiny_export, augment=augment_dir, bridge_std=0.5)


@pytest.fixture(scope="module", params=["calm", "codet5p"])
def composed(request, tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"composed-{request.param}")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    folder, reference = _composed_export(root, tiny_export, mode=request.param, uri=uri)
    engine = Engine.from_export(folder, tracking_uri=uri, cache_dir=root / "cache", max_batch_size=4)
    yield engine, reference, root
    engine.close()


def test_the_parents_come_from_the_registry_and_the_bridge_from_the_export(composed):
    engine, reference, root = composed
    assert (root / "cache" / "parents" / "anchor" / "1" / ".midfill-complete").read_text().strip() == "models:/anchor/1"
    for (name, a), b in zip(engine.model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (
        json.loads((root / reference.mode / "composition.json").read_text())["parents"]["anchor"]["ref"]
        == "models:/anchor/1"
    )


def test_concurrent_greedy_requests_equal_full_recomputation(composed):
    """Tolerance: identical greedy tokens (the reference reruns the whole sequence every step)."""
    engine, reference, _ = composed
    prompts = [engine.encode(engine.infill_prompt(p, "\n    return result\n")) for p in PREFIXES]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = engine.generate(prompts[i], SamplingParams(max_tokens=10))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, ids in enumerate(prompts):
        got = results[i]
        context = {"encoder_input_ids": torch.tensor([ids])} if reference.mode == "codet5p" else {}
        want = (
            greedy_generate(reference, torch.tensor([ids]), max_new_tokens=10, use_cache=False, **context)
            .tokens[0, len(ids) :]
            .tolist()
        )
        assert got.token_ids == want[: len(got.token_ids)], i
        if got.finish_reason == "stop":
            assert want[len(got.token_ids)] in engine.stop_token_ids
        else:
            assert got.finish_reason == "length" and len(got.token_ids) == 10


def test_the_bridge_changes_what_the_anchor_alone_would_say(composed, tiny_export):
    """The served model is the composition, not its anchor (the bridge's output is not zero)."""
    engine, reference, _ = composed
    ids = torch.tensor([engine.encode(engine.infill_prompt(PREFIXES[0], "\n"))])
    context = {"encoder_input_ids": ids} if reference.mode == "codet5p" else {}
    with torch.no_grad():
        composed_logits = reference(ids, **context).logits
        anchor_logits = reference.anchor(ids).logits
    assert not torch.allclose(composed_logits, anchor_logits, atol=1e-3)


def test_cancel_and_errors_leave_the_composed_engine_serving(composed):
    engine, _, _ = composed
    ids = engine.encode("def f():\n    ")
    control = engine.generate(ids, SamplingParams(max_tokens=200))
    assert (control.finish_reason, control.completion_tokens) == ("length", 200)  # would run 200 steps
    outputs: queue.Queue = queue.Queue()
    wait_idle(engine)
    before = engine.steps
    handle = engine.submit(ids, SamplingParams(max_tokens=200), outputs.put)
    assert not outputs.get(timeout=60).finished
    handle.cancel()
    while not (last := outputs.get(timeout=60)).finished:
        pass
    wait_idle(engine)
    assert last.finish_reason == "cancelled" and last.completion_tokens < 20
    assert engine.steps - before < 20, engine.steps - before
    done = engine.generate(ids, SamplingParams(max_tokens=3))
    assert done.completion_tokens == 3 and engine.stats() == {"running": 0, "waiting": 0}


def test_on_a_gpu_replica_a_composed_export_is_served_on_the_cpu_in_the_cpus_dtype(tiny_export, tmp_path, monkeypatch):
    from serving import settings

    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder, _ = _composed_export(tmp_path, tiny_export, mode="calm", uri=uri)
    # What a GPU replica asks for on a T4 (serving.settings): float16 would be emulated on this CPU.
    engine = Engine.from_export(folder, device="cuda", dtype="float16", tracking_uri=uri, cache_dir=tmp_path / "cache")
    try:
        assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
        assert next(engine.model.parameters()).device.type == "cpu"
    finally:
        engine.close()
