"""Every notebook executes top to bottom (on a copy; the saved outputs are left alone)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook execution needs the 'demo' extra")
nbclient = pytest.importorskip("nbclient", reason="notebook execution needs the 'demo' extra")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel gets one CPU device, like a user
    monkeypatch.setenv("JAXALIGN_NOTEBOOK_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" for o in outputs), "expected at least one plot"
