"""The per-worker training loop for both training losses (`denoise` and `rfsr`) on Ray Train.

Everything arrives as arguments (`config["cfg"]`, `config["context"]`); nothing is read from the
driver's globals. Every worker reports at the same steps; only rank 0 attaches checkpoints, logs
to MLflow, validates and exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from PIL import Image

from rfsr_ray import seeds
from rfsr_ray.config import RFSRConfig
from rfsr_ray.images import to_tensor
from rfsr_ray.models import build_model, save_model
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.schedule import describe_timesteps
from rfsr_ray.tracking import mlflow_run
from rfsr_ray.tracking.logged_model import log_model
from rfsr_ray.tracking.system_metrics import start_system_metrics, system_metrics_enabled
from rfsr_ray.train.checkpoint import (
    Progress,
    latest_checkpoint,
    load_checkpoint,
    read_progress,
    save_checkpoint,
    save_into_run,
)
from rfsr_ray.train.context import LoopContext
from rfsr_ray.train.monitor import HackingMonitor
from rfsr_ray.train.objective import objective_parts, objective_reward
from rfsr_ray.train.progress import post_line, post_step
from rfsr_ray.train.step import (
    Batch,
    NoSync,
    TrainState,
    any_rank,
    autocast_for,
    build_state,
    optimizer_step,
)
from rfsr_ray.train.validate import Validator, gains
from rfsr_ray.weights import require_weights

log = logging.getLogger("rfsr_ray.train")


@dataclass
class Timing:
    data_seconds: float = 0.0
    total_seconds: float = 0.0
    samples: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    # Since this worker started (never reset): what a report's `seconds_per_step` averages.
    run_seconds: float = 0.0
    run_steps: int = 0

    def reset(self) -> None:
        self.data_seconds = self.total_seconds = 0.0
        self.samples = 0


def _batches(
    shard: Any, cfg: RFSRConfig, device: torch.device, rank: int
) -> Iterator[tuple[Batch, int] | None]:
    """(batch, data epoch) from this worker's shard; None marks the end of one pass. The local
    shuffle is seeded by rank and pass (`shuffle` stream): unseeded, Ray draws it from the OS."""
    shuffle = 4 * cfg.train.batch_size if cfg.data.shuffle else None
    fallback = cfg.model.prompt.text
    threads_before = set(threading.enumerate())
    try:
        for data_pass in itertools.count():
            rows_of_pass = iter(
                shard.iter_batches(
                    batch_size=cfg.train.batch_size,
                    batch_format="numpy",
                    prefetch_batches=2,
                    local_shuffle_buffer_size=shuffle,
                    local_shuffle_seed=seeds.derive_seed(cfg.data.seed, "shuffle", rank, data_pass)
                    % 2**32,
                )
            )
            # Closed when this generator closes, not when the garbage collector frees it: closing
            # shuts Ray Data's executor down and tells its iterator threads to stop.
            with contextlib.closing(rows_of_pass):
                for rows in rows_of_pass:
                    prompts, image_embeds = None, None
                    if "image_embeds" in rows:  # the tagger stage's tags and embeddings (seesr)
                        prompts = [str(text) for text in rows["caption"]]
                        image_embeds = torch.tensor(rows["image_embeds"], device=device)  # a copy
                    elif "caption" in rows:  # model.prompt.from_data: one without uses `text`
                        prompts = [str(text) or fallback for text in rows["caption"]]
                    lr, hr = to_tensor(rows["lr"], device), to_tensor(rows["hr"], device)
                    batch = Batch(lr, hr, prompts, image_embeds)
                    yield batch, int(rows["epoch"].max())
            yield None
    finally:  # the loop closes the stream while Ray still runs (see _join_data_threads)
        _join_data_threads(threads_before)


def _next_batch(stream: Iterator[tuple[Batch, int] | None]) -> tuple[Batch, int]:
    """The next batch; when any rank's pass ends, every rank starts a new pass together (a rank
    waiting alone for data would deadlock the others inside DDP's all-reduce)."""
    item = next(stream)
    while any_rank(item is None):
        log.warning("training data pass ended before train.steps; starting another pass")
        while item is not None:  # drop this rank's remainder so all ranks restart in step
            item = next(stream)
        item = next(stream)
    return item


def _ray_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """Ray's `prepare_model`: DistributedDataParallel in a group of several workers (device ids
    on a GPU), the module itself for one worker."""
    return ray.train.torch.prepare_model(module, move_to_device=False)


