"""The ``data_ingestion`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import resolve_dataset, validate_dataset


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(resolve_dataset, "params:data", "dataset_info", name="resolve_dataset"),
            Node(validate_dataset, ["dataset_info", "params:data"], "raw_manifest", name="validate_dataset"),
        ]
    )
