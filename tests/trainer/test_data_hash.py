"""The data hash follows file contents: one changed byte changes it; renaming, timestamps and
listing order do not matter beyond what they change in the corpus."""

from __future__ import annotations

import os

from midfill.api.trainingrun import DataSpec
from trainer.data import Corpus, FileRef, file_digest, remote_identity


def _corpus(root) -> Corpus:
    return Corpus.from_spec(DataSpec.model_validate({"sources": [{"uri": str(root)}], "validationFraction": 0.0}))


def test_one_changed_byte_changes_the_hash_same_size_same_names(tmp_path):
    for i in range(4):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    before = _corpus(tmp_path).data_hash()
    target = tmp_path / "m2.py"
    stat = target.stat()
    target.write_text("def f2():\n    return 3\n")  # same size, one byte differs
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same timestamp
    changed = _corpus(tmp_path).data_hash()
    assert changed != before
    target.write_text("def f2():\n    return 2\n")
    assert _corpus(tmp_path).data_hash() == before  # content back -> hash back
    os.utime(target, (1, 1))
    assert _corpus(tmp_path).data_hash() == before  # a touched file is the same data


def test_remote_objects_are_identified_by_their_store_listing():
    s3 = {"name": "b/a.py", "size": 10, "ETag": '"abc"', "type": "file"}
    gcs = {"name": "b/a.py", "size": 10, "generation": "17", "md5Hash": "xyz", "type": "file"}
    assert remote_identity(s3) == 'ETag="abc";size=10'
    assert remote_identity(gcs) == "generation=17;md5Hash=xyz;size=10"
    assert remote_identity({**s3, "ETag": '"abd"'}) != remote_identity(s3)
    # A remote ref is never opened: its url points nowhere.
    ref = FileRef(
        source=0, kind="code", url="s3://no-such-bucket/a.py", rel="a.py", size=10, identity=remote_identity(s3)
    )
    assert file_digest(ref) == remote_identity(s3)
