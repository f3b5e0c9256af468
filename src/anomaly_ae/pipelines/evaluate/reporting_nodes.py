"""Reporting nodes of the ``evaluate`` pipeline: figures, heat maps and the HTML report."""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anomaly_ae.data.transforms import as_unit_float
from anomaly_ae.evaluation import tables
from anomaly_ae.evaluation.metrics import image_auroc
from anomaly_ae.evaluation.summary import hardest_cases, kind_of_test_set, known_masks
from anomaly_ae.reporting import figures
from anomaly_ae.reporting.report import TEST_SET_HOLDS, interval_column, render_report
from anomaly_ae.scoring import anomaly_map


def _figure1_rows(
    test_images: dict[str, np.ndarray], test_scores: dict[str, np.ndarray], ssim_table: pd.DataFrame
) -> list[dict]:
    """First image of each defect type and one good image; error map = 1 - local SSIM."""
    picks = ssim_table.reset_index().groupby("defect_type", sort=True).first()
    order = ["good"] + [t for t in picks.index if t != "good"]
    rows = []
    for defect in (t for t in order if t in picks.index):
        i = int(picks.loc[defect, "index"])
        x = torch.from_numpy(as_unit_float(test_images["images"][i : i + 1]))
        recon = torch.from_numpy(test_scores["recon"][i : i + 1])
        # the paper's map, whatever evaluation.anomaly_map says
        error = anomaly_map(x, recon)[0, 0].float().numpy()
        rows.append(
            {
                "image": figures.display_image(x[0].numpy()),
                "recon": figures.display_image(recon[0].numpy()),
                "error": error,
                "label": f"{defect}\n{picks.loc[defect, 'file']}\nSSIM {picks.loc[defect, 'ssim']:.3f}",
            }
        )
    return rows


def make_figures(
    test_images: dict[str, np.ndarray],
    test_scores: dict[str, np.ndarray],
    ssim_table: pd.DataFrame,
    evaluation_metrics: dict[str, Any],
) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image]:
    """Figure 1 of the paper, image and pixel ROC curves, and SSIM histograms."""
    figure1 = figures.figure_to_image(
        figures.reconstruction_figure(_figure1_rows(test_images, test_scores, ssim_table))
    )
    labels = test_images["labels"]
    kind = kind_of_test_set(labels)
    image_roc = figures.figure_to_image(
        figures.roc_figure(
            {
                "image score": (labels, test_scores["score"], evaluation_metrics["image_auroc"]),
                "1 - SSIM": (labels, 1 - test_scores["ssim"], image_auroc(labels, 1 - test_scores["ssim"])),
            }
            if kind == "normal and defective"
            else {},
            "Image-level ROC",
            empty=f"needs good and defective test images; the test set: {kind}.",
        )
    )
    known = known_masks(test_images.get("has_mask"), len(labels))
    pixel_roc = figures.figure_to_image(
        figures.roc_figure(
            {
                "anomaly map": (
                    test_images["masks"][known].ravel() > 0,
                    test_scores["map"][known].ravel(),
                    evaluation_metrics["pixel_auroc"],
                )
            }
            if np.any(test_images["masks"][known] > 0)
            else {},
            "Pixel-level ROC (test images with masks)"
            if not known.all()
            else "Pixel-level ROC (all test pixels)",
            empty="no test image with a defect mask.",
        )
    )
    histogram = figures.figure_to_image(figures.ssim_histogram_figure(ssim_table))
    return figure1, image_roc, pixel_roc, histogram


def threshold_rule_text(decision_threshold: dict[str, Any]) -> str:
    """How the threshold was set, in words: e.g. "0.99 quantile of 21 normal validation images"."""
    n = decision_threshold.get("n_validation_images", "?")
    if decision_threshold.get("rule") == "mean_std":
        how = f"mean + {decision_threshold.get('k_sigma')} std"
    elif decision_threshold.get("rule") == "false_alarm_rate":
        how = f"lowest promising a {decision_threshold.get('false_alarm_rate'):g} false-alarm rate"
    else:
        how = f"{decision_threshold.get('quantile')} quantile"
    return f"{how} of {n} normal validation images"


