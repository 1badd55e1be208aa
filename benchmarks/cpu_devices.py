"""A KD job on one XLA:CPU device against one device per core (kd_jax's CPU default), side by side.

    python benchmarks/cpu_devices.py                          # the README's digits job
    python benchmarks/cpu_devices.py --config=configs/digits_kd.py:pair=cnn --rounds=2

Each round runs the same command-line job twice, `--config.mesh.cpu_devices=0` (XLA's single
device) then `-1` (`kd_jax.sharding.use_host_cores`: one device per core, the batch split over
the mesh's `data` axis), each in a fresh workdir and a fresh compilation cache, and times it
end to end (start-up, compilation, tuning, training, evaluation). It prints the wall time of
each, their ratio per round, and each layout's test accuracies: the same sharded step, so they
differ only by float rounding.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_log  # noqa: E402  (benchmarks/, the script's folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"one device": "0", "one per core": "-1"}


def run_job(config: str, cpu_devices: str, scratch: str) -> tuple[float, list[dict]]:
  """Wall seconds and result rows of one `python -m kd_jax.main` run."""
  workdir = tempfile.mkdtemp(dir=scratch)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(workdir, "xla")}
  env.pop("XLA_FLAGS", None)  # a device count there would override both layouts
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "kd_jax.main", f"--config={config}",
                  f"--workdir={os.path.join(workdir, 'run')}",
                  f"--config.mesh.cpu_devices={cpu_devices}"],
                 cwd=ROOT, env=env, check=True, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  with open(os.path.join(workdir, "run", "results.json")) as f:
    return seconds, json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits_kd.py")
  parser.add_argument("--rounds", type=int, default=1)
  args = parser.parse_args()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"config {args.config}; {cores} cores available; load average {os.getloadavg()}")
  seconds = {name: [] for name in LAYOUTS}
  accuracy = {}
  with tempfile.TemporaryDirectory() as scratch:
    for _ in range(args.rounds):
      for name, cpu_devices in LAYOUTS.items():
        wall, rows = run_job(args.config, cpu_devices, scratch)
        seconds[name].append(wall)
        accuracy[name] = {r["stage"]: round(100 * r["accuracy"], 2) for r in rows}
        print(f"{name}: {wall:.1f} s, test accuracy {accuracy[name]}", flush=True)
  ratios = np.asarray(seconds["one device"]) / np.asarray(seconds["one per core"])
  print("\n| layout | wall s per round | test accuracy per stage |\n|---|---|---|")
  for name in LAYOUTS:
    print(f"| {name} | {', '.join(f'{s:.1f}' for s in seconds[name])} | {accuracy[name]} |")
  print(f"\none device / one per core, wall time per round: {[round(float(r), 2) for r in ratios]}")


if __name__ == "__main__":
  with results_log.recorded("KD job wall time: one XLA:CPU device against one per core"):
    main()
