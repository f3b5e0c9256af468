"""The benchmark table of a multi-category run: one row per category plus the mean."""

from __future__ import annotations

from typing import Any

import pandas as pd

from anomaly_ae.evaluation.stress import per_kind_rows

#: Detection metrics of the summary (means in the ``mean`` row).
DETECTION = [
    "image_auroc",
    "image_auroc_at_defect",
    "image_auroc_off_defect",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
]
#: The image AUROC's confidence interval (per category only: a mean of bounds is no interval).
INTERVAL = ["image_auroc_ci_low", "image_auroc_ci_high"]
#: Columns of the summary, in order (the metrics are means in the ``mean`` row).
COLUMNS = [
    "category",
    "data_source",
    "train_images",
    "test_images",
    "epochs",
    "best_epoch",
    "train_minutes",
    "ssim_normal_mean",
    "ssim_defect_mean",
    DETECTION[0],
    *INTERVAL,
    *DETECTION[1:],
    "threshold",
    # at most this share of normal images like the validation ones is flagged (on average;
    # anomaly_ae.evaluation.false_alarms), and the share of good test images that was
    "false_alarm_rate_expected_high",
    "false_alarm_rate_at_threshold",
    "map",
]
MEANED = [*DETECTION, "ssim_normal_mean", "ssim_defect_mean"]


def category_row(
    category: str,
    metrics: dict[str, Any],
    history: pd.DataFrame,
    manifest: pd.DataFrame,
    map_description: str,
) -> dict[str, Any]:
    """One row: what was trained (images, epochs, the best epoch by the monitored loss, the
    training time) and what it measured (Table II's SSIM means, AUROCs — with the image
    AUROC's confidence interval, at and off the
    defect too: the label-leak check —, AUPRO, F1, threshold, the false-alarm rate it promises
    and the one on the good test images, the map settings used). A
    metric that could not be computed (e.g. pixel metrics without masks, or metrics from an
    older run) is NaN."""
    monitored = "val_loss" if "val_loss" in history and history["val_loss"].notna().any() else "train_loss"
    best = int(history.loc[history[monitored].idxmin(), "epoch"]) if len(history) else 0
    seconds = float(history["epoch_seconds"].sum()) if "epoch_seconds" in history else float("nan")
    return {
        "category": category,
        "data_source": metrics.get("data_source"),
        "train_images": int((manifest["split"] == "train").sum()),
        "test_images": int((manifest["split"] == "test").sum()),  # 0: normal images only
        "epochs": int(history["epoch"].max()) if len(history) else 0,
        "best_epoch": best,
        "train_minutes": seconds / 60,
        **{k: _number(metrics.get(k)) for k in (*MEANED, *INTERVAL)},
        "threshold": _number(metrics.get("threshold")),
        "false_alarm_rate_expected_high": _number(metrics.get("false_alarm_rate_expected_high")),
        "false_alarm_rate_at_threshold": _number(metrics.get("false_alarm_rate_at_threshold")),
        "map": map_description,
    }


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def summary_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows in ``COLUMNS`` order plus a ``mean`` row (means of the metrics over the
    categories that have them)."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    mean = {c: None for c in COLUMNS}
    mean.update({c: table[c].mean() for c in MEANED})
    mean.update(
        {
            "category": "mean",
            "train_images": int(table["train_images"].sum()),
            "test_images": int(table["test_images"].sum()),
            "train_minutes": table["train_minutes"].sum(),
        }
    )
    return pd.concat([table, pd.DataFrame([mean], columns=COLUMNS)], ignore_index=True)


def held_out_table(stress_tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per category (rows, plus the ``mean`` over the categories that have it), the held-out
    synthetic defects' image AUROC per kind (columns, ``all`` first) of the map in use: the
    stress tables' rows over every contrast and size. A category whose stress test did not run
    (fewer than 2 good test images) has an empty row."""
    rows = {}
    for category, table in stress_tables.items():
        overall = per_kind_rows(table)
        overall = overall[overall["map"] == "in use"]
        names, values = overall["kind"].astype(str), overall["image_auroc"].astype(float)
        rows[category] = dict(zip(names, values, strict=True))
    wide = pd.DataFrame.from_dict(rows, orient="index")
    kinds = [k for k in ("all", *sorted(c for c in wide.columns if c != "all")) if k in wide.columns]
    wide = wide.reindex(index=list(stress_tables), columns=kinds)
    if len(wide):
        wide.loc["mean"] = wide.mean()
    return wide.rename_axis("category").reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (tabulate), numbers to 4 decimals."""
    return table.to_markdown(index=False, floatfmt=".4f", missingval="–") + "\n"
