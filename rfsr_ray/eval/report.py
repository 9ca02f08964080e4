"""Evaluation outputs: the aggregate table in the papers' form (Markdown, CSV), the HTML report
with side-by-side crops, and the PNG comparison grid."""

from __future__ import annotations

import base64
import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rfsr_ray.eval.metrics import MetricInfo
from rfsr_ray.images import labelled_grid


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def aggregate(
    rows: Sequence[dict[str, Any]], metrics: list[MetricInfo]
) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {model: {metric: mean over images}}}; metrics with no value in a set are left out
    (full-reference metrics on an LR-only set)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        table.setdefault(row["set"], {}).setdefault(row["model"], {})
    for test_set, models in table.items():
        for model in models:
            mine = [r for r in rows if r["set"] == test_set and r["model"] == model]
            for info in metrics:
                value = _mean([float(r[info.name]) for r in mine])
                if not math.isnan(value):
                    models[model][info.name] = value
    return table


def _columns(models: dict[str, dict[str, float]], metrics: list[MetricInfo]) -> list[MetricInfo]:
    return [m for m in metrics if any(m.name in values for values in models.values())]


def _best(models: dict[str, dict[str, float]], info: MetricInfo) -> str | None:
    present = {name: values[info.name] for name, values in models.items() if info.name in values}
    if len(present) < 2:
        return None
    pick = min if info.lower_better else max
    return pick(present, key=present.get)


def arrow(info: MetricInfo) -> str:
    return "↓" if info.lower_better else "↑"


def markdown(
    table: dict[str, dict[str, dict[str, float]]],
    metrics: list[MetricInfo],
    baseline: str,
    counts: dict[str, dict[str, int]],
) -> str:
    """One block per test set: rows = models (best value in bold), then Δ rows vs the baseline."""
    blocks = []
    for test_set, models in table.items():
        columns = _columns(models, metrics)
        images = counts.get(test_set, {}).get("evaluated", 0)
        lines = [
            f"### {test_set} (images: {images})",
            "",
            "| model | " + " | ".join(f"{c.name} {arrow(c)}" for c in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        best = {c.name: _best(models, c) for c in columns}
        for model, values in models.items():
            cells = [
                f"**{values[c.name]:.4f}**" if best[c.name] == model else f"{values[c.name]:.4f}"
                for c in columns
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        for model, values in models.items():
            if model == baseline or baseline not in models:
                continue
            deltas = [f"{values[c.name] - models[baseline][c.name]:+.4f}" for c in columns]
            lines.append(f"| Δ {model} − {baseline} | " + " | ".join(deltas) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_csv(table: dict[str, dict[str, dict[str, float]]], baseline: str, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["test_set", "model", "metric", "value", "delta_vs_baseline"])
        for test_set, models in table.items():
            for model, values in models.items():
                for metric, value in values.items():
                    base = models.get(baseline, {}).get(metric, math.nan)
                    writer.writerow([test_set, model, metric, value, value - base])
    return path


def _img(data: bytes, title: str) -> str:
    if not data:
        return f'<figure class="empty"><div>no HR</div><figcaption>{title}</figcaption></figure>'
    encoded = base64.b64encode(data).decode()
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


STYLE = """
body { font-family: sans-serif; margin: 24px; background: #fff; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
.row { display: flex; gap: 8px; margin-bottom: 12px; }
figure { margin: 0; }
figure img { width: 192px; height: 192px; image-rendering: pixelated; display: block; }
figure.empty div { width: 192px; height: 192px; background: #eee; display: flex;
  align-items: center; justify-content: center; color: #888; }
figcaption { font-size: 12px; text-align: center; }
"""


def html_report(
    title: str,
    table_md: str,
    crops: dict[str, list[dict[str, Any]]],
    models: list[str],
    notes: list[str],
) -> str:
    """Self-contained HTML (images inline): the tables, then per test set rows of crops
    LR upscaled | each model | HR."""
    name = html.escape(title)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title>"
        f"<style>{STYLE}</style></head><body><h1>{name}</h1>"
    ]
    parts.append(_markdown_tables_to_html(table_md))
    if notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        parts.append(f"<h2>Notes</h2><ul>{items}</ul>")
    for test_set, images in crops.items():
        parts.append(f"<h2>{html.escape(test_set)}: centre crops</h2>")
        for image in images:
            figures = [_img(image["lr_up"], f"{image['image_id']}: LR bicubic")]
            figures += [_img(image["sr"].get(model, b""), model) for model in models]
            figures.append(_img(image["hr"], "HR"))
            parts.append('<div class="row">' + "".join(figures) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown_tables_to_html(table_md: str) -> str:
    out, in_table = [], False
    for line in table_md.splitlines():
        if line.startswith("### "):
            out.append(f"<h2>{html.escape(line[4:])}</h2>")
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not in_table:
                out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells))
                out.append("</tr>")
                in_table = True
                continue
            row = "".join(
                f"<td><b>{html.escape(c[2:-2])}</b></td>" if c.startswith("**") else
                f"<td>{html.escape(c)}</td>" for c in cells
            )  # fmt: skip
            out.append(f"<tr>{row}</tr>")
        elif in_table:
            out.append("</table>")
            in_table = False
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def comparison_grid(
    crops: dict[str, list[dict[str, Any]]], models: list[str], decode: Any
) -> np.ndarray | None:
    """Rows of LR bicubic | models | HR crops (grey where a set has no HR) under a labelled
    header, each row captioned with its set and image id; small crops enlarged (nearest)."""
    rows, captions = [], []
    for set_name, images in crops.items():
        for image in images:
            if not all(m in image["sr"] for m in models):
                continue  # a model skipped on this image: its row would not fit the columns
            panels = [decode(image["lr_up"])] + [decode(image["sr"][m]) for m in models]
            panels.append(decode(image["hr"]) if image["hr"] else np.full_like(panels[0], 128))
            rows.append(panels)
            captions.append(f"{set_name}: {image['image_id']}")
    if not rows:
        return None
    size = (
        min(min(p.shape[0] for p in r) for r in rows),
        min(min(p.shape[1] for p in r) for r in rows),
    )
    rows = [[p[: size[0], : size[1]] for p in r] for r in rows]
    return labelled_grid(rows, ["LR bicubic", *models, "HR"], captions)
