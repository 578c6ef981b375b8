"""One training job from start to finish: prepare (validate everything that can be wrong with the
config, exit 78 on it), resume, train, evaluate, export and register.

Read top-down: `run_job` is the whole story; the steps live in their own modules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from midfill.api import TrainingRun
from midfill.api.trainingrun import TrainingSpec
from midfill.progress import ProgressRecord
from midfill.registry import Registry
from trainer import checkpoint, composed_job, evaluate, export, fetch, flops, loop, parallel, preflight, weights
from trainer import tokenizer as toklib
from trainer.data import Corpus, DocumentStream, read_text
from trainer.model import build_model, is_on_meta, num_params
from trainer.objectives import Packer
from trainer.post_eval import run_post_registration_eval
from trainer.recipes import Recipe, get_recipe
from trainer.reporting import Reporter
from trainer.settings import RunPaths, TrainerSettings, default_run_uid
from trainer.tracking import Tracker, flatten

log = logging.getLogger(__name__)
INFILL_CASES = 16


class ConfigError(ValueError):
    """The spec cannot run as written (exit code 78: retrying cannot help)."""


@dataclass
class Prepared:
    run: TrainingRun
    uid: str
    attempt: int
    paths: RunPaths
    recipe: Recipe
    corpus: Corpus
    hf_tok: PreTrainedTokenizerFast
    tok: Tokenizer
    init_dir: Path | None
    accum: int
    total_steps: int
    composed: composed_job.ComposedSetup | None = None  # spec.model.composition, parents resolved


def prepare(
    run: TrainingRun, settings: TrainerSettings, d: parallel.Dist, *, check_only: bool = False
) -> Prepared | None:
    """Everything decided from the config, checked before any training (ConfigError names the field).

    check_only (`--check`): the checks that need no GPU, model or tokenizer training, for the
    planned world size (spec.parallelism) -- cheap enough to run before torchrun, whose own exit
    code hides the trainer's 78 (it exits 1 when any worker fails).
    """
    spec = run.spec
    world = spec.parallelism.world_size() if check_only and not d.enabled else d.world_size
    try:
        recipe = get_recipe(spec.model.recipe).with_overrides(spec.model.architecture)
        if spec.model.composition is None and spec.training.seq_length > recipe.max_position_embeddings:
            raise ValueError(
                f"training.seqLength: {spec.training.seq_length} exceeds the {recipe.name} recipe's context "
                f"({recipe.max_position_embeddings}); shorten it or set model.architecture.maxPositionEmbeddings"
            )
        per_rank = _sequences_per_rank(spec.training, world)
        corpus = Corpus.from_spec(spec.data)
        if spec.model.composition is not None:
            composed_job.check_spec(run)
        if check_only:
            problem = preflight.unwritable(run, RunPaths.for_run(run, settings))
            if problem is not None:
                raise ValueError(problem)
            return None
        composed = None
        if spec.model.composition is not None:
            parents = composed_job.fetch_parents(
                spec.model.composition, settings, lambda uri, field: fetch.fetch_init(uri, settings, d, field=field)
            )
            composed = composed_job.setup(spec.model.composition, parents, seq_length=spec.training.seq_length)
            init_dir = composed.tokenizer_dir  # the parents' tokenizer: both read the same tokens
        else:
            init_dir = fetch.fetch_init(spec.model.init, settings, d)
        hf_tok = _tokenizer(run, corpus, init_dir, RunPaths.for_run(run, settings), d)
        if composed is not None:
            composed_job.check_tokenizer(composed, hf_tok)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Prepared(
        run=run,
        uid=settings.run_uid or default_run_uid(run),
        attempt=settings.attempt,
        paths=RunPaths.for_run(run, settings),
        recipe=recipe,
        corpus=corpus,
        hf_tok=hf_tok,
        tok=hf_tok.backend_tokenizer,
        init_dir=init_dir,
        accum=per_rank // spec.training.micro_batch_size,
        total_steps=spec.training.total_steps(),
        composed=composed,
    )


def _sequences_per_rank(t: TrainingSpec, world: int) -> int:
    """Sequences each process trains on per optimizer step; the global batch must split evenly
    into micro-batches over the processes (ValueError naming the field otherwise)."""
    seqs_per_step = t.global_batch_tokens // t.seq_length
    per_rank = seqs_per_step // world
    if seqs_per_step % world or per_rank % t.micro_batch_size:
        unit = t.seq_length * t.micro_batch_size * world
        raise ValueError(
            f"training.globalBatchTokens: {t.global_batch_tokens} must be a multiple of "
            f"seqLength x microBatchSize x processes = {unit} (e.g. "
            f"{max(1, seqs_per_step * t.seq_length // unit) * unit})"
        )
    return per_rank


def _tokenizer(
    run: TrainingRun, corpus: Corpus, init_dir: Path | None, paths: RunPaths, d: parallel.Dist
) -> PreTrainedTokenizerFast:
    """The given tokenizer, the init model's, the run's saved one, or a new BPE trained by rank 0."""
    spec = run.spec.tokenizer
    given = spec.path or (str(init_dir) if init_dir else None)
    if given:
        tok = toklib.load(given)
    else:
        if d.is_main and not toklib.exists(paths.tokenizer_dir):
            texts = (t for files in corpus.train for f in files if (t := read_text(f)))
            bpe = toklib.train_bpe(
                toklib.take_bytes(texts, spec.train_bytes),
                vocab_size=spec.vocab_size,
                num_mask_tokens=spec.num_mask_tokens,
            )
            toklib.save(toklib.to_hf(bpe, num_mask_tokens=spec.num_mask_tokens), paths.tokenizer_dir)
        d.barrier()
        tok = toklib.load(paths.tokenizer_dir)
    toklib.check_specials(tok, num_mask_tokens=spec.num_mask_tokens)
    return tok


def run_job(run: TrainingRun, settings: TrainerSettings, d: parallel.Dist) -> None:
    p = prepare(run, settings, d)
    spec, t = run.spec, run.spec.training
    torch.manual_seed(t.seed)
    tracker = _start_tracker(p, settings, d)
    bf16 = loop.use_bf16(t.precision, d.device)  # decides the attention too: FlashAttention is bf16-only
    model, attn = _build_model(p, bf16=bf16)
    # Composed models (two parents, some frozen) have no single formula: no MFU for them.
    flops_token = None if p.composed else flops.flops_per_token(model, seq_length=t.seq_length)
    _log_setup(p, tracker, model, attn=attn, bf16=bf16, d=d, flops_token=flops_token)
    model = _place_model(p, model, bf16=bf16, d=d)
    parts = _training_parts(p, model, d)
    reporter = Reporter(
        tracker,
        ProgressRecord(total_steps=p.total_steps, attempt=p.attempt, mlflow_run_id=tracker.run_id),
        run_dir=p.paths.run_dir,
        is_main=d.is_main,
    )
    _resume(p, parts, model, reporter, d)
    on_eval = _evaluator(p, model, tracker, attn=attn, bf16=bf16, d=d)

    if parts.state.step < (parts.state.total_steps or p.total_steps):
        loop.train(
            model=model,
            optimizer=parts.optimizer,
            scheduler=parts.scheduler,
            packer=parts.packer,
            spec=t,
            state=parts.state,
            total_steps=p.total_steps,
            accum=p.accum,
            pad_id=p.hf_tok.pad_token_id,
            document_mask=spec.objective.document_mask,
            bf16=bf16,
            d=d,
            flat=loop.is_flash(attn),  # packed documents reach FlashAttention as one row (loop.collate)
            block_mask=loop.is_flex(attn),  # and flex_attention as a BlockMask of the documents
            hooks=loop.LoopHooks(
                on_log=reporter.on_log,
                on_eval=on_eval,
                on_checkpoint=_checkpointer(parts, model, reporter, d),
                on_plan=lambda total: reporter.write_progress(total_steps=total),
            ),
            checkpoint_interval=spec.checkpoint.interval_steps,
            show_bar=settings.progress_bar if settings.progress_bar is not None else _is_tty(),
            compiled=t.compile_on(d.device.type),
            flops_per_token=flops_token,
            peak_tflops=flops.peak_tflops(d.device, bf16=bf16, override=t.peak_tflops),
            prepare_batch=_prepare_batch(p, model),
            time_budget_s=t.time_budget_minutes * 60 if t.time_budget_minutes else None,
        )
    on_eval(parts.state.step)
    _finish(p, model=model, tracker=tracker, settings=settings, d=d, step=parts.state.step)


def _start_tracker(p: Prepared, settings: TrainerSettings, d: parallel.Dist) -> Tracker:
    """The attempt's MLflow run (rank 0 only; the other ranks get a disabled tracker)."""
    run, uri = p.run, settings.resolved_tracking_uri()
    tracker = Tracker(
        enabled=d.is_main,
        tracking_uri=uri,
        experiment=run.spec.registry.experiment_name,
        artifact_root=None if uri.startswith(("http", "databricks")) else settings.artifact_root(),
    )
    tracker.start(
        run_name=f"{run.metadata.name}-a{p.attempt}",
        uid=p.uid,
        attempt=p.attempt,
        tags={"midfill.training_run": run.metadata.name},
    )
    return tracker


