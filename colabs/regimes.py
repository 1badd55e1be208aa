# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Teacher–student regimes: several teachers, mutual learning, a mean teacher
#
# Classic knowledge distillation trains one student from one frozen, pre-trained teacher (Hinton
# et al., 2015, [arXiv:1503.02531](https://arxiv.org/abs/1503.02531)). kd_jax's regimes job
# (`kd_jax.regimes.job`, configs in `configs/digits_regimes.py`) trains other arrangements of
# teachers and students on the same plumbing. This notebook runs three of them on scikit-learn's
# bundled handwritten digits (1,797 real 8×8 images, offline) and draws their learning curves side
# by side:
#
# - **multi-teacher**: a CNN and a wide MLP teacher are trained first; the student then matches the
#   average of their softened predictions, averaged in probability space as MEAL V2 does (Shen &
#   Savvides, 2020, [arXiv:2009.08453](https://arxiv.org/abs/2009.08453)). Several teachers give a
#   richer target than one when they make different mistakes.
# - **mutual learning** (DML: Zhang et al., CVPR 2018,
#   [arXiv:1706.00384](https://arxiv.org/abs/1706.00384)): no pre-trained teacher at all. The MLP
#   student and a small CNN peer train together from scratch, each fitting the labels and the
#   other's current predictions.
# - **mean teacher** (Tarvainen & Valpola, NeurIPS 2017,
#   [arXiv:1703.01780](https://arxiv.org/abs/1703.01780)): semi-supervised. Only 10% of the train
#   labels are kept; the teacher is an exponential moving average of the student's weights, and its
#   confident predictions on unlabeled images (confidence ≥ 0.95, as FixMatch: Sohn et al., 2020,
#   [arXiv:2001.07685](https://arxiv.org/abs/2001.07685)) become the student's pseudo-labels.
#
# Every regime trains the same student, an MLP with one hidden layer of 64 units, so each can be
# compared with that student trained alone on all labels (`student_baseline`).

# %% [markdown]
# ## Setup
# **In Colab** this cell installs kd_jax with pip: `pip install kd_jax` from the package index, which
# works once kd_jax is published on PyPI. Until then, upload or mount a checkout of the repository
# (e.g. on Google Drive) and set `KD_JAX_PATH` to it, here or in the environment: the cell then
# installs from that local path. **Elsewhere** (your Jupyter, CI) it installs nothing and uses the
# checkout this notebook lives in.
#
# The experiment configs (`configs/`) sit next to the `kd_jax` package in the repository and are
# not part of the pip package; the cell puts the checkout on `sys.path` so that `from configs
# import ...` works. `losses_in_your_project` needs no configs; the other notebooks read them, so
# in Colab they need the checkout (`KD_JAX_PATH`), and the cell says so when there is none.

# %%
import os
import subprocess
import sys

KD_JAX_PATH = os.environ.get("KD_JAX_PATH", "")  # Colab: your uploaded or mounted checkout

if "google.colab" in sys.modules:
  if KD_JAX_PATH:  # a local checkout: the package and its configs
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", KD_JAX_PATH], check=True)
  else:  # the released package from PyPI, without configs/
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "kd_jax"], check=True)
  REPO_DIR = KD_JAX_PATH
else:
  REPO_DIR = os.path.dirname(os.getcwd())  # Jupyter starts kernels in the notebook's folder, colabs/
if REPO_DIR:
  sys.path.insert(0, os.path.abspath(REPO_DIR))
HAVE_CONFIGS = bool(REPO_DIR) and os.path.isdir(os.path.join(REPO_DIR, "configs"))
if not HAVE_CONFIGS:
  print("No kd_jax checkout with configs/ found: notebooks that import `configs` need one; "
        "upload or mount it and set KD_JAX_PATH to its path.")

# %% [markdown]
# ## Parameters
# `SMALL` shrinks every stage to one epoch, 20 steps (the config's `runlocal` argument); CI sets it
# through `KD_JAX_COLAB_SMALL=1`, and its accuracies mean nothing. Leave it off for the real
# recipe: 30 epochs per stage, 1–3 minutes per regime on a CPU.
# Stages resume from the checkpoints in `WORKDIR`, so a rerun restores finished stages.

# %%
SMALL = os.environ.get("KD_JAX_COLAB_SMALL") == "1"
SEED = 0
REGIMES = ("multi_teacher", "mutual", "mean_teacher")
WORKDIR = os.environ.get("KD_JAX_COLAB_WORKDIR",
                         f"/tmp/kd_jax_regimes/{'small' if SMALL else 'full'}_seed{SEED}")
DATA_DIR = os.environ.get("KD_JAX_COLAB_DATA_DIR", "")  # "" = TFDS default, ~/tensorflow_datasets

# %% [markdown]
# ## The configs
# `digits_regimes.get_config("regime=NAME")` builds one regime's run; the `regime` group holds that
# regime's own settings (printed below; their papers' defaults). The same run from the command
# line: `python -m kd_jax.main --config=configs/digits_regimes.py:regime=mutual --workdir=/tmp/mutual`.
#
# Each run also trains the student alone (`student.baseline`). The three runs share the student,
# its recipe, data and seed, so that baseline would be the same network three times: only the
# first run trains it.

# %%
from configs import digits_regimes
from kd_jax import experiment, metrics
from kd_jax.regimes import job

