"""The ``loss_study`` pipeline: ``kedro run --pipeline=loss_study [--namespaces=hybrid]``.

Data preparation runs once; the training, evaluation and reporting pipelines are reused
under one Kedro namespace per variant; catalog dataset factories
(``{namespace}.model_checkpoint`` ...) give each variant its own files, and
``NamespaceRunsHook`` its own nested MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from kedro.config import OmegaConfigLoader
from kedro.framework.project import settings
from kedro.pipeline import Node, Pipeline

from anomaly_ae.pipelines import data_ingestion, data_processing, evaluation, reporting, training

from .nodes import comparison_node

DEFAULT_VARIANTS = ("mse", "ssim", "hybrid")
SHARED_INPUTS = {"train_images", "validation_images", "test_images", "image_manifest", "dataset_info"}
SHARED_PARAMETERS = {"params:model", "params:training", "params:evaluation", "params:paper_table2"}


def configured_variants(project_path: Path | None = None) -> list[str]:
    """``loss_study.variants`` from the project's parameters (base + local), so a variant is
    added in configuration only; the paper's three when no configuration is found."""
    conf = (project_path or Path.cwd()) / settings.CONF_SOURCE
    if not conf.is_dir():
        return list(DEFAULT_VARIANTS)
    params = OmegaConfigLoader(str(conf), base_env="base", default_run_env="local")["parameters"]
    return list(params.get("loss_study", {}).get("variants", DEFAULT_VARIANTS))


def create_pipeline(**kwargs) -> Pipeline:
    variants = configured_variants()
    template = training.create_pipeline() + evaluation.create_pipeline() + reporting.create_pipeline()
    # Data preparation is shared and not namespaced: `--namespaces=hybrid` skips it and
    # reads the cached arrays of an earlier run.
    study = data_ingestion.create_pipeline() + data_processing.create_pipeline()
    for variant in variants:
        study += Pipeline(
            template,
            namespace=variant,
            inputs=SHARED_INPUTS & template.inputs(),
            parameters={p: p for p in SHARED_PARAMETERS if p in template.inputs()},
        )
    study += Pipeline(
        [
            Node(
                comparison_node(variants),
                ["params:paper_table2", "dataset_info", *(f"{v}.evaluation_metrics" for v in variants)],
                ["loss_study_comparison", "loss_study_figure", "loss_study_report"],
                name="compare_loss_variants",
            )
        ]
    )
    return study