def make_score_histogram(
    validation_scores: dict[str, np.ndarray],
    test_scores: dict[str, np.ndarray],
    test_images: dict[str, np.ndarray],
    decision_threshold: dict[str, Any],
) -> Image.Image:
    """The image scores the threshold came from (normal validation images) beside the test
    images' (good, defective): the margin a user chooses a threshold in. Drawn without a
    test set too: a new product's normal images alone."""
    labels = np.asarray(test_images["labels"]) != 0
    scores = np.asarray(test_scores["score"])
    return figures.figure_to_image(
        figures.score_histogram_figure(
            {
                "normal validation images": validation_scores["score"],
                "good test images": scores[~labels],
                "defective test images": scores[labels],
            },
            float(decision_threshold["value"]),
            threshold_rule_text(decision_threshold),
        )
    )


def _overlay_vmax(decision_threshold: dict[str, Any]) -> float:
    """The heat maps' colour scale for the map they show (the localisation map, if any)."""
    from anomaly_ae.scoring import MapSettings

    heat = MapSettings.from_dict(decision_threshold["score"]).heatmap
    return figures.overlay_vmax(float(decision_threshold["value"]), heat.normal_reference)


def make_heatmaps(
    test_images: dict[str, np.ndarray],
    test_scores: dict[str, np.ndarray],
    ssim_table: pd.DataFrame,
    decision_threshold: dict[str, Any],
) -> dict[str, Image.Image]:
    """One overlay per test image (input with its anomaly map on top), keyed like the data."""
    vmax = _overlay_vmax(decision_threshold)
    return {
        str(PurePosixPath(row.file).with_suffix("")): figures.heatmap_overlay_image(
            as_unit_float(test_images["images"][i]), test_scores["map"][i], vmax=vmax
        )
        for i, row in enumerate(ssim_table.itertuples())
    }


def _case_rows(
    images: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    table: pd.DataFrame,
    picks: Iterable[int],
    threshold: float,
    kind: str | None = None,
) -> list[dict]:
    """The hardest-cases figure's rows for ``picks`` of one image set (``kind`` names the
    set in each label instead of the table's defect type)."""
    labels = np.asarray(images["labels"])
    known = known_masks(images.get("has_mask"), len(labels))
    rows = []
    for i in picks:
        flagged = scores["score"][i] > threshold
        verdict = (
            ("flagged (false alarm)" if flagged else "passed")
            if labels[i] == 0
            else ("found" if flagged else "missed")
        )
        entry = table.iloc[i]
        score = f"score {scores['score'][i]:.3g} (threshold {threshold:.3g})"
        rows.append(
            {
                "image": as_unit_float(images["images"][i]),
                "map": scores["map"][i],
                "mask": images["masks"][i] if labels[i] != 0 and known[i] else None,
                "label": f"{kind or entry['defect_type']}, {verdict}: {score}",
                "file": str(entry["file"]),
            }
        )
    return rows


def make_hardest_cases(
    test_images: dict[str, np.ndarray],
    test_scores: dict[str, np.ndarray],
    ssim_table: pd.DataFrame,
    decision_threshold: dict[str, Any],
    validation_images: dict[str, np.ndarray],
    validation_scores: dict[str, np.ndarray],
    image_manifest: pd.DataFrame,
    evaluation: dict[str, Any],
) -> Image.Image:
    """The highest-scoring good test images and the lowest-scoring defective ones
    (``evaluation.hardest_cases`` of each), with where their map peaks: what a false alarm
    or a miss looks like to this model. Without good test images (a new product's normal
    images only), the highest-scoring normal validation images take their place: the normal
    variation the model comes closest to flagging."""
    count = int(evaluation["hardest_cases"])
    labels, scores = np.asarray(test_images["labels"]), np.asarray(test_scores["score"])
    good, bad = hardest_cases(labels, scores, count)
    threshold = float(decision_threshold["value"])
    rows = []
    if not len(good):
        table = tables.ssim_table(
            image_manifest[image_manifest["split"] == "validation"], validation_scores, threshold
        )
        normal, _ = hardest_cases(np.zeros(len(table), int), validation_scores["score"], count)
        rows += _case_rows(
            validation_images, validation_scores, table, normal, threshold, "normal validation image"
        )
    rows += _case_rows(test_images, test_scores, ssim_table, (*good, *bad), threshold)
    return figures.figure_to_image(figures.hardest_cases_figure(rows, _overlay_vmax(decision_threshold)))


