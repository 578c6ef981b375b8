"""FIM formats: the exact CodeGen2/StarCoder prompt strings and StarCoder-template parsing."""

from __future__ import annotations

import pytest

from midfill.fim import CODEGEN2, STARCODER, get_format, parse_starcoder_prompt, special_tokens


def test_codegen2_infill_prompt_is_exactly_the_paper_format() -> None:
    prompt = CODEGEN2.infill_prompt("def f(x):\n    return ", "\n\nprint(f(2))\n")
    assert prompt == "def f(x):\n    return <mask_1>\n\nprint(f(2))\n<|endoftext|><sep><mask_1>"
    assert CODEGEN2.stop_tokens == ("<eom>", "<|endoftext|>")


def test_starcoder_psm_prompt() -> None:
    assert STARCODER.infill_prompt("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<fim_prefix>def f():<fim_suffix>\nreturn 1<fim_middle>", ("def f():", "\nreturn 1")),
        ("<fim_prefix><fim_suffix>\nreturn 1<fim_middle>def f():", ("def f():", "\nreturn 1")),
        ("<fim_prefix>a<fim_suffix>c<fim_middle>b", ("ab", "c")),  # a middle already begun
        ("<fim_prefix>x<fim_suffix><fim_middle>", ("x", "")),
        ("plain prompt", None),
        ("<fim_prefix>no suffix marker<fim_middle>", None),
    ],
)
def test_parse_starcoder_prompt(prompt: str, expected) -> None:
    assert parse_starcoder_prompt(prompt) == expected


def test_special_tokens_are_stable_and_unique() -> None:
    tokens = special_tokens(3)
    assert tokens[:4] == ["<|endoftext|>", "<pad>", "<sep>", "<eom>"]
    assert tokens[4:7] == ["<mask_1>", "<mask_2>", "<mask_3>"]
    assert len(set(tokens)) == len(tokens)


def test_unknown_format_names_the_choices() -> None:
    with pytest.raises(ValueError, match="codegen2, starcoder"):
        get_format("santacoder")
