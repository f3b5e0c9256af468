"""The ``loss_study`` pipeline: ``kedro run --pipeline=loss_study [--namespaces=bottle.hybrid]``.

Data preparation runs once under ``<category>``; training and evaluate are reused under one
namespace per variant, ``<category>.<variant>`` (``loss_study.variants``; each variant's
``loss`` group in ``parameters_loss_study.yml``), so catalog factories give each variant its
own files and ``NamespaceRunsHook`` its own nested MLflow run. The variants come from the
run's parameters, so ``--env`` and ``--params loss_study.variants=[...]`` reach them.
"""

from __future__ import annotations

import warnings

from kedro.pipeline import Node, Pipeline

from anomaly_ae import run_params
from anomaly_ae.pipelines import data_ingestion, data_processing, evaluate, training

from .nodes import comparison_node

SHARED_INPUTS = ("train_images", "validation_images", "test_images", "image_manifest", "dataset_info")


def create_pipeline(**kwargs) -> Pipeline:
    from anomaly_ae.pipeline_registry import in_namespace

    category = run_params.category()
    variants = run_params.loss_variants()
    template = training.create_pipeline() + evaluate.create_pipeline()
    study = in_namespace(data_ingestion.create_pipeline() + data_processing.create_pipeline(), category)
    shared = {name: f"{category}.{name}" for name in SHARED_INPUTS if name in template.inputs()}
    for variant in variants:
        variant_pipeline = Pipeline(
            template,
            namespace=variant,
            inputs=set(shared),
            parameters={p: p for p in template.inputs() if p.startswith("params:") and p != "params:loss"},
        )  # "params:loss" -> "params:<variant>.loss": the variant's own loss weights
        study += in_namespace(variant_pipeline, category, inputs=shared)
    with warnings.catch_warnings():  # the variants' outputs ARE namespaced (dotted) names
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        comparison = Pipeline(
            [
                Node(
                    comparison_node(variants),
                    ["params:paper_table2", "dataset_info", *(f"{v}.evaluation_metrics" for v in variants)],
                    ["loss_study_comparison", "loss_study_figure", "loss_study_report"],
                    name="compare_loss_variants",
                )
            ]
        )
    return study + in_namespace(comparison, category)