configs = {}
for i, regime in enumerate(REGIMES):
  config = digits_regimes.get_config(f"regime={regime},seed={SEED}" + (",runlocal" if SMALL else ""))
  with config.unlocked():
    config.data.data_dir = DATA_DIR
    config.student.baseline = i == 0
  configs[regime] = config
  print(f"{regime}: {config.regime.to_dict()}")
print("student:", config.student.model, config.student.model_kwargs.to_dict(),
      f"{config.student.num_epochs} epoch(s) per stage")

# %% [markdown]
# ## Train the three regimes
# `job.run(config, workdir)` trains every stage of a regime and returns one row per evaluated
# network, with its accuracy on the test split (497 images). Each stage writes
# `WORKDIR/<regime>/<stage>/metrics.jsonl` (plus TensorBoard events and Orbax checkpoints).

# %%
rows = {}
for regime, config in configs.items():
  rows[regime] = job.run(config, os.path.join(WORKDIR, regime))
  print(f"\n{regime}\n{experiment.format_table(rows[regime])}")

# %% [markdown]
# ## Results
# One line per evaluated network. `mutual` evaluates both networks it trained; `mean_teacher`
# evaluates the student trained on its 10% of labels alone, the mean-teacher student and the EMA
# teacher itself. With `SMALL` on, the EMA teacher is rarely 95% confident within 20 steps, so the
# mean-teacher student gets few or no pseudo-labels and trains much like the labeled-only one.

# %%
baseline = rows[REGIMES[0]][0]
print(f"{'regime':<14} {'network':<24} {'model':<20} {'test acc':>8}")
print(f"{'(none)':<14} {baseline['stage']:<24} {baseline['model']:<20} {100 * baseline['accuracy']:>7.2f}%")
for regime in REGIMES:
  for row in rows[regime]:
    if row["stage"] != "student_baseline":
      print(f"{regime:<14} {row['stage']:<24} {row['model']:<20} {100 * row['accuracy']:>7.2f}%")

# The mean teacher learns from unlabeled images only where its EMA teacher is confident enough.
last = metrics.read_jsonl(os.path.join(WORKDIR, "mean_teacher", "mean_teacher", "metrics.jsonl"))[-1]
print(f"\nmean_teacher, step {last['step']}: {last['train/pseudo_label_fraction']:.1%} of the "
      "unlabeled images got a pseudo-label")

# %% [markdown]
# ## Learning curves
# Training accuracy on each stage's own batches, read back from the `metrics.jsonl` files
# (`kd_jax.metrics.read_jsonl`; one record every `log.every_steps` steps). The dashed line in each
# panel is the student alone on all labels; the legend gives each network's test accuracy. The
# mean-teacher panel's accuracies are on the labeled rows of its batches (10% of train).

# %%
import matplotlib.pyplot as plt

test_accuracy = {(regime, row["stage"]): row["accuracy"] for regime in REGIMES for row in rows[regime]}
CURVES = {  # regime: (stage directory, metric, label, the row whose test accuracy it shows)
    "multi_teacher": [("teacher_cnn", "train/accuracy", "CNN teacher", "teacher_cnn"),
                      ("teacher_mlp", "train/accuracy", "MLP 256-256 teacher", "teacher_mlp"),
                      ("student_multi_teacher", "train/accuracy", "student of both",
                       "student_multi_teacher")],
    "mutual": [("mutual", "train/student/accuracy", "MLP student", "mutual/student"),
               ("mutual", "train/peer/accuracy", "CNN peer", "mutual/peer")],
    "mean_teacher": [("student_labeled_only", "train/accuracy", "student, 10% labels only",
                      "student_labeled_only"),
                     ("mean_teacher", "train/accuracy", "mean-teacher student",
                      "mean_teacher/student")],
}

fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
base = metrics.read_jsonl(os.path.join(WORKDIR, REGIMES[0], "student_baseline", "metrics.jsonl"))
for ax, regime in zip(axes, REGIMES):
  ax.plot([r["step"] for r in base], [r["train/accuracy"] for r in base], "--", color="gray",
          label=f"student alone (test {baseline['accuracy']:.1%})")
  for stage_dir, key, label, row in CURVES[regime]:
    records = metrics.read_jsonl(os.path.join(WORKDIR, regime, stage_dir, "metrics.jsonl"))
    ax.plot([r["step"] for r in records], [r[key] for r in records],
            label=f"{label} (test {test_accuracy[regime, row]:.1%})")
  ax.set(title=regime, xlabel="step")
  ax.legend(fontsize=8, loc="best")
axes[0].set_ylabel("train accuracy")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What to expect from the full runs
# With `SMALL` off (30 epochs, seeds 0–2), the README's table reads: the student alone 98.26%,
# multi-teacher 98.26% (the CNN teacher alone reaches 99.13%), the DML student 98.52% and its CNN
# peer 98.46%, and, with 10% of the labels, the mean-teacher student 93.76% against 91.48% for the
# same student on those labels alone. The semi-supervised gain is the clear one; on a dataset this
# easy the others are within about two seed standard deviations of the student alone.
#
# Other regimes (`mtard`, `bdkd`, `born_again`, `uskd`, `tgeo`, `label_free`) are one
# `regime=` away in `digits_regimes.get_config`.
