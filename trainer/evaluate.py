"""Evaluation during training: validation loss and line-infill exact match on held-out files.

- Validation loss: the same objective mixture on the held-out files (fixed seed, so every
  evaluation sees the same sequences), summed over ranks, in nats per token.
- Line-infill exact match: for held-out statements inside function bodies (chosen by a fixed
  seed; the same cut as `line-em`), the model gets the CodeGen2 infill prompt
  `prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>` with the prefix ending in the line's
  indentation, and decodes greedily until `<eom>`; a hit is a first generated line equal to the
  removed statement (surrounding spaces ignored). Every rank runs the same prompts (FSDP forwards are
  collective), rank 0 logs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from midfill import fim
from midfill.evaluation.suites import body_lines
from trainer.data import Corpus, DocumentStream, read_text
from trainer.loop import collate, lm_loss
from trainer.objectives import Packed, Packer
from trainer.parallel import Dist, all_reduce_sum

MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class InfillCase:
    prefix: str
    suffix: str
    middle: str  # the removed statement, without its indentation and newline


def validation_batches(
    corpus: Corpus,
    tok: Tokenizer,
    objective,
    *,
    seq_length: int,
    num_mask_tokens: int,
    micro_batch: int,
    batches: int,
    d: Dist,
    seed: int,
) -> list[list[Packed]]:
    """The first `batches` micro-batches of this rank's share of the held-out files (one pass)."""
    if not corpus.validation:
        return []
    stream = DocumentStream([corpus.validation], [1.0], seed=seed, rank=d.rank, world_size=d.world_size, epochs=1)
    packer = Packer(stream, tok, objective, seq_length=seq_length, num_mask_tokens=num_mask_tokens, seed=seed)
    out: list[list[Packed]] = []
    while len(out) < batches:
        seqs = [s for s in (packer.next() for _ in range(micro_batch)) if s is not None]
        if not seqs:
            break
        out.append(seqs)
    return out


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    batches: list[list[Packed]],
    *,
    pad_id: int,
    document_mask: bool,
    bf16: bool,
    d: Dist,
    flat: bool = False,
    block_mask: bool = False,
    prepare_batch=None,
) -> float | None:
    """Mean next-token loss over the held-out batches of every rank (None without held-out data).
    flat, block_mask, prepare_batch: as in `loop.train`."""
    model.eval()
    total, count = 0.0, 0.0
    for seqs in batches:
        batch = collate(
            seqs, pad_id=pad_id, document_mask=document_mask, device=d.device, flat=flat, block_mask=block_mask
        )
        if prepare_batch is not None:
            batch = prepare_batch(batch)
        loss_sum, n = lm_loss(model, batch, bf16=bf16)
        total += float(loss_sum)
        count += float(n)
    total, count = all_reduce_sum([total, count], d)
    return total / count if count else None


def infill_cases(corpus: Corpus, *, n: int, seed: int) -> list[InfillCase]:
    """Up to n single-line infill tasks from held-out code files (deterministic), cut as `line-em`
    cuts them: a statement inside a function body, the prefix ending in its indentation."""
    rng = random.Random(f"{seed}-infill")
    files = [f for f in corpus.validation if f.kind == "code"]
    rng.shuffle(files)
    cases: list[InfillCase] = []
    for ref in files:
        if len(cases) >= n:
            break
        text = read_text(ref)
        candidates = body_lines(text) if text else []
        if not text or not candidates:
            continue
        lines = text.split("\n")
        i = rng.choice(candidates)
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        prefix = "".join(line + "\n" for line in lines[:i]) + indent
        suffix = "".join("\n" + line for line in lines[i + 1 :])
        cases.append(InfillCase(prefix=prefix, suffix=suffix, middle=lines[i].strip()))
    return cases


def _clip(tok: Tokenizer, text: str, keep: int, *, tail: bool) -> str:
    enc = tok.encode(text)
    if len(enc.ids) <= keep:
        return text
    if tail:
        start = enc.offsets[len(enc.ids) - keep][0]
        return text[start:]
    end = enc.offsets[keep][0]
    return text[:end]


def build_prompt(tok: Tokenizer, case: InfillCase, *, max_context: int) -> str:
    """The CodeGen2 infill prompt, with prefix (2/3) and suffix (1/3) clipped to fit the context."""
    room = max_context - MAX_NEW_TOKENS - 4
    prefix = _clip(tok, case.prefix, room * 2 // 3, tail=True)
    suffix = _clip(tok, case.suffix, room // 3, tail=False)
    return fim.CODEGEN2.infill_prompt(prefix, suffix)


@torch.no_grad()
def line_infill_exact_match(
    model: torch.nn.Module,
    tok: Tokenizer,
    cases: list[InfillCase],
    *,
    max_context: int,
    device: torch.device,
    bf16: bool = False,
) -> float | None:
    """Share of cases whose first generated line equals the removed line. bf16: decode under the
    training's bf16 autocast, as `validation_loss` does -- FlashAttention takes only half-precision
    inputs, and outside autocast an fp32 model (one process, DDP) would hand it fp32 ones."""
    if not cases:
        return None
    model.eval()
    stop_ids = [tok.token_to_id(t) for t in fim.CODEGEN2.stop_tokens]
    hits = 0
    for case in cases:
        ids = tok.encode(build_prompt(tok, case, max_context=max_context)).ids
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=stop_ids[0],
            )[0, len(ids) :].tolist()
        gen = [t for t in out if t not in stop_ids]
        if len(gen) < len(out):
            gen = out[: min(out.index(s) for s in stop_ids if s in out)]
        text = tok.decode(gen, skip_special_tokens=False)
        first = text.split("\n", 1)[0]
        hits += int(first.strip() == case.middle.strip())
    return hits / len(cases)
