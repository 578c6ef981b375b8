"""Memory a TrainingRun needs, estimated from its spec before anything starts (`midfill validate`).

Per GPU (one training process), in bytes, for N parameters sharded over S processes (S = the world
size with FSDP2, 1 with DDP), a micro-batch of b sequences of s tokens, width h, MLP width i, key/value
width k, vocabulary V and L decoder blocks:

    weights and gradients   4N/S + 4N/S        fp32 master weights and their gradients
    optimizer               8N/S               AdamW's two fp32 moments
    working weights         2N (DDP) or 4N/L   bf16 copies autocast keeps (DDP), or the two gathered
                                               blocks FSDP2 holds at once (the current one, the prefetched)
    activations             L * b*s * a        a = bytes kept per token and block (below)
    logits                  10 * b*s*V         bf16 logits, their fp32 copy for the loss, its gradient
                                               (12 in fp32: logits, softmax, gradient)
    runtime                 2 GiB              CUDA context, NCCL buffers, allocator slack

Bytes kept per token and block in bf16 (FSDP2 computes in bf16 weights), measured by
tests/trainer/test_memory_estimate.py on transformers' Llama block with sdpa (no s x s scores):

    none        20h + 4k + 8i   each RMSNorm's fp32 input, its bf16 output and the matmul's copy of it
                                (2 x 8h), q (2h), k and v (4k), the attention output (2h); the MLP's
                                gate, up, activation and product (8i)
    selective   8h + 4k + 4i    the matmul outputs only (norms and elementwise ops are recomputed)
    full        2h              each block's input, plus one block's full activations while it recomputes

DDP trains fp32 weights under bf16 autocast: its residual stream stays fp32, +8h per block (4h with
full checkpointing).

Host memory per node: each process's runtime (torch, CUDA host buffers, data loading; about 6 GiB)
plus, on the node of rank 0, the full fp32 state dict it gathers to export the model (4N). Weights are
created on the meta device and materialised per shard, so no process holds the whole model at start.

Activations double in fp32 (training.precision: fp32), which keeps no bf16 copies. These
are estimates to tell whether a spec can fit, not measurements: the prepared GPU check (bench/gpu/)
prints them beside the peaks it measures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from midfill.api.common import NodePool, ResourceRequirements
from midfill.api.trainingrun import TrainingRunSpec
from midfill.recipes import Recipe, get_recipe

GIB = 1024**3
RUNTIME_BYTES = 2 * GIB
HOST_RUNTIME_BYTES = 6 * GIB

# GPU memory (GiB) by the names node labels use for accelerators: GKE's cloud.google.com/gke-accelerator,
# NVIDIA GPU feature discovery's nvidia.com/gpu.product, cloud instance types. First substring hit wins.
GPU_MEMORY_GIB: tuple[tuple[str, float], ...] = (
    ("gh200", 96.0),
    ("h200", 141.0),
    ("h100-nvl", 94.0),
    ("h100", 80.0),
    ("b200", 180.0),
    ("a100-80", 80.0),
    ("a100", 40.0),
    ("l40", 48.0),
    ("l4", 24.0),
    ("a10g", 24.0),
    ("a10", 24.0),
    ("t4", 16.0),
    ("v100", 16.0),
    ("p5e", 141.0),  # AWS instance types
    ("p5", 80.0),
    ("p4de", 80.0),
    ("p4d", 40.0),
    ("g6e", 48.0),
    ("g6", 24.0),
    ("g5", 24.0),
)
# Superchips whose labels count the CPU's memory too (NVIDIA-GH200-480GB): their GPU memory.
COMBINED_MEMORY_GIB: tuple[tuple[str, float], ...] = (("gh200", 96.0), ("gb200", 186.0))
GPU_LABELS = (
    "nvidia.com/gpu.memory",  # MiB, set by NVIDIA GPU feature discovery
    "cloud.google.com/gke-accelerator",
    "nvidia.com/gpu.product",
    "node.kubernetes.io/instance-type",
)
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([KMGTPE]i?|m|)$")
_UNITS = {"": 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_UNITS |= {f"{u}i": 1024**k for k, u in enumerate("KMGTPE", start=1)}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs on its GPU, by part; and host bytes per node."""

    parameters: int
    weights_and_gradients: float
    optimizer: float
    working_weights: float
    activations: float
    logits: float
    host_per_node: float
    activation_checkpointing: str
    activations_if_full_checkpointing: float
    runtime: float  # the CUDA context and its buffers; none for a CPU run

    @property
    def per_gpu(self) -> float:
        """Bytes per training process: on its GPU, or in host memory for a CPU run."""
        parts = (self.weights_and_gradients, self.optimizer, self.working_weights, self.activations, self.logits)
        return sum(parts) + self.runtime

    def summary(self) -> str:
        """One line per part, in GiB."""

        def gib(value: float) -> str:
            return f"{value / GIB:.1f} GiB"

        return "\n".join(
            [
                f"  parameters            {self.parameters / 1e9:.2f} B",
                f"  weights + gradients   {gib(self.weights_and_gradients)}",
                f"  optimizer (AdamW)     {gib(self.optimizer)}",
                f"  working bf16 weights  {gib(self.working_weights)}",
                f"  activations           {gib(self.activations)} "
                f"(activationCheckpointing {self.activation_checkpointing}; full: "
                f"{gib(self.activations_if_full_checkpointing)})",
                f"  logits                {gib(self.logits)}",
                f"  runtime               {gib(self.runtime)}",
                f"  {'per GPU' if self.runtime else 'per process (CPU)':<21} {gib(self.per_gpu)}",
                f"  host per node         {gib(self.host_per_node)}",
            ]
        )