def make_place_map(test_images: dict[str, np.ndarray]) -> Image.Image:
    """Where on the frame the good test images vary most: the places of the held-out check's
    ``place`` bands (:func:`~anomaly_ae.evaluation.stress.spread_percentile`, the same good
    images the check pastes its defects onto), over their mean image."""
    from anomaly_ae.evaluation.stress import PLACE_BANDS, spread_percentile

    good = as_unit_float(test_images["images"][np.asarray(test_images["labels"]) == 0])
    if len(good) < 2:
        return figures.figure_to_image(
            figures.message_figure(
                "Not drawn: fewer than 2 good test images (the held-out check and its place bands "
                "need them). Add images to test/good/ for it."
            )
        )
    figure = figures.place_figure(good.mean(axis=0), spread_percentile(good), PLACE_BANDS)
    return figures.figure_to_image(figure)


def build_report(
    table2: pd.DataFrame,
    evaluation_metrics: dict[str, Any],
    figure1: Image.Image,
    image_roc: Image.Image,
    pixel_roc: Image.Image,
    ssim_histogram: Image.Image,
    score_histogram: Image.Image,
    hardest: Image.Image,
    place_map: Image.Image,
    model_checkpoint: dict[str, Any],
    dataset_info: dict[str, Any],
    map_settings: dict[str, Any],
    calibrated_map: dict[str, Any],
    calibration_table: pd.DataFrame,
    stress_table: pd.DataFrame,
    defect_type_table: pd.DataFrame,
    grid_agreement: pd.DataFrame,
    model: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
) -> str:
    """The single HTML report in 08_reporting: Table II, metrics and Figure 1 first, then
    which anomaly map was used and why (the calibration rule's table, top rows)."""
    import mlflow

    run = mlflow.active_run()
    # the evaluated checkpoint's own history: the newest training_history may belong to
    # another training when an older checkpoint is evaluated (--load-versions)
    loss_curve = figures.figure_to_image(
        figures.loss_curve_figure(
            pd.DataFrame(model_checkpoint.get("history") or [], columns=["epoch", "train_loss", "val_loss"]),
            f"Training loss of the evaluated checkpoint ({dataset_info['source']} "
            f"{dataset_info['category']}, epoch {model_checkpoint.get('epoch', '?')})",
        )
    )
    return render_report(
        title=f"anomaly-ae report — {dataset_info['category']}",
        model=evaluation_metrics["model"],
        run_id=run.info.run_id if run else None,
        dataset_info=dataset_info,
        table2=table2,
        metrics=evaluation_metrics,
        figures={
            "Figure 1 — input, reconstruction, error map (1 − local SSIM)": figure1,
            "Image-level ROC": image_roc,
            "Image scores and the decision threshold": score_histogram,
            "Pixel-level ROC": pixel_roc,
            "SSIM of normal vs defective test images": ssim_histogram,
            "Hardest cases: the highest-scoring good images, the lowest-scoring defective ones": hardest,
            "Where the good images vary most (the held-out check's place bands)": place_map,
            "Training loss": loss_curve,
        },
        configuration={
            "model": model,
            "training": training,
            "evaluation": evaluation,
            "loss_weights": evaluation_metrics.get("loss_weights"),
            "framing": evaluation_metrics.get("framing"),
            "checkpoint_epoch": evaluation_metrics.get("checkpoint_epoch"),
        },
        extra_sections={
            "Decision threshold — the false-alarm rate to expect": false_alarm_section(evaluation_metrics),
            "Where does the image score come from?": defect_region_section(
                evaluation_metrics, evaluation["defect_margin"]
            ),
            "Per defect type (real test images)": defect_type_section(defect_type_table),
            "Anomaly map — which settings and why": map_section(
                map_settings, calibrated_map, calibration_table, evaluation["map"]
            ),
            "Does the synthetic score predict the real test metrics? (development check)": agreement_section(
                grid_agreement
            ),
            "Held-out synthetic defects per kind (good test images, another seed)": stress_section(
                stress_table
            ),
        },
    )


