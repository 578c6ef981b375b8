from __future__ import annotations

import torch

from trainer.checkpoint import MARKER, CheckpointManager
from trainer.parallel import Dist


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_save_load_round_trip_and_keep_last(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ck"), keep_last=2, d=Dist())
    model, opt = _model_and_opt(0)
    for step in (10, 20, 30):
        mgr.save(step, model=model, optimizer=opt, extra={"step": step, "note": "x"}, rank_state={"pos": step})
    assert [c.step for c in mgr.complete()] == [20, 30]
    other, other_opt = _model_and_opt(1)
    extra, rank_state = mgr.load(mgr.latest(), model=other, optimizer=other_opt, extra={"step": 0, "note": ""})
    assert extra == {"step": 30, "note": "x"} and rank_state == {"pos": 30}
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])


def test_torn_and_temporary_checkpoints_are_skipped(tmp_path):
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), keep_last=3, d=Dist())
    model, opt = _model_and_opt(0)
    mgr.save(10, model=model, optimizer=opt, extra={"step": 10}, rank_state={})
    (root / "step-00000020").mkdir()  # renamed but never marked: torn
    (root / "step-00000020" / "__0_0.distcp").write_bytes(b"garbage")
    (root / ".tmp-step-00000030").mkdir()  # crashed mid-write
    assert mgr.latest().step == 10
    assert (root / "step-00000010" / MARKER).exists()
    # the next save at a torn step replaces it and clears the leftovers
    mgr.save(20, model=model, optimizer=opt, extra={"step": 20}, rank_state={})
    assert [c.step for c in mgr.complete()] == [10, 20]
    assert not (root / ".tmp-step-00000030").exists()
