"""The TrainingRun custom resource: "train this recipe on this data with these GPUs".

The spec's parts live beside it and are importable from here too: what is trained
(midfill.api.trainingrun_model), what it learns from (midfill.api.trainingrun_data) and the status
(midfill.api.trainingrun_status). This module holds how it trains (optimisation, parallelism,
scheduling, failures, checkpoints, registration, evaluation) and the resource itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from midfill.api.common import API_VERSION, ApiModel, NodePool, ObjectMeta, ResourceRequirements
from midfill.api.pods import PodTemplate
from midfill.api.trainingrun_data import (
    CausalLMObjective,
    DataSource,
    DataSpec,
    FimObjective,
    ObjectiveSpec,
    SpanCorruptionObjective,
)
from midfill.api.trainingrun_model import (
    MODELS_URI,
    RECIPE_NAMES,
    Architecture,
    CompositionSpec,
    ModelSpec,
    TokenizerSpec,
)
from midfill.api.trainingrun_status import (
    AttemptRecord,
    CheckpointRef,
    Progress,
    RegisteredModelRef,
    TrainingRunPhase,
    TrainingRunStatus,
)

__all__ = [
    "DEFAULT_TRAINER_IMAGE",
    "EXIT_CODE_INVALID_CONFIG",
    "MODELS_URI",
    "RECIPE_NAMES",
    "Architecture",
    "AttemptRecord",
    "CausalLMObjective",
    "CheckpointRef",
    "CheckpointSpec",
    "CompositionSpec",
    "DataSource",
    "DataSpec",
    "EvaluationSpec",
    "FailurePolicy",
    "FimObjective",
    "ModelSpec",
    "ObjectiveSpec",
    "ParallelismSpec",
    "Progress",
    "RegisteredModelRef",
    "RegistrySpec",
    "SchedulingSpec",
    "SpanCorruptionObjective",
    "TokenizerSpec",
    "TrainingRun",
    "TrainingRunPhase",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "TrainingSpec",
]

# Exit code the trainer uses for a configuration it cannot run (sysexits EX_CONFIG): retrying it
# cannot help, so it is non-retryable by default.
EXIT_CODE_INVALID_CONFIG = 78


class TrainingSpec(ApiModel):
    """Optimisation: sequence length, batch, length of training, schedule, precision."""

    seq_length: int = Field(default=512, ge=16, le=131072, description="Tokens per packed sequence. Default 512.")
    global_batch_tokens: int = Field(
        default=16384,
        ge=16,
        description="Tokens per optimizer step over all processes; reached with gradient accumulation. "
        "Must be a multiple of seqLength. Default 16384.",
    )
    micro_batch_size: int = Field(default=8, ge=1, description="Sequences per process per forward pass. Default 8.")
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps to train (set steps or tokens).")
    tokens: int | None = Field(default=None, ge=1, description="Tokens to train on (set steps or tokens).")
    time_budget_minutes: float | None = Field(
        default=None,
        gt=0,
        le=10080,
        description="Train for at most this many minutes (the training loop's wall time, compile warm-up, "
        "evaluations and checkpoints included): after 10 timed steps, and at every log interval, the step "
        "count (at most steps or tokens) is fitted to the time left and the LR schedule follows it; a run "
        "out of time at a log interval stops there. For a recipe that must end in time on any machine "
        "(the demo). Default: no budget.",
    )
    learning_rate: float = Field(default=3e-4, gt=0, le=1, description="Peak learning rate. Default 3e-4.")
    min_learning_rate_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Final LR as a share of the peak (cosine floor). Default 0.1."
    )
    warmup_steps: int = Field(default=100, ge=0, description="Linear warmup steps. Default 100.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="LR decay after warmup. Default cosine."
    )
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay. Default 0.1.")
    grad_clip: float = Field(default=1.0, ge=0, description="Clip the global grad norm to this (0 = off). Default 1.0.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="auto = bf16 autocast where the hardware supports it (GPUs from Ampere on, CPUs with avx512_bf16), "
        "else fp32. Default auto.",
    )
    seed: int = Field(default=1234, description="Seed for weights, data order and masking. Default 1234.")
    log_interval_steps: int = Field(default=10, ge=1, description="Steps between metric logs. Default 10.")
    eval_interval_steps: int = Field(default=200, ge=1, description="Steps between validation runs. Default 200.")
    eval_batches: int = Field(default=8, ge=1, description="Micro-batches per validation run. Default 8.")
    compile: bool | Literal["auto"] = Field(
        default="auto",
        description="torch.compile the model: auto = on CUDA GPUs, off on CPUs (where compiling the "
        "model rarely pays for its warm-up); true or false to force it. Default auto.",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none",
        description="Recompute activations in the backward pass to save memory: none; full = every "
        "decoder block keeps only its input; selective = every block keeps its matmul outputs and "
        "recomputes the cheap ops (norms, activations, elementwise). Default none.",
    )
    peak_tflops: float | None = Field(
        default=None,
        gt=0,
        description="Peak dense TFLOP/s of one device at the training precision, for MFU. Default: from "
        "the device's name (docs/trainer.md lists them); MFU is not reported where it is unknown (CPUs).",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_value(cls, value: object) -> object:
        if isinstance(value, bool) or value == "auto":
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{value!r} is not allowed; use auto (on for CUDA GPUs, off on CPUs), true or false")

    def compile_on(self, device_type: str) -> bool:
        """Whether the model is compiled on this device type ('cuda', 'cpu')."""
        return device_type == "cuda" if self.compile == "auto" else bool(self.compile)

    @model_validator(mode="after")
    def _length_and_batch(self) -> TrainingSpec:
        if self.steps is None and self.tokens is None:
            raise ValueError("steps: set steps or tokens to say how long to train")
        if self.steps is not None and self.tokens is not None:
            raise ValueError(f"tokens: set only one of steps ({self.steps}) and tokens ({self.tokens})")
        if self.global_batch_tokens % self.seq_length:
            raise ValueError(
                f"globalBatchTokens: {self.global_batch_tokens} must be a multiple of seqLength "
                f"({self.seq_length}), e.g. {max(1, self.global_batch_tokens // self.seq_length) * self.seq_length}"
            )
        return self

    def total_steps(self) -> int:
        """Optimizer steps this run takes."""
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None
        return max(1, -(-self.tokens // self.global_batch_tokens))


class ParallelismSpec(ApiModel):
    """How many nodes and processes, and how the model is split."""

    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="ddp (replicate) or fsdp (FSDP2 fully_shard, for large models). Default ddp."
    )
    num_nodes: int = Field(default=1, ge=1, le=4096, description="Nodes (pods) in the gang. Default 1.")
    nproc_per_node: int = Field(default=1, ge=1, le=64, description="Processes per node, one per GPU. Default 1.")

    def world_size(self) -> int:
        """Total training processes."""
        return self.num_nodes * self.nproc_per_node


class SchedulingSpec(ApiModel):
    """Queueing and start-up behaviour on the cluster."""

    queue_name: str | None = Field(
        default=None,
        description="Kueue LocalQueue; the Job is created suspended and admitted as a gang. Default: none.",
    )
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the pods. Default: none.")
    startup_timeout_seconds: int = Field(
        default=900,
        ge=30,
        description="An attempt whose pods are not all ready by then is deleted (freeing the GPUs) and "
        "counted as a failure. Default 900.",
    )


class FailurePolicy(ApiModel):
    """What to do when an attempt fails."""

    max_restarts: int = Field(
        default=3,
        ge=0,
        description="Failed attempts to retry; each restart resumes the gang from the latest checkpoint. Default 3.",
    )
    non_retryable_exit_codes: list[int] = Field(
        default_factory=lambda: [EXIT_CODE_INVALID_CONFIG],
        description=f"Trainer exit codes that fail the run at once (default [{EXIT_CODE_INVALID_CONFIG}]: "
        "invalid config).",
    )


class CheckpointSpec(ApiModel):
    """Sharded, atomic, resumable checkpoints."""

    uri: str | None = Field(
        default=None,
        description="Where checkpoints go: a local/shared path or fsspec URI. Default: the state dir "
        "locally, /checkpoints/<run> (a volume) on a cluster.",
    )
    interval_steps: int = Field(default=100, ge=1, description="Steps between checkpoints. Default 100.")
    keep_last: int = Field(default=3, ge=1, description="Checkpoints kept; older ones are deleted. Default 3.")
    resume: str = Field(
        default="latest",
        description="latest (newest complete checkpoint if any), none (start over), or the URI of a "
        "specific checkpoint. Default latest.",
    )


class RegistrySpec(ApiModel):
    """Where the exported model is registered."""

    registered_model_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="MLflow registered model name. Default: the TrainingRun's name.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the model version. Default: none.")
    experiment_name: str = Field(
        default="midfill", min_length=1, description="MLflow experiment for the run's metrics. Default midfill."
    )


class EvaluationSpec(ApiModel):
    """A quick evaluation the trainer runs on the registered version (results go on the version)."""

    suites: list[Literal["humaneval-single-line", "humaneval-multi-line", "line-em", "left-to-right"]] = Field(
        default_factory=list, description="Suites to run after registration, e.g. [line-em]. Default: none."
    )
    limit: int = Field(default=50, ge=1, description="Tasks per suite (spread over the suite). Default 50.")
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Longest middle generated. Default 64.")


DEFAULT_TRAINER_IMAGE = "ghcr.io/midfill/trainer:0.1.0"


class TrainingRunSpec(ApiModel):
    """Desired state of a TrainingRun."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="Model recipe and initial weights.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer to train or load.")
    data: DataSpec = Field(description="Training data sources.")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="Training mixture.")
    training: TrainingSpec = Field(description="Optimisation settings.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Nodes, processes, strategy.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Resources per node (pod), incl. nvidia.com/gpu."
    )
    node_pool: NodePool = Field(default_factory=NodePool, description="Node selector, tolerations, affinity.")
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate,
        description="Added to every trainer pod: service account, env/envFrom (e.g. S3 credentials from a Secret), "
        "imagePullSecrets, volumes and mounts, labels/annotations, securityContext.",
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="Kueue queue, priority, start-up timeout."
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy, description="Restarts and non-retryable exit codes."
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint location and cadence.")
    registry: RegistrySpec = Field(default_factory=RegistrySpec, description="MLflow registration.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Quick evaluation after registration."
    )
    image: str = Field(
        default=DEFAULT_TRAINER_IMAGE, min_length=1, description=f"Trainer image. Default {DEFAULT_TRAINER_IMAGE}."
    )
    suspend: bool = Field(
        default=False, description="true stops the active attempt (keeping checkpoints); false resumes. Default false."
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Wall-clock limit for the whole run; past it the run fails (DeadlineExceeded). Default: none.",
    )

    @model_validator(mode="after")
    def _cross_fields(self) -> TrainingRunSpec:
        gpus = self.resources.gpus()
        if gpus and gpus != self.parallelism.nproc_per_node:
            raise ValueError(
                f"parallelism.nprocPerNode: {self.parallelism.nproc_per_node} must equal "
                f"resources.limits['nvidia.com/gpu'] ({gpus}): torchrun starts one process per GPU"
            )
        arch_ctx = self.model.architecture.max_position_embeddings
        if arch_ctx is not None and arch_ctx < self.training.seq_length:
            raise ValueError(
                f"model.architecture.maxPositionEmbeddings: {arch_ctx} is below training.seqLength "
                f"({self.training.seq_length}); raise it or shorten the sequences"
            )
        if self.model.attention in ("flash_attention_2", "flex_attention") and not gpus:
            raise ValueError(
                f"model.attention: {self.model.attention} needs resources.limits['nvidia.com/gpu'] (none set); "
                "use attention: auto to fall back to sdpa on CPUs"
            )
        if self.model.composition is not None and self.training.activation_checkpointing != "none":
            raise ValueError(
                "training.activationCheckpointing: composed models (model.composition) train without it "
                "(their parents are mostly frozen); set it to none"
            )
        if self.model.attention == "flash_attention_2" and self.training.precision == "fp32":
            raise ValueError(
                "training.precision: fp32 cannot run model.attention flash_attention_2 (FlashAttention computes "
                "in bf16/fp16 only); use precision bf16 or auto, or attention sdpa"
            )
        span = self.objective.span_corruption
        if span.weight > 0 and span.max_spans > self.tokenizer.num_mask_tokens:
            raise ValueError(
                f"objective.spanCorruption.maxSpans: {span.max_spans} needs that many <mask_N> tokens; "
                f"raise tokenizer.numMaskTokens (now {self.tokenizer.num_mask_tokens})"
            )
        return self


class TrainingRun(ApiModel):
    """A TrainingRun resource (midfill.dev/v1alpha1)."""

    api_version: Literal["midfill.dev/v1alpha1"] = Field(default=API_VERSION, description="midfill.dev/v1alpha1")
    kind: Literal["TrainingRun"] = Field(default="TrainingRun", description="TrainingRun")
    metadata: ObjectMeta
    spec: TrainingRunSpec
    status: TrainingRunStatus | None = None

    def registered_model_name(self) -> str:
        """The MLflow registered model name (spec.registry or the run's name)."""
        return self.spec.registry.registered_model_name or self.metadata.name
