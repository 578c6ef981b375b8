"""The Dockerfiles, checked without a Docker daemon (none here or in CI): their base images and
build args are declared and documented, what they COPY exists, the versions they pin equal the lock
the tests ran with, and each image installs every third-party module its code imports."""

from __future__ import annotations

import ast
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCS = ROOT / "docs" / "kubernetes.md"
DOCKERFILES = {p.name.removeprefix("Dockerfile."): p for p in sorted(DOCKER.glob("Dockerfile.*"))}

# What each image's code imports: its component plus the core (midfill.local is the no-cluster
# backend and never runs in an image).
IMAGE_SOURCES = {
    "operator": ["operators"],
    "trainer": ["trainer"],
    "serving": ["serving"],
}
# Modules an image gets from its base image rather than from its own pip install, or (serving's
# flash_attn) imports its code makes only where the module is installed (importlib.util.find_spec).
FROM_BASE = {"trainer": {"torch"}, "serving": {"ray", "flash_attn"}}
# import name -> distribution name, where they differ.
DIST = {"yaml": "pyyaml", "pydantic_settings": "pydantic-settings", "prometheus_client": "prometheus-client",
        "mlflow": "mlflow-skinny", "flash_attn": "flash-attn", "ray": "ray[serve]"}
# Installed on purpose although not in requirements-lock.txt (drivers and fsspec backends).
NOT_IN_LOCK = {"flash-attn", "einops", "packaging", "ninja", "wheel", "psycopg2-binary", "pymysql", "boto3"}


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str | None] = field(default_factory=dict)  # name -> default
    froms: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)  # sources copied from the build context
    pip_installs: list[list[str]] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    header: str = ""


def parse(path: Path) -> Dockerfile:
    df = Dockerfile(path)
    text = path.read_text()
    df.header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    logical = re.sub(r"\\\n", " ", text)  # join continuation lines
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG":
            for item in shlex.split(rest):
                name, eq, default = item.partition("=")
                df.args[name] = default if eq else df.args.get(name)
        elif instr == "FROM":
            df.froms.append(rest.split()[0])
        elif instr == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            if not any(w.startswith("--from") for w in rest.split()):
                df.copies.extend(words[:-1])
        elif instr == "RUN":
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            command: list[str] = []
            for token in [*lexer, "&&"]:
                if token in ("&&", ";", "||", "|"):
                    is_pip = any(t.rsplit("/", 1)[-1] in ("pip", "pip3") for t in command)
                    if is_pip and "install" in command:
                        df.pip_installs.append(command[command.index("install") + 1 :])
                    command = []
                else:
                    command.append(token)
        elif instr == "USER":
            df.users.append(rest.strip())
    return df


def packages(df: Dockerfile) -> set[str]:
    """Requirement names given to pip install (flags, paths, $VARS and '.' left out)."""
    names = set()
    skip_next = {"-c", "--index-url", "--extra-index-url", "-w", "-r"}
    for words in df.pip_installs:
        skip = False
        for word in words:
            if skip:
                skip = False
                continue
            if word in skip_next:
                skip = True
                continue
            if word.startswith(("-", "/", ".", "$")):
                continue
            names.add(re.split(r"[=<>~!]", word, maxsplit=1)[0].lower())
    return names


