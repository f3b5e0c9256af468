"""The ``summary`` pipeline: ``kedro run --pipeline=summary`` (also the end of ``kedro run``).

Reads every category's latest ``evaluation_metrics``, ``training_history`` and
``image_manifest`` (``categories``, or ``data.category`` alone) and writes the benchmark
table as a versioned CSV, Markdown and an HTML page, logged to the top MLflow run.
"""

from __future__ import annotations

import warnings

from kedro.pipeline import Node, Pipeline

from anomaly_ae import run_params

from .nodes import PER_CATEGORY, summarise_node


def create_pipeline(**kwargs) -> Pipeline:
    categories = run_params.categories()
    inputs = [f"{c}.{name}" for c in categories for name in PER_CATEGORY]
    with warnings.catch_warnings():  # the inputs ARE namespaced (dotted) names
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        return Pipeline(
            [
                Node(
                    summarise_node(categories),
                    inputs,
                    ["summary_table", "summary_markdown", "summary_report"],
                    name="summarise_categories",
                )
            ]
        )
