"""Centered kernel alignment (CKA): a similarity of two representations of the same batch.

CKA(K, L) = HSIC(K, L) / √(HSIC(K, K)·HSIC(L, L)) for Gram matrices K, L of the two
representations. The biased estimator centres with H = I − 11ᵀ/n; the debiased one uses the
unbiased HSIC estimator (Song et al., 2012), as in Kornblith et al.'s reference notebook.
CKA is ONE SCALAR per batch; the keyword-only `mask` (`[B]`, 1 = real example, 0 = padding)
removes padded examples (masked equals sliced). Use `linear_cka` / `rbf_cka` as analysis
metrics and `cka_loss` (1 − CKA, registered as `"cka"`, alias `kd_jax.losses.cka`) for
training. `kernel` and `debiased` are static; `threshold` may be traced.

Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019.
Reference: google-research `representation_similarity` notebook (`gram_linear`,
`gram_rbf`, `center_gram`, `cka`). torchdistill 1.1.5 has no CKA.
"""
import jax
import jax.numpy as jnp

from kd_jax.losses.features import as_float32, flatten_examples, safe_norm, teacher_float32
from kd_jax.losses.registry import register
from kd_jax.losses.relations import example_mask
from kd_jax.losses.utils import check_choice, check_positive


def _gram_linear(x: jax.Array) -> jax.Array:
  return x @ x.T


def _gram_rbf(x: jax.Array, pair: jax.Array, threshold: float) -> jax.Array:
  """exp(−d²_ij / (2·threshold²·median d²)), the median over real pairs (diagonal included)."""
  squared_norms = jnp.sum(jnp.square(x), axis=1)
  squared = squared_norms[:, None] + squared_norms[None, :] - 2 * x @ x.T
  median = jnp.nanmedian(jnp.where(pair > 0, squared, jnp.nan))
  return jnp.exp(-squared / (2 * threshold ** 2 * median))


def _center_gram(gram: jax.Array, m: jax.Array, debiased: bool) -> jax.Array:
  """Centres a Gram matrix over the real examples; padded rows and columns become 0."""
  pair = m[:, None] * m[None, :]
  gram = gram * pair
  n = jnp.sum(m)
  if debiased:
    gram = gram * (1 - jnp.eye(gram.shape[0]))
    means = jnp.sum(gram, axis=0) / (n - 2)
    means = means - jnp.sum(means * m) / (2 * (n - 1))
  else:
    means = jnp.sum(gram, axis=0) / n
    means = means - jnp.sum(means * m) / (2 * n)
  gram = (gram - means[:, None] - means[None, :]) * pair
  if debiased:
    gram = gram * (1 - jnp.eye(gram.shape[0]))
  return gram


def _cka(x, y, mask, kernel: str, threshold: float, debiased: bool) -> jax.Array:
  check_choice("cka", "kernel", kernel, ("linear", "rbf"))
  check_positive("cka", threshold=threshold)
  x, y = flatten_examples(x), flatten_examples(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"cka: the two batches differ in size, {x.shape[0]} vs {y.shape[0]}")
  if debiased and x.shape[0] < 4:
    raise ValueError(f"cka: the debiased estimator needs at least 4 examples, got {x.shape[0]}")
  m = example_mask(mask, x.shape[0])
  keep = m[:, None] > 0
  x, y = jnp.where(keep, x, 0.0), jnp.where(keep, y, 0.0)
  pair = m[:, None] * m[None, :]
  if kernel == "linear":
    gram_x, gram_y = _gram_linear(x), _gram_linear(y)
  else:
    gram_x, gram_y = _gram_rbf(x, pair, threshold), _gram_rbf(y, pair, threshold)
  gram_x = _center_gram(gram_x, m, debiased)
  gram_y = _center_gram(gram_y, m, debiased)
  hsic = jnp.sum(gram_x * gram_y)
  return hsic / (safe_norm(gram_x, axis=(0, 1)) * safe_norm(gram_y, axis=(0, 1)))


def linear_cka(x: jax.Array, y: jax.Array, *, mask: jax.Array | None = None,
               debiased: bool = False) -> jax.Array:
  """Linear CKA = ‖YᶜᵀXᶜ‖²_F / (‖XᶜᵀXᶜ‖_F ‖YᶜᵀYᶜ‖_F) (biased), via centred Gram matrices.

  Args:
    x: `[B, ...]` first representation (flattened to `[B, Dx]`).
    y: `[B, ...]` second representation (its width may differ).
    mask: `[B]` (1 = real example, 0 = padding) or None.
    debiased: use the unbiased HSIC estimator (needs ≥ 4 real examples).
  Returns:
    Scalar float32 in [0, 1] (the debiased value can dip slightly below 0).

  >>> x = jnp.arange(12.).reshape(4, 3) ** 2
  >>> round(float(linear_cka(x, 3 * x)), 5)
  1.0
  """
  return _cka(as_float32(x), as_float32(y), mask, "linear", 1.0, debiased)


def rbf_cka(x: jax.Array, y: jax.Array, *, mask: jax.Array | None = None,
            threshold: float = 1.0, debiased: bool = False) -> jax.Array:
  """CKA with RBF kernels whose bandwidth is `threshold` × the median pairwise distance.

  K_ij = exp(−‖x_i − x_j‖² / (2·threshold²·median_kl ‖x_k − x_l‖²)).

  >>> x = jnp.arange(12.).reshape(4, 3) ** 2
  >>> round(float(rbf_cka(x, x + 1, threshold=0.5)), 5)
  1.0
  """
  return _cka(as_float32(x), as_float32(y), mask, "rbf", threshold, debiased)


def cka_loss(student_features: jax.Array, teacher_features: jax.Array, *,
             mask: jax.Array | None = None, kernel: str = "linear", threshold: float = 1.0,
             debiased: bool = False) -> jax.Array:
  """1 − CKA(student, teacher): ONE SCALAR per batch, teacher gradient-stopped.

  Args:
    student_features: `[B, ...]`.
    teacher_features: `[B, ...]`.
    mask: `[B]` (1 = real example, 0 = padding) or None.
    kernel: `"linear"` or `"rbf"` (static).
    threshold: RBF bandwidth as a fraction of the median distance (may be traced).
    debiased: use the unbiased HSIC estimator (static).
  Returns:
    Scalar float32.

  >>> x = jnp.arange(12.).reshape(4, 3) ** 2
  >>> abs(float(cka_loss(x, x))) < 1e-6
  True
  """
  return 1.0 - _cka(as_float32(student_features), teacher_float32(teacher_features), mask,
                    kernel, threshold, debiased)


register("cka", cka_loss, per_example=False, kind="relations",
         paper="Kornblith et al., Similarity of Neural Network Representations Revisited, ICML 2019",
         reference="google-research/google-research representation_similarity (center_gram, cka)")
