"""The ``predict`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import predict_folder


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                predict_folder,
                ["model_checkpoint", "decision_threshold", "normal_reference", "params:predict"],
                ["predictions", "prediction_overlays"],
                name="predict_folder",
            )
        ]
    )
