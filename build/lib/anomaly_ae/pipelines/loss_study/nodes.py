"""Nodes of the ``loss_study`` pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from PIL import Image

from anomaly_ae.evaluation.comparison import compare_variants
from anomaly_ae.reporting.figures import figure_to_image, variant_comparison_figure
from anomaly_ae.reporting.report import render_report

log = logging.getLogger(__name__)


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
        report = render_report(
            title=f"anomaly-ae loss study — {dataset_info['category']}",
            run_id=run.info.run_id if run else None,
            dataset_info=dataset_info,
            table2=table[
                [
                    "variant",
                    "ssim_normal_mean",
                    "ssim_normal_std",
                    "ssim_defect_mean",
                    "ssim_defect_std",
                    "ssim_gap",
                    "paper_ssim_normal",
                    "paper_ssim_defect",
                    "paper_ssim_gap",
                ]
            ],
            metrics={},
            figures={"Loss variants: Table II and detection metrics": figure},
            configuration={"variants": list(variants)},
            extra_sections={
                "Detection metrics per variant": table[
                    ["variant", "mse_weight", "ssim_weight", "epochs", "image_auroc", "pixel_auroc", "aupro"]
                ].to_html(index=False, float_format="%.4f")
            },
        )
        return table, figure, report

    return compare_loss_variants
