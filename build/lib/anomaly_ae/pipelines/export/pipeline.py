"""The ``export`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import export_bundle, log_served_model


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
            ),
            Node(
                log_served_model,
                ["inspection_bundle", "params:export"],
                "served_model",
                name="log_served_model",
            ),
        ]
    )
