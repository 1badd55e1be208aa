"""The README stays true: its commands point at real configs, its loss table lists every loss."""
import os
import re

from kd_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_every_registered_loss_is_in_the_readme_table():
  missing = [name for name in losses.list_losses() if f"`{name}`" not in README]
  assert not missing, f"README loss table lacks {missing}"


def test_config_files_named_in_readme_exist():
  paths = set(re.findall(r"--config=(configs/[\w/]+\.py)", README))
  assert "configs/digits_kd.py" in paths
  for path in paths:
    assert os.path.exists(os.path.join(ROOT, path)), path


def test_quick_start_commands_come_first_and_ci_runs_command_b():
  commands = re.findall(r"```bash\n(.+?)\n```", README, flags=re.S)
  assert commands[0].startswith("pip install -e . && python -m kd_jax.main --config=configs/digits_kd.py")
  assert commands[1] == 'pip install -e ".[test]" && python -m pytest -n 2 -q'
  assert commands[1] in open(os.path.join(ROOT, ".ci", "run")).read()


def test_readme_term_configs_are_valid_terms():
  """Every `--config.distill.terms="..."` in the README parses into terms a Distiller accepts."""
  import ast  # pylint: disable=g-import-not-at-top
  from kd_jax.distiller import Distiller, Term  # pylint: disable=g-import-not-at-top
  joined = README.replace("\\\n", "")
  literals = re.findall(r'--config\.distill\.terms="(\(.+?\))"', joined)
  assert len(literals) >= 2
  for literal in literals:
    terms = [Term.from_config(t, f"README terms[{i}]")
             for i, t in enumerate(ast.literal_eval(literal))]
    Distiller(None, terms, {"teacher": None}, num_data=1)


def test_readme_method_example_is_the_tested_one():
  """The README's "method in one file" class is, line for line, the one
  tests/dataset_distill/test_methods_registry.py runs on the loop."""
  block = next(b for b in re.findall(r"```python\n(.+?)\n```", README, flags=re.S)
               if "class ClassMeanMatching" in b)
  tested = open(os.path.join(ROOT, "tests", "dataset_distill", "class_mean_example.py")).read()
  body = lambda text: text[text.index("@dataclasses.dataclass"):].strip()
  assert body(block) == body(tested)
