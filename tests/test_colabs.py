"""The colabs run top to bottom on small settings, each .ipynb matches its .py twin, and every
notebook starts with the same setup cell (pip in Colab, this checkout elsewhere)."""
import ast
import json
import os
import subprocess
import sys
import types

import jupytext
import nbclient
import nbformat
import pytest
from ipykernel import kernelspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = ["quickstart_kd", "losses_in_your_project", "regimes", "analysis", "sequence",
             "dataset_distillation"]
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


# The kernels compile many small programs and run each a few steps: the suite's cheaper CPU code
# generation (conftest.py) roughly halves a SMALL notebook's time. One device, as in Colab (the
# forced device count is dropped).


def _execute(name: str, kernel_name: str, monkeypatch, workdir=None, data_dir=None):
  """Runs colabs/<name>.ipynb top to bottom with KD_JAX_COLAB_SMALL=1; returns the executed
  notebook. Raises CellExecutionError, with the failing cell's traceback, if any cell fails."""
  monkeypatch.setenv("KD_JAX_COLAB_SMALL", "1")
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      flag for flag in os.environ.get("XLA_FLAGS", "").split()
      if not flag.startswith("--xla_force_host_platform_device_count")))
  if workdir is not None:
    monkeypatch.setenv("KD_JAX_COLAB_WORKDIR", str(workdir))
  if data_dir is not None:
    monkeypatch.setenv("KD_JAX_COLAB_DATA_DIR", data_dir)
  nb = nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                          resources={"metadata": {"path": COLABS}}).execute()
  return nb