def wrap_for_ddp(
    state: TrainState, prepare: Callable[[torch.nn.Module], torch.nn.Module] = _ray_ddp
) -> NoSync:
    """Run the model's trained forward passes through DDP (`prepare` wraps each trainable
    module; tests that fork their own gloo ranks pass DistributedDataParallel); returns a
    no_sync context factory over the wrappers."""
    wrappers = state.model.wrap_trainable(prepare)

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for wrapper in wrappers.values():
                if hasattr(wrapper, "no_sync"):
                    stack.enter_context(wrapper.no_sync())
            yield

    return no_sync


@contextlib.contextmanager
def ema_weights(state: TrainState) -> Iterator[None]:
    """Temporarily load the EMA weights into the trainable parameters.

    Where each shadow tensor lives beside its parameter (same device, dtype and shape) the two
    swap storage, which costs no memory; EMAModel.store/copy_to would hold a third copy of every
    trained weight during validation and export (2.4 GiB for the ControlNet-SR recipe).
    """
    shadow = state.ema.shadow_params
    pairs = list(zip(state.params, shadow, strict=True))
    if not all(_swappable(param, copy) for param, copy in pairs):
        state.ema.store(state.params)
        state.ema.copy_to(state.params)
        try:
            yield
        finally:
            state.ema.restore(state.params)
        return
    _swap_storage(pairs)
    try:
        yield
    finally:
        _swap_storage(pairs)


def _swappable(param: torch.Tensor, copy: torch.Tensor) -> bool:
    return (param.device, param.dtype, param.shape) == (copy.device, copy.dtype, copy.shape)


def _swap_storage(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, copy in pairs:
            param.data, copy.data = copy.data, param.data


def _resume_folder(run_dir: str) -> str | None:
    """The newest complete checkpoint of this run, looked up now (each worker group start).

    Ray registers a checkpoint with the controller only after rank 0 has copied it to storage,
    so a worker killed in between leaves a complete checkpoint that `get_checkpoint()` of the
    retried group does not return; the run folder (Ray's storage folder, shared by every node)
    holds it, and every checkpoint of an earlier fit() with the same run name. Rank 0 decides
    and the others follow, so no rank can start from another step.
    """
    candidates = []
    found = latest_checkpoint(Path(run_dir))
    if found is not None:
        candidates.append(found)
    registered = ray.train.get_checkpoint()
    if registered is not None:  # normally also under run_dir; kept should storage move
        progress = read_progress(Path(registered.path))
        if progress is not None:
            candidates.append((Path(registered.path), progress))
    newest = max(candidates, key=lambda item: item[1].step)[0] if candidates else None
    return _from_rank_zero(str(newest) if newest is not None else None)


def _world_size() -> int:
    """Ranks in the torch.distributed group (1 outside it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _from_rank_zero(value: str | None) -> str | None:
    """Rank 0's `value` on every rank (just `value` outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _restore(
    state: TrainState, cfg: RFSRConfig, rank: int, progress: Progress, context: LoopContext
) -> Progress:
    """Load the newest complete checkpoint of the run (`_resume_folder`), else start fresh;
    rank 0 tags the MLflow run `rfsr.resume.N` with the step and folder of each resume."""
    run = context.run
    folder = _resume_folder(context.run_dir)
    if folder is None:
        return progress
    restored = load_checkpoint(Path(folder), state)
    if rank != 0:  # the checkpoint holds rank 0's generators: its index stream is every rank's,
        # its noise is its own
        state.generator.manual_seed(seeds.derive_seed(cfg.train.seed, "noise", rank, restored.step))
    log.info(
        "rank %d resumed at step %d from %s (after data epoch %d)",
        rank,
        restored.step,
        folder,
        restored.data_epoch,
    )
    if rank == 0 and run is not None:  # every resume (rerun or retry) stays on record
        mlflow_run.add_numbered_tag(run, "rfsr.resume", f"step {restored.step} from {folder}")
    return restored


def _logged_through(context: LoopContext, rank: int) -> LoopContext:
    """`context` with `logged_through` set from the MLflow run (rank 0).

    A group retried after a failure resumes at its last checkpoint, but the killed group may
    have logged later steps already; MLflow cannot delete metric points, so the retried group
    skips every step the run holds (the high-water mark is read from the run itself, so it also
    covers a kill before the first checkpoint and a rerun of the same run name).
    """
    if rank != 0 or context.run is None:
        return context
    return dataclasses.replace(context, logged_through=mlflow_run.last_logged_step(context.run))


