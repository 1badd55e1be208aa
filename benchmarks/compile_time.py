"""Compile time of the KD job's jitted steps, cold and with the persistent compilation cache.

Steps measured (the ones `kd_jax.kd_job` compiles): the teacher's label-only train step,
the student's KD train step (teacher forward inside) and the eval step of each model, for
the digits job (digits_cnn_teacher/student, batch 64, eval batch 500) and for CIFAR-100
(resnet32x4 → resnet8x4, batch 64, eval batch 256). The same measurement runs twice in
fresh subprocesses that share a new `jax_compilation_cache_dir`: the first fills the
cache, the second reads it.

  python benchmarks/compile_time.py [--only digits|cifar]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import results_log  # noqa: E402  (benchmarks/, the script's folder)

JOBS = {  # name: (teacher, student, num_classes, image shape, train batch, eval batch)
    "digits": ("digits_cnn_teacher", "digits_cnn_student", 10, (8, 8, 1), 64, 500),
    "cifar": ("resnet32x4", "resnet8x4", 100, (32, 32, 3), 64, 256),
}


def measure(job: str) -> dict:
  """Seconds to trace+lower and to compile each step of `job`, in this process."""
  import jax
  import jax.numpy as jnp
  import optax

  from kd_jax import models
  from kd_jax.distiller import Distiller, Term, supervised
  from kd_jax.step import TrainState, make_eval_step, make_train_step, per_part_optimizer

  teacher_name, student_name, classes, image, batch, eval_batch = JOBS[job]
  built = {}
  for role, name in (("teacher", teacher_name), ("student", student_name)):
    module = models.create_model(name, num_classes=classes)
    params, model_state = jax.eval_shape(
        lambda m=module: models.init_model(m, jax.random.PRNGKey(0), (1, *image)))
    built[role] = models.make_apply_fn(module), params, model_state
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  train_batch = {"image": jax.ShapeDtypeStruct((batch, *image), jnp.float32),
                 "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
                 "mask": jax.ShapeDtypeStruct((batch,), jnp.float32)}
  eval_batch_ = {k: jax.ShapeDtypeStruct((eval_batch, *v.shape[1:]), v.dtype)
                 for k, v in train_batch.items()}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  t_apply, t_params, t_state = built["teacher"]
  s_apply, s_params, s_state = built["student"]
  teacher_vars = {"params": t_params, **t_state}
  student_vars = {"params": s_params, **s_state}

  def train_step_and_state(method, variables):
    """The method's step and abstract `TrainState`, with the optimizer kd_jax.trainer builds."""
    parts = jax.eval_shape(lambda v, b: method.init(jax.random.PRNGKey(1), v, b), variables,
                           train_batch)
    part_tx = per_part_optimizer(parts[0], tx)
    return (make_train_step(method, part_tx),
            jax.eval_shape(lambda p: TrainState.create(part_tx, *p), parts))

  kd = Distiller(s_apply, [Term("ce", weight=0.1),
                           Term("kd", weight=0.9, hparams={"temperature": 4.0})],
                 {"teacher": t_apply})
  teacher_step, teacher_state = train_step_and_state(supervised(t_apply),
                                                     {"student": teacher_vars})
  kd_step, kd_state = train_step_and_state(kd, {"student": student_vars,
                                                "teacher": teacher_vars})
  steps = {
      "teacher_train": (teacher_step, (teacher_state, train_batch, rng)),
      "student_kd_train": (kd_step, (kd_state, train_batch, rng)),
      "teacher_eval": (make_eval_step(t_apply), (teacher_vars, eval_batch_)),
      "student_eval": (make_eval_step(s_apply), (student_vars, eval_batch_)),
  }
  out = {}
  for name, (fn, args) in steps.items():
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=0 if name.endswith("train") else ()).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    out[name] = {"lower_s": round(t1 - t0, 2), "compile_s": round(time.perf_counter() - t1, 2)}
  return out


def run_child(job: str, cache_dir: str) -> dict:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--child", job], env=env, capture_output=True,
                        text=True, check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["process_wall_s"] = round(time.perf_counter() - t0, 2)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=sorted(JOBS), default=None)
  parser.add_argument("--child", choices=sorted(JOBS), default=None, help=argparse.SUPPRESS)
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child)))
    return
  import jax

  results = {"jax": jax.__version__, "cpu_count": os.cpu_count()}
  for job in [args.only] if args.only else sorted(JOBS):
    with tempfile.TemporaryDirectory() as cache_dir:
      cold, warm = run_child(job, cache_dir), run_child(job, cache_dir)
    results[job] = {"cold": cold, "warm_cache": warm}
    print(f"{job}: {'step':18s} {'cold lower/compile s':>22s} {'cached lower/compile s':>24s}")
    for step in cold:
      if step == "process_wall_s":
        continue
      print(f"{'':{len(job) + 2}}{step:18s} {cold[step]['lower_s']:>10.2f} / {cold[step]['compile_s']:<9.2f}"
            f" {warm[step]['lower_s']:>12.2f} / {warm[step]['compile_s']:<9.2f}")
    print(f"{'':{len(job) + 2}}{'whole process':18s} {cold['process_wall_s']:>22.2f} "
          f"{warm['process_wall_s']:>24.2f}")
  print(json.dumps(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  with results_log.recorded("Compile time of the KD job's steps, cold and with the persistent "
                            "cache", enabled="--child" not in sys.argv):
    main()
