"""Serving a composed export (docs/composition.md): the bridge + composition.json, whose parents are
named by reference and loaded by midfill.composition.parents (`models:/name/<version>` through the
registry, downloaded once into the model cache; a path; or `./parents/<role>` inside the export).

Decoding is per request: every running request keeps its own composed cache (`model.new_cache()`:
a KV cache per parent plus the bridge keys/values, or the codet5p encoder memory) and each engine
step advances every running request by one token, one forward pass each. The plain engine's batched
KV splicing would have to left-pad and splice two caches plus the bridge memory per model; this is
the simpler, exactly correct path (equal to `greedy_generate` by construction), at the cost of one
forward per running request per step instead of one per step. Admission, streaming, stops,
cancellation and sampling are the plain engine's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

# The parent resolver is the core's, shared with `midfill eval`, so both load the same composition;
# these names stay importable from here for the engine.
from midfill.composition.parents import is_composed, load_composed_export, parent_loader
from midfill.export import ExportMetadata
from serving.engine import Engine
from serving.sequence import _Seq

__all__ = ["ComposedEngine", "is_composed", "load_composed_export", "load_engine", "parent_loader"]

log = logging.getLogger(__name__)


def load_engine(
    path: str | Path,
    tokenizer,
    metadata: ExportMetadata,
    *,
    dtype: str,
    device: str,
    tracking_uri: str | None,
    cache_dir: Path | None,
    **kwargs,
) -> ComposedEngine:
    """`Engine.from_export` for a composed export: the parents by reference -- models:/ ones from
    `tracking_uri` into `cache_dir` (default: the serving settings') -- on the CPU for now."""
    from serving.settings import ServingSettings, cpu_dtype  # pydantic-settings: only when one is served

    if torch.device(device).type != "cpu":
        # Served on the CPU for now, so a GPU's dtype (float16 on older GPUs) may be one this CPU
        # only emulates, far slower than its own: take what `auto` means on the CPU.
        log.warning("composed export on %s: served on the CPU for now, in %s instead of %s", device, cpu_dtype(), dtype)
        dtype = cpu_dtype()
    if cache_dir is None or tracking_uri is None:
        settings = ServingSettings()
        cache_dir = cache_dir or settings.model_cache()
        tracking_uri = tracking_uri or settings.resolved_tracking_uri()
    model = load_composed_export(path, tracking_uri=tracking_uri, cache_dir=cache_dir, dtype=getattr(torch, dtype))
    return ComposedEngine(model, tokenizer, metadata, **kwargs)


class ComposedEngine(Engine):
    """The engine's request handling over per-request composed caches (see the module docstring)."""

    def __init__(self, model, tokenizer, metadata, **kwargs) -> None:
        self._state: dict[int, tuple[object, int]] = {}  # id(seq) -> (composed cache, next input token)
        kwargs["decode_path"] = "dynamic"  # one forward per request; the static step does not apply
        super().__init__(model, tokenizer, metadata, **kwargs)

    def _context(self, ids: torch.Tensor) -> dict:
        # codet5p: the encoder reads the whole prompt (the trainer's choice, trainer/composed_job.py);
        # the cache keeps its memory for the later steps.
        return {"encoder_input_ids": ids} if self.model.mode == "codet5p" else {}

    def _admit(self, group: list[_Seq]) -> None:
        for seq in group:
            ids = torch.tensor([seq.prompt_ids])
            cache = self.model.new_cache()
            logits = self.model(ids, cache=cache, **self._context(ids)).logits[:, -1]
            token = self._sample(logits, [seq])[0]
            self._running.append(seq)
            self._state[id(seq)] = (cache, token)
            if self._accept(seq, token):
                self._retire([seq], reason=None)

    def _decode(self) -> None:
        finished = []
        for seq in list(self._running):
            cache, nxt = self._state[id(seq)]
            logits = self.model(torch.tensor([[nxt]]), cache=cache).logits[:, -1]
            token = self._sample(logits, [seq])[0]
            self._state[id(seq)] = (cache, token)
            if self._accept(seq, token):
                finished.append(seq)
        self.steps += 1
        self._retire(finished, reason=None)

    def _retire(self, seqs: list[_Seq], *, reason: str | None) -> None:
        for seq in seqs:
            if reason:
                self._finish(seq, reason)
            self._state.pop(id(seq), None)
        gone = set(map(id, seqs))
        self._running = [s for s in self._running if id(s) not in gone]

    def _reset_batch(self) -> None:
        self._running, self._state = [], {}