def _log_metrics(context: LoopContext, metrics: dict[str, float], step: int) -> None:
    """Log to the run unless it already holds metrics at `step` (see `_logged_through`)."""
    if context.run is not None and step > context.logged_through:
        mlflow_run.log_metrics(context.run, metrics, step)


def _record_timesteps(model: ISRDiffusionModel, cfg: RFSRConfig, context: LoopContext) -> None:
    """Log once per run which timestep each sampler index is (the loss windows are indices):
    one INFO line, `timesteps.json` in the run folder and in the MLflow run, and a param."""
    steps = cfg.schedule.num_inference_steps
    timesteps = model.set_timesteps(steps)
    scheduler = getattr(model, "scheduler", None)
    scheduler_name = type(scheduler).__name__ if scheduler is not None else None
    summary = describe_timesteps(timesteps, head=3, tail=3, scheduler_name=scheduler_name)
    log.info("sampler index → timestep (index 0 noisiest): %s", summary)
    path = Path(context.run_dir) / "timesteps.json"
    record = {
        "num_inference_steps": steps,
        "scheduler": scheduler_name,
        "timesteps": timesteps.cpu().tolist(),
    }
    path.write_text(json.dumps(record, indent=2))
    if context.run is not None:
        mlflow_run.log_params(context.run, {"rfsr.timesteps_head_tail": summary})
        mlflow_run.log_artifact(context.run, path)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: RFSRConfig = config["cfg"]
    context: LoopContext = config["context"]
    rank = ray.train.get_context().get_world_rank()
    # Nodes can differ in what they have staged: check this one before the model or data start.
    require_weights(cfg, where=f"rank {rank} ({socket.gethostname()})")
    device = ray.train.torch.get_device()
    seeds.seed_globals(cfg.train.seed, rank)
    model = build_model(cfg.model, cfg.data.scale)
    model.to(device)
    state = build_state(cfg, model, device, rank)
    fresh = Progress(
        run_id=context.run.run_id if context.run else None, data_epoch=context.start_epoch
    )
    progress = _restore(state, cfg, rank, fresh, context)
    context = _logged_through(context, rank)
    if rank == 0 and state.step == 0 and cfg.train.loss == "rfsr":
        _record_timesteps(model, cfg, context)
    no_sync = wrap_for_ddp(state)
    autocast = autocast_for(cfg.train.mixed_precision, device)
    validator = None
    if context.val_set is not None:  # every rank samples its share of each validation
        validator = Validator(cfg, context.val_set, state.losses, device, rank, _world_size())
        if state.step == 0:
            _validate(state, validator, context, cfg)
    with contextlib.ExitStack() as stack:
        if context.run is not None and system_metrics_enabled(cfg):
            stack.enter_context(_node_system_metrics(context.run))
        _train(state, cfg, context, progress, rank, validator, autocast, no_sync)


def _node_system_metrics(run: mlflow_run.RunHandle) -> contextlib.AbstractContextManager:
    """MLflow's system-metrics monitor samples only its own machine: the first worker of each
    node runs one (`system/node_<rank>/…`); other workers of the node get a no-op."""
    train_context = ray.train.get_context()
    if train_context.get_local_rank() != 0:
        return contextlib.nullcontext()
    return start_system_metrics(run, node_id=f"node_{train_context.get_node_rank()}")


def _train(
    state: TrainState,
    cfg: RFSRConfig,
    context: LoopContext,
    progress: Progress,
    rank: int,
    validator: Validator | None,
    autocast: Any,
    no_sync: Any,
) -> None:
    if state.step >= cfg.train.steps:
        # Resumed at the last checkpoint, whose report Ray may never have received (a worker
        # killed before the controller's next poll): finish again (validate, export, report) so
        # the fit, and a Tune trial, end with the final result.
        _report(state, cfg, context, progress, rank, validator)
        return
    device = state.params[0].device
    stream = _batches(ray.train.get_dataset_shard("train"), cfg, device, rank)
    timing = Timing()
    # Closed while Ray still runs: in Train's local mode (the loop in the driver) the garbage
    # collector would close Ray Data's iterator after ray.shutdown, which logs tracebacks, and
    # a thread still fetching then ends the process with exit code 1.
    with contextlib.closing(stream):
        while state.step < cfg.train.steps:
            started = time.perf_counter()
            micro_batches = []
            if state.buffer is not None and not state.buffer.stale(state.step):
                micro_batches = state.buffer.batches()  # served from the last rollout: no new pairs
            for _ in range(cfg.train.grad_accum - len(micro_batches)):
                batch, epoch = _next_batch(stream)
                progress.data_epoch = max(progress.data_epoch, epoch)
                micro_batches.append(batch)
            timing.data_seconds += time.perf_counter() - started
            result = optimizer_step(state, micro_batches, cfg, autocast, no_sync)
            elapsed = time.perf_counter() - started
            timing.total_seconds += elapsed
            timing.run_seconds += elapsed
            timing.run_steps += 1
            timing.samples += sum(len(b.lr_image) for b in micro_batches)
            _record(result, timing, state, cfg, context, rank)
            if _report(state, cfg, context, progress, rank, validator, timing):
                break


