"""Serving a composed export (docs/composition.md): the bridge + composition.json, whose parents are
named by reference and loaded here (`models:/name/<version>` through the registry, downloaded once
into the model cache; a path; or `./parents/<role>` inside the export).

Decoding is per request: every running request keeps its own composed cache (`model.new_cache()`:
a KV cache per parent plus the bridge keys/values, or the codet5p encoder memory) and each engine
step advances every running request by one token, one forward pass each. The plain engine's batched
KV splicing would have to left-pad and splice two caches plus the bridge memory per model; this is
the simpler, exactly correct path (equal to `greedy_generate` by construction), at the cost of one
forward per running request per step instead of one per step. Admission, streaming, stops,
cancellation and sampling are the plain engine's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from midfill.composition import load_composed
from midfill.composition.state import MANIFEST_FILE
from midfill.registry import Registry
from serving.engine import Engine, _Seq


def is_composed(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def parent_loader(*, tracking_uri: str | None, cache_dir: Path, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """`load_parent` for `load_composed`: registry URIs are downloaded once per version into cache_dir."""
    from transformers import LlamaForCausalLM

    def load(ref: str) -> LlamaForCausalLM:
        if ref.startswith("models:/"):
            registry = Registry(tracking_uri)
            info = registry.resolve_uri(ref)
            dst = cache_dir / "parents" / info.name / info.version
            if not (dst / "done").is_file():
                (dst / "where").parent.mkdir(parents=True, exist_ok=True)
                (dst / "where").write_text(str(registry.download(info, dst / "files")))
                (dst / "done").write_text(info.uri)
            found = next(Path((dst / "where").read_text()).rglob("config.json"), None)
            if found is None:
                raise ValueError(f"composition parent {ref}: no config.json in the registered files; not a model export")
            folder = found.parent
        else:
            folder = Path(ref.removeprefix("file://")).expanduser()
            if not (folder / "config.json").is_file():
                raise ValueError(f"composition parent {ref!r}: not an exported model folder (no config.json) on this machine")
        return LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn)

    return load


def load_composed_export(folder: str | Path, *, tracking_uri: str | None, cache_dir: Path, dtype: torch.dtype = torch.float32):
    model = load_composed(folder, load_parent=parent_loader(tracking_uri=tracking_uri, cache_dir=cache_dir, dtype=dtype))
    return model.to(dtype)


class ComposedEngine(Engine):
    """The engine's request handling over per-request composed caches (see the module docstring)."""

    def __init__(self, model, tokenizer, metadata, **kwargs) -> None:
        self._state: dict[int, tuple[object, int]] = {}  # id(seq) -> (composed cache, next input token)
        super().__init__(model, tokenizer, metadata, **kwargs)

    def _context(self, ids: torch.Tensor) -> dict:
        # codet5p: the encoder reads the whole prompt (the trainer's choice, trainer/composed_job.py);
        # the cache keeps its memory for the later steps.
        return {"encoder_input_ids": ids} if self.model.mode == "codet5p" else {}

    def _admit(self, seq: _Seq) -> None:
        ids = torch.tensor([seq.prompt_ids])
        cache = self.model.new_cache()
        with torch.inference_mode():
            logits = self.model(ids, cache=cache, **self._context(ids)).logits[:, -1]
        token = self._sample(logits, [seq])[0]
        self._running.append(seq)
        self._state[id(seq)] = (cache, token)
        if self._accept(seq, token):
            self._retire([seq], reason=None)

    def _decode(self) -> None:
        finished = []
        with torch.inference_mode():
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
