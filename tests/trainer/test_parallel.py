"""trainer/parallel.py: activation checkpointing keeps the loss and gradients and holds less memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.parallel import checkpoint_activations


def _held_after_forward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """(loss, bytes the forward left allocated for the backward, a gradient): the CPU allocator's
    own record (torch.profiler's memory events), summed over the forward pass."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return loss.item(), held, model.model.layers[0].mlp.down_proj.weight.grad.clone()


def test_full_and_selective_keep_the_loss_and_hold_less_activation_memory():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    base = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 512, (4, 256))
    results = {}
    for mode in ("none", "full", "selective"):
        model = copy.deepcopy(base)
        checkpoint_activations(model, mode)
        results[mode] = _held_after_forward(model, ids)
    loss, held, grad = results["none"]
    for mode in ("full", "selective"):
        assert results[mode][0] == pytest.approx(loss, rel=1e-6)
        assert torch.allclose(results[mode][2], grad, atol=1e-6)
    # full keeps only each block's input; selective also its matmul outputs; none everything
    assert results["full"][1] < results["selective"][1] < 0.8 * held
    assert results["full"][1] < 0.3 * held


def test_an_unknown_mode_names_the_field():
    with pytest.raises(ValueError, match="training.activationCheckpointing"):
        checkpoint_activations(torch.nn.Linear(2, 2), "half")
