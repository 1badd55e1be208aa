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
# # Distilling a character-level language model
#
# Knowledge distillation for sequences works token by token: at every position the student
# matches the teacher's whole next-token distribution, not only the one character that came
# next (word-level KD: Kim & Rush, 2016, [arXiv:1606.07947](https://arxiv.org/abs/1606.07947);
# Hinton et al., 2015, [arXiv:1503.02531](https://arxiv.org/abs/1503.02531)). The teacher's
# distribution says which other characters were plausible, which one-hot targets cannot.
#
# This notebook runs kd_jax's language-model job (`kd_jax.sequence.job`, config
# `configs/stdlib_lm.py`). Its corpus needs no download: the Python standard library's own source
# (23 fixed modules for training, 10 others for validation), read from the Python that runs the
# notebook. It trains a small causal transformer teacher, then a smaller student two or three ways
# from the same initialisation on the same batches:
#
# - `alone`: next-character cross-entropy only;
# - `token_kd`: ½ CE + ½ forward KL to the teacher's distribution at every position;
# - `topk` (full run only): the same from the teacher's top-8 logits stored once on disk, with the
#   rest of its probability mass as one bin, so the student never runs the teacher (as in
#   offline LLM distillation).
#
# Models are scored in **bits per character** (bpc) on the held-out files; lower is better. Then
# each network continues a prompt with `kd_jax.sequence.sampling.sample` (a key/value cache,
# one jitted `lax.scan`).
# The config also has MiniLM attention transfer (Wang et al., 2020,
# [arXiv:2002.10957](https://arxiv.org/abs/2002.10957)) and on-policy GKD (Agarwal et al., 2024,
# [arXiv:2306.13649](https://arxiv.org/abs/2306.13649)) arms: add `minilm` or `on_policy` to
# `ARMS` below.

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
# `SMALL` uses the config's `runlocal` argument: tiny models (width 32 and 16) trained for 6 steps
# each, scored on 64 validation windows; CI sets it through `KD_JAX_COLAB_SMALL=1`, and its samples
# are noise. Leave it off for the real recipe (1,500 teacher and 800 student steps, AdamW 3e-3;
# about 3 minutes for the teacher and 1 per student on a CPU). Stages resume from the
# checkpoints in `WORKDIR`, so a rerun restores finished stages.

# %%
SMALL = os.environ.get("KD_JAX_COLAB_SMALL") == "1"
SEED = 0
ARMS = ("alone", "token_kd") if SMALL else ("alone", "token_kd", "topk")
WORKDIR = os.environ.get("KD_JAX_COLAB_WORKDIR",
                         f"/tmp/kd_jax_sequence/{'small' if SMALL else 'full'}_seed{SEED}")
PROMPT, NUM_SAMPLES, TEMPERATURE = "def ", 3, 0.7

# %% [markdown]
# ## The config
# The models, the arms' losses (each a `kd_jax.sequence.SequenceLoss`) and the recipe. The same
# run from the command line:
# `python -m kd_jax.main --config=configs/stdlib_lm.py:arms=alone+token_kd --workdir=/tmp/lm`.

# %%
from configs import stdlib_lm
from kd_jax.sequence import corpus, job

config = stdlib_lm.get_config(f"seed={SEED},arms={'+'.join(ARMS)}" + (",runlocal" if SMALL else ""))
print("teacher:", dict(config.teacher.model_kwargs), f"{config.teacher.num_steps} steps")
print("student:", dict(config.student.model_kwargs), f"{config.student.num_steps} steps")
for arm in ARMS:
  print(f"{arm}: {config.losses[arm].to_dict()}")
text = corpus.load_corpus()
print(f"corpus: {len(text.train):,} training and {len(text.validation):,} validation characters "
      f"(Python {text.python_version})")

# %% [markdown]
# ## Train the teacher and the students
# `job.run` trains the teacher, then one student per arm, scores each in bits per character and
# draws one sample per network (the prompt `def `, temperature 0.7). It returns the rows and
# samples and writes them to `WORKDIR/results.json`; each stage logs to
# `WORKDIR/<stage>/metrics.jsonl`.

# %%
results = job.run(config, WORKDIR)
print(job.format_results(results))

# %% [markdown]
# ## Training curves
# Next-character cross-entropy on the training batches (`terms/ce`), converted to bits per
# character. Every arm logs it, whatever else it minimises.

# %%
import math

import matplotlib.pyplot as plt
from kd_jax import metrics

fig, ax = plt.subplots(figsize=(7, 3.5))
for row in results["rows"]:
  records = metrics.read_jsonl(os.path.join(WORKDIR, row["stage"], "metrics.jsonl"))
  ax.plot([r["step"] for r in records], [r["terms/ce"] / math.log(2) for r in records],
          label=f"{row['stage']} (validation {row['bpc']:.3f} bpc)")
ax.set(xlabel="step", ylabel="train bits per character")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## More samples
# The trained networks, restored from their checkpoints (`kd_jax.checkpoint.restore_variables`
# needs only the parameters' shapes, which `jax.eval_shape` gives without running the model),
# each continue `PROMPT` `NUM_SAMPLES` times at temperature 0.7 in one batched call of
# `sampling.sample`. Greedy decoding is `temperature=0`.

# %%
import jax
import jax.numpy as jnp
import numpy as np
from kd_jax import checkpoint
from kd_jax.models.transformer_lm import TransformerLM
from kd_jax.sequence import sampling


def restore(stage, model_config):
  module = TransformerLM(corpus.VOCAB_SIZE, max_len=config.data.seq_length,
                         **model_config.model_kwargs)
  tokens = jnp.zeros((1, config.data.seq_length), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, train=False))
  variables = checkpoint.restore_variables(os.path.join(WORKDIR, stage, "checkpoints"),
                                           {"model": "transformer_lm"}, shapes)
  return module, variables["params"]


prompt = jnp.asarray(np.stack([corpus.encode(PROMPT)] * NUM_SAMPLES))
num_tokens = config.data.seq_length - prompt.shape[1]
for stage, model_config in (("teacher", config.teacher), ("student_token_kd", config.student)):
  module, params = restore(stage, model_config)
  tokens = sampling.sample(module, params, prompt, num_tokens, jax.random.PRNGKey(SEED + 1),
                           temperature=TEMPERATURE)
  print(f"--- {stage} ---")
  for row in np.asarray(tokens):
    print(repr(corpus.decode(row)))

# %% [markdown]
# ## What to expect from the full run
# The README's table (seeds 0–2): teacher 2.131 bpc, student alone 2.633, `token_kd` 2.546 and
# `topk` 2.562. Distillation beats the student alone on every seed, and the top-8 cache recovers
# about 80% of full KD's gain. At seed 0 the teacher's sample reads
# `def asction(self):\n        return self.__class__(cls, floord)`: Python-shaped text from a
# 0.8M-parameter character model.
