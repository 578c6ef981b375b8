"""Incremental detokenization gives the full decode's text while decoding only a few ids per token."""

from __future__ import annotations

import pytest
from serving_exports import stdlib_texts
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from serving.detokenize import IncrementalDetokenizer
from serving.stops import REPLACEMENT

# Multi-byte characters the debug BPE (trained on ASCII-heavy stdlib files) splits over several
# byte-level tokens: 2-byte Latin, 3-byte arrows and CJK, 4-byte emoji.
SNIPPET = 'def café(x):  # → 变量 🐍\n    return "naïve ✓ 🎉"\n'


@pytest.fixture(scope="module")
def tokenizer(tiny_export):
    return AutoTokenizer.from_pretrained(str(tiny_export))


def _texts() -> list[str]:
    """Real stdlib source with its non-ASCII lines (shlex's Latin-1 word characters, zipfile's
    box-drawing tree) plus SNIPPET."""
    shlex, zipfile = stdlib_texts(["shlex.py", "zipfile.py"])
    tree = zipfile.index("├──")
    return [shlex[:3000], zipfile[tree - 800 : tree + 400], SNIPPET]


class CountingTokenizer:
    """Only the tokenizer's `decode`, recording how many ids each call gets."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def _feed(tokenizer, ids: list[int]) -> tuple[list[str], int]:
    """Every step's text, the same whether the detokenizer calls the Rust tokenizer directly or the
    tokenizer's `decode`, and the most ids one decode call got."""
    direct = IncrementalDetokenizer(tokenizer)
    assert direct._decode_ids == tokenizer.backend_tokenizer.decode  # these tokenizers take the direct path
    counting = CountingTokenizer(tokenizer)
    through_decode = IncrementalDetokenizer(counting)
    steps = [direct.add(i) for i in ids]
    assert [through_decode.add(i) for i in ids] == steps
    return steps, max(counting.lengths)


@pytest.mark.parametrize("text", _texts(), ids=["shlex", "zipfile", "snippet"])
def test_every_step_equals_the_full_decode_of_the_ids_so_far(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.decode(ids[:n]).endswith(REPLACEMENT) for n in range(len(ids)))  # splits a character
    steps, longest = _feed(tokenizer, ids)
    assert steps == [tokenizer.decode(ids[: n + 1], skip_special_tokens=False) for n in range(len(ids))]
    assert steps[-1] == text
    # O(1) per token: the decoder sees the last committed chunk plus the new ids, never the whole output.
    assert longest <= 8 < len(ids)


def test_special_tokens_in_the_middle_even_inside_a_character(tokenizer):
    ids = tokenizer.encode(SNIPPET, add_special_tokens=False)
    eom, sep = tokenizer.convert_tokens_to_ids(["<eom>", "<sep>"])
    emoji = next(n for n in range(len(ids)) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT))
    ids = [sep, *ids[:emoji], eom, *ids[emoji:], eom, eom]
    steps, _ = _feed(tokenizer, ids)
    assert steps == [tokenizer.decode(ids[: n + 1], skip_special_tokens=False) for n in range(len(ids))]
    assert steps[-1].startswith("<sep>") and steps[-1].endswith("<eom><eom>") and REPLACEMENT + "<eom>" in steps[-1]


def test_a_character_cut_off_at_the_end_stays_as_the_full_decode_gives_it(tokenizer):
    ids = tokenizer.encode("x = '🐍'", add_special_tokens=False)
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT))
    steps, _ = _feed(tokenizer, ids[:cut])
    assert steps[-1] == tokenizer.decode(ids[:cut]) and steps[-1].endswith(REPLACEMENT)


def test_the_last_chunk_gives_context_to_decoders_that_depend_on_it():
    # SentencePiece's Metaspace decoder drops the leading space of the first token: "▁f" alone is "f".
    vocab = {"▁def": 0, "▁f": 1, "(x):": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert _feed(hf, [0, 1, 2])[0] == ["def", "def f", "def f(x):"]
