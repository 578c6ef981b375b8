"""Composed runs (`spec.model.composition`): what `trainer.job` does differently when it trains a
bridge between two frozen parents instead of one model (docs/composition.md).

- Parents: each `anchor`/`augment` is a recipe name (built with random weights, seeded), a registry
  URI (resolved to its fixed `models:/name/<version>` and downloaded once, as for `model.init`) or an
  export path/URI. Recipe names win over a relative folder of the same name.
- Tokens: both parents read the same tokens, so the tokenizer is the first downloaded parent's
  (`tokenizer.path` still wins); two downloaded parents must share one vocabulary.
- Training: the existing loop on `ComposedLM`, whose only trainable parameters are the bridge's
  (and a trainable codet5p encoder's), so the optimizer holds nothing else.
- codet5p reads a context with its bidirectional encoder. In training, the encoder reads the first
  half of every packed sequence and the loss counts only the tokens after it (the decoder still reads
  the whole sequence): a bidirectional encoder over the tokens being predicted would leak them. In
  serving and in the infill evaluation the encoder reads the whole prompt and the decoder continues it.
- Checkpoints hold the trainable tensors only (`CheckpointManager(trainable_only=True)`).
- Export: `save_composed` (bridge + composition.json naming the parents by reference) beside the
  tokenizer and midfill.json. A recipe-built parent has no reference anywhere else, so its weights are
  saved inside the export under `parents/<role>/` and referenced as `./parents/<role>`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from midfill.api.trainingrun import CompositionSpec, TrainingRun
from midfill.composition import ComposedModel, build_composed_model, greedy_generate, num_trainable, save_composed
from midfill.export import ExportMetadata, write_metadata
from midfill.registry import Registry
from trainer import tokenizer as toklib
from trainer.loop import IGNORE
from trainer.model import attention_implementation, llama_config
from trainer.recipes import RECIPES, Recipe
from trainer.settings import TrainerSettings

ROLES = ("anchor", "augment")
PARENTS_DIR = "parents"


@dataclass(frozen=True)
class Parent:
    role: str
    recipe: Recipe | None  # built from this recipe (random, seeded) ...
    folder: Path | None  # ... or loaded from this local export folder
    ref: str | None  # what the export names: models:/name/<version> or the path/URI; None for a recipe


@dataclass(frozen=True)
class ComposedSetup:
    spec: CompositionSpec
    parents: dict[str, Parent]
    max_context: int  # the shorter of the two parents' contexts

    @property
    def tokenizer_dir(self) -> Path | None:
        return next((p.folder for p in self.parents.values() if p.folder is not None), None)


def check_spec(run: TrainingRun) -> None:
    """What a composed run cannot do (ValueError naming the field); cheap, also for `--check`."""
    spec = run.spec
    if spec.parallelism.strategy == "fsdp":
        raise ValueError(
            "parallelism.strategy: fsdp does not shard composed models yet; use ddp (only the bridge trains, "
            "so it is small)"
        )
    if spec.objective.document_mask:
        raise ValueError("objective.documentMask: composed models take a padding mask only; set documentMask: false")


def fetch_parents(
    spec: CompositionSpec, settings: TrainerSettings, fetch: Callable[[str, str], Path | None]
) -> dict[str, Parent]:
    """Resolve and download both parents; `fetch(uri, field)` is the trainer's `model.init` fetcher."""
    parents = {}
    for role in ROLES:
        value, field = getattr(spec, role), f"model.composition.{role}"
        if value in RECIPES:
            parents[role] = Parent(role, RECIPES[value], None, None)
            continue
        ref = value
        if value.startswith("models:/"):
            ref = Registry(settings.resolved_tracking_uri()).resolve_uri(value).uri  # a moving alias is pinned here
        elif "://" not in value:
            ref = str(Path(value).expanduser().absolute())
        parents[role] = Parent(role, None, fetch(ref, field), ref)
    return parents


def setup(spec: CompositionSpec, parents: dict[str, Parent], *, seq_length: int) -> ComposedSetup:
    """Geometry checks that need the parents' configs (ValueError naming the field)."""
    contexts = {}
    for role, p in parents.items():
        if p.recipe is not None:
            contexts[role] = p.recipe.max_position_embeddings
        else:
            import json

            contexts[role] = json.loads((p.folder / "config.json").read_text())["max_position_embeddings"]
    max_context = min(contexts.values())
    if seq_length > max_context:
        role = min(contexts, key=contexts.get)
        raise ValueError(
            f"training.seqLength: {seq_length} exceeds the {role} parent's context ({max_context}); shorten it"
        )
    return ComposedSetup(spec=spec, parents=parents, max_context=max_context)


