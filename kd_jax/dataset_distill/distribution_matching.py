"""Distribution matching: DM (Zhao & Bilen, "Dataset Condensation with Distribution Matching",
WACV 2023). Reference: VICO-UoE/DatasetCondensation `main_DM.py` (the ConvNet branch).

Iteration i draws a fresh, untrained network ψ (`init_params`) and minimises

  L(X) = Σ_c ‖mean_{r ∈ R_c} ψ(A_c(r)) − mean_{x ∈ X_c} ψ(A_c(x))‖²,

ψ the embedding before the classifier (the model's `features["pre_logits"]`, the reference's
`net.embed`), X_c the `ipc` synthetic images of class c, R_c a real batch of class c
(`batch_real` drawn without replacement, all of the class when it has fewer) and A_c one DSA
transform shared by both batches (`dsa.same_transform`, the reference's Siamese seed; a fresh
one per class). The real embeddings are constants. Images: SGD lr_img 1.0, momentum 0.5.
Randomness of iteration i: `net_key, aug_key = split(iteration_key(seed, i))` (network
`init_params(net_key)`, class c's DSA key `fold_in(aug_key, c)`); real batches from
`iteration_rng(seed, i)`.

Departures: the network sees `train=True` as under the reference's `net.train()` and must be
stateless (the reference's ConvNetBN branch, which embeds all classes in one batch, is not
implemented). Every class's real batch is padded to B = min(batch_real, largest class) with
masked entries (exact: per-example networks and per-image DSA), so one compiled step serves
all classes. `context.mesh` is not used (one device).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data.dsa import same_transform
from kd_jax.dataset_distill.gradient_matching import (INITS, image_start, sample_class_batches,
                                                     sum_over_classes)
from kd_jax.dataset_distill.method import (Context, DistilledSet, Start, Step, hard_label_set,
                                           iteration_key, iteration_rng)
from kd_jax.dataset_distill.synthetic import class_indices


def embed(params, apply_fn, images) -> jax.Array:
  """`[B, D]` the network's `features["pre_logits"]` of `images` `[B, H, W, C]`."""
  out = apply_fn({"params": params}, images, train=True)[0]
  if "pre_logits" not in out.features:
    raise ValueError("distribution matching needs a model that returns features['pre_logits'] "
                     f"(the embedding before the classifier); this one returns "
                     f"{sorted(out.features)}")
  return out.features["pre_logits"].astype(jnp.float32)


def class_embedding_loss(syn_images, params, real_images, mask, key, *, apply_fn,
                         augment=None) -> jax.Array:
  """One class's term ‖mean ψ(A(R_c)) − mean ψ(A(X_c))‖².

  Args:
    syn_images: `[ipc, H, W, C]` the class's synthetic images X_c.
    params: the network's params.
    real_images: `[B, H, W, C]` real batch R_c (entries with mask 0 are ignored).
    mask: `[B]` 1 for real entries, 0 for padding.
    key: the DSA key shared by both batches (unused without `augment`).
    apply_fn, augment: the network and DSA (`augment(images, key)`) or None.
  """
  if augment is not None:
    real_images = same_transform(augment, real_images, key)
    syn_images = same_transform(augment, syn_images, key)
  real = jax.lax.stop_gradient(embed(params, apply_fn, real_images))
  mean_real = jnp.sum(real * mask[:, None], axis=0) / jnp.sum(mask)
  mean_syn = jnp.mean(embed(params, apply_fn, syn_images), axis=0)
  return jnp.sum((mean_real - mean_syn) ** 2)


@dataclasses.dataclass
class DistributionMatching:
  """DM (see the module docstring); values `{"images": [C·ipc, H, W, C]}`, hard labels.

  Attributes:
    name: the method's name.
    iterations: image updates, one fresh network each (the reference's `Iteration`, 20000).
    lr_img, momentum_img: SGD on the images (1.0, 0.5).
    batch_real: real images per class per update (256).
    init: "real" (random real images of each class, the reference default) or "noise".
  """
  name: str = "dm"
  iterations: int = 20000
  lr_img: float = 1.0
  momentum_img: float = 0.5
  batch_real: int = 256
  init: str = "real"

  def prepare(self, context: Context) -> None:
    if self.init not in INITS:
      raise ValueError(f"DM init must be one of {INITS}, got {self.init!r}")
    self._context = context
    self._per_class = class_indices(np.asarray(context.train_labels), context.num_classes)
    self._real = jnp.asarray(context.train_images)
    self._init = jax.jit(context.init_params)
    apply_fn, augment = context.apply_fn, context.augment

    def loss(syn_images, params, real_all, indices, mask, key):
      return class_embedding_loss(syn_images, params, real_all[indices], mask, key,
                                  apply_fn=apply_fn, augment=augment)

    self._loss_and_grad = jax.jit(jax.value_and_grad(loss))

  def start(self, context: Context) -> Start:
    return image_start(context, self.init, self.lr_img, self.momentum_img)

  def value_and_grad(self, values: dict, state, iteration: int) -> Step:
    ctx = self._context
    net_key, aug_key = jax.random.split(iteration_key(ctx.seed, iteration))
    params = self._init(net_key)
    indices, mask = sample_class_batches(iteration_rng(ctx.seed, iteration), self._per_class,
                                         self.batch_real)
    total, grad = sum_over_classes(
        lambda c, x: self._loss_and_grad(x, params, self._real, indices[c], mask[c],
                                         jax.random.fold_in(aug_key, c)),
        values["images"], ctx.num_classes, ctx.ipc)
    return Step(loss=total, grads={"images": grad}, state={})

  def distilled(self, values: dict) -> DistilledSet:
    return hard_label_set(values, self._context)
