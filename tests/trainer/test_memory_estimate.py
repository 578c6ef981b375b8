"""The activation term of midfill/memory.py against what a real decoder block saves for its backward
(transformers' Llama block with sdpa, the trainer's model), counted with saved-tensor hooks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from midfill.memory import activation_bytes_per_token
from midfill.recipes import Recipe


def saved_bytes(recipe: Recipe, *, autocast: bool, batch: int, seq: int) -> int:
    cfg = LlamaConfig(
        hidden_size=recipe.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        intermediate_size=recipe.intermediate_size,
        vocab_size=512,
        max_position_embeddings=seq,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    if not autocast:
        model = model.to(torch.bfloat16)  # FSDP2's mixed precision computes in bf16 weights
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # a weight (or a view of one) is not an activation
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    hidden = model.model.embed_tokens(torch.randint(0, 512, (batch, seq))).detach().requires_grad_()
    positions = torch.arange(seq)[None]
    rotary = model.model.rotary_emb(hidden, positions)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model.model.layers[0](hidden, position_embeddings=rotary, position_ids=positions, attention_mask=None)
    return sum(kept.values())


def saved_bytes_per_token(recipe: Recipe, *, autocast: bool) -> float:
    """The growth per token: what scales with the batch, not the bf16 weight copies autocast keeps
    (the estimate's working-weights term)."""
    small, large = (saved_bytes(recipe, autocast=autocast, batch=2, seq=seq) for seq in (128, 256))
    return (large - small) / (2 * 128)


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe("mha", 256, 1, 4, 4, 704, 256),
        Recipe("gqa", 256, 1, 8, 2, 704, 256),
        Recipe("wide-mlp", 128, 1, 2, 2, 1024, 256),
    ],
    ids=lambda r: r.name,
)
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-autocast"])
def test_the_estimate_matches_what_a_block_saves(recipe, autocast):
    measured = saved_bytes_per_token(recipe, autocast=autocast)
    assert activation_bytes_per_token(recipe, "none", fp32_residual=autocast) == pytest.approx(measured, rel=0.1)
