"""The optimisation loop: gradient accumulation to the global batch, clipping, warmup + cosine,
bf16 autocast where the hardware has it, periodic logging, evaluation and checkpoints.

The loop keeps Python per micro-step small (no host syncs except at log intervals) and uses a
fused/foreach AdamW, which is most of what a CPU allows (see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from midfill.api.trainingrun import TrainingSpec
from midfill.hardware import cpu_has_native_bf16
from trainer.flops import mfu
from trainer.objectives import Packed, Packer
from trainer.parallel import Dist, all_reduce_sum

log = logging.getLogger(__name__)
IGNORE = -100


def bf16_supported(device: torch.device) -> bool:
    """GPUs with bf16, or CPUs with native bf16 instructions (autocast elsewhere is slower than fp32).
    On CUDA that is compute capability 8+ (Ampere on): torch's default also counts GPUs that only
    emulate bf16 (V100, T4), where FlashAttention does not run either."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_native_bf16()


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    return bf16_supported(device)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, floor: float) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup, then cosine/linear decay to floor."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def make_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainingSpec, *, total_steps: int, state: LoopState | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The spec's learning rate schedule over `total_steps` (warmup, then `lr_factor`'s decay), or
    over state.total_steps once a time budget has fitted it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s,
            warmup=spec.warmup_steps,
            total=(state.total_steps if state is not None else None) or total_steps,
            schedule=spec.schedule,
            floor=spec.min_learning_rate_ratio,
        ),
    )


def make_optimizer(model: torch.nn.Module, spec: TrainingSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; fused kernels where the device has them."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": spec.learning_rate, "betas": (0.9, 0.95), "eps": 1e-8}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # DTensor params or a device without the fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def collate(
    seqs: list[Packed],
    *,
    pad_id: int,
    document_mask: bool,
    device: torch.device,
    flat: bool = False,
    block_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch; labels ignore padding. With document_mask, attention and
    positions restart at every piece: for sdpa through a (B, 1, T, T) mask; with `flat` (the model
    runs FlashAttention) through the positions alone, in one row of B x T tokens. transformers'
    flash_attention_2 finds the pieces from the positions (its variable-length kernel) only in a
    single row, and would read a 4D mask as a padding mask. With `block_mask` (the model runs
    flex_attention) through a flex BlockMask of the pieces: blocks across pieces are skipped, not
    computed and masked, so packing costs close to nothing."""
    ids = torch.tensor([s.ids for s in seqs], dtype=torch.long)
    seg = torch.tensor([s.segments for s in seqs], dtype=torch.long)
    labels = ids.masked_fill(seg == 0, IGNORE)
    batch = {"input_ids": ids, "labels": labels}
    if document_mask:
        L = ids.shape[1]
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        idx = torch.arange(L).expand_as(seg)
        last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        batch["position_ids"] = idx - last_start
        if block_mask:
            on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            on_device["attention_mask"] = document_block_mask(seg.to(device))
            return on_device
        if flat:
            # Joined into one row, each row's first token would be the target of the previous row's
            # last one; as separate rows it is nobody's target. Ignoring it keeps the loss the same.
            labels[:, 0] = IGNORE
            batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        else:
            causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
            batch["attention_mask"] = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def document_block_mask(segments: torch.Tensor):
    """The flex_attention BlockMask of causal attention within each piece: segments (B, T) numbers
    the pieces of each row (collate's Packed.segments; padding is a piece of its own)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_piece_causal(b, h, q, kv):
        return (segments[b, q] == segments[b, kv]) & (q >= kv)

    B, T = segments.shape
    return create_block_mask(same_piece_causal, B, None, T, T, device=segments.device)


def is_flex(attn_implementation: str) -> bool:
    """Whether the model's attention is flex_attention (collate's BlockMask for documents)."""
    return attn_implementation == "flex_attention"


def is_flash(attn_implementation: str) -> bool:
    """Whether the model's attention is FlashAttention (collate's `flat` layout for documents)."""
    return attn_implementation.startswith("flash_attention")


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32: logits (B, T, V) at t predict labels (B, T) at t+1."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


@functools.cache
def _compiled_token_loss():
    # Compiled apart from the model: fusing the fp32 upcast into the log-softmax saves writing and
    # re-reading a (B*T, V) fp32 tensor each way, a large share of a small model's step on a CPU.
    return torch.compile(token_loss, dynamic=False)


def lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, bf16: bool, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses in fp32, number of predicted tokens)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    loss_fn = _compiled_token_loss() if compiled else token_loss
    return loss_fn(logits, batch["labels"]), (batch["labels"][:, 1:] != IGNORE).sum()


