"""The ``calibrate`` pipeline: ``kedro run --pipeline=calibrate`` (also part of ``evaluate``)."""

from kedro.pipeline import Node, Pipeline

from .nodes import score_lever_grid, select_map, synthesise_defects


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                synthesise_defects,
                ["validation_images", "params:calibration"],
                "synthetic_defects",
                name="synthesise_defects",
            ),
            Node(
                score_lever_grid,
                [
                    "model_checkpoint",
                    "train_images",
                    "synthetic_defects",
                    "params:model",
                    "params:evaluation",
                    "params:calibration",
                ],
                ["calibration_grid", "calibration_references"],
                name="score_lever_grid",
            ),
            Node(
                select_map,
                ["calibration_grid", "model_checkpoint", "params:calibration"],
                ["calibrated_map", "calibration_table"],
                name="select_map",
            ),
        ]
    )
