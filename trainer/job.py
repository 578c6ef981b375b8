"""One training job from start to finish: prepare (validate everything that can be wrong with the
config, exit 78 on it), resume, train, evaluate, export and register.

Read top-down: `run_job` is the whole story; the steps live in their own modules.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from midfill.api import TrainingRun, now_rfc3339
from midfill.progress import PROGRESS_FILE, RUN_TAG_CHECKPOINT, ProgressRecord, write_json_atomic
from midfill.registry import Registry
from trainer import checkpoint, composed_job, evaluate, export, flops, loop, parallel, preflight, weights
from trainer import tokenizer as toklib
from trainer.data import Corpus, DocumentStream, read_text
from trainer.fetch import fetch_once
from trainer.model import build_model, is_on_meta, num_params
from trainer.objectives import Packer
from trainer.post_eval import run_post_registration_eval
from trainer.recipes import Recipe, get_recipe
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
        seqs_per_step = spec.training.global_batch_tokens // spec.training.seq_length
        per_rank = seqs_per_step // world
        if seqs_per_step % world or per_rank % spec.training.micro_batch_size:
            unit = spec.training.seq_length * spec.training.micro_batch_size * world
            raise ValueError(
                f"training.globalBatchTokens: {spec.training.global_batch_tokens} must be a multiple of "
                f"seqLength x microBatchSize x processes = {unit} (e.g. "
                f"{max(1, seqs_per_step * spec.training.seq_length // unit) * unit})"
            )
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
                spec.model.composition, settings, lambda uri, field: _fetch_init(uri, settings, d, field=field)
            )
            composed = composed_job.setup(spec.model.composition, parents, seq_length=spec.training.seq_length)
            init_dir = composed.tokenizer_dir  # the parents' tokenizer: both read the same tokens
        else:
            init_dir = _fetch_init(spec.model.init, settings, d)
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


def _fetch_init(init: str, settings: TrainerSettings, d: parallel.Dist, *, field: str = "model.init") -> Path | None:
    if init == "scratch":
        return None
    if init.startswith("models:/"):
        registry = Registry(settings.resolved_tracking_uri())
        info = registry.resolve_uri(init)
        dst = Path(tempfile.gettempdir()) / f"midfill-init-{info.name}-{info.version}"
        fetch_once(dst, lambda folder: registry.download(info, folder), d, source=init)
        found = next(dst.rglob("config.json"), None)
        if found is None:
            raise ValueError(f"{field}: {init} has no config.json; it is not a Hugging Face export")
        return found.parent
    if "://" in init and not init.startswith("file://"):
        import fsspec

        dst = Path(tempfile.gettempdir()) / ("midfill-init-" + init.replace("/", "_").replace(":", "_"))
        fs, root = fsspec.core.url_to_fs(init)
        return fetch_once(
            dst, lambda folder: fs.get(root.rstrip("/") + "/", str(folder), recursive=True), d, source=init
        )
    path = Path(init.removeprefix("file://"))
    if not (path / "config.json").is_file():
        raise ValueError(f"{field}: {init} is not an exported model folder (no config.json)")
    return path


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
    spec = run.spec
    torch.manual_seed(spec.training.seed)
    tracker = Tracker(
        enabled=d.is_main,
        tracking_uri=settings.resolved_tracking_uri(),
        experiment=spec.registry.experiment_name,
        artifact_root=None
        if settings.resolved_tracking_uri().startswith(("http", "databricks"))
        else settings.artifact_root(),
    )
    tracker.start(
        run_name=f"{run.metadata.name}-a{p.attempt}",
        uid=p.uid,
        attempt=p.attempt,
        tags={"midfill.training_run": run.metadata.name},
    )

    eos, pad = p.hf_tok.eos_token_id, p.hf_tok.pad_token_id
    bf16 = loop.use_bf16(spec.training.precision, d.device)  # decides the attention too: FlashAttention is bf16-only
    try:
        if p.composed is not None:
            model, attn = composed_job.build(
                p.composed,
                attention=spec.model.attention,
                seq_length=spec.training.seq_length,
                vocab_size=len(p.hf_tok),
                eos_id=eos,
                pad_id=pad,
                seed=spec.training.seed,
                bf16=bf16,
            )
        else:
            model, attn = build_model(
                spec.model,
                p.recipe,
                init_dir=p.init_dir,
                vocab_size=len(p.hf_tok),
                eos_id=eos,
                pad_id=pad,
                seed=spec.training.seed,
                bf16=bf16,
                on_meta=spec.parallelism.strategy == "fsdp",  # materialised shard by shard after wrapping
                document_mask=spec.objective.document_mask,
            )
        parallel.checkpoint_activations(model, spec.training.activation_checkpointing)
    except (
        ValueError
    ) as exc:  # geometry that does not fit the parents, attention the run cannot use; the message names the field
        raise ConfigError(str(exc)) from None
    trainable = sum(t.numel() for t in {id(t): t for t in model.parameters() if t.requires_grad}.values())
    flat = loop.is_flash(attn)  # packed documents reach FlashAttention as one row (loop.collate)
    block_mask = loop.is_flex(attn)  # and flex_attention as a BlockMask of the documents
    # Composed models (two parents, some frozen) have no single formula: no MFU for them.
    flops_token = None if p.composed else flops.flops_per_token(model, seq_length=spec.training.seq_length)
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
    model = parallel.wrap(model, strategy=spec.parallelism.strategy, d=d, mixed_bf16=bf16 and d.device.type == "cuda")
    if is_on_meta(model):
        rss = weights.host_rss_bytes()
        weights.materialize(model, d.device, seed=spec.training.seed, init_dir=p.init_dir)
        log.info(
            "weights materialised per shard (host memory %.2f GB before, %.2f GB after)",
            rss / 1e9,
            weights.host_rss_bytes() / 1e9,
        )
    compiled = spec.training.compile_on(d.device.type)
    if compiled:
        model = torch.compile(model)
    optimizer = loop.make_optimizer(model, spec.training, d.device)
    t = spec.training
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: loop.lr_factor(
            s, warmup=t.warmup_steps, total=p.total_steps, schedule=t.schedule, floor=t.min_learning_rate_ratio
        ),
    )
    stream = DocumentStream(p.corpus.train, p.corpus.weights, seed=t.seed, rank=d.rank, world_size=d.world_size)
    num_masks = spec.tokenizer.num_mask_tokens
    packer = Packer(stream, p.tok, spec.objective, seq_length=t.seq_length, num_mask_tokens=num_masks, seed=t.seed)
    state = loop.LoopState()
    ckpts = checkpoint.CheckpointManager(
        p.paths.checkpoint_dir, keep_last=spec.checkpoint.keep_last, d=d, trainable_only=p.composed is not None
    )
    prepare_batch = parallel.unwrap(model).prepare_batch if p.composed is not None else None
    progress = ProgressRecord(total_steps=p.total_steps, attempt=p.attempt, mlflow_run_id=tracker.run_id)
    try:
        resume = ckpts.resolve(spec.checkpoint.resume)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if resume is not None:
        extra, rank_state = ckpts.load(
            resume, model=model, optimizer=optimizer, extra={"scheduler": scheduler.state_dict(), "step": 0}
        )
        scheduler.load_state_dict(extra["scheduler"])
        state.step = int(extra["step"])
        if rank_state is not None and rank_state.get("world_size") == d.world_size:
            packer.load_state_dict(rank_state["packer"])
            torch.set_rng_state(rank_state["torch_rng"])
        else:
            log.warning("world size changed since the checkpoint: the data order restarts (weights are restored)")
        progress = progress.model_copy(
            update={"step": state.step, "checkpoint_uri": resume.uri, "checkpoint_step": resume.step}
        )
        log.info("resumed from %s (step %d)", resume.uri, state.step)

    val_batches = evaluate.validation_batches(
        p.corpus,
        p.tok,
        spec.objective,
        seq_length=t.seq_length,
        num_mask_tokens=num_masks,
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

    def write_progress(**update) -> None:
        nonlocal progress
        progress = progress.model_copy(update={**update, "update_time": now_rfc3339()})
        if d.is_main:
            write_json_atomic(p.paths.run_dir / PROGRESS_FILE, progress)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(metrics, step=step)
        write_progress(
            step=step,
            loss=metrics["loss"],
            tokens_per_second=metrics.get("tokens_per_second"),
            tokens_per_second_per_device=metrics.get("tokens_per_second_per_device"),
            mfu=metrics.get("mfu"),
        )
        mfu = f"{metrics['mfu']:.1%}" if "mfu" in metrics else "n/a (peak unknown: training.peakTflops)"
        log.info(
            "step %d/%d loss %.4f lr %.2e tok/s %.0f (%.0f per device) MFU %s",
            step,
            p.total_steps,
            metrics["loss"],
            metrics["lr"],
            metrics.get("tokens_per_second", float("nan")),
            metrics.get("tokens_per_second_per_device", float("nan")),
            mfu,
        )

    def on_eval(step: int) -> None:
        metrics = {}
        val = evaluate.validation_loss(
            model,
            val_batches,
            pad_id=pad,
            document_mask=spec.objective.document_mask,
            bf16=bf16,
            d=d,
            flat=flat,
            block_mask=block_mask,
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

    def report_checkpoint(step: int, uri: str) -> None:
        """Where the newest committed checkpoint is: progress.json and the MLflow run (the operator reads it)."""
        tracker.set_tags({RUN_TAG_CHECKPOINT: uri})
        tracker.log_metrics({"checkpoint_step": step, "step": state.step}, step=state.step)
        write_progress(step=state.step, checkpoint_uri=uri, checkpoint_step=step, checkpoint_time=now_rfc3339())

    if resume is not None:  # report the resumed step now, not at the first log interval
        report_checkpoint(resume.step, resume.uri)

    def on_checkpoint(step: int) -> None:
        rank_state = {"packer": packer.state_dict(), "torch_rng": torch.get_rng_state(), "world_size": d.world_size}
        info = ckpts.save(
            step,
            model=model,
            optimizer=optimizer,
            extra={"scheduler": scheduler.state_dict(), "step": step},
            rank_state=rank_state,
        )
        report_checkpoint(step, info.uri)

    if state.step < p.total_steps:
        loop.train(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            packer=packer,
            spec=t,
            state=state,
            total_steps=p.total_steps,
            accum=p.accum,
            pad_id=pad,
            document_mask=spec.objective.document_mask,
            bf16=bf16,
            d=d,
            flat=flat,
            block_mask=block_mask,
            hooks=loop.LoopHooks(on_log=on_log, on_eval=on_eval, on_checkpoint=on_checkpoint),
            checkpoint_interval=spec.checkpoint.interval_steps,
            show_bar=settings.progress_bar if settings.progress_bar is not None else _is_tty(),
            compiled=compiled,
            flops_per_token=flops_token,
            peak_tflops=flops.peak_tflops(d.device, bf16=bf16, override=t.peak_tflops),
            prepare_batch=prepare_batch,
        )
    on_eval(state.step)
    _finish(p, model=model, tracker=tracker, settings=settings, d=d, step=state.step)


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
