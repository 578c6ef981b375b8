from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest

from midfill import fim
from midfill.api.trainingrun import DataSource, ObjectiveSpec
from trainer.data import DocumentStream, list_source
from trainer.objectives import Packer, SpecialIds, choose_spans, parse_back

UNICODE_DOC = "# données — 日本語 🎉🎉\nx = '🎉' * 3  # ünïcödé\n\tif x:\n\t\tpass\n" * 6


def _files(tmp_path: Path, texts: list[str]):
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i:02d}.py").write_text(text)
    return list_source(0, DataSource(uri=str(tmp_path)), max_file_bytes=10**6)


def _objective(causal=0.0, span=0.0, fim_w=0.0, max_spans=3, single_line=0.5) -> ObjectiveSpec:
    return ObjectiveSpec.model_validate(
        {
            "causalLM": {"weight": causal},
            "spanCorruption": {"weight": span, "maxSpans": max_spans, "singleLineProbability": single_line},
            "fim": {"weight": fim_w},
        }
    )


def _pieces(seq):
    """(doc key, objective, ids) of every piece of a packed sequence."""
    used = sum(1 for s in seq.segments if s)
    bounds = [p.start for p in seq.pieces] + [used]
    return [(p.doc, p.objective, seq.ids[a:b]) for p, a, b in zip(seq.pieces, bounds, bounds[1:], strict=False)]


def _reconstruct(packer: Packer, bpe, sid) -> dict[str, str]:
    """Each document's text, rebuilt from the parsed-back pieces in stream order."""
    parts: dict[str, list] = {}
    while (seq := packer.next()) is not None:
        assert len(seq.ids) == packer.seq_length
        for doc, objective, ids in _pieces(seq):
            out = parts.setdefault(doc, [])
            if objective == "causal":  # raw token slices: merge neighbours before decoding
                ids = [t for t in ids if t != sid.eos]
                if out and isinstance(out[-1], list):
                    out[-1] += ids
                else:
                    out.append(list(ids))
            else:
                out.append(parse_back(ids, bpe, sid))
    return {doc: "".join(p if isinstance(p, str) else bpe.decode(p) for p in ps) for doc, ps in parts.items()}


@pytest.mark.parametrize("weights", [(0, 1, 0), (0, 0, 1), (0.3, 0.5, 0.2)], ids=["span", "fim", "mixture"])
@pytest.mark.parametrize("seq_length", [64, 256])
def test_every_piece_parses_back_to_its_file_exactly(tmp_path, bpe, code_texts, weights, seq_length):
    texts = code_texts[:4] + [UNICODE_DOC, "x = 1\n", "short"]
    files = _files(tmp_path, texts)
    stream = DocumentStream([files], [1.0], seed=3, rank=0, world_size=1, epochs=1)
    packer = Packer(stream, bpe, _objective(*weights), seq_length=seq_length, num_mask_tokens=8, seed=3)
    sid = SpecialIds.of(bpe, 8)
    rebuilt = _reconstruct(packer, bpe, sid)
    by_key = {f"0:{f.rel}": (tmp_path / f.rel).read_text() for f in files}
    assert rebuilt == by_key  # spans never cross files: each file comes back whole from its own pieces


def test_span_format_masks_in_order_and_each_piece_is_one_file(tmp_path, bpe, code_texts):
    files = _files(tmp_path, code_texts)
    stream = DocumentStream([files], [1.0], seed=5, rank=0, world_size=1)
    packer = Packer(stream, bpe, _objective(span=1, max_spans=3), seq_length=256, num_mask_tokens=8, seed=5)
    sid = SpecialIds.of(bpe, 8)
    seen_spans = set()
    for _ in range(60):
        for _doc, objective, ids in _pieces(packer.next()):
            if objective != "span":
                continue
            sep = ids.index(sid.sep)
            assert ids[sep - 1] == sid.eos and ids.count(sid.sep) == 1
            body_masks = [sid.masks.index(t) + 1 for t in ids[:sep] if t in sid.masks]
            tail_masks = [sid.masks.index(t) + 1 for t in ids[sep:] if t in sid.masks]
            assert body_masks == tail_masks == list(range(1, len(body_masks) + 1))
            assert ids.count(sid.eom) == len(body_masks) and ids[-1] == sid.eom
            seen_spans.add(len(body_masks))
    assert seen_spans == {1, 2, 3}


