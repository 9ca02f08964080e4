"""Reward gain and PSNR change of the demo's fine-tune in each step mode, over seeds: the
efficacy half of the step-mode comparison (benchmarks/step_modes.py measures the speed).

    .venv/bin/python benchmarks/step_modes_efficacy.py [--base outputs/base/tiny_x4] [--seeds 3]

Each run is `pipelines/finetune.py --config configs/demo.yaml` (its 80 steps, its held-out
pairs) with only `schedule.mode` (and the buffer's refresh), `train.seed` and where outputs go
changed; the figures are the last validation's `val_reward_gain` and `val_psnr_gain` (fine-tuned
minus base on the held-out pairs), read back from the runs' MLflow store. Same number of steps
for every mode; the same-wall-clock comparison is not made here.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "trajectory": ["schedule.mode=trajectory"],
    "one_step": ["schedule.mode=one_step"],
    "buffer_r4": ["schedule.mode=trajectory_buffer", "schedule.buffer.refresh_every=4"],
    "decode_crop_64": ["schedule.mode=trajectory", "losses.decode_crop=64"],
}


def run(base: str, mode: list[str], seed: int, scratch: Path) -> tuple[str, float]:
    name = f"{'_'.join(m.split('=')[1] for m in mode)}_seed{seed}".replace(".", "_")
    command = [sys.executable, "pipelines/finetune.py", "--config", "configs/demo.yaml",
               f"model.pretrained={base}", f"train.seed={seed}", *mode,
               f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}",
               f"output.storage_path={scratch / 'runs'}", f"output.run_name={name}"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    run_id = re.search(r"MLflow run (\w+)", result.stdout + result.stderr).group(1)
    return run_id, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="outputs/base/tiny_x4", help="the demo's base model")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    base = str(Path(args.base).resolve())
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        client = MlflowClient(f"sqlite:///{scratch / 'mlflow.db'}")
        print("| mode | reward gain (mean ± std) | ΔPSNR dB (mean ± std) | per seed (reward) | s |")
        print("|---|---|---|---|---|")
        for label in args.modes:
            mode = MODES[label]
            gains, psnr, seconds = [], [], []
            for seed in range(args.seeds):
                run_id, took = run(base, mode, seed, scratch)
                gains.append(client.get_metric_history(run_id, "val_reward_gain")[-1].value)
                psnr.append(client.get_metric_history(run_id, "val_psnr_gain")[-1].value)
                seconds.append(took)
            spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            print(
                f"| {label} | {statistics.mean(gains):+.4f} ± {spread(gains):.4f} "
                f"| {statistics.mean(psnr):+.3f} ± {spread(psnr):.3f} "
                f"| {', '.join(f'{g:+.4f}' for g in gains)} | {statistics.mean(seconds):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