def _build_model(p: Prepared, *, bf16: bool) -> tuple[torch.nn.Module, str]:
    """(model, attention implementation): the composed bridge over its parents, or one model from
    the recipe; activation checkpointing applied. A geometry that does not fit the parents or an
    attention the run cannot use is a ConfigError (the message names the field)."""
    spec = p.run.spec
    common = {
        "vocab_size": len(p.hf_tok),
        "eos_id": p.hf_tok.eos_token_id,
        "pad_id": p.hf_tok.pad_token_id,
        "seed": spec.training.seed,
        "bf16": bf16,
    }
    try:
        if p.composed is not None:
            model, attn = composed_job.build(
                p.composed, attention=spec.model.attention, seq_length=spec.training.seq_length, **common
            )
        else:
            model, attn = build_model(
                spec.model,
                p.recipe,
                init_dir=p.init_dir,
                on_meta=spec.parallelism.strategy == "fsdp",  # materialised shard by shard after wrapping
                document_mask=spec.objective.document_mask,
                **common,
            )
        parallel.checkpoint_activations(model, spec.training.activation_checkpointing)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return model, attn


def _log_setup(
    p: Prepared,
    tracker: Tracker,
    model: torch.nn.Module,
    *,
    attn: str,
    bf16: bool,
    d: parallel.Dist,
    flops_token: float | None,
) -> None:
    """The run's parameters to MLflow and one log line on the model."""
    spec = p.run.spec
    trainable = sum(t.numel() for t in {id(t): t for t in model.parameters() if t.requires_grad}.values())
    tracker.log_params(
        {
            **flatten(spec.to_wire(), "spec."),
            "attn_implementation": attn,
            "num_params": str(num_params(model)),
            "trainable_params": str(trainable),
            "world_size": str(d.world_size),
            "grad_accumulation": str(p.accum),
            "bf16": str(bf16),
            "compile": str(spec.training.compile_on(d.device.type)),
            "flops_per_token": f"{flops_token:.4g}" if flops_token else "n/a",
            "data_hash": p.corpus.data_hash(),
            "train_files": str(sum(len(f) for f in p.corpus.train)),
            "validation_files": str(len(p.corpus.validation)),
        }
    )
    log.info(
        "model %s: %.1fM params (%.2fM trainable), attention %s, bf16 %s, accumulation %d",
        f"composed {p.composed.spec.mode}" if p.composed else p.recipe.name,
        num_params(model) / 1e6,
        trainable / 1e6,
        attn,
        bf16,
        p.accum,
    )


