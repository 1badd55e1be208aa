"""The API reference builds with warnings as errors, and the main losses carry examples (they
run as doctests: pytest.ini collects kd_jax/losses with --doctest-modules).

The site: `python -m sphinx -W --keep-going -b html docs docs/_build/html` (docs/conf.py).
"""
import doctest
import os
import subprocess
import sys

from kd_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Losses whose docstrings must carry a runnable example (the README's main table).
EXAMPLE_LOSSES = ("kd", "dkd", "dist", "fitnet", "at", "rkd", "crd", "pkt", "sp", "cka")


def test_sphinx_site_builds_without_warnings(tmp_path):
  out = tmp_path / "html"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "--no-color", "-b", "html",
       "-d", str(tmp_path / "doctrees"), os.path.join(ROOT, "docs"), str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"sphinx failed (rc={proc.returncode}):\n{output}"

  page = (out / "api" / "losses.html").read_text(encoding="utf-8")
  for name in ("kd_jax.losses.logits.kd", "kd_jax.losses.logits.dkd",
               "kd_jax.losses.features.fitnet", "kd_jax.losses.relations.rkd",
               "kd_jax.losses.registry.list_losses"):
    assert f'id="{name}"' in page, f"{name} is not documented in api/losses.html"
  for page_name in ("index", "design", "api/training", "api/regimes", "api/dataset_distill",
                    "api/sequence", "api/analysis", "api/models", "api/data",
                    "api/infrastructure"):
    assert (out / f"{page_name}.html").is_file(), page_name
  index = (out / "py-modindex.html").read_text(encoding="utf-8")
  for module in ("kd_jax.step", "kd_jax.distiller", "kd_jax.trainer", "kd_jax.sharding",
                 "kd_jax.dataset_distill"):
    assert f">{module}<" in index, f"{module} is missing from the module index"


def test_main_losses_have_docstring_examples():
  finder = doctest.DocTestFinder()
  missing = [name for name in EXAMPLE_LOSSES
             if not any(t.examples for t in finder.find(losses.get_loss(name).fn))]
  assert not missing, f"losses without a >>> example in their docstring: {missing}"
