from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.flash_attention import get_target_dtype
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from trainer.evaluate import InfillCase, line_infill_exact_match

CASES = [InfillCase(prefix="def f(x):\n    ", suffix="\n    return y\n", middle="y = x")]


def _half_only(module, query, key, value, attention_mask, **kwargs):
    """sdpa behind FlashAttention's dtype rule: transformers' flash path casts fp32 inputs to
    `get_target_dtype` (the autocast dtype, else the weights'), and flash-attn refuses anything
    but fp16/bf16."""
    dtype = get_target_dtype(query, module) or query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _tiny_llama(vocab_size: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)  # fp32, as the trainer keeps it outside FSDP's mixed precision


def test_infill_decoding_runs_in_the_trainings_bf16_for_flash_attention(bpe):
    AttentionInterface.register("half_only", _half_only)
    ALL_MASK_ATTENTION_FUNCTIONS.register("half_only", flash_attention_mask)
    model = _tiny_llama(bpe.get_vocab_size(), "half_only")
    cpu = torch.device("cpu")
    em = line_infill_exact_match(model, bpe, CASES, max_context=256, device=cpu, bf16=True)
    assert em is not None and 0 <= em <= 1
    with pytest.raises(RuntimeError, match="fp16 and bf16"):  # what an fp32 run hands the kernel
        line_infill_exact_match(model, bpe, CASES, max_context=256, device=cpu, bf16=False)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")
def test_on_a_gpu_infill_decoding_with_flash_attention_on_fp32_weights(bpe):
    model = _tiny_llama(bpe.get_vocab_size(), "flash_attention_2").to("cuda")
    em = line_infill_exact_match(model, bpe, CASES, max_context=256, device=torch.device("cuda"), bf16=True)
    assert em is not None and 0 <= em <= 1


def test_training_infill_cases_are_cut_as_line_em_cuts_them(tmp_path):
    """Statements inside function bodies, the prefix ending in the indentation (what editors send)."""
    from trainer.data import Corpus, FileRef
    from trainer.evaluate import infill_cases

    refs = []
    for i in range(6):
        path = tmp_path / f"m{i}.py"
        path.write_text(f"X = {i}\n\n\ndef f(a):\n    b = a + {i}\n    if b:\n        return b * 2\n    return None\n")
        refs.append(FileRef(source=0, kind="code", url=str(path), rel=path.name, size=path.stat().st_size))
    corpus = Corpus(train=[refs[:1]], validation=refs, weights=[1.0])
    cases = infill_cases(corpus, n=6, seed=0)
    assert len(cases) == 6
    for case in cases:
        assert case.middle in {f"b = a + {i}" for i in range(6)} | {"return b * 2", "return None"}
        assert case.prefix.endswith("\n    ") or case.prefix.endswith("\n        ")
        assert case.suffix.startswith("\n")
