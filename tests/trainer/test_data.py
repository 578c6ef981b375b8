from __future__ import annotations

import copy
from pathlib import Path

import pytest

from midfill.api.trainingrun import DataSource, DataSpec
from trainer.data import Corpus, DocumentStream, is_validation, list_source


def _tree(root: Path) -> None:
    for rel in ["a/x.py", "a/y.py", "a/tests/t.py", "b/z.py", "b/readme.md", "c.py", "empty.py"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("" if rel == "empty.py" else f"# {rel}\n" * 3)


def test_local_dir_glob_include_exclude(tmp_path):
    _tree(tmp_path)
    rels = lambda **kw: [f.rel for f in list_source(0, DataSource(**kw), max_file_bytes=10**6)]  # noqa: E731
    assert rels(uri=str(tmp_path)) == ["a/tests/t.py", "a/x.py", "a/y.py", "b/readme.md", "b/z.py", "c.py"]
    assert rels(uri=str(tmp_path), include=["*.py"], exclude=["*/tests/*"]) == ["a/x.py", "a/y.py", "b/z.py", "c.py"]
    assert rels(uri=f"{tmp_path}/**/*.md") == ["b/readme.md"]
    assert rels(uri=f"file://{tmp_path}/a/*.py") == ["x.py", "y.py"]  # relative to the glob root
    with pytest.raises(ValueError, match=r"data.sources\[0\].uri"):
        list_source(0, DataSource(uri=str(tmp_path / "missing")), max_file_bytes=10)


def test_stdlib_source_skips_tests_and_site_packages():
    files = list_source(0, DataSource(uri="stdlib://", include=["*.py"]), max_file_bytes=10**6)
    assert len(files) > 500
    assert not any({"test", "tests", "site-packages"} & set(Path(f.rel).parts) for f in files)
    assert "json/decoder.py" in {f.rel for f in files}


def test_split_is_a_pure_function_of_the_path():
    paths = [f"pkg/mod{i}.py" for i in range(2000)]
    held = [p for p in paths if is_validation(p, 0.05)]
    assert 60 < len(held) < 140
    assert held == [p for p in paths if is_validation(p, 0.05)]
    assert not any(is_validation(p, 0.0) for p in paths)


def test_corpus_split_and_hash(tmp_path):
    _tree(tmp_path)
    spec = DataSpec.model_validate({"sources": [{"uri": str(tmp_path)}], "validationFraction": 0.5})
    corpus = Corpus.from_spec(spec)
    train = {f.rel for f in corpus.train[0]}
    val = {f.rel for f in corpus.validation}
    assert train and val and not train & val and len(train | val) == 6
    assert corpus.data_hash() == Corpus.from_spec(spec).data_hash()
    (tmp_path / "new.py").write_text("x = 1\n")
    assert Corpus.from_spec(spec).data_hash() != corpus.data_hash() or is_validation("new.py", 0.5)


def _files(tmp_path: Path, n: int, prefix: str):
    for i in range(n):
        (tmp_path / f"{prefix}{i:03d}.txt").write_text(f"{prefix}{i}")
    return list_source(0, DataSource(uri=f"{tmp_path}/{prefix}*.txt"), max_file_bytes=100)


def test_ranks_read_disjoint_files_each_epoch(tmp_path):
    files = _files(tmp_path, 20, "f")
    seen = []
    for rank in range(3):
        stream = DocumentStream([files], [1.0], seed=1, rank=rank, world_size=3, epochs=1)
        seen.append([text for _key, _kind, text in iter(stream.next, None)])
    assert sorted(sum(seen, [])) == sorted(f"f{i}" for i in range(20))
    assert all(len(s) in (6, 7) for s in seen)


def test_mixing_by_weight_and_exact_resume(tmp_path):
    a = _files(tmp_path, 10, "a")
    b = _files(tmp_path, 10, "b")
    stream = DocumentStream([a, b], [3.0, 1.0], seed=4, rank=0, world_size=1)
    first = [stream.next()[2][0] for _ in range(400)]
    assert 0.68 < first.count("a") / 400 < 0.82
    state = copy.deepcopy(stream.state_dict())
    expected = [stream.next() for _ in range(50)]
    other = DocumentStream([a, b], [3.0, 1.0], seed=4, rank=0, world_size=1)
    other.load_state_dict(state)
    assert [other.next() for _ in range(50)] == expected
    with pytest.raises(ValueError, match="world size"):
        DocumentStream([a, b], [3.0, 1.0], seed=4, rank=0, world_size=2).load_state_dict(state)
