"""The TrainingRun custom resource: "train this recipe on this data with these GPUs"."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from midfill.api.common import (
    API_VERSION,
    ApiModel,
    Condition,
    NodePool,
    ObjectMeta,
    ResourceRequirements,
)
from midfill.api.pods import PodTemplate

# Model sizes the trainer knows (trainer/recipes.py defines each; a test keeps the two in step).
RECIPE_NAMES = ("debug", "125m", "350m", "1b", "3.7b", "7b")
# Exit code the trainer uses for a configuration it cannot run (sysexits EX_CONFIG): retrying it
# cannot help, so it is non-retryable by default.
EXIT_CODE_INVALID_CONFIG = 78
MODELS_URI = re.compile(r"^models:/[^/@]+(/\d+|@[\w.-]+)$")


class Architecture(ApiModel):
    """Overrides of the recipe's geometry (Llama-style decoder). Unset fields keep the recipe's value."""

    hidden_size: int | None = Field(default=None, ge=8, description="Model width (d_model).")
    num_layers: int | None = Field(default=None, ge=1, description="Number of decoder layers.")
    num_heads: int | None = Field(default=None, ge=1, description="Attention heads.")
    num_kv_heads: int | None = Field(default=None, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int | None = Field(default=None, ge=8, description="MLP inner width.")
    max_position_embeddings: int | None = Field(
        default=None, ge=16, description="Longest context the model supports (>= training.seqLength)."
    )
    rope_theta: float | None = Field(default=None, gt=0, description="RoPE base frequency.")

    @model_validator(mode="after")
    def _heads_divide(self) -> Architecture:
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            raise ValueError(f"hiddenSize: {self.hidden_size} must be divisible by numHeads ({self.num_heads})")
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"numKvHeads: numHeads ({self.num_heads}) must be divisible by it ({self.num_kv_heads})")
        return self


class CompositionSpec(ApiModel):
    """Compose two frozen models through a trainable bridge (docs/research.md sections 4 and 5).

    calm: anchor and augmenting model both frozen; cross-attention from anchor layer states to
    projected augmenting layer states at evenly spaced layer pairs (Bansal et al., 2024).
    codet5p: the augmenting model runs as a bidirectional encoder; cross-attention is added to the
    top decoder layers of the frozen anchor (Wang et al., 2023).
    """

    mode: Literal["calm", "codet5p"] = Field(description="calm or codet5p.")
    anchor: str = Field(
        min_length=1,
        description="The large frozen model: a recipe name, an export path/URI, or models:/<name>/<version|@alias>.",
    )
    augment: str = Field(
        min_length=1,
        description="The small model (augmenting model or encoder): recipe name, export path/URI or models:/ URI.",
    )
    num_heads: int | None = Field(
        default=None, ge=1, description="Heads of each bridge cross-attention. Default: the anchor's head count."
    )
    layer_spacing: int = Field(
        default=4,
        ge=1,
        description="calm: compose every k-th augmenting layer with an evenly spaced anchor layer. Default 4.",
    )
    num_composition_layers: int | None = Field(
        default=None, ge=1, description="calm: number of layer pairs. Default: augmenting layers / layerSpacing."
    )
    cross_attention_layers: int = Field(
        default=1,
        ge=1,
        description="codet5p: how many top anchor layers get cross-attention. Default 1 (as in CodeT5+).",
    )
    encoder_trainable: bool = Field(
        default=True, description="codet5p: train the encoder too (CodeT5+ does). Default true."
    )

    @model_validator(mode="after")
    def _uris(self) -> CompositionSpec:
        for name in ("anchor", "augment"):
            value = getattr(self, name)
            if value.startswith("models:") and not MODELS_URI.match(value):
                raise ValueError(
                    f"{name}: {value!r} is not a registry URI; use models:/<name>/<version> or models:/<name>@<alias>"
                )
        return self


class ModelSpec(ApiModel):
    """What to train."""

    recipe: Literal["debug", "125m", "350m", "1b", "3.7b", "7b"] = Field(
        default="debug",
        description="Named model size from trainer/recipes.py: debug (seconds per step on a CPU), "
        "125m, 350m, 1b, 3.7b, 7b (CodeGen2.5-like geometry). Default debug.",
    )
    architecture: Architecture = Field(
        default_factory=Architecture, description="Per-field overrides of the recipe's geometry."
    )
    init: str = Field(
        default="scratch",
        description="Initial weights: 'scratch' (random init), a local path or fsspec URI of an "
        "exported model, or a registry URI models:/<name>/<version> or models:/<name>@<alias>. "
        "Default scratch.",
    )
    attention: Literal["auto", "flash_attention_2", "flex_attention", "sdpa"] = Field(
        default="auto",
        description="Attention kernel: auto picks flash_attention_2 when CUDA and flash-attn are "
        "present and the run trains in bf16, else flex_attention on CUDA with objective.documentMask "
        "(a block mask of the documents), else sdpa. flex_attention trains on GPUs only. Default auto.",
    )
    composition: CompositionSpec | None = Field(
        default=None,
        description="Train only a bridge between two frozen models (calm or codet5p) instead of one "
        "model; recipe/architecture/init are then ignored. Default: none.",
    )

    @model_validator(mode="after")
    def _init_form(self) -> ModelSpec:
        if self.init.startswith("models:") and not MODELS_URI.match(self.init):
            raise ValueError(
                f"init: {self.init!r} is not a registry URI; use models:/<name>/<version> or models:/<name>@<alias>"
            )
        return self


class TokenizerSpec(ApiModel):
    """Tokenizer: train a byte-level BPE on the training data, or load one."""

    path: str | None = Field(
        default=None,
        description="Load a tokenizer (tokenizer.json or a Hugging Face folder) from this path/URI. "
        "Default: train one on the training data.",
    )
    vocab_size: int = Field(
        default=8192, ge=512, le=262144, description="BPE vocabulary size when training. Default 8192."
    )
    num_mask_tokens: int = Field(
        default=8, ge=1, le=64, description="How many <mask_N> sentinels (N = 1..this) to reserve. Default 8."
    )
    train_bytes: int = Field(
        default=32_000_000, ge=1_000_000, description="Bytes of training text the BPE learns from. Default 32 MB."
    )


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


TrainingRunPhase = Literal["Pending", "Queued", "Starting", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class CheckpointRef(ApiModel):
    """The newest complete checkpoint."""

    uri: str = Field(description="Where it is.")
    step: int = Field(description="Optimizer step it holds.")
    time: str | None = Field(default=None, description="When it was written (RFC 3339).")


class Progress(ApiModel):
    """Latest training progress reported by rank 0."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Steps planned.")
    loss: float | None = Field(default=None, description="Latest training loss (nats/token).")
    tokens_per_second: float | None = Field(default=None, description="Training throughput over all processes.")
    tokens_per_second_per_device: float | None = Field(
        default=None, description="Training throughput of one process (GPU)."
    )
    mfu: float | None = Field(
        default=None, description="Model FLOPs utilisation, 0-1 (docs/trainer.md); unset where the peak is unknown."
    )
    update_time: str | None = Field(default=None, description="When this was reported (RFC 3339).")


