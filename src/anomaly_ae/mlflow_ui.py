"""Make the MLflow UI open this project's experiment as a machine-learning experiment.

MLflow 3's UI has two views of an experiment: the GenAI view (traces, evaluations, prompts)
and the classic "machine learning" view (the runs table, charts, **Compare**). Which one the
UI opens depends on the MLflow version:

* the experiment tag ``mlflow.experimentKind`` (``custom_model_development`` = machine
  learning, ``genai_development`` = GenAI); without it, older MLflow 3 UIs guess and may pick
  GenAI;
* MLflow 3.17's UI ignores the tag for the view and uses a per-browser "workflow type"
  (``?workflowType=machine_learning`` in the page address, or the GenAI / Machine learning
  switch, remembered by the browser; the default is GenAI).

This module sets the tag on the experiment every run logs to (it costs one request, never
stops a run) and builds the address that opens the runs view in any MLflow 3 UI.
"""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)

#: The experiment tag the MLflow 3 UI reads for the kind of an experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: The value for a classic, non-GenAI model ("Machine learning" in the UI).
MACHINE_LEARNING_KIND = "custom_model_development"


def mark_machine_learning(experiment_id: str, client=None, overwrite: bool = False) -> bool:
    """Tag the experiment ``mlflow.experimentKind=custom_model_development`` unless it already
    has a kind (a choice made in the UI is kept; ``overwrite=True`` replaces it).
    Returns whether the tag was written."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    experiment = client.get_experiment(experiment_id)
    current = (experiment.tags or {}).get(EXPERIMENT_KIND_TAG)
    if current == MACHINE_LEARNING_KIND or (current and not overwrite):
        return False
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MACHINE_LEARNING_KIND)
    return True


def runs_view_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The address of the experiment's runs table in the MLflow UI (machine-learning view)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class MlflowExperimentKindHook:
    """Before each pipeline run (after kedro-mlflow has started its run), mark the run's
    experiment as a machine-learning experiment (:func:`mark_machine_learning`)."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        try:
            import mlflow

            run = mlflow.active_run()
            if run is None:  # tracking disabled for this pipeline
                return
            if mark_machine_learning(run.info.experiment_id):
                log.info(
                    "MLflow experiment %s marked as a machine-learning experiment (%s=%s).",
                    run.info.experiment_id,
                    EXPERIMENT_KIND_TAG,
                    MACHINE_LEARNING_KIND,
                )
        except Exception as exc:  # noqa: BLE001 - the UI's view must never stop a run
            log.debug("Could not set the MLflow experiment kind: %s", exc)
