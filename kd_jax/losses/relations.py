"""Relational distillation losses: they compare how examples relate within a batch.

SP, PKT, RKD and CC return ONE SCALAR per batch (their value couples all examples) and take
`mask: [B] | None`; a masked-out (padded) example is removed from every relation, so the
result equals the loss on the sliced batch. CRD is per-example given its memory bank and
carries that bank functionally. All compute in float32 and stop gradients on the teacher.
Inputs are `[B, ...]` and are flattened to `[B, D]`.
"""
import math

import jax
import jax.numpy as jnp

from kd_jax.losses.features import (NORMALIZE_EPS, as_float32, flatten_examples, l2_normalize,
                                    safe_norm, teacher_float32)
from kd_jax.losses.modules import CRDMemory
from kd_jax.losses.registry import register


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


def similarity_preserving(student_features: jax.Array, teacher_features: jax.Array,
                          mask: jax.Array | None = None, *, p: int = 1) -> jax.Array:
  """Similarity-preserving KD (SP): match row-normalised batch Gram matrices.

  G = F Fᵀ on flattened features, each row divided by its L_p norm;
  ℓ = ‖G_t − G_s‖²_F / n² (n real examples). Returns ONE SCALAR per batch.

  Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. Reference:
  torchdistill `SPKDLoss(reduction='batchmean')`, which calls `normalize(G, 1)`, i.e. an
  L1 row norm: hence the default p=1. The paper and RepDistiller `Similarity` use p=2.

  Args:
    student_features: `[B, ...]`.
    teacher_features: `[B, ...]` (its width may differ).
    mask: `[B]` real-example flags, or None.
    p: row-norm order, 1 (torchdistill) or 2 (paper).
  Returns:
    Scalar float32.

  >>> x = jnp.arange(12.).reshape(3, 4)
  >>> float(similarity_preserving(x, 2 * x))
  0.0
  """
  if p not in (1, 2):
    raise ValueError(f"similarity_preserving: p must be 1 or 2, got {p!r}")
  student, teacher, _, n = _flat_pair(student_features, teacher_features, mask)

  def row_normalize(gram):
    if p == 2:
      return l2_normalize(gram, axis=1)
    return gram / jnp.maximum(jnp.sum(jnp.abs(gram), axis=1, keepdims=True), NORMALIZE_EPS)

  gram_s = row_normalize(student @ student.T)
  gram_t = row_normalize(teacher @ teacher.T)
  return jnp.sum(jnp.square(gram_t - gram_s)) / n ** 2