def _lines_after(text: str, header: str) -> list[str]:
  """The lines after the first line that starts with `header`, up to the next blank line."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  block = []
  for line in lines[start + 1:]:
    if not line.strip():
      break
    block.append(line)
  return block


def _percent(word: str) -> float:
  assert word.endswith("%"), word
  value = float(word[:-1])
  assert 0 <= value <= 100, word
  return value


def test_quickstart_kd_runs_top_to_bottom(kernel_name, digits_data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  nb = _execute("quickstart_kd", kernel_name, monkeypatch, workdir, digits_data_dir)
  text = _outputs_text(nb)
  for stage in ("teacher", "student_baseline", "student_kd", "student_dkd"):
    assert stage in text
  assert "test acc" in text and "%" in text
  assert _images(nb) == 2  # learning curves and the accuracy bars
  assert os.path.exists(workdir / "results.json")
  assert os.path.exists(f"{workdir}_dkd/results.json")
  assert not os.path.exists(f"{workdir}_dkd/teacher/metrics.jsonl")  # teacher was restored


def test_losses_in_your_project_runs_top_to_bottom(kernel_name, monkeypatch):
  nb = _execute("losses_in_your_project", kernel_name, monkeypatch)
  text = _outputs_text(nb)
  assert "teacher test accuracy" in text
  for arm in ("CE only", "CE + KD", "CE + KD + FitNet"):
    assert f"{arm} " in text
  # Padding changes neither the token loss nor, at the padded tokens, its gradient.
  for divergence in ("forward_kl", "reverse_kl", "js"):
    line = next(l for l in text.splitlines() if l.startswith(divergence))
    loss, padded = (float(w.rstrip(";,")) for w in (line.split()[2], line.split()[6]))
    assert loss == padded and line.endswith("gradient at the padding: 0.0")


def test_regimes_runs_top_to_bottom(kernel_name, digits_data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  nb = _execute("regimes", kernel_name, monkeypatch, workdir, digits_data_dir)
  text = _outputs_text(nb)
  # The results table: the baseline, then each regime's networks, each with a test accuracy.
  found = {}
  for line in _lines_after(text, "regime "):
    regime, stage, *_, accuracy = line.split()
    _percent(accuracy)
    found.setdefault(regime, []).append(stage)
  assert found == {
      "(none)": ["student_baseline"],
      "multi_teacher": ["teacher_cnn", "teacher_mlp", "student_multi_teacher"],
      "mutual": ["mutual/student", "mutual/peer"],
      "mean_teacher": ["student_labeled_only", "mean_teacher/student", "mean_teacher/teacher"]}
  fraction = next(l for l in text.splitlines() if l.startswith("mean_teacher, step 20: "))
  _percent(fraction.split()[3])
  assert _images(nb) == 1  # one figure, the three regimes' learning curves side by side
  for regime in ("multi_teacher", "mutual", "mean_teacher"):
    assert os.path.exists(workdir / regime / "results.json")
  # The student alone is trained once, in the first regime's run.
  assert os.path.exists(workdir / "multi_teacher" / "student_baseline" / "metrics.jsonl")
  assert not os.path.exists(workdir / "mutual" / "student_baseline")
  assert not os.path.exists(workdir / "mean_teacher" / "student_baseline")


def test_analysis_runs_top_to_bottom(kernel_name, digits_data_dir, tmp_path, monkeypatch):
  from kd_jax.analysis import diswot  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "work"
  nb = _execute("analysis", kernel_name, monkeypatch, workdir, digits_data_dir)
  text = _outputs_text(nb)
  job_accuracy = {line.split()[0]: line.split()[3]
                  for line in _lines_after(text, "stage ")[1:]}  # after the dashes
  assert set(job_accuracy) == {"teacher", "student_baseline", "student_kd"}
  # CKA of the logits, teacher against each student.
  for stage in ("student_baseline", "student_kd"):
    line = next(l for l in text.splitlines() if l.startswith(f"{stage}: CKA("))
    assert 0 <= float(line.split()[-1]) <= 1, line
  # The DisWOT ranking: SMALL's 3 candidates, best first, scores = -(distances) <= 0.
  ranking = _lines_after(text, "rank ")
  assert [int(line.split()[0]) for line in ranking] == [1, 2, 3]
  scores = [float(line.split()[-3]) for line in ranking]
  assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
  names = {str(diswot.Candidate.parse(spec)) for spec in diswot.DIGITS_STUDENTS[::2]}
  assert {line.split()[1] for line in ranking} == {n.split()[0] for n in names}
  # Calibration: each network's ECE in [0, 1]; its accuracy from `trainer.predict` is the job's.
  calibration = _lines_after(text, "network ")
  assert [line.split()[0] for line in calibration] == ["teacher", "student_baseline", "student_kd"]
  for line in calibration:
    stage, accuracy, confidence, ece = line.split()
    assert accuracy == job_accuracy[stage]
    _percent(confidence)
    assert 0 <= float(ece) <= 1
  assert _images(nb) == 3  # CKA heatmaps, DisWOT scores, reliability diagrams


def test_sequence_runs_top_to_bottom(kernel_name, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  nb = _execute("sequence", kernel_name, monkeypatch, workdir)
  text = _outputs_text(nb)
  rows = _lines_after(text, "stage ")[1:]  # after the dashes
  assert [line.split()[0] for line in rows] == ["teacher", "student_alone", "student_token_kd"]
  for line in rows:
    bpc = float(line.split()[-1])
    assert 0 < bpc < 10, line  # random guessing over 98 characters: log2(98) = 6.6 bits
  # The job's one sample per network, then the notebook's batched samples (printed with repr).
  for stage in ("teacher", "student_alone", "student_token_kd"):
    assert _lines_after(text, f"--- {stage} ---")[0].startswith("def ")
  samples = [ast.literal_eval(line) for line in text.splitlines() if line.startswith("'def ")
             or line.startswith('"def ')]
  assert len(samples) == 6  # 3 from the teacher, 3 from the KD student
  assert all(s.startswith("def ") and len(s) == 64 for s in samples)
  assert _images(nb) == 1  # the training curves
  assert os.path.exists(workdir / "results.json")


def _setup_cells(name: str):
  """The markdown and code cells of the notebook's "## Setup" section."""
  cells = jupytext.read(os.path.join(COLABS, f"{name}.py")).cells
  i = next(i for i, c in enumerate(cells) if c.source.startswith("## Setup"))
  assert cells[i + 1].cell_type == "code"
  return cells[i].source, cells[i + 1].source


def test_setup_cell_is_the_same_in_every_notebook():
  first = _setup_cells(NOTEBOOKS[0])
  for name in NOTEBOOKS[1:]:
    assert _setup_cells(name) == first, name
  for name in os.listdir(COLABS):  # no placeholder repository to clone
    text = open(os.path.join(COLABS, name), encoding="utf-8").read()
    assert "github.com" not in text and "git clone" not in text and "KD_JAX_REPO" not in text


@pytest.mark.parametrize("kd_jax_path", ["", "/content/drive/MyDrive/kd_jax"])
def test_setup_cell_in_colab_installs_from_pypi_or_the_given_checkout(kd_jax_path, monkeypatch):
  """In Colab: `pip install kd_jax`, or an editable install of KD_JAX_PATH; nothing is cloned."""
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(args))
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.setenv("KD_JAX_PATH", kd_jax_path)
  namespace = {}
  exec(_setup_cells(NOTEBOOKS[0])[1], namespace)  # pylint: disable=exec-used
  target = ["-e", kd_jax_path] if kd_jax_path else ["kd_jax"]
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", *target]]
  assert namespace["REPO_DIR"] == kd_jax_path and not namespace["HAVE_CONFIGS"]
  assert (sys.path[0] == kd_jax_path) == bool(kd_jax_path)


