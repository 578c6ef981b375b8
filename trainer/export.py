"""The end of a run: export the model folder, log it to MLflow, register it once, write result.json.

Retry-safe as a whole: if the TrainingRun uid already has a registered version, nothing is
exported or registered again (only result.json is rewritten); otherwise the export folder is
rebuilt atomically, re-uploaded over the same artifact path and registered, and
`Registry.register` finds a version an earlier, interrupted try created.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from midfill import fim, model_card
from midfill.api import TrainingRun
from midfill.export import ExportMetadata, TrainingRunRef, read_metadata, write_metadata
from midfill.progress import RESULT_FILE, TrainingResult, write_json_atomic
from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, Registry, VersionInfo
from trainer.tracking import Tracker

ARTIFACT_PATH = "model"


def metadata(
    run: TrainingRun, *, uid: str, attempt: int, data_hash: str, step: int, max_context: int, num_mask_tokens: int
) -> ExportMetadata:
    """midfill.json for this run: how serving must prompt the model."""
    name = run.spec.objective.infill_format() or "codegen2"
    fmt = fim.get_format(name)
    sentinels = {"eos": fim.EOS, "pad": fim.PAD}
    if name == "codegen2":
        sentinels |= {
            "sep": fim.SEP,
            "eom": fim.EOM,
            **{f"mask_{i}": fim.mask_token(i) for i in range(1, num_mask_tokens + 1)},
        }
    else:
        sentinels |= {"fim_prefix": fim.FIM_PREFIX, "fim_suffix": fim.FIM_SUFFIX, "fim_middle": fim.FIM_MIDDLE}
    return ExportMetadata(
        fim_format=name,
        sentinels=sentinels,
        stop_tokens=list(fmt.stop_tokens),
        max_context=max_context,
        recipe=run.spec.model.recipe,
        training_run=TrainingRunRef(name=run.metadata.name, uid=uid, attempt=attempt),
        data_hash=data_hash,
        step=step,
    ).check()


def write_export(
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor],
    tok: PreTrainedTokenizerFast,
    meta: ExportMetadata,
    out_dir: Path,
) -> Path:
    """Safetensors + config + tokenizer + midfill.json, written to a temp folder then moved into place."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tok.save_pretrained(tmp)
    write_metadata(tmp, meta)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def register(
    run: TrainingRun,
    *,
    registry: Registry,
    tracker: Tracker,
    export: Callable[[], Path],
    uid: str,
    attempt: int,
    data_hash: str,
    run_dir: Path,
    kill_after_register: bool = False,
) -> TrainingResult:
    """Register the export once per uid and write result.json; `export()` writes the folder on demand."""
    name = run.registered_model_name()
    info: VersionInfo | None = registry.find_by_run_uid(name, uid)
    export_dir: Path | None = None
    if info is None:
        export_dir = export()
        model_card.write_mlmodel(export_dir, read_metadata(export_dir))  # the UI's Schema and artifact views
        source = tracker.log_artifacts(str(export_dir), ARTIFACT_PATH)
        assert source is not None
        tags = {
            **run.spec.registry.tags,
            TAG_RUN_NAME: run.metadata.name,
            TAG_ATTEMPT: str(attempt),
            TAG_DATA_HASH: data_hash,
        }
        info, _ = registry.register(name=name, source=source, run_uid=uid, run_id=tracker.run_id, tags=tags)
        if kill_after_register:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: crash between registration and result.json
    # Every try (re)writes the card from the registry, so a crash after registering still gets one.
    model_card.refresh(registry, info.name, info.version)
    result = TrainingResult(
        registered_model_name=info.name,
        version=info.version,
        uri=info.uri,
        export_uri=info.source,
        mlflow_run_id=info.run_id or tracker.run_id,
    )
    write_json_atomic(run_dir / RESULT_FILE, result)
    return result
