"""Byte-level BPE tokenizer with midfill's special tokens, trained locally with `tokenizers`.

Byte-level BPE maps every byte to a symbol, so any text (tabs, runs of spaces, unicode) encodes
and decodes back exactly. A line's indentation (with the newline before it) is a pre-token of its
own: GPT-2's split glues the last indentation space to the next word (`\n   ` + ` return`), so
an editor's prompt that ends in indentation (the cursor at the start of a statement) would end on
a token the model never saw followed by code, and the model answers with more whitespace
(docs/benchmarks.md, line_infill_ablation). Split this way, `\n        ` + `return` is the same
boundary in training text and in prompts. The special tokens come first, in `midfill.fim.special_tokens` order,
so their ids are the same in every midfill tokenizer. Saved as a Hugging Face folder that
`AutoTokenizer` / `PreTrainedTokenizerFast` load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import fsspec
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from midfill import fim

log = logging.getLogger(__name__)


def train_bpe(texts: Iterable[str], *, vocab_size: int, num_mask_tokens: int) -> Tokenizer:
    """Learn a byte-level BPE on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = code_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=fim.special_tokens(num_mask_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def code_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Newline + indentation, and indentation at the start of a text, as pieces of their own; then
    GPT-2's byte-level split inside each piece."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n[ \t]*"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\A[ \t]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def take_bytes(texts: Iterable[str], limit: int) -> Iterator[str]:
    """Texts until about `limit` bytes were yielded (the BPE needs a sample, not the corpus)."""
    total = 0
    for text in texts:
        if total >= limit:
            return
        total += len(text.encode("utf-8", "ignore"))
        yield text


def to_hf(tok: Tokenizer, *, num_mask_tokens: int) -> PreTrainedTokenizerFast:
    """Wrap as a transformers tokenizer with EOS/PAD and the sentinels registered as special."""
    specials = fim.special_tokens(num_mask_tokens)
    others = [t for t in specials if t not in (fim.EOS, fim.PAD)]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=fim.EOS,
        bos_token=None,
        pad_token=fim.PAD,
        unk_token=None,
        additional_special_tokens=others,
        clean_up_tokenization_spaces=False,
    )


def save(tok: PreTrainedTokenizerFast, folder: str) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) to a folder or fsspec URI."""
    if "://" not in folder:
        tok.save_pretrained(folder)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        fs, root = fsspec.core.url_to_fs(folder)
        fs.put(tmp + "/", root, recursive=True)


def load(path: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder, a tokenizer.json file, or either on an fsspec URI."""
    if "://" in path:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="midfill-tok-")
        fs, root = fsspec.core.url_to_fs(path)
        fs.get(root.rstrip("/") + "/", tmp, recursive=True)
        path = tmp
    p = Path(path)
    if p.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(p), eos_token=fim.EOS, pad_token=fim.PAD)
    if not (p / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer.path: {path} has no tokenizer.json; give a tokenizer folder or file")
    return PreTrainedTokenizerFast.from_pretrained(str(p))


def check_specials(tok: PreTrainedTokenizerFast, *, num_mask_tokens: int) -> None:
    """ValueError naming the missing sentinels if a loaded tokenizer cannot express the objectives."""
    vocab = tok.get_vocab()
    missing = [t for t in fim.special_tokens(num_mask_tokens) if t not in vocab]
    if missing:
        raise ValueError(
            f"tokenizer.path: the tokenizer lacks {', '.join(missing)}; train one (omit tokenizer.path) or add them"
        )


def exists(folder: str) -> bool:
    """Whether a saved tokenizer is in `folder`."""
    fs, root = fsspec.core.url_to_fs(folder)
    return fs.exists(root.rstrip("/") + "/tokenizer.json")
