"""What a plain ``kedro run --env quick`` prints: no warning a user does not need.

The slow test runs the real command line on a fresh copy of the project (a first run: new
``mlflow.db``) and fails on any WARNING/ERROR log record, Python warning or traceback not in
:data:`ALLOWED`. The fast tests check the filters of :mod:`anomaly_ae.logging_filters` and the
MLflow experiment kind of :mod:`anomaly_ae.mlflow_ui`.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import warnings

import pytest
from conftest import make_project

from anomaly_ae import logging_filters, mlflow_ui

#: WARNING records that the quick run is *meant* to print, and why.
ALLOWED = {
    # The quick environment trains on the built-in synthetic sample on purpose; the project
    # says so loudly (README: "fall back with a loud warning") so that nobody mistakes its
    # numbers for MVTec AD results. A framed banner (the "!!!" lines) and one line at training.
    # (Rich wraps long records: the first line of each is matched.)
    "synthetic data banner": re.compile(r"^!{20,}$|^SYNTHETIC DATA: the real MVTec"),
    "synthetic training": re.compile(r"^Training on SYNTHETIC data"),
    # The quick sample holds out 4 normal validation images: a threshold set on them cannot
    # promise the 1 % its 0.99 quantile asks for (a normal image is flagged at 20-40 %), and a
    # user of the demo should know (README, "The false-alarm rate to expect").
    "too few validation images": re.compile(r"^evaluation\.threshold asks for a false-alarm rate"),
}

#: "[12/01/26 04:05:45] WARNING  message    file.py:42" (Kedro's rich handler; the time is
#: printed once per second, blank otherwise).
_RECORD = re.compile(r"^(?:\[[^\]]*\]|\s)\s*(WARNING|ERROR|CRITICAL)\s+(.*?)\s*(?:\S+\.py:\d+)?\s*$")
_PYTHON_WARNING = re.compile(r"\b\w*Warning: ")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def unexpected_output(log: str) -> list[str]:
    """Lines of a ``kedro run`` log that warn, fail or trace back, other than :data:`ALLOWED`."""
    log = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log)
    found = []
    for line in log.splitlines():
        line = line.split("\r")[-1]  # tqdm redraws its bar with carriage returns
        record = _RECORD.match(line)
        if record:
            message = record.group(2)
            if not any(pattern.search(message) for pattern in ALLOWED.values()):
                found.append(line.strip())
        elif _PYTHON_WARNING.search(line) or _TRACEBACK.search(line):
            found.append(line.strip())
    return found


@pytest.mark.slow
def test_quick_run_prints_no_unneeded_warnings(tmp_path):
    project = make_project(tmp_path / "project")
    result = project.run("run", "--env", "quick", "--params", "training.progress=false")
    log = result.stdout + result.stderr
    (tmp_path / "kedro_run.log").write_text(log)  # for a look when it fails
    assert "Pipeline execution completed successfully" in log
    assert unexpected_output(log) == []
    assert "SYNTHETIC DATA" in log  # the wanted warning still shows

    # the experiment the run created opens in the MLflow UI's machine-learning view
    with sqlite3.connect(project.path / "mlflow.db") as db:
        tags = db.execute(
            "select t.key, t.value from experiment_tags t join experiments e using (experiment_id) "
            "where e.name = 'anomaly_ae'"
        ).fetchall()
    assert (mlflow_ui.EXPERIMENT_KIND_TAG, mlflow_ui.MACHINE_LEARNING_KIND) in tags


def test_unexpected_output_finds_warnings_and_keeps_the_allowed_ones():
    pad = " " * 20
    log = "\n".join(
        [
            "[12/01/26 04:05:45] WARNING  !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!    nodes.py:42",
            f"{pad}WARNING  SYNTHETIC DATA: the real MVTec AD 'bottle' data is not   nodes.py:43",
            f"{pad}WARNING  Training on SYNTHETIC data: results are not comparable  nodes.py:65",
            f"{pad}INFO     Completed 1 out of 20 tasks                    runner.py:246",
            f"{pad}WARNING  /x/site-packages/foo.py:3: FutureWarning: bar    warnings.py:109",
            "/x/y.py:3: DeprecationWarning: plain stderr",
            "Traceback (most recent call last):",
        ]
    )
    assert unexpected_output(log) == [
        "WARNING  /x/site-packages/foo.py:3: FutureWarning: bar    warnings.py:109",
        "/x/y.py:3: DeprecationWarning: plain stderr",
        "Traceback (most recent call last):",
    ]


def _emit(message: str, category: type[Warning], module: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging_filters.install()
        warnings.warn_explicit(message, category, f"/x/{module.replace('.', '/')}.py", 1, module=module)
    return caught


def test_warning_filters_are_narrow():
    assert _emit("register_new_resolver() is deprecated", UserWarning, "kedro.config.omegaconf_config") == []
    # the same text from another module, or another message from the same module, still shows
    assert len(_emit("register_new_resolver() is deprecated", UserWarning, "anomaly_ae.settings")) == 1
    assert len(_emit("something else", UserWarning, "kedro.config.omegaconf_config")) == 1
    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`"
    assert _emit(leaf, FutureWarning, "copyreg") == []
    assert len(_emit(leaf, FutureWarning, "anomaly_ae.export.onnx_export")) == 1


def test_the_onnx_exporters_torchvision_records_are_dropped_and_nothing_else(caplog):
    """torch's exporter logs one WARNING per torchvision operator when torchvision is absent
    (``kedro run --pipeline=export``); the project uses none of them."""
    logging_filters.install()
    logging_filters.install()
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    assert sum(isinstance(f, logging_filters.DropKnownRecords) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_logging_filter_drops_only_the_known_mlflow_warning():
    """MLflow emits the type-hint warning under its own ``simplefilter("once")``, in front of
    any warnings filter: it is dropped where Kedro logs warnings (``py.warnings``)."""
    drop = logging_filters.DropKnownWarnings()

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, "%s", (text,), None)

    mlflow_warning = (
        "/v/site-packages/mlflow/pyfunc/utils/data_validation.py:187: UserWarning: "
        "\x1b[33mAdd type hints to the `predict` method to enable data validation and automatic "
        "signature inference during model logging.\x1b[0m\n  color_warning(\n"
    )
    assert not drop.filter(record(mlflow_warning))
    assert drop.filter(record(mlflow_warning.replace("data_validation.py", "other.py")))
    assert drop.filter(record("/x/y.py:1: UserWarning: something else\n"))
    logging_filters.install()
    logging_filters.install()
    filters = logging.getLogger("py.warnings").filters
    assert sum(isinstance(f, logging_filters.DropKnownWarnings) for f in filters) == 1


class _Experiment:
    def __init__(self, tags):
        self.tags = tags


class _Client:
    def __init__(self, tags):
        self.tags = dict(tags)

    def get_experiment(self, experiment_id):
        return _Experiment(self.tags)

    def set_experiment_tag(self, experiment_id, key, value):
        self.tags[key] = value


@pytest.mark.parametrize(
    ("tags", "overwrite", "written", "kind"),
    [
        ({}, False, True, "custom_model_development"),  # an experiment from before the tag
        ({"mlflow.experimentKind": "custom_model_development"}, False, False, "custom_model_development"),
        ({"mlflow.experimentKind": "genai_development"}, False, False, "genai_development"),  # user's choice
        ({"mlflow.experimentKind": "genai_development"}, True, True, "custom_model_development"),
    ],
)
def test_experiment_kind(tags, overwrite, written, kind):
    client = _Client(tags)
    assert mlflow_ui.mark_machine_learning("1", client=client, overwrite=overwrite) is written
    assert client.tags["mlflow.experimentKind"] == kind


def test_runs_view_url():
    assert (
        mlflow_ui.runs_view_url("3", "http://127.0.0.1:5000/")
        == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    )
