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
# # kd_jax quickstart: distill a CNN on handwritten digits
#
# This notebook trains a **teacher** CNN, a label-only **baseline student**, and the same student
# trained with **knowledge distillation** (Hinton et al., 2015, [arXiv:1503.02531](https://arxiv.org/abs/1503.02531)),
# then compares them. The data is scikit-learn's bundled handwritten digits (1,797 real 8×8 images),
# so everything runs offline. On a CPU the full recipe takes a few minutes.
#
# Then it swaps the loss for Decoupled KD (DKD) with one config change, and shows how to call a
# kd_jax loss directly from your own JAX code.

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
# `SMALL` shrinks every stage to one epoch (the config's `runlocal` argument); CI sets it through
# `KD_JAX_COLAB_SMALL=1`. Leave it off for the real recipe: 30 epochs per stage.
# Each stage resumes from the checkpoints in `WORKDIR`, so rerunning the notebook restores finished
# stages instead of retraining them; change `WORKDIR` to start afresh.

# %%
SMALL = os.environ.get("KD_JAX_COLAB_SMALL") == "1"
SEED = 0
EPOCHS = 1 if SMALL else 30  # per stage: teacher, baseline student, KD student
WORKDIR = os.environ.get("KD_JAX_COLAB_WORKDIR",
                         f"/tmp/kd_jax_quickstart/{'small' if SMALL else 'full'}_e{EPOCHS}_seed{SEED}")
DATA_DIR = os.environ.get("KD_JAX_COLAB_DATA_DIR", "")  # "" = TFDS default, ~/tensorflow_datasets

# %% [markdown]
# ## The config
# `configs/digits_kd.py` holds the recipe (SGD with momentum, cosine decay, ±1-pixel random shifts);
# its docstring says how the KD hyperparameters were chosen on a validation split. The KD student
# minimises the weighted sum of the terms in `distill.terms` (printed below): 0.1·CE(student, labels)
# + 0.9·T²·KL(teacher_T ‖ student_T) with T = 4. Each term names a loss (`"ce"` is the task loss),
# its `weight` and its `hparams`. The same file runs from the command line:
# `python -m kd_jax.main --config=configs/digits_kd.py --workdir=/tmp/kd_digits`.
#
# Configs are locked, so a typo in a field name fails loudly; edit them inside `config.unlocked()`.

# %%
from configs import digits_kd
from kd_jax import experiment, kd_job, losses, metrics

config = digits_kd.get_config(f"seed={SEED}" + (",runlocal" if SMALL else ""))
with config.unlocked():
  config.update_from_flattened_dict({
      "data.data_dir": DATA_DIR,
      "teacher.num_epochs": EPOCHS,
      "student.num_epochs": EPOCHS,
      "tune.num_epochs": (EPOCHS,),  # each student arm still picks shifts and lr on validation
  })
print(config.teacher.model, "→", config.student.model)
print(config.distill)

# %% [markdown]
# ## Train teacher, baseline student and KD student
# `kd_job.run` first picks each student arm's recipe (shifts on/off, learning rate) on a validation
# split carved from train, then trains the three stages in order, evaluates each on the test split
# (497 images) and returns one row per stage, with the recipe it used. The first call prepares the digits set in the TFDS data_dir.
# Every stage writes `WORKDIR/<stage>/metrics.jsonl`, TensorBoard event files and Orbax checkpoints.

# %%
rows = kd_job.run(config, WORKDIR)
print(experiment.format_table(rows))

# %% [markdown]
# ## Learning curves
# `train/loss` is the objective each stage minimised, which differs between stages (the KD student's
# includes the distillation term), so the curves below use `terms/ce`, the cross-entropy with the true
# labels, which every stage logs (each term is logged as `terms/<loss>`). The KD student fits the
# teacher's softened outputs as well as the labels, so its training CE need not fall as low as the
# baseline's.

# %%
import matplotlib.pyplot as plt

STAGES = [row["stage"] for row in rows]
fig, (ax_ce, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.5))
for stage in STAGES:
  records = metrics.read_jsonl(os.path.join(WORKDIR, stage, "metrics.jsonl"))
  steps = [r["step"] for r in records]
  ax_ce.plot(steps, [r["terms/ce"] for r in records], label=stage)
  ax_acc.plot(steps, [r["train/accuracy"] for r in records], label=stage)
