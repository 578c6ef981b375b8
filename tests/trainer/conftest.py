"""Fixtures for the trainer tests: a small BPE trained on a few stdlib files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_FILES = [
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "textwrap.py",
    "colorsys.py",
]


@pytest.fixture(scope="session")
def code_texts() -> list[str]:
    return [(STDLIB / f).read_text() for f in SAMPLE_FILES]


@pytest.fixture(scope="session")
def bpe(code_texts):
    from trainer.tokenizer import train_bpe

    return train_bpe(code_texts * 2, vocab_size=600, num_mask_tokens=8)
