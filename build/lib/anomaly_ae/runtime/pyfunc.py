"""The inspection bundle as an MLflow pyfunc model, for ``mlflow models serve``.

    from anomaly_ae.runtime.pyfunc import log_bundle_model
    with mlflow.start_run():
        info = log_bundle_model("data/06_models/bottle/inspection_bundle/<version>/inspection_bundle")
    # mlflow models serve -m runs:/<run_id>/inspection_model --env-manager local -p 5001

The served model answers ``POST /invocations`` with one row per image::

    {"dataframe_records": [{"name": "part_001.png", "image": "<base64 of the file bytes>"}],
     "params": {"false_alarm_rate": 0.01}}
    -> {"predictions": [{"name": "part_001.png", "score": 0.0123, "is_anomalous": false,
                         "threshold": 0.0151, "error": null, "width": 900, "height": 900}]}

``image`` is the base64 of an image FILE (PNG, JPEG, BMP, TIFF ...), decoded and
preprocessed exactly as :class:`anomaly_ae.runtime.Bundle` does (the same code); ``name`` is
optional. Params ``threshold`` or ``false_alarm_rate`` (one of them) replace the calibrated
threshold. Junk (not base64, not an image, too large or small) gets a row with ``error`` set
and null score, never a failed request.

Torch- and Kedro-free like the rest of :mod:`anomaly_ae.runtime` (this module imports MLflow
and pandas, which the runtime proper does not need: ``anomaly_ae.runtime`` does not import it).
:func:`log_bundle_model` packages the ``anomaly_ae`` source tree with the model
(``code_paths``): the served model runs the code it was logged with, whatever is installed.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from anomaly_ae.runtime.bundle import Verdict, load_bundle

__all__ = ["BundleModel", "decode_image", "log_bundle_model", "model_signature", "OUTPUT_COLUMNS"]

log = logging.getLogger(__name__)

#: The columns of a prediction, in order.
OUTPUT_COLUMNS = ("name", "score", "is_anomalous", "threshold", "error", "width", "height")
ARTIFACT_KEY = "bundle"


def decode_image(value: Any) -> bytes:
    """The file bytes of one ``image`` cell: a base64 string (a ``data:...;base64,`` prefix
    is allowed), or bytes as they are. Raises ValueError for anything else."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"image is not valid base64 ({exc})") from None
    elif value is None or (isinstance(value, float) and value != value):
        raise ValueError("no image (null)")
    else:
        raise ValueError(f"image must be a base64 string, got {type(value).__name__}")
    if not data:
        raise ValueError("empty file (0 bytes)")
    return data


def _opener(data: bytes):
    def open_image():
        from PIL import Image

        return Image.open(io.BytesIO(data))  # the header only; prepare() checks sizes first

    return open_image


class BundleModel(PythonModel):
    """Serves an inspection bundle (artifact ``bundle``): base64 image files in, verdicts out."""

    def load_context(self, context) -> None:
        config = getattr(context, "model_config", None) or {}
        threads = config.get("threads") or os.environ.get("ANOMALY_AE_THREADS") or None
        self.bundle = load_bundle(context.artifacts[ARTIFACT_KEY], threads=int(threads) if threads else None)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise _bad_request(
                f"the input needs a column 'image' (base64 of the image file); got {list(frame.columns)}"
            )
        params = params or {}
        threshold, rate = params.get("threshold"), params.get("false_alarm_rate")
        try:
            limit = self.bundle.resolve_threshold(
                None if threshold is None else float(threshold), None if rate is None else float(rate)
            )
        except (TypeError, ValueError) as exc:
            raise _bad_request(f"params: {exc}") from exc
        names = frame["name"].tolist() if "name" in frame.columns else [None] * len(frame)
        verdicts: list[Verdict | None] = [None] * len(frame)
        items = []
        for i, (name, value) in enumerate(zip(names, frame["image"].tolist(), strict=True)):
            name = f"<image {i}>" if name is None or name != name else str(name)
            try:
                items.append((i, name, _opener(decode_image(value))))
            except ValueError as exc:
                verdicts[i] = Verdict(file=name, error=f"ValueError: {exc}")
        judged = self.bundle.iter_inspect(((name, source) for _, name, source in items), limit)
        for (i, _, _), verdict in zip(items, judged, strict=True):
            verdicts[i] = verdict
        rows = [{**v.row(), "name": v.file, "threshold": limit} for v in verdicts]
        # object columns: a missing score stays None (JSON null), not NaN
        return pd.DataFrame(
            {column: pd.Series([r[column] for r in rows], dtype=object) for column in OUTPUT_COLUMNS}
        )


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400 when served


