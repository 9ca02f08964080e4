"""Shared fixtures (a small local Ray cluster, generated test images) and the per-test time
budget report."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session. 4 logical CPUs on 2 cores leave room for the
    data stage beside training workers (a fully reserved cluster would deadlock).

    Ray Data's Parquet reader starts up to 32 footer-reading actors per read, sized for cloud
    storage: on 2 cores those Python processes cost ~7 s of CPU per read of a small local file,
    so the session (and the workers, which inherit the environment) reads with one.

    Ray Train's preemption watcher (one more actor per fit, ~3 s of CPU to import, polling a
    drain state a local machine never enters) is off: nothing here is preempted. Its controller
    polls the workers every 0.5 s instead of 2 s: a fit ends (and registers a checkpoint) at a
    poll, and the suite runs a dozen fits."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        patch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
        ray.shutdown()


def natural_image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth random colour image with some texture: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
    noise = rng.normal(0, 0.15, (height, width, 3))
    return np.clip((base * 0.4 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bad_image_files(folder: Path, size: int = 96) -> dict[str, tuple[str, ...]]:
    """Write one file per odd or bad case; returns {file name: expected outcomes}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(natural_image(size, size + 32))
    good_jpeg = encode(rgb, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    wide16 = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
    files = {
        "good.png": (encode(rgb, "PNG"), "decoded"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "skipped_corrupt"),
        "zero.png": (b"", "skipped_empty_file"),
        "text.png": (b"this is not an image\n" * 10, "skipped_not_an_image"),
        "gray16.png": (
            encode(Image.fromarray(wide16), "PNG"),
            ("converted_high_bit_depth", "converted_grayscale"),
        ),
        "gray.png": (encode(rgb.convert("L"), "PNG"), "converted_grayscale"),
        "rgba.png": (encode(rgb.convert("RGBA"), "PNG"), "converted_alpha_on_white"),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), "converted_cmyk"),
        "rotated.jpg": (encode(rgb, "JPEG", exif=exif), "converted_exif_oriented"),
        "palette.png": (encode(rgb.convert("P"), "PNG"), "converted_palette"),
        "tiny.png": (encode(rgb.resize((16, 16)), "PNG"), "skipped_too_small"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {
        name: outcome if isinstance(outcome, tuple) else (outcome,)
        for name, (_, outcome) in files.items()
    }


# ------------------------------------------------------------------ per-test time budget
# Seconds a test may take (setup + call + teardown, so a fixture counts for the first test that
# builds it), by the folder under tests/; see tests/README.md. Over-budget tests are reported at
# the end of the run, not failed: timings depend on the machine and its load.
TIME_BUDGET_S = {"unit": 5.0, "integration": 60.0}


def budget_for(nodeid: str) -> float | None:
    """The budget of test `nodeid` (`tests/<folder>/...::name`), None outside budgeted folders."""
    parts = Path(nodeid.split("::")[0]).parts
    return TIME_BUDGET_S.get(parts[1]) if len(parts) > 2 and parts[0] == "tests" else None


class TimeBudget:
    """Adds up each test's phase durations and lists the tests over their folder's budget."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.call: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.total[report.nodeid] = self.total.get(report.nodeid, 0.0) + report.duration
        if report.when == "call":
            self.call[report.nodeid] = report.duration

    def over_budget(self) -> list[tuple[float, float, str]]:
        """(seconds, budget, test id) of each test over its budget, slowest first."""
        over = []
        for nodeid, seconds in self.total.items():
            budget = budget_for(nodeid)
            if budget is not None and seconds > budget:
                over.append((seconds, budget, nodeid))
        return sorted(over, reverse=True)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        over = self.over_budget()
        if not over:
            return
        terminalreporter.write_sep(
            "=", f"{len(over)} tests over their time budget (tests/README.md)"
        )
        for seconds, budget, nodeid in over:
            call = self.call.get(nodeid, 0.0)
            terminalreporter.write_line(
                f"{seconds:7.1f} s > {budget:g} s  {nodeid}  (call {call:.1f} s)"
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(TimeBudget(), "rfsr_time_budget")
