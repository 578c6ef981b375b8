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


def test_auto_takes_flex_attention_for_document_masks_on_a_gpu_without_flash_attn(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else find_spec(name, *a)
    )
    assert attention_implementation("auto", bf16=True, document_mask=True) == "flex_attention"
    assert attention_implementation("auto", bf16=True, document_mask=False) == "sdpa"


def test_flex_attention_is_refused_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_implementation("auto", bf16=True, document_mask=True) == "sdpa"  # no flex backward on CPUs
    with pytest.raises(ValueError, match="model.attention: flex_attention trains on CUDA GPUs only"):
        attention_implementation("flex_attention", bf16=True)