def _place_model(p: Prepared, model: torch.nn.Module, *, bf16: bool, d: parallel.Dist) -> torch.nn.Module:
    """Wrap for the strategy (DDP/FSDP), materialise weights built on the meta device, compile."""
    spec = p.run.spec
    model = parallel.wrap(model, strategy=spec.parallelism.strategy, d=d, mixed_bf16=bf16 and d.device.type == "cuda")
    if is_on_meta(model):
        rss = weights.host_rss_bytes()
        weights.materialize(model, d.device, seed=spec.training.seed, init_dir=p.init_dir)
        log.info(
            "weights materialised per shard (host memory %.2f GB before, %.2f GB after)",
            rss / 1e9,
            weights.host_rss_bytes() / 1e9,
        )
    if spec.training.compile_on(d.device.type):
        model = torch.compile(model)
    return model


@dataclass
class TrainingParts:
    """What the loop steps and the checkpoints save: optimizer, schedule, data packer, position."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    packer: Packer
    ckpts: checkpoint.CheckpointManager
    state: loop.LoopState


def _training_parts(p: Prepared, model: torch.nn.Module, d: parallel.Dist) -> TrainingParts:
    spec, t = p.run.spec, p.run.spec.training
    optimizer = loop.make_optimizer(model, t, d.device)
    state = loop.LoopState()
    scheduler = loop.make_scheduler(optimizer, t, total_steps=p.total_steps, state=state)
    stream = DocumentStream(p.corpus.train, p.corpus.weights, seed=t.seed, rank=d.rank, world_size=d.world_size)
    num_masks = spec.tokenizer.num_mask_tokens
    packer = Packer(stream, p.tok, spec.objective, seq_length=t.seq_length, num_mask_tokens=num_masks, seed=t.seed)
    ckpts = checkpoint.CheckpointManager(
        p.paths.checkpoint_dir, keep_last=spec.checkpoint.keep_last, d=d, trainable_only=p.composed is not None
    )
    return TrainingParts(optimizer, scheduler, packer, ckpts, state)


def _resume(p: Prepared, parts: TrainingParts, model: torch.nn.Module, reporter: Reporter, d: parallel.Dist) -> None:
    """Load spec.checkpoint.resume (latest, none or a URI) into the parts and report it at once,
    not at the first log interval. The data order is restored only at the same world size."""
    try:
        resume = parts.ckpts.resolve(p.run.spec.checkpoint.resume)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if resume is None:
        return
    extra, rank_state = parts.ckpts.load(
        resume, model=model, optimizer=parts.optimizer, extra={"scheduler": parts.scheduler.state_dict(), "step": 0}
    )
    parts.scheduler.load_state_dict(extra["scheduler"])
    parts.state.step = int(extra["step"])
    if rank_state is not None and rank_state.get("total_steps"):  # a time budget's fitted step count
        parts.state.total_steps = int(rank_state["total_steps"])
        reporter.progress = reporter.progress.model_copy(update={"total_steps": parts.state.total_steps})
    if rank_state is not None and rank_state.get("world_size") == d.world_size:
        parts.packer.load_state_dict(rank_state["packer"])
        torch.set_rng_state(rank_state["torch_rng"])
    else:
        log.warning("world size changed since the checkpoint: the data order restarts (weights are restored)")
    reporter.progress = reporter.progress.model_copy(
        update={"step": parts.state.step, "checkpoint_uri": resume.uri, "checkpoint_step": resume.step}
    )
    log.info("resumed from %s (step %d)", resume.uri, parts.state.step)
    reporter.checkpoint(resume.step, resume.uri, current_step=parts.state.step)


def _checkpointer(
    parts: TrainingParts, model: torch.nn.Module, reporter: Reporter, d: parallel.Dist
) -> Callable[[int], None]:
    """The loop's checkpoint hook: save model, optimizer, schedule and this rank's data position, then report it."""

    def on_checkpoint(step: int) -> None:
        rank_state = {
            "packer": parts.packer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "world_size": d.world_size,
            "total_steps": parts.state.total_steps,
        }
        info = parts.ckpts.save(
            step,
            model=model,
            optimizer=parts.optimizer,
            extra={"scheduler": parts.scheduler.state_dict(), "step": step},
            rank_state=rank_state,
        )
        reporter.checkpoint(step, info.uri, current_step=parts.state.step)

    return on_checkpoint


def _prepare_batch(p: Prepared, model: torch.nn.Module):
    """A composed model's own batch preparation (its encoder input), or None."""
    return parallel.unwrap(model).prepare_batch if p.composed is not None else None


