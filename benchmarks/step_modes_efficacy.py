"""Reward gain and PSNR change of the demo's fine-tune in each step mode, over seeds: the
efficacy half of the step-mode comparison (benchmarks/step_modes.py measures the speed).

    .venv/bin/python benchmarks/step_modes_efficacy.py [--base outputs/base/tiny_x4] [--seeds 3]
        [--same-time]

Each run is `pipelines/finetune.py --config configs/demo.yaml` (its 80 steps, its held-out
pairs) with only `schedule.mode` (and the buffer's refresh), `train.seed` and where outputs go
changed; the figures are the last validation's `val_reward_gain` and `val_psnr_gain` (fine-tuned
minus base on the held-out pairs), read back from the runs' MLflow store.

The first table gives every mode the same number of steps. With `--same-time` a second table
gives every mode trajectory mode's training time instead: each mode's time per optimiser step
is measured in its equal-step runs (rank 0's `samples_per_s`, which leaves validation, start-up
and checkpoints out), and the mode trains round(80 × trajectory's time per step / its own)
steps, validated at the end.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from rfsr_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "trajectory": ["schedule.mode=trajectory"],
    "one_step": ["schedule.mode=one_step"],
    "buffer_r4": ["schedule.mode=trajectory_buffer", "schedule.buffer.refresh_every=4"],
    "decode_crop_64": ["schedule.mode=trajectory", "losses.decode_crop=64"],
}


def run(
    base: str, mode: list[str], seed: int, scratch: Path, steps: int | None = None
) -> tuple[str, float]:
    name = f"{'_'.join(m.split('=')[1] for m in mode)}_seed{seed}".replace(".", "_")
    length = []
    if steps is not None:  # one validation at the end, as many steps as the time allows
        name += f"_steps{steps}"
        length = [f"train.steps={steps}", f"train.validate_every={steps}",
                  f"train.checkpoint_every={steps}"]  # fmt: skip
    command = [sys.executable, "pipelines/finetune.py", "--config", "configs/demo.yaml",
               f"model.pretrained={base}", f"train.seed={seed}", *mode, *length,
               f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}",
               f"output.storage_path={scratch / 'runs'}", f"output.run_name={name}"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    run_id = re.search(r"MLflow run (\w+)", result.stdout + result.stderr).group(1)
    return run_id, time.perf_counter() - started


@dataclass
class Outcome:
    gains: list[float] = field(default_factory=list)  # final held-out reward gain per seed
    psnr: list[float] = field(default_factory=list)  # final ΔPSNR (dB) per seed
    seconds: list[float] = field(default_factory=list)  # wall-clock per run
    step_seconds: list[float] = field(default_factory=list)  # training time per step per run


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def measure(
    client: MlflowClient, base: str, mode: list[str], seeds: int, scratch: Path,
    samples_per_step: int, steps: int | None = None,
) -> Outcome:  # fmt: skip
    """`samples_per_step`: what one worker's optimiser step consumes (`samples_per_s` counts)."""
    outcome = Outcome()
    for seed in range(seeds):
        run_id, took = run(base, mode, seed, scratch, steps)
        outcome.gains.append(_last(client, run_id, "val_reward_gain"))
        outcome.psnr.append(_last(client, run_id, "val_psnr_gain"))
        outcome.seconds.append(took)
        # One rate per logging window of equal length (train.log_every steps): the mean time
        # per step is the mean of the windows' times, not the time at the mean rate.
        rates = [m.value for m in client.get_metric_history(run_id, "samples_per_s")]
        outcome.step_seconds.append(statistics.mean(samples_per_step / rate for rate in rates))
    return outcome


def _last(client: MlflowClient, run_id: str, key: str) -> float:
    """The value of metric `key` at the run's last logged step."""
    return max(client.get_metric_history(run_id, key), key=lambda m: m.step).value


def row(label: str, outcome: Outcome, steps: str) -> str:
    return (
        f"| {label} | {steps} | {statistics.mean(outcome.gains):+.4f} ± "
        f"{_spread(outcome.gains):.4f} | {statistics.mean(outcome.psnr):+.3f} ± "
        f"{_spread(outcome.psnr):.3f} | {', '.join(f'{g:+.4f}' for g in outcome.gains)} | "
        f"{statistics.mean(outcome.step_seconds):.2f} | {statistics.mean(outcome.seconds):.0f} |"
    )


HEADER = (
    "| mode | steps | reward gain (mean ± std) | ΔPSNR dB (mean ± std) | per seed (reward) "
    "| s per step (training) | s per run |\n|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="outputs/base/tiny_x4", help="the demo's base model")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--same-time", action="store_true", help="also give every mode trajectory's time"
    )
    args = parser.parse_args()
    if args.same_time and "trajectory" not in args.modes:
        parser.error("--same-time measures against trajectory mode: include it in --modes")
    base = str(Path(args.base).resolve())
    demo = load_config(ROOT / "configs" / "demo.yaml").train
    demo_steps, samples_per_step = demo.steps, demo.batch_size * demo.grad_accum
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        client = MlflowClient(f"sqlite:///{scratch / 'mlflow.db'}")
        print(f"same steps ({demo_steps} each):\n{HEADER}", flush=True)
        outcomes = {}
        for label in args.modes:
            mode = MODES[label]
            outcomes[label] = measure(client, base, mode, args.seeds, scratch, samples_per_step)
            print(row(label, outcomes[label], str(demo_steps)), flush=True)
        if not args.same_time:
            return
        budget = demo_steps * statistics.mean(outcomes["trajectory"].step_seconds)
        print(f"\nsame training time ({budget:.0f} s, trajectory's {demo_steps} steps):\n{HEADER}")
        print(row("trajectory", outcomes["trajectory"], str(demo_steps)), flush=True)
        for label in args.modes:
            if label == "trajectory":
                continue
            steps = round(budget / statistics.mean(outcomes[label].step_seconds))
            outcome = measure(
                client, base, MODES[label], args.seeds, scratch, samples_per_step, steps
            )
            print(row(label, outcome, str(steps)), flush=True)


if __name__ == "__main__":
    main()
