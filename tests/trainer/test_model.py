from __future__ import annotations

import importlib.util

import pytest
import torch

from trainer.model import attention_implementation


@pytest.fixture
def flash_available(monkeypatch):
    """What a GPU node of the trainer image reports: CUDA, and flash-attn installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else find_spec(name, *a)
    )


def test_auto_takes_flash_attention_only_for_a_bf16_run(flash_available):
    # flash-attn computes in bf16/fp16 only: an fp32 run (no autocast) would hand it fp32 inputs.
    assert attention_implementation("auto", bf16=True) == "flash_attention_2"
    assert attention_implementation("auto", bf16=False) == "sdpa"
    assert attention_implementation("sdpa", bf16=False) == "sdpa"
    with pytest.raises(ValueError, match="model.attention: flash_attention_2 computes in bf16 only"):
        attention_implementation("flash_attention_2", bf16=False)
    assert attention_implementation("flash_attention_2", bf16=True) == "flash_attention_2"
