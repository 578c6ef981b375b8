"""Fill-in-the-middle prompt formats, shared by the trainer (what it teaches) and serving (what it
prompts). docs/research.md sections 1 and 3 are the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EOS = "<|endoftext|>"
PAD = "<pad>"
SEP = "<sep>"
EOM = "<eom>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"


def mask_token(i: int) -> str:
    """The i-th CodeGen2 span sentinel, 1-based: <mask_1>, <mask_2>, ..."""
    assert i >= 1
    return f"<mask_{i}>"


def special_tokens(num_mask_tokens: int) -> list[str]:
    """Every special token a midfill tokenizer carries, in a fixed order (ids are stable)."""
    return [
        EOS,
        PAD,
        SEP,
        EOM,
        *(mask_token(i) for i in range(1, num_mask_tokens + 1)),
        FIM_PREFIX,
        FIM_SUFFIX,
        FIM_MIDDLE,
    ]


@dataclass(frozen=True)
class FimFormat:
    """How a model was taught to infill: the prompt it expects and the tokens that end the middle."""

    name: str
    stop_tokens: tuple[str, ...]

    def infill_prompt(self, prefix: str, suffix: str) -> str:
        """The prompt whose continuation is the middle."""
        if self.name == "codegen2":
            # prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>  -> generate middle, stop at <eom>
            return f"{prefix}{mask_token(1)}{suffix}{EOS}{SEP}{mask_token(1)}"
        if self.name == "starcoder":
            return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
        raise AssertionError(self.name)


CODEGEN2 = FimFormat(name="codegen2", stop_tokens=(EOM, EOS))
STARCODER = FimFormat(name="starcoder", stop_tokens=(EOS,))
FORMATS = {f.name: f for f in (CODEGEN2, STARCODER)}


def get_format(name: str) -> FimFormat:
    """The format called `name`; ValueError naming the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown FIM format {name!r}; use one of {', '.join(FORMATS)}") from None


_PSM = re.compile(
    re.escape(FIM_PREFIX) + r"(.*?)" + re.escape(FIM_SUFFIX) + r"(.*?)" + re.escape(FIM_MIDDLE) + r"(.*)\Z", re.S
)
_SPM = re.compile(re.escape(FIM_PREFIX) + re.escape(FIM_SUFFIX) + r"(.*?)" + re.escape(FIM_MIDDLE) + r"(.*)\Z", re.S)


def parse_starcoder_prompt(prompt: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a prompt an editor templated with StarCoder sentinels, else None.

    PSM: <fim_prefix>P<fim_suffix>S<fim_middle>    SPM: <fim_prefix><fim_suffix>S<fim_middle>P
    Text after <fim_middle> in PSM is a middle already begun; it stays part of the prefix side.
    """
    spm = _SPM.match(prompt)
    if spm:
        return spm.group(2), spm.group(1)
    psm = _PSM.match(prompt)
    if psm:
        return psm.group(1) + psm.group(3), psm.group(2)
    return None
