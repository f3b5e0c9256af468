"""Self-contained HTML pages (figures embedded as PNG data URIs): the evaluate report, the
loss-study report, and the building blocks every page uses (tables, figures, the style).

Layout rules, checked in a real browser by ``tests/test_pages.py``: every table sits in a
horizontally scrolling container and its headers may wrap (after ``_``), so no page is wider
than the window; a table with no rows is replaced by a sentence saying so; figures never
exceed the page width.
"""

from __future__ import annotations

import base64
import html
import io
import json
import numbers
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pandas as pd
from PIL import Image

SYNTHETIC_WARNING = (
    "SYNTHETIC DATA — these results come from the project's built-in synthetic sample, not "
    "from MVTec AD. They are for demos and tests only and say nothing about the paper's claims."
)

METRIC_LABELS = {
    "image_auroc": "Image AUROC",
    "image_auroc_ci_low": "Image AUROC, low end of its confidence interval (evaluation.confidence_level)",
    "image_auroc_ci_high": "Image AUROC, high end of its confidence interval",
    "image_auroc_at_defect": "Image AUROC, defective images scored only near their defect",
    "image_auroc_off_defect": (
        "Image AUROC, defective images scored only away from their defect (≈ 0.5 expected)"
    ),
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO (FPR ≤ 0.3, normalised)",
    "image_f1_max": "Image F1-max",
    "threshold": "Decision threshold (validation normals)",
    "accuracy_at_threshold": "Accuracy at threshold",
    "precision_at_threshold": "Precision at threshold",
    "recall_at_threshold": "Recall at threshold",
    "false_alarm_rate_at_threshold": "False-alarm rate at threshold (good test images flagged)",
    "false_alarm_rate_expected_low": "False-alarm rate the validation images promise, low end",
    "false_alarm_rate_expected_high": "False-alarm rate the validation images promise, high end",
    "false_alarm_excess_p": "Chance of as many false alarms on good images like the validation ones",
    "ssim_normal_mean": "SSIM normal (mean)",
    "ssim_defect_mean": "SSIM defective (mean)",
    "ssim_gap": "SSIM gap normal − defective",
}

MISSING = "–"

#: The style of every page: a readable column, tables that scroll inside their own box rather
#: than widening the page, wrapped configuration text, figures no wider than the page.
PAGE_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
    ".table-wrap{overflow-x:auto;max-width:100%;margin:.5em 0}"
    "table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}"
    "th{background:#f3f3f3;text-align:left}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    ".banner{background:#c00;color:#fff;padding:1em;font-weight:bold;font-size:1.2em}"
    "img{max-width:100%;height:auto}"
    "pre{white-space:pre-wrap;overflow-wrap:anywhere}"
    "p.empty{font-style:italic;color:#555}"
    ".notice{background:#fff3cd;border:1px solid #d9b44a;padding:.8em;margin:.5em 0}"
)
#: Inline on the table container too, so a table keeps its scroll box on a page that does not
#: use ``PAGE_STYLE``.
_WRAP_STYLE = "overflow-x:auto;max-width:100%"


def image_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays: shown as they are
        return False


def _cell(value: Any, float_format: str) -> str:
    if isinstance(value, Interval):
        return f'<td class="num">{value}</td>'
    if _is_missing(value):
        return f"<td>{MISSING}</td>"
    if isinstance(value, bool):
        return f"<td>{value}</td>"
    if isinstance(value, numbers.Integral):
        return f'<td class="num">{int(value)}</td>'
    if isinstance(value, numbers.Real):
        return f'<td class="num">{float_format.format(float(value))}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _header(name: Any) -> str:
    """A column name that may wrap after each ``_`` (``ssim_normal_mean`` is one word to the
    browser otherwise, and nine of them make a table wider than the page)."""
    return html.escape(str(name)).replace("_", "_<wbr>")