#: Above this, the report warns that the image labels leak through pixels away from the
#: defects (a presentation cue only; the number itself is always shown).
LEAK_WARNING = 0.75


def false_alarm_section(metrics: dict[str, Any]) -> str:
    """HTML: the false-alarm rate the threshold's normal validation images promise, how well
    so few images pin it, and whether the good test images keep the promise."""
    from anomaly_ae.evaluation.false_alarms import (
        FalseAlarmOutlook,
        asked_false_alarm_rate,
        validation_images_needed,
    )
    from anomaly_ae.pipelines.evaluate.nodes import EXCESS_FALSE_ALARM_P

    rule = metrics.get("threshold_rule") or {}
    if "false_alarm_outlook" not in rule:
        return "<p>Not computed: this threshold was saved before its false-alarm outlook was.</p>"
    outlook = FalseAlarmOutlook.from_dict(rule["false_alarm_outlook"])
    text = (
        f"<p>The threshold ({metrics['threshold']:.4g}, {html.escape(threshold_rule_text(rule))}) is "
        f"exceeded by {outlook.above} of the {outlook.n_validation} normal validation images. A new "
        "normal image <i>like them</i> (the same product, camera and lighting) is flagged at "
        f"<b>{outlook.describe()}</b>, whatever the scores' distribution: "
        f"{outlook.n_validation} images pin a rate only that well (their scores: <i>Image scores "
        "and the decision threshold</i>, below).</p>"
    )
    asked = asked_false_alarm_rate(rule)
    if asked is not None and outlook.n_validation < validation_images_needed(asked):
        text += (
            f"<p>The rule (<code>evaluation.threshold</code>) asks for {100 * asked:g} %; a threshold "
            f"can promise that with at least {validation_images_needed(asked)} normal validation "
            "images (more normal training images, or a larger "
            "<code>preprocessing.validation_fraction</code>).</p>"
        )
    p = metrics.get("false_alarm_excess_p")
    n_good = int(metrics.get("n_normal") or 0)
    if p is None or n_good == 0 or not np.isfinite(p):
        return text + "<p>No good test images to check the promise on.</p>"
    flagged = int(metrics["fp_at_threshold"])
    text += (
        f"<p>Good test images: <b>{flagged} of {n_good}</b> flagged. If they were like the "
        f"validation images, {flagged} or more would happen with probability at most <b>{p:.3g}</b>.</p>"
    )
    if p < EXCESS_FALSE_ALARM_P:
        text += (
            "<p><b>Warning — the good test images are flagged more often than the validation "
            "images promise:</b> they differ from the normal images the threshold was set on "
            "(another batch, lighting or camera, or defects nobody labelled), so the rate above "
            "does not carry over to them. Check the highest-scoring good images (<i>Hardest "
            "cases</i>) before trusting the threshold on the line.</p>"
        )
    return text


def defect_region_section(metrics: dict[str, Any], margin: int) -> str:
    """HTML: the image AUROC with defective images scored near / away from their labelled
    defect, and a warning when the away-from-defect score already separates the classes."""
    at, off = metrics.get("image_auroc_at_defect"), metrics.get("image_auroc_off_defect")
    if at is None or off is None or not (np.isfinite(at) or np.isfinite(off)):
        kind = metrics.get("test_set", "normal and defective")
        if kind != "normal and defective":  # caught by the notice at the top
            return (
                f"<p>Not computed: the test set holds {TEST_SET_HOLDS[kind]}; this needs good and "
                "defective images.</p>"
            )
        return "<p>Not computed: no defective test image has a ground-truth mask.</p>"
    text = (
        f"<p>Good test images keep their score; each defective image with a mask is scored "
        f"again on its map within {margin} px of its labelled defect (<b>{at:.4f}</b>) and "
        f"only farther than that (<b>{off:.4f}</b>), against the image AUROC "
        f"{metrics['image_auroc']:.4f}. Near the defect: does the defect itself stand out? "
        "Away from it: do defective images differ from good ones elsewhere?</p>"
    )
    if np.isfinite(off) and off >= LEAK_WARNING:
        text += (
            f"<p><b>Warning — the label leaks:</b> scored without their defects, the defective "
            f"images are still told apart (AUROC {off:.4f}). Something other than the defects "
            "differs between good and defective test images (lighting, wear, another batch or "
            "camera). The plain image AUROC measures that difference too; the near-the-defect "
            "figure is the detection of the defects themselves.</p>"
        )
    return text


