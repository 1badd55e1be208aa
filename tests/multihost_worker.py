"""A tiny KD problem for the sharding tests, and the worker process of the multi-host test.

As a module it provides `build_problem()`; as a script it is one process of a multi-host
run on localhost:

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process has 2 CPU devices, joins the run, trains `NUM_STEPS` KD steps over a
`[("data", -1), ("fsdp", 2)]` mesh on its slice of the global batch, and process 0
writes the losses and the final student params to OUT.npz.
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.models.apply import init_model, make_apply_fn
from kd_jax.models.output import ModelOutput
from kd_jax.train_step import TrainState, make_kd_objective, make_train_step

NUM_STEPS = 2
GLOBAL_BATCH = 16
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


class TinyCNN(nn.Module):
  """Conv stack → global mean → dense; optional BatchNorm (model state)."""
  features: tuple[int, ...]
  num_classes: int = NUM_CLASSES
  use_bn: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = x.astype(self.dtype)
    for width in self.features:
      x = nn.Conv(width, (3, 3), dtype=self.dtype)(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = nn.relu(x)
    pre_logits = jnp.mean(x, axis=(1, 2))
    return ModelOutput(logits=nn.Dense(self.num_classes, dtype=self.dtype)(pre_logits),
                       features={"pre_logits": pre_logits})


def make_batch(seed: int = 0, batch_size: int = GLOBAL_BATCH) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(seed)
  return {"image": rs.normal(size=(batch_size, *IMAGE_SHAPE)).astype(np.float32),
          "label": rs.randint(0, NUM_CLASSES, size=(batch_size,)).astype(np.int32)}


def build_problem(student_width=(8, 16), teacher_width=(16, 32)):
  """Returns `(step, state, teacher_vars)`; everything is a deterministic function of seeds."""
  student = TinyCNN(student_width, use_bn=True)
  teacher = TinyCNN(teacher_width)
  params, model_state = init_model(student, jax.random.PRNGKey(0), (1, *IMAGE_SHAPE))
  t_params, t_state = init_model(teacher, jax.random.PRNGKey(1), (1, *IMAGE_SHAPE))
  tx = optax.sgd(0.1, momentum=0.9)
  state = TrainState.create(params, model_state, tx)
  objective = make_kd_objective("kd", alpha=0.5, loss_hparams={"temperature": 4.0})
  step = make_train_step(make_apply_fn(student), make_apply_fn(teacher), objective, tx)
  return step, state, {"params": t_params, **t_state}


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
  from jax.experimental import multihost_utils

  from kd_jax import sharding

  jax.config.update("jax_num_cpu_devices", 2)
  sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
  step, state, teacher_vars = build_problem()
  rules = [("Dense_0/kernel", (None, "fsdp"))]
  train_step, state, teacher_vars = sharding.shard_train_step(step, state, teacher_vars, mesh,
                                                              rules, fsdp_min_size=64)
  per_host = GLOBAL_BATCH // num_processes
  losses = []
  for i in range(NUM_STEPS):
    host_batch = jax.tree.map(lambda x: x[process_id * per_host:(process_id + 1) * per_host],
                              make_batch(seed=i))
    state, metrics = train_step(state, teacher_vars, sharding.shard_batch(host_batch, mesh),
                                jax.random.PRNGKey(0))
    losses.append(float(metrics["train/loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if process_id == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out_path, losses=np.asarray(losses), devices=jax.device_count(), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
