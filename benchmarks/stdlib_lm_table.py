"""Bits per character of the character-level LM distillation demo, 3 seeds.

    python benchmarks/stdlib_lm_table.py --workdir=/tmp/stdlib_lm

Every run is a command-line run, `python -m kd_jax.main --config=configs/stdlib_lm.py:seed=S`
(`:tune,seed=S` with `--split=train_tail`, the split for choosing hyperparameters), so each
figure is reproduced by that command. Prints one row per stage (teacher, the student alone, each
distilled student): every seed's bits per character on the held-out split, their mean ± std,
and the seeds on which the arm beats the student alone.
"""
import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_runs  # noqa: E402  (benchmarks/, the script's folder)
import results_log  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/stdlib_lm", "Where runs are written.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "train_tail"],
                           "validation: the reported figures; train_tail: for tuning.")


def main(_):
  bpc, samples = {}, {}
  for seed in _SEEDS.value:
    arg = f"seed={seed}" + (",tune" if _SPLIT.value == "train_tail" else "")
    results = digits_runs.run_job(os.path.join(_WORKDIR.value, _SPLIT.value, f"seed{seed}"), arg,
                                  config="stdlib_lm")
    for row in results["rows"]:
      bpc.setdefault(row["stage"], []).append(row["bpc"])
    if seed == _SEEDS.value[0]:
      samples = results["samples"]
  alone = np.asarray(bpc["student_alone"])
  lines = [f"| stage ({_SPLIT.value} bpc) | " + " | ".join(f"seed {s}" for s in _SEEDS.value) +
           " | mean ± std | beats alone |", "|---|" + "---|" * (len(_SEEDS.value) + 2)]
  for stage, values in bpc.items():
    v = np.asarray(values)
    wins = "" if stage in ("teacher", "student_alone") else f"{int((v < alone).sum())}/{len(v)}"
    lines.append(f"| {stage} | " + " | ".join(f"{x:.4f}" for x in v) +
                 f" | {v.mean():.4f} ± {v.std():.4f} | {wins} |")
  table = "\n".join(lines)
  print(table)
  for stage, text in samples.items():
    print(f"\n{stage} (seed {_SEEDS.value[0]}): {text!r}")


if __name__ == "__main__":
  with results_log.recorded("Character-LM distillation on the standard library (bits per "
                            "character, 3 seeds)"):
    app.run(main)
