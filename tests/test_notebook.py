"""notebooks/results.ipynb runs headless (nbclient, an ipykernel kernel) on the quick project's
outputs: every cell executes, none errors, and nothing warns (no warning or traceback on
stderr, no WARNING/ERROR log record).

The kernel imports the project's package and Kedro's IPython extension, so this also checks
what a user sees in Jupyter: warnings raised in the kernel reach the notebook as Kedro's rich
log records (display data) or as stderr streams.
"""

from __future__ import annotations

import importlib.util
import re
import shutil

import pytest
from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "results.ipynb"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b\]8;[^\x1b]*\x1b\\")
#: A Kedro rich log record at WARNING or above: "[12/01/26 04:32:27] WARNING  message ..."
_LOG_RECORD = re.compile(r"^(\[[^\]]*\])?\s*(WARNING|ERROR|CRITICAL)\s", re.MULTILINE)
_PROBLEM = re.compile(r"\w*Warning:|Traceback \(most recent call last\)|\bERROR\b")


def _allowed(text: str) -> bool:
    """Warnings a notebook user would only see because of the *test* environment."""
    # tqdm.auto (the project's trainer, MLflow) picks notebook progress bars in a kernel, which
    # need ipywidgets: in the `notebook` extra, not in the `test` extra the tests run with.
    return "IProgress not found" in text and importlib.util.find_spec("ipywidgets") is None


def notebook_problems(notebook) -> list[str]:
    """Error outputs, stderr streams with warnings/tracebacks, and WARNING+ log records."""
    problems = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        source = cell.source.splitlines()[0] if cell.source else ""
        for output in cell.get("outputs", []):
            kind = output.output_type
            if kind == "error":
                problems.append(f"cell {index} ({source}): {output.ename}: {output.evalue}")
                continue
            if kind == "stream":
                text = _ANSI.sub("", output.text)
                bad = output.name == "stderr" and _PROBLEM.search(text)
            else:  # display_data / execute_result: Kedro's log records are rich renderables
                text = _ANSI.sub("", output.get("data", {}).get("text/plain", ""))
                bad = _LOG_RECORD.search(text) or "Traceback (most recent call last)" in text
            if bad and not _allowed(text):
                problems.append(f"cell {index} ({source}), {kind}: {text.strip()[:800]}")
    return problems


@pytest.mark.slow
def test_results_notebook_runs_without_errors_or_warnings(quick, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    folder = quick.path / "notebooks"
    folder.mkdir(exist_ok=True)
    shutil.copy2(NOTEBOOK, folder / NOTEBOOK.name)
    notebook = nbformat.read(folder / NOTEBOOK.name, as_version=4)
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")  # the kernel inherits the environment
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",  # ipykernel's own spec: this interpreter
        allow_errors=True,  # run every cell, report all problems at once
        resources={"metadata": {"path": str(folder)}},  # the kernel's working directory
    )
    client.execute()
    nbformat.write(notebook, tmp_path / "results.executed.ipynb")  # for a look when it fails

    assert notebook_problems(notebook) == []
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "a cell did not run"
    produced = [output for cell in code for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in produced), "no Figure 1"
    texts = " ".join(output.get("data", {}).get("text/plain", "") for output in produced)
    assert "image_auroc" in texts and "paper protocol" in texts


def test_notebook_is_stored_without_outputs():
    """The committed notebook carries no outputs (no results or images from anyone's run)."""
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
