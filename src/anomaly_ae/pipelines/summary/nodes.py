"""Nodes of the ``summary`` pipeline: thin adapters over :mod:`anomaly_ae.evaluation.categories`."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from anomaly_ae.evaluation.categories import (
    INTERVAL,
    category_row,
    held_out_table,
    summary_table,
    to_markdown,
)
from anomaly_ae.evaluation.summary import REGION_METRICS
from anomaly_ae.reporting.report import html_table, interval_column
from anomaly_ae.reporting.report import page as report_page
from anomaly_ae.scoring import MapSettings

log = logging.getLogger(__name__)

#: Each category's inputs of the summary node, in this order.
PER_CATEGORY = ("evaluation_metrics", "training_history", "image_manifest", "stress_table")


def summarise_node(categories: Sequence[str]) -> Callable[..., tuple[pd.DataFrame, str, str]]:
    """A node function taking, per category (in ``categories`` order), its
    :data:`PER_CATEGORY` datasets."""
    per = len(PER_CATEGORY)

    def summarise_categories(*inputs: Any) -> tuple[pd.DataFrame, str, str]:
        rows, stress = [], {}
        for i, category in enumerate(categories):
            metrics, history, manifest, stress[category] = inputs[per * i : per * i + per]
            described = MapSettings.from_dict(metrics["anomaly_map"]).describe()
            rows.append(category_row(category, metrics, history, manifest, described))
        table = summary_table(rows)
        held_out = held_out_table(stress)
        markdown = (
            to_markdown(table)
            + "\nHeld-out synthetic defects (on each category's good test images), image AUROC per kind:\n\n"
            + to_markdown(held_out)
        )
        log.info("Summary of %d categories:\n%s", len(categories), markdown)
        synthetic = any(inputs[per * i].get("data_source") == "synthetic" for i in range(len(categories)))
        # the page: the main table, then the image AUROC's interval and where the image score
        # comes from (a second table, so that neither needs sideways scrolling)
        # the test images' count sits with the figures whose precision it sets (and keeps the
        # main table within a 1280-px window)
        regions = table[["category", "test_images", "image_auroc"]].assign(interval=interval_column(table))
        regions = pd.concat([regions, table[list(REGION_METRICS)]], axis=1)
        false_alarms = ["false_alarm_rate_expected_high", "false_alarm_rate_at_threshold"]
        page = report_page(
            f"anomaly-ae — {len(categories)} categories",
            "<p>One row per category (its own namespace, versioned outputs and MLflow run); the "
            "last row is the mean. Pixel metrics are empty where a category has no masks; "
            "detection metrics where it has no test images (normal images only) or one kind.</p>"
            f"{html_table(table.drop(columns=[*REGION_METRICS, *INTERVAL, 'test_images', *false_alarms]))}"
            "<h2>How precise, and where the image score comes from</h2><p>The image AUROC's "
            "confidence interval from the sampling of the test images "
            "(evaluation.confidence_level; none for the mean). Defective test images scored only "
            "near their labelled defect, and only away from it (the label-leak check: about 0.5 "
            "expected; high when defective images differ from good ones elsewhere).</p>"
            f"{html_table(regions)}"
            "<h2>The threshold's false alarms</h2><p>The share of normal images like its normal "
            "validation images that each category's threshold flags, at most (on average; few "
            "validation images promise little: the category's report), and the share of its good "
            "test images it flagged.</p>"
            f"{html_table(table[['category', 'threshold', *false_alarms]].iloc[:-1])}"
            "<h2>Which kinds of defect each model misses</h2><p>Synthetic defects pasted onto each "
            "category's good test images (held out: another seed than the calibration's), image "
            "AUROC per kind of the map in use, the last row the mean; the category's report gives "
            "each kind by contrast and size, with intervals.</p>"
            f"{html_table(held_out)}<p>Categories: {html.escape(', '.join(categories))}</p>",
            synthetic=synthetic,
        )
        return table, markdown, page

    return summarise_categories
