"""pipelines/evaluate.py end to end: two tiny models on four generated test sets, values checked
against pyiqa, the HTML report rendered in headless Chromium."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import evaluate
from tests.conftest import natural_image
from tests.integration.conftest import mlflow_client, save_tiny_model, tracking_uri

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_test_sets(root: Path) -> dict[str, Path]:
    """A paired folder (RealSR names, one corrupt LR), an LR-only folder and a Parquet pair set."""
    lr, hr, wild, pairs = root / "LR", root / "HR", root / "wild", root / "pairs_set" / "pairs"
    for folder in (lr, hr, wild, pairs):
        folder.mkdir(parents=True)
    for index in range(2):
        image = natural_image(48, 64, seed=index)
        Image.fromarray(image).save(hr / f"scene{index}_HR.png")
        Image.fromarray(image).resize((16, 12), Image.BICUBIC).save(lr / f"scene{index}_LR4.png")
        Image.fromarray(natural_image(12, 16, seed=10 + index)).save(wild / f"w{index}.jpg")
    Image.fromarray(natural_image(48, 64, seed=5)).save(hr / "broken_HR.png")
    (lr / "broken_LR4.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    hr_image = natural_image(32, 32, seed=7)
    table = pa.table(
        {
            "hr_png": [png(hr_image)],
            "lr_png": [png(np.asarray(Image.fromarray(hr_image).resize((8, 8))))],
            "source_id": ["p0"],
            "crop_index": [0],
        }
    )
    pq.write_table(table, pairs / "part-0.parquet")
    return {"lr": lr, "hr": hr, "wild": wild, "pairs": pairs.parent}


@pytest.fixture(scope="module")
def tuned_model(tmp_path_factory) -> Path:
    """A second tiny model with other random weights, standing in for a fine-tune."""
    return save_tiny_model(tmp_path_factory.mktemp("tuned"), seed=1)


def eval_args(tmp_path: Path, base: Path, tuned: Path, sets: dict[str, Path]) -> list[str]:
    test_sets = (
        f"[{{name: paired, kind: paired, lr: {sets['lr']}, hr: {sets['hr']}}}, "
        f"{{name: wild, kind: lr_only, lr: {sets['wild']}}}, "
        f"{{name: parquet, kind: parquet, path: {sets['pairs']}}}, "
        "{name: synthetic, kind: synthetic, source: 'builtin:coffee', crop: 48}]"
    )
    return [
        f"eval.models=[{{name: base, path: {base}}}, {{name: tuned, path: {tuned}}}]",
        f"eval.test_sets={test_sets}",
        "eval.metrics=[psnr, ssim, gmsd, piqe]",
        "eval.num_inference_steps=2",
        "eval.tile_size=8",
        "eval.tile_overlap=2",
        "eval.save_images=true",
        "eval.report_crop=32",
        "eval.name=run",
        f"eval.output={tmp_path / 'eval'}",
        f"tracking.uri={tracking_uri(tmp_path)}",
    ]


@dataclass(frozen=True)
class Evaluation:
    """One evaluate.main run: its exit code and printout, the folder holding its test sets
    (`data/`), results (`eval/run/`) and MLflow store (`mlflow.db`), and the test sets."""

    code: int
    out: str
    root: Path
    sets: dict[str, Path]

    @property
    def run_dir(self) -> Path:
        return self.root / "eval" / "run"


@pytest.fixture(scope="module")
def evaluation(ray_cluster, tmp_path_factory, base_model, tuned_model) -> Evaluation:
    """Both tiny models evaluated once, shared by the checks of the results and of the page."""
    root = tmp_path_factory.mktemp("evaluate")
    sets = make_test_sets(root / "data")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = evaluate.main(eval_args(root, base_model, tuned_model, sets))
    return Evaluation(code, printed.getvalue(), root, sets)


def test_evaluate_two_models_on_four_test_sets(evaluation, tuned_model):
    assert evaluation.code == 0
    out = evaluation.out
    assert "bad image paired/broken" in out and "skipped_corrupt=1" in out
    run_dir = evaluation.run_dir

    with (run_dir / "aggregate.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    cells = {(r["test_set"], r["model"]) for r in rows}
    assert cells == {(s, m) for s in ("paired", "wild", "parquet", "synthetic")
                     for m in ("base", "tuned")}  # fmt: skip
    wild_metrics = {r["metric"] for r in rows if r["test_set"] == "wild"}
    assert wild_metrics == {"piqe"}  # LR-only: no-reference metrics only
    assert {r["metric"] for r in rows if r["test_set"] == "paired"} == {
        "psnr", "ssim", "gmsd", "piqe"
    }  # fmt: skip

    per_image = pq.read_table(run_dir / "per_image.parquet").to_pylist()
    assert len(per_image) == 2 * (2 + 2 + 1 + 1)
    _check_against_pyiqa(per_image, run_dir / "sr", evaluation.sets["hr"])
    sr = np.asarray(Image.open(run_dir / "sr" / "tuned" / "paired" / "scene0.png"))
    assert sr.shape == (48, 64, 3)  # 12×16 LR tiled at 8 px, ×4

    client = mlflow_client(evaluation.root)
    runs = client.search_runs([client.get_experiment_by_name("rfsr_ray").experiment_id])
    (run,) = runs
    assert run.data.tags["rfsr.kind"] == "evaluation"
    assert run.data.tags["rfsr.model.tuned.path"] == str(tuned_model)
    assert "paired.delta.tuned.psnr" in run.data.metrics
    assert run.data.metrics["paired.skipped_corrupt"] == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "aggregate.md", "comparison.png", "per_image.parquet"} <= artifacts
    page = (run_dir / "report.html").read_text()
    assert "broken" in page and page.count("data:image/png;base64") >= 3 * 4


def test_report_renders_in_headless_chromium(evaluation, tmp_path):
    """The HTML report shows its images in a browser (skipped without Chromium outside CI)."""
    assert evaluation.code == 0
    _render_in_chromium(evaluation.run_dir / "report.html", tmp_path / "screenshot.png")


def _check_against_pyiqa(per_image: list[dict], sr_dir: Path, hr_dir: Path) -> None:
    import pyiqa

    psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr")
    piqe = pyiqa.create_metric("piqe")
    for row in per_image:
        if row["set"] != "paired":
            continue
        sr_file = sr_dir / row["model"] / "paired" / f"{row['image_id']}.png"
        hr_file = hr_dir / f"{row['image_id']}_HR.png"
        assert float(psnr(str(sr_file), str(hr_file))) == pytest.approx(row["psnr"], abs=1e-5)
        assert float(piqe(str(sr_file))) == pytest.approx(row["piqe"], abs=1e-4)


def _render_in_chromium(page: Path, screenshot: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing; .ci/run installs it with apt-get")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={screenshot}", "--window-size=1100,1400", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    # The images are natural-looking crops: many pixels far from the white page and many colours.
    not_white = (np.abs(image - 255).sum(-1) > 60).mean()
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert not_white > 0.1 and colours > 2000, (not_white, colours)