def model_signature():
    """Input ``image`` (base64 string) and optional ``name``; params ``threshold`` and
    ``false_alarm_rate`` (default: the calibrated threshold); the output columns."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "name", required=False)]),
        outputs=Schema(
            [
                ColSpec("string", "name"),
                ColSpec("double", "score", required=False),
                ColSpec("boolean", "is_anomalous", required=False),
                ColSpec("double", "threshold"),
                ColSpec("string", "error", required=False),
                ColSpec("long", "width", required=False),
                ColSpec("long", "height", required=False),
            ]
        ),
        params=ParamSchema(
            [ParamSpec("threshold", "double", None), ParamSpec("false_alarm_rate", "double", None)]
        ),
    )


def _example_image() -> str:
    """A small mid-grey PNG, base64: the logged input example."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


#: The model's code file (``mlflow.pyfunc.log_model(python_model=<file>)``): no pickled object.
MODEL_CODE = """\
# The served inspection bundle (MLflow models from code): see anomaly_ae.runtime.pyfunc.
from mlflow.models import set_model

from anomaly_ae.runtime.pyfunc import BundleModel

set_model(BundleModel())
"""


def pip_requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was logged with."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "onnxruntime", "numpy", "pillow", "pandas")]


def log_bundle_model(
    bundle_dir: str | os.PathLike,
    name: str = "inspection_model",
    *,
    threads: int | None = None,
    package_code: bool = True,
    **kwargs: Any,
):
    """Log the bundle folder ``bundle_dir`` to the ACTIVE MLflow run (one is started when
    none is, as MLflow does) as a pyfunc model ``name``; returns MLflow's ``ModelInfo``.

    Serve it with ``mlflow models serve -m runs:/<run_id>/<name> --env-manager local``.
    ``threads``: onnxruntime intra-op threads of the served model (default: all cores, or
    the ``ANOMALY_AE_THREADS`` environment variable of the server). ``package_code``: ship
    the ``anomaly_ae`` source tree with the model (``code_paths``; about 0.7 MB), so the
    served model runs this code, not whatever ``anomaly_ae`` is installed at serve time, and
    works where it is not installed at all. ``kwargs`` go to ``mlflow.pyfunc.log_model``
    (``registered_model_name``, ``tags`` ...).
    """
    bundle_dir = Path(bundle_dir)
    load_bundle(bundle_dir)  # refuse an incomplete or altered bundle before logging it
    with tempfile.TemporaryDirectory(prefix="anomaly_ae_pyfunc_") as staging:
        code_paths = None
        if package_code:
            import anomaly_ae

            source = Path(anomaly_ae.__file__).parent
            target = Path(staging) / "anomaly_ae"
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code_paths = [str(target)]
        # models from code (MLflow 3's way; no pickle): a two-line script naming BundleModel
        entry = Path(staging) / "inspection_model.py"
        entry.write_text(MODEL_CODE)
        options: dict[str, Any] = {
            "name": name,
            "python_model": str(entry),
            "artifacts": {ARTIFACT_KEY: str(bundle_dir)},
            "code_paths": code_paths,
            "pip_requirements": pip_requirements(),
            "signature": model_signature(),
            "input_example": pd.DataFrame({"image": [_example_image()], "name": ["example.png"]}),
        }
        if threads:
            options["model_config"] = {"threads": int(threads)}
        options.update(kwargs)
        info = mlflow.pyfunc.log_model(**options)
    log.info("Logged the inspection bundle as MLflow model %s (run %s)", info.model_uri, info.run_id)
    return info
