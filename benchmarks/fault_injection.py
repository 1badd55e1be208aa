"""Fault injection on a kd_jax job: random SIGKILLs, damaged files, two runs at once, a full disk.

    PYTHONPATH=. python benchmarks/fault_injection.py                   # K=20 kills, ~10-15 min on 2 cores
    PYTHONPATH=. python benchmarks/fault_injection.py --kills=2 --no_record   # smoke run, ~4 min

Every run is `python -m kd_jax.main --config=CONFIG` in a subprocess. The default is the KD job,
`configs/digits_kd.py:runlocal`; `--config=configs/dd_digits.py:runlocal` runs the
dataset-distillation job, meaningful once its matching loop resumes from checkpoints.
1. Reference: one uninterrupted run in its own workdir, timed. Its `results.json` is what
   every other run must reproduce byte for byte (computed afresh each time, since results
   change with the code).
2. Kills: a fresh workdir; up to `--kills_per_round` runs in a row are SIGKILLed, then a run
   goes to the end. Rounds repeat in fresh workdirs until `--kills` kills have landed. A round
   draws its kill points as random counts of the metric lines a whole run logs, sorted; each
   kill waits until the workdir holds that many lines, then a random part of the mean time
   between two lines. So kills spread over start-up, every stage, checkpoint writes and
   evaluation whatever the machine's load. Where each kill landed is read from the workdir
   (stage and logged step, a checkpoint being written, or past the last line).
3. Damage: each kind of file the run writes (checkpoint array data, array metadata, kd_jax
   metadata, a whole step, metrics.jsonl, event file, config.json, results.json, .lock) is
   truncated to half or deleted in a copy of the reference workdir, which is then rerun.
   Copies lose `results.json` (so stages are restored and re-evaluated) unless that file or
   config.json is the damaged one. Each outcome is "fell back" (finished with the reference
   results), "clear error: <message>" (exit 1, no traceback), "TRACEBACK" or "WRONG RESULT".
   Checkpoint damage hits the newest step of the first stage.
4. Two runs at once on one workdir: the second must be refused; the first must finish.
5. Disk full: the run writes to a small tmpfs (needs mount rights; otherwise a child whose
   Python-level opens for writing under the workdir raise ENOSPC once a checkpoint exists;
   TensorStore's array writes are not hit). It must stop with a clear error; a copy of its
   workdir on a roomy disk must then resume to the reference results.
"""
import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_log  # noqa: E402  (benchmarks/, the script's folder)

# Raises ENOSPC for files opened for writing under the workdir once a checkpoint step exists: the
# disk-full fallback when no tmpfs can be mounted. argv: workdir, then kd_jax.main's arguments.
_ENOSPC_CHILD = """
import builtins, errno, glob, os, runpy, sys
workdir, real_open = os.path.abspath(sys.argv[1]), builtins.open
def open_(path, mode="r", *args, **kwargs):
  name = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else ""
  if (name.startswith(workdir) and set(mode) & set("wax+")
      and any(os.path.basename(step).isdigit()
              for step in glob.glob(os.path.join(workdir, "*", "checkpoints", "*")))):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
  return real_open(path, mode, *args, **kwargs)
builtins.open = open_
sys.argv = ["kd_jax.main"] + sys.argv[2:]
runpy.run_module("kd_jax.main", run_name="__main__")
"""


FINISHED = "finished with the reference results"


class Runner:
  """Runs the job on a workdir and compares its results with the reference."""

  def __init__(self, config: str, scratch: str, timeout: float):
    self.config, self.timeout = config, timeout
    self.data_dir = os.path.join(scratch, "tfds")
    self.env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(scratch, "xla"),
                "PYTHONPATH": ROOT, "CI": "true"}
    self.reference = None

  def args(self, workdir: str) -> list[str]:
    return [f"--config={self.config}", f"--workdir={workdir}", f"--config.data.data_dir={self.data_dir}"]

  def start(self, workdir: str, prefix=("-m", "kd_jax.main")) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *prefix, *self.args(workdir)], cwd=ROOT, env=self.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def run(self, workdir: str, kill_at: tuple[int, float] | None = None, points: int = 0,
          prefix=("-m", "kd_jax.main")):
    """`(returncode, stderr, phase)`. `kill_at=(lines, seconds)`: SIGKILL the run `seconds`
    after the workdir's metrics files hold `lines` lines; phase is where the kill landed
    (None: the run ended first); `points` is how many lines a whole run logs."""
    left_by_earlier_kills = _partial_checkpoints(workdir)
    proc = self.start(workdir, prefix)
    if kill_at is not None:
      lines, seconds = kill_at
      while proc.poll() is None and _logged(workdir) < lines:
        time.sleep(0.02)
      deadline = time.monotonic() + seconds
      while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
      if proc.poll() is None:
        phase = _phase(workdir, left_by_earlier_kills, points)
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1]
        return proc.returncode, err, phase if proc.returncode == -signal.SIGKILL else None
    _, err = proc.communicate(timeout=self.timeout)
    return proc.returncode, err, None

  def results(self, workdir: str) -> bytes | None:
    path = os.path.join(workdir, "results.json")
    return open(path, "rb").read() if os.path.exists(path) else None

  def outcome(self, workdir: str, returncode: int, stderr: str, ok: str = "fell back") -> str:
    """`ok` (finished with the reference results), "clear error: ...", "TRACEBACK: ..." or
    "WRONG RESULT"; the workdir's path reads WORKDIR in messages."""
    last = (stderr.strip().splitlines() or [""])[-1].replace(workdir, "WORKDIR")
    if returncode == 0:
      return ok if self.results(workdir) == self.reference else "WRONG RESULT"
    if "Traceback" in stderr:
      return f"TRACEBACK: {_short(last)}"
    return f"clear error: {_short(last.removeprefix('error: '))}"


