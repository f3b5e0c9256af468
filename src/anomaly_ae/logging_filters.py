"""Narrow filters for third-party warnings that a ``kedro run`` user can do nothing about.

Each entry names the exact message, its category and the module that emits it, with the
reason. Warnings from this project's own code and configuration are fixed at their source,
never filtered here; every other warning still shows.

Two mechanisms, because one warning escapes ``warnings.filterwarnings``:

* a :mod:`warnings` filter per entry (the usual way);
* a :class:`logging.Filter` on the ``py.warnings`` logger, where Kedro's ``RichHandler``
  sends every warning (``logging.captureWarnings``). MLflow wraps the code that emits the
  first warning below in ``warnings.catch_warnings(); warnings.simplefilter("once")``
  (``mlflow.utils.annotations.filter_user_warnings_once``), which puts its own filter in front
  of ours: only the logging filter can drop it.

:func:`install` is idempotent. It is called

* from ``settings.py`` (in-process sessions: tests, notebooks via ``%load_ext kedro.ipython``,
  ``kedro run`` once the project's settings load), and
* from the ``kedro.init`` entry point (``pyproject.toml``), which the ``kedro`` command calls
  before it imports its plugins' commands: kedro-mlflow's ``kedro mlflow`` command group is
  imported there, before any project code, and that import emits the first warning below.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import NamedTuple


class KnownWarning(NamedTuple):
    message: str  # regex, matched from the start of the message (as warnings.filterwarnings)
    category: type[Warning]
    module: str  # dotted name of the module the warning is attributed to

    @property
    def logged(self) -> re.Pattern[str]:
        """How ``logging.captureWarnings`` formats it: ``<path>:<line>: <Category>: <message>``."""
        path = r"[/\\]".join(map(re.escape, self.module.split("."))) + r"\.py:\d+: "
        return re.compile(path + re.escape(self.category.__name__) + ": " + self.message, re.DOTALL)


THIRD_PARTY_WARNINGS: tuple[KnownWarning, ...] = (
    # kedro-mlflow 2.0's KedroPipelineModel (an mlflow.pyfunc.PythonModel) defines `predict`
    # without type hints; MLflow 3 warns when the class is *defined*, i.e. whenever kedro-mlflow
    # is imported (the `kedro` CLI loads its commands on every call). We do not use that class
    # (our own pyfunc model, anomaly_ae.runtime.pyfunc.BundleModel, has type hints). The
    # message starts with an ANSI colour code, hence the leading `.*`.
    KnownWarning(
        r".*Add type hints to the `predict` method to enable data validation",
        UserWarning,
        "mlflow.pyfunc.utils.data_validation",
    ),
    # Kedro's OmegaConfigLoader registers its resolvers (its own, e.g. ${runtime_params:}, and
    # our ${project_root:}) with OmegaConf.register_new_resolver, which OmegaConf 2.4
    # deprecates: Kedro's internals; the project's configuration cannot avoid it.
    KnownWarning(
        r"register_new_resolver\(\) is deprecated",
        UserWarning,
        "kedro.config.omegaconf_config",
    ),
    # The same OmegaConf deprecation, from kedro-mlflow 2.0's MlflowHook registering its
    # ${km.random_name:} resolver at the start of every session.
    KnownWarning(
        r"register_new_resolver\(\) is deprecated",
        UserWarning,
        "kedro_mlflow.framework.hooks.mlflow_hook",
    ),
    # torch 2.13's ONNX exporter (kedro run --pipeline=export) rebuilds pytree specs through
    # pickle's copyreg; its own pytree code warns about its own deprecated LeafSpec check.
    KnownWarning(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "copyreg",
    ),
)

# Log records (not warnings) of the same kind: (logger name, message regex, reason).
THIRD_PARTY_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # torch's ONNX exporter looks up the decompositions of torchvision's operators on every
    # export and logs one WARNING per operator when torchvision is absent; the scoring graph
    # uses none of them, and the project does not need torchvision.
    ("torch.onnx._internal.exporter._registration", r"torchvision is not installed"),
)


class DropKnownRecords(logging.Filter):
    """Drops the records of :data:`THIRD_PARTY_LOG_RECORDS` from the logger it is added to."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class DropKnownWarnings(logging.Filter):
    """Drops the ``py.warnings`` records of :data:`THIRD_PARTY_WARNINGS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(known.logged.search(text) for known in THIRD_PARTY_WARNINGS)


def install() -> None:
    """Add the filters (again: a no-op the second time)."""
    for known in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=known.message, category=known.category, module=re.escape(known.module)
        )
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, DropKnownWarnings) for f in logger.filters):
        logger.addFilter(DropKnownWarnings())
    for name, pattern in THIRD_PARTY_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownRecords) for f in logger.filters):
            logger.addFilter(DropKnownRecords(pattern))
