from __future__ import annotations

import pytest
import torch

from trainer.loop import IGNORE, collate, lr_factor
from trainer.objectives import Packed


def test_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, warmup=10, total=100, schedule="cosine", floor=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, warmup=0, total=100, schedule="constant", floor=0.1) == 1.0
    assert lr_factor(55, warmup=10, total=100, schedule="linear", floor=0.0) == pytest.approx(0.5)


def test_collate_ignores_padding_and_masks_documents():
    seq = Packed(ids=[5, 6, 7, 8, 9, 0], segments=[1, 1, 2, 2, 2, 0])
    b = collate([seq], pad_id=0, document_mask=True, device=torch.device("cpu"))
    assert b["labels"].tolist() == [[5, 6, 7, 8, 9, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0]]
    mask = b["attention_mask"][0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False]  # token 3 sees only its own document
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert "attention_mask" not in collate([seq], pad_id=0, document_mask=False, device=torch.device("cpu"))
