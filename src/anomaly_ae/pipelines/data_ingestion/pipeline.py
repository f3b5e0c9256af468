"""The ``data_ingestion`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import resolve_dataset, validate_dataset


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                resolve_dataset, ["params:data", "category_name"], "dataset_location", name="resolve_dataset"
            ),
            Node(
                validate_dataset,
                ["dataset_location", "params:data"],
                ["raw_manifest", "dataset_info"],
                name="validate_dataset",
            ),
        ]
    )
