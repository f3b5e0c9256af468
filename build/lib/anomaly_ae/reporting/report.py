"""A single self-contained HTML report (figures embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from PIL import Image

SYNTHETIC_WARNING = (
    "SYNTHETIC DATA — these results come from the project's built-in synthetic sample, not "
    "from MVTec AD. They are for demos and tests only and say nothing about the paper's claims."
)

METRIC_LABELS = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO (FPR ≤ 0.3, normalised)",
    "image_f1_max": "Image F1-max",
    "threshold": "Decision threshold (validation normals)",
    "accuracy_at_threshold": "Accuracy at threshold",
    "precision_at_threshold": "Precision at threshold",
    "recall_at_threshold": "Recall at threshold",
    "ssim_normal_mean": "SSIM normal (mean)",
    "ssim_defect_mean": "SSIM defective (mean)",
    "ssim_gap": "SSIM gap normal − defective",
}


def image_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_table(frame: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "–" if pd.isna(value) else float_format.format(value)
        return html.escape(str(value)) if value is not None else "–"

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(
    *,
    title: str,
    run_id: str | None,
    dataset_info: dict[str, Any],
    table2: pd.DataFrame,
    metrics: dict[str, Any],
    figures: dict[str, Image.Image],
    configuration: dict[str, Any],
    extra_sections: dict[str, str] | None = None,
) -> str:
    """The report: banner, Table II, metrics, Figure 1, then the other figures and the
    configuration that produced them."""
    synthetic = dataset_info.get("source") == "synthetic"
    banner = f'<div class="banner">{html.escape(SYNTHETIC_WARNING)}</div>' if synthetic else ""
    metric_rows = pd.DataFrame(
        [(label, metrics[key]) for key, label in METRIC_LABELS.items() if key in metrics],
        columns=["metric", "value"],
    )
    sections = [
        f"<h2>Table II — SSIM(original, reconstruction)</h2>{html_table(table2)}",
        f"<h2>Detection metrics</h2>{html_table(metric_rows)}",
    ]
    for name, body in (extra_sections or {}).items():  # right after the numbers they explain
        sections.append(f"<h2>{html.escape(name)}</h2>{body}")
    for name, image in figures.items():
        sections.append(
            f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="{image_data_uri(image)}">'
        )
    sections.append(
        "<h2>Configuration</h2><pre>"
        + html.escape(json.dumps(configuration, indent=2, default=str))
        + "</pre>"
    )
    meta = (
        f"category <b>{html.escape(str(dataset_info.get('category')))}</b> · data source "
        f"<b>{html.escape(str(dataset_info.get('source')))}</b> · MLflow run "
        f"<code>{html.escape(str(run_id))}</code> · generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}"
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".banner{background:#c00;color:#fff;padding:1em;font-weight:bold;font-size:1.2em}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{banner}<h1>{html.escape(title)}</h1><p>{meta}</p>"
        + "".join(sections)
        + f"{banner}</body></html>"
    )
