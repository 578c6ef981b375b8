from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from trainer.loop import IGNORE, collate, is_flash, is_flex, lm_loss, lr_factor, throughput, use_bf16
from trainer.objectives import Packed


def test_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, warmup=10, total=100, schedule="cosine", floor=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, warmup=0, total=100, schedule="constant", floor=0.1) == 1.0
    assert lr_factor(55, warmup=10, total=100, schedule="linear", floor=0.0) == pytest.approx(0.5)


def test_collate_ignores_padding_and_masks_documents():
    seq = Packed(ids=[5, 6, 7, 8, 9, 0], segments=[1, 1, 2, 2, 2, 0])
    b = collate([seq], pad_id=0, document_mask=True, device=torch.device("cpu"))
    assert b["labels"].tolist() == [[5, 6, 7, 8, 9, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0]]
    mask = b["attention_mask"][0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False]  # token 3 sees only its own document
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert "attention_mask" not in collate([seq], pad_id=0, document_mask=False, device=torch.device("cpu"))


# Three rows of packed pieces (segment numbers restart per row; 0 = padding at the end).
PACKED = [
    Packed(ids=[11, 12, 13, 14, 15, 16, 17, 18], segments=[1, 1, 1, 2, 2, 2, 2, 2]),
    Packed(ids=[21, 22, 23, 24, 25, 26, 0, 0], segments=[1, 1, 2, 2, 3, 3, 0, 0]),
    Packed(ids=[31, 32, 33, 34, 35, 36, 37, 38], segments=[1, 1, 1, 1, 1, 1, 1, 1]),
]


def test_flat_layout_gives_flash_attention_one_row_whose_positions_mark_the_pieces():
    b = collate(PACKED, pad_id=0, document_mask=True, device=torch.device("cpu"), flat=True)
    assert set(b) == {"input_ids", "labels", "position_ids"}  # no 4D mask: flash would read it as padding
    assert b["input_ids"].shape == (1, 24)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7]]
    # transformers' flash path takes its variable-length branch and finds exactly these pieces.
    assert _is_packed_sequence(b["position_ids"], batch_size=1)
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(b["position_ids"])
    assert cu_seqlens.tolist() == [0, 3, 8, 10, 12, 14, 16, 24]
    # A row's first token is nobody's target once the rows are joined; padding never is.
    labels = b["labels"][0].tolist()
    assert labels[8] == labels[16] == labels[14] == labels[15] == IGNORE
    assert labels[9] == 22 and labels[17] == 32
    assert is_flash("flash_attention_2") and is_flash("flash_attention_3") and not is_flash("sdpa")


