"""examples/: the walkthrough notebook runs from top to bottom (so it cannot rot)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from collabvit.data import FASHION_MNIST_ROOT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # a Jupyter kernel and the whole walkthrough; CI runs it (make test-all)
def test_walkthrough_notebook_executes():
    if not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST is not installed here (make data)")
    notebook = nbformat.read(EXAMPLES / "walkthrough.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}})  # fmt: skip
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "server on" in text and "communication cost" in text
