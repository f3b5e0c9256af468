"""The ``evaluate`` pipeline: ``kedro run --pipeline=evaluate``.

Calibrates the anomaly map for the checkpoint (label-free, ``calibrate``), then scores the
test set with it, calibrates the decision threshold on normal validation images, writes
Table II, the metrics, the figures and the HTML report. ``evaluation.map: configured``
(``--env paper``) scores with ``evaluation.anomaly_map`` instead: the paper's map by default.
"""

from kedro.pipeline import Node, Pipeline

from anomaly_ae.pipelines import calibrate

from .nodes import (
    build_ssim_table,
    build_table2,
    calibrate_threshold_node,
    compute_metrics,
    fit_reference,
    grid_agreement,
    resolve_map,
    score_images,
    stress_test,
)
from .reporting_nodes import (
    build_report,
    make_figures,
    make_hardest_cases,
    make_heatmaps,
    make_place_map,
    make_score_histogram,
)


def evaluation_nodes() -> Pipeline:
    return Pipeline(
        [
            Node(
                resolve_map,
                ["calibrated_map", "model_checkpoint", "params:evaluation"],
                "map_settings",
                name="resolve_map",
            ),
            Node(
                fit_reference,
                ["model_checkpoint", "train_images", "map_settings", "params:model", "params:evaluation"],
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
                    "map_settings",
                    "params:model",
                    "params:evaluation",
                ],
                ["test_scores", "validation_scores"],
                name="score_images",
            ),
            Node(
                calibrate_threshold_node,
                ["validation_scores", "model_checkpoint", "map_settings", "params:evaluation"],
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
                [
                    "ssim_table",
                    "model_checkpoint",
                    "dataset_info",
                    "params:paper_table2",
                    "params:evaluation",
                ],
                "table2",
                name="build_table2",
            ),
            Node(
                compute_metrics,
                [
                    "test_scores",
                    "test_images",
                    "ssim_table",
                    "decision_threshold",
                    "model_checkpoint",
                    "dataset_info",
                    "map_settings",
                    "normal_reference",
                    "params:evaluation",
                ],
                [
                    "evaluation_metrics",
                    "evaluation_mlflow_metrics",
                    "defect_type_table",
                    "evaluation_run_tags",
                ],
                name="compute_metrics",
            ),
            Node(
                stress_test,
                [
                    "model_checkpoint",
                    "test_images",
                    "normal_reference",
                    "map_settings",
                    "params:model",
                    "params:evaluation",
                    "params:calibration",
                ],
                ["stress_table", "stress_metrics"],
                name="stress_test",
            ),
            Node(
                grid_agreement,
                [
                    "calibration_references",
                    "test_images",
                    "test_scores",
                    "ssim_table",
                    "calibration_table",
                    "params:evaluation",
                    "params:calibration",
                ],
                ["grid_agreement", "agreement_metrics"],
                name="grid_agreement",
            ),
        ]
    )


def reporting_nodes() -> Pipeline:
    return Pipeline(
        [
            Node(
                make_figures,
                ["test_images", "test_scores", "ssim_table", "evaluation_metrics"],
                ["figure1", "image_roc", "pixel_roc", "ssim_histogram"],
                name="make_figures",
            ),
            Node(
                make_score_histogram,
                ["validation_scores", "test_scores", "test_images", "decision_threshold"],
                "score_histogram",
                name="make_score_histogram",
            ),
            Node(
                make_heatmaps,
                ["test_images", "test_scores", "ssim_table", "decision_threshold"],
                "test_heatmaps",
                name="make_heatmaps",
            ),
            Node(
                make_hardest_cases,
                [
                    "test_images",
                    "test_scores",
                    "ssim_table",
                    "decision_threshold",
                    "validation_images",
                    "validation_scores",
                    "image_manifest",
                    "params:evaluation",
                ],
                "hardest_cases",
                name="make_hardest_cases",
            ),
            Node(make_place_map, "test_images", "place_map", name="make_place_map"),
            Node(
                build_report,
                [
                    "table2",
                    "evaluation_metrics",
                    "figure1",
                    "image_roc",
                    "pixel_roc",
                    "ssim_histogram",
                    "score_histogram",
                    "hardest_cases",
                    "place_map",
                    "model_checkpoint",
                    "dataset_info",
                    "map_settings",
                    "calibrated_map",
                    "calibration_table",
                    "stress_table",
                    "defect_type_table",
                    "grid_agreement",
                    "params:model",
                    "params:training",
                    "params:evaluation",
                ],
                "report",
                name="build_report",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return calibrate.create_pipeline() + evaluation_nodes() + reporting_nodes()