# The name Ray Data gives the threads that run an iterator's pipeline
# (ray/data/_internal/block_batching/util.py, `iter_threaded`).
RAY_DATA_ITERATOR_THREAD = "iter_threaded"


def _join_data_threads(threads_before: set[threading.Thread], timeout_s: float = 60.0) -> None:
    """Wait for the Ray Data iterator threads started since `threads_before`.

    Closing Ray Data's iterator only asks its threads to stop: one that is fetching the next
    block (`ray.get`) finishes that fetch first. If Ray shuts down meanwhile (the driver of a
    local-mode run exits right after training), that call makes Ray end the process with exit
    code 1 ("The core worker has already been shutdown"), after a run that succeeded. Ray Data
    offers no handle to join them, hence the thread name."""
    deadline = time.monotonic() + timeout_s
    while pending := [
        thread
        for thread in threading.enumerate()
        if thread.name == RAY_DATA_ITERATOR_THREAD and thread not in threads_before
    ]:
        if time.monotonic() >= deadline:
            log.warning(
                "%d Ray Data iterator thread(s) still fetching %.0f s after training ended",
                len(pending),
                timeout_s,
            )
            return
        pending[0].join(timeout=max(deadline - time.monotonic(), 0.0))


def _record(
    result: Any, timing: Timing, state: TrainState, cfg: RFSRConfig, context: LoopContext, rank: int
) -> None:
    for name, value in result.terms.items():
        timing.history.setdefault(name, []).append(value)
    if rank == 0 and context.board is not None:
        post_step(context.board, state.step, result.terms)
    if state.step % cfg.train.log_every and state.step != cfg.train.steps:
        return
    metrics = {name: float(np.mean(values)) for name, values in timing.history.items()}
    metrics.update(
        {
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "samples_per_s": timing.samples / max(timing.total_seconds, 1e-9),
            "data_wait_fraction": timing.data_seconds / max(timing.total_seconds, 1e-9),
            "skipped_steps": state.skipped_steps,
        }
    )
    if result.indices:
        metrics["timestep_index"] = float(np.mean(result.indices))
    timing.history.clear()
    timing.reset()
    if rank != 0:
        return
    if context.data_stats is not None:
        counts = ray.get(context.data_stats.snapshot.remote())
        metrics.update({f"data_{k}": v for k, v in counts.items()})
    log.info(
        "step %d: %s",
        state.step,
        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("data_")),
    )
    _log_metrics(context, metrics, state.step)


def _report(
    state: TrainState,
    cfg: RFSRConfig,
    context: LoopContext,
    progress: Progress,
    rank: int,
    validator: Validator | None,
    timing: Timing | None = None,
) -> bool:
    """At validation and checkpoint steps, in this order: validate (rank 0), vote on stopping
    (every rank), export after the last step (rank 0), report (every rank; rank 0 attaches the
    checkpoint). Returns True when training must end early (the hacking monitor's stop).
    A report carries `seconds_per_step`: this worker's mean wall-clock per optimiser step
    (data wait included, validation and checkpoints not) since it started."""
    last = state.step >= cfg.train.steps
    validate_now = last or state.step % cfg.train.validate_every == 0
    checkpoint_now = last or state.step % cfg.train.checkpoint_every == 0
    if not (validate_now or checkpoint_now):
        return False
    metrics: dict[str, float] = {"step": state.step}
    if timing is not None and timing.run_steps:
        metrics["seconds_per_step"] = timing.run_seconds / timing.run_steps
    if validate_now and validator is not None:
        metrics.update(_validate(state, validator, context, cfg))
    stop = validate_now and _vote_stop(metrics, cfg, state.step)
    if last or stop:
        _export_final(state, validator, context, cfg, rank)
    if checkpoint_now or stop:
        _report_with_checkpoint(metrics, state, progress, cfg, rank, context.run_dir)
    else:
        ray.train.report(metrics)
    return stop


