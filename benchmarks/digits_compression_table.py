"""Digits test accuracy of quantized students and of students on pruned data, each with and
without KD, 3 seeds.

    python benchmarks/digits_compression_table.py --workdir=/tmp/digits_compression

Every run is a command-line run of the KD job: `python -m kd_jax.main
--config=configs/digits_compression.py:ROW,seed=S`. Per seed the full-precision row trains the
teacher (CNN 32/64); the other rows restore it (`--config.teacher.checkpoint`). The students are
MLP 64, label-only ("alone") and 0.1·CE + 0.9·KD(T=4) ("KD"); the job chooses each arm's recipe
on validation (train[1000:] after training on train[:1000]) under the row's own quantization or
pruning, never on test. Rows (`--row`, repeated):
- `bits=K`: K-bit students (Polino et al. 2018, uniform, buckets of 256), with the size in bits
  and the accuracy of their full-precision shadows;
- `prune=F,score=X`: students on train without the fraction F of its examples by score X (kept:
  the hardest, or `keep=easiest`).
A row may add `--config.` overrides after a space, e.g. a wider learning-rate grid:
`--row="bits=2 --config.tune.learning_rate=(0.01,0.02,0.05,0.1)"`.
"""
import collections
import os
import re
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_runs  # noqa: E402  (benchmarks/, the script's folder)
import results_log  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/digits_compression", "Where runs are written.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_ROWS = flags.DEFINE_multi_string(
    "row", ["bits=4", "bits=2", "prune=0.3,score=el2n", "prune=0.7,score=el2n"],
    "configs/digits_compression.py args of one row pair (alone, KD); repeat the flag for more. "
    "Full precision comes first.")


def _label(row: str) -> str:
  row, *overrides = row.split(" ")
  if overrides:
    return f"{_label(row)} [{', '.join(o.removeprefix('--config.') for o in overrides)}]"
  args = dict(item.partition("=")[::2] for item in row.split(","))
  if args.get("bits") == "0":
    return "full precision"
  if "bits" in args:
    kd = (f", KD α={args.get('kd_weight', '0.9')} T={args.get('temperature', '4')}"
          if {"kd_weight", "temperature"} & set(args) else "")
    return f"{args['bits']}-bit" + (f" ({args['method']}{kd})" if "method" in args else
                                     f" ({kd[2:]})" if kd else "")
  if "prune" in args:
    kept = round(100 * (1 - float(args["prune"])))
    return (f"pruned {100 * float(args['prune']):g}% ({args.get('score', 'el2n')}, {kept}% kept"
            f"{', ' + args['keep'] if 'keep' in args else ''})")
  return row


def main(_):
  acc, bits, shadows = (collections.defaultdict(list) for _ in range(3))
  for seed in _SEEDS.value:
    base = os.path.join(_WORKDIR.value, f"seed{seed}")
    teacher = os.path.join(base, "full_precision", "teacher", "checkpoints")
    for row in ["", *_ROWS.value]:
      args, *overrides = row.split(" ")
      name = args.replace(",", "_").replace("=", "") + "".join(
          re.sub(r"\W+", "_", o) for o in overrides)
      overrides += [f"--config.teacher.checkpoint={teacher}"] if row else []
      rows = {r["stage"]: r for r in digits_runs.run_job(
          os.path.join(base, name or "full_precision"),
          ",".join(filter(None, [args, f"seed={seed}"])), *overrides,
          config="digits_compression")}
      if not row:
        acc["teacher (CNN 32/64)"].append(rows["teacher"]["accuracy"])
        bits["teacher (CNN 32/64)"] = rows["teacher"]["bits"]
      for stage, arm in (("student_baseline", "alone"), ("student_kd", "KD")):
        label = f"{_label(row) if row else 'full precision'}, {arm}"
        acc[label].append(rows[stage]["accuracy"])
        bits[label] = rows[stage]["bits"]
        if "full_precision_accuracy" in rows[stage]:
          shadows[label].append(rows[stage]["full_precision_accuracy"])
  print(f"\ndigits test accuracy (497 images), MLP 64 students, seeds {_SEEDS.value}:\n"
        f"{digits_runs.markdown_table(acc, _SEEDS.value, 'row')}")
  print("\nsize of each row's model, and the accuracy of the quantized students' full-precision "
        "shadows (mean ± std):\n| row | bits | vs float32 | shadows |\n|---|---|---|---|")
  full = bits["full precision, KD"]
  for label, size in bits.items():
    shadow = digits_runs.mean_std(shadows[label]) if shadows[label] else ""
    print(f"| {label} | {size:,} | {full / size:.1f}× smaller | {shadow} |"
          if size < full else f"| {label} | {size:,} | | {shadow} |")


if __name__ == "__main__":
  with results_log.recorded("Digits compression: quantized and pruned students, with and without "
                            "KD (test accuracy, 3 seeds)"):
    app.run(main)
