"""Project pipelines, one name per job.

| name | job |
|---|---|
| ``__default__`` (``kedro run``) | ingestion, preprocessing, training, calibration, evaluation, report |
| ``data_ingestion``, ``data_processing``, ``training`` | each stage alone |
| ``calibrate`` | choose the anomaly map for the latest model, label-free |
| ``evaluate`` | calibrate + evaluate + report the latest (or ``--load-versions``) checkpoint |
| ``loss_study`` | the paper's three loss variants, one namespace and MLflow child run each |
| ``predict`` | verdicts for a folder of new images |

Every pipeline runs in the Kedro namespace ``<data.category>`` (e.g. ``bottle``), so each
category has its own datasets from one set of catalog factories (``{namespace}.name``).
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from anomaly_ae import run_params

MAIN_CHAIN = ("data_ingestion", "data_processing", "training", "evaluate")


def in_namespace(pipeline: Pipeline, namespace: str, inputs: dict[str, str] | None = None) -> Pipeline:
    """``pipeline`` under ``namespace``; parameters stay shared (not namespaced)."""
    params = {p for p in pipeline.inputs() if p.startswith("params:")}
    return Pipeline(pipeline, namespace=namespace, parameters={p: p for p in params}, inputs=inputs)


def register_pipelines() -> dict[str, Pipeline]:
    category = run_params.category()
    # Kedro may ask for the requested pipelines only (`kedro run --pipeline=calibrate`)
    templates = find_pipelines(raise_errors=True)
    study = templates.pop("loss_study", None)  # namespaced by itself (category + variant)
    pipelines = {name: in_namespace(template, category) for name, template in templates.items()}
    if study is not None:
        pipelines["loss_study"] = study
    if all(name in pipelines for name in MAIN_CHAIN):
        pipelines["__default__"] = sum((pipelines[name] for name in MAIN_CHAIN), start=Pipeline([]))
    return pipelines