def _vote_stop(metrics: dict[str, float], cfg: RFSRConfig, step: int) -> bool:
    """True when any rank's validation raised the hacking signal and losses.monitor.stop is on.
    A collective: every rank calls it at every validation step, validator or not."""
    if not cfg.losses.monitor.stop:
        return False
    stop = any_rank(metrics.get("val_hacking_signal", 0.0) > 0)
    if stop:
        log.warning("step %d: reward-hacking signal; stopping (losses.monitor.stop)", step)
    return stop


def _export_final(
    state: TrainState,
    validator: Validator | None,
    context: LoopContext,
    cfg: RFSRConfig,
    rank: int,
) -> None:
    """Unwrap the DDP modules (every rank), then export the EMA model and the base-vs-fine-tuned
    table (rank 0). Runs before the final report: a Tune scheduler may stop the trial (killing
    this process) as soon as it sees the last result."""
    state.model.unwrap_trainable()
    if rank != 0:
        return
    _export_model(state, context, cfg)
    if validator is not None and validator.last is not None:
        _write_final_table(validator, context)


def _report_with_checkpoint(
    metrics: dict[str, float],
    state: TrainState,
    progress: Progress,
    cfg: RFSRConfig,
    rank: int,
    run_dir: str,
) -> None:
    """Every rank reports `metrics`; rank 0 attaches a checkpoint of this step (in Train's local
    mode it writes the checkpoint into the run folder itself)."""
    if cfg.train.num_workers == 0:
        save_into_run(Path(run_dir), state.step, cfg.train.keep_checkpoints, state, progress, cfg)
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = None
        if rank == 0:
            folder = save_checkpoint(Path(scratch) / "checkpoint", state, progress, cfg)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{state.step:08d}"
        )


def _validate(
    state: TrainState, validator: Validator, context: LoopContext, cfg: RFSRConfig
) -> dict[str, float]:
    """Validate the EMA weights against the base model; every rank samples its share, rank 0
    scores, logs and returns the metrics (the other ranks return none)."""
    base = validator.base(state.model)  # sampled and scored at the first validation only
    with ema_weights(state):
        result = validator.run(state.model)
    if result is None or base is None:  # not rank 0
        return {}
    current, grid = result
    console = context.board is not None  # the driver prints the validation line
    metrics = _validation_metrics(validator, base, current, cfg, state.step, console)
    bicubic = validator.bicubic_metrics
    _log_validation(context, metrics, base, bicubic, grid, state.step, cfg.train.steps)
    return metrics


def _validation_metrics(
    validator: Validator,
    base: dict[str, float],
    current: dict[str, float],
    cfg: RFSRConfig,
    step: int,
    console: bool = False,
) -> dict[str, float]:
    """`val_*` metrics, their `val_*_gain` over the base, the validation objective and the
    hacking monitor's state (`console`: the driver shows its warning in the validation line)."""
    metrics = {f"val_{k}": v for k, v in current.items()}
    metrics.update(
        {f"val_{k}_gain": v for k, v in gains(base, current, validator.lower_better).items()}
    )
    if cfg.losses.reward.terms:  # the number a sweep ranks trials by (rfsr_ray.train.objective)
        parts = objective_parts(cfg, metrics)
        metrics["val_reward_gain"] = parts["reward_gain"]
        metrics["val_objective"] = parts["objective"]
    if validator.monitor is not None:
        reward = current[f"reward_{objective_reward(cfg)}"]
        held_out = validator.held_out_values(current)
        metrics.update(_check_hacking(validator.monitor, reward, held_out, step, console))
    return metrics