def _varlen_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """What FlashAttention's variable-length kernel computes for one packed row, on a CPU: causal
    attention within each piece, the pieces found from the positions as transformers finds them."""
    assert attention_mask is None and query.shape[0] == 1
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(kwargs["position_ids"])
    bounds = cu_seqlens.tolist()
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=True
            )
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def _tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def test_flat_layout_loss_equals_the_masked_layout():
    AttentionInterface.register("varlen_reference", _varlen_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register("varlen_reference", flash_attention_mask)  # flash's mask: None when unpadded
    cpu = torch.device("cpu")
    masked = collate(PACKED, pad_id=0, document_mask=True, device=cpu)
    flat = collate(PACKED, pad_id=0, document_mask=True, device=cpu, flat=True)
    with torch.no_grad():
        model = _tiny_llama("sdpa")
        loss_masked, n_masked = lm_loss(model, masked, bf16=False)
        model.set_attn_implementation("varlen_reference")
        loss_flat, n_flat = lm_loss(model, flat, bf16=False)
        # Without ignoring each row's first token, the joined row would have two extra targets.
        unfixed = {
            **flat,
            "labels": collate(PACKED, pad_id=0, document_mask=False, device=cpu)["labels"].reshape(1, -1),
        }
        _, n_unfixed = lm_loss(model, unfixed, bf16=False)
    assert int(n_flat) == int(n_masked) == 19 and int(n_unfixed) == 21
    assert loss_flat.item() == pytest.approx(loss_masked.item(), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")
def test_on_a_gpu_flash_attention_loss_equals_sdpa_with_the_mask():
    cuda = torch.device("cuda")
    masked = collate(PACKED, pad_id=0, document_mask=True, device=cuda)
    flat = collate(PACKED, pad_id=0, document_mask=True, device=cuda, flat=True)
    with torch.no_grad():
        model = _tiny_llama("sdpa").to(cuda, torch.bfloat16)
        loss_masked, _ = lm_loss(model, masked, bf16=True)
        model.set_attn_implementation("flash_attention_2")
        loss_flat, _ = lm_loss(model, flat, bf16=True)
    assert loss_flat.item() == pytest.approx(loss_masked.item(), rel=2e-2)


def test_auto_precision_counts_only_gpus_with_native_bf16(monkeypatch):
    # torch.cuda.is_bf16_supported() is True by default on a V100/T4, which only emulate bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    cuda = torch.device("cuda")
    assert not use_bf16("auto", cuda)
    assert use_bf16("bf16", cuda) and not use_bf16("fp32", cuda)


@pytest.mark.gpu
def test_on_a_gpu_auto_precision_is_bf16_from_ampere_on():
    cuda = torch.device("cuda")
    assert use_bf16("auto", cuda) == (torch.cuda.get_device_capability()[0] >= 8)


def test_accumulation_skips_ddps_all_reduce_also_when_the_model_is_compiled(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainer.loop import _no_sync

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
        for model in (ddp, torch.compile(ddp)):  # job.py compiles the wrapped model
            with _no_sync(model, last=False):
                assert not ddp.require_backward_grad_sync  # no all-reduce on this micro-step's backward
            assert ddp.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


def _cpu_has_avx512() -> bool:
    try:
        return " avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.slow  # flex_attention compiles its kernel on first use (~30 s on a CPU)
@pytest.mark.skipif(
    not _cpu_has_avx512(),
    reason="torch 2.13's CPU flex_attention returned NaN for the full-length row on an AVX2-only EPYC "
    "(2026-12-06; the same test passes on AVX-512 CPUs). The trainer runs flex_attention on CUDA only.",
)
def test_block_mask_layout_output_equals_the_4d_mask():
    """The varlen path for documentMask: flex_attention with a BlockMask of the pieces computes what
    sdpa computes under the dense (B, 1, T, T) mask (forward only: CPUs have no flex backward)."""
    cpu = torch.device("cpu")
    masked = collate(PACKED, pad_id=0, document_mask=True, device=cpu)
    blocks = collate(PACKED, pad_id=0, document_mask=True, device=cpu, block_mask=True)
    assert type(blocks["attention_mask"]).__name__ == "BlockMask"
    assert torch.equal(blocks["position_ids"], masked["position_ids"])
    with torch.no_grad():
        model = _tiny_llama("sdpa")
        dense = model(**{k: v for k, v in masked.items() if k != "labels"}, use_cache=False).logits
        model.set_attn_implementation("flex_attention")
        flex = model(**{k: v for k, v in blocks.items() if k != "labels"}, use_cache=False).logits
    assert torch.allclose(flex, dense, atol=1e-5)
    assert is_flex("flex_attention") and not is_flex("sdpa")


@pytest.mark.gpu
def test_on_a_gpu_flex_attention_trains_like_sdpa_with_the_mask():
    cuda = torch.device("cuda")
    masked = collate(PACKED, pad_id=0, document_mask=True, device=cuda)
    blocks = collate(PACKED, pad_id=0, document_mask=True, device=cuda, block_mask=True)
    losses, grads = [], []
    for attn, batch in (("sdpa", masked), ("flex_attention", blocks)):
        model = _tiny_llama("sdpa").to(cuda).train()
        model.set_attn_implementation(attn)
        loss, _ = lm_loss(model, batch, bf16=False)
        loss.backward()
        losses.append(loss.item())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert torch.allclose(grads[1], grads[0], atol=1e-4)


def test_throughput_reports_per_device_and_mfu_only_with_a_peak():
    out = throughput(4000.0, 2.0, 2, flops_per_token=1e9, peak_tflops=1.0)
    assert out == {"tokens_per_second": 2000.0, "tokens_per_second_per_device": 1000.0, "mfu": 1.0}
    assert "mfu" not in throughput(4000.0, 2.0, 2, flops_per_token=1e9, peak_tflops=None)
    assert throughput(0.0, 2.0, 2, flops_per_token=1e9, peak_tflops=1.0) == {}  # a window of warm-up only


class _Rows:
    """Random token rows of two documents (the loop's data, without a tokenizer)."""

    def __init__(self) -> None:
        self.g = torch.Generator().manual_seed(3)

    def next(self) -> Packed:
        return Packed(ids=torch.randint(2, 64, (16,), generator=self.g).tolist(), segments=[1] * 8 + [2] * 8)


def test_a_compiled_runs_first_step_is_the_warm_up_left_out_of_tokens_per_second(caplog):
    from midfill.api.trainingrun import TrainingSpec
    from trainer.loop import LoopHooks, LoopState, make_optimizer, train
    from trainer.parallel import Dist

    model = _tiny_llama("sdpa").train()
    spec = TrainingSpec(seq_length=16, global_batch_tokens=32, micro_batch_size=2, steps=3, log_interval_steps=1)
    optimizer = make_optimizer(model, spec, torch.device("cpu"))
    logs: list[dict] = []
    with caplog.at_level("INFO", logger="trainer.loop"):
        train(
            model=model,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
            packer=_Rows(),  # type: ignore[arg-type]
            spec=spec,
            state=LoopState(),
            total_steps=3,
            accum=1,
            pad_id=0,
            document_mask=False,
            bf16=False,
            d=Dist(),
            hooks=LoopHooks(on_log=lambda s, m: logs.append(m), on_eval=lambda s: None, on_checkpoint=lambda s: None),
            checkpoint_interval=100,
            compiled=True,  # the loss is compiled; the model is left eager to keep the test short
        )
    assert "compile warm-up" in caplog.text
    assert "tokens_per_second" not in logs[0] and "loss" in logs[0]  # step 1 was the compilation
    assert logs[1]["tokens_per_second"] > 0 and logs[2]["tokens_per_second_per_device"] > 0


def test_steps_within_a_budget_count_the_time_left_and_never_exceed_the_plan():
    from trainer.loop import steps_within

    assert steps_within(60, elapsed_s=10, step_s=0.5, step=11, planned=1000) == 111
    assert steps_within(60, elapsed_s=10, step_s=0.01, step=11, planned=1000) == 1000  # the plan fits
    assert steps_within(60, elapsed_s=70, step_s=0.5, step=11, planned=1000) == 11  # already spent: stop


def _budget_run(budget_s: float, *, on_eval=lambda s: None, eval_interval: int = 1000, fitted: int | None = None):
    """The tiny model planned for 100,000 steps under a time budget: (state, plans, scheduler, spec)."""
    from midfill.api.trainingrun import TrainingSpec
    from trainer.loop import LoopHooks, LoopState, make_optimizer, make_scheduler, train
    from trainer.parallel import Dist

    model = _tiny_llama("sdpa").train()
    spec = TrainingSpec(
        seq_length=16,
        global_batch_tokens=16,
        micro_batch_size=1,
        steps=100_000,
        warmup_steps=2,
        log_interval_steps=5,
        eval_interval_steps=eval_interval,
    )
    optimizer = make_optimizer(model, spec, torch.device("cpu"))
    state = LoopState(total_steps=fitted)  # fitted: as a resumed run restores it from its checkpoint
    scheduler = make_scheduler(optimizer, spec, total_steps=100_000, state=state)
    plans: list[int] = []
    hooks = LoopHooks(on_log=lambda s, m: None, on_eval=on_eval, on_checkpoint=lambda s: None, on_plan=plans.append)
    train(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        packer=_Rows(),  # type: ignore[arg-type]
        spec=spec,
        state=state,
        total_steps=100_000,
        accum=1,
        pad_id=0,
        document_mask=False,
        bf16=False,
        d=Dist(),
        hooks=hooks,
        checkpoint_interval=100_000,
        time_budget_s=budget_s,
    )
    return state, plans, scheduler, spec


def test_a_time_budget_fits_the_step_count_and_the_lr_still_reaches_its_floor():
    state, plans, scheduler, spec = _budget_run(3.0)
    assert plans and plans[-1] == state.step == state.total_steps < 100_000
    floor = spec.learning_rate * spec.min_learning_rate_ratio
    decayed = (spec.learning_rate - scheduler.get_last_lr()[0]) / (spec.learning_rate - floor)
    # Fitted, not cut: the cosine ended (nearly) at its floor; a run merely cut would stop near the peak.
    # Not exactly: under load the last fit may overshoot by a few steps and the run stop at a log step.
    assert decayed > 0.9


def test_a_run_pushed_past_its_budget_by_evaluation_stops_at_the_next_log_interval(caplog):
    import time as _time

    with caplog.at_level("WARNING", logger="trainer.loop"):
        state, plans, _, _ = _budget_run(4.0, on_eval=lambda s: _time.sleep(4.5), eval_interval=15)
    assert state.step == state.total_steps == 20  # evaluated at 15 (past the budget), stopped at log step 20
    assert plans[-1] == 20 and "time budget (4 s) spent at step 20 of 100000" in caplog.text


def test_a_resumed_run_keeps_the_step_count_its_budget_fitted_before():
    state, plans, _, _ = _budget_run(20.0, fitted=30)
    assert state.step == state.total_steps == 30 and plans == []  # not refitted to the new attempt's time
