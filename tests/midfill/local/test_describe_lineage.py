"""`midfill describe` shows the chain from data to endpoint of the version a resource trained."""

from __future__ import annotations

from pathlib import Path

from midfill.api import parse_resource
from midfill.local.state import StateStore


def test_describe_tr_shows_the_lineage_chain(cli, state_dir, tiny_run, tmp_path: Path) -> None:
    from midfill.api.trainingrun import RegisteredModelRef
    from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, Registry
    from midfill.settings import CoreSettings

    store = StateStore(state_dir)
    store.apply(parse_resource(tiny_run("keep")))
    registry = Registry(CoreSettings().resolved_tracking_uri())
    run = registry.client.create_run(registry.experiment_id("train"), run_name="keep-a2")
    registry.register(
        name="keep",
        source=str(tmp_path),
        run_uid="uid-keep",
        run_id=run.info.run_id,
        tags={TAG_RUN_NAME: "keep", TAG_ATTEMPT: "2", TAG_DATA_HASH: "feedface00c0ffee"},
    )

    def registered(rec) -> None:
        status = rec.status()
        status.registered_model = RegisteredModelRef(name="keep", version="1", uri="models:/keep/1")
        rec.set_status(status)

    store.update("TrainingRun", "keep", registered)
    described = cli("describe", "tr", "keep").output
    lineage = described.split("Lineage:")[1].split("Evaluation")[0]
    assert "keep (uid uid-keep, attempt 2)" in lineage and "feedface00c0ffee" in lineage
    assert run.info.run_id in lineage and "#/models/keep/versions/1" in lineage
    assert "x-midfill-model-version: keep/1" in lineage