def test_setup_cell_elsewhere_uses_this_checkout(monkeypatch):
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(args))
  monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(COLABS)
  namespace = {}
  exec(_setup_cells(NOTEBOOKS[0])[1], namespace)  # pylint: disable=exec-used
  assert calls == [] and namespace["REPO_DIR"] == ROOT and namespace["HAVE_CONFIGS"]
  assert sys.path[0] == ROOT


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_py_twin_and_has_no_outputs(name):
  ipynb = jupytext.read(os.path.join(COLABS, f"{name}.ipynb"))
  py = jupytext.read(os.path.join(COLABS, f"{name}.py"))
  assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in py.cells]
  assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  for cell in ipynb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None


def _stdout(nb) -> str:
  """Everything the cells printed, in order. The kernel sends a print in chunks (`_outputs_text`
  may split a line at a chunk's end), so the chunks are joined as they came."""
  return "".join(output.get("text", "") for cell in nb.cells for output in cell.get("outputs", [])
                 if output.get("name") == "stdout")


def test_dataset_distillation_runs_top_to_bottom(kernel_name, digits_data_dir, tmp_path,
                                                 monkeypatch):
  workdir = tmp_path / "work"
  nb = _execute("dataset_distillation", kernel_name, monkeypatch, workdir, digits_data_dir)
  text = _stdout(nb)
  # Trajectory matching at IPC 1 and 10, with the job's own summary of each.
  for ipc, images in ((1, 10), (10, 100)):
    assert f"mtt at IPC {ipc}: {images} training images" in text
  table = _lines_after(text, " IPC ")
  assert [int(line.split()[0]) for line in table] == [1, 10]
  for line in table:  # distilled (learned α), distilled (lr 0.01), random real: mean ± std
    means = line.split()[1::3]
    assert len(means) == 3 and all(0 <= float(m) <= 100 for m in means), line
  # The same job with method=dm, evaluated under both label protocols.
  dm = _lines_after(text, "dm at IPC 10: 100 training images")
  dm = dm[:next(i for i, line in enumerate(dm + [""]) if not line.startswith("  "))]
  assert [line.split(":")[0].strip() for line in dm] == [
      "teacher", "[labels]  distilled, fixed lr", "[labels]  random real subset",
      "[teacher soft labels]  distilled", "[teacher soft labels]  random real subset"]
  for line in dm:
    assert 0 <= float(line.split(":")[1].split()[0]) <= 100, line
  # TESLA's error against the exact gradient grows with α·N (SMALL: 3 α × N in {2, 5}).
  gap = [tuple(map(float, line.split()[:4])) for line in _lines_after(text, " alpha   N")]
  assert len(gap) == 6
  for alpha, n, alpha_n, error in gap:
    assert alpha_n == pytest.approx(alpha * n, abs=1e-3) and 0 < error < 1
  for n in (2, 5):
    errors = [error for _, steps, _, error in gap if steps == n]
    assert errors == sorted(errors) and errors[-1] > 3 * errors[0], (n, errors)
  slope = float(next(l for l in text.splitlines() if l.startswith("log-log slope")).split()[-1])
  assert slope > 0.5
  # Exact equals unrolled autodiff; TESLA does not.
  exact = next(l for l in text.splitlines() if "max |g_exact - g_unrolled|" in l)
  tesla = next(l for l in text.splitlines() if "relative error of TESLA against unrolled" in l)
  assert float(exact.split()[-1]) < 1e-3 and float(tesla.split()[-1]) > 1e-2, (exact, tesla)
  assert _images(nb) == 3  # the synthetic images, accuracy against IPC, the gradient gap
  for run in ("mtt_ipc1", "mtt_ipc10", "dm_ipc10"):
    assert os.path.exists(workdir / run / "results.json")
    assert os.path.exists(workdir / run / "distilled.npz")
  # One expert buffer for both IPCs, and none for DM.
  assert os.path.exists(workdir / "experts")
  assert not any(os.path.exists(workdir / run / "experts")
                 for run in ("mtt_ipc1", "mtt_ipc10", "dm_ipc10"))
