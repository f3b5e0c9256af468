"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

#: ``__default__`` chains these: ingestion -> preprocessing -> training -> evaluation -> reporting.
MAIN_CHAIN = ("data_ingestion", "data_processing", "training", "evaluation", "reporting")


def register_pipelines() -> dict[str, Pipeline]:
    """Every package under ``pipelines/`` (found by ``find_pipelines``) plus ``__default__``.

    ``evaluate`` (evaluation + reporting), ``loss_study`` and ``predict`` are packages of
    their own, so ``kedro run --pipeline=<name>`` imports only what it needs.
    """
    pipelines = find_pipelines(raise_errors=True)
    if all(name in pipelines for name in MAIN_CHAIN):
        pipelines["__default__"] = sum((pipelines[name] for name in MAIN_CHAIN), start=Pipeline([]))
    return pipelines