def check_tokenizer(s: ComposedSetup, tok: PreTrainedTokenizerFast) -> None:
    """Both parents must read the tokens this run's tokenizer makes."""
    vocab = tok.get_vocab()
    for role, p in s.parents.items():
        if p.folder is None:
            continue
        if toklib.load(str(p.folder)).get_vocab() != vocab:
            raise ValueError(
                f"model.composition.{role}: its tokenizer differs from the run's (the other parent's or "
                "tokenizer.path); "
                "both parents must read the same tokens"
            )


def _load_parent(p: Parent, *, vocab_size: int, eos_id: int, pad_id: int, attn: str, seed: int) -> LlamaForCausalLM:
    if p.recipe is not None:
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config(p.recipe, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id, attn=attn))
    lm = LlamaForCausalLM.from_pretrained(str(p.folder), attn_implementation=attn, dtype=torch.float32)
    if lm.get_input_embeddings().weight.shape[0] < vocab_size:
        raise ValueError(
            f"model.composition.{p.role}: {p.ref} has fewer embedding rows than the tokenizer has tokens ({vocab_size})"
        )
    return lm


class ComposedLM(nn.Module):
    """The composed model as the training loop and the evaluation call a causal LM."""

    def __init__(
        self,
        composed: ComposedModel,
        *,
        seq_length: int,
        rebuild_parent: Callable[[str], LlamaForCausalLM] | None = None,
    ) -> None:
        super().__init__()
        self.composed = composed
        self.rebuild_parent = rebuild_parent  # a recipe-built parent's weights as they were before training
        self.pivot = seq_length // 2  # codet5p: the encoder reads [0, pivot), the loss counts [pivot, T)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **context):
        return self.composed(input_ids, **context)

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """codet5p: the encoder's context, and no loss on the tokens it read (they would leak)."""
        if self.composed.mode != "codet5p":
            return batch
        labels = batch["labels"].clone()
        labels[:, : self.pivot] = IGNORE
        return {**batch, "labels": labels, "encoder_input_ids": batch["input_ids"][:, : self.pivot]}

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, *, max_new_tokens: int, eos_token_id: list[int] | int, **_
    ) -> torch.Tensor:
        """Greedy, with the composed caches (what `evaluate.line_infill_exact_match` needs); the caller
        cuts at its stop tokens, so only the first one ends decoding early."""
        eos = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
        context = {"encoder_input_ids": input_ids} if self.composed.mode == "codet5p" else {}
        return greedy_generate(
            self.composed, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos, **context
        ).tokens


def build(
    s: ComposedSetup,
    *,
    attention: str,
    seq_length: int,
    vocab_size: int,
    eos_id: int,
    pad_id: int,
    seed: int,
    bf16: bool = True,
) -> tuple[ComposedLM, str]:
    """(the trainable wrapper, attention implementation); geometry errors name the composition field.
    bf16: as in `trainer.model.attention_implementation`."""
    attn = attention_implementation(attention, bf16=bf16)

    def load(role: str) -> LlamaForCausalLM:
        # different seeds: two recipe parents must differ; the same seed rebuilds the same weights
        seed_of = seed + ROLES.index(role)
        return _load_parent(
            s.parents[role], vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id, attn=attn, seed=seed_of
        )

    composed = build_composed_model(s.spec, load("anchor"), load("augment"))
    return ComposedLM(composed, seq_length=seq_length, rebuild_parent=load), attn


def composition_metadata(s: ComposedSetup, model: ComposedModel) -> dict:
    """What midfill.json says about the composition (composition.json has the full manifest)."""
    refs = {role: p.ref or f"./{PARENTS_DIR}/{role}" for role, p in s.parents.items()}
    return {"mode": model.mode, "parents": refs, "trainableParameters": num_trainable(model)}


def write_export(
    s: ComposedSetup, lm: ComposedLM, tok: PreTrainedTokenizerFast, meta: ExportMetadata, out_dir: Path
) -> Path:
    """Bridge + composition.json (+ recipe-built parents) + tokenizer + midfill.json, built in a temp
    folder and moved into place, like a plain export."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model, refs = lm.composed, {}
    for role, p in s.parents.items():
        refs[role] = p.ref
        if p.ref is None:
            # No registry version or path holds these weights, so the export must. Rebuilt from the
            # seed rather than taken from the model: a trainable codet5p encoder has moved, and the
            # bridge file holds its trained tensors on top of the parent's starting point.
            lm.rebuild_parent(role).save_pretrained(tmp / PARENTS_DIR / role, safe_serialization=True)
            refs[role] = f"./{PARENTS_DIR}/{role}"
    save_composed(model, tmp, anchor_ref=refs["anchor"], augment_ref=refs["augment"])
    tok.save_pretrained(tmp)
    # recipe: no single recipe made this model; the parents are in `composition`.
    write_metadata(
        tmp,
        meta.model_copy(update={"recipe": f"composition:{model.mode}", "composition": composition_metadata(s, model)}),
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
