"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

MAIN_CHAIN = ("data_ingestion", "data_processing", "training", "evaluation", "reporting")


def register_pipelines() -> dict[str, Pipeline]:
    """``__default__``: ingestion -> preprocessing -> training -> evaluation -> reporting.
    ``evaluate``: evaluation + reporting on the latest checkpoint. ``loss_study`` and
    ``predict`` run on their own."""
    pipelines = find_pipelines(raise_errors=True)
    if "evaluation" in pipelines and "reporting" in pipelines:
        pipelines["evaluate"] = pipelines["evaluation"] + pipelines["reporting"]
    pipelines["__default__"] = sum((pipelines[n] for n in MAIN_CHAIN if n in pipelines), start=Pipeline([]))
    return pipelines
