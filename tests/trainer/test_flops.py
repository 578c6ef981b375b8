"""trainer/flops.py: FLOPs per token (the documented formula) and the device peak table."""

from __future__ import annotations

import pytest
import torch

from midfill.api.trainingrun import ModelSpec
from trainer.flops import flops_per_token, mfu, peak_for_name, peak_tflops
from trainer.model import build_model
from trainer.recipes import get_recipe


def test_the_1b_recipe_reproduces_the_mfu_the_issue_measured():
    """Issue 19's table: the 1b recipe at seq 2048 made 57,821 tokens/s = 35.9% of an H200's 989 TF."""
    model, _ = build_model(
        ModelSpec(), get_recipe("1b"), init_dir=None, vocab_size=32000, eos_id=0, pad_id=1, seed=1, on_meta=True
    )
    per_token = flops_per_token(model, seq_length=2048)
    # 6 x (16 layers x 51.4M matrix weights + the 65.5M output head) + 12 x 16 x 2048 x 2048
    assert per_token == 6 * (16 * (4 * 2048 * 2048 + 3 * 2048 * 5632) + 32000 * 2048) + 12 * 16 * 2048 * 2048
    assert mfu(57_821, per_token, peak_for_name("NVIDIA H200")) == pytest.approx(0.359, abs=0.001)


def test_tied_embeddings_count_once_as_the_output_head():
    model, _ = build_model(
        ModelSpec(), get_recipe("debug"), init_dir=None, vocab_size=512, eos_id=0, pad_id=1, seed=1, on_meta=True
    )
    layers = 4 * (4 * 256 * 256 + 3 * 256 * 688)
    assert flops_per_token(model, seq_length=512) == 6 * (layers + 512 * 256) + 12 * 4 * 256 * 512


def test_the_peak_comes_from_the_device_name_or_the_override():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("NVIDIA L4") == 121.0 and peak_for_name("NVIDIA L40S") == 362.0
    assert peak_for_name("Some New GPU") is None
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, bf16=True) is None  # CPUs: MFU n/a rather than made up
    assert peak_tflops(cpu, bf16=False, override=2.5) == 2.5
    assert mfu(1000.0, 1e9, None) is None
