"""The evaluation driver: models × test sets through Ray Data actor pools, then tables, report,
grid and an MLflow run linked to each model's training run."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data.expressions import col

from rfsr_ray.config import EvalModelConfig, RFSRConfig, load_config
from rfsr_ray.errors import ConfigError, DataError
from rfsr_ray.eval import report
from rfsr_ray.eval.actor import UpscaleAndScore
from rfsr_ray.eval.inference import load_any
from rfsr_ray.eval.metrics import MetricInfo, resolve_metrics
from rfsr_ray.eval.testsets import decode_png, read_test_set
from rfsr_ray.tracking import logged_model, mlflow_run
from rfsr_ray.train.checkpoint import COMPLETE_MARKER, read_progress

log = logging.getLogger("rfsr_ray.eval")
TRAINING_RUN_FILE = "training_run.json"  # written beside an exported model by the training loop


@dataclass(frozen=True)
class EvalOutcome:
    out_dir: Path
    table: str
    skipped_metrics: dict[str, str]
    counts: dict[str, dict[str, int]]  # per test set: evaluated and skipped_<reason>
    bad_images: list[str]  # "set/image_id: reason"
    run: mlflow_run.RunHandle | None
    artifacts: list[Path]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    scale: int
    steps: int
    training_run_id: str | None
    logged_model_id: str | None = None  # the MLflow logged model the training run made of it


def describe_model(model: EvalModelConfig, cfg: RFSRConfig) -> ModelInfo:
    path = Path(model.path)
    if not path.exists():
        raise ConfigError(
            f"eval.models {model.name}: {model.path!r} does not exist; give an exported model "
            "folder (RUN/model) or a checkpoint folder (RUN/checkpoint_…)"
        )
    saved = path / "config.yaml"
    saved_steps = load_config(saved).schedule.num_inference_steps if saved.is_file() else None
    steps = cfg.eval.num_inference_steps or saved_steps or cfg.schedule.num_inference_steps
    # Loading once here checks the folder and reads the scale before any actor starts.
    scale = load_any(path).scale
    return ModelInfo(
        model.name, str(path), scale, steps, training_run_id(path), logged_model_id(path)
    )


def training_run_id(path: Path) -> str | None:
    if (path / COMPLETE_MARKER).is_file():
        progress = read_progress(path)
        return progress.run_id if progress else None
    return _training_record(path).get("run_id")


def logged_model_id(path: Path) -> str | None:
    """The id of the MLflow logged model of an exported folder (checkpoints have none)."""
    return _training_record(path).get("model_id")


def _training_record(path: Path) -> dict[str, Any]:
    record = path / TRAINING_RUN_FILE
    return json.loads(record.read_text()) if record.is_file() else {}


def _pairs(cfg: RFSRConfig, scale: int) -> tuple[ray.data.Dataset, dict, list[str]]:
    """Usable pairs of every test set (materialised once for all models), counts, bad images."""
    datasets = [read_test_set(ts, scale, cfg.eval.seed) for ts in cfg.eval.test_sets]
    pairs = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    pairs = pairs.materialize()
    status = pairs.select_columns(["set", "image_id", "skip"]).take_all()
    counts: dict[str, Counter[str]] = {ts.name: Counter() for ts in cfg.eval.test_sets}
    bad = []
    for row in status:
        key = f"skipped_{row['skip']}" if row["skip"] else "evaluated"
        counts[row["set"]][key] += 1
        if row["skip"]:
            bad.append(f"{row['set']}/{row['image_id']}: {row['skip']}")
    empty = [name for name, count in counts.items() if not count["evaluated"]]
    if empty:
        raise DataError(
            f"test sets {empty} have no usable images ({ {k: dict(counts[k]) for k in empty} }); "
            "check their folders"
        )
    usable = pairs.filter(expr=col("skip") == "")  # an Arrow predicate, no Python per row
    return usable, {name: dict(c) for name, c in counts.items()}, bad


def _score(
    cfg: RFSRConfig, pairs: ray.data.Dataset, model: ModelInfo, metrics: list[MetricInfo]
) -> list[dict[str, Any]]:
    settings = cfg.eval
    use_gpu = settings.use_gpu
    if use_gpu is None:  # one GPU per actor whenever the cluster has GPUs
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    gpu = {"num_gpus": 1, "num_cpus": 0} if use_gpu else {"num_cpus": 1}
    save_dir = str(Path(settings.output) / settings.name / "sr") if settings.save_images else None
    upscaler = dict(
        name=model.name,
        path=model.path,
        steps=model.steps,
        seed=settings.seed,
        tile=settings.tile_size,
        overlap=settings.tile_overlap,
        fix=settings.color_fix,
        save_dir=save_dir,
    )
    scored = pairs.map_batches(
        UpscaleAndScore,
        fn_constructor_kwargs={
            "upscaler": upscaler,
            "metrics": metrics,
            "crop": settings.report_crop,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=settings.actors_per_model),
        **gpu,
    )
    return scored.take_all()


def run_evaluation(cfg: RFSRConfig) -> EvalOutcome:
    settings = cfg.eval
    if not settings.models or not settings.test_sets:
        raise ConfigError(
            "eval.models and eval.test_sets must each list at least one entry; see "
            "configs/eval/demo.yaml"
        )
    models = [describe_model(m, cfg) for m in settings.models]
    scales = {m.scale for m in models}
    if len(scales) != 1:
        raise ConfigError(f"eval.models have different scales {sorted(scales)}; evaluate one scale")
    metrics, skipped = resolve_metrics(settings.metrics)
    for name, why in skipped.items():
        log.warning("metric %s skipped: %s", name, why)
    if not metrics:
        raise ConfigError(f"none of eval.metrics can be computed here: {skipped}")
    pairs, counts, bad = _pairs(cfg, scales.pop())
    rows = [row for model in models for row in _score(cfg, pairs, model, metrics)]
    out_dir = Path(settings.output) / settings.name
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = settings.baseline or models[0].name
    table = report.aggregate(rows, metrics)
    markdown = report.markdown(table, metrics, baseline, counts)
    notes = [f"{name} skipped: {why}" for name, why in skipped.items()]
    notes += [f"bad image {item}" for item in bad]
    artifacts = _write(cfg, out_dir, rows, table, markdown, baseline, models, notes)
    run = _track(cfg, models, table, baseline, artifacts, counts)
    return EvalOutcome(out_dir, markdown, skipped, counts, bad, run, artifacts)


def _write(
    cfg: RFSRConfig,
    out_dir: Path,
    rows: list[dict[str, Any]],
    table: dict,
    markdown: str,
    baseline: str,
    models: list[ModelInfo],
    notes: list[str],
) -> list[Path]:
    per_image = [{k: v for k, v in row.items() if not k.startswith("crop_")} for row in rows]
    pq.write_table(pa.Table.from_pylist(per_image), out_dir / "per_image.parquet")
    (out_dir / "aggregate.md").write_text(markdown + "\n")
    report.write_csv(table, baseline, out_dir / "aggregate.csv")
    crops = _report_crops(rows, cfg.eval.report_images)
    names = [m.name for m in models]
    page = report.html_report(f"Evaluation {cfg.eval.name}", markdown, crops, names, notes)
    (out_dir / "report.html").write_text(page)
    artifacts = [out_dir / n for n in ("per_image.parquet", "aggregate.md", "aggregate.csv")]
    artifacts.append(out_dir / "report.html")
    grid = report.comparison_grid(crops, names, decode_png)
    if grid is not None:
        Image.fromarray(grid).save(out_dir / "comparison.png")
        artifacts.append(out_dir / "comparison.png")
    cfg.save(out_dir / "config.yaml")
    return [*artifacts, out_dir / "config.yaml"]


def _report_crops(rows: list[dict[str, Any]], limit: int) -> dict[str, list[dict[str, Any]]]:
    """The first `limit` images (by id) of each set, with every model's crop."""
    crops: dict[str, dict[str, dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (r["set"], r["image_id"])):
        images = crops.setdefault(row["set"], {})
        if row["image_id"] not in images and len(images) >= limit:
            continue
        entry = images.setdefault(
            row["image_id"],
            {"image_id": row["image_id"], "lr_up": row["crop_lr_up"], "hr": row["crop_hr"],
             "sr": {}},
        )  # fmt: skip
        entry["sr"][row["model"]] = row["crop_sr"]
    return {name: list(images.values()) for name, images in crops.items()}


def _run_metrics(table: dict, baseline: str, counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """`set.model.metric`, `set.delta.model.metric` against the baseline and `set.<count>`;
    finite values only."""
    metrics: dict[str, float] = {}
    for test_set, by_model in table.items():
        for model, values in by_model.items():
            for metric, value in values.items():
                metrics[f"{test_set}.{model}.{metric}"] = value
                base = by_model.get(baseline, {}).get(metric)
                if model != baseline and base is not None:
                    metrics[f"{test_set}.delta.{model}.{metric}"] = value - base
        for key, value in counts.get(test_set, {}).items():
            metrics[f"{test_set}.{key}"] = value
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


def _log_metrics(
    run: mlflow_run.RunHandle,
    models: list[ModelInfo],
    metrics: dict[str, float],
    test_sets: list[str],
) -> None:
    """Log the run's metrics. Each evaluated model that is a logged model of this store (the
    training run logged it) becomes an input of the run, and its own `set.model.metric` values
    become that model's metrics too (MLflow 3 shows them on the model's page)."""
    ids = {m.name: m.logged_model_id for m in models if m.logged_model_id}
    linked = set(logged_model.link_logged_models(run, list(ids.values())))
    for name, model_id in ids.items():
        if model_id in linked:
            prefixes = tuple(f"{test_set}.{name}." for test_set in test_sets)
            own = {k: v for k, v in metrics.items() if k.startswith(prefixes)}
            mlflow_run.log_metrics(run, own, step=0, model_id=model_id)
            metrics = {k: v for k, v in metrics.items() if k not in own}
    mlflow_run.log_metrics(run, metrics, step=0)


def _track(
    cfg: RFSRConfig,
    models: list[ModelInfo],
    table: dict,
    baseline: str,
    artifacts: list[Path],
    counts: dict[str, dict[str, int]],
) -> mlflow_run.RunHandle | None:
    if not cfg.tracking.enabled:
        return None
    tags = {"rfsr.kind": "evaluation"}
    for model in models:
        tags[f"rfsr.model.{model.name}.path"] = model.path
        if model.training_run_id:
            tags[f"rfsr.model.{model.name}.training_run_id"] = model.training_run_id
    run = mlflow_run.start_run(cfg, cfg.eval.name, tags=tags)
    _log_metrics(run, models, _run_metrics(table, baseline, counts), list(table))
    for path in artifacts:
        mlflow_run.log_artifact(run, path)
    for model in models:  # the other direction of the link, when the store is the same
        if model.training_run_id:
            mlflow_run.tag_if_present(
                run.tracking_uri, model.training_run_id, {"rfsr.evaluation_run": run.run_id}
            )
    mlflow_run.end_run(run)
    return run
