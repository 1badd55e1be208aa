"""Sphinx configuration for the kd_jax API reference.

Build (warnings are errors, as in CI's tests/test_docs.py):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import importlib
import os
import pkgutil
import re
import sys

# The docs import kd_jax from the checkout, installed or not; jax stays on the CPU.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kd_jax  # noqa: E402  (after the path and environment are set)

project = "kd_jax"
author = "kd_jax authors"
copyright = "kd_jax authors"  # pylint: disable=redefined-builtin
release = version = kd_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",  # docs/design.md
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False
# Docstrings write shapes and names in single backticks (`[B, C]`, `mask`): show them as code.
default_role = "code"

# --- autodoc / napoleon ---
autodoc_default_options = {
    "members": True,           # public names defined in the module (not re-exports)
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True   # function defaults as written in the source
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# --- myst (docs/design.md only) ---
myst_heading_anchors = 3

# --- html ---
html_theme = "alabaster"
html_title = f"kd_jax {release}"
html_static_path = []


def _submodules(package: str) -> list[str]:
  """The package's modules, sorted; private ones (leading underscore) left out."""
  pkg = importlib.import_module(package)
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__, package + ".")
                if not m.name.rsplit(".", 1)[1].startswith("_"))


# Signatures of dataclasses (defaults not in the source): `<class 'jax.numpy.float32'>` is
# shown as `jnp.float32`, and Flax modules' own trailing `parent` and `name` fields are left out.
_JNP_TYPE = re.compile(r"<class 'jax\.numpy\.(\w+)'>")
_FLAX_PARENT = re.compile(r",?\s*parent: [^=]*= <flax\.linen\.module\._Sentinel object>")
_FLAX_NAME = re.compile(r",?\s*name: (str \| None|Optional\[str\]) = None(?=\)$)")


def _tidy_signature(app, what, name, obj, options, signature, return_annotation):
  del app, name, obj, options
  if signature:
    signature = _JNP_TYPE.sub(r"jnp.\1", signature)
  if what == "class" and signature and "_Sentinel" in signature:
    signature = _FLAX_NAME.sub("", _FLAX_PARENT.sub("", signature))
    if signature.startswith("(, "):
      signature = "(" + signature[3:]
  return signature, return_annotation


def setup(app):
  """Adds `.. automodules:: NAME ...`: a section with an `automodule` for each named module.

  `PACKAGE.*` stands for every module of PACKAGE, found at build time: used where the set of
  modules changes often (dataset_distill), so that a new module is documented without editing
  the page, and a removed one does not break the build.
  """
  from docutils.parsers.rst import Directive  # pylint: disable=g-import-not-at-top
  from docutils.statemachine import StringList  # pylint: disable=g-import-not-at-top

  class AutoModules(Directive):
    required_arguments = 1
    optional_arguments = 100
    has_content = False

    def run(self):
      names = []
      for arg in self.arguments:
        names += _submodules(arg[:-2]) if arg.endswith(".*") else [arg]
      lines = []
      for name in names:
        title = f"``{name}``"
        lines += [title, "-" * len(title), "", f".. automodule:: {name}", ""]
      source = self.state_machine.get_source_and_line(self.lineno)[0]
      self.state_machine.insert_input(StringList(lines, source=source), source)
      return []

  app.add_directive("automodules", AutoModules)
  app.connect("autodoc-process-signature", _tidy_signature)
  return {"parallel_read_safe": True}
