"""Where and in what precision a replica runs its model."""

from __future__ import annotations

import pytest
import torch

from serving import settings
from serving.settings import ServingSettings


@pytest.mark.parametrize(("native_bf16", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cpu_takes_bfloat16_only_where_the_cpu_has_it(monkeypatch, native_bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native_bf16)
    assert ServingSettings().device_and_dtype() == ("cpu", dtype)
    monkeypatch.setenv("MIDFILL_SERVE_DTYPE", "float32")
    assert ServingSettings().device_and_dtype() == ("cpu", "float32")
    monkeypatch.setenv("MIDFILL_SERVE_DTYPE", "bfloat16")
    assert ServingSettings().device_and_dtype() == ("cpu", "bfloat16")


@pytest.mark.parametrize(("native_bf16", "dtype"), [(True, "bfloat16"), (False, "float16")])
def test_auto_takes_the_replicas_gpu_in_its_native_half_precision(monkeypatch, native_bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # torch's default also says yes on GPUs that only emulate bfloat16 (T4, V100); the settings must not.
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation
    )
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: False)
    assert ServingSettings().device_and_dtype() == ("cuda", dtype)
    monkeypatch.setenv("MIDFILL_SERVE_DEVICE", "cpu")
    assert ServingSettings().device_and_dtype() == ("cpu", "float32")


def test_asking_for_cuda_without_a_gpu_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MIDFILL_SERVE_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="num_gpus"):
        ServingSettings().device_and_dtype()


def test_an_unknown_device_is_refused(monkeypatch):
    monkeypatch.setenv("MIDFILL_SERVE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="serve_device"):
        ServingSettings()
