"""The causal LM: a transformers Llama decoder built from a recipe, or loaded from an export."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from midfill.api.trainingrun import ModelSpec
from trainer import weights
from trainer.recipes import Recipe

log = logging.getLogger(__name__)


def attention_implementation(requested: str, *, bf16: bool = True, document_mask: bool = False) -> str:
    """flash_attention_2 when asked for or (auto) when CUDA and flash-attn are present and the run
    computes in bf16; else (auto) flex_attention on CUDA when documentMask is on (its block mask
    skips the blocks across documents, where sdpa computes them under a dense 4D mask), else sdpa.
    bf16: whether the loop runs the model under bf16 (loop.use_bf16); flash-attn takes only
    bf16/fp16 inputs, and the fp32 model hands it fp32 ones outside autocast. flex_attention has no
    backward on CPUs: it trains on GPUs only."""
    cuda = torch.cuda.is_available()
    has_flash = cuda and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if has_flash and bf16:
            return "flash_attention_2"
        return "flex_attention" if document_mask and cuda else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError(
            "model.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install 'midfill[gpu]'); use attention: auto to fall back to sdpa"
        )
    if requested == "flash_attention_2" and not bf16:
        raise ValueError(
            "model.attention: flash_attention_2 computes in bf16 only, and this run trains in fp32 "
            "(training.precision, or a GPU without bf16); use attention: auto or sdpa"
        )
    if requested == "flex_attention" and not cuda:
        raise ValueError(
            "model.attention: flex_attention trains on CUDA GPUs only (PyTorch has no flex_attention "
            "backward on CPUs); use attention: auto or sdpa"
        )
    return requested


def llama_config(recipe: Recipe, *, vocab_size: int, eos_id: int, pad_id: int, attn: str) -> LlamaConfig:
    """The transformers config of a recipe (bias-free Llama, RMSNorm, SwiGLU, RoPE)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        tie_word_embeddings=recipe.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attn_implementation=attn,
    )


def build_model(
    spec: ModelSpec,
    recipe: Recipe,
    *,
    init_dir: Path | None,
    vocab_size: int,
    eos_id: int,
    pad_id: int,
    seed: int,
    bf16: bool = True,
    on_meta: bool = False,
    document_mask: bool = False,
) -> tuple[PreTrainedModel, str]:
    """(model in fp32 on CPU, attention implementation). bf16: as in `attention_implementation`.

    Random weights come from trainer.weights (a function of the seed and each parameter's name), so
    every rank and every world size agrees. on_meta: the model is left on the meta device, without
    storage, for FSDP2 to shard before trainer.weights.materialize fills each rank's shard (random,
    or init_dir's rows). An init whose vocabulary is smaller than the tokenizer's is resized, which
    needs the whole model: on_meta is then ignored (logged). document_mask: objective.documentMask,
    which picks flex_attention on GPUs (attention_implementation)."""
    attn = attention_implementation(spec.attention, bf16=bf16, document_mask=document_mask)
    log.info("attention implementation: %s", attn)
    if init_dir is not None:
        cfg = AutoConfig.from_pretrained(init_dir, attn_implementation=attn)
        if on_meta and cfg.vocab_size >= vocab_size:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32), attn
        if on_meta:
            log.warning(
                "model.init: vocabulary %d < tokenizer's %d; loading it whole to resize", cfg.vocab_size, vocab_size
            )
        model = AutoModelForCausalLM.from_pretrained(init_dir, attn_implementation=attn, dtype=torch.float32)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model, attn
    cfg = llama_config(recipe, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id, attn=attn)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if not on_meta:
        weights.materialize(model, torch.device("cpu"), seed=seed)
    return model, attn


def is_on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def num_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
