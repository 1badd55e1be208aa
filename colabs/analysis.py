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
# # Looking inside a distilled student: CKA, DisWOT and calibration
#
# Test accuracy says how often a student is right; it does not say what distillation changed. This
# notebook trains the quick start's three networks on scikit-learn's bundled digits (a CNN
# teacher, an MLP student trained on the labels alone, and the same MLP distilled with Hinton KD:
# Hinton et al., 2015, [arXiv:1503.02531](https://arxiv.org/abs/1503.02531)), then looks at them
# three ways:
#
# 1. **Layer-by-layer similarity.** Linear CKA (Kornblith et al., ICML 2019,
#    [arXiv:1905.00414](https://arxiv.org/abs/1905.00414)) compares two layers' representations of
#    the same images, across different widths: 1 means the same geometry up to rotation and scale.
#    A heatmap of every teacher layer against every student layer shows where the KD student
#    became more teacher-like than the baseline.
# 2. **Choosing a student before training it.** DisWOT (Dong, Li & Wei, CVPR 2023,
#    [arXiv:2303.15678](https://arxiv.org/abs/2303.15678)) scores randomly initialised candidate
#    students by how well their class-gradient and sample-relation structure matches the
#    teacher's, with no training: a cheap prior over architectures for distillation.
# 3. **Calibration.** Is a 90%-confident prediction right 90% of the time? Reliability diagrams
#    and the expected calibration error (ECE; Guo et al., ICML 2017,
#    [arXiv:1706.04599](https://arxiv.org/abs/1706.04599)) compare the baseline and the KD student.
#    Soft targets are a form of label smoothing, which changes calibration (Müller et al., 2019,
#    [arXiv:1906.02629](https://arxiv.org/abs/1906.02629)).

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
# `SMALL` trains every stage for one epoch, 20 steps (the config's `runlocal` argument), scores
# 3 of the 6 DisWOT candidates with one initialisation each; CI sets it through `KD_JAX_COLAB_SMALL=1`, and its
# numbers mean nothing. Leave it off for 30 epochs per stage (a few minutes on a CPU). Stages
# resume from the checkpoints in `WORKDIR`, so a rerun restores finished stages.

# %%
SMALL = os.environ.get("KD_JAX_COLAB_SMALL") == "1"
SEED = 0
WORKDIR = os.environ.get("KD_JAX_COLAB_WORKDIR",
                         f"/tmp/kd_jax_analysis/{'small' if SMALL else 'full'}_seed{SEED}")
DATA_DIR = os.environ.get("KD_JAX_COLAB_DATA_DIR", "")  # "" = TFDS default, ~/tensorflow_datasets
CKA_EXAMPLES = 497  # the whole digits test split
DISWOT_INITS = 1 if SMALL else 5  # random initialisations averaged per candidate
DISWOT_EXAMPLES = 64  # train images in DisWOT's one batch (the reference's 64)

# %% [markdown]
# ## Train teacher, baseline student and KD student
# `configs/digits_kd.py` with `tune=false`: no per-arm recipe search on validation (the quick start
# runs it), both students use ±1-pixel shifts, SGD 0.05 and 30 epochs. The KD student minimises
# 0.1·CE + 0.9·T²·KL(teacher_T ‖ student_T) with T = 4. `kd_job.run` evaluates each stage on the
# test split (497 images) and writes its checkpoints to `WORKDIR/<stage>/checkpoints`.

# %%
from configs import digits_kd
from kd_jax import experiment, kd_job

config = digits_kd.get_config(f"seed={SEED},tune=false" + (",runlocal" if SMALL else ""))
with config.unlocked():
  config.data.data_dir = DATA_DIR
rows = kd_job.run(config, WORKDIR)
print(experiment.format_table(rows))

# %% [markdown]
# ## Restore the three networks
# `kd_jax.analysis.cka.restore_stage` rebuilds a stage's model from the config and loads its latest
# checkpoint; `experiment.Experiment` holds the data splits and the models' builders.
# (`python -m kd_jax.analysis.cka` and `python -m kd_jax.analysis.diswot` do the same from a
# workdir that `python -m kd_jax.main` made; they read its `config.json`.)

# %%
from kd_jax import data, models
from kd_jax.analysis import cka

exp = experiment.Experiment(config)
networks = {stage: cka.restore_stage(exp, WORKDIR, stage)
            for stage in ("teacher", "student_baseline", "student_kd")}
test_batch = next(data.eval_batches(exp.eval_source, batch_size=CKA_EXAMPLES, mean=exp.info.mean,
                                    std=exp.info.std, prefetch=0))
for stage, (apply_fn, variables) in networks.items():
  print(f"{stage}: {models.count_params(variables['params']):,} params")

# %% [markdown]
# ## Layer-by-layer CKA
# Each model's taps are its named features (`ModelOutput.features`, maps flattened per example)
# and its logits. `cka.cka_matrix` computes linear CKA for every (teacher tap, student tap) pair on
# the same test images. For the quick start's full run (recipes tuned on validation) the README
# reports KD's clearest mark on the logits: their CKA with the teacher's rises from 0.67
# (baseline) to 0.95 (KD), while the hidden layer moves less (0.84–0.87 to 0.89).

