"""`midfill eval` on composed exports (midfill.evaluation.models): the parents come through the
registry as in serving, greedy infill equals the composition's own greedy decode, and a composition
whose bridge adds nothing scores exactly as its anchor does as a plain export."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from midfill.composition import greedy_generate
from midfill.evaluation.infill import LocalInfiller
from midfill.evaluation.models import windows
from midfill.evaluation.runner import evaluate_export, run_left_to_right
from midfill.evaluation.suites import InfillTask
from midfill.export import read_metadata, write_metadata
from midfill.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "serving"))
from serving_exports import build_composed_export, build_export

pytestmark = pytest.mark.timeout(300)

HELD_OUT = '''import os


def walk(root):
    """Yield every file below root, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, amount=1):
        self.counts[key] = self.counts.get(key, 0) + amount
        return self.counts[key]
'''

TASKS = [
    InfillTask("a", "def add(a, b):\n    ", "\n    return result\n", "result = a + b\n"),
    InfillTask("b", "for i in range(10):\n", "print(total)\n", "    total += i\n"),
    InfillTask("c", "class Config:\n    def __init__(self):\n        ", "\n", "self.x = 1\n"),
]


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """A registered anchor (models:/anchor/1, 2x64) and a local augmenting export (2x32), one tokenizer."""
    root = tmp_path_factory.mktemp("eval-parents")
    anchor = build_export(root / "anchor", hidden=64, layers=2, max_context=256, seed=0)
    augment = build_export(root / "augment", hidden=32, layers=2, heads=4, max_context=256, seed=1)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    Registry(uri).register(name="anchor", source=str(anchor), run_uid="uid-anchor")
    held_out = root / "held_out.py"
    held_out.write_text(HELD_OUT)
    return root, uri, anchor, augment, held_out


def _export(parents, mode: str, *, bridge: bool, name: str, stop_tokens: list[str] | None = None):
    """A composed export of mode over the parents; bridge=True gives its output projections small
    random weights (a fresh bridge adds exactly zero, so the composition computes its anchor; larger
    weights drown these random parents and every prompt decodes to one repeated token)."""
    root, _, anchor, augment, _ = parents
    return build_composed_export(
        root / name,
        mode=mode,
        anchor=anchor,
        augment=augment,
        bridge_std=0.005 if bridge else None,
        stop_tokens=stop_tokens,
    )


@pytest.fixture(scope="module", params=["calm", "codet5p"])
def composed(request, parents):
    folder, reference = _export(parents, request.param, bridge=True, name=request.param)
    return folder, reference


def _reference_decode(reference, ids: list[int], max_new_tokens: int) -> list[int]:
    """The composition's own greedy decode, recomputing the whole sequence every step."""
    x = torch.tensor([ids])
    context = {"encoder_input_ids": x} if reference.mode == "codet5p" else {}
    return (
        greedy_generate(reference, x, max_new_tokens=max_new_tokens, use_cache=False, **context)
        .tokens[0, len(ids) :]
        .tolist()
    )


def test_line_em_and_left_to_right_run_on_a_composed_export(composed, parents):
    folder, _ = composed
    root, uri, *_, held_out = parents
    cache = root / f"cache-{folder.name}"
    em = evaluate_export(
        "line-em", folder, limit=4, max_new_tokens=8, files=[held_out], tracking_uri=uri, cache_dir=cache
    )
    assert em.metrics["tasks"] == 4.0 and len(em.tasks) == 4
    assert 0.0 <= em.metrics["exact_match"] <= 1.0 and 0.0 <= em.metrics["stop_rate"] <= 1.0
    assert all("\n" not in t.completion for t in em.tasks)  # line-em stops single-line holes at the newline
    # the anchor came through the registry into the cache, as serving loads it
    assert (cache / "parents" / "anchor" / "1" / ".midfill-complete").read_text().strip() == "models:/anchor/1"

    l2r = evaluate_export("left-to-right", folder, files=[held_out], tracking_uri=uri, cache_dir=cache)
    loss = l2r.metrics["loss"]
    assert math.isfinite(loss) and loss > 0 and l2r.metrics["perplexity"] == pytest.approx(math.exp(loss))
    n = len(AutoTokenizer.from_pretrained(str(folder))(HELD_OUT, add_special_tokens=False)["input_ids"])
    # positions fit 256 -> windows of 255 inputs; codet5p's encoder reads the first 127 tokens uncounted
    assert l2r.metrics["tokens"] == (n - 1 if folder.name == "calm" else n - 255 // 2)


def test_greedy_infill_equals_the_compositions_own_greedy_decode(composed, parents):
    folder, reference = composed
    root, uri, anchor, *_ = parents
    infiller = LocalInfiller(folder, tracking_uri=uri, cache_dir=root / f"cache-{folder.name}")
    got = infiller.infill(TASKS, max_new_tokens=12, stop=[])
    for task, completion in zip(TASKS, got, strict=True):
        ids = infiller.tokenizer(infiller.format.infill_prompt(task.prefix, task.suffix), add_special_tokens=False)[
            "input_ids"
        ]
        want = _reference_decode(reference, ids, 12)
        ended = next((k for k, t in enumerate(want) if t in infiller.stop_ids), None)
        assert completion.text == infiller.tokenizer.decode(want[:ended] if ended is not None else want), task.task_id
        assert completion.stopped == (ended is not None)
    # ... and it is the composition's decode, not its anchor's
    assert got != LocalInfiller(anchor, batch_size=1).infill(TASKS, max_new_tokens=12, stop=[])


def test_a_stop_token_ends_the_middle_where_the_model_emits_it(composed, parents):
    """midfill.json's stop tokens end a composed decode as a plain one: the middle is the text before it."""
    folder, reference = composed
    root, uri, *_ = parents
    probe = LocalInfiller(folder, tracking_uri=uri, cache_dir=root / f"cache-{folder.name}")
    # a token the model first emits at step k >= 1 of some task becomes a stop token
    for task in TASKS:
        ids = probe.tokenizer(probe.format.infill_prompt(task.prefix, task.suffix), add_special_tokens=False)[
            "input_ids"
        ]
        want = _reference_decode(reference, ids, 12)
        k = next((k for k, t in enumerate(want) if k >= 1 and t not in want[:k] and t not in probe.stop_ids), None)
        if k is not None:
            break
    assert k is not None, "the tiny model repeats one token on every task; pick other prompts"
    stop_token = probe.tokenizer.convert_ids_to_tokens(want[k])
    meta = read_metadata(folder)
    stopped_dir = root / f"{folder.name}-stop"
    shutil.copytree(folder, stopped_dir, dirs_exist_ok=True)
    write_metadata(stopped_dir, meta.model_copy(update={"stop_tokens": [*meta.stop_tokens, stop_token]}))
    infiller = LocalInfiller(stopped_dir, tracking_uri=uri, cache_dir=root / f"cache-{folder.name}")
    [completion] = infiller.infill([task], max_new_tokens=12, stop=[])
    assert completion.stopped
    assert completion.text == infiller.tokenizer.decode(want[:k])


@pytest.mark.parametrize("mode", ["calm", "codet5p"])
def test_a_composition_that_adds_nothing_infills_as_its_anchor(mode, parents):
    """A fresh bridge adds exactly zero: the composed path (per-prompt composed cache) must give the
    plain path's completions (transformers generate) on the anchor export."""
    root, uri, anchor, *_ = parents
    folder, _ = _export(parents, mode, bridge=False, name=f"{mode}-fresh")
    composed = LocalInfiller(folder, tracking_uri=uri, cache_dir=root / "cache-fresh").infill(
        TASKS, max_new_tokens=10, stop=["\n"]
    )
    plain = LocalInfiller(anchor, batch_size=1).infill(TASKS, max_new_tokens=10, stop=["\n"])
    assert composed == plain


def test_calm_that_adds_nothing_has_its_anchors_left_to_right_loss(parents):
    root, uri, anchor, _, held_out = parents
    folder, _ = _export(parents, "calm", bridge=False, name="calm-fresh-l2r")
    composed = run_left_to_right(
        folder, files=[held_out], seq_length=64, tracking_uri=uri, cache_dir=root / "cache-fresh"
    )
    plain = run_left_to_right(anchor, files=[held_out], seq_length=64)
    assert composed.metrics["tokens"] == plain.metrics["tokens"]
    assert composed.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-5)
    assert json.loads((folder / "composition.json").read_text())["parents"]["anchor"]["ref"] == "models:/anchor/1"


@pytest.mark.parametrize("length", [1, 2, 5, 40, 41, 42, 100, 301])
def test_codet5p_windows_count_every_token_after_the_encoders_context_once(length):
    ids = list(range(length))
    counted = []
    for chunk, context in windows(ids, seq_length=40, encoder_context=20):
        assert len(chunk) <= 41 and 1 <= context < len(chunk)
        counted += chunk[context:]
    first = 20 if length > 20 else max(1, (length - 1) // 2)
    assert counted == ids[first:]
    plain = [t for chunk, _ in windows(ids, seq_length=40, encoder_context=None) for t in chunk[1:]]
    assert len(plain) == max(0, length - 1)
