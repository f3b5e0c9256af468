"""The parameters of the current run, for building pipelines whose shape depends on them.

A Kedro pipeline's structure is fixed before its nodes see ``params:``. Two things here are
structural: the category (every pipeline runs in the Kedro namespace ``<data.category>``, so
its datasets come from one set of catalog factories) and the loss-study variants (one
namespace each). :class:`anomaly_ae.hooks.RunParamsHook` records ``context.params`` (the
merged configuration of the chosen ``--env`` plus ``--params``) as soon as the context
exists, before Kedro builds the pipelines, so ``--env`` and ``--params`` shape them as they
shape everything else. Outside a session (e.g. importing the registry in a script) the
parameters are read from ``conf/`` (``KEDRO_ENV`` honoured).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_CURRENT: dict[str, Any] | None = None
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def remember(params: dict[str, Any]) -> bool:
    """Record the run's parameters; True when they differ from the ones recorded before
    (the registry must then rebuild the pipelines)."""
    global _CURRENT
    changed = _CURRENT is None or _structure(params) != _structure(_CURRENT)
    _CURRENT = params
    return changed


def _structure(params: dict[str, Any]) -> tuple:
    categories = params.get("categories")
    return (
        params.get("data", {}).get("category"),
        params.get("data", {}).get("root"),
        tuple(categories) if isinstance(categories, list | tuple) else categories,
        tuple(params.get("loss_study", {}).get("variants", ())),
    )


def current() -> dict[str, Any]:
    """The run's parameters (see the module docstring)."""
    if _CURRENT is not None:
        return _CURRENT
    from kedro.config import OmegaConfigLoader
    from kedro.framework.project import settings

    root = project_root(Path.cwd())
    conf = root / settings.CONF_SOURCE
    if not conf.is_dir():
        raise FileNotFoundError(f"No Kedro configuration at {conf}: run inside the project.")
    loader = OmegaConfigLoader(
        str(conf), env=os.environ.get("KEDRO_ENV"), **{k: v for k, v in settings.CONFIG_LOADER_ARGS.items()}
    )
    return loader["parameters"]


def project_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` whose pyproject.toml has ``[tool.kedro]``
    (e.g. the project root for a notebook in ``notebooks/``); ``start`` if none."""
    for folder in (start, *start.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "[tool.kedro]" in pyproject.read_text(errors="replace"):
            return folder
    return start


def checked_name(value: Any, key: str) -> str:
    """A category or variant name usable as a Kedro namespace and a folder name."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{key}={value!r} cannot name a Kedro namespace and a data folder: use letters, digits, "
            "'_' or '-' only."
        )
    return value


def category() -> str:
    return checked_name(current()["data"]["category"], "data.category")


def categories() -> list[str]:
    """The categories of this run, each its own Kedro namespace: ``categories`` (a list; or
    ``a+b`` on the command line, where Kedro's ``--params`` splits on commas; or ``all`` =
    every folder under ``data.root`` that has ``train/good``), else ``[data.category]``."""
    params = current()
    value = params.get("categories")
    if value is None or value == "" or value == []:
        return [category()]
    if value == "all":
        root = Path(params["data"]["root"])
        found = (
            sorted(d.name for d in root.iterdir() if (d / "train" / "good").is_dir()) if root.is_dir() else []
        )
        if not found:
            raise ValueError(
                f"categories=all: no folder with train/good under data.root={root}. Point data.root at "
                "a folder of categories in the MVTec layout (<root>/<category>/train/good/...)."
            )
        return [checked_name(c, "categories[]") for c in found]
    if isinstance(value, str):
        value = [c for c in value.replace("+", " ").split() if c]
    names = [checked_name(c, "categories[]") for c in value]
    if len(set(names)) != len(names):
        raise ValueError(f"categories lists a category twice: {names}")
    return names


def loss_variants() -> list[str]:
    """``loss_study.variants``: a list in YAML, or ``mse+hybrid`` on the command line (where
    Kedro's ``--params`` splits on commas)."""
    variants = current()["loss_study"]["variants"]
    if isinstance(variants, str):
        variants = [v for v in variants.replace("+", " ").split() if v]
    if not variants:
        raise ValueError("loss_study.variants is empty: name at least one variant (e.g. hybrid)")
    return [checked_name(v, "loss_study.variants[]") for v in variants]
