"""midfill/composition/bridge.py: the cross-attention masks and the zero-initialised blocks."""

from __future__ import annotations

import pytest
import torch

from midfill.composition.bridge import CalmBridge, CrossAttention, causal_cross_mask, padding_cross_mask


def test_causal_cross_mask_is_position_aligned_with_a_past():
    # 2 new queries at absolute positions 3 and 4 over 5 keys.
    mask = causal_cross_mask(query_length=2, key_length=5, key_padding=None, device=torch.device("cpu"))
    assert mask.shape == (1, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_causal_cross_mask_hides_padding_but_never_a_whole_row():
    padding = torch.tensor([[0, 0, 1, 1]])  # left padded
    mask = causal_cross_mask(query_length=4, key_length=4, key_padding=padding, device=torch.device("cpu"))
    assert mask[0, 0].tolist() == [
        [True, False, False, False],  # a pad query sees only itself (its output is unused)
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]


def test_padding_cross_mask_rejects_an_all_padding_row():
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        padding_cross_mask(torch.tensor([[1, 1], [0, 0]]), batch=2, key_length=2, device=torch.device("cpu"))


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="numHeads"):
        CrossAttention(48, 5)


def test_a_fresh_bridge_adds_zero():
    bridge = CalmBridge(16, 32, 4)
    x, a = torch.randn(2, 5, 32), torch.randn(2, 5, 16)  # (B, T, D_B), (B, T, D_A)
    k, v = bridge.keys_values(a)
    assert k.shape == (2, 4, 5, 8)
    mask = causal_cross_mask(query_length=5, key_length=5, key_padding=None, device=x.device)
    assert torch.equal(bridge(x, k, v, mask), x)
