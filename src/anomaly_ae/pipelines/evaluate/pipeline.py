"""The ``evaluate`` pipeline: ``kedro run --pipeline=evaluate``."""

from kedro.pipeline import Pipeline

from anomaly_ae.pipelines import evaluation, reporting


def create_pipeline(**kwargs) -> Pipeline:
    return evaluation.create_pipeline() + reporting.create_pipeline()
