"""The reference every decode path must reproduce: sequential transformers `generate`, greedy."""

from __future__ import annotations

import torch


def greedy_reference(model, engine, ids: list[int], n: int) -> list[int]:
    """Up to `n` tokens after `ids`, stop tokens trimmed, as the engine reports a finished request.
    Runs where the model's weights are (a GPU test's model on the GPU)."""
    device = next(model.parameters()).device
    out = model.generate(
        torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=sorted(engine.stop_token_ids),
        pad_token_id=engine.tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    while out and out[-1] in engine.stop_token_ids:
        out.pop()
    return out
