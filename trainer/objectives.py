"""Training objectives and packing, exactly as docs/research.md sections 1 and 3.

Every packed sequence is `seq_length` tokens of whole-document pieces. Per sequence an objective
is drawn (weights of spec.objective): causal LM, CodeGen2 span corruption, or StarCoder FIM. The
sequence is filled piece by piece from the document stream; a piece never spans two files and is
transformed on its own, so spans never cross a file:

- causal:  the document's tokens, `<|endoftext|>` after its last token.
- span:    ``p0 <mask_1> p1 … <mask_k> pk <|endoftext|> <sep> <mask_1> s1 <eom> … <mask_k> sk <eom>``
           (the in-place part ends with `<|endoftext|>` so the model sees exactly the prompt
           ``prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>`` that `midfill.fim.CODEGEN2` sends).
- fim:     PSM ``<fim_prefix> P <fim_suffix> S <fim_middle> M <|endoftext|>`` or
           SPM ``<fim_prefix><fim_suffix> S <fim_middle> P M <|endoftext|>``.

A sequence's leftover room too small for a transformed piece is filled with plain document tokens,
so only the very end of a finite stream is ever padded (packing efficiency ~100%).

Span choice (the paper's ranges were not published; these are our documented defaults, all in the
spec): k ~ U{1..maxSpans} spans per piece, masked share of the piece's characters ~ U(maskRatioMin,
maskRatioMax) split randomly between them, each span placed in its own k-th of the piece; with
probability singleLineProbability a span is instead the code of one line: after its indentation,
before its newline (what editors ask for most, with the cursor after the indentation; it teaches a
small model to stop at the end of the line). Comment and docstring lines are never such a span.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from midfill import fim
from midfill.api.trainingrun import ObjectiveSpec
from trainer.data import DocumentStream

OBJECTIVES = ("causal", "span", "fim")
MIN_SPAN_PIECE_CHARS = 16


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the sentinels."""

    eos: int
    pad: int
    sep: int
    eom: int
    masks: tuple[int, ...]
    fim_prefix: int
    fim_suffix: int
    fim_middle: int

    @classmethod
    def of(cls, tok: Tokenizer, num_mask_tokens: int) -> SpecialIds:
        def tid(t: str) -> int:
            i = tok.token_to_id(t)
            assert i is not None, f"tokenizer lacks {t}"
            return i

        return cls(
            eos=tid(fim.EOS),
            pad=tid(fim.PAD),
            sep=tid(fim.SEP),
            eom=tid(fim.EOM),
            masks=tuple(tid(fim.mask_token(i)) for i in range(1, num_mask_tokens + 1)),
            fim_prefix=tid(fim.FIM_PREFIX),
            fim_suffix=tid(fim.FIM_SUFFIX),
            fim_middle=tid(fim.FIM_MIDDLE),
        )


@dataclass
class Piece:
    """One transformed document piece inside a packed sequence (kept for tests and debugging)."""

    doc: str
    objective: str
    start: int  # first token of the piece in the sequence


@dataclass
class Packed:
    """One training sequence."""

    ids: list[int]
    segments: list[int]  # 1-based piece number per token, 0 = padding
    pieces: list[Piece] = field(default_factory=list)


class _Doc:
    """A document being consumed: its text, token ids with char offsets, and a cursor."""

    def __init__(self, key: str, text: str, tok: Tokenizer, pos: int = 0) -> None:
        self.key, self.text = key, text
        enc = tok.encode(text)
        self.ids = enc.ids
        self.starts = [s for s, _ in enc.offsets]
        self.ends = [e for _, e in enc.offsets]
        self.pos = pos  # next token to emit; == len(ids) means only <|endoftext|> is left

    def clean(self, j: int) -> bool:
        """Whether token j starts at a character boundary (byte-level BPE may split a character)."""
        return j <= 0 or j >= len(self.ids) or self.starts[j] >= self.ends[j - 1]

    def char(self, j: int) -> int:
        return len(self.text) if j >= len(self.ids) else self.starts[j]

    def token_at_char(self, c: int) -> int:
        return bisect.bisect_left(self.starts, c)


