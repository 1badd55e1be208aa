"""The teacher of dataset distillation: a network trained on the real data.

Teacher-driven methods (SRe2L's recovery, RDED's patch scoring, INFER's compensators) read it,
and the "teacher" evaluation protocol relabels with it. It may have BatchNorm (SRe2L matches its
running statistics). It trains as any kd_jax stage (`kd_jax.trainer.train`: resumable, Orbax
checkpoints in `<workdir>/teacher/`, metrics), with plain cross-entropy, SGD momentum 0.9,
PyTorch-style weight decay and a cosine schedule, on the job's (normalised) training arrays with
random shifts of `crop_padding` pixels.
"""
import dataclasses
from pathlib import Path

import jax
import numpy as np

from kd_jax import data as data_lib
from kd_jax import optim, trainer
from kd_jax.dataset_distill.method import Teacher
from kd_jax.distiller import supervised
from kd_jax.models import create_model, init_model, make_apply_fn


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
  """How the teacher trains. `model_kwargs` are the architecture fields of `model`."""
  model: str = "convnet"
  model_kwargs: dict = dataclasses.field(default_factory=lambda: {"norm": "batchnorm"})
  epochs: int = 30
  lr: float = 0.05
  batch_size: int = 64
  weight_decay: float = 5e-4
  crop_padding: int = 1


def train_teacher(recipe: TeacherRecipe, directory, images: np.ndarray, labels: np.ndarray, *,
                  num_classes: int, metadata: dict, seed: int = 0,
                  mesh_axes: tuple = (("data", -1),)) -> Teacher:
  """Trains the teacher in `<directory>/teacher` (or resumes it, or loads it when finished;
  runs of one dataset may share a directory).

  `metadata` identifies the data (dataset, zca, ...); with the recipe it is stored in every
  checkpoint, so a teacher trained for another config is refused, not silently reused.
  """
  module = create_model(recipe.model, num_classes=num_classes, **recipe.model_kwargs)
  params, model_state = init_model(module, jax.random.key(seed), (1, *images.shape[1:]))
  steps_per_epoch = data_lib.steps_per_epoch(len(images), recipe.batch_size)
  num_steps = recipe.epochs * steps_per_epoch
  schedule = optim.make_schedule(name="cosine", learning_rate=recipe.lr, total_steps=num_steps,
                                 steps_per_epoch=steps_per_epoch)
  tx = optim.make_optimizer(name="sgd", schedule=schedule, weight_decay=recipe.weight_decay)
  stage = trainer.Stage(
      name="teacher", method=supervised(make_apply_fn(module)),
      variables={"student": {"params": params, **model_state}},
      metadata={**metadata, **dataclasses.asdict(recipe), "num_classes": num_classes,
                "seed": seed},
      tx=tx, num_steps=num_steps)
  source = data_lib.ArrayDataSource(images, labels)
  batches = lambda start: data_lib.train_batches(
      source, batch_size=recipe.batch_size, seed=seed, start_step=start,
      augment=data_lib.AugmentConfig(crop_padding=recipe.crop_padding))
  variables = trainer.train(stage, str(Path(directory)), batches,
                            trainer.LoopOptions(seed=seed, mesh_axes=mesh_axes, log_every=100))
  return Teacher(make_apply_fn(module), jax.device_get(variables))


def teacher_accuracy(teacher: Teacher, images: np.ndarray, labels: np.ndarray,
                     batch_size: int = 256, mesh_axes: tuple = (("data", -1),)) -> float:
  """Test accuracy of the teacher on (images, labels)."""
  batches = data_lib.eval_batches(data_lib.ArrayDataSource(images, labels), batch_size=batch_size)
  return trainer.evaluate(teacher.apply_fn, teacher.variables, batches, mesh_axes)["accuracy"]