class AttemptRecord(ApiModel):
    """One attempt of the run, kept after its Job and ConfigMap are cleaned up: where its logs are."""

    attempt: int = Field(description="Attempt number (1-based).")
    job_name: str = Field(description="The Job (locally: the torchx app) that ran it, <run>-a<N>.")
    mlflow_run_id: str | None = Field(default=None, description="The MLflow run it logged to (metrics, logs).")
    outcome: Literal["Succeeded", "Failed", "Killed"] | None = Field(
        default=None, description="How it ended: Succeeded, Failed, or Killed (superseded, suspended, deleted)."
    )
    reason: str | None = Field(default=None, description="Why it ended (the reason of the run's condition).")


class RegisteredModelRef(ApiModel):
    """The model version this run registered."""

    name: str = Field(description="Registered model name.")
    version: str = Field(description="Model version.")
    uri: str = Field(description="models:/<name>/<version>")


class TrainingRunStatus(ApiModel):
    """Observed state of a TrainingRun (written by the operator or the local backend)."""

    phase: TrainingRunPhase = Field(
        default="Pending", description="Pending, Queued, Starting, Running, Restarting, Suspended, Succeeded or Failed."
    )
    message: str | None = Field(default=None, description="One line on what is happening or went wrong.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Queued, PodsReady, Running, Restarting, Succeeded, Failed, ModelRegistered.",
    )
    attempt: int = Field(default=0, description="Current attempt (1-based; 0 before the first).")
    restart_count: int = Field(default=0, description="Failed attempts restarted so far.")
    active_job_name: str | None = Field(default=None, description="The Job running the current attempt.")
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the run succeeded or failed.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="Newest complete checkpoint.")
    progress: Progress | None = Field(default=None, description="Step, loss, throughput.")
    registered_model: RegisteredModelRef | None = Field(default=None, description="The registered model version.")
    attempts: list[AttemptRecord] = Field(
        default_factory=list,
        description="Every attempt, oldest first, with its Job name and MLflow run (kept after old Jobs are deleted).",
    )
    observed_generation: int | None = Field(default=None, description="The spec generation this status reflects.")


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
