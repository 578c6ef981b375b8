"""An export folder loaded for evaluation: a plain causal LM (transformers) or a composition.

A composed export (composition.json, docs/composition.md) is rebuilt from its bridge and the
parents it names, resolved as serving resolves them (midfill.composition.parents: `models:/` parents
through the registry into a download cache), and decoded the way serving decodes it: one request at
a time with its own composed cache, codet5p's encoder reading the whole prompt. Both the infill
suites (LocalInfiller) and left-to-right (runner) load through here, so `midfill eval` and the
trainer's post-registration evaluation accept either kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from midfill.composition.parents import is_composed, load_composed_export
from midfill.export import ExportMetadata, read_metadata


@dataclass
class LoadedExport:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    meta: ExportMetadata
    model: torch.nn.Module  # a transformers causal LM, or a midfill.composition ComposedModel
    composed: bool
    max_positions: int  # the longest sequence the model's positions allow

    @property
    def mode(self) -> str | None:
        """The composition mode ("calm", "codet5p"), None for a plain model."""
        return self.model.mode if self.composed else None


def parent_locations(tracking_uri: str | None, cache_dir: Path | None) -> tuple[str, Path]:
    """Where `models:/` parents come from and are cached; defaults as serving's (the core settings'
    tracking URI, `<state_dir>/models`), so a machine that served a composition reuses its download."""
    from midfill.settings import CoreSettings

    settings = CoreSettings()
    return tracking_uri or settings.resolved_tracking_uri(), cache_dir or settings.state_dir / "models"


def load_export(
    model_dir: str | Path, *, tracking_uri: str | None = None, cache_dir: Path | None = None
) -> LoadedExport:
    """Tokenizer, metadata and model of an export folder, in float32 and eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_metadata(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if is_composed(model_dir):
        uri, cache = parent_locations(tracking_uri, cache_dir)
        model = load_composed_export(model_dir, tracking_uri=uri, cache_dir=cache, dtype=torch.float32)
        # midfill.json's maxContext is the shorter parent's (the trainer writes it so).
        return LoadedExport(tokenizer, meta, model, composed=True, max_positions=meta.max_context)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    max_positions = int(getattr(model.config, "max_position_embeddings", meta.max_context))
    return LoadedExport(tokenizer, meta, model, composed=False, max_positions=max_positions)


@torch.inference_mode()
def composed_greedy(
    model: torch.nn.Module, prompt: list[int], *, max_new_tokens: int, stop_ids: list[int]
) -> list[int]:
    """Greedy continuation of one unpadded prompt by a composed model with its own cache, as the
    serving engine decodes a request (serving/composed.py): the first forward reads the prompt (and
    codet5p's encoder the whole prompt, whose memory the cache keeps), then one token per step.
    Returns the new tokens, ending with the stop token that ended decoding, if one did."""
    ids = torch.tensor([prompt])
    cache = model.new_cache()
    context = {"encoder_input_ids": ids} if model.mode == "codet5p" else {}
    logits = model(ids, cache=cache, **context).logits[:, -1]
    out: list[int] = []
    while True:
        token = int(logits.argmax(-1))
        out.append(token)
        if token in stop_ids or len(out) >= max_new_tokens:
            return out
        logits = model(torch.tensor([[token]]), cache=cache).logits[:, -1]


@torch.inference_mode()
def window_loss(loaded: LoadedExport, chunk: list[int], *, context: int) -> tuple[float, int]:
    """(summed next-token cross-entropy, tokens counted) over one window of token ids.

    Plain and calm models: every token after the first, each predicted from the tokens before it.
    codet5p: the encoder reads the first `context` tokens and only the tokens after them are counted
    -- the split training uses (trainer/composed_job.py) and serving uses at the end of the prompt;
    a bidirectional encoder over the tokens being predicted would hand them to the decoder."""
    x = torch.tensor([chunk])
    inputs, targets = x[:, :-1], x[0, 1:]
    if loaded.mode == "codet5p":
        logits = loaded.model(inputs, encoder_input_ids=inputs[:, :context]).logits[0]
        # logits at position i predict token i + 1; tokens [0, context) are the encoder's
        logits, targets = logits[context - 1 :], targets[context - 1 :]
    else:
        logits = loaded.model(inputs).logits[0]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return float(loss), int(targets.shape[0])


def windows(ids: list[int], *, seq_length: int, encoder_context: int | None) -> list[tuple[list[int], int]]:
    """(window of at most seq_length + 1 ids, encoder context) covering a document.

    Without an encoder the windows do not overlap and every token after the first is counted once.
    With one (codet5p) every token after the first `encoder_context` is counted once: each window
    repeats the `encoder_context` tokens before the first one it counts, for the encoder to read (a
    document no longer than that gives its first half to the encoder)."""
    if len(ids) < 2:
        return []
    if encoder_context is None:
        return [(ids[s : s + seq_length + 1], 0) for s in range(0, len(ids) - 1, seq_length)]
    c = max(1, min(encoder_context, seq_length // 2))
    if len(ids) <= c:
        return [(ids, max(1, (len(ids) - 1) // 2))]
    # window k counts positions [s + c, s + seq_length]; the next one starts counting right after.
    step = seq_length + 1 - c
    return [(ids[s : s + seq_length + 1], c) for s in range(0, len(ids) - c, step)]
