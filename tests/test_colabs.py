"""The colabs run top to bottom on small settings, and each .ipynb matches its .py twin."""
import json
import os
import sys

import jupytext
import nbclient
import nbformat
import pytest
from ipykernel import kernelspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = ["quickstart_kd", "losses_in_your_project"]
KERNEL_NAME = "kd_jax_test"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec that runs this interpreter (`sys.executable`), first on JUPYTER_PATH."""
  prefix = tmp_path / "jupyter"
  kernelspec.install(kernel_name=KERNEL_NAME, prefix=str(prefix))
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  spec = json.loads((prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json").read_text())
  assert spec["argv"][0] == sys.executable
  return KERNEL_NAME


def _outputs_text(nb) -> str:
  texts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      texts.append(output.get("text", ""))
      texts.append(output.get("data", {}).get("text/plain", ""))
  return "\n".join(texts)


def _images(nb) -> int:
  return sum("image/png" in output.get("data", {})
             for cell in nb.cells for output in cell.get("outputs", []))


def test_quickstart_kd_runs_top_to_bottom(kernel_name, digits_data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  monkeypatch.setenv("KD_JAX_COLAB_SMALL", "1")
  monkeypatch.setenv("KD_JAX_COLAB_WORKDIR", str(workdir))
  monkeypatch.setenv("KD_JAX_COLAB_DATA_DIR", digits_data_dir)
  nb = nbformat.read(os.path.join(COLABS, "quickstart_kd.ipynb"), as_version=4)
  # Raises CellExecutionError, with the failing cell's traceback, if any cell fails.
  nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                          resources={"metadata": {"path": COLABS}}).execute()
  text = _outputs_text(nb)
  for stage in ("teacher", "student_baseline", "student_kd", "student_dkd"):
    assert stage in text
  assert "test acc" in text and "%" in text
  assert _images(nb) == 2  # learning curves and the accuracy bars
  assert os.path.exists(workdir / "results.json")
  assert os.path.exists(f"{workdir}_dkd/results.json")
  assert not os.path.exists(f"{workdir}_dkd/teacher/metrics.jsonl")  # teacher was restored


def test_losses_in_your_project_runs_top_to_bottom(kernel_name, monkeypatch):
  monkeypatch.setenv("KD_JAX_COLAB_SMALL", "1")
  nb = nbformat.read(os.path.join(COLABS, "losses_in_your_project.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                          resources={"metadata": {"path": COLABS}}).execute()
  text = _outputs_text(nb)
  assert "teacher test accuracy" in text
  for arm in ("CE only", "CE + KD", "CE + KD + FitNet"):
    assert f"{arm} " in text
  # Padding changes neither the token loss nor, at the padded tokens, its gradient.
  for divergence in ("forward_kl", "reverse_kl", "js"):
    line = next(l for l in text.splitlines() if l.startswith(divergence))
    loss, padded = (float(w.rstrip(";,")) for w in (line.split()[2], line.split()[6]))
    assert loss == padded and line.endswith("gradient at the padding: 0.0")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_py_twin_and_has_no_outputs(name):
  ipynb = jupytext.read(os.path.join(COLABS, f"{name}.ipynb"))
  py = jupytext.read(os.path.join(COLABS, f"{name}.py"))
  assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in py.cells]
  assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  for cell in ipynb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None
