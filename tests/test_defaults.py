"""One home for defaults: ``conf/base``. Where library code must have a default, it equals conf."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml
from conftest import REPO_ROOT

from anomaly_ae.inspect import Inspector
from anomaly_ae.model import AutoencoderConfig, HybridLoss, config_for_images
from anomaly_ae.scoring import MapSettings
from anomaly_ae.training.trainer import TrainingConfig

CONF = REPO_ROOT / "conf" / "base"

#: Library defaults that deliberately differ from conf, and why. Nothing else may differ.
DIFFERENT_ON_PURPOSE = {
    ("training", "state_dir"): "a library call writes no crash-safe state file unless asked",
}


def _params(name: str) -> dict:
    return yaml.safe_load((CONF / f"parameters_{name}.yml").read_text())


def _paper_sized(model: dict) -> dict:
    """conf's model for the paper's 256x256 images: ``auto`` sizes made concrete by the one
    rule the nodes use (conf says ``auto``, the code's defaults are the paper's network)."""
    concrete = config_for_images(model, (256, 256))
    return {**model, "image_size": concrete.image_size, "tile_size": concrete.tile_size}


def _dataclass_defaults(cls) -> dict:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


CASES = [
    ("training", lambda: _params("training")["training"], lambda: _dataclass_defaults(TrainingConfig)),
    ("loss", lambda: _params("training")["loss"], lambda: _dataclass_defaults(TrainingConfig)),
    (
        "model",
        lambda: _paper_sized(_params("training")["model"]),
        lambda: _dataclass_defaults(AutoencoderConfig),
    ),
    (
        "evaluation.anomaly_map",
        lambda: _params("evaluation")["evaluation"]["anomaly_map"],
        lambda: _dataclass_defaults(MapSettings),
    ),
    (
        "predict",
        lambda: _params("predict")["predict"],
        lambda: {
            k: p.default
            for k, p in inspect.signature(Inspector.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        },
    ),
]


@pytest.mark.parametrize(("section", "conf", "code"), CASES, ids=[c[0] for c in CASES])
def test_code_defaults_equal_conf_base(section, conf, code):
    conf_values, code_values = conf(), code()
    shared = sorted(set(conf_values) & set(code_values))
    assert shared, f"no shared keys between conf {section} and the code defaults"
    mismatches = {
        key: (conf_values[key], _normalise(code_values[key]))
        for key in shared
        if conf_values[key] != _normalise(code_values[key]) and (section, key) not in DIFFERENT_ON_PURPOSE
    }
    assert not mismatches, f"{section}: conf value vs code default differ: {mismatches}"


def test_hybrid_loss_defaults_are_the_papers_weights():
    loss = _params("training")["loss"]
    default = HybridLoss()
    assert (default.mse_weight, default.ssim_weight) == (loss["mse_weight"], loss["ssim_weight"])


@pytest.fixture(autouse=True)
def _keep_run_params():
    """These tests record parameters of their own; put back what a session recorded."""
    from anomaly_ae import run_params

    previous = run_params._CURRENT
    yield
    run_params._CURRENT = previous


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["mse", "ssim", "hybrid"], ["mse", "ssim", "hybrid"]),
        ("mse+hybrid", ["mse", "hybrid"]),
        ("ssim", ["ssim"]),
    ],
)
def test_loss_variants_from_yaml_or_the_command_line(value, expected):
    from anomaly_ae import run_params

    run_params.remember({"data": {"category": "bottle"}, "loss_study": {"variants": value}})
    assert run_params.loss_variants() == expected


@pytest.mark.parametrize("bad", [["a.b"], "", ["ok", "no/slash"]])
def test_bad_variant_or_category_names_are_refused_with_the_key(bad):
    from anomaly_ae import run_params

    run_params.remember({"data": {"category": "bottle"}, "loss_study": {"variants": bad}})
    with pytest.raises(ValueError, match="loss_study.variants"):
        run_params.loss_variants()
    run_params.remember({"data": {"category": "has.dot"}, "loss_study": {"variants": ["mse"]}})
    with pytest.raises(ValueError, match="data.category"):
        run_params.category()


def _base_params() -> dict:
    from kedro.config import OmegaConfigLoader

    return OmegaConfigLoader(str(REPO_ROOT / "conf"), base_env="base", default_run_env="base")["parameters"]


def test_shipped_parameters_are_valid():
    from anomaly_ae.param_schema import validate_parameters

    validate_parameters(_base_params())  # raises on any invalid value


@pytest.mark.parametrize(
    ("env", "lever", "values", "size", "changed"),
    [
        # the shift tolerance: every setting once more, aligned within 1 px
        ("tolerant", "shift_tolerance", [0, 1], 3024, 1512),
        # the blob score: a fourth score reduction
        ("blob", "score_reduction", ["max", "topk_mean", "mean", "blob"], 2016, 504),
        # SSIM's contrast constant: every setting with 1 - SSIM once more with C2 = 0.01^2 (the
        # 168 squared-error-only settings have no SSIM)
        ("k2", "ssim_k2", [0.03, 0.01], 2856, 1344),
        # the memory channel: every zscore / tail setting once more with it
        ("memory", "memory_pool", [0, 4], 2808, 1296),
    ],
)
def test_an_env_adds_only_its_lever_to_the_grid(env, lever, values, size, changed):
    """``kedro run --env <env>``: conf/base's grid (1512 settings) with one lever widened by
    one value (``changed`` settings have it), every other lever and parameter as in conf/base."""
    from kedro.config import OmegaConfigLoader

    from anomaly_ae.evaluation.calibration import build_grid
    from anomaly_ae.param_schema import validate_parameters
    from anomaly_ae.scoring import MapSettings
    from anomaly_ae.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(str(REPO_ROOT / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": env})
    params, base = loader["parameters"], _base_params()
    validate_parameters(params)
    paper = MapSettings()
    assert base["calibration"]["grid"][lever] != values
    assert params["calibration"]["grid"] == {**base["calibration"]["grid"], lever: values}
    assert {k: v for k, v in params.items() if k != "calibration"} == {
        k: v for k, v in base.items() if k != "calibration"
    }
    assert len(build_grid(base["calibration"]["grid"], paper, 1.0)) == 1512
    grid = build_grid(params["calibration"]["grid"], paper, 1.0)
    assert len(grid) == size
    assert sum(getattr(p.settings, lever) == values[-1] for p in grid) == changed


def test_the_faint_env_changes_only_the_synthesisers_strength():
    """``kedro run --env faint``: conf/base with every synthetic defect's change scaled by
    0.1-1 (``opacity``) and the redraw floor at 0.02; the grid and everything else as in conf/base."""
    from kedro.config import OmegaConfigLoader

    from anomaly_ae.param_schema import validate_parameters
    from anomaly_ae.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(str(REPO_ROOT / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": "faint"})
    params, base = loader["parameters"], _base_params()
    validate_parameters(params)
    faint, plain = params["calibration"]["synthetic_defects"], base["calibration"]["synthetic_defects"]
    assert plain["opacity"] == [1.0, 1.0] and plain["min_contrast"] == 0.05
    assert faint == {**plain, "opacity": [0.1, 1.0], "min_contrast": 0.02}
    assert {k: v for k, v in params["calibration"].items() if k != "synthetic_defects"} == {
        k: v for k, v in base["calibration"].items() if k != "synthetic_defects"
    }
    assert {k: v for k, v in params.items() if k != "calibration"} == {
        k: v for k, v in base.items() if k != "calibration"
    }


@pytest.mark.parametrize(
    ("group", "key", "value", "expected"),
    [
        ("training", "epochs", "abc", "training.epochs='abc': Input should be a valid integer"),
        ("training", "epochs", 1.5, "training.epochs=1.5: Input should be a valid integer"),
        ("training", "batch_size", 1, "training.batch_size must be >= 2"),
        ("predict", "batch_size", 0, "predict.batch_size must be >= 1"),
        ("model", "dropout", "x", "model.dropout='x'"),
        ("training", "epoch", 3, "training: unknown key(s) ['epoch']"),
        ("calibration", "batch_size", 0, "calibration.batch_size must be >= 1"),
    ],
)
def test_a_bad_parameter_is_refused_naming_its_key(group, key, value, expected):
    from anomaly_ae.param_schema import ParameterError, validate_parameters

    params = _base_params()
    params[group][key] = value
    with pytest.raises(ParameterError, match="Invalid parameters") as info:
        validate_parameters(params)
    assert expected in str(info.value)
    assert "--params" in str(info.value)


@pytest.mark.parametrize("key", ["contrast", "opacity"])
def test_a_bad_synthesiser_range_is_refused_naming_its_key(key):
    from anomaly_ae.param_schema import ParameterError, validate_parameters

    params = _base_params()
    params["calibration"]["synthetic_defects"][key] = [0.5, 0.2]
    with pytest.raises(ParameterError, match=f"calibration.synthetic_defects.{key} must be"):
        validate_parameters(params)


def test_the_map_settings_are_checked_too():
    from anomaly_ae.param_schema import ParameterError, validate_parameters

    params = _base_params()
    params["evaluation"]["anomaly_map"]["win_size"] = 10
    with pytest.raises(ParameterError, match="window size must be a positive odd integer"):
        validate_parameters(params)
