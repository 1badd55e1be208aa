"""Relational distillation losses: they compare how examples relate within a batch.

SP, PKT, RKD and CC return ONE SCALAR per batch (their value couples all examples) and take
the keyword-only `mask: [B] | None` (1 = real example, 0 = padding); a padded example is
removed from every relation, so the result equals the loss on the sliced batch. CRD is
per-example given its memory bank and carries that bank functionally (its `mask` keeps padded
rows out of the bank). All compute in float32 and stop gradients on the teacher. Inputs are
`[B, ...]` and are flattened to `[B, D]`. Float hyperparameters may be traced.
"""
import math

import jax
import jax.numpy as jnp

from kd_jax.losses.features import (NORMALIZE_EPS, as_float32, flatten_examples, l2_normalize,
                                    safe_norm, teacher_float32)
from kd_jax.losses.modules import CRDMemory
from kd_jax.losses.registry import register
from kd_jax.losses.utils import check_choice, check_hparam, check_non_negative, check_positive


def example_mask(mask: jax.Array | None, batch_size: int) -> jax.Array:
  """`[B]` float32 mask of real examples (all ones when `mask` is None)."""
  if mask is None:
    return jnp.ones((batch_size,), jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != (batch_size,):
    raise ValueError(f"mask must have shape ({batch_size},) (one flag per example), got {mask.shape}")
  return mask.astype(jnp.float32)


def _flat_pair(student, teacher, mask):
  """Flattened float32 student/teacher with padded rows zeroed, the mask and its count."""
  student = flatten_examples(as_float32(student))
  teacher = flatten_examples(teacher_float32(teacher))
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(f"student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
  m = example_mask(mask, student.shape[0])
  keep = m[:, None] > 0
  student = jnp.where(keep, student, 0.0)
  teacher = jnp.where(keep, teacher, 0.0)
  return student, teacher, m, jnp.maximum(jnp.sum(m), 1.0)


def similarity_preserving(student_features: jax.Array, teacher_features: jax.Array, *,
                          mask: jax.Array | None = None, p: int = 2) -> jax.Array:
  """Similarity-preserving KD (SP): match row-normalised batch Gram matrices.

  G = F Fᵀ on flattened features, each row divided by its L_p norm;
  ℓ = ‖G_t − G_s‖²_F / n² (n real examples). Returns ONE SCALAR per batch.

  Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. The default p=2 (L2
  row normalisation) follows the paper and the reference it names, RepDistiller `Similarity`.
  torchdistill `SPKDLoss(reduction='batchmean')` calls `normalize(G, 1)`, an L1 row norm:
  pass p=1 to reproduce it.

  Args:
    student_features: `[B, ...]`.
    teacher_features: `[B, ...]` (its width may differ).
    mask: `[B]` (1 = real example, 0 = padding) or None.
    p: row-norm order, 2 (default: paper, RepDistiller) or 1 (torchdistill); static.
  Returns:
    Scalar float32.

  >>> x = jnp.arange(12.).reshape(3, 4)
  >>> float(similarity_preserving(x, 2 * x))
  0.0
  """
  check_choice("similarity_preserving", "p", p, (1, 2))
  student, teacher, _, n = _flat_pair(student_features, teacher_features, mask)

  def row_normalize(gram):
    if p == 2:
      return l2_normalize(gram, axis=1)
    return gram / jnp.maximum(jnp.sum(jnp.abs(gram), axis=1, keepdims=True), NORMALIZE_EPS)

  gram_s = row_normalize(student @ student.T)
  gram_t = row_normalize(teacher @ teacher.T)
  return jnp.sum(jnp.square(gram_t - gram_s)) / n ** 2


def pkt(student_features: jax.Array, teacher_features: jax.Array, *,
        mask: jax.Array | None = None, eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer (PKT): KL between cosine-similarity distributions.

  With c_ij = (1 + cos(f_i, f_j)) / 2 and P_ij = c_ij / Σ_k c_ik:
  ℓ = (1/n²) Σ_ij P^t_ij log((P^t_ij + ε) / (P^s_ij + ε)). Returns ONE SCALAR per batch.

  Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018. Reference: torchdistill `PKTLoss(eps=1e-7)`.

  Args:
    student_features: `[B, ...]` (torchdistill uses the penultimate `[B, D]`).
    teacher_features: `[B, ...]`.
    mask: `[B]` (1 = real example, 0 = padding) or None.
    eps: > 0, guards the norms and the log (may be traced).
  Returns:
    Scalar float32.

  >>> x = jnp.arange(12.).reshape(3, 4)
  >>> abs(float(pkt(x, x))) < 1e-7
  True
  """
  check_positive("pkt", eps=eps)
  student, teacher, m, n = _flat_pair(student_features, teacher_features, mask)
  pair = m[:, None] * m[None, :]

  def distribution(f):
    f = f / (safe_norm(f, axis=1, keepdims=True) + eps)
    similarity = (f @ f.T + 1.0) / 2.0 * pair
    row = jnp.sum(similarity, axis=1, keepdims=True)
    return similarity / jnp.where(row > 0, row, 1.0)

  p_s, p_t = distribution(student), distribution(teacher)
  return jnp.sum(pair * p_t * jnp.log((p_t + eps) / (p_s + eps))) / n ** 2


def _smooth_l1(x: jax.Array) -> jax.Array:
  """Huber with β = 1 (torch `SmoothL1Loss` elementwise)."""
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * jnp.square(x), ax - 0.5)


def _pairwise_distance(e: jax.Array, pair: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Euclidean distances with a zero diagonal, normalised by their mean over real pairs."""
  squared_norms = jnp.sum(jnp.square(e), axis=1)
  squared = jnp.maximum(squared_norms[:, None] + squared_norms[None, :] - 2 * e @ e.T, eps)
  distance = jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, jnp.sqrt(squared))
  counted = (distance > 0) & (pair > 0)
  mean = jnp.sum(jnp.where(counted, distance, 0.0)) / jnp.maximum(jnp.sum(counted), 1)
  return distance / mean


def rkd_distance(student_features: jax.Array, teacher_features: jax.Array, *,
                 mask: jax.Array | None = None) -> jax.Array:
  """RKD distance-wise loss: Huber between mean-normalised pairwise distances.

  ψ_D(i, j) = ‖f_i − f_j‖ / μ, μ the mean over distinct real pairs;
  ℓ = (1/n²) Σ_ij Huber(ψ_D^s(i, j) − ψ_D^t(i, j)). ONE SCALAR per batch; invariant to
  translating or scaling either side.

  Park et al., "Relational Knowledge Distillation", CVPR 2019. Reference: torchdistill
  `RKDLoss.compute_rkd_distance_loss` (SmoothL1, reduction 'mean').

  >>> x = jnp.arange(12.).reshape(3, 4) ** 2
  >>> abs(float(rkd_distance(3 * x + 1, x))) < 1e-7
  True
  """
  student, teacher, m, n = _flat_pair(student_features, teacher_features, mask)
  pair = m[:, None] * m[None, :]
  diff = _pairwise_distance(student, pair) - _pairwise_distance(teacher, pair)
  return jnp.sum(pair * _smooth_l1(diff)) / n ** 2


def _angles(e: jax.Array) -> jax.Array:
  """cos∠(e_j − e_i, e_k − e_i) for all i, j, k: `[B, B, B]`."""
  directions = l2_normalize(e[None, :, :] - e[:, None, :], axis=2)
  return jnp.einsum("ijd,ikd->ijk", directions, directions)


def rkd_angle(student_features: jax.Array, teacher_features: jax.Array, *,
              mask: jax.Array | None = None) -> jax.Array:
  """RKD angle-wise loss: Huber between the cosines of all triplet angles.

  ψ_A(i, j, k) = ⟨(f_j − f_i)/‖·‖, (f_k − f_i)/‖·‖⟩; ℓ = (1/n³) Σ_ijk Huber(ψ_A^s − ψ_A^t).
  ONE SCALAR per batch; invariant to translating, scaling or rotating either side. Memory is
  O(B²·D + B³).

  Park et al., "Relational Knowledge Distillation", CVPR 2019. Reference: torchdistill
  `RKDLoss.compute_rkd_angle_loss`.

  >>> x = jnp.arange(12.).reshape(3, 4) ** 2
  >>> abs(float(rkd_angle(2 * x - 1, x))) < 1e-7
  True
  """
  student, teacher, m, n = _flat_pair(student_features, teacher_features, mask)
  triple = m[:, None, None] * m[None, :, None] * m[None, None, :]
  return jnp.sum(triple * _smooth_l1(_angles(student) - _angles(teacher))) / n ** 3


def rkd(student_features: jax.Array, teacher_features: jax.Array, *,
        mask: jax.Array | None = None, distance_weight: float = 1.0,
        angle_weight: float = 2.0) -> jax.Array:
  """Relational KD: `distance_weight · rkd_distance + angle_weight · rkd_angle`.

  ONE SCALAR per batch. Defaults λ_D = 1, λ_A = 2 follow the paper and torchdistill's
  sample config (RepDistiller uses 25 and 50). Reference: torchdistill `RKDLoss`
  (`dist_factor`, `angle_factor`).

  Args:
    student_features: `[B, ...]`.
    teacher_features: `[B, ...]`.
    mask: `[B]` (1 = real example, 0 = padding) or None.
    distance_weight, angle_weight: ≥ 0, may be traced; a concrete zero weight skips that
      term (a traced one always computes both).
  Returns:
    Scalar float32.

  >>> x = jnp.arange(12.).reshape(3, 4) ** 2
  >>> abs(float(rkd(x + 5, x))) < 1e-6
  True
  """
  check_non_negative("rkd", distance_weight=distance_weight, angle_weight=angle_weight)
  loss = jnp.float32(0.0)
  for weight, term in ((distance_weight, rkd_distance), (angle_weight, rkd_angle)):
    if isinstance(weight, jax.core.Tracer) or weight != 0:
      loss += weight * term(student_features, teacher_features, mask=mask)
  return loss


def correlation_congruence(student_features: jax.Array, teacher_features: jax.Array, *,
                           mask: jax.Array | None = None, kernel: str = "gaussian",
                           gamma: float = 0.4, max_p: int = 2) -> jax.Array:
  """Correlation congruence (CC): distance between batch correlation matrices.

  `kernel="bilinear"`: K = F Fᵀ; `kernel="gaussian"`: the order-P Taylor expansion of the
  RBF kernel, K = e^{−2γ} Σ_{p=0}^{P} (2γ)^p / p! · (F Fᵀ)^p (elementwise powers).
  ℓ = ‖K_s − K_t‖_F / n² (a Frobenius norm, not squared). ONE SCALAR per batch.

  Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019. Reference:
  torchdistill `CCKDLoss(kernel_config={'type': 'gaussian', 'gamma': 0.4, 'max_p': 2},
  reduction='batchmean')` (the sample config's values; torchdistill has no defaults). Its
  inputs are `Linear4CCKD` embeddings: wire a `flax.linen.Dense` on each side, or feed
  same-width features directly.

  Args:
    student_features: `[B, ...]`.
    teacher_features: `[B, ...]`.
    mask: `[B]` (1 = real example, 0 = padding) or None.
    kernel: `"gaussian"` or `"bilinear"` (static).
    gamma: > 0, RBF parameter (gaussian only; may be traced).
    max_p: ≥ 0, Taylor order (gaussian only; a static Python int: it sets the number of
      terms).
  Returns:
    Scalar float32.

  >>> x = jnp.arange(6.).reshape(3, 2) / 10
  >>> float(correlation_congruence(x, x))
  0.0
  """
  check_choice("correlation_congruence", "kernel", kernel, ("gaussian", "bilinear"))
  if kernel == "gaussian":
    check_positive("correlation_congruence", gamma=gamma)
    if not (isinstance(max_p, int) and max_p >= 0):
      raise ValueError(f"correlation_congruence: max_p must be a Python int >= 0, got {max_p!r}")
  student, teacher, _, n = _flat_pair(student_features, teacher_features, mask)

  def correlation(f):
    product = f @ f.T
    if kernel == "bilinear":
      return product
    terms = [(2 * gamma) ** p / math.factorial(p) * product ** p for p in range(max_p + 1)]
    return jnp.exp(-2 * gamma) * sum(terms)

  # Padded rows have zero features, but the gaussian kernel of zeros is not zero: mask pairs.
  m = example_mask(mask, student.shape[0])
  pair = m[:, None] * m[None, :]
  return safe_norm(pair * (correlation(student) - correlation(teacher)), axis=(0, 1)) / n ** 2


def crd(student_embedding: jax.Array, teacher_embedding: jax.Array, memory: CRDMemory,
        indices: jax.Array, contrast_indices: jax.Array, *, mask: jax.Array | None = None,
        temperature: float = 0.07, momentum: float = 0.5,
        eps: float = 1e-7) -> tuple[jax.Array, CRDMemory]:
  """Contrastive representation distillation (CRD) with an NCE memory bank.

  For each example b with positive index i_b and contrast indices j_0 = i_b, j_1..j_K:
  x^s_k = exp(⟨M_t[j_k], s_b⟩ / τ) / Z_s (student embedding against the teacher bank) and
  x^t_k = exp(⟨M_s[j_k], t_b⟩ / τ) / Z_t. With noise mass c = K / N (N = bank size):
  ℓ_b = −[log(x_0 / (x_0 + c + ε)) + Σ_{k≥1} log(c / (x_k + c + ε))], summed over both
  sides. Z is fixed from the first batch (mean score × N) and then kept in the memory.
  After scoring, the banks move towards the batch: M[i_b] ← normalize(m·M[i_b] + (1−m)·e_b).
  Per example: `masked_mean` of the result equals torchdistill's scalar.

  Tian et al., "Contrastive Representation Distillation", ICLR 2020. Reference: torchdistill
  `CRDLoss` (`memory_v1` = `memory.student`, `memory_v2` = `memory.teacher`, `params[2:4]` =
  `z_student`, `z_teacher`; `num_samples` = bank size) and RepDistiller `crd/`.
  Wiring: embeddings from `modules.CRDEmbed` on each side (the teacher's embed is trained
  too, so its params also live in `distill_params` and `teacher_embedding` is NOT
  gradient-stopped); `memory` from `modules.init_crd_memory`, carried in the train
  state; `contrast_indices` from `modules.crd_contrast_indices` or from the dataset.

  Args:
    student_embedding: `[B, D]` L2-normalised student embedding.
    teacher_embedding: `[B, D]` L2-normalised teacher embedding (gets gradient: the
      teacher-side embed head is learnable).
    memory: `CRDMemory` with `[N, D]` banks.
    indices: `[B]` dataset indices of the batch's examples.
    contrast_indices: `[B, K + 1]` int, column 0 equal to `indices`.
    mask: `[B]` (1 = real example, 0 = padding) or None; padded rows neither update the bank
      nor set Z and their loss is 0.
    temperature: τ > 0.
    momentum: bank momentum in [0, 1).
    eps: > 0. (All three may be traced.)
  Returns:
    (`[B]` float32 loss, updated `CRDMemory`).

  >>> import jax
  >>> from kd_jax.losses.modules import init_crd_memory, crd_contrast_indices
  >>> mem = init_crd_memory(jax.random.key(0), num_data=10, embed_dim=4)
  >>> e = jnp.eye(4)[:2]
  >>> idx = jnp.array([3, 7])
  >>> loss, mem = crd(e, e, mem, idx, crd_contrast_indices(jax.random.key(1), idx, 5, 10))
  >>> loss.shape, bool(mem.z_student > 0)
  ((2,), True)
  """
  check_positive("crd", temperature=temperature, eps=eps)
  check_hparam("crd", "momentum", momentum, lambda m: (0 <= m) & (m < 1), "in [0, 1)")
  student = as_float32(student_embedding)
  teacher = as_float32(teacher_embedding)
  num_data, dim = memory.student.shape
  batch_size = student.shape[0]
  if student.shape != (batch_size, dim) or teacher.shape != (batch_size, dim):
    raise ValueError(f"crd: embeddings must be [B, {dim}] like the memory bank, got "
                     f"{student.shape} and {teacher.shape}")
  if contrast_indices.ndim != 2 or contrast_indices.shape[0] != batch_size:
    raise ValueError(f"crd: contrast_indices must be [B, K + 1], got {contrast_indices.shape}")
  m = example_mask(mask, batch_size)
  memory = jax.lax.stop_gradient(memory)

  def scores(bank, embedding):
    return jnp.exp(jnp.einsum("bkd,bd->bk", bank[contrast_indices], embedding) / temperature)

  def normaliser(z, x):
    first_batch = jax.lax.stop_gradient(jnp.sum(m[:, None] * x) / jnp.maximum(jnp.sum(m), 1.0)
                                        / x.shape[1] * num_data)
    return jnp.where(z > 0, z, first_batch)

  out_s = scores(memory.teacher, student)
  out_t = scores(memory.student, teacher)
  z_student = normaliser(memory.z_student, out_s)
  z_teacher = normaliser(memory.z_teacher, out_t)
  noise = (contrast_indices.shape[1] - 1) / num_data

  def nce(x):
    positive = jnp.log(x[:, 0] / (x[:, 0] + noise + eps))
    negative = jnp.sum(jnp.log(noise / (x[:, 1:] + noise + eps)), axis=1)
    return -(positive + negative)

  loss = m * (nce(out_s / z_student) + nce(out_t / z_teacher))

  drop = jnp.where(m > 0, indices, num_data)  # out of range: the scatter drops padded rows

  def update(bank, embedding):
    moved = momentum * bank[indices] + (1 - momentum) * jax.lax.stop_gradient(embedding)
    moved = moved / safe_norm(moved, axis=1, keepdims=True)
    return bank.at[drop].set(moved, mode="drop")

  new_memory = CRDMemory(student=update(memory.student, student),
                         teacher=update(memory.teacher, teacher),
                         z_student=z_student, z_teacher=z_teacher)
  return loss, new_memory


_TD = "torchdistill 1.1.5 "
for _name, _fn, _per_example, _paper, _reference in (
    ("sp", similarity_preserving, False, "Tung & Mori, SP, ICCV 2019",
     "RepDistiller distiller_zoo/SP.py Similarity (p=2); "
     + _TD + "SPKDLoss(reduction='batchmean') is p=1"),
    ("pkt", pkt, False, "Passalis & Tefas, PKT, ECCV 2018", _TD + "PKTLoss"),
    ("rkd", rkd, False, "Park et al., RKD, CVPR 2019", _TD + "RKDLoss"),
    ("rkd_distance", rkd_distance, False, "Park et al., RKD, CVPR 2019",
     _TD + "RKDLoss(dist_factor=1, angle_factor=0)"),
    ("rkd_angle", rkd_angle, False, "Park et al., RKD, CVPR 2019",
     _TD + "RKDLoss(dist_factor=0, angle_factor=1)"),
    ("cc", correlation_congruence, False, "Peng et al., CCKD, ICCV 2019",
     _TD + "CCKDLoss(reduction='batchmean') + Linear4CCKD"),
    ("crd", crd, True, "Tian et al., CRD, ICLR 2020",
     _TD + "CRDLoss + Linear4CRD; RepDistiller crd/"),
):
  register(_name, _fn, per_example=_per_example, kind="relations", paper=_paper,
           reference=_reference)