def _log_validation(
    context: LoopContext,
    metrics: dict[str, float],
    base: dict[str, float],
    bicubic: dict[str, float],
    grid: np.ndarray,
    step: int,
    total_steps: int,
) -> None:
    """Save the sample grid under the run folder; log it, the metrics and (at step 0) the
    base model's and bicubic upsampling's metrics as `base_*` and `bicubic_*`; one line for the
    driver's console."""
    grid_path = Path(context.run_dir) / "validation" / f"grid_step_{step:08d}.png"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(grid_path)  # beside the checkpoints; MLflow gets a stepped image
    log.info(
        "validation at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    )
    if context.board is not None:
        post_line(context.board, validation_line(metrics, step, total_steps))
    _log_metrics(context, metrics, step)
    if step == 0:
        _log_metrics(context, {f"base_{k}": v for k, v in base.items()}, 0)
        _log_metrics(context, {f"bicubic_{k}": v for k, v in bicubic.items()}, 0)
    if context.run is not None and step > context.logged_through:
        # Keyed and stepped: the MLflow UI's slider shows how the outputs changed.
        mlflow_run.log_image(context.run, grid, key="validation", step=step)


def validation_line(metrics: dict[str, float], step: int, total_steps: int) -> str:
    """'validation 40/120: psnr 24.61 (+0.07) · ssim 0.6326 (+0.015) · …': each held-out value
    with its gain over the base (positive is better), the Gram distance, the hacking streak."""
    parts = []
    for name, value in metrics.items():
        short = name.removeprefix("val_")
        if short in ("objective", "reward_gain") or short.endswith("_gain") or "hacking" in short:
            continue
        gain = metrics.get(f"val_{short}_gain")
        parts.append(f"{short} {value:.4g}" + (f" ({gain:+.2g})" if gain is not None else ""))
    if metrics.get("val_hacking_streak"):
        parts.append(f"hacking streak {metrics['val_hacking_streak']:.0f}")
    line = f"validation {step}/{total_steps}: " + " · ".join(parts)
    if metrics.get("val_hacking_signal"):
        line += "\n  " + hacking_warning(metrics)
    return line


def _check_hacking(
    monitor: HackingMonitor,
    reward: float,
    held_out: dict[str, float],
    step: int,
    console: bool = False,
) -> dict[str, float]:
    """Feed the monitor this validation's optimised reward and held-out metrics (higher is
    better). Returns its streak, whether it fired, and `val_hacking_fall_<metric>`: how far each
    falling held-out metric fell since the last validation (a fraction). When it fires, a
    warning: in this worker's log, and shown by the driver in the validation line (`console`)."""
    signal = monitor.update(reward, held_out)
    metrics = {"val_hacking_streak": signal.streak, "val_hacking_signal": float(signal.fired)}
    metrics.update({f"val_hacking_fall_{k}": v for k, v in signal.falling.items()})
    if signal.fired:
        (log.info if console else log.warning)("step %d: %s", step, hacking_warning(metrics))
    return metrics


def hacking_warning(metrics: dict[str, float]) -> str:
    """'possible reward hacking: the optimised reward rose 2 validations running while held-out
    piqe fell 1.44 % (since the last validation)'."""
    falling = ", ".join(
        f"{name.removeprefix('val_hacking_fall_')} fell {100 * value:.2f} %"
        for name, value in metrics.items()
        if name.startswith("val_hacking_fall_")
    )
    return (
        f"possible reward hacking: the optimised reward rose {metrics['val_hacking_streak']:.0f} "
        f"validations running while held-out {falling} (since the last validation)"
    )


def _export_model(state: TrainState, context: LoopContext, cfg: RFSRConfig) -> None:
    """Save the EMA model with its config to `<run_dir>/model` and log it as the run's MLflow
    model (a pyfunc that super-resolves; registered under `tracking.register_model` if set)."""
    export = Path(context.run_dir) / "model"
    with ema_weights(state):
        save_model(state.model, cfg.model, export)
    cfg.save(export / "config.yaml")
    if context.run is None:
        return
    # Lets an evaluation of this folder link back to the training run and its logged model.
    record = {"run_id": context.run.run_id, "tracking_uri": context.run.tracking_uri}
    (export / "training_run.json").write_text(json.dumps(record, indent=2))
    record["model_id"] = log_model(
        context.run, export, register_as=cfg.tracking.register_model, step=state.step
    )
    (export / "training_run.json").write_text(json.dumps(record, indent=2))


def _write_final_table(validator: Validator, context: LoopContext) -> None:
    """`final_table.md` (bicubic, the base model and the last validation) in the run folder; in
    MLflow as a file, a table and the run's description."""
    table = validator.final_table()
    path = Path(context.run_dir) / "final_table.md"
    path.write_text(table + "\n")
    if context.run is None:
        return
    mlflow_run.log_artifact(context.run, path)
    mlflow_run.log_table(context.run, validator.final_rows(), "final_table.json")
    mlflow_run.set_description(
        context.run, "Held-out validation, bicubic vs base vs fine-tuned (EMA):\n\n" + table
    )
