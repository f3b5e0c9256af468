"""The ``reporting`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_report, make_figures, make_heatmaps


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                make_figures,
                ["test_images", "test_scores", "ssim_table", "evaluation_metrics"],
                ["figure1", "image_roc", "pixel_roc", "ssim_histogram"],
                name="make_figures",
            ),
            Node(
                make_heatmaps,
                ["test_images", "test_scores", "ssim_table", "decision_threshold"],
                "test_heatmaps",
                name="make_heatmaps",
            ),
            Node(
                build_report,
                [
                    "table2",
                    "evaluation_metrics",
                    "figure1",
                    "image_roc",
                    "pixel_roc",
                    "ssim_histogram",
                    "loss_curve",
                    "dataset_info",
                    "params:model",
                    "params:training",
                    "params:evaluation",
                ],
                "report",
                name="build_report",
            ),
        ]
    )
