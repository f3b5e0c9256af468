"""Several categories in one run (issue 15): the ``categories`` parameter, one namespace and
one nested MLflow run per category, the summary table, two kinds of synthetic product."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_project
from PIL import Image

from anomaly_ae import run_params
from anomaly_ae.data.synthetic import SYNTHETIC_KINDS, generate_synthetic_category


@pytest.fixture
def params(monkeypatch):
    def use(**values):
        base = {"data": {"category": "bottle", "root": "nowhere"}, "loss_study": {"variants": ["hybrid"]}}
        base.update(values)
        monkeypatch.setattr(run_params, "_CURRENT", base)

    return use


def test_categories_from_a_list_a_command_line_or_all(params, tmp_path):
    params()
    assert run_params.categories() == ["bottle"]  # null: data.category alone
    params(categories=["screw", "carpet"])
    assert run_params.categories() == ["screw", "carpet"]
    params(categories="screw+carpet")  # --params categories=screw+carpet
    assert run_params.categories() == ["screw", "carpet"]
    for name in ("b_thing", "a-thing"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "not_a_category").mkdir()
    params(categories="all", data={"category": "bottle", "root": str(tmp_path)})
    assert run_params.categories() == ["a-thing", "b_thing"]


@pytest.mark.parametrize(
    "value, message",
    [("all", "no folder with train/good"), (["a", "a"], "twice"), (["a.b"], "cannot name a Kedro namespace")],
)
def test_bad_categories_are_refused(params, tmp_path, value, message):
    params(categories=value, data={"category": "bottle", "root": str(tmp_path)})
    with pytest.raises(ValueError, match=message):
        run_params.categories()


def test_the_synthetic_generator_makes_an_object_and_a_texture(tmp_path):
    obj = generate_synthetic_category(
        tmp_path / "bottle", n_train=2, n_test_good=1, n_test_per_defect=1, size=64
    )
    tex = generate_synthetic_category(
        tmp_path / "carpet", n_train=2, n_test_good=1, n_test_per_defect=1, size=64, kind="texture"
    )
    assert sorted(p.name for p in (tex / "test").iterdir()) == ["cut", "good", "hole"]
    assert sorted(p.name for p in (obj / "test").iterdir()) == ["contamination", "good", "missing_rim"]
    with Image.open(tex / "train/good/000.png") as texture, Image.open(obj / "train/good/000.png") as colour:
        assert texture.mode == "L" and colour.mode == "RGB"
    for defect in SYNTHETIC_KINDS["texture"][1]:
        with Image.open(tex / "ground_truth" / defect / "000_mask.png") as mask:
            assert 0 < (np.asarray(mask) > 0).mean() < 0.2
    with pytest.raises(ValueError, match="kind"):
        generate_synthetic_category(tmp_path / "x", kind="liquid")


@pytest.mark.slow
def test_two_categories_in_one_run_each_with_its_own_outputs_runs_and_a_summary(tmp_path):
    import mlflow

    project = make_project(tmp_path / "project")
    project.session_run(
        env="quick", params={"categories": ["bottle", "carpet"], "training": {"progress": False}}
    )
    for category in ("bottle", "carpet"):
        metrics = project.latest(f"data/08_reporting/{category}/evaluation_metrics.json")
        assert metrics.is_file()
        assert project.latest(f"data/06_models/{category}/model_checkpoint.pt").is_file()
    summary = pd.read_csv(project.latest("data/08_reporting/summary/summary_table.csv"))
    assert list(summary["category"]) == ["bottle", "carpet", "mean"]
    assert summary.loc[2, "image_auroc"] == pytest.approx(summary.loc[:1, "image_auroc"].mean())
    assert summary.loc[:1, ["image_auroc_at_defect", "image_auroc_off_defect"]].notna().all().all()
    assert (summary.loc[:1, "epochs"] == 20).all() and (summary.loc[:1, "train_images"] == 36).all()
    # the false-alarm rate each threshold promises (its validation images: 4 of 40), and the one seen
    promised = summary.loc[:1, "false_alarm_rate_expected_high"]
    assert promised.between(1 / 5, 1).all() and summary.loc[:1, "false_alarm_rate_at_threshold"].notna().all()
    markdown = project.latest("data/08_reporting/summary/summary.md").read_text()
    assert markdown.startswith("| category") and "| carpet" in markdown
    # which kinds each model misses: one row per category and the mean, a column per kind
    held_out = markdown.split("image AUROC per kind:")[1]
    assert "| category " in held_out and " spot |" in held_out and " smudge |" in held_out
    assert [line.split("|")[1].strip() for line in held_out.strip().splitlines()[2:]] == [
        "bottle",
        "carpet",
        "mean",
    ]
    page = project.latest("data/08_reporting/summary/summary.html").read_text()
    assert "Which kinds of defect each model misses" in page

    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (top,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {
        r.data.tags.get("category"): r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == top.info.run_id
    }
    assert set(children) == {"bottle", "carpet"}
    for run in children.values():
        assert run.info.status == "FINISHED" and "image_auroc" in run.data.metrics
        assert {"image_auroc_at_defect", "image_auroc_off_defect"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(top.info.run_id)] == ["summary"]


def test_the_held_out_kinds_of_each_category_and_their_mean():
    from anomaly_ae.evaluation.categories import held_out_table
    from anomaly_ae.evaluation.stress import STRESS_COLUMNS

    def stress(spot: float, smudge: float) -> pd.DataFrame:
        rows = [
            ("in use", "all", "all", "all", 0.9),
            ("in use", "spot", "all", "all", spot),
            ("in use", "smudge", "all", "all", smudge),
            ("in use", "spot", "< 0.10", "all", 0.1),  # a contrast band: not the kind's figure
            ("paper", "spot", "all", "all", 0.5),  # the paper's map: not the one in use
        ]
        return pd.DataFrame(
            [dict(zip(["map", "kind", "contrast", "size", "image_auroc"], r, strict=True)) for r in rows]
        )

    table = held_out_table(
        {"a": stress(0.8, 0.6), "b": stress(1.0, 0.7), "none": pd.DataFrame(columns=STRESS_COLUMNS)}
    )
    assert list(table.columns) == ["category", "all", "smudge", "spot"]
    assert list(table["category"]) == ["a", "b", "none", "mean"]
    assert table.loc[0, ["spot", "smudge"]].tolist() == [0.8, 0.6]
    assert table.loc[2, ["all", "spot"]].isna().all()  # no stress test there: an empty row
    assert table.loc[3, ["spot", "smudge"]].tolist() == pytest.approx([0.9, 0.65])  # over a and b
