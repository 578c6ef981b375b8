"""What of a composed model trains and what is saved.

Only the bridge (plus a trainable codet5p encoder) has requires_grad; the optimizer gets exactly
those parameters. A saved composition is a folder with

    bridge.safetensors   the trainable tensors only (megabytes, not the parents' gigabytes)
    composition.json     the spec, the parents by reference (path or models:/ URI) with a
                         fingerprint of their weights, the layer layout and the tensor names

written bridge first and manifest last, each by atomic rename, so a folder with a manifest is
complete. `load_composed` rebuilds the model from the parents it names plus the bridge.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

from midfill.api.trainingrun import CompositionSpec
from midfill.composition.build import ComposedModel, build_composed_model, parent_fingerprint

FORMAT = "midfill.composition/v1"
BRIDGE_FILE = "bridge.safetensors"
MANIFEST_FILE = "composition.json"


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that trains, each once (tied weights share one)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What goes into the optimizer: `torch.optim.AdamW(trainable_parameters(model), ...)`."""
    return [p for _, p in trainable_named_parameters(model)]


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def num_total(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def bridge_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only, by parameter name (no frozen parent weight)."""
    return {name: p.detach() for name, p in trainable_named_parameters(model)}


def load_bridge_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into `model`; the names must match exactly."""
    params = dict(trainable_named_parameters(model))
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"bridge state does not fit this composition: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"bridge state: {name} has shape {tuple(state[name].shape)}, model {tuple(p.shape)}")
            p.copy_(state[name])


def _layout(model: ComposedModel) -> dict:
    if model.mode == "calm":
        return {"pairs": [list(p) for p in model.pairs]}
    return {"crossLayers": list(model.cross_layers)}


def save_composed(
    model: ComposedModel, folder: str | Path, *, anchor_ref: str | None = None, augment_ref: str | None = None
) -> Path:
    """Write the bridge and a manifest that names the parents (defaults: the spec's anchor/augment;
    pass the resolved `models:/name/<version>` when the spec names a moving alias)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec: CompositionSpec = model.spec
    tensors = {name: t.contiguous().cpu() for name, t in bridge_state_dict(model).items()}
    tmp = folder / f".{BRIDGE_FILE}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / BRIDGE_FILE)
    parents = {
        "anchor": {"ref": anchor_ref or spec.anchor, "fingerprint": model.parent_fingerprints["anchor"]},
        "augment": {"ref": augment_ref or spec.augment, "fingerprint": model.parent_fingerprints["augment"]},
    }
    manifest = {
        "format": FORMAT,
        "mode": model.mode,
        "composition": spec.to_wire(),
        "parents": parents,
        "layout": _layout(model),
        "bridgeFile": BRIDGE_FILE,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "numTrainableParameters": num_trainable(model),
    }
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST_FILE)  # last: a folder with a manifest is complete
    return folder


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {MANIFEST_FILE}; not a saved composition (or its save did not finish)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_local_parent(ref: str) -> LlamaForCausalLM:
    """Default parent loader: an exported model folder on this machine. Registry URIs and recipe
    names need the caller's resolver (the trainer's, as for `model.init`)."""
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise ValueError(f"composition parent {ref!r}: not a local folder; pass load_parent= to resolve models:/ URIs")
    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _relative_to(folder: str | Path, ref: str) -> str:
    """A `./...` reference names a parent saved inside the composition's own folder (the trainer
    does that for parents built from a recipe, which have no other home)."""
    return str(Path(folder).absolute() / ref) if ref.startswith("./") else ref


def load_composed(
    folder: str | Path,
    *,
    load_parent: Callable[[str], LlamaForCausalLM] = load_local_parent,
    check_fingerprints: bool = True,
) -> ComposedModel:
    """Rebuild a saved composition: parents from their references, then the saved bridge."""
    manifest = read_manifest(folder)
    spec = CompositionSpec.model_validate(manifest["composition"])
    parents = manifest["parents"]
    anchor = load_parent(_relative_to(folder, parents["anchor"]["ref"]))
    augment = load_parent(_relative_to(folder, parents["augment"]["ref"]))
    if check_fingerprints:
        for role, lm in (("anchor", anchor), ("augment", augment)):
            if parent_fingerprint(lm) != parents[role]["fingerprint"]:
                raise ValueError(
                    f"composition {role} {parents[role]['ref']!r}: its weights differ from the ones the bridge "
                    "was trained with (fingerprint mismatch); load the exact parent version"
                )
    model = build_composed_model(spec, anchor, augment)
    if _layout(model) != manifest["layout"]:
        raise ValueError(f"composition layout {_layout(model)} != saved {manifest['layout']}")
    load_bridge_state_dict(model, load_file(str(Path(folder) / manifest["bridgeFile"])))
    return model
