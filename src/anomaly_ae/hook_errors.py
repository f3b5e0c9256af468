"""Hooks that refuse a run must not leave its MLflow run open (one place for every hook)."""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["end_active_runs", "refuses"]


def end_active_runs(status: str = "FAILED") -> None:
    """End every MLflow run active in this process (nested ones first) with ``status``."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run(status=status)


def refuses(method: Callable) -> Callable:
    """For a ``before_pipeline_run`` hook that may refuse the run: on its error, end the MLflow
    run(s) already open (FAILED), then re-raise. Kedro calls no ``on_pipeline_error`` for an
    error raised by a ``before_pipeline_run`` hook, so kedro-mlflow's run would stay RUNNING in
    the tracking store and *active in this process*: the next session in the same process (a
    notebook, a test suite) would log into it, in the first project's database."""

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BaseException:
            end_active_runs("FAILED")
            raise

    return guarded