def html_table(frame: pd.DataFrame, float_format: str = "{:.4f}", empty: str = "No rows to show.") -> str:
    """``frame`` as an HTML table in a horizontally scrolling container: numbers right-aligned
    with ``float_format``, missing values as ``–``. A frame without rows gives the sentence
    ``empty`` instead of an empty table."""
    if frame.empty:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{_header(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(_cell(v, float_format) for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return (
        f'<div class="table-wrap" style="{_WRAP_STYLE}">'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


class Interval(NamedTuple):
    """A confidence interval, shown ``low–high`` in one unbroken table cell."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.low:.3f}–{self.high:.3f}"


def interval_column(table: pd.DataFrame) -> list[Interval | None]:
    """Each row's image AUROC interval (columns ``image_auroc_ci_low`` and
    ``image_auroc_ci_high``); None (shown ``–``) where it has none: a class of fewer than two
    images, or a table written before intervals existed."""
    if "image_auroc_ci_low" not in table:
        return [None] * len(table)
    return [
        None if _is_missing(low) or _is_missing(high) else Interval(float(low), float(high))
        for low, high in zip(table["image_auroc_ci_low"], table["image_auroc_ci_high"], strict=True)
    ]


#: What a test set short of a class holds, in words (``evaluation_metrics.json``'s ``test_set``).
TEST_SET_HOLDS = {
    "none": "no images",
    "normal only": "good images only",
    "defective only": "defective images only",
}


def test_set_notice(metrics: Mapping[str, Any]) -> str:
    """What a test set of one class, or none, leaves unmeasured (empty for a full one)."""
    kind = metrics.get("test_set")
    if kind in (None, "normal and defective"):
        return ""
    fix = (
        "Add <code>test/good/</code> and <code>test/&lt;defect_type&gt;/</code> images (masks in "
        "<code>ground_truth/&lt;defect_type&gt;/</code>) and run <code>kedro run --pipelines=evaluate</code> "
        "to measure it."
    )
    if kind == "none":
        text = (
            "<b>No test images.</b> This model was trained, its anomaly map chosen and its threshold "
            "set on normal images only, label-free; nothing on this page measures it on real defects. "
            "The calibration's figures on synthetic defects pasted onto the normal validation "
            "images (<i>Anomaly map</i>, below) are the only estimate. "
        )
    else:
        measured = (
            "the share of good test images flagged at the threshold, "
            f"{metrics['false_alarm_rate_at_threshold']:.4f}"
            if kind == "normal only"
            else f"the recall at the threshold, {metrics['recall_at_threshold']:.4f}"
        )
        text = (
            f"<b>The test set holds {TEST_SET_HOLDS[kind]}</b> "
            f"({metrics.get('n_normal', 0)} good, "
            f"{metrics.get('n_defective', 0)} defective images): {measured}, is measured; image AUROC, "
            "its interval and F1-max need both kinds. "
        )
    return f'<div class="notice">{text}{fix}</div>'


def metrics_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One model's headline metrics as ``metric | value`` rows (``METRIC_LABELS`` order and
    wording; metrics it lacks are left out)."""
    return pd.DataFrame(
        [(label, metrics[key]) for key, label in METRIC_LABELS.items() if key in metrics],
        columns=["metric", "value"],
    )


def section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>{body}"


def figure_section(title: str, image: Image.Image) -> str:
    return section(title, f'<img alt="{html.escape(title)}" src="{image_data_uri(image)}">')


def page(title: str, body: str, *, synthetic: bool = False) -> str:
    """A complete page with ``PAGE_STYLE``; the synthetic-data banner at top and bottom when
    ``synthetic``."""
    banner = f'<div class="banner">{html.escape(SYNTHETIC_WARNING)}</div>' if synthetic else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>"
        f"<body>{banner}<h1>{html.escape(title)}</h1>{body}{banner}</body></html>"
    )


def render_report(
    *,
    title: str,
    run_id: str | None,
    dataset_info: dict[str, Any],
    table2: pd.DataFrame,
    metrics: Mapping[str, Any] | pd.DataFrame,
    figures: dict[str, Image.Image],
    configuration: dict[str, Any],
    tables: dict[str, pd.DataFrame] | None = None,
    extra_sections: dict[str, str] | None = None,
    model: str | None = None,
) -> str:
    """The report: banner, Table II, detection metrics, then ``tables`` and
    ``extra_sections`` (titled HTML), Figure 1 and the other figures, and the configuration
    that produced them.

    ``metrics``: one model's metrics dict (shown as ``metric | value`` rows) or a frame with
    one row per model (the loss study's variants), shown as it is. ``tables``: more titled
    tables, right after the metrics they break down (e.g. per defect type). ``model``: a
    one-line description of the network, shown under the title."""
    detection = metrics_table(metrics) if isinstance(metrics, Mapping) else metrics
    sections = [
        section("Table II — SSIM(original, reconstruction)", html_table(table2)),
        section("Detection metrics", html_table(detection, empty="No detection metrics were computed.")),
    ]
    for name, frame in (tables or {}).items():
        sections.append(section(name, html_table(frame)))
    for name, body in (extra_sections or {}).items():  # right after the numbers they explain
        sections.append(section(name, body))
    for name, image in figures.items():
        sections.append(figure_section(name, image))
    sections.append(
        section(
            "Configuration",
            "<pre>" + html.escape(json.dumps(configuration, indent=2, default=str)) + "</pre>",
        )
    )
    meta = (
        f"category <b>{html.escape(str(dataset_info.get('category')))}</b> · data source "
        f"<b>{html.escape(str(dataset_info.get('source')))}</b>"
        + (f" · model <b>{html.escape(model)}</b>" if model else "")
        + " · MLflow run "
        f"<code>{html.escape(str(run_id))}</code> · generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}"
    )
    notice = test_set_notice(metrics) if isinstance(metrics, Mapping) else ""
    return page(
        title,
        f"<p>{meta}</p>{notice}" + "".join(sections),
        synthetic=dataset_info.get("source") == "synthetic",
    )
