"""Project pipelines, one name per job.

| name | job |
|---|---|
| ``__default__`` (``kedro run``) | ingestion, preprocessing, training, calibration, evaluation, report |
| ``data_ingestion``, ``data_processing``, ``training`` | each stage alone |
| ``calibrate`` | choose the anomaly map for the latest model, label-free |
| ``evaluate`` | calibrate + evaluate + report the latest (or ``--load-versions``) checkpoint |
| ``loss_study`` | the paper's three loss variants, one namespace and MLflow child run each |
| ``predict`` | verdicts for a folder of new images |
| ``summary`` | one row per category of the run (``categories``): the benchmark table |

Every pipeline runs in the Kedro namespace of its category (``data.category``, e.g.
``bottle``; with ``categories: [a, b]`` or ``all``, once per category), so each category has
its own datasets from one set of catalog factories (``{namespace}.name``) and its own nested
MLflow run. ``kedro run`` runs the main chain for every category, then the summary.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from anomaly_ae import parallel, run_params

MAIN_CHAIN = ("data_ingestion", "data_processing", "training", "evaluate")


def in_namespace(pipeline: Pipeline, namespace: str, inputs: dict[str, str] | None = None) -> Pipeline:
    """``pipeline`` under ``namespace``; parameters stay shared (not namespaced)."""
    params = {p for p in pipeline.inputs() if p.startswith("params:")}
    return Pipeline(pipeline, namespace=namespace, parameters={p: p for p in params}, inputs=inputs)


def register_pipelines() -> dict[str, Pipeline]:
    categories = run_params.categories()
    # Kedro may ask for the requested pipelines only (`kedro run --pipeline=calibrate`)
    templates = find_pipelines(raise_errors=True)
    # namespaced by themselves: the loss study (category + variant), the summary (none)
    own = {name: templates.pop(name) for name in ("loss_study", "summary") if name in templates}
    if "summary" in own:  # its node must pickle for --runner=ParallelRunner
        own["summary"] = parallel.picklable_summary(own["summary"], categories)
    pipelines = {
        name: sum((in_namespace(template, c) for c in categories), start=Pipeline([]))
        for name, template in templates.items()
    }
    pipelines.update(own)
    if all(name in pipelines for name in MAIN_CHAIN):
        chain = sum((pipelines[name] for name in MAIN_CHAIN), start=Pipeline([]))
        pipelines["__default__"] = chain + own.get("summary", Pipeline([]))
    return pipelines
