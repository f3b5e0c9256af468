"""Nodes of the ``loss_study`` pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from PIL import Image

from anomaly_ae.evaluation.comparison import compare_variants, detection_view, table2_view
from anomaly_ae.reporting.figures import figure_to_image, variant_comparison_figure
from anomaly_ae.reporting.report import render_report

log = logging.getLogger(__name__)


def loss_study_report(
    comparison: pd.DataFrame,
    figure: Image.Image,
    dataset_info: dict[str, Any],
    variants: Sequence[str],
    run_id: str | None = None,
) -> str:
    """The loss-study page: Table II (ours beside the paper's, ``mean ± std``), the
    detection metrics of every variant, the comparison figure and the variants' weights."""
    return render_report(
        title=f"anomaly-ae loss study — {dataset_info['category']}",
        run_id=run_id,
        dataset_info=dataset_info,
        table2=table2_view(comparison),
        metrics=detection_view(comparison),
        figures={"Loss variants: Table II and detection metrics": figure},
        configuration={
            "variants": {
                row.variant: {"mse_weight": row.mse_weight, "ssim_weight": row.ssim_weight}
                for row in comparison.itertuples()
            }
            or list(variants)
        },
    )


def comparison_node(variants: Sequence[str]) -> Callable[..., tuple[pd.DataFrame, Image.Image, str]]:
    """A node function taking ``paper_table2``, ``dataset_info`` and then one metrics dict
    per variant (in ``variants`` order)."""

    def compare_loss_variants(
        paper_table2: dict, dataset_info: dict[str, Any], *metrics: dict[str, Any]
    ) -> tuple[pd.DataFrame, Image.Image, str]:
        table = compare_variants(dict(zip(variants, metrics, strict=True)), paper_table2)
        log.info("Loss study:\n%s", table.to_string(index=False, float_format="%.4f"))
        figure = figure_to_image(variant_comparison_figure(table))
        import mlflow

        run = mlflow.active_run()
        report = loss_study_report(table, figure, dataset_info, variants, run.info.run_id if run else None)
        return table, figure, report

    return compare_loss_variants
