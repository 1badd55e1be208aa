"""Command-line entry point: `python -m kd_jax.main --config=configs/X.py --workdir=DIR`.

Overrides: `--config.seed=1 --config.student.num_epochs=10`. The job is chosen by `config.job`;
all logic lives in the library. Before the job runs, the workdir is checked (kd_jax.workdir): it
must be a directory, it must belong to the same config (fields that cannot change results
aside), and no other run may hold it. A finished workdir's results are printed without writing
anything. A mistake the user can fix (an unknown or out-of-range config field, a ValueError, a
known operating-system error, a NaN loss) prints a short message on stderr and exits with code
1; `--verbosity=1` adds the traceback.
"""
import os
import re
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from kd_jax import config_checks
from kd_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

_JOBS = ("kd", "regimes", "sequence", "distill_dataset")
# Jobs whose steps shard every batch over the mesh's `data` axis: on CPU they get one host
# device per core (kd_jax.sharding.use_host_cores).
_DATA_PARALLEL_JOBS = ("kd", "regimes", "sequence")
# Config fields (by last name) that hold paths, named in messages about OS errors.
_PATH_FIELDS = ("data_dir", "directory", "checkpoint")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _verbose(argv) -> bool:
  """Whether `--verbosity`/`-v` >= 1 is on the command line (read from argv: flag parsing may
  have failed before it was parsed)."""
  values = [m.group(1) for a in argv if (m := re.fullmatch(r"--?(?:verbosity|v)=(-?\d+)", a))]
  return bool(values) and int(values[-1]) >= 1


def _parse_flags(argv):
  """absl's flag parsing, with a short message instead of a traceback for an unknown
  `--config.` field, a config file that fails, or a bad flag value."""
  try:
    remaining = flags.FLAGS(argv)
    flags.FLAGS.config.job  # a config file that failed to load raises only when first used
    return remaining
  except Exception as e:  # config_flags raises AttributeError/KeyError/OSError, unwrapped
    if _verbose(argv):
      raise
    _fail(_flag_message(argv, e))


def _flag_message(argv, error: Exception) -> str:
  """Names the unknown `--config.` field if there is one, else the error's first and last lines
  (config_flags puts the config file's whole traceback in between)."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    config = flags.FLAGS["config"].parser.parse(config_arg)
  except Exception:  # the config file itself fails: the error says why
    config = None
  if config is not None:
    for arg in argv:
      if arg.startswith("--config."):
        message = config_checks.unknown_field(config, arg[len("--config."):].split("=", 1)[0])
        if message:
          return message
  lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _report(config, results) -> str:
  """What the job prints: the comparison table (KD, regimes, sequence), or the
  dataset-distillation results."""
  if config.job in ("kd", "regimes"):
    from kd_jax import experiment  # pylint: disable=g-import-not-at-top
    return experiment.format_table(results)
  if config.job == "sequence":
    from kd_jax.sequence import job as sequence_job  # pylint: disable=g-import-not-at-top
    return sequence_job.format_results(results)
  from kd_jax.dataset_distill import run as distill_run  # pylint: disable=g-import-not-at-top
  return distill_run.format_results(results)


def _run(config, workdir: str) -> None:
  if config.job not in _JOBS:
    raise ValueError(f"config.job={config.job!r} is unknown; valid: {', '.join(_JOBS)}")
  resolved = workdir_lib.config_dict(config)
  config_checks.check_values(resolved)
  # Persistent XLA cache: a rerun or resume skips recompiling (benchmarks/RESULTS.md: 28.6 s → 9.3 s
  # for the CIFAR job's start-up). JAX_COMPILATION_CACHE_DIR overrides the location.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/kd_jax/xla")))
  if "mesh" in config:
    from kd_jax import sharding  # pylint: disable=g-import-not-at-top
    joined = sharding.initialize_distributed(config.mesh.get("coordinator_address") or None,
                                             config.mesh.get("num_processes") or None,
                                             None if config.mesh.get("process_id", -1) < 0
                                             else config.mesh.process_id)
    if not joined and config.job in _DATA_PARALLEL_JOBS:
      batch_sizes = [v for k, v in workdir_lib.flatten(resolved).items()
                     if k.endswith("batch_size") and isinstance(v, int) and v > 0]
      sharding.use_host_cores(batch_sizes, config.mesh.axes, config.mesh.get("cpu_devices", -1))
  relevant = None
  if config.job == "distill_dataset":  # fingerprint only what the chosen method reads
    from kd_jax.dataset_distill import methods  # pylint: disable=g-import-not-at-top
    relevant = methods.results_config
  workdir_lib.check_path(workdir)
  if workdir_lib.check_config(workdir, resolved, relevant):
    results = workdir_lib.read_results(workdir)
    if results is not None:
      print(f"{workdir} holds a finished run of this config; its results (delete "
            f"{workdir_lib.RESULTS_FILE} there to recompute them):", file=sys.stderr)
      print(_report(config, results))
      return
  lock = workdir_lib.claim(workdir, resolved, primary=jax.process_index() == 0,
                          relevant=relevant)
  logging.info("config:\n%s", config)
  try:
    if config.job == "kd":
      from kd_jax import kd_job  # pylint: disable=g-import-not-at-top
      results = kd_job.run(config, workdir)
    elif config.job == "regimes":
      from kd_jax.regimes import job as regimes_job  # pylint: disable=g-import-not-at-top
      results = regimes_job.run(config, workdir)
    elif config.job == "sequence":
      from kd_jax.sequence import job as sequence_job  # pylint: disable=g-import-not-at-top
      results = sequence_job.run(config, workdir)
    else:
      from kd_jax.dataset_distill import run as distill_run  # pylint: disable=g-import-not-at-top
      results = distill_run.run(config, workdir)
  finally:
    if lock is not None:
      lock.release()
  print(_report(config, results))


def _message(error: Exception, config, workdir: str) -> str | None:
  """The short message for an error the user can fix, or None."""
  if isinstance(error, OSError):
    paths = {f"config.{field}": value for field, value in
             workdir_lib.flatten(workdir_lib.config_dict(config)).items()
             if field.rsplit(".", 1)[-1] in _PATH_FIELDS and isinstance(value, str) and value}
    return workdir_lib.describe_os_error(error, {"--workdir": workdir, **paths})
  if isinstance(error, (ValueError, FloatingPointError)):
    return str(error)
  return None


def _hide_closed_loop_errors(unraisable, default=sys.unraisablehook) -> None:
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    default(unraisable)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
  if not verbose:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    # Orbax logs each failure of its background threads with a traceback, and TensorStore's
    # callbacks then hit Orbax's closed event loops; the error itself reaches the main thread,
    # which reports it in one line.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname)
    sys.unraisablehook = _hide_closed_loop_errors
  try:
    _run(_CONFIG.value, _WORKDIR.value)
  except Exception as e:  # pylint: disable=broad-except
    message = _message(e, _CONFIG.value, _WORKDIR.value)
    if message is None or verbose:
      raise
    _fail(message)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