def third_party_imports(folders: list[str]) -> set[str]:
    paths = [p for f in folders for p in (ROOT / f).rglob("*.py")]
    paths += [*(ROOT / "platform/midfill").glob("*.py"), *(ROOT / "platform/midfill/api").glob("*.py")]
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    ours = {"midfill", "operators", "trainer", "serving"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in ours}


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_images_the_chart_and_api_point_at_have_dockerfiles() -> None:
    assert {"operator", "trainer", "serving", "mlflow"} <= set(DOCKERFILES)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_images_and_args_are_declared_and_documented(name: str) -> None:
    df = parse(DOCKERFILES[name])
    docs = DOCS.read_text()
    assert df.froms, "no FROM"
    for image in df.froms:
        for var in re.findall(r"\$\{?(\w+)\}?", image):
            assert df.args.get(var), f"FROM {image}: ARG {var} needs a default"
    for arg in df.args:
        assert re.search(rf"#\s+{arg}\s", df.header), f"ARG {arg} is not described in the header comment"
        assert f"`{arg}`" in docs, f"ARG {arg} is not in docs/kubernetes.md's build-args table"
    assert f"docker/Dockerfile.{name}" in docs


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copied_files_exist_and_the_image_runs_as_non_root(name: str) -> None:
    df = parse(DOCKERFILES[name])
    for source in df.copies:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert df.users and df.users[-1] not in ("root", "0", "0:0"), f"last USER is {df.users[-1:]}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_pinned_versions_match_the_lock(name: str) -> None:
    df = parse(DOCKERFILES[name])
    pins = lock()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    for arg, default in df.args.items():
        value = default or ""
        if arg == "PYTHON_IMAGE":
            assert f"python:{py}-" in value, f"{arg}={value}: the lock was made on Python {py}"
        if arg == "RAY_IMAGE":
            assert f"ray:{pins['ray']}-py{py.replace('.', '')}" in value, f"{arg}={value} vs ray=={pins['ray']}"
        if arg.startswith("TORCH_") and arg.endswith("_IMAGE"):
            assert f"pytorch:{pins['torch']}-" in value, f"{arg}={value} vs torch=={pins['torch']}"
        if arg == "MLFLOW_VERSION":
            assert value == pins["mlflow"], f"{arg}={value} vs mlflow=={pins['mlflow']}"
    for package in packages(df):
        bare = package.split("[")[0]
        if bare in NOT_IN_LOCK or bare == "mlflow":
            continue
        assert bare in pins, f"pip installs {package}, which is not in requirements-lock.txt (tested versions)"
    constrained = [w for w in df.pip_installs if packages_of(w) - NOT_IN_LOCK - {"mlflow"}]
    assert all("requirements-lock.txt" in w for w in constrained), "pip installs without -c requirements-lock.txt"


def packages_of(words: list[str]) -> set[str]:
    probe = Dockerfile(Path("-"), pip_installs=[words])
    return {p.split("[")[0] for p in packages(probe)}


@pytest.mark.parametrize("name", sorted(IMAGE_SOURCES))
def test_each_image_installs_what_its_code_imports(name: str) -> None:
    df = parse(DOCKERFILES[name])
    installed = {p.split("[")[0] for p in packages(df)}
    missing = []
    for module in sorted(third_party_imports(IMAGE_SOURCES[name]) - FROM_BASE.get(name, set())):
        dist = DIST.get(module, module).split("[")[0]
        if dist not in installed:
            missing.append(f"{module} (pip package {dist})")
    assert not missing, f"docker/Dockerfile.{name} does not install: {missing}"


def test_operator_image_carries_neither_torch_nor_ray() -> None:
    df = parse(DOCKERFILES["operator"])
    assert not packages(df) & {"torch", "ray", "ray[serve]", "mlflow", "transformers"}
    assert all(c in ("requirements-lock.txt", "pyproject.toml", "README.md", "platform/", "operators/") for c in df.copies)
    assert any("--no-deps" in words for words in df.pip_installs), "midfill itself must be installed with --no-deps"


def test_parser_reads_continuations_and_args(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile.x"
    path.write_text('ARG BASE=python:3.11-slim\nFROM ${BASE}\nARG A="1 2" B\nRUN pip install -c l.txt \\\n  a==1 b && echo\nUSER 1\n')
    df = parse(path)
    assert df.args == {"BASE": "python:3.11-slim", "A": "1 2", "B": None}
    assert df.froms == ["${BASE}"] and df.users == ["1"]
    assert packages(df) == {"a", "b"}
