"""Nodes of the ``summary`` pipeline: thin adapters over :mod:`anomaly_ae.evaluation.categories`."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from anomaly_ae.evaluation.categories import category_row, summary_table, to_markdown
from anomaly_ae.reporting.report import html_table
from anomaly_ae.scoring import MapSettings

log = logging.getLogger(__name__)


def summarise_node(categories: Sequence[str]) -> Callable[..., tuple[pd.DataFrame, str, str]]:
    """A node function taking, per category (in ``categories`` order), its
    ``evaluation_metrics``, ``training_history`` and ``image_manifest``."""

    def summarise_categories(*inputs: Any) -> tuple[pd.DataFrame, str, str]:
        rows = []
        for i, category in enumerate(categories):
            metrics, history, manifest = inputs[3 * i : 3 * i + 3]
            described = MapSettings.from_dict(metrics["anomaly_map"]).describe()
            rows.append(category_row(category, metrics, history, manifest, described))
        table = summary_table(rows)
        markdown = to_markdown(table)
        log.info("Summary of %d categories:\n%s", len(categories), markdown)
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>anomaly-ae summary</title>"
            "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>"
            f"<h1>anomaly-ae — {len(categories)} categories</h1>"
            "<p>One row per category (its own namespace, versioned outputs and MLflow run); the "
            "last row is the mean. Pixel metrics are empty where a category has no masks.</p>"
            f"{html_table(table)}<p>Categories: {html.escape(', '.join(categories))}</p></body></html>"
        )
        return table, markdown, page

    return summarise_categories