def _short(text: str, limit: int = 300) -> str:
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _logged(workdir: str) -> int:
  """Lines in the workdir's metrics files: how far the job has come."""
  total = 0
  for path in glob.glob(os.path.join(workdir, "*", "metrics.jsonl")):
    with open(path) as f:
      total += sum(1 for _ in f)
  return total


def _partial_checkpoints(workdir: str) -> set[str]:
  """Orbax's temporary directories of checkpoints being written (or left by a kill)."""
  return set(glob.glob(os.path.join(workdir, "*", "checkpoints", "*.orbax-checkpoint-tmp*")))


def _phase(workdir: str, left_by_earlier_kills: set[str], points: int) -> str:
  """Where a run is: a checkpoint being written, past the last logged line, or its last stage
  and logged step."""
  if _partial_checkpoints(workdir) - left_by_earlier_kills:
    return "checkpoint write"
  if _logged(workdir) >= points:
    return "after the last metric line (final checkpoint, evaluation or results)"
  logs = sorted(glob.glob(os.path.join(workdir, "*", "metrics.jsonl")), key=os.path.getmtime)
  if not logs:
    return "start-up"
  stage = os.path.basename(os.path.dirname(logs[-1]))
  with open(logs[-1]) as f:
    lines = f.read().strip().splitlines()
  try:
    return f"{stage} after logged step {json.loads(lines[-1])['step']}"
  except (IndexError, ValueError):  # nothing logged yet, or a line being written
    return stage


def kills(runner: Runner, scratch: str, count: int, per_round: int, seconds: float,
          rng: random.Random, reference: str):
  points = _logged(reference)
  gap = seconds / (points + 1)
  print(f"2) {count} SIGKILLs, up to {per_round} in a row on each fresh workdir, then a run to the "
        f"end. Each lands a random 0-{gap:.1f} s after a random one of the {points} metric lines "
        "the job logs (the round's draws in order)")
  landed, rounds, identical, failures = [], 0, 0, []
  while len(landed) < count:
    rounds += 1
    workdir = os.path.join(scratch, f"killed{rounds}")
    targets = sorted(rng.randint(0, points) for _ in range(min(per_round, count - len(landed))))
    while True:
      kill_at = (max(targets.pop(0), _logged(workdir)), rng.uniform(0, gap)) if targets else None
      returncode, stderr, phase = runner.run(workdir, kill_at, points)
      if phase is not None:
        landed.append(phase)
        print(f"   kill {len(landed):2d} (round {rounds}): {phase}", flush=True)
        continue
      if returncode != 0:
        failures.append(runner.outcome(workdir, returncode, stderr))
      break
    same = runner.results(workdir) == runner.reference
    identical += same
    print(f"   round {rounds} finished: results.json identical to the reference: "
          f"{'yes' if same else 'NO'}", flush=True)
  survived = identical == rounds and not failures
  print(f"   kills survived: {len(landed) if survived else 'NOT ALL'} of {len(landed)} "
        f"({rounds} rounds); results identical: {'yes' if survived else 'no'} "
        f"({identical}/{rounds} rounds){''.join(f'; failure: {f}' for f in failures)}")


def _targets(reference: str) -> list[tuple[str, str, tuple[str, ...]]]:
  """`(kind, path relative to the workdir, damages)` for each kind of file the run wrote."""
  steps = glob.glob(os.path.join(reference, "*", "checkpoints", "[0-9]*"))
  targets = []
  if steps:
    first_stage = min({os.path.dirname(os.path.dirname(s)) for s in steps}, key=lambda d: min(
        os.path.getmtime(s) for s in glob.glob(os.path.join(d, "checkpoints", "[0-9]*"))))
    newest = max(glob.glob(os.path.join(first_stage, "checkpoints", "[0-9]*")),
                 key=lambda s: int(os.path.basename(s)))
    targets += [("checkpoint array data", sorted(glob.glob(os.path.join(newest, "state", "d", "*")))[0],
                 ("truncate", "delete")),
                ("checkpoint array metadata", os.path.join(newest, "state", "_METADATA"),
                 ("truncate", "delete")),
                ("checkpoint kd_jax metadata", os.path.join(newest, "meta", "metadata"),
                 ("truncate", "delete")),
                ("newest checkpoint step", newest, ("delete",)),
                ("every checkpoint step of a stage", os.path.join(first_stage, "checkpoints"),
                 ("truncate",)),
                ("metrics.jsonl", os.path.join(first_stage, "metrics.jsonl"), ("truncate", "delete")),
                ("event file", sorted(glob.glob(os.path.join(first_stage, "tensorboard", "*")))[0],
                 ("truncate", "delete"))]
  targets += [(name, os.path.join(reference, name), ("truncate", "delete"))
              for name in ("config.json", "results.json", ".lock")]
  return [(kind, os.path.relpath(path, reference), damages) for kind, path, damages in targets
          if os.path.exists(path)]