# %%
import matplotlib.pyplot as plt
import numpy as np


def taps_of(stage):
  apply_fn, variables = networks[stage]
  return cka.taps(apply_fn(variables, test_batch["image"], train=False)[0])


teacher_taps = taps_of("teacher")
matrices = {stage: cka.cka_matrix(teacher_taps, taps_of(stage))
            for stage in ("student_baseline", "student_kd")}
student_names = list(taps_of("student_kd"))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
for ax, (stage, matrix) in zip(axes, matrices.items()):
  image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(student_names)), student_names, rotation=30, ha="right")
  ax.set_yticks(range(len(teacher_taps)), list(teacher_taps))
  for (i, j), value in np.ndenumerate(matrix):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
            color="black" if value > 0.6 else "white")
  ax.set(title=f"teacher vs {stage}", xlabel="student tap")
axes[0].set_ylabel("teacher tap")
fig.colorbar(image, ax=axes, label="linear CKA")
plt.show()

for stage, matrix in matrices.items():
  print(f"{stage}: CKA(teacher logits, student logits) = {matrix[-1, -1]:.3f}")

# %% [markdown]
# ## DisWOT: rank candidate students without training them
# `diswot.rank` scores each candidate, freshly initialised, against the trained teacher on one
# batch of `DISWOT_EXAMPLES` train images: score = −(semantic distance + relation distance),
# higher is better. The candidates are the capacity experiment's digits students (MLPs of 16–128
# hidden units, two small CNNs). `benchmarks/diswot_digits.py` checks the ranking against the KD
# accuracy those students reach: over the means of three seeds the two orders agree closely
# (Spearman ρ = 0.90), but so does ranking by parameter count, and for a single seed the
# correlation is weak (ρ 0.26–0.41; README). Read the ranking as a cheap prior, not a verdict.

# %%
from kd_jax.analysis import diswot

specs = diswot.DIGITS_STUDENTS[::2] if SMALL else diswot.DIGITS_STUDENTS  # SMALL: 3 of the 6
candidates = [diswot.Candidate.parse(spec) for spec in specs]
ranking = diswot.rank(exp, networks["teacher"], candidates, examples=DISWOT_EXAMPLES, seed=SEED,
                      inits=DISWOT_INITS)
print(f"DisWOT ranking against the trained {config.teacher.model} "
      f"({DISWOT_INITS} init(s) per candidate; higher is better)")
print(f"{'rank':>4}  {'student':<40} {'params':>7} {'score':>8} {'semantic':>9} {'relation':>9}")
for i, row in enumerate(ranking, 1):
  print(f"{i:>4}  {row['student']:<40} {row['params']:>7,} {row['score']:>8.4f} "
        f"{row['semantic']:>9.4f} {row['relation']:>9.4f}")

fig, ax = plt.subplots(figsize=(7, 3))
ax.barh([r["student"] for r in ranking][::-1], [r["score"] for r in ranking][::-1])
ax.set(xlabel="DisWOT score (higher = closer to the teacher)", title="candidate students")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Calibration: reliability diagrams and ECE
# The test predictions are split into 15 equal-width bins of confidence (the top softmax
# probability). A calibrated model's accuracy in each bin equals its mean confidence there; the
# ECE is the average gap, weighted by the bins' sizes:
# ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b|, between 0 (calibrated) and 1.
# `trainer.predict` returns every test image's logits; `kd_jax.analysis.calibration.reliability`
# bins them and computes the ECE.

# %%
from kd_jax import trainer
from kd_jax.analysis.calibration import reliability

calibration = {}
for stage, (apply_fn, variables) in networks.items():
  logits, labels = trainer.predict(apply_fn, variables, exp.eval_batches(), exp.options.mesh_axes)
  calibration[stage] = reliability(logits, labels)

print(f"{'network':<18} {'test acc':>8} {'mean conf':>9} {'ECE':>7}")
for stage, r in calibration.items():
  print(f"{stage:<18} {r.test_accuracy:>8.2%} {r.mean_confidence:>9.2%} {r.ece:>7.4f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, stage in zip(axes, ("student_baseline", "student_kd")):
  r, width = calibration[stage], 1 / len(calibration[stage].count)
  centers = (np.arange(len(r.count)) + 0.5) * width
  filled = r.count > 0
  ax.bar(centers[filled], r.accuracy[filled], width=width, edgecolor="black",
         label="accuracy in the bin")
  ax.plot(centers[filled], r.confidence[filled], "o", color="tab:red",
          label="mean confidence in the bin")
  ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
  ax.set(title=f"{stage}: ECE {r.ece:.3f}", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
  ax.legend(loc="upper left", fontsize=8)
axes[0].set_ylabel("accuracy")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the results
# - The CKA heatmaps show which student layers moved towards the teacher's; compare the logits
#   column of the two panels.
# - A DisWOT ranking is only a prior: it is computed before any training, from one batch.
# - Bars below their red dot (and the diagonal) are over-confident bins, bars above it
#   under-confident ones. With `SMALL` on, the students have trained for 20 steps: run the full
#   recipe before reading anything into the ECEs. Read each ECE next to its test accuracy: ECE
#   only asks that confidence match accuracy, so a weak model that knows it is weak scores well.
