"""Driver side of a training run: data, validation set, MLflow run, TorchTrainer, resume."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from rfsr_ray import logs, seeds
from rfsr_ray.config import RFSRConfig, load_config, with_absolute_paths
from rfsr_ray.data.parquet import read_pair_dataset
from rfsr_ray.data.pipeline import (
    PairPipeline,
    build_pair_dataset,
    format_counts,
    raise_if_empty,
)
from rfsr_ray.data.sources import read_sources
from rfsr_ray.errors import ConfigError, DataError, TrainingError
from rfsr_ray.losses.gram import find_vgg_weights
from rfsr_ray.tracking import mlflow_run
from rfsr_ray.train.checkpoint import Progress, config_changes, latest_checkpoint
from rfsr_ray.train.context import LoopContext, ValidationSet
from rfsr_ray.train.entry import run_worker, worker_config
from rfsr_ray.train.progress import ConsoleProgress, ProgressBoard
from rfsr_ray.train.tagging import TAG_COLUMNS, add_tags, check_placement, cluster_nodes
from rfsr_ray.weights import require_weights

log = logging.getLogger("rfsr_ray.train")


@dataclass(frozen=True)
class TrainingOutcome:
    run_dir: Path
    run: mlflow_run.RunHandle | None
    steps: int
    table: str | None
    data_counts: dict[str, int]


def run_dir_of(cfg: RFSRConfig) -> Path:
    return Path(cfg.output.storage_path).resolve() / cfg.output.run_name


@dataclass(frozen=True)
class Resume:
    """The checkpoint a rerun of a run name continues, and how its config changed."""

    folder: Path
    progress: Progress
    changes: dict[str, tuple[Any, Any]]  # {key: (old, new)} of training-relevant keys


def find_resume(cfg: RFSRConfig) -> Resume | None:
    """The newest complete checkpoint of `output.run_name`, or None for a new run.

    Refuses (ConfigError) when a training-relevant key differs from the checkpoint's config,
    unless `output.allow_config_change` (the CLI's `--resume`); the keys that may change are
    `rfsr_ray.train.checkpoint.RESUMABLE_KEYS`. Reads files only: call it before Ray starts.
    """
    latest = latest_checkpoint(run_dir_of(cfg))
    if latest is None:
        return None
    folder, progress = latest
    changes = config_changes(folder, cfg)
    if changes and not cfg.output.allow_config_change:
        raise ConfigError(
            f"output.run_name={cfg.output.run_name!r} already has a checkpoint at step "
            f"{progress.step} ({folder}) trained with a different config "
            f"({describe_changes(changes)}); pick a new output.run_name, or pass --resume "
            "(output.allow_config_change=true) to continue it with the new values"
        )
    return Resume(folder, progress, changes)


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    """'train.lr: 0.0001 → 0.0002, …' for the first `limit` keys, then how many more."""
    parts = [f"{key}: {old!r} → {new!r}" for key, (old, new) in list(changes.items())[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)


def _warn_if_rescaled(cfg: RFSRConfig, resume: Resume) -> None:
    """train.num_workers may change on resume (clusters get rescaled), but it changes the
    effective batch and the per-rank noise streams: say so."""
    saved = yaml.safe_load((resume.folder / "config.yaml").read_text()) or {}
    before = saved.get("train", {}).get("num_workers", cfg.train.num_workers)
    if before == cfg.train.num_workers:
        return
    per_worker = cfg.train.batch_size * cfg.train.grad_accum
    log.warning(
        "train.num_workers changed %d → %d on resume: the effective batch per optimiser step "
        "changes from %d to %d samples",
        before,
        cfg.train.num_workers,
        per_worker * max(1, before),
        per_worker * max(1, cfg.train.num_workers),
    )


def _keep_previous_config(cfg: RFSRConfig, resume: Resume) -> Path | None:
    """On a resume with changed training keys (allowed by output.allow_config_change): warn,
    and keep the config that trained up to the checkpoint beside the new `config.yaml`.
    Returns the kept file (None: nothing changed)."""
    if not resume.changes:
        return None
    log.warning(
        "resuming %s at step %d with a changed config (output.allow_config_change): %s",
        cfg.output.run_name,
        resume.progress.step,
        describe_changes(resume.changes, limit=len(resume.changes)),
    )
    kept = run_dir_of(cfg) / f"config.until_step_{resume.progress.step:08d}.yaml"
    shutil.copyfile(resume.folder / "config.yaml", kept)
    return kept


def build_validation_set(cfg: RFSRConfig) -> ValidationSet | None:
    """`data.val_pairs` (a prepared Parquet set) or pairs made from `data.val_source`."""
    if cfg.data.val_pairs:
        rows = read_pair_dataset(cfg.data.val_pairs).take(cfg.data.val_size)
    elif cfg.data.val_source is not None:
        # Held-out pairs from their own seed stream, so they never coincide with training crops
        # (even when val_source is a training source); data.val_seed fixes them across seeds.
        root = cfg.data.seed if cfg.data.val_seed is None else cfg.data.val_seed
        val_seed = seeds.derive_seed(root, "val_data")
        size = cfg.data.val_patch_size or cfg.data.patch_size
        data = cfg.data.model_copy(update={"seed": val_seed, "pad_small": True, "patch_size": size})
        sources = (cfg.data.val_source,)  # its outcome counts are not reported: none kept
        pipeline = build_pair_dataset(data, cfg.degradation, sources=sources, count=False)
        rows = pipeline.dataset.take(cfg.data.val_size)
    else:
        log.warning("no data.val_source or data.val_pairs: validation is off for this run")
        return None
    if not rows:
        raise DataError("the validation set is empty; check data.val_source / data.val_pairs")
    return ValidationSet(np.stack([r["lr"] for r in rows]), np.stack([r["hr"] for r in rows]))


def epochs_needed(cfg: RFSRConfig, start_epoch: int) -> range:
    """Enough data epochs for the remaining steps (each epoch draws fresh degradations)."""
    images = read_sources(cfg.data.sources).count()
    weights = np.mean([s.weight for s in cfg.data.sources])
    per_epoch = max(1.0, images * cfg.data.crops_per_image * weights)
    train = cfg.train
    pairs = train.steps * train.batch_size * train.grad_accum * max(1, train.num_workers)
    # Margin: workers' shards are not always equal and local shuffling holds rows back.
    return range(start_epoch, start_epoch + math.ceil(1.25 * pairs / per_epoch) + 1)


def training_dataset(cfg: RFSRConfig, pipeline: PairPipeline) -> ray.data.Dataset:
    """The columns the workers read. Ids and degradation JSON stay in the Parquet sets;
    captions go along when they are the prompts; a seesr model's pairs first pass the DAPE
    tagger stage (tags as captions, image embeddings)."""
    columns = ["hr", "lr", "epoch"] + (["caption"] if cfg.model.prompt.from_data else [])
    if cfg.model.family == "seesr":
        tagged = add_tags(pipeline.dataset, cfg.model.seesr, pipeline.stats)
        return tagged.select_columns(["hr", "lr", "epoch", *TAG_COLUMNS])
    return pipeline.dataset.select_columns(columns)


def build_trainer(
    cfg: RFSRConfig,
    context: LoopContext,
    dataset: ray.data.Dataset,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    train = cfg.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        run_worker,
        train_loop_config=worker_config({"cfg": cfg, "context": context}),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.output.run_name,
            storage_path=str(Path(cfg.output.storage_path).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            callbacks=list(callbacks),
            # Ray Train's INFO lines (worker group start, every report) only with --verbose.
            logging_config=ray.train.LoggingConfig(
                log_level="INFO" if logs.verbose() else "WARNING"
            ),
        ),
        datasets={"train": dataset},
        dataset_config=ingest_config(cfg),
    )


def ingest_config(cfg: RFSRConfig) -> ray.train.DataConfig:
    """How the pairs reach the workers. With `data.deterministic` (the default) every run with the
    same seeds feeds each rank the same pairs in the same order: Ray Data emits blocks in the
    order of its input rather than as tasks finish (`preserve_order`), and the split, which gives
    each block to the rank that has received the fewest rows, ignores where blocks live (on a
    multi-node cluster locality would make the assignment depend on timing). Each worker's local
    shuffle is seeded in the loop. Without it, two runs of one config see different batches."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.deterministic
    return ray.train.DataConfig(
        execution_options=options, enable_shard_locality=not cfg.data.deterministic
    )


def _save_config(
    cfg: RFSRConfig,
    run: mlflow_run.RunHandle | None,
    resume: Resume | None,
    kept_config: Path | None,
) -> None:
    """`config.yaml` in the run folder and the MLflow run; a changed config's predecessor too,
    and a tag naming the changes (the run's params stay those of its first config)."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    if run is None:
        return
    mlflow_run.log_artifact(run, run_dir / "config.yaml")
    if kept_config is not None and resume is not None:
        mlflow_run.log_artifact(run, kept_config)
        changes = describe_changes(resume.changes, limit=len(resume.changes))
        tag = f"rfsr.config_change.step_{resume.progress.step}"
        mlflow_run.set_tags(run, {tag: changes[:5000]})  # MLflow caps tag values


def run_training(
    cfg: RFSRConfig,
    *,
    callbacks: Sequence[Any] = (),
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
    console: bool = True,
) -> TrainingOutcome:
    """Fit (or resume) the run `output.run_name` under `output.storage_path`.

    callbacks: Ray Train callbacks (a sweep trial passes Tune's `TuneReportCallback`).
    tags: extra MLflow tags of a new run (`mlflow.parentRunId` nests it under a sweep).
    run_id: an MLflow run to continue when no checkpoint names one (a restarted sweep trial).
    console: show the driver's progress bar and validation lines (off in sweep trials, which
    run outside the driver).
    """
    resume = find_resume(cfg)  # a changed config is refused before anything starts
    require_weights(cfg)  # every missing weight at once, before data or workers start
    if cfg.model.family == "seesr":  # its tagger actors and the workers must fit together
        check_placement(cfg, cluster_nodes())
    run_dir = run_dir_of(cfg)
    previous = resume.progress if resume else None
    kept_config = None
    if resume is not None:
        _warn_if_rescaled(cfg, resume)
        kept_config = _keep_previous_config(cfg, resume)
    run = None
    if cfg.tracking.enabled:
        run = mlflow_run.start_run(
            cfg,
            cfg.output.run_name,
            (previous.run_id if previous else None) or run_id,
            tags={"loss": cfg.train.loss, **(tags or {})},
        )
    # A resumed run continues with the next data epoch: fresh degradations, none repeated.
    start_epoch = previous.data_epoch + 1 if previous else 0
    pipeline = build_pair_dataset(cfg.data, cfg.degradation, epochs_needed(cfg, start_epoch))
    # One bar on the console: the training bar (none in a sweep's trials), not Ray Data's.
    ray.data.DataContext.get_current().enable_progress_bars = logs.verbose()
    board = ProgressBoard.remote() if console else None
    # Workers find the checkpoint to resume themselves (it may be newer by then: a retry).
    context = LoopContext(
        str(run_dir), run, build_validation_set(cfg), pipeline.stats, start_epoch, board
    )
    _save_config(cfg, run, resume, kept_config)
    _announce(cfg, run, previous.step if previous else 0)
    try:
        dataset = training_dataset(cfg, pipeline)
        trainer = build_trainer(cfg, context, dataset, callbacks)
        if board is None:
            result = trainer.fit()
        else:
            start = previous.step if previous else 0
            with ConsoleProgress(board, cfg.train.steps, start):
                result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors; surface the cause plainly
        if run is not None:
            mlflow_run.end_run(run, "FAILED")
        raise TrainingError(
            f"training run {cfg.output.run_name!r} failed: {_cause(error)}"
        ) from error
    counts = pipeline.counts()
    if previous is None:
        raise_if_empty(counts, "training data")
    log.info("data pipeline outcomes:\n%s", format_counts(counts))
    if run is not None:
        mlflow_run.end_run(run)
    table_file = run_dir / "final_table.md"
    steps = int((result.metrics or {}).get("step", previous.step if previous else 0))
    return TrainingOutcome(
        run_dir, run, steps, table_file.read_text() if table_file.is_file() else None, counts
    )


def _announce(cfg: RFSRConfig, run: mlflow_run.RunHandle | None, start_step: int) -> None:
    """What a person needs before the bar starts: the run, where its outputs go, its MLflow run."""
    action = f"resuming at step {start_step} of" if start_step else "training"
    log.info(
        "%s %s (%s, %d steps) → %s",
        action,
        cfg.output.run_name,
        cfg.train.loss,
        cfg.train.steps,
        run_dir_of(cfg),
    )
    gram = cfg.losses.gram
    rfsr = cfg.train.loss == "rfsr" and gram.enabled
    if rfsr and gram.allow_random_vgg and find_vgg_weights(gram.vgg_weights) is None:
        log.warning(
            "the Gram regulariser uses seeded RANDOM VGG19 features "
            "(losses.gram.allow_random_vgg): its distances mean little; stage torchvision's "
            "VGG19 weights for a real run"
        )
    if run is not None:
        log.info(
            "MLflow: experiment %r, run %s (%s)",
            cfg.tracking.experiment,
            run.run_id,
            run.tracking_uri,
        )


def _cause(error: BaseException) -> str:
    """The innermost message of a chain of wrapped exceptions."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


RECIPE_RECORD = "pretrain_recipe.sha256"  # beside the pretrained export: which recipe made it


def _recipe_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ensure_base_model(cfg: RFSRConfig) -> None:
    """Pretrain the base on first use when `model.pretrained` is missing and a recipe is given.
    A cached base made from another version of the recipe (or by hand) is used as it is, with a
    warning that says how to pretrain it again."""
    target = cfg.model.pretrained
    if target is None or cfg.model.pretrain_config is None:
        return
    recipe_path = cfg.model.pretrain_config
    if Path(target).exists():
        record = Path(target) / RECIPE_RECORD
        if not record.exists() or record.read_text().strip() != _recipe_digest(recipe_path):
            log.warning(
                "base model %s was not pretrained with %s as it is now (the recipe changed, or "
                "the folder predates it); it is used as it is. Delete the folder to pretrain it "
                "again with the current recipe",
                target,
                recipe_path,
            )
        return
    log.info(
        "base model %s not found: pretraining it with %s (first use only)", target, recipe_path
    )
    digest = _recipe_digest(recipe_path)
    recipe = with_absolute_paths(load_config(recipe_path))
    if recipe.train.loss != "denoise":
        raise ConfigError(f"model.pretrain_config={recipe_path!r} must set train.loss: denoise")
    outcome = run_training(recipe)
    shutil.copytree(outcome.run_dir / "model", target)
    (Path(target) / RECIPE_RECORD).write_text(digest + "\n")


def check_base_model(cfg: RFSRConfig) -> None:
    """Fail on the driver, not inside every worker or trial, when the base model is unusable:
    a tiny model folder is loaded; a latent family's folder or hub id must be present or
    downloadable (checked in seconds, never a hang); a plug-in model is built for inference."""
    if cfg.model.family == "tiny":
        if cfg.model.pretrained is not None:
            from rfsr_ray.models import load_model

            load_model(cfg.model.pretrained)
        return
    require_weights(cfg, where="the driver")
    if cfg.model.family == "plugin":
        # Built once for inference on the driver: bad options, a non-conforming object or an
        # unusable folder fail here, once, not in every worker after Ray has started them.
        from rfsr_ray.models import build_model

        build_model(cfg.model, cfg.data.scale, trainable=False)