def _evaluator(
    p: Prepared, model: torch.nn.Module, tracker: Tracker, *, attn: str, bf16: bool, d: parallel.Dist
) -> Callable[[int], None]:
    """The loop's eval hook: validation loss over fixed batches and, for a codegen2 model, the exact
    match of INFILL_CASES held-out line infills; both to MLflow."""
    spec, t = p.run.spec, p.run.spec.training
    val_batches = evaluate.validation_batches(
        p.corpus,
        p.tok,
        spec.objective,
        seq_length=t.seq_length,
        num_mask_tokens=spec.tokenizer.num_mask_tokens,
        micro_batch=t.micro_batch_size,
        batches=t.eval_batches,
        d=d,
        seed=t.seed,
    )
    cases = (
        evaluate.infill_cases(p.corpus, n=INFILL_CASES, seed=t.seed)
        if spec.objective.infill_format() == "codegen2"
        else []
    )
    max_context = p.composed.max_context if p.composed else p.recipe.max_position_embeddings
    prepare_batch = _prepare_batch(p, model)

    def on_eval(step: int) -> None:
        metrics = {}
        val = evaluate.validation_loss(
            model,
            val_batches,
            pad_id=p.hf_tok.pad_token_id,
            document_mask=spec.objective.document_mask,
            bf16=bf16,
            d=d,
            flat=loop.is_flash(attn),
            block_mask=loop.is_flex(attn),
            prepare_batch=prepare_batch,
        )
        if val is not None:
            metrics["val_loss"] = val
        em = evaluate.line_infill_exact_match(
            parallel.unwrap(model), p.tok, cases, max_context=max_context, device=d.device, bf16=bf16
        )
        if em is not None:
            metrics["line_infill_exact_match"] = em
        tracker.log_metrics(metrics, step=step)
        log.info("step %d eval %s", step, metrics)

    return on_eval


