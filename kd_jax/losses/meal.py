"""MEAL V2's adversarial part: a small discriminator on logits and its BCE loss.

The discriminator's params live in the student-side state (`TrainState.distill_params`); the
loss is a pure function of the discriminator's outputs (registered as
`"meal_v2_discriminator"`, alias `kd_jax.losses.meal_v2_discriminator`). MEAL V2 adds this loss
to the soft cross-entropy (`kd_jax.losses.meal_v2`) and minimises the sum over student AND
discriminator params with one optimizer (no min-max game in the released code).

Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet
without Tricks", NeurIPS-W 2020. Reference: szq0214/MEAL-V2 `models/discriminator.py`
(`Discriminator`) and `loss.py` (`discriminatorLoss`).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kd_jax.losses.registry import register


class MealV2Discriminator(nn.Module):
  """Three dense layers C → C/K → C/K² → 2, each followed by ReLU (the reference's 1×1 convs).

  The final ReLU is the reference's: the two scores are non-negative before the BCE. When it
  is inactive for every example the discriminator gets no gradient; `final_relu=False` drops it.

  Attributes:
    reduction: K, the width divisor per layer (MEAL V2 trains with K=8 on 1000 classes).
    final_relu: keep the reference's ReLU on the two scores.

  >>> d = MealV2Discriminator()
  >>> params = d.init(jax.random.key(0), jnp.zeros((1, 128)))
  >>> d.apply(params, jnp.zeros((4, 128))).shape
  (4, 2)
  """
  reduction: int = 8
  final_relu: bool = True

  @nn.compact
  def __call__(self, logits: jax.Array) -> jax.Array:
    width = logits.shape[-1]
    if self.reduction < 1 or width // self.reduction**2 < 1:
      raise ValueError(f"reduction must be >= 1 with num_classes // reduction**2 >= 1; got "
                       f"reduction={self.reduction} for {width} classes")
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    x = nn.relu(nn.Dense(width // self.reduction)(x))
    x = nn.relu(nn.Dense(width // self.reduction**2)(x))
    scores = nn.Dense(2)(x)
    return nn.relu(scores) if self.final_relu else scores


def meal_v2_discriminator_loss(student_scores: jax.Array, teacher_scores: jax.Array) -> jax.Array:
  """BCE-with-logits of the discriminator: student outputs → [1, 0], teacher outputs → [0, 1].

  Args:
    student_scores: `[B, 2]` discriminator outputs on the student logits.
    teacher_scores: `[B, 2]` discriminator outputs on the teachers' mean logits (MEAL V2 feeds
      the mean of the teachers' pre-softmax logits). Not stopped: the discriminator learns
      from both halves.
  Returns:
    `[B]` float32: ¼·(BCE of student row i + BCE of teacher row i), so the mean over the batch
    equals the reference's `BCEWithLogitsLoss` mean over the 2B × 2 entries.

  >>> z = jnp.zeros((3, 2))
  >>> meal_v2_discriminator_loss(z, z).round(4)
  Array([0.6931, 0.6931, 0.6931], dtype=float32)
  """
  student_scores, teacher_scores = (jnp.asarray(x) for x in (student_scores, teacher_scores))
  if student_scores.shape != teacher_scores.shape or student_scores.shape[-1:] != (2,):
    raise ValueError("student_scores and teacher_scores must both be [B, 2], got "
                     f"{student_scores.shape} and {teacher_scores.shape}")
  dtype = jnp.promote_types(student_scores.dtype, jnp.float32)
  student_target = jnp.broadcast_to(jnp.array([1.0, 0.0], dtype), student_scores.shape)
  student_bce = optax.sigmoid_binary_cross_entropy(student_scores.astype(dtype), student_target)
  teacher_bce = optax.sigmoid_binary_cross_entropy(teacher_scores.astype(dtype),
                                                   1.0 - student_target)
  return 0.25 * (jnp.sum(student_bce, axis=-1) + jnp.sum(teacher_bce, axis=-1))


register("meal_v2_discriminator", meal_v2_discriminator_loss, per_example=True, kind="logits",
         paper="Shen & Savvides, NeurIPS-W 2020",
         reference="szq0214/MEAL-V2 models/discriminator.py Discriminator + loss.py discriminatorLoss")
