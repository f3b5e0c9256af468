"""The ``training`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import train_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_model,
                [
                    "train_images",
                    "validation_images",
                    "params:model",
                    "params:training",
                    "params:loss",
                    "dataset_info",
                ],
                [
                    "model_checkpoint",
                    "training_history",
                    "training_metrics",
                    "loss_curve",
                    "run_tags",
                ],
                name="train_model",
            )
        ]
    )
