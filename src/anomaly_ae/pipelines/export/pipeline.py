"""The ``export`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import export_bundle


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                export_bundle,
                [
                    "model_checkpoint",
                    "decision_threshold",
                    "normal_reference",
                    "validation_images",
                    "dataset_info",
                    "params:model",
                    "params:preprocessing",
                    "params:export",
                ],
                "inspection_bundle",
                name="export_bundle",
            )
        ]
    )