def test_single_span_sequence_is_exactly_the_codegen2_infill_prompt(tmp_path, bpe, code_texts):
    files = _files(tmp_path, code_texts)
    stream = DocumentStream([files], [1.0], seed=7, rank=0, world_size=1)
    packer = Packer(stream, bpe, _objective(span=1, max_spans=1), seq_length=256, num_mask_tokens=8, seed=7)
    sid = SpecialIds.of(bpe, 8)
    checked = 0
    for _ in range(20):
        for _doc, objective, ids in _pieces(packer.next()):
            if objective != "span":
                continue
            text = bpe.decode(ids, skip_special_tokens=False)
            head, tail = text.split(fim.SEP + fim.mask_token(1))
            prefix, suffix = head.removesuffix(fim.EOS).split(fim.mask_token(1))
            middle = tail.removesuffix(fim.EOM)
            assert text == fim.CODEGEN2.infill_prompt(prefix, suffix) + middle + fim.EOM
            original = parse_back(ids, bpe, sid)
            assert original == prefix + middle + suffix
            checked += 1
    assert checked > 5


def test_packing_fills_every_position_of_an_endless_stream(tmp_path, bpe, code_texts):
    files = _files(tmp_path, code_texts + [UNICODE_DOC])
    stream = DocumentStream([files], [1.0], seed=1, rank=0, world_size=1)
    packer = Packer(stream, bpe, _objective(0.4, 0.4, 0.2), seq_length=128, num_mask_tokens=8, seed=1)
    seqs = [packer.next() for _ in range(150)]
    assert all(len(s.ids) == 128 for s in seqs)
    assert sum(s.ids.count(SpecialIds.of(bpe, 8).pad) for s in seqs) == 0
    assert {p.objective for s in seqs for p in s.pieces} == {"causal", "span", "fim"}


def test_packer_resumes_at_the_exact_position(tmp_path, bpe, code_texts):
    files = _files(tmp_path, code_texts + [UNICODE_DOC])

    def make():
        stream = DocumentStream([files], [1.0], seed=2, rank=0, world_size=1)
        return Packer(stream, bpe, _objective(0.3, 0.5, 0.2), seq_length=96, num_mask_tokens=8, seed=2)

    a = make()
    for _ in range(37):
        a.next()
    state = copy.deepcopy(a.state_dict())
    expected = [a.next().ids for _ in range(40)]
    b = make()
    b.load_state_dict(state)
    assert [b.next().ids for _ in range(40)] == expected


def test_literal_sentinel_strings_in_code_stay_text(tmp_path, bpe):
    text = f"s = '{fim.mask_token(1)}{fim.EOS}{fim.SEP}'\n" * 20
    files = _files(tmp_path, [text])
    stream = DocumentStream([files], [1.0], seed=1, rank=0, world_size=1, epochs=1)
    packer = Packer(stream, bpe, _objective(0.5, 0.5), seq_length=128, num_mask_tokens=8, seed=1)
    rebuilt = _reconstruct(packer, bpe, SpecialIds.of(bpe, 8))
    assert list(rebuilt.values()) == [text]


def test_choose_spans_are_disjoint_sorted_and_nonempty():
    rng = random.Random(0)
    text = "".join(f"line {i} = {i * i}\n" for i in range(50))
    for _ in range(300):
        k = rng.randint(1, 5)
        spans = choose_spans(text, k=k, ratio=rng.uniform(0.05, 0.5), single_line_p=rng.random(), rng=rng)
        assert 1 <= len(spans) <= k
        assert all(a < b for a, b in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))


def test_single_line_spans_are_a_lines_code_between_its_indentation_and_its_newline():
    """The hole an editor asks for with the cursor after the indentation: the prefix keeps the
    indentation, the suffix starts with the newline."""
    rng = random.Random(1)
    text = "".join(f"def f{i}(x):\n    y = x * {i}\n        return y\n\n" for i in range(30))
    seen = set()
    for _ in range(50):
        for a, b in choose_spans(text, k=3, ratio=0.2, single_line_p=1.0, rng=rng):
            line_start = text.rfind("\n", 0, a) + 1
            assert text[line_start:a].strip() == "" and text[b] == "\n", repr(text[line_start : b + 1])
            assert text[a:b] == text[a:b].strip() and text[a:b]
            seen.add(a - line_start)
    assert seen == {0, 4, 8}  # every indentation depth, the indentation itself never in the span


def test_single_line_spans_are_never_comment_or_docstring_lines():
    """Editors ask for statements; prose holes taught the debug model to answer `#` or `\"\"\"`."""
    rng = random.Random(2)
    unit = 'def f(x):\n    """Doc.\n\n    More doc.\n    """\n    # a comment\n    y = x + 1\n    return y\n\n'
    text = unit * 20
    chosen = set()
    for _ in range(100):
        for a, b in choose_spans(text, k=4, ratio=0.2, single_line_p=1.0, rng=rng):
            chosen.add(text[a:b])
    assert chosen == {"def f(x):", "y = x + 1", "return y"}