def throughput(
    tokens: float, elapsed: float, world_size: int, flops_per_token: float | None, peak_tflops: float | None
) -> dict[str, float]:
    """tokens_per_second (all processes), tokens_per_second_per_device and mfu (where a peak is
    known); nothing when no token was timed (a log window that held only the compile warm-up)."""
    if tokens <= 0:
        return {}
    total = tokens / max(elapsed, 1e-9)
    out = {"tokens_per_second": total, "tokens_per_second_per_device": total / world_size}
    if flops_per_token is not None:
        used = mfu(total / world_size, flops_per_token, peak_tflops)
        if used is not None:
            out["mfu"] = used
    return out


@dataclass
class LoopState:
    step: int = 0
    total_steps: int | None = None  # the step count a time budget fitted; None = the planned count


# Steps timed (a compiled run's warm-up step not among them) before a time budget fits the step count.
FIT_AFTER_STEPS = 10


def steps_within(budget_s: float, *, elapsed_s: float, step_s: float, step: int, planned: int) -> int:
    """The step count a time budget allows: this step plus as many more as the time left holds at
    `step_s` seconds each, at most the planned count."""
    more = int(max(0.0, budget_s - elapsed_s) / max(step_s, 1e-9))
    return max(step, min(planned, step + more))


class TimeBudget:
    """training.timeBudgetMinutes in the loop. After FIT_AFTER_STEPS timed steps, and again at every
    log interval, the step count is fitted to the time left (state.total_steps) at the mean time per
    step so far, evaluations and checkpoints included; the LR schedule follows it, so warmup and
    decay complete within the budget. A run that is out of time at a log interval stops there.
    Every rank takes the same decisions, from all-reduced times at the same steps."""

    def __init__(self, seconds: float, d: Dist, *, refit: bool = True) -> None:
        self.seconds, self.d = seconds, d
        self.refit = refit  # False for a resumed run: it keeps the count fitted before, only the stop applies
        self.start = time.perf_counter()
        self.timed_from: tuple[int, float] | None = None  # (step, time) the step timing starts at

    def _now(self) -> float:
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)  # the steps queued so far are part of the time
        return time.perf_counter()

    def after_step(self, state: LoopState, planned: int, *, timing: bool, at_log: bool) -> None:
        if not timing:
            return
        if self.timed_from is None:
            self.timed_from = (state.step, self._now())
            return
        first, since = self.timed_from
        fitted = state.total_steps is not None
        if (not fitted and state.step - first < FIT_AFTER_STEPS) or (fitted and not at_log):
            return  # no device sync on the steps in between
        now = self._now()
        elapsed, step_s = (
            x / self.d.world_size
            for x in all_reduce_sum([now - self.start, (now - since) / (state.step - first)], self.d)
        )
        if elapsed >= self.seconds:
            log.warning("time budget (%.0f s) spent at step %d of %d: stopping here", self.seconds, state.step, planned)
            state.total_steps = state.step
            return
        if fitted and not self.refit:
            return
        state.total_steps = steps_within(
            self.seconds, elapsed_s=elapsed, step_s=step_s, step=state.step, planned=planned
        )
        if not fitted:
            log.info(
                "time budget %.0f s: %.3f s per step, %.0f s spent; training %d of the %d planned steps "
                "(refitted at every log interval)",
                self.seconds,
                step_s,
                elapsed,
                state.total_steps,
                planned,
            )


@dataclass
class LoopHooks:
    """What the loop calls out to (all take the step just finished)."""

    on_log: Callable[[int, dict[str, float]], None]
    on_eval: Callable[[int], None]
    on_checkpoint: Callable[[int], None]
    on_plan: Callable[[int], None] = lambda total_steps: None  # a time budget changed the step count


