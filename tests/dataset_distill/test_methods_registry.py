"""The method registry: every registered method builds from configs/dd_digits.py; a user's
class in one file runs on the loop by `distill.method="module:Class"`; bad names and fields
fail with the field named."""
import numpy as np
import pytest

from configs import dd_digits
from dd_tiny_model import tiny_problem
from kd_jax.dataset_distill import methods
from kd_jax.dataset_distill.distill import Recording, distill
from kd_jax.dataset_distill.method import Context
from kd_jax.dataset_distill.trajectory_matching import ExpertRecipe, TrajectoryMatching


def _config(arg="runlocal", **fields):
  config = dd_digits.get_config(arg)
  with config.unlocked():
    for key, value in fields.items():
      section, name = key.split("__")
      config[section][name] = value
  return config


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_registered_method_builds_from_the_digits_config(name):
  method = methods.build(_config(f"runlocal,method={name}"), ExpertRecipe())
  assert isinstance(method, methods.method_class(name))
  assert method.name == name
  assert method.iterations is None or method.iterations >= 0  # DC sets it from the IPC in prepare
  if name == "mtt":
    assert isinstance(method, TrajectoryMatching) and method.iterations == 3


def test_a_method_in_one_file_runs_on_the_loop(tmp_path):
  config = _config(distill__method="class_mean_example:ClassMeanMatching")
  with config.unlocked():
    config.method_kwargs.update(iterations=30, lr=0.5)
  method = methods.build(config, ExpertRecipe())
  apply_fn, init_params, images, labels = tiny_problem(num_images=30)
  context = Context(train_images=images, train_labels=labels, num_classes=3, ipc=2,
                    apply_fn=apply_fn, init_params=init_params, augment=None, teacher=None,
                    seed=0, workdir=tmp_path)
  result = distill(method, context, Recording(str(tmp_path / "distill"), {"ipc": 2}))
  means = np.stack([images[labels == c].mean(0) for c in range(3)])
  np.testing.assert_allclose(result.images, np.repeat(means, 2, axis=0), atol=1e-4)
  assert result.images.shape == (6, 8, 8, 1) and list(result.labels) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("change,match", [
    (dict(distill__method="nope"), "distill.method='nope' is unknown; use one of"),
    (dict(distill__method="no_such_module:Class"), "cannot import no_such_module:Class"),
])
def test_bad_method_names_are_refused(change, match):
  with pytest.raises(ValueError, match=match):
    methods.build(_config(**change), ExpertRecipe())


def test_unknown_method_fields_are_named():
  config = _config("runlocal,method=dm")
  with config.unlocked():
    config.dm.lr_images = 1.0
  with pytest.raises(ValueError, match=r"config.dm has unknown fields \['lr_images'\]; "
                                       r"DistributionMatching takes: .*lr_img"):
    methods.build(config, ExpertRecipe())


def test_workdir_fingerprint_holds_only_what_the_method_reads():
  from kd_jax import workdir  # pylint: disable=g-import-not-at-top
  fingerprint = lambda config: workdir.fingerprint(
      methods.results_config(workdir.config_dict(config)))
  dm = fingerprint(_config("runlocal,method=dm"))
  assert fingerprint(_config("runlocal,method=dm", rded__factor=2, distill__syn_steps=7,
                             experts__epochs=9, teacher__epochs=4)) == dm
  assert fingerprint(_config("runlocal,method=dm", dm__lr_img=2.0)) != dm
  assert fingerprint(_config("runlocal,method=dm,teacher_labels", teacher__epochs=4)) != \
      fingerprint(_config("runlocal,method=dm,teacher_labels"))
  mtt = fingerprint(_config("runlocal"))
  assert fingerprint(_config("runlocal", dm__lr_img=2.0)) == mtt
  assert fingerprint(_config("runlocal", distill__syn_steps=7)) != mtt
  assert any(k.startswith("teacher.") for k in fingerprint(_config("runlocal,method=rded")))