def _with_interval(table: pd.DataFrame, after: str = "image_auroc") -> pd.DataFrame:
    """``table`` with its two interval columns replaced by one readable ``interval`` column
    right after ``after``."""
    shown = table.drop(columns=["image_auroc_ci_low", "image_auroc_ci_high"], errors="ignore")
    shown.insert(shown.columns.get_loc(after) + 1, "interval", interval_column(table))
    return shown


def defect_type_section(table: pd.DataFrame) -> str:
    """HTML: image AUROC (with its confidence interval), pixel AUROC, AUPRO and recall at the
    threshold per test defect type."""
    from anomaly_ae.reporting.report import html_table

    if table.empty:
        return "<p>No defective test images.</p>"
    shown = _with_interval(table)
    for column in ("pixel_auroc", "aupro"):
        shown[column] = [
            f"{value:.4f}" if has else "— (no masks)"
            for value, has in zip(shown[column], shown["has_masks"], strict=True)
        ]
    unmasked = table.loc[~table["has_masks"], "defect_type"].tolist()
    note = (
        f" Types without ground-truth masks ({', '.join(unmasked)}): image metrics only; they "
        "are left out of the pixel metrics above."
        if unmasked
        else ""
    )
    return (
        "<p>Each defect type's test images against every good test image; interval = the image "
        "AUROC's confidence interval from the sampling of the test images "
        "(evaluation.confidence_level, DeLong): a few dozen images measure an AUROC only that "
        f"well. Recall = share of the type's images above the decision threshold.{note}</p>"
        + html_table(shown.drop(columns="has_masks"))
    )


def agreement_section(table: pd.DataFrame) -> str:
    """HTML: Spearman correlations over the calibration grid between the synthetic scores
    and the same settings' real test metrics, and the top settings by each."""
    from anomaly_ae.evaluation.calibration import spearman
    from anomaly_ae.reporting.report import html_table

    if table.empty or "real_image_auroc" not in table:
        return "<p>Not computed (evaluation.grid_agreement is off, or the test set has one class).</p>"

    def rho(a: str, b: str) -> str:
        return f"{spearman(table, a, b):.3f}"

    pairs = [
        ("selection score", "real image AUROC", rho("selection_score", "real_image_auroc")),
        *(
            [
                (
                    "selection score",
                    "real image AUROC, defective images scored near their defect",
                    rho("selection_score", "real_image_auroc_at_defect"),
                )
            ]
            if "real_image_auroc_at_defect" in table
            else []
        ),
        ("selection score", "real pixel AUROC", rho("selection_score", "real_pixel_auroc")),
        ("selection score", "real (image + pixel) / 2", rho("selection_score", "real_selection_score")),
        ("synthetic image AUROC", "real image AUROC", rho("syn_image_auroc", "real_image_auroc")),
        ("synthetic pixel AUROC", "real pixel AUROC", rho("syn_pixel_auroc", "real_pixel_auroc")),
    ]
    rhos = pd.DataFrame(pairs, columns=["synthetic (label-free)", "real test (labels)", "Spearman ρ"])
    columns = [
        c
        for c in (
            "setting",
            "selection_score",
            "real_image_auroc",
            "real_image_auroc_at_defect",
            "real_pixel_auroc",
            "real_rank",
        )
        if c in table
    ]
    shown = table.sort_values("selection_score", ascending=False, kind="stable").head(TOP_ROWS)
    chosen = table[table["is_selected"]] if "is_selected" in table else table.head(0)
    best = table.sort_values("real_selection_score", ascending=False, kind="stable").head(1)
    return (
        f"<p>The calibration grid ({len(table)} settings) scored on the real test images too. "
        "Only the synthetic, label-free score chooses; this table checks whether it ranks the "
        "settings as the real defects would. Aim: ρ ≥ 0.7.</p>"
        + html_table(rhos)
        + "<p>Top settings by the synthetic selection score, with their real metrics and real rank:</p>"
        + html_table(shown[columns])
        + "<p>Chosen setting and the best setting on the real test set (for reference only):</p>"
        + html_table(pd.concat([chosen, best])[columns])
    )