def activation_bytes_per_token(recipe: Recipe, mode: str, *, fp32_residual: bool = False) -> float:
    """Bytes one decoder block keeps per token for the backward pass, in bf16 (module docstring);
    fp32_residual: the block runs under autocast with fp32 weights (DDP)."""
    h, i = recipe.hidden_size, recipe.intermediate_size
    k = recipe.num_kv_heads * (h // recipe.num_heads)
    kept = {"none": 20 * h + 4 * k + 8 * i, "selective": 8 * h + 4 * k + 4 * i, "full": 2 * h}[mode]
    if fp32_residual:
        kept += 4 * h if mode == "full" else 8 * h
    return kept


def estimate(spec: TrainingRunSpec) -> MemoryEstimate | None:
    """The spec's memory needs; None for composed runs (their size comes from the parent models)."""
    if spec.model.composition is not None:
        return None
    p, t = spec.parallelism, spec.training
    return estimate_for(
        get_recipe(spec.model.recipe).with_overrides(spec.model.architecture),
        Layout(
            vocab_size=spec.tokenizer.vocab_size,
            fsdp=p.strategy == "fsdp",
            world_size=p.world_size(),
            nproc_per_node=p.nproc_per_node,
            tokens_per_micro_batch=t.micro_batch_size * t.seq_length,
            activation_checkpointing=t.activation_checkpointing,
            fp32=t.precision == "fp32",
            on_gpu=bool(spec.resources.gpus()),
        ),
    )


@dataclass(frozen=True)
class Layout:
    """How a model is trained, as far as memory goes."""

    vocab_size: int
    fsdp: bool
    world_size: int
    nproc_per_node: int
    tokens_per_micro_batch: int
    activation_checkpointing: str
    fp32: bool
    on_gpu: bool


def estimate_for(recipe: Recipe, layout: Layout) -> MemoryEstimate:
    """The memory of training `recipe` laid out as `layout` (module docstring)."""
    n = recipe.num_params(layout.vocab_size)
    shards = layout.world_size if layout.fsdp else 1
    tokens, mode, fp32 = layout.tokens_per_micro_batch, layout.activation_checkpointing, layout.fp32
    width = 2 if fp32 else 1  # activations are twice as wide in fp32
    autocast = not layout.fsdp and not fp32  # DDP: fp32 weights under bf16 autocast

    def activations(m: str) -> float:
        kept = recipe.num_layers * tokens * activation_bytes_per_token(recipe, m, fp32_residual=autocast)
        if m == "full":  # the block being recomputed holds its full activations meanwhile
            kept += tokens * activation_bytes_per_token(recipe, "none", fp32_residual=autocast)
        return kept * width

    return MemoryEstimate(
        parameters=n,
        weights_and_gradients=8 * n / shards,
        optimizer=8 * n / shards,
        working_weights=0 if fp32 else 4 * n / recipe.num_layers if layout.fsdp else 2 * n,
        activations=activations(mode),
        logits=(12 if fp32 else 10) * tokens * layout.vocab_size,
        host_per_node=layout.nproc_per_node * HOST_RUNTIME_BYTES + 4 * n,
        activation_checkpointing=mode,
        activations_if_full_checkpointing=activations("full"),
        runtime=RUNTIME_BYTES if layout.on_gpu else 0,
    )


def quantity_bytes(quantity: int | str) -> float | None:
    """A Kubernetes memory quantity (`16Gi`, `64G`, `1000000`) in bytes; None if not one."""
    match = _QUANTITY.match(str(quantity))
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def pool_gpu_memory(pool: NodePool) -> tuple[float, str] | None:
    """(GiB per GPU, the label it came from) read from the node pool's selector, or None if unknown."""
    for label in GPU_LABELS:
        value = pool.node_selector.get(label)
        if not value:
            continue
        if label == "nvidia.com/gpu.memory" and value.isdigit():
            return int(value) / 1024, label
        lowered = value.lower()
        for name, gib in COMBINED_MEMORY_GIB:
            if name in lowered:
                return gib, label
        sized = re.search(r"(\d+)gb", lowered)  # nvidia-h100-80gb, NVIDIA-A100-SXM4-80GB
        if sized:
            return float(sized.group(1)), label
        for name, gib in GPU_MEMORY_GIB:
            if name in lowered:
                return gib, label
    return None


def warnings(spec: TrainingRunSpec, est: MemoryEstimate, *, gpu_gib: float | None) -> list[str]:
    """What will not fit: the per-GPU total over the pool's GPU memory, host memory over the pod's
    memory limit (or request). Each names the fields to change."""
    out = []
    if gpu_gib is not None and est.per_gpu > gpu_gib * GIB:
        fixes = []
        if spec.parallelism.strategy != "fsdp":
            fixes.append("parallelism.strategy: fsdp")
        if est.activation_checkpointing != "full":
            fixes.append("training.activationCheckpointing: full")
        if spec.training.micro_batch_size > 1:
            fixes.append("a smaller training.microBatchSize")
        out.append(
            f"estimated {est.per_gpu / GIB:.0f} GiB per GPU exceeds the node pool's {gpu_gib:.0f} GiB; "
            f"try {', or '.join(fixes) or 'more GPUs (parallelism.numNodes)'}"
        )
    limit = _memory(spec.resources)
    if limit is not None and est.host_per_node > limit:
        out.append(
            f"estimated {est.host_per_node / GIB:.0f} GiB of host memory per node exceeds resources memory "
            f"({limit / GIB:.0f} GiB); raise resources.limits.memory"
        )
    return out


def _memory(resources: ResourceRequirements) -> float | None:
    raw = resources.limits.get("memory", resources.requests.get("memory"))
    return None if raw is None else quantity_bytes(raw)
