"""MiniLM self-attention distillation: KL between attention and value-relation distributions.

Per token and per head: for query token i of head a, KL(teacher_row ‖ student_row) over the
key tokens. Outputs are `[B, T]` (averaged over heads) or `[B]` with `per_example=True`
(averaged over real tokens too), float32, teacher gradient-stopped. The keyword-only
`mask: [B, T]` (1 = real token, 0 = padding) removes padded keys from every distribution and
zeroes padded query rows; reduce `[B, T]` with `kd_jax.losses.masked_mean(values, mask)` to get
MiniLM's `1/(A_h·|x|) Σ Σ KL`. `per_example` and `num_relation_heads` are static (they set the
output's shape and the head split).

MiniLM distils the LAST layer of the teacher into the last layer of the student (MiniLMv2:
an upper-middle teacher layer); pick those layers' tensors when calling.

Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
Pre-Trained Transformers", NeurIPS 2020; Wang et al., "MiniLMv2: Multi-Head Self-Attention
Relation Distillation", ACL Findings 2021. Reference: microsoft/unilm `minilm`.
torchdistill 1.1.5 has no MiniLM loss.
"""
import jax
import jax.numpy as jnp

from kd_jax.losses.features import as_float32, teacher_float32
from kd_jax.losses.registry import register

# Finite stand-in for −∞ on masked keys: keeps 0·(masked log-prob) at exactly 0.
_MASKED = -1e30


def _check_mask(mask, batch_size: int, tokens: int):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != (batch_size, tokens):
    raise ValueError(f"mask must have shape ({batch_size}, {tokens}) ([B, T], one flag per "
                     f"token), got {mask.shape}")
  return mask > 0


def _row_kl(student_scores: jax.Array, teacher_scores: jax.Array, mask,
            per_example: bool) -> jax.Array:
  """KL(softmax(t) ‖ softmax(s)) over the last axis of `[B, H, T, T]`, reduced to [B, T]/[B]."""
  if student_scores.shape != teacher_scores.shape:
    raise ValueError(f"student {student_scores.shape} and teacher {teacher_scores.shape} must "
                     "have the same [B, heads, T, T] shape (same number of heads)")
  batch_size, _, tokens, _ = student_scores.shape
  keep = _check_mask(mask, batch_size, tokens)
  if keep is not None:
    keys = keep[:, None, None, :]
    student_scores = jnp.where(keys, student_scores, _MASKED)
    teacher_scores = jnp.where(keys, teacher_scores, _MASKED)
  log_s = jax.nn.log_softmax(student_scores, axis=-1)
  log_t = jax.nn.log_softmax(teacher_scores, axis=-1)
  p_t = jnp.exp(log_t)
  kl = jnp.sum(jnp.where(p_t > 0, p_t * (log_t - log_s), 0.0), axis=-1)  # [B, H, T]
  kl = jnp.mean(kl, axis=1)  # heads
  if keep is None:
    return jnp.mean(kl, axis=1) if per_example else kl
  kl = jnp.where(keep, kl, 0.0)
  if per_example:
    return jnp.sum(kl, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1)
  return kl


def attention_kl(student_scores: jax.Array, teacher_scores: jax.Array, *,
                 mask: jax.Array | None = None, per_example: bool = False) -> jax.Array:
  """MiniLM self-attention distribution transfer.

  ℓ_{b,i} = (1/A_h) Σ_a KL(softmax(S^t_{b,a,i,:}) ‖ softmax(S^s_{b,a,i,:})).

  Args:
    student_scores: `[B, heads, T, T]` pre-softmax attention scores QKᵀ/√d (or log
      attention probabilities, which give the same softmax).
    teacher_scores: same shape (MiniLM needs equal head counts).
    mask: `[B, T]` (1 = real token, 0 = padding) or None.
    per_example: return `[B]` (mean over real tokens) instead of `[B, T]`.
  Returns:
    `[B, T]` or `[B]` float32.

  >>> s = jnp.arange(16.).reshape(1, 1, 4, 4)
  >>> float(attention_kl(s, s, per_example=True)[0])
  0.0
  """
  return _row_kl(as_float32(student_scores), teacher_float32(teacher_scores), mask, per_example)


def _relation_scores(states: jax.Array) -> jax.Array:
  """Scaled dot products V Vᵀ/√d per head: `[B, H, T, d]` → `[B, H, T, T]`."""
  return jnp.einsum("bhid,bhjd->bhij", states, states) / jnp.sqrt(jnp.float32(states.shape[-1]))