def _damage(path: str, how: str) -> None:
  if how == "delete":
    (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
    return
  files = glob.glob(os.path.join(path, "*", "state", "d", "*")) if os.path.isdir(path) else [path]
  for name in files:
    os.truncate(name, os.path.getsize(name) // 2)


def damage(runner: Runner, reference: str, scratch: str) -> None:
  print("3) damaged files, then a rerun (without results.json unless that or config.json is "
        "the damaged file)")
  for kind, relative, damages in _targets(reference):
    for how in damages:
      workdir = os.path.join(scratch, f"damaged-{kind.replace(' ', '_')}-{how}")
      shutil.copytree(reference, workdir)
      if kind not in ("results.json", "config.json"):
        os.remove(os.path.join(workdir, "results.json"))
      _damage(os.path.join(workdir, relative), how)
      returncode, stderr, _ = runner.run(workdir)
      result = runner.outcome(workdir, returncode, stderr)
      if result.startswith("clear error") and "Rerun to" in stderr:  # the message says rerun: do
        returncode, stderr, _ = runner.run(workdir)
        result += f"; then rerun: {runner.outcome(workdir, returncode, stderr)}"
      print(f"   {how:8s} {kind} ({relative}): {result}", flush=True)


def concurrent(runner: Runner, scratch: str) -> None:
  print("4) two runs started on one workdir")
  workdir = os.path.join(scratch, "shared")
  first = runner.start(workdir)
  lock = os.path.join(workdir, ".lock")
  while first.poll() is None and not (os.path.exists(lock) and os.path.getsize(lock)):
    time.sleep(0.1)
  returncode, stderr, _ = runner.run(workdir)
  _, first_err = first.communicate(timeout=runner.timeout)
  print(f"   second run: {runner.outcome(workdir, returncode, stderr)}")
  print(f"   first run: {runner.outcome(workdir, first.returncode, first_err, FINISHED)}")


def disk_full(runner: Runner, scratch: str, size_kib: int) -> None:
  mount = os.path.join(scratch, "tmpfs")
  os.makedirs(mount)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", mount],
                           capture_output=True, text=True).returncode == 0
  workdir = os.path.join(mount, "w")
  try:
    if mounted:
      print(f"5) disk full: a {size_kib} KiB tmpfs")
      returncode, stderr, _ = runner.run(workdir)
    else:
      print("5) disk full: no tmpfs (mount refused); files opened for writing under the workdir "
            "raise ENOSPC once a checkpoint exists")
      returncode, stderr, _ = runner.run(workdir, prefix=("-c", _ENOSPC_CHILD, workdir))
    print(f"   the full run: {runner.outcome(workdir, returncode, stderr)}")
    roomy = os.path.join(scratch, "after_disk_full")
    shutil.copytree(workdir, roomy)
  finally:
    if mounted:
      subprocess.run(["umount", mount], check=True)
  returncode, stderr, _ = runner.run(roomy)
  print(f"   its workdir copied to a roomy disk and rerun: "
        f"{runner.outcome(roomy, returncode, stderr, FINISHED)}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/digits_kd.py:runlocal")
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--kills_per_round", type=int, default=5,
                      help="kills in a row before a run may finish (then a fresh workdir)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
  parser.add_argument("--tmpfs_kib", type=int, default=1200, help="size of the disk-full tmpfs")
  parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
  flags = parser.parse_args()
  scratch = tempfile.mkdtemp(prefix="kd_jax_faults_")
  runner = Runner(flags.config, scratch, flags.timeout)
  try:
    print(f"fault injection on {flags.config}, seed {flags.seed}, scratch {scratch}")
    reference = os.path.join(scratch, "reference")
    runner.run(reference)  # prepares the data and fills the compilation cache
    shutil.rmtree(reference)
    start = time.perf_counter()
    returncode, stderr, _ = runner.run(reference)
    seconds = time.perf_counter() - start
    if returncode != 0:
      raise SystemExit(f"the reference run failed:\n{stderr[-3000:]}")
    runner.reference = runner.results(reference)
    print(f"1) reference run: {seconds:.1f} s (warm compilation cache), results.json "
          f"{len(runner.reference)} bytes", flush=True)
    kills(runner, scratch, flags.kills, flags.kills_per_round, seconds, random.Random(flags.seed),
          reference)
    damage(runner, reference, scratch)
    concurrent(runner, scratch)
    disk_full(runner, scratch, flags.tmpfs_kib)
  finally:
    if not flags.keep:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  with results_log.recorded("Fault injection: kills, damaged files, concurrent runs, full disk"):
    main()