class Packer:
    """Turns a document stream into packed sequences; resumable through state_dict()."""

    def __init__(
        self,
        docs: DocumentStream,
        tok: Tokenizer,
        spec: ObjectiveSpec,
        *,
        seq_length: int,
        num_mask_tokens: int,
        seed: int,
    ) -> None:
        # Encode the corpus's literal "<mask_1>"/"<|endoftext|>" strings as text, not as sentinels.
        self.tok = Tokenizer.from_str(tok.to_str())
        self.tok.encode_special_tokens = True
        self.docs, self.spec, self.seq_length = docs, spec, seq_length
        self.sid = SpecialIds.of(tok, num_mask_tokens)
        self.rng = random.Random(f"{seed}-objective-{docs.rank}")
        self.weights = [spec.causal_lm.weight, spec.span_corruption.weight, spec.fim.weight]
        self.doc: _Doc | None = None
        self.exhausted = False

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        doc = None if self.doc is None else {"key": self.doc.key, "text": self.doc.text, "pos": self.doc.pos}
        return {"docs": self.docs.state_dict(), "rng": self.rng.getstate(), "doc": doc, "exhausted": self.exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.docs.load_state_dict(state["docs"])
        self.rng.setstate(state["rng"])
        d = state["doc"]
        self.doc = None if d is None else _Doc(d["key"], d["text"], self.tok, d["pos"])
        self.exhausted = state["exhausted"]

    # -- packing -----------------------------------------------------------------------------
    def _current(self) -> _Doc | None:
        if self.doc is None and not self.exhausted:
            nxt = self.docs.next()
            if nxt is None:
                self.exhausted = True
            else:
                self.doc = _Doc(nxt[0], nxt[2], self.tok)
        return self.doc

    def next(self) -> Packed | None:
        """The next sequence, or None once a finite stream has nothing left."""
        objective = self.rng.choices(OBJECTIVES, weights=self.weights)[0]
        ids: list[int] = []
        segments: list[int] = []
        pieces: list[Piece] = []
        while len(ids) < self.seq_length:
            doc = self._current()
            if doc is None:
                break
            room = self.seq_length - len(ids)
            out, kind = None, "causal"
            if objective != "causal":
                out = self._causal_to_clean(doc, room)  # a split character first, if any
                if out is None:
                    out = self._span_piece(doc, room) if objective == "span" else self._fim_piece(doc, room)
                    kind = objective if out is not None else "causal"
            if out is None:
                out = self._causal_piece(doc, room)
            pieces.append(Piece(doc=doc.key, objective=kind, start=len(ids)))
            segments += [len(pieces)] * len(out)
            ids += out
            if doc.pos > len(doc.ids):  # the document and its end marker are used up
                self.doc = None
        if not ids:
            return None
        pad = self.seq_length - len(ids)
        return Packed(ids=ids + [self.sid.pad] * pad, segments=segments + [0] * pad, pieces=pieces)

    def _causal_piece(self, doc: _Doc, room: int) -> list[int]:
        out = doc.ids[doc.pos : doc.pos + room]
        doc.pos += len(out)
        if len(out) < room and doc.pos == len(doc.ids):
            out.append(self.sid.eos)
            doc.pos += 1
        return out

    def _causal_to_clean(self, doc: _Doc, room: int) -> list[int] | None:
        if doc.clean(doc.pos):
            return None
        j = doc.pos
        while j < len(doc.ids) and not doc.clean(j) and j - doc.pos < room:
            j += 1
        out = doc.ids[doc.pos : j]
        doc.pos = j
        return out

    def _take_text(self, doc: _Doc, budget: int) -> tuple[int, int, int]:
        """(first char, end char, end token) of up to `budget` of the document's next tokens."""
        j0 = doc.pos
        j1 = min(len(doc.ids), j0 + budget)
        while j1 > j0 and not doc.clean(j1):
            j1 -= 1
        return doc.char(j0), doc.char(j1), j1

    def _span_piece(self, doc: _Doc, room: int) -> list[int] | None:
        sc = self.spec.span_corruption
        k = self.rng.randint(1, sc.max_spans)
        # 3k+2 sentinels; retokenising text cut into 2k+1 parts adds at most ~1 token per cut.
        budget = room - (3 * k + 2) - (2 * k + 2)
        if budget < 4 * k or doc.pos >= len(doc.ids):
            return None
        ratio = self.rng.uniform(sc.mask_ratio_min, sc.mask_ratio_max)
        for _ in range(8):
            c0, c1, j1 = self._take_text(doc, budget)
            text = doc.text[c0:c1]
            if len(text) < MIN_SPAN_PIECE_CHARS:
                return None
            spans = choose_spans(
                text, k=k, ratio=ratio, single_line_p=sc.single_line_probability, rng=random.Random(self.rng.random())
            )
            out = self._encode_span_format(text, spans)
            if len(out) <= room:
                doc.pos = j1 + (1 if j1 == len(doc.ids) else 0)  # the format's <|endoftext|> ends the file
                return out
            budget -= len(out) - room + 2
            if budget < 4 * k:
                return None
        return None

    def _encode_span_format(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        parts, middles, cursor = [], [], 0
        for a, b in spans:
            parts.append(text[cursor:a])
            middles.append(text[a:b])
            cursor = b
        parts.append(text[cursor:])
        enc = [e.ids for e in self.tok.encode_batch(parts + middles)]
        head, tail = enc[: len(parts)], enc[len(parts) :]
        out = list(head[0])
        for i, part in enumerate(head[1:]):
            out += [self.sid.masks[i], *part]
        out += [self.sid.eos, self.sid.sep]
        for i, mid in enumerate(tail):
            out += [self.sid.masks[i], *mid, self.sid.eom]
        return out

    def _fim_piece(self, doc: _Doc, room: int) -> list[int] | None:
        budget = room - 4 - 3
        if budget < 8 or doc.pos >= len(doc.ids):
            return None
        for _ in range(8):
            c0, c1, j1 = self._take_text(doc, budget)
            text = doc.text[c0:c1]
            if len(text) < 2:
                return None
            a, b = sorted(self.rng.randint(0, len(text)) for _ in range(2))
            pre, mid, suf = (e.ids for e in self.tok.encode_batch([text[:a], text[a:b], text[b:]]))
            if self.rng.random() < self.spec.fim.spm_rate:
                out = [self.sid.fim_prefix, self.sid.fim_suffix, *suf, self.sid.fim_middle, *pre, *mid, self.sid.eos]
            else:
                out = [self.sid.fim_prefix, *pre, self.sid.fim_suffix, *suf, self.sid.fim_middle, *mid, self.sid.eos]
            if len(out) <= room:
                doc.pos = j1 + (1 if j1 == len(doc.ids) else 0)
                return out
            budget -= len(out) - room + 2
            if budget < 8:
                return None
        return None


def choose_spans(text: str, *, k: int, ratio: float, single_line_p: float, rng: random.Random) -> list[tuple[int, int]]:
    """Up to k sorted, disjoint, non-empty (start, end) character spans of `text`."""
    n = len(text)
    total = max(k, int(n * ratio))
    cuts = sorted(rng.randint(1, max(1, total - 1)) for _ in range(k - 1))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    spans = []
    code_lines = _code_lines(text) if single_line_p > 0 else []
    for i, length in enumerate(lengths):
        lo, hi = i * n // k, (i + 1) * n // k  # this span's share of the text
        if hi - lo < 1:
            continue
        line = _random_line(code_lines, lo, hi, rng) if rng.random() < single_line_p else None
        if line is not None:
            spans.append(line)
            continue
        length = max(1, min(length, hi - lo))
        start = rng.randint(lo, hi - length)
        spans.append((start, start + length))
    return spans


def _random_line(code_lines: list[tuple[int, int]], lo: int, hi: int, rng: random.Random) -> tuple[int, int] | None:
    """The statement of a random code line (of _code_lines) lying inside [lo, hi): from after its
    indentation to before its newline, or None. This is the hole an editor asks for with the
    cursor at the start of a line's code: the prefix ends with the indentation, the suffix starts
    with the newline, and the model learns to end the middle (<eom>) where the line ends. Comment
    and docstring lines are left out: an editor completes statements, and a small model that sees
    prose holes answers statement holes with `#` or `\"\"\"`."""
    lines = [(start, end) for start, end in code_lines if start >= lo and end <= hi]
    return rng.choice(lines) if lines else None


def _code_lines(text: str) -> list[tuple[int, int]]:
    """(first char after the indentation, end before the newline) of each line of `text` that holds
    code: not blank, not a comment, not inside or opening a triple-quoted string. Triple quotes
    are tracked by counting them per line, which is cheap and right for the usual docstring; a
    piece cut inside a docstring may misread a few of its lines."""
    out: list[tuple[int, int]] = []
    in_string = False
    pos = 0
    for line in text.split("\n"):
        body = line.strip()
        quotes = body.count('"""') + body.count("'''")
        code = body and not in_string and not quotes and body[0] not in "#\"'"
        if code:
            start = pos + len(line) - len(line.lstrip())
            out.append((start, start + len(body)))
        if quotes % 2:
            in_string = not in_string
        pos += len(line) + 1
    return out


def parse_back(ids: list[int], tok: Tokenizer, sid: SpecialIds) -> str:
    """The original text of one piece (inverse of the three formats); AssertionError if malformed.

    Masks must be numbered 1, 2, … in order, in place and in the answers alike.
    """

    def dec(part: list[int]) -> str:
        return tok.decode(part, skip_special_tokens=False)

    if ids and ids[0] == sid.fim_prefix:
        if ids[1] == sid.fim_suffix:  # SPM
            m = ids.index(sid.fim_middle)
            assert ids[-1] == sid.eos
            suf, pre_mid = ids[2:m], ids[m + 1 : -1]
            return dec(pre_mid) + dec(suf)
        s, m = ids.index(sid.fim_suffix), ids.index(sid.fim_middle)
        assert ids[-1] == sid.eos
        return dec(ids[1:s]) + dec(ids[m + 1 : -1]) + dec(ids[s + 1 : m])
    if sid.sep in ids:
        s = ids.index(sid.sep)
        body, tail = ids[: s - 1], ids[s + 1 :]
        assert ids[s - 1] == sid.eos, "span format: <|endoftext|> must precede <sep>"
        parts, cur, order = [], [], []
        for t in body:
            if t in sid.masks:
                parts.append(cur)
                cur = []
                order.append(sid.masks.index(t) + 1)
            else:
                cur.append(t)
        parts.append(cur)
        assert order == list(range(1, len(order) + 1)), f"masks out of order: {order}"
        middles, answer_order, cur = [], [], None
        for t in tail:
            if cur is None:
                assert t in sid.masks, "each answer starts with its <mask_i>"
                answer_order.append(sid.masks.index(t) + 1)
                cur = []
            elif t == sid.eom:
                middles.append(cur)
                cur = None
            else:
                cur.append(t)
        assert cur is None and answer_order == order, f"answers {answer_order} do not match masks {order}"
        text = dec(parts[0])
        for mid, part in zip(middles, parts[1:], strict=True):
            text += dec(mid) + dec(part)
        return text
    if ids and ids[-1] == sid.eos:
        ids = ids[:-1]
    return dec(ids)
