"""The ``evaluation`` pipeline (``evaluate`` = evaluation + reporting)."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_ssim_table, build_table2, calibrate, compute_metrics, fit_reference, score_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                fit_reference,
                ["model_checkpoint", "train_images", "params:model", "params:evaluation"],
                "normal_reference",
                name="fit_normal_reference",
            ),
            Node(
                score_images,
                [
                    "model_checkpoint",
                    "test_images",
                    "validation_images",
                    "normal_reference",
                    "params:model",
                    "params:evaluation",
                ],
                ["test_scores", "validation_scores"],
                name="score_images",
            ),
            Node(
                calibrate,
                ["validation_scores", "model_checkpoint", "params:evaluation"],
                "decision_threshold",
                name="calibrate_threshold",
            ),
            Node(
                build_ssim_table,
                ["test_scores", "image_manifest", "decision_threshold"],
                "ssim_table",
                name="build_ssim_table",
            ),
            Node(
                build_table2,
                ["ssim_table", "model_checkpoint", "params:paper_table2", "params:evaluation"],
                "table2",
                name="build_table2",
            ),
            Node(
                compute_metrics,
                [
                    "test_scores",
                    "test_images",
                    "decision_threshold",
                    "model_checkpoint",
                    "dataset_info",
                    "params:evaluation",
                ],
                ["evaluation_metrics", "evaluation_mlflow_metrics"],
                name="compute_metrics",
            ),
        ]
    )