def stress_section(table: pd.DataFrame) -> str:
    """HTML: image / pixel AUROC per synthetic defect kind, the map in use next to the paper's."""
    from anomaly_ae.evaluation.stress import SPLIT_COLUMNS, per_kind_rows
    from anomaly_ae.reporting.report import html_table

    if table.empty:
        return (
            "<p>Not computed: fewer than 2 good test images (the held-out check pastes its "
            "defects onto good test images; the validation images serve the calibration).</p>"
        )
    for column in SPLIT_COLUMNS:  # tables written before the bands existed
        if column not in table:
            table = table.assign(**{column: "all"})
    overall = per_kind_rows(table)
    wide = overall.pivot(index="kind", columns="map", values=["image_auroc", "pixel_auroc"])
    wide.columns = [f"{metric.replace('_auroc', ' AUROC')} ({name})" for metric, name in wide.columns]
    counts = overall.drop_duplicates("kind").set_index("kind")["n_defective"]
    wide.insert(0, "defective images", counts)
    in_use = overall[overall["map"] == "in use"].set_index("kind")
    if "image AUROC (in use)" in wide and len(in_use):
        at = wide.columns.get_loc("image AUROC (in use)") + 1
        wide.insert(at, "interval (in use)", pd.Series(interval_column(in_use), in_use.index))
    page = (
        "<p>Every synthetic defect kind pasted onto the good test images with another seed than "
        "calibration: a check on images the choice never saw (it chooses nothing). Interval: "
        "the image AUROC's confidence interval (evaluation.confidence_level): with few good "
        "test images it is wide; more defective copies per kind "
        "(evaluation.stress_test.copies_per_kind) narrow it.</p>" + html_table(wide.reset_index())
    )
    splits = (
        (
            "contrast",
            "median_contrast",
            {"contrast": "mean |change| in the defect", "median_contrast": "median change"},
            "<p>The faint kinds split by the contrast each copy really has (mean intensity change "
            "inside its mask, images in [0, 1]): how faint a defect of each kind can be and still "
            "be found. Few images per band: read them as a trend.</p>",
        ),
        (
            "size",
            "median_area",
            {"size": "defect area (px at model resolution)", "median_area": "median area (px)"},
            "<p>The kinds that can be small split by the size each copy really has (its mask's "
            "area in pixels at the model's resolution): how small a defect of each kind can be "
            "and still be found. Few images per band: read them as a trend.</p>",
        ),
        (
            "place",
            "median_place",
            {
                "place": "where the good images vary (percentile of the frame)",
                "median_place": "median percentile",
            },
            "<p>The same kinds split by where each copy lies: how much the good images vary at "
            "its place (each pixel's spread over them, ranked over the frame; 0.95: more than at "
            "95 % of the pixels). The map compares each pixel with the normal images, so it is "
            "least sensitive where they vary most (an edge drawn a little off, a glint): a kind "
            "found well in the steady part of the frame can be missed there. Few images per "
            "band: read them as a trend.</p>",
        ),
    )
    for column, median, names, caption in splits:
        bands = table[(table[column] != "all") & (table["map"] == "in use")]
        if bands.empty or median not in bands:
            continue
        shown = bands[["kind", column, "n_defective", median, "image_auroc", "pixel_auroc"]].copy()
        if median == "median_area":  # to the whole pixel, not 4 decimals (the CSV keeps halves)
            shown[median] = shown[median].round().astype(int)
        elif median == "median_place":
            shown[median] = shown[median].map("{:.2f}".format)
        shown.insert(5, "image_auroc_interval", interval_column(bands))
        shown = shown.rename(
            columns={
                **names,
                "n_defective": "defective images",
                "image_auroc": "image AUROC (in use)",
                "pixel_auroc": "pixel AUROC (in use)",
                "image_auroc_interval": "interval",
            }
        )
        page += caption + html_table(shown)
    return page


