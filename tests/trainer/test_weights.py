"""trainer/weights.py: meta-device initialisation, materialised per shard, the same weights at every
world size; model.init read shard by shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from midfill.api.trainingrun import Architecture, ModelSpec
from trainer.model import build_model, is_on_meta
from trainer.recipes import get_recipe
from trainer.weights import host_rss_bytes, param_seed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _tiny(seed: int, *, on_meta: bool = False):
    recipe = get_recipe("debug").with_overrides(
        Architecture(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)
    )
    model, _ = build_model(
        ModelSpec(), recipe, init_dir=None, vocab_size=512, eos_id=0, pad_id=1, seed=seed, on_meta=on_meta
    )
    return model


def test_random_weights_are_a_function_of_the_seed_and_the_parameter_name():
    a, b, other = _tiny(5), _tiny(5), _tiny(6)
    for (name, pa), pb, po in zip(
        a.state_dict().items(), b.state_dict().values(), other.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, po), name
    q0, q1 = a.model.layers[0].self_attn.q_proj.weight, a.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(q0, q1)  # same shape, another name: another draw
    # transformers' Llama init: normal(0, 0.02), norms at one, the padding row zero, embeddings tied
    assert abs(float(q0.detach().std()) - a.config.initializer_range) < 0.003
    assert torch.equal(a.model.norm.weight, torch.ones(64))
    assert torch.equal(a.model.embed_tokens.weight[1], torch.zeros(64))
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert param_seed(5, "x") == param_seed(5, "x") != param_seed(5, "y")


def test_the_rope_frequencies_are_computed_again_after_materialising():
    from transformers import LlamaForCausalLM

    model = _tiny(5)
    fresh = LlamaForCausalLM(model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)


def test_a_7b_geometry_on_the_meta_device_takes_no_host_memory(capsys):
    """The issue's 7b case: only the rank's shards ever get storage, so building costs next to nothing."""
    recipe = get_recipe("7b").with_overrides(Architecture(num_layers=4))
    before = host_rss_bytes()
    model, _ = build_model(
        ModelSpec(), recipe, init_dir=None, vocab_size=32000, eos_id=0, pad_id=1, seed=1, on_meta=True
    )
    grown = host_rss_bytes() - before
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    with capsys.disabled():
        print(
            f"\n7b geometry, 4 layers on meta: {fp32_bytes / 1e9:.2f} GB of fp32 weights, "
            f"host RSS +{grown / 1e6:.1f} MB"
        )
    assert is_on_meta(model)
    assert fp32_bytes > 4e9
    assert grown < 200e6, f"building on the meta device took {grown / 1e6:.0f} MB of host memory"


@pytest.mark.timeout(240)
def test_fsdp2_meta_init_matches_todays_path_at_start_and_after_training(tmp_path):
    """2 gloo processes: today's path (whole model, DDP) and FSDP2 from the meta device, same seed,
    same batches: identical initial weights, the same weights when read from an export shard by
    shard, the same losses after 4 steps."""
    out = tmp_path / "report.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*cmd, str(HERE / "fsdp_meta_worker.py"), str(out), "4"], env=env, capture_output=True, text=True, timeout=220
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert report["initial_max_difference"] == 0.0
    assert report["init_max_difference"] == 0.0
    assert len(report["losses_today"]) == 4
    assert report["losses_meta_fsdp"] == pytest.approx(report["losses_today"], rel=1e-5)
    assert report["final_max_difference"] < 1e-5
