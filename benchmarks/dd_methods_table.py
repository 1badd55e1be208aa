"""Every dataset-distillation method on digits at IPC 1 and 10, under both label protocols.

    PYTHONPATH=. python benchmarks/dd_methods_table.py --workdir=/tmp/dd_methods

Runs `configs/dd_digits.py:ipcK,method=M,teacher_labels` for each method (trajectory matching
twice: MTT with the exact gradient, and DATM), sharing one expert buffer and one teacher, and
prints one markdown table: each cell is the test accuracy of 5 fresh ConvNets (mean ± std)
trained on the distilled set with its own labels ("labels": hard class ids, or DATM's learned
soft labels, at the learned α where the method learns one, else lr 0.01) or with the teacher's
soft labels on every augmented batch ("teacher", T = 4). The random real subset's row comes from
any run (each run evaluates the same subset). A cell is n/a when the method cannot run at that
IPC (INFER at IPC 1: one base image per class plus its compensators exceed the budget). Finished workdirs are reused, so a killed
table resumes. Set `--methods` / `--ipcs` to run part of it.
"""
import argparse
import os
import subprocess

from digits_runs import mean_std, run_job

ROWS = {  # row name → config args
    "DC (DSA)": "method=dc",
    "DM": "method=dm",
    "MTT (exact)": "method=mtt",
    "DATM": "method=mtt,datm",
    "SRe2L": "method=sre2l",
    "RDED": "method=rded",
    "INFER": "method=infer",
}


def _labels_cell(results: dict) -> dict:
  return results.get("distilled_learned_lr") or results["distilled_fixed_lr"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--methods", default=",".join(ROWS), help="comma-separated row names")
  parser.add_argument("--ipcs", default="1,10")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  ipcs = [int(i) for i in args.ipcs.split(",")]
  rows = [r for r in ROWS if r in args.methods.split(",")]
  shared = (f"seed={args.seed},experts={os.path.join(args.workdir, 'experts')},"
            f"teacher_dir={os.path.join(args.workdir, 'shared')}")
  results = {}
  for ipc in ipcs:
    for row in rows:
      name = ROWS[row].replace("method=", "").replace(",", "_")
      workdir = os.path.join(args.workdir, f"{name}_ipc{ipc}")
      try:
        results[row, ipc] = run_job(workdir, f"ipc{ipc},{ROWS[row]},teacher_labels,{shared}",
                                    "--config.eval.full_data_epochs=0", config="dd_digits")
      except subprocess.CalledProcessError:  # e.g. INFER's budget at IPC 1: the job says why
        print(f"{row} at IPC {ipc} did not run; rerun its command to see why", flush=True)
  header = "| method | " + " | ".join(f"IPC {i} {p}" for i in ipcs for p in ("labels", "teacher"))
  lines = [header + " |", "|---|" + "---|" * (2 * len(ipcs))]
  any_run = {ipc: next(results[r, ipc] for r in rows if (r, ipc) in results) for ipc in ipcs}

  def cells(pick, row=None):
    return " | ".join("n/a" if row and (row, ipc) not in results
                      else mean_std(pick(ipc, p)["accuracies"])
                      for ipc in ipcs for p in ("labels", "teacher"))

  lines.append("| random real subset | " + cells(
      lambda ipc, p: any_run[ipc]["random_real"] if p == "labels"
      else any_run[ipc]["teacher_protocol"]["random_real"]) + " |")
  for row in rows:
    lines.append(f"| {row} | " + cells(
        lambda ipc, p, row=row: _labels_cell(results[row, ipc]) if p == "labels"
        else results[row, ipc]["teacher_protocol"]["distilled"], row) + " |")
  teacher = next(iter(results.values()))["teacher_accuracy"]
  print(f"\nteacher (ConvNet-BN depth 2, width 64): {100 * teacher:.2f}% test accuracy")
  stored = {f"{row} IPC {ipc}": (r["num_images"], r["stored_floats"])
            for (row, ipc), r in results.items()}
  print("(training images, floats stored) per set:", stored)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
