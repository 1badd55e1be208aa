"""Shared pieces of the analysis tests: a tiny MLP's output, and a finished-looking KD workdir
built without training."""
import functools
import os

import jax
import numpy as np
import optax
import pytest

from configs import digits_kd
from kd_jax import checkpoint, experiment, models
from kd_jax import workdir as workdir_lib
from kd_jax.analysis import cka
from kd_jax.distiller import supervised_state


@pytest.fixture(scope="session")
def mlp():
  """`(module, params, images, output)`: an MLP with hidden layers 12 and 8 at initialisation,
  16 random 8×8 images and its jitted output on them (features in name order)."""
  module = models.create_model("mlp", num_classes=10, hidden_sizes=(12, 8))
  params, _ = models.init_model(module, cka.init_key(0), (1, 8, 8, 1))
  images = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype(np.float32)
  output = jax.jit(functools.partial(module.apply, train=False))({"params": params}, images)
  return module, params, images, output


@pytest.fixture(scope="session")
def kd_workdir(digits_data_dir, tmp_path_factory):
  """The runlocal digits KD config's workdir, its teacher an MLP (16, 12) (faster to compile
  than the CNN), with one checkpoint of the `teacher` and the `student_kd` stage each: the
  models at initialisation, as the job's checkpoints hold them."""
  workdir = str(tmp_path_factory.mktemp("kd"))
  config = digits_kd.get_config("runlocal")
  with config.unlocked():
    config.data.data_dir = digits_data_dir
    config.teacher.model = "mlp"
    config.teacher.model_kwargs = {"hidden_sizes": (16, 12)}
  checkpoint.atomic_write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                               workdir_lib.config_dict(config))
  exp = experiment.Experiment(config)
  for seed, (stage, group) in enumerate((("teacher", config.teacher),
                                         ("student_kd", config.student))):
    _, variables, metadata = exp.build(group.model, group.model_kwargs.to_dict(), stage,
                                       cka.init_key(seed))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, stage, "checkpoints"), metadata)
    ckpt.save(1, supervised_state(variables, optax.sgd(0.1)))
    ckpt.close()
  return workdir
