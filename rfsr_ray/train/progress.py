"""The driver's view of a training run: a progress bar (step / total, rate, ETA, loss, reward) and
one line per validation, fed by rank 0 through a small actor.

Ray Train's own callbacks run in its controller actor, not in the driver, and workers report only
at validation and checkpoint steps; so rank 0 posts every step to a `ProgressBoard` actor (one
fire-and-forget call, no waiting) and the driver polls it. On a terminal the bar is tqdm's; in a
pipe or under `ray job logs` it is a plain line every tenth of the run, so logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray
from tqdm import tqdm


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Events from rank 0, drained by the driver."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def post_step(board: Any, step: int, metrics: dict[str, float]) -> None:
    """Rank 0, every optimiser step: the step and its loss terms (fire and forget)."""
    # Stamped here: the driver polls twice a second and can see several steps at once, so its
    # own clock would make a rate of thousands of steps/s from two steps drained together.
    board.post.remote({"kind": "step", "step": step, "metrics": metrics, "time": time.time()})


def post_line(board: Any, text: str) -> None:
    """Rank 0: a line the driver prints above the bar (one per validation)."""
    board.post.remote({"kind": "line", "text": text})


def bar_postfix(metrics: dict[str, float]) -> str:
    """'loss 0.0462 · reward_gmsd -0.164': the loss and every reward score of a step."""
    shown = {"loss": metrics.get("loss")}
    scores = {k.removeprefix("score_"): v for k, v in metrics.items() if k.startswith("score_")}
    shown.update(scores)
    return " · ".join(f"{name} {value:.4g}" for name, value in shown.items() if value is not None)


@dataclass
class ConsoleProgress:
    """Polls a `ProgressBoard` on a thread while `fit()` runs and renders what it finds."""

    board: Any
    total: int
    start: int = 0
    stream: TextIO | None = None  # None: sys.stderr when the bar starts (not at import)
    interval_s: float = 0.5
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _bar: tqdm | None = None
    _step: int = 0
    _started: float = 0.0
    _first: tuple[int, float] | None = None  # the first step seen, and when rank 0 posted it
    _next_line: int = 0

    def __enter__(self) -> ConsoleProgress:
        if self.stream is None:
            self.stream = sys.stderr
        self._step = self.start
        self._started = time.time()
        self._next_line = self.start + self._line_every()
        if self.stream.isatty():
            self._bar = tqdm(
                total=self.total, initial=self.start, unit="step", file=self.stream, leave=True
            )
        self._thread = threading.Thread(target=self._poll, name="rfsr-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._render(self._drain())  # what arrived after the last poll
        if self._bar is not None:
            self._bar.close()

    def _line_every(self) -> int:
        return max(1, round((self.total - self.start) / 10))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._render(self._drain())

    def _drain(self) -> list[dict[str, Any]]:
        try:
            return ray.get(self.board.drain.remote(), timeout=30)
        except Exception:  # the board is best effort: a slow or lost actor never fails a run
            return []

    def _render(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["kind"] == "line":
                self._write(event["text"])
            elif event["kind"] == "step":
                self._advance(event["step"], event["metrics"], event.get("time", time.time()))

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _advance(self, step: int, metrics: dict[str, float], posted: float) -> None:
        postfix = bar_postfix(metrics)
        if self._first is None:
            self._first = (step, posted)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(postfix, refresh=True)
        elif step >= self._next_line or step >= self.total:
            self._next_line = step + self._line_every()
            self._write(f"{self._status(step, posted)} · {postfix}")
        self._step = step

    def _status(self, step: int, posted: float) -> str:
        """'step 40/120 (33%) · 0.52 steps/s · ETA 02:34': the rate since the first step this
        process saw (worker start-up and the step-0 validation would make the first ETAs
        several times too long), since the start until a second step arrives; times are when
        rank 0 posted each step."""
        if self._first is not None and step > self._first[0]:
            rate = (step - self._first[0]) / max(posted - self._first[1], 1e-9)
        else:
            rate = (step - self.start) / max(posted - self._started, 1e-9)
        eta = tqdm.format_interval((self.total - step) / rate) if rate > 0 else "?"
        done = f"step {step}/{self.total} ({step / self.total:.0%})"
        return f"{done} · {rate:.2g} steps/s · ETA {eta}"
