"""Every notebook runs top to bottom (small settings via SAFESTEER_FAST=1) on the embedded model."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_steering_directions.ipynb", "02_safety_tokens.ipynb", "03_train_end_to_end.ipynb", "04_recipe_study.ipynb",
        "05_lookalike_study.ipynb",
    ]


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors(path, monkeypatch, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks without outputs"
    monkeypatch.setenv("SAFESTEER_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' run directories (GBs) go where pytest prunes
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    assert any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
