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
# # kd_jax losses in your own project
#
# kd_jax's losses are plain JAX functions: arrays in, one value per example (or per token, or per
# batch) out. This notebook uses them with models that are **not** from kd_jax and a plain optax
# loop:
#
# - the teacher is a **plain-JAX** MLP (a dict of arrays and a function);
# - the student is a **Flax NNX** MLP, with its own linear adapter for a feature loss;
# - the losses: Hinton KD on the logits, FitNet on a hidden layer (through the adapter), and a
#   **masked token-level** divergence for sequence models.
#
# The data is scikit-learn's bundled digits (8×8 images), loaded directly: nothing here needs the
# kd_jax job, its configs or its datasets.

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

# %%
SMALL = os.environ.get("KD_JAX_COLAB_SMALL") == "1"  # CI: fewer steps
TEACHER_STEPS, STUDENT_STEPS = (100, 100) if SMALL else (1500, 1500)

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from kd_jax import losses

digits = load_digits()
images = (digits.images / 16.0).reshape(len(digits.images), -1).astype(np.float32)  # [N, 64]
labels = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(images))
train, test = order[:1300], order[1300:]
print(f"{len(train)} train and {len(test)} test images of {images.shape[1]} pixels")


def batches(rng, size=64):
  """Endless random minibatches of the train split: (images [B, 64], labels [B])."""
  while True:
    rows = rng.choice(train, size, replace=False)
    yield images[rows], labels[rows]

# %% [markdown]
# ## A plain-JAX teacher
# Two hidden layers of 256, trained with cross-entropy. `teacher_apply` returns the logits and the
# second hidden layer, the feature the student will imitate.

# %%
def init_teacher(key, sizes=(64, 256, 256, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def teacher_apply(params, x):
  hidden = x
  for layer in params[:-1]:
    hidden = jax.nn.relu(hidden @ layer["w"] + layer["b"])
  return hidden @ params[-1]["w"] + params[-1]["b"], hidden  # logits [B, 10], feature [B, 256]


def accuracy(logits, y):
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


teacher = init_teacher(jax.random.key(0))
tx = optax.adam(1e-3)
opt_state = tx.init(teacher)


@jax.jit
def teacher_step(params, opt_state, x, y):
  def loss(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(teacher_apply(p, x)[0], y))
  value, grads = jax.value_and_grad(loss)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


stream = batches(np.random.default_rng(1))
for _ in range(TEACHER_STEPS):
  teacher, opt_state, _ = teacher_step(teacher, opt_state, *next(stream))
print(f"teacher test accuracy: {accuracy(teacher_apply(teacher, images[test])[0], labels[test]):.3f}")

# %% [markdown]
# ## A Flax NNX student, with its own adapter
# One hidden layer of 32. FitNet compares features of the same width, so the student owns a linear
# adapter from its 32 to the teacher's 256 (kd_jax's distiller creates such adapters itself; here the
# student's code does, as in any project). The adapter trains with the student.

# %%
class Student(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, hidden=32, teacher_width=256):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 10, rngs=rngs)
    self.adapter = nnx.Linear(hidden, teacher_width, rngs=rngs)  # used only by the FitNet term

  def __call__(self, x):
    h = jax.nn.relu(self.hidden(x))
    return self.head(h), self.adapter(h)  # logits [B, 10], adapted feature [B, 256]

# %% [markdown]
# The loss: 0.1·CE + 0.9·KD(T=4) + β·FitNet. `losses.kd` and `losses.fitnet` return one value per
# example; `losses.masked_mean` reduces them (a mask of 1s here; a padded batch would pass 0s for the
# padding rows). The teacher's inputs are gradient-stopped inside the losses.

# %%
def train_student(fitnet_weight, kd_weight, seed=0):
  graphdef, params = nnx.split(Student(nnx.Rngs(seed)))
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    teacher_logits, teacher_feature = teacher_apply(teacher, x)
    mask = jnp.ones(x.shape[0])

    def loss(p):
      logits, adapted = nnx.merge(graphdef, p)(x)
      ce = losses.masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, y), mask)
      kd = losses.masked_mean(losses.kd(logits, teacher_logits, temperature=4.0), mask)
      fitnet = losses.masked_mean(losses.fitnet(adapted, teacher_feature), mask)
      total = (1 - kd_weight) * ce + kd_weight * kd + fitnet_weight * fitnet
      return total, {"ce": ce, "kd": kd, "fitnet": fitnet}

    (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, terms

  stream = batches(np.random.default_rng(seed + 10))
  history = []
  for _ in range(STUDENT_STEPS):
    params, opt_state, terms = step(params, opt_state, *next(stream))
    history.append({k: float(v) for k, v in terms.items()})
  logits, _ = nnx.merge(graphdef, params)(images[test])
  return accuracy(logits, labels[test]), history


results = {}
for name, fitnet_weight, kd_weight in (("CE only", 0.0, 0.0), ("CE + KD", 0.0, 0.9),
                                       ("CE + KD + FitNet", 0.1, 0.9)):
  results[name] = train_student(fitnet_weight, kd_weight)
  first, last = results[name][1][0], results[name][1][-1]
  print(f"{name:<18} test accuracy {results[name][0]:.3f}; "
        f"KD {first['kd']:.3f} -> {last['kd']:.3f}, FitNet {first['fitnet']:.3f} -> {last['fitnet']:.3f}")

# %% [markdown]
# The KD and FitNet values are logged for every arm, also where their weight is 0: they fall only
# where they are trained. (One seed on 497 test images: differences of a point are noise.)

# %% [markdown]
# ## A masked token-level loss
# For sequence models: `losses.token_divergence` gives one value per token `[B, T]` (forward KL,
# reverse KL, JS or GKD's generalized JSD), and `losses.masked_mean` averages it over the real
# tokens only. Whatever (finite) logits sit at padded positions, the loss does not change and its
# gradient there is exactly 0. (NaN logits would still poison the gradient through the softmax's
# own derivative: mask them out of the model's inputs, not only out of the loss.)

# %%
key_s, key_t = jax.random.split(jax.random.key(3))
student_logits = jax.random.normal(key_s, (2, 5, 11))   # [B, T, V]
teacher_logits = jax.random.normal(key_t, (2, 5, 11))
mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])     # the second sequence has 3 tokens


def token_loss(s, divergence):
  return losses.masked_mean(losses.token_divergence(s, teacher_logits, divergence=divergence,
                                                    temperature=2.0), mask)


padded = student_logits.at[1, 3:].set(1e4)  # garbage where the mask is 0
for divergence in ("forward_kl", "reverse_kl", "js"):
  clean, dirty = token_loss(student_logits, divergence), token_loss(padded, divergence)
  grad = jax.grad(token_loss)(padded, divergence)
  print(f"{divergence:<11} loss {float(clean):.4f}, with garbage padding {float(dirty):.4f}; "
        f"gradient at the padding: {float(jnp.abs(grad[1, 3:]).max())}")
