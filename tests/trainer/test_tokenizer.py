from __future__ import annotations

from transformers import AutoTokenizer

from midfill import fim
from trainer import tokenizer as toklib

CODE = [
    "def f(x):\n\treturn x\t# tab\n",
    "    if a  ==  b:   \n        pass\n\n\n",
    "s = 'héllo wörld — 日本語 🎉'\n",
    "x\r\ny\r\n\u00a0\u200b end",
    "",
]


def test_round_trips_code_exactly(bpe, code_texts):
    for text in CODE + code_texts:
        assert bpe.decode(bpe.encode(text).ids) == text


def test_special_tokens_have_stable_ids(bpe):
    for i, token in enumerate(fim.special_tokens(8)):
        assert bpe.token_to_id(token) == i
    ids = bpe.encode(f"a{fim.mask_token(1)}b{fim.EOS}{fim.SEP}").ids
    assert bpe.token_to_id(fim.mask_token(1)) in ids and bpe.token_to_id(fim.SEP) in ids


def test_saved_folder_loads_with_autotokenizer(bpe, tmp_path):
    toklib.save(toklib.to_hf(bpe, num_mask_tokens=8), str(tmp_path / "tok"))
    assert toklib.exists(str(tmp_path / "tok"))
    auto = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert auto.eos_token == fim.EOS and auto.pad_token == fim.PAD
    text = CODE[0] + CODE[2]
    assert auto.decode(auto(text)["input_ids"]) == text
    prompt = fim.CODEGEN2.infill_prompt("def f(", ")\n")
    assert auto.convert_ids_to_tokens(auto(prompt)["input_ids"])[-3:] == [fim.EOS, fim.SEP, fim.mask_token(1)]
    toklib.check_specials(toklib.load(str(tmp_path / "tok")), num_mask_tokens=8)


def test_a_prompt_ending_in_indentation_ends_on_a_boundary_training_text_has(bpe, code_texts):
    """An editor's prefix that stops after a line's indentation tokenizes as the start of the same
    text with the statement: the model continues from a token sequence it was trained on (GPT-2's
    split glued the last indentation space to the statement's first word instead)."""
    for text in code_texts:
        lines = text.split("\n")
        for i, line in enumerate(lines):
            body = line.lstrip()
            if not body or body == line:
                continue
            prefix = "\n".join(lines[:i]) + "\n" + line[: len(line) - len(body)]
            whole = bpe.encode(prefix + body).ids
            cut = bpe.encode(prefix).ids
            assert whole[: len(cut)] == cut, repr(prefix[-40:] + "|" + body)
    pieces = [piece for piece, _ in bpe.pre_tokenizer.pre_tokenize_str("\n        return x")]
    assert pieces == ["ĊĠĠĠĠĠĠĠĠ", "return", "Ġx"]  # byte-level symbols: Ċ newline, Ġ space
