"""Loading a composed export (bridge + composition.json) with its parents resolved by reference.

Shared by serving (serving/composed.py) and the evaluator (`midfill eval`, the trainer's
post-registration evaluation), which must load the very same composition: here in the core because
neither may import the other (docs/architecture.md). A parent reference is

- `models:/name/<version>`: resolved through the registry and downloaded once per version into
  `cache_dir/parents/<name>/<version>` (`midfill.download`: scratch folder, marker, rename, so a torn
  download is redone);
- `./parents/<role>`: saved inside the export (a recipe-built parent; `load_composed` makes it absolute);
- a path or `file://` URI of an exported model folder on this machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from midfill.composition.build import ComposedModel
from midfill.composition.state import MANIFEST_FILE, load_composed
from midfill.download import fetch_version


def is_composed(folder: str | Path) -> bool:
    """Whether an export folder is a composition (it has composition.json) rather than a plain model."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def parent_loader(
    *, tracking_uri: str | None, cache_dir: Path, attn: str = "sdpa", dtype: torch.dtype = torch.float32
) -> Callable[[str], LlamaForCausalLM]:
    """`load_parent` for `load_composed`: registry URIs are downloaded once per version into cache_dir."""

    def load(ref: str) -> LlamaForCausalLM:
        if ref.startswith("models:/"):
            from midfill.registry import Registry  # mlflow: only when a parent actually lives there

            registry = Registry(tracking_uri)
            info = registry.resolve_uri(ref)
            local = fetch_version(registry, info, Path(cache_dir) / "parents" / info.name / info.version)
            found = next(local.rglob("config.json"), None)
            if found is None:
                raise ValueError(
                    f"composition parent {ref}: no config.json in the registered files; not a model export"
                )
            folder = found.parent
        else:
            folder = Path(ref.removeprefix("file://")).expanduser()
            if not (folder / "config.json").is_file():
                raise ValueError(
                    f"composition parent {ref!r}: not an exported model folder (no config.json) on this machine"
                )
        return LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn)

    return load


def load_composed_export(
    folder: str | Path, *, tracking_uri: str | None, cache_dir: Path, dtype: torch.dtype = torch.float32
) -> ComposedModel:
    """The composed model of an export folder, parents resolved as above, in eval mode and `dtype`."""
    model = load_composed(
        folder, load_parent=parent_loader(tracking_uri=tracking_uri, cache_dir=cache_dir, dtype=dtype)
    )
    return model.to(dtype).eval()
