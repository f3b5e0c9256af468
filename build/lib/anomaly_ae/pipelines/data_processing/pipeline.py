"""The ``data_processing`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_model_inputs, split_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                split_images, ["raw_manifest", "params:preprocessing"], "image_manifest", name="split_images"
            ),
            Node(
                build_model_inputs,
                ["dataset_info", "image_manifest", "params:preprocessing", "params:data"],
                ["train_images", "validation_images", "test_images"],
                name="build_model_inputs",
            ),
        ]
    )