TOP_ROWS = 10
TABLE_COLUMNS = ["rank", "setting", "syn_image_auroc", "syn_pixel_auroc", "selection_score", "levers_changed"]


def map_section(
    map_settings: dict[str, Any], calibrated_map: dict[str, Any], table: pd.DataFrame, source: str
) -> str:
    """HTML: the settings used, the rule, and the rule's table (top rows plus the paper's map)."""
    import html

    from anomaly_ae.reporting.report import html_table
    from anomaly_ae.scoring import MapSettings
    from anomaly_ae.scoring.anomaly_map import NAME_LEGEND

    used = MapSettings.from_dict(map_settings).describe()
    if source == "calibrated":
        why = (
            f"Chosen by calibration for this model ({calibrated_map['n_settings']} settings, "
            f"{calibrated_map['n_tied']} within the tie tolerance {calibrated_map['tie_tolerance']:g})."
        )
    else:
        why = (
            "As configured (evaluation.map: configured, evaluation.anomaly_map). Calibration would "
            f"have chosen <code>{html.escape(calibrated_map['setting'])}</code>."
        )
    settings = MapSettings.from_dict(map_settings)
    heat = settings.localisation
    if heat is not None:
        why += (
            f" The image score comes from <code>{html.escape(settings.describe_detection())}</code>; "
            f"the heat maps, pixel AUROC and AUPRO from <code>{html.escape(heat.describe_map())}</code>"
            + (
                f" (the best synthetic pixel AUROC, {calibrated_map['localisation_syn_pixel_auroc']:.4f})."
                if source == "calibrated" and "localisation_syn_pixel_auroc" in calibrated_map
                else "."
            )
        )
    located = table["is_localisation"] if "is_localisation" in table else table["is_selected"]
    shown = table[(table["rank"] <= TOP_ROWS) | table["is_paper"] | located].copy()
    located = located[shown.index]
    shown["setting"] = [
        s + (" (paper)" if p else "") + (" (chosen)" if c else "") + (" (heat map)" if h and not c else "")
        for s, p, c, h in zip(shown["setting"], shown["is_paper"], shown["is_selected"], located, strict=True)
    ]
    legend = "; ".join(f"<code>{html.escape(n)}</code>: {html.escape(m)}" for n, m in NAME_LEGEND)
    kinds = calibration_kinds_table(table)
    return (
        f"<p>Used: <code>{html.escape(used)}</code>. {why}</p>"
        f"<p>Rule: {html.escape(calibrated_map['rule'])}</p>"
        f"<p>Reading a setting's name: {legend}.</p>"
        + html_table(shown[TABLE_COLUMNS])
        + (
            "<p>The same synthetic defects per kind (the calibration's validation images): the image "
            "AUROC of the map that scores the image (each kind's copies against the normal images) "
            "and the pixel AUROC of the heat map (each kind's defect pixels against every pixel "
            "outside a defect).</p>" + html_table(kinds)
            if not kinds.empty
            else ""
        )
    )


def calibration_kinds_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per synthetic kind: the chosen map's image AUROC, the heat map's pixel AUROC, and the
    paper's map's two, from the calibration table's per-kind columns (empty for a table
    written before the per-kind pixel AUROC)."""
    kinds = sorted(c.removeprefix("syn_pixel_auroc_") for c in table if c.startswith("syn_pixel_auroc_"))
    if not kinds or not table["is_selected"].any():
        return pd.DataFrame()
    chosen = table[table["is_selected"]].iloc[0]
    heat = table[table["is_localisation"]].iloc[0] if "is_localisation" in table else chosen
    paper = table[table["is_paper"]].iloc[0]
    return pd.DataFrame(
        {
            "kind": kinds,
            "image AUROC (chosen)": [chosen[f"syn_image_auroc_{k}"] for k in kinds],
            "pixel AUROC (heat map)": [heat[f"syn_pixel_auroc_{k}"] for k in kinds],
            "image AUROC (paper's map)": [paper[f"syn_image_auroc_{k}"] for k in kinds],
            "pixel AUROC (paper's map)": [paper[f"syn_pixel_auroc_{k}"] for k in kinds],
        }
    )