def _no_sync(model: torch.nn.Module, last: bool):
    if last:
        return contextlib.nullcontext()
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module (job: wrap, then compile)
    if isinstance(ddp, DistributedDataParallel):
        return ddp.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _progress_bar(total_steps: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


def _next_sequences(packer: Packer, n: int) -> list[Packed]:
    seqs = [s for s in (packer.next() for _ in range(n)) if s is not None]
    if len(seqs) < n:
        raise AssertionError("the training stream is endless; it cannot run out")
    return seqs


@dataclass
class _Window:
    """Loss, tokens and steps since the last log; the loss stays on the device until then."""

    loss: torch.Tensor
    tokens: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens, self.steps, self.start = 0, 0, time.perf_counter()

    def metrics(
        self,
        step: int,
        grad_norm: torch.Tensor,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        accum: int,
        d: Dist,
        flops_per_token: float | None,
        peak: float | None,
    ) -> dict[str, float]:
        """The log interval's metrics, summed over the processes (a collective: every rank calls it)."""
        elapsed = time.perf_counter() - self.start
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_total, tokens_total = all_reduce_sum([float(self.loss), float(self.tokens)], d)
        return {
            "loss": loss_total / (self.steps * accum * d.world_size),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "step": float(step),
            **throughput(tokens_total, elapsed, d.world_size, flops_per_token, peak),
        }


def _accumulate(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    last: bool,
    accum: int,
    bf16: bool,
    compiled: bool,
    window: _Window,
) -> None:
    """Forward and backward one micro-batch; gradients sync across processes on the last one only."""
    if hasattr(model, "set_requires_gradient_sync") and last:
        model.set_requires_gradient_sync(True)
    with _no_sync(model, last):
        loss_sum, n = lm_loss(model, batch, bf16=bf16, compiled=compiled)
        (loss_sum / n.clamp(min=1) / accum).backward()
    window.loss += (loss_sum.detach() / n.clamp(min=1)).double()
    window.tokens += batch["input_ids"].numel()


def _clip_gradients(params: list[torch.nn.Parameter], grad_clip: float) -> torch.Tensor:
    """The global grad norm, clipped to grad_clip (0 = measured only)."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def train(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    packer: Packer,
    spec: TrainingSpec,
    state: LoopState,
    total_steps: int,
    accum: int,
    pad_id: int,
    document_mask: bool,
    bf16: bool,
    d: Dist,
    hooks: LoopHooks,
    flat: bool = False,
    block_mask: bool = False,
    checkpoint_interval: int,
    show_bar: bool = False,
    prepare_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    compiled: bool = False,
    flops_per_token: float | None = None,
    peak_tflops: float | None = None,
    time_budget_s: float | None = None,
) -> None:
    """Run optimizer steps from state.step to total_steps (or to state.total_steps, which a
    time budget fits), mutating state.

    flat, block_mask: collate's layouts for FlashAttention and flex_attention models.
    prepare_batch: applied to every collated micro-batch (composed codet5p models add the encoder's
    input and mask the labels it reads).
    compiled: the model is torch.compiled; the loss is then compiled too, and the first step (the
    compilation) is timed apart: logged as the warm-up and left out of tokens/s.
    flops_per_token, peak_tflops: for the `mfu` metric (trainer.flops); left out without a peak.
    time_budget_s: spec.training.timeBudgetMinutes in seconds (TimeBudget); a resumed run keeps the
    step count fitted before (state.total_steps) and only stops early if it overruns.

    Long only in its signature (every knob keyword-only and named); the steps are the helpers above."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = _progress_bar(total_steps, state.step) if show_bar and d.is_main else None
    make_batch = functools.partial(
        collate, pad_id=pad_id, document_mask=document_mask, device=d.device, flat=flat, block_mask=block_mask
    )
    window = _Window(torch.zeros((), dtype=torch.float64, device=d.device))  # on the device: no sync per micro-step
    grad_norm = torch.zeros(())
    warming_up = compiled  # the first step of this process compiles the model (and the loss)
    budget = TimeBudget(time_budget_s, d, refit=state.total_steps is None) if time_budget_s else None
    while state.step < (state.total_steps or total_steps):
        for micro in range(accum):
            batch = make_batch(_next_sequences(packer, spec.micro_batch_size))
            if prepare_batch is not None:
                batch = prepare_batch(batch)
            _accumulate(model, batch, last=micro == accum - 1, accum=accum, bf16=bf16, compiled=compiled, window=window)
        grad_norm = _clip_gradients(params, spec.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window.steps += 1
        if bar is not None:
            bar.update(1)
        if warming_up:  # the compiled step: its time is the warm-up, not throughput
            warming_up = False
            float(window.loss)  # waits for the step to finish
            log.info("compile warm-up: %.1f s (first step, left out of tokens/s)", time.perf_counter() - window.start)
            window.tokens, window.start = 0, time.perf_counter()
        at_log = state.step % spec.log_interval_steps == 0
        if budget is not None:
            before = state.total_steps
            budget.after_step(state, total_steps, timing=not warming_up, at_log=at_log)
            if state.total_steps != before:
                hooks.on_plan(state.total_steps)
                if bar is not None:
                    bar.total = state.total_steps
                    bar.refresh()
        end = state.total_steps or total_steps
        if at_log or state.step == end:
            metrics = window.metrics(
                state.step, grad_norm, scheduler, accum=accum, d=d, flops_per_token=flops_per_token, peak=peak_tflops
            )
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics.get('tokens_per_second', 0):.0f}")
            hooks.on_log(state.step, metrics)
            window.reset()
        if state.step % spec.eval_interval_steps == 0 and state.step < end:
            hooks.on_eval(state.step)
            model.train()
            window.start = time.perf_counter()
        if state.step % checkpoint_interval == 0 or state.step == end:
            hooks.on_checkpoint(state.step)
            window.start = time.perf_counter()
    if bar is not None:
        bar.close()
