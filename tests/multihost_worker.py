"""A tiny KD problem for the sharding tests, and the worker process of the multi-host test.

As a module it provides `build_problem()` and `build_matching_problem()`; as a script it is
one process of a multi-host run on localhost:

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR

The second form runs the `distill_dataset` job (configs/dd_digits.py:runlocal, 2 segments on a
`[("segment", 2), ("data", -1)]` mesh) with digits prepared in DATA_DIR.

Each process has 2 CPU devices, joins the run, trains `NUM_STEPS` KD steps over a
`[("data", -1), ("fsdp", 2)]` mesh on its slice of the global batch, then computes the
exact trajectory-matching gradient of 2 segments on a `[("segment", 2), ("data", -1)]` mesh
and trains one expert on a `[("data", -1)]` mesh; process 0 writes the losses, the final
student params, the matching loss and gradients and the expert trajectory to OUT.npz.
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree

from configs import dd_digits
from kd_jax import sharding
from kd_jax.dataset_distill import run as run_lib
from kd_jax.dataset_distill.experts import train_expert
from kd_jax.dataset_distill.matching import TrajectoryMatcher, make_inner_step
from kd_jax.distiller import Distiller, Term
from kd_jax.models.apply import init_model, make_apply_fn
from kd_jax.models.output import ModelOutput
from kd_jax.step import TrainState, make_train_step, per_part_optimizer

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
  """Returns `(step, state)` of 0.5·CE + 0.5·KD(T=4) with a BatchNorm student; the teacher is
  `state.frozen["teacher"]`. Everything is a deterministic function of seeds."""
  student = TinyCNN(student_width, use_bn=True)
  teacher = TinyCNN(teacher_width)
  params, model_state = init_model(student, jax.random.PRNGKey(0), (1, *IMAGE_SHAPE))
  t_params, t_state = init_model(teacher, jax.random.PRNGKey(1), (1, *IMAGE_SHAPE))
  distiller = Distiller(make_apply_fn(student),
                        [Term("ce", weight=0.5),
                         Term("kd", weight=0.5, hparams={"temperature": 4.0})],
                        {"teacher": make_apply_fn(teacher)})
  trainable, frozen, extra = distiller.init(
      jax.random.PRNGKey(2), {"student": {"params": params, **model_state},
                              "teacher": {"params": t_params, **t_state}}, make_batch())
  tx = per_part_optimizer(trainable, optax.sgd(0.1, momentum=0.9))  # as kd_jax.trainer does
  return make_train_step(distiller, tx), TrainState.create(tx, trainable, frozen, extra)


def build_matching_problem():
  """Returns `(matcher_kwargs, call_args, expert_args)` of a small trajectory-matching problem
  with 2 segments and an expert run; deterministic."""
  module = TinyCNN((4,), num_classes=3)
  init_params = lambda key: init_model(module, key, (1, *IMAGE_SHAPE))[0]
  theta, unravel = ravel_pytree(init_params(jax.random.PRNGKey(2)))
  rs = np.random.RandomState(3)
  images = rs.normal(size=(8, *IMAGE_SHAPE)).astype(np.float32)
  label_logits = rs.normal(size=(8, 3)).astype(np.float32)
  starts = np.asarray(theta) + 0.02 * rs.normal(size=(2, theta.size)).astype(np.float32)
  targets = starts + 0.05 * rs.normal(size=starts.shape).astype(np.float32)
  indices = np.stack([rs.permutation(8).reshape(2, 4) for _ in range(2)]).astype(np.int32)
  keys = jax.random.split(jax.random.key(4), 4).reshape(2, 2)
  step = make_inner_step(make_apply_fn(module), unravel, label_kind="logits")
  expert_args = (make_apply_fn(module), init_params, images, np.arange(8, dtype=np.int32) % 3)
  return (dict(step_fn=step, mode="exact", learn_labels=True, segments=2),
          (starts, targets, images, label_logits, 0.3, indices, keys), expert_args)


EXPERT_KWARGS = dict(epochs=2, lr=0.1, batch_size=4, seed=0)


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
  jax.config.update("jax_num_cpu_devices", 2)
  sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
  step, state = build_problem()
  rules = [("Dense_0/kernel", (None, "fsdp"))]  # the student's and the teacher's
  train_step, state = sharding.shard_train_step(step, state, mesh, rules, fsdp_min_size=64)
  per_host = GLOBAL_BATCH // num_processes
  losses = []
  for i in range(NUM_STEPS):
    host_batch = jax.tree.map(lambda x: x[process_id * per_host:(process_id + 1) * per_host],
                              make_batch(seed=i))
    state, metrics = train_step(state, sharding.shard_batch(host_batch, mesh),
                                jax.random.PRNGKey(0))
    losses.append(float(metrics["train/loss"]))
  params = multihost_utils.process_allgather(state.trainable["student"], tiled=True)

  matcher_kwargs, call_args, expert_args = build_matching_problem()
  matcher = TrajectoryMatcher(**matcher_kwargs,
                              mesh=sharding.make_mesh([("segment", 2), ("data", -1)]))
  matching = multihost_utils.process_allgather(matcher(*call_args), tiled=True)
  trajectory = train_expert(*expert_args, mesh=sharding.make_mesh([("data", -1)]),
                            **EXPERT_KWARGS)
  if process_id == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    loss, grads = matching
    np.savez(out_path, losses=np.asarray(losses), devices=jax.device_count(),
             matching_loss=loss, matching_images=grads.images, matching_labels=grads.labels,
             matching_lr=grads.lr, expert=trajectory, **flat)
  jax.distributed.shutdown()


def distill_job_config(data_dir: str):
  """configs/dd_digits.py:runlocal with 2 segments on a ("segment", 2) × ("data", -1) mesh."""
  config = dd_digits.get_config("runlocal")
  with config.unlocked():
    config.data.data_dir = data_dir
    config.mesh.axes = (("segment", 2), ("data", -1))
    config.distill.segments = 2
  return config


def main_distill_job(process_id: int, num_processes: int, port: int, workdir: str,
                     data_dir: str) -> None:
  jax.config.update("jax_num_cpu_devices", 2)
  sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  run_lib.run(distill_job_config(data_dir), workdir)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if len(sys.argv) == 6:
    main_distill_job(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                     sys.argv[5])
  else:
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
