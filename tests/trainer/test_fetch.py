"""A model.init is fetched once per node; a fetch cut short is never reused; the other ranks wait."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from trainer.fetch import COMPLETE, fetch_once, is_complete
from trainer.parallel import Dist


def _export(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")


def test_a_fetch_cut_short_is_fetched_again_on_the_retry(tmp_path):
    dst = tmp_path / "init"

    def dies_after_the_config(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")  # what MLflow writes first
        raise ConnectionError("pod preempted")

    with pytest.raises(ConnectionError):
        fetch_once(dst, dies_after_the_config, Dist(), source="models:/m/1")
    assert not dst.exists()  # nothing half-written where the retry looks
    fetch_once(dst, _export, Dist(), source="models:/m/1")
    assert (dst / "model.safetensors").read_bytes() == b"weights" and is_complete(dst)


def test_an_unmarked_folder_from_before_is_replaced(tmp_path):
    dst = tmp_path / "init"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # an earlier version's cache, maybe cut short
    fetch_once(dst, _export, Dist(), source="models:/m/1")
    assert (dst / "model.safetensors").exists() and (dst / COMPLETE).read_text() == "models:/m/1\n"


def test_a_complete_folder_is_not_fetched_again(tmp_path):
    dst = tmp_path / "init"
    fetch_once(dst, _export, Dist(), source="s3://b/m")
    fetch_once(dst, lambda folder: pytest.fail("fetched twice"), Dist(), source="s3://b/m")


def test_other_local_ranks_wait_for_rank_0_without_fetching(tmp_path):
    dst = tmp_path / "init"
    got: list[Path] = []
    waiter = threading.Thread(
        target=lambda: got.append(
            fetch_once(
                dst,
                lambda f: pytest.fail("rank 1 fetched"),
                Dist(rank=1, local_rank=1, world_size=2),
                source="x",
                poll_s=0.01,
            )
        )
    )
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive() and not got  # still waiting: rank 0 has not fetched yet
    fetch_once(dst, _export, Dist(world_size=2), source="x")
    waiter.join(timeout=10)
    assert got == [dst]


def test_a_fetch_that_another_job_on_the_node_finished_first_is_dropped(tmp_path):
    dst = tmp_path / "init"

    def slower_than_the_other_job(folder: Path) -> None:
        _export(folder)
        _export(dst)  # the other job renamed its complete copy into place meanwhile
        (dst / COMPLETE).write_text("s3://b/m\n")

    assert fetch_once(dst, slower_than_the_other_job, Dist(), source="s3://b/m") == dst
    assert is_complete(dst) and not list(tmp_path.glob("init.partial-*"))
