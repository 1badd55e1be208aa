"""Shared by the digits benchmark scripts: one command-line run of the KD job, and tables."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(workdir: str, arg: str, *overrides: str, config: str = "digits_kd") -> list[dict]:
  """`python -m kd_jax.main --config=configs/CONFIG.py:ARG --workdir=WORKDIR OVERRIDES`;
  returns its results.json rows (a finished workdir is restored, not retrained)."""
  command = [sys.executable, "-m", "kd_jax.main", f"--config=configs/{config}.py:{arg}",
             f"--workdir={workdir}", *overrides]
  print("$", " ".join(command[1:]), flush=True)
  subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                 env={**os.environ, "CI": "true"})
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def mean_std(values) -> str:
  """`"98.19 ± 0.24"` of fractions, in percent."""
  v = 100 * np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std():.2f}"


def markdown_table(acc: dict[str, list[float]], seeds: list[str], first: str = "terms") -> str:
  """One row per key: each seed's value (percent) and their mean ± std."""
  lines = [f"| {first} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
           "|---|" + "---|" * (len(seeds) + 1)]
  for row, values in acc.items():
    lines.append(f"| {row} | " + " | ".join(f"{100 * x:.2f}" for x in values) +
                 f" | {mean_std(values)} |")
  return "\n".join(lines)
