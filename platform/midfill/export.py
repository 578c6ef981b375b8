"""The exported-model contract between the trainer (writes it) and serving (reads it).

An export is a folder: Hugging Face safetensors weights + config, the tokenizer files, and
`midfill.json` (this model) saying how to prompt the model for infilling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from midfill.fim import FORMATS

METADATA_FILE = "midfill.json"
FORMAT_VERSION: Final = 1


class TrainingRunRef(BaseModel):
    """Which TrainingRun attempt produced the export."""

    name: str
    uid: str
    attempt: int


class ExportMetadata(BaseModel):
    """Contents of midfill.json."""

    model_config = ConfigDict(extra="allow")

    format_version: Literal[1] = FORMAT_VERSION
    fim_format: str = Field(description="codegen2 or starcoder (see midfill.fim).")
    sentinels: dict[str, str] = Field(
        default_factory=dict, description="Role -> token, e.g. {eos: <|endoftext|>, sep: <sep>, eom: <eom>}."
    )
    stop_tokens: list[str] = Field(default_factory=list, description="Tokens that end an infill.")
    max_context: int = Field(ge=16, description="Longest prompt + completion in tokens.")
    recipe: str = Field(description="Recipe name the model was trained from.")
    training_run: TrainingRunRef | None = None
    data_hash: str | None = None
    step: int | None = None
    composition: dict[str, Any] | None = Field(
        default=None, description="For composed models: mode, parents (URIs) and bridge layout."
    )

    def check(self) -> ExportMetadata:
        """Raise ValueError if the export cannot be served."""
        if self.fim_format not in FORMATS:
            raise ValueError(f"{METADATA_FILE}: fim_format {self.fim_format!r} is not one of {', '.join(FORMATS)}")
        return self


def read_metadata(model_dir: str | Path) -> ExportMetadata:
    """Load and check `midfill.json` from an export folder."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a midfill export")
    return ExportMetadata.model_validate_json(path.read_text()).check()


def write_metadata(model_dir: str | Path, meta: ExportMetadata) -> Path:
    """Write `midfill.json` into an export folder."""
    path = Path(model_dir) / METADATA_FILE
    path.write_text(meta.model_dump_json(indent=2, exclude_none=True) + "\n")
    return path
