"""What a TrainingRun trains: the model (recipe, geometry overrides, initial weights, attention,
composition of two frozen models) and its tokenizer. Part of the TrainingRun spec (midfill.api.trainingrun)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from midfill.api.common import ApiModel

# Model sizes the trainer knows (trainer/recipes.py defines each; a test keeps the two in step).
RECIPE_NAMES = ("debug", "125m", "350m", "1b", "3.7b", "7b")
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
