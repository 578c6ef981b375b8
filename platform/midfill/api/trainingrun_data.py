"""What a TrainingRun learns from: the data sources and the objective mixture (causal LM, CodeGen2
span corruption, StarCoder FIM). Part of the TrainingRun spec (midfill.api.trainingrun)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from midfill.api.common import ApiModel


class DataSource(ApiModel):
    """One input: files matched by a path, glob or fsspec URI."""

    uri: str = Field(
        min_length=1,
        description="A local path or glob (src/**/*.py), an fsspec URI (s3://bucket/code/*.py), or "
        "stdlib:// for the Python standard library sources (a real corpus on every machine).",
    )
    kind: Literal["code", "text"] = Field(default="code", description="code or text (natural language). Default code.")
    weight: float = Field(default=1.0, gt=0, description="Relative sampling weight among sources. Default 1.")
    include: list[str] = Field(
        default_factory=list, description="Filename globs to keep (e.g. ['*.py']). Default: all files."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Path globs to drop (e.g. ['*/tests/*']). Default: none."
    )


class DataSpec(ApiModel):
    """Training data."""

    sources: list[DataSource] = Field(min_length=1, description="At least one source.")
    validation_fraction: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="Share of files held out for validation, chosen by a hash of each file's path "
        "(deterministic across runs and ranks). Default 0.05.",
    )
    max_file_bytes: int = Field(
        default=1_000_000, ge=1, description="Skip files larger than this (generated or minified code). Default 1 MB."
    )


class CausalLMObjective(ApiModel):
    """Plain left-to-right language modelling."""

    weight: float = Field(default=0.5, ge=0, description="Share of sequences trained causally. Default 0.5.")


class SpanCorruptionObjective(ApiModel):
    """CodeGen2 within-file span corruption: <mask_i> in place, <sep>, then <mask_i> span <eom> each."""

    weight: float = Field(default=0.5, ge=0, description="Share of sequences span-corrupted. Default 0.5.")
    mask_ratio_min: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Low end of U(min, max) for the masked share of a file's tokens. Default 0.05.",
    )
    mask_ratio_max: float = Field(default=0.5, gt=0, lt=1, description="High end of the masked share. Default 0.5.")
    max_spans: int = Field(default=3, ge=1, description="Spans per file are drawn from U{1..maxSpans}. Default 3.")
    single_line_probability: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Chance a span is one line's code, from after its indentation to before its newline "
        "(the hole an editor asks for most; teaches a small model to end a line with <eom>). Default 0.5.",
    )

    @model_validator(mode="after")
    def _range(self) -> SpanCorruptionObjective:
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError(f"maskRatioMin: {self.mask_ratio_min} must be <= maskRatioMax ({self.mask_ratio_max})")
        return self


class FimObjective(ApiModel):
    """StarCoder-style fill-in-the-middle (<fim_prefix>/<fim_suffix>/<fim_middle>)."""

    weight: float = Field(default=0.0, ge=0, description="Share of sequences in FIM form. Default 0 (off).")
    spm_rate: float = Field(
        default=0.5, ge=0, le=1, description="Share of FIM examples in SPM order (rest PSM). Default 0.5."
    )


class ObjectiveSpec(ApiModel):
    """The training mixture; weights are normalised to sum to 1."""

    causal_lm: CausalLMObjective = Field(
        default_factory=CausalLMObjective, alias="causalLM", description="Causal LM share."
    )
    span_corruption: SpanCorruptionObjective = Field(
        default_factory=SpanCorruptionObjective, description="CodeGen2 span corruption share and knobs."
    )
    fim: FimObjective = Field(default_factory=FimObjective, description="StarCoder FIM share and knobs.")
    document_mask: bool = Field(
        default=False,
        description="Mask attention across document boundaries inside a packed sequence. Default false.",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> ObjectiveSpec:
        if self.causal_lm.weight + self.span_corruption.weight + self.fim.weight <= 0:
            raise ValueError(
                "causalLM.weight: the objective weights are all 0; give causalLM, spanCorruption or fim a "
                "positive weight"
            )
        return self

    def infill_format(self) -> str | None:
        """The infill format the trained model will speak ('codegen2', 'starcoder') or None."""
        if self.span_corruption.weight > 0:
            return "codegen2"
        if self.fim.weight > 0:
            return "starcoder"
        return None