def _finish(
    p: Prepared, *, model: torch.nn.Module, tracker: Tracker, settings: TrainerSettings, d: parallel.Dist, step: int
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # A composed model exports its bridge only (and never gathers its frozen parents).
    full = (
        None
        if p.composed
        else get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    )  # collective under FSDP
    if d.is_main:
        hf_model = parallel.unwrap(model)
        meta = export.metadata(
            p.run,
            uid=p.uid,
            attempt=p.attempt,
            data_hash=p.corpus.data_hash(),
            step=step,
            max_context=p.composed.max_context if p.composed else p.recipe.max_position_embeddings,
            num_mask_tokens=p.run.spec.tokenizer.num_mask_tokens,
        )
        if p.composed:
            write = lambda: composed_job.write_export(p.composed, hf_model, p.hf_tok, meta, p.paths.export_dir)  # noqa: E731
        else:
            write = lambda: export.write_export(hf_model, full, p.hf_tok, meta, p.paths.export_dir)  # noqa: E731
        result = export.register(
            p.run,
            registry=Registry(settings.resolved_tracking_uri()),
            tracker=tracker,
            export=write,
            uid=p.uid,
            attempt=p.attempt,
            data_hash=p.corpus.data_hash(),
            run_dir=p.paths.run_dir,
            kill_after_register=settings.kill_after_register,
        )
        log.info("registered %s (export %s)", result.uri, result.export_uri)
        tracker.finish()
    d.barrier()
    # Rank 0 alone, after the barrier: the other ranks are done and must not time out waiting.
    if d.is_main and p.run.spec.evaluation.suites:
        registry = Registry(settings.resolved_tracking_uri())
        version = registry.get(result.registered_model_name, version=result.version)
        run_post_registration_eval(
            p.run, registry=registry, version=version, export_dir=p.paths.export_dir, validation=p.corpus.validation
        )


def _is_tty() -> bool:
    import sys

    return sys.stderr.isatty()
