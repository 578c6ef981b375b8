"""The import rules of docs/architecture.md, checked on the source: they keep images small and the
dependency graph a tree (core <- operators, trainer, serving; trainer and serving apart), and the
light core (what the operator image imports) free of torch, transformers and ray.

Every import counts: module-level or inside a function, absolute or relative.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {"midfill": ROOT / "platform", "operators": ROOT, "trainer": ROOT, "serving": ROOT}
FORBIDDEN = {
    "platform/midfill": {"operators", "trainer", "serving", "platform"},
    "operators": {"trainer", "serving", "platform"},
    "trainer": {"serving", "operators", "platform"},
    "serving": {"trainer", "operators", "platform"},
}
# The light core: the API types, settings, registry, FIM formats, export metadata and the lifecycle
# state machines. The operator imports these; none may pull in (even transitively) the heavy stack.
LIGHT_CORE = [
    "midfill.api",
    "midfill.settings",
    "midfill.registry",
    "midfill.fim",
    "midfill.export",
    "midfill.download",
    "midfill.lifecycle",
]
HEAVY = {"torch", "transformers", "ray"}


def module_file(module: str) -> Path | None:
    """The source file of one of our modules (None for third-party and unknown names)."""
    root = SOURCE_ROOTS.get(module.split(".")[0])
    if root is None:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "platform" if path.is_relative_to(ROOT / "platform") else ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, as absolute names (relative imports resolved, `from m import x`
    also yields m.x, which is a module when x is a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):  # walks function bodies too: local imports count
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def transitive(module: str) -> dict[str, list[str]]:
    """Every module reachable from `module`, with the chain of imports that reaches it."""
    chains: dict[str, list[str]] = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        path = module_file(current)
        if path is None:
            continue
        found = set(imports(path))
        parts = current.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))  # a package's __init__ runs first
        for name in sorted(found):
            if name in chains:
                continue
            if module_file(name) is None and name.split(".")[0] in SOURCE_ROOTS:
                continue  # `from pkg import attribute`: not a module
            chains[name] = chains[current] + [name]
            todo.append(name)
    return chains


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = {name.split(".")[0] for name in imports(path)} & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}")
    assert not offenders, "\n".join(offenders)


def _light_modules() -> list[str]:
    out = []
    for module in LIGHT_CORE:
        path = module_file(module)
        assert path is not None, f"{module} is listed as light core but has no source"
        out.append(module)
        if path.name == "__init__.py":
            out += [module_name(p) for p in sorted(path.parent.rglob("*.py")) if p != path]
    return out


@pytest.mark.parametrize("module", _light_modules())
def test_light_core_imports_no_heavy_stack(module: str) -> None:
    heavy = {name: chain for name, chain in transitive(module).items() if name.split(".")[0] in HEAVY}
    assert not heavy, "\n".join(" -> ".join(chain) for chain in heavy.values())


def test_the_checker_follows_relative_and_function_local_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A light module reaching torch through a relative import and an import inside a function is caught."""
    pkg = tmp_path / "platform" / "midfill"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "light.py").write_text("from .helper import load\n")
    (pkg / "helper.py").write_text("def load():\n    from transformers import AutoModel\n    return AutoModel\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(SOURCE_ROOTS, "midfill", tmp_path / "platform")
    chains = transitive("midfill.light")
    assert chains.get("transformers") == ["midfill.light", "midfill.helper", "transformers"]
