"""The README's example of a dataset-distillation method in one file (used by its test)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.dataset_distill import method as dd


@dataclasses.dataclass
class ClassMeanMatching:
  """Synthetic images pulled towards their class's mean real image (a toy objective)."""
  iterations: int = 100
  lr: float = 0.1
  name: str = "class_means"

  def prepare(self, context: dd.Context) -> None:
    self._means = jnp.stack([context.train_images[context.train_labels == c].mean(0)
                             for c in range(context.num_classes)])
    self._class_ids = dd.class_ids(context.num_classes, context.ipc)

  def start(self, context: dd.Context) -> dd.Start:
    noise = np.random.default_rng(context.seed).standard_normal(
        (len(self._class_ids), *context.train_images.shape[1:]))
    return dd.Start(values={"images": jnp.asarray(noise, jnp.float32)},
                    optimizers={"images": optax.sgd(self.lr)})

  def value_and_grad(self, values, state, iteration: int) -> dd.Step:
    loss_fn = lambda x: 0.5 * jnp.sum((x - self._means[self._class_ids]) ** 2)
    loss, grad = jax.value_and_grad(loss_fn)(values["images"])
    return dd.Step(loss, {"images": grad}, state)

  def distilled(self, values) -> dd.DistilledSet:
    return dd.DistilledSet(images=np.asarray(values["images"]), labels=self._class_ids,
                           label_kind="hard", lr=None, stored_floats=dd.stored_floats(values))