def pkt(student_features: jax.Array, teacher_features: jax.Array,
        mask: jax.Array | None = None, *, eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer (PKT): KL between cosine-similarity distributions.

  With c_ij = (1 + cos(f_i, f_j)) / 2 and P_ij = c_ij / Σ_k c_ik:
  ℓ = (1/n²) Σ_ij P^t_ij log((P^t_ij + ε) / (P^s_ij + ε)). Returns ONE SCALAR per batch.

  Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018. Reference: torchdistill `PKTLoss(eps=1e-7)`.

  Args:
    student_features: `[B, ...]` (torchdistill uses the penultimate `[B, D]`).
    teacher_features: `[B, ...]`.
    mask: `[B]` real-example flags, or None.
    eps: > 0, guards the norms and the log.
  Returns:
    Scalar float32.

  >>> x = jnp.arange(12.).reshape(3, 4)
  >>> abs(float(pkt(x, x))) < 1e-7
  True
  """
  if eps <= 0:
    raise ValueError(f"pkt: eps must be > 0, got {eps}")
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


def rkd_distance(student_features: jax.Array, teacher_features: jax.Array,
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


def rkd_angle(student_features: jax.Array, teacher_features: jax.Array,
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


def rkd(student_features: jax.Array, teacher_features: jax.Array,
        mask: jax.Array | None = None, *, distance_weight: float = 1.0,
        angle_weight: float = 2.0) -> jax.Array:
  """Relational KD: `distance_weight · rkd_distance + angle_weight · rkd_angle`.

  ONE SCALAR per batch. Defaults λ_D = 1, λ_A = 2 follow the paper and torchdistill's
  sample config (RepDistiller uses 25 and 50). Reference: torchdistill `RKDLoss`
  (`dist_factor`, `angle_factor`).

  Args:
    student_features: `[B, ...]`.
    teacher_features: `[B, ...]`.
    mask: `[B]` real-example flags, or None.
    distance_weight, angle_weight: ≥ 0; a zero weight skips that term.
  Returns:
    Scalar float32.

  >>> x = jnp.arange(12.).reshape(3, 4) ** 2
  >>> abs(float(rkd(x + 5, x))) < 1e-6
  True
  """
  if distance_weight < 0 or angle_weight < 0:
    raise ValueError(f"rkd: distance_weight and angle_weight must be >= 0, got "
                     f"{distance_weight} and {angle_weight}")
  loss = jnp.float32(0.0)
  if distance_weight:
    loss += distance_weight * rkd_distance(student_features, teacher_features, mask=mask)
  if angle_weight:
    loss += angle_weight * rkd_angle(student_features, teacher_features, mask=mask)
  return loss


def correlation_congruence(student_features: jax.Array, teacher_features: jax.Array,
                           mask: jax.Array | None = None, *, kernel: str = "gaussian",
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
    mask: `[B]` real-example flags, or None.
    kernel: `"gaussian"` or `"bilinear"`.
    gamma: > 0, RBF parameter (gaussian only).
    max_p: ≥ 0, Taylor order (gaussian only).
  Returns:
    Scalar float32.

  >>> x = jnp.arange(6.).reshape(3, 2) / 10
  >>> float(correlation_congruence(x, x))
  0.0
  """
  if kernel not in ("gaussian", "bilinear"):
    raise ValueError(f"correlation_congruence: kernel must be 'gaussian' or 'bilinear', got {kernel!r}")
  if kernel == "gaussian" and not (gamma > 0 and isinstance(max_p, int) and max_p >= 0):
    raise ValueError(f"correlation_congruence: need gamma > 0 and integer max_p >= 0, got "
                     f"gamma={gamma}, max_p={max_p!r}")
  student, teacher, _, n = _flat_pair(student_features, teacher_features, mask)

  def correlation(f):
    product = f @ f.T
    if kernel == "bilinear":
      return product
    terms = [(2 * gamma) ** p / math.factorial(p) * product ** p for p in range(max_p + 1)]
    return math.exp(-2 * gamma) * sum(terms)

  # Padded rows have zero features, but the gaussian kernel of zeros is not zero: mask pairs.
  m = example_mask(mask, student.shape[0])
  pair = m[:, None] * m[None, :]
  return safe_norm(pair * (correlation(student) - correlation(teacher)), axis=(0, 1)) / n ** 2


def crd(student_embedding: jax.Array, teacher_embedding: jax.Array, memory: CRDMemory,
        indices: jax.Array, contrast_indices: jax.Array, mask: jax.Array | None = None, *,
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
    mask: `[B]` real-example flags; padded rows neither update the bank nor set Z and
      their loss is 0.
    temperature: τ > 0.
    momentum: bank momentum in [0, 1).
    eps: > 0.
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
  if temperature <= 0:
    raise ValueError(f"crd: temperature must be > 0, got {temperature}")
  if not 0 <= momentum < 1:
    raise ValueError(f"crd: momentum must be in [0, 1), got {momentum}")
  if eps <= 0:
    raise ValueError(f"crd: eps must be > 0, got {eps}")
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


register("sp", similarity_preserving, inputs=("student_features", "teacher_features", "mask"),
         per_example=False, kind="relations", paper="Tung & Mori, SP, ICCV 2019",
         reference="torchdistill 1.1.5 SPKDLoss(reduction='batchmean')")
register("pkt", pkt, inputs=("student_features", "teacher_features", "mask"), per_example=False,
         kind="relations", paper="Passalis & Tefas, PKT, ECCV 2018",
         reference="torchdistill 1.1.5 PKTLoss")
register("rkd", rkd, inputs=("student_features", "teacher_features", "mask"), per_example=False,
         kind="relations", paper="Park et al., RKD, CVPR 2019", reference="torchdistill 1.1.5 RKDLoss")
register("rkd_distance", rkd_distance, inputs=("student_features", "teacher_features", "mask"),
         per_example=False, kind="relations", paper="Park et al., RKD, CVPR 2019",
         reference="torchdistill 1.1.5 RKDLoss(dist_factor=1, angle_factor=0)")
register("rkd_angle", rkd_angle, inputs=("student_features", "teacher_features", "mask"),
         per_example=False, kind="relations", paper="Park et al., RKD, CVPR 2019",
         reference="torchdistill 1.1.5 RKDLoss(dist_factor=0, angle_factor=1)")
register("cc", correlation_congruence, inputs=("student_features", "teacher_features", "mask"),
         per_example=False, kind="relations", paper="Peng et al., CCKD, ICCV 2019",
         reference="torchdistill 1.1.5 CCKDLoss(reduction='batchmean') + Linear4CCKD")
register("crd", crd, inputs=("student_embedding", "teacher_embedding", "crd_memory", "indices",
                             "contrast_indices", "mask"),
         per_example=True, kind="relations", paper="Tian et al., CRD, ICLR 2020",
         reference="torchdistill 1.1.5 CRDLoss + Linear4CRD; RepDistiller crd/")