ax_ce.set(xlabel="step", ylabel="train cross-entropy (terms/ce)", yscale="log")
ax_acc.set(xlabel="step", ylabel="train accuracy (augmented batches)")
ax_acc.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Changing the loss: Decoupled KD
# Any name in `kd_jax.losses.list_losses()` can be a term. A term's hyperparameters go in its
# `hparams` under the loss function's keyword names. DKD (Zhao et al., CVPR 2022,
# [arXiv:2203.08679](https://arxiv.org/abs/2203.08679)) splits KD into a target-class part (weight
# `alpha`) and a non-target part (weight `beta`). Its recipe is CE + DKD, with DKD's weight ramped
# up linearly from 0 over the first 1/12 of training (`warmup_steps`; mdistiller: 20 of 240 epochs);
# `digits_kd.get_config("terms=dkd")` builds the same terms. The values below are mdistiller's
# CIFAR-100 defaults, not tuned for digits: compare losses on the validation split
# (`digits_kd.get_config("validate")`) before trusting one.
#
# The teacher is already trained, so this run restores it from its checkpoint
# (`teacher.checkpoint`) and skips the baseline (`student.baseline=False`). Only the DKD student
# trains.

# %%
print(losses.list_losses())
spec = losses.get_loss("dkd")
print(spec.inputs, "|", spec.paper)

# %%
from configs import common

num_steps = EPOCHS * (1300 // config.data.batch_size)  # the digits train split has 1,300 images
dkd_config = config.copy_and_resolve_references()  # same data, seed and epochs as above
with dkd_config.unlocked():
  dkd_config.update_from_flattened_dict({
      "teacher.checkpoint": os.path.join(WORKDIR, "teacher", "checkpoints"),
      "student.baseline": False,
  })
  dkd_config.distill.terms = (
      common.term("ce", weight=1.0),
      common.term("dkd", weight=1.0, warmup_steps=max(num_steps // 12, 1),
                  hparams={"alpha": 1.0, "beta": 8.0, "temperature": 4.0}))
print(dkd_config.distill)

dkd_rows = kd_job.run(dkd_config, WORKDIR + "_dkd")
rows_all = rows + [{**dkd_rows[-1], "stage": "student_dkd"}]
print(experiment.format_table(rows_all))

# %% [markdown]
# ## Test accuracy

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
names = [row["stage"] for row in rows_all]
accuracies = [100 * row["accuracy"] for row in rows_all]
bars = ax.bar(names, accuracies, color=["tab:gray", "tab:blue", "tab:orange", "tab:green"])
ax.bar_label(bars, fmt="%.1f%%")
ax.set(ylabel="test accuracy (%)", ylim=(max(0, min(accuracies) - 5), 100.5),
       title="digits, test split (axis zoomed)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Using a loss in your own JAX code
# The losses are pure functions: student first, teacher second, hyperparameters keyword-only.
# They return **one value per example** and leave the reduction to you; `masked_mean` drops padded
# examples. Gradients flow to the student only, because the teacher's logits are wrapped in
# `stop_gradient`.

# %%
import jax
import jax.numpy as jnp

student_logits = jax.random.normal(jax.random.PRNGKey(0), (4, 10))
teacher_logits = jax.random.normal(jax.random.PRNGKey(1), (4, 10))
labels = jnp.array([3, 1, 4, 1])
mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last example is padding

per_example = losses.kd(student_logits, teacher_logits, temperature=4.0)  # shape [4]
print("kd per example:", per_example)
print("masked mean:", losses.masked_mean(per_example, mask))


def objective(student_logits):
  return losses.masked_mean(
      losses.dkd(student_logits, teacher_logits, labels, alpha=1.0, beta=8.0, temperature=4.0), mask)


grads = jax.grad(objective)(student_logits)
print("gradient of the padded example:", grads[-1])  # all zeros

# %% [markdown]
# ## Next steps
# - Other configs live in `configs/`; each file's docstring holds its command line.
# - `kd_jax.distiller.Distiller` turns a list of `Term`s into the method trained here, and
#   `kd_jax.step.make_train_step` turns it into the jittable step, for your own loop.
