"""Model FLOPs utilisation (MFU): the FLOPs a training step must do, over what the devices could do.

FLOPs per trained token (PaLM, appendix B; the formula docs/trainer.md states):

    6 * N  +  12 * L * H * T

N: parameters that take part in a matmul (every weight matrix, the output head included; the input
embedding is a lookup and does not count), L: decoder layers, H: the attention width (heads x head
dim), T: sequence length. 6N is a forward (2N) and a backward (4N) pass through the weights; the
second term is attention's QK^T and AV products, counted over the full T x T square as PaLM and most
reports do (so causal masking is not halved, and MFU stays comparable with theirs). Activation
checkpointing's recomputation is not counted: MFU is the useful work, not the work done.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks, TFLOP/s per device (vendor data sheets, no sparsity). Matched by
# substring of torch.cuda.get_device_name(), first hit wins (so the specific names come first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def flops_per_token(model: torch.nn.Module, *, seq_length: int) -> float:
    """Training FLOPs per token of a decoder-only transformers model (module docstring)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    matmul_params = sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.ndim >= 2 and p is not embed
    )
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed:  # tied: the head is a matmul with the embedding's weights
        matmul_params += embed.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention_width = cfg.num_attention_heads * head_dim
    return 6.0 * matmul_params + 12.0 * cfg.num_hidden_layers * attention_width * seq_length


def peak_tflops(device: torch.device, *, bf16: bool, override: float | None = None) -> float | None:
    """Peak dense TFLOP/s of one device: the override, else the table for a CUDA device in bf16,
    else None (CPUs, unknown GPUs, fp32 runs: MFU is not reported rather than made up)."""
    if override is not None:
        return override
    if device.type != "cuda" or not bf16:
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def mfu(tokens_per_second_per_device: float, flops_token: float, peak: float | None) -> float | None:
    """Share of the device's peak the training does (0-1), or None without a peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_second_per_device * flops_token / (peak * 1e12)
