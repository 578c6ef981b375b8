"""Incremental detokenization: a request's text grows by decoding only its last few tokens.

Why: the engine used to re-decode a request's whole output after every token. That is O(n) per token
per running row: with the debug BPE tokenizer on a 2-core CPU, decoding 32 ids took 14 us, 64 ids
25 us, 128 ids 42 us -- at 32 rows and 128-token completions ~1.3 ms of a ~8 ms decode step, growing
with max_tokens (editors ask for up to 256-512). bench/detokenize.py measures both ways.

How (the prefix_offset/read_offset scheme of TGI's `decode_token` and vLLM's
`detokenize_incrementally`): `ids[:read]` is decoded for good. Each new token decodes `ids[prefix:]`
and the last committed chunk `ids[prefix:read]`; what the longer decode adds is the new text. The
chunk is decoded with the new tokens, not alone, because some decoders depend on what precedes a
token (SentencePiece's Metaspace drops the leading space of the first token). New text that ends in
U+FFFD (an incomplete UTF-8 sequence split over byte-level tokens) is not committed: the next token
may complete it, so it is decoded again next time with that token.
"""

from __future__ import annotations

from serving.stops import REPLACEMENT


class IncrementalDetokenizer:
    """Feed it a request's generated ids one at a time; `add` returns the text of all of them,
    equal to `tokenizer.decode(ids, skip_special_tokens=False)` (special tokens included, a trailing
    incomplete UTF-8 sequence as U+FFFD, as that full decode gives them) at O(1) decoding cost."""

    def __init__(self, tokenizer) -> None:
        # A fast tokenizer's decode is its Rust tokenizer's plus, where configured, a clean-up of
        # spaces. Without the clean-up (midfill's tokenizers: trainer/tokenizer.py) call the Rust one
        # directly: transformers' wrapper adds ~1.6 us a call, 3x the decode of a few ids.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._decode_ids = tokenizer.decode if backend is None or cleans_up else backend.decode
        self.ids: list[int] = []
        self._text = ""  # decode(ids[:read]), final
        self._prefix = self._read = 0

    def add(self, token_id: int) -> str:
        """Append one id; the decoded text of all ids so far."""
        self.ids.append(token_id)
        chunk = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])[len(chunk) :]
        if new and not new.endswith(REPLACEMENT):
            self._text += new
            self._prefix, self._read = self._read, len(self.ids)
            return self._text
        return self._text + new

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=False)
