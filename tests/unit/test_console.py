"""What the driver prints: progress lines in a pipe, validation lines, default log levels."""

from __future__ import annotations

import io
import logging

from rfsr_ray import logs
from rfsr_ray.train.loop import validation_line
from rfsr_ray.train.progress import ConsoleProgress, bar_postfix


def render(total: int, events: list[dict]) -> list[str]:
    stream = io.StringIO()  # not a terminal: plain lines, as `ray job logs` shows them
    progress = ConsoleProgress(board=None, total=total, stream=stream)
    progress._next_line = progress._line_every()
    progress._render(events)
    return stream.getvalue().splitlines()


def test_a_pipe_gets_a_progress_line_every_tenth_of_the_run_and_every_validation_line():
    steps = [
        {"kind": "step", "step": s, "metrics": {"loss": 0.5, "score_gmsd": -0.2}}
        for s in range(1, 101)
    ]
    validation = {"kind": "line", "text": "validation 50/100: psnr 24.1 (+0.1)"}
    lines = render(100, [*steps[:50], validation, *steps[50:]])
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{s}/100" for s in range(10, 101, 10)]
    assert progress[-1].startswith("step 100/100 (100%)")
    assert progress[0].endswith("loss 0.5 · gmsd -0.2")
    assert "ETA" in progress[0] and "steps/s" in progress[0]
    assert lines[lines.index(validation["text"]) - 1].startswith("step 50/100")


def test_a_short_run_still_shows_its_last_step():
    lines = render(3, [{"kind": "step", "step": s, "metrics": {"loss": 1.0}} for s in (1, 2, 3)])
    assert lines[-1].startswith("step 3/3 (100%)")


def test_the_rate_and_eta_count_from_the_first_step_not_from_start_up():
    stream = io.StringIO()
    progress = ConsoleProgress(board=None, total=100, stream=stream)
    progress._started = 900.0  # worker start-up and the step-0 validation took 100 s
    progress._next_line = 10
    step = {"kind": "step", "metrics": {"loss": 0.5}}
    progress._render([{**step, "step": 1, "time": 1000.0}])
    progress._render([{**step, "step": 10, "time": 1018.0}])  # then 2 s per step
    assert stream.getvalue().startswith("step 10/100 (10%) · 0.5 steps/s · ETA 03:00")


def test_steps_drained_together_keep_the_rate_of_when_rank_0_posted_them():
    stream = io.StringIO()
    progress = ConsoleProgress(board=None, total=6, stream=stream)
    progress._next_line = 1
    # one poll finds three steps posted 10 s apart (the driver's clock would say 0 s apart)
    events = [{"kind": "step", "step": s, "metrics": {}, "time": 10.0 * s} for s in (1, 2, 3)]
    progress._render(events)
    assert stream.getvalue().splitlines()[-1].startswith("step 3/6 (50%) · 0.1 steps/s · ETA 00:30")


def test_bar_postfix_shows_the_loss_and_each_reward_score():
    assert bar_postfix({"loss": 0.25, "score_clipiqa": 0.5, "loss_gram": 1.0}) == (
        "loss 0.25 · clipiqa 0.5"
    )
    assert bar_postfix({"loss_structure": 0.1}) == ""


def test_validation_line_shows_values_with_their_gains_and_skips_bookkeeping():
    metrics = {
        "val_psnr": 24.5,
        "val_psnr_gain": 0.25,
        "val_reward_gmsd": -0.15,
        "val_reward_gmsd_gain": -0.01,
        "val_gram_to_base": 0.002,
        "val_objective": 1.0,
        "val_reward_gain": 0.3,
        "val_hacking_streak": 2.0,
        "val_hacking_signal": 0.0,
    }
    assert validation_line(metrics, 40, 120) == (
        "validation 40/120: psnr 24.5 (+0.25) · reward_gmsd -0.15 (-0.01) · "
        "gram_to_base 0.002 · hacking streak 2"
    )


def test_a_fired_hacking_monitor_adds_a_warning_that_names_the_falling_metric():
    from rfsr_ray.config import HackingMonitorConfig
    from rfsr_ray.train.loop import _check_hacking
    from rfsr_ray.train.monitor import HackingMonitor

    monitor = HackingMonitor(HackingMonitorConfig(held_out=["piqe"], patience=2, threshold=0.01))
    history = [(0.80, -77.0), (0.81, -80.0), (0.82, -82.0)]  # reward up, PIQE (negated) down
    fired = [
        _check_hacking(monitor, reward, {"piqe": piqe}, step, console=True)
        for step, (reward, piqe) in enumerate(history)
    ]
    assert [m["val_hacking_signal"] for m in fired] == [0.0, 0.0, 1.0]
    metrics = {"val_psnr": 29.3, "val_psnr_gain": 0.1, **fired[-1]}
    first, warning = validation_line(metrics, 80, 80).split("\n")
    assert first == "validation 80/80: psnr 29.3 (+0.1) · hacking streak 2"
    assert warning == (
        "  possible reward hacking: the optimised reward rose 2 validations running while "
        "held-out piqe fell 2.50 % (since the last validation)"
    )


def test_workers_are_quiet_by_default_and_verbose_restores_info(monkeypatch):
    names = ["rfsr_ray", "ray.data", "mlflow", "bitsandbytes.backends.cpu.ops"]
    saved = {name: logging.getLogger(name).level for name in names}
    monkeypatch.setenv("RAY_ADDRESS", "")  # setup_worker may pin it; undone after the test
    try:
        monkeypatch.setenv(logs.VERBOSE_ENV, "0")
        logs.setup_worker()
        assert logging.getLogger("rfsr_ray").level == logging.WARNING
        assert logging.getLogger("ray.data").level == logging.WARNING
        assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.ERROR
        monkeypatch.setenv(logs.VERBOSE_ENV, "1")
        logging.getLogger("mlflow").setLevel(logging.NOTSET)
        logs.setup_worker()
        assert logging.getLogger("rfsr_ray").level == logging.INFO
        assert logging.getLogger("mlflow").level == logging.NOTSET  # left to the library
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_the_runtime_env_carries_the_setup_hook_and_verbosity(monkeypatch):
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    env = logs.ray_runtime_env(local_cluster=False)
    assert env["worker_process_setup_hook"] == "rfsr_ray.logs.setup_worker"
    assert env["env_vars"] == {logs.VERBOSE_ENV: "1"}
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")
    local = logs.ray_runtime_env(local_cluster=True)["env_vars"]
    assert local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert local["RAY_DATA_LOG_LEVEL"] == local["MLFLOW_LOGGING_LEVEL"] == "WARNING"