def value_relation_kl(student_values: jax.Array, teacher_values: jax.Array, *,
                      mask: jax.Array | None = None, per_example: bool = False) -> jax.Array:
  """MiniLM value-relation transfer: KL between softmax(V Vᵀ/√d_k) per head.

  Head widths d_k may differ between student and teacher; head counts must match.

  Args:
    student_values: `[B, heads, T, d_s]` per-head values of the student's last layer.
    teacher_values: `[B, heads, T, d_t]`.
    mask: `[B, T]` (1 = real token, 0 = padding) or None.
    per_example: return `[B]` instead of `[B, T]`.
  Returns:
    `[B, T]` or `[B]` float32.

  >>> v = jnp.arange(24.).reshape(1, 2, 3, 4) / 10
  >>> float(value_relation_kl(v, v).sum())
  0.0
  """
  if student_values.ndim != 4 or teacher_values.ndim != 4:
    raise ValueError(f"value_relation_kl expects [B, heads, T, d] values, got "
                     f"{student_values.shape} and {teacher_values.shape}")
  return _row_kl(_relation_scores(as_float32(student_values)),
                 _relation_scores(teacher_float32(teacher_values)), mask, per_example)


def _split_heads(states: jax.Array, num_heads: int, side: str) -> jax.Array:
  batch_size, tokens, width = states.shape
  if width % num_heads:
    raise ValueError(f"self_relation_kl: {side} width {width} is not divisible by "
                     f"num_relation_heads={num_heads}")
  return jnp.swapaxes(states.reshape(batch_size, tokens, num_heads, width // num_heads), 1, 2)


def self_relation_kl(student_states: jax.Array, teacher_states: jax.Array, *,
                     mask: jax.Array | None = None, num_relation_heads: int,
                     per_example: bool = False) -> jax.Array:
  """MiniLMv2 self-attention relation transfer for one of Q-Q, K-K or V-V.

  The concatenated per-head queries (or keys, values) `[B, T, D]` are re-split into
  `num_relation_heads` relation heads, independent of the models' head counts, and
  compared as in `value_relation_kl`. Student and teacher widths may differ.

  Args:
    student_states: `[B, T, D_s]`.
    teacher_states: `[B, T, D_t]`.
    mask: `[B, T]` (1 = real token, 0 = padding) or None.
    num_relation_heads: ≥ 1, dividing D_s and D_t (required; a static Python int).
    per_example: return `[B]` instead of `[B, T]`.
  Returns:
    `[B, T]` or `[B]` float32.

  >>> q = jnp.arange(24.).reshape(1, 3, 8) / 10
  >>> self_relation_kl(q, q, num_relation_heads=2).shape
  (1, 3)
  """
  if not (isinstance(num_relation_heads, int) and num_relation_heads >= 1):
    raise ValueError(f"self_relation_kl: num_relation_heads must be a positive int, got "
                     f"{num_relation_heads!r}")
  if student_states.ndim != 3 or teacher_states.ndim != 3:
    raise ValueError(f"self_relation_kl expects [B, T, D] states, got {student_states.shape} "
                     f"and {teacher_states.shape}")
  return value_relation_kl(_split_heads(student_states, num_relation_heads, "student"),
                           _split_heads(teacher_states, num_relation_heads, "teacher"),
                           mask=mask, per_example=per_example)


def minilm(student_scores: jax.Array, teacher_scores: jax.Array, student_values: jax.Array,
           teacher_values: jax.Array, *, mask: jax.Array | None = None,
           per_example: bool = False) -> jax.Array:
  """MiniLM's objective on one layer pair: `attention_kl + value_relation_kl`.

  >>> s, v = jnp.zeros((2, 1, 3, 3)), jnp.ones((2, 1, 3, 4))
  >>> minilm(s, s, v, v, mask=jnp.array([[1, 1, 0], [1, 0, 0]])).shape
  (2, 3)
  """
  return (attention_kl(student_scores, teacher_scores, mask=mask, per_example=per_example) +
          value_relation_kl(student_values, teacher_values, mask=mask, per_example=per_example))


_PAPER = "Wang et al., MiniLM, NeurIPS 2020"
_REF = "microsoft/unilm minilm"
for _name, _fn, _paper in (
    ("minilm_attention", attention_kl, _PAPER),
    ("minilm_value_relation", value_relation_kl, _PAPER),
    ("minilm", minilm, _PAPER),
    ("minilmv2_relation", self_relation_kl, "Wang et al., MiniLMv2, ACL Findings 2021"),
):
  register(_name, _fn, per_example=True, kind="attention", paper=_paper, reference=_REF)
