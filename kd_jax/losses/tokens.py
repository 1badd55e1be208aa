"""Token-level (sequence) distillation losses over `[..., V]` logits, e.g. `[B, T, V]`.

One value per token `[...]`, no reduction: average over the real tokens with
`kd_jax.losses.masked_mean(values, mask)` and a `[B, T]` mask (1 = real token, 0 = padding).
Computed in at least float32, teacher inputs under `stop_gradient`, like `losses/logits.py`,
whose per-example losses (`kd`, `reverse_kl`, `jensen_shannon`) also take `[..., V]` logits.

- `generalized_jsd`: GKD's generalized Jensen–Shannon divergence.
- `token_divergence`: one of forward KL, reverse KL, JS or generalized JSD, by name.
- `chunked_token_divergence`: the same from LM-head inputs (hidden states, kernels, biases),
  never materialising the `[N, V]` logits.
- `teacher_topk` / `topk_kd`: offline distillation from a cache of the teacher's top-k logits.
"""
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from kd_jax.losses.logits import _float, _kl, _student_teacher, jensen_shannon, kd, reverse_kl
from kd_jax.losses.registry import register
from kd_jax.losses.utils import check_choice, check_hparam, check_positive

Array = jax.Array

DIVERGENCES = ("forward_kl", "reverse_kl", "js", "gjsd")
TAILS = ("bin", "renormalize")
# A finite −∞: exp() of it underflows to exactly 0 while differences of such values stay finite.
_NEG = -1e30


def _check_beta(loss: str, beta) -> None:
  check_hparam(loss, "beta", beta, lambda b: (b >= 0) & (b <= 1), "in [0, 1]")


def _gjsd_sum(log_ps: Array, log_pt: Array, beta) -> Array:
  """Σ over the last axis of the generalized JSD's terms (TRL's cases for a concrete β = 0, 1)."""
  if not isinstance(beta, jax.core.Tracer) and beta == 0:
    return _kl(log_pt, log_ps)
  if not isinstance(beta, jax.core.Tracer) and beta == 1:
    return _kl(log_ps, log_pt)
  log_m = jnp.logaddexp(log_ps + jnp.log1p(-beta), log_pt + jnp.log(beta))
  return beta * _kl(log_pt, log_m) + (1 - beta) * _kl(log_ps, log_m)


def _divergence_sum(log_ps: Array, log_pt: Array, divergence: str, beta) -> Array:
  """Σ over the last axis of the divergence's terms, without T²: the full divergence from
  log-probabilities over the whole vocabulary, or one vocabulary chunk's share of it."""
  if divergence == "forward_kl":
    return _kl(log_pt, log_ps)
  if divergence == "reverse_kl":
    return _kl(log_ps, log_pt)
  return _gjsd_sum(log_ps, log_pt, 0.5 if divergence == "js" else beta)


def generalized_jsd(student_logits: Array, teacher_logits: Array, *, beta: float = 0.5,
                    temperature: float = 1.0) -> Array:
  """GKD's generalized JSD per token: β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m), m = β·p_t + (1 − β)·p_s.

  p = softmax(logits / T); log m = logsumexp(log p_s + log(1 − β), log p_t + log β). As in TRL,
  β = 0 is KL(p_t ‖ p_s) (forward) and β = 1 is KL(p_s ‖ p_t) (reverse), not the mixture's limits
  (which are 0); a traced β always takes the mixture formula. There is no T² factor (TRL has
  none), unlike `kd`: at β = 0 this is `kd / T²`, at β = ½ `jensen_shannon / T²`.

  Args:
    student_logits, teacher_logits: `[..., V]`, e.g. `[B, T, V]`.
    beta: β in [0, 1] (TRL default 0.5).
    temperature: T > 0.
  Returns:
    `[...]` float32, one value per token; `masked_mean` over the real tokens gives TRL's
    "batchmean" loss with `labels` = -100 at padding.

  Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes" (GKD), ICLR 2024. Reference: huggingface/trl `GKDTrainer.generalized_jsd_loss`.

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> round(float(generalized_jsd(s, t)[0]), 4), round(float(jensen_shannon(s, t)[0]), 4)
  (0.101, 0.101)
  >>> round(float(generalized_jsd(s, t, beta=0.0)[0]), 4)
  0.4205
  """
  check_positive("generalized_jsd", temperature=temperature)
  _check_beta("generalized_jsd", beta)
  s, t = _student_teacher(student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  return _gjsd_sum(log_ps, log_pt, beta)


_TOKEN_DIVERGENCES = {"forward_kl": kd, "reverse_kl": reverse_kl, "js": jensen_shannon}


def token_divergence(student_logits: Array, teacher_logits: Array, *,
                     divergence: str = "forward_kl", temperature: float = 1.0,
                     beta: float = 0.5) -> Array:
  """One value per token of the divergence named `divergence`, by dispatch:

  "forward_kl" → `kd`, "reverse_kl" → `reverse_kl`, "js" → `jensen_shannon` (all with their T²
  factor), "gjsd" → `generalized_jsd` (no T² factor; the only one that reads `beta`).

  Args:
    student_logits, teacher_logits: `[..., V]`.
    divergence: one of `DIVERGENCES`.
    temperature: T > 0.
    beta: the generalized JSD's β in [0, 1].
  Returns:
    `[...]` float32.

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> round(float(token_divergence(s, t, divergence="js")[0]), 4)
  0.101
  """
  check_choice("token_divergence", "divergence", divergence, DIVERGENCES)
  if divergence == "gjsd":
    return generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature)
  return _TOKEN_DIVERGENCES[divergence](student_logits, teacher_logits, temperature=temperature)


def chunked_token_divergence(student_hidden: Array, student_kernel: Array,
                             student_bias: Array | None, teacher_hidden: Array,
                             teacher_kernel: Array, teacher_bias: Array | None, *,
                             divergence: str = "forward_kl", temperature: float = 1.0,
                             beta: float = 0.5, token_chunk: int = 1024,
                             vocab_chunk: int = 8192) -> Array:
  """`token_divergence` of two LM heads' logits, computed chunk by chunk from their inputs.

  Equals `token_divergence(student_hidden @ student_kernel + student_bias, teacher_hidden @
  teacher_kernel + teacher_bias, ...)` (same T² factor: kd, reverse_kl and js have it, gjsd
  not) without materialising the logits. The LM-head logits `[B·T, V]` are the largest tensors
  of language-model distillation, twice (student and teacher), and autodiff keeps them for the
  backward pass. Here an outer `lax.scan` walks token chunks; for each, a first scan over
  vocabulary chunks accumulates both sides' logsumexp of logits/T online and a second one sums
  the divergence's terms. The scanned bodies are `jax.checkpoint`-ed, so the backward pass
  recomputes each `[token_chunk, vocab_chunk]` block instead of storing it: besides the inputs
  and their gradients, memory is a few such blocks plus kernel-sized gradient accumulators,
  independent of N (benchmarks/token_kd_memory.py). N and V need not be multiples of the
  chunks: padded tokens are dropped, and the last vocabulary chunk ends at V, its columns
  already covered by the previous chunk getting logit −1e30 (probability exactly 0,
  contributing exactly 0).

  Args:
    student_hidden: `[N, D_s]` inputs of the student's LM head (flatten `[B, T, D_s]` first).
    student_kernel: `[D_s, V]`; student_bias: `[V]` or None.
    teacher_hidden: `[N, D_t]`; teacher_kernel: `[D_t, V]`; teacher_bias: `[V]` or None. The
      teacher side is under `stop_gradient`; both sides compute in at least float32.
    divergence: one of `DIVERGENCES`.
    temperature: T > 0.
    beta: the generalized JSD's β in [0, 1] (read by "gjsd" only).
    token_chunk, vocab_chunk: block sizes (clipped to N and V).
  Returns:
    `[N]` float32; gradients reach the student's hidden states, kernel and bias.

  >>> hs, ws = jnp.ones((5, 2)), jnp.arange(14.).reshape(2, 7) / 7
  >>> ht, wt = jnp.ones((5, 3)), jnp.ones((3, 7)) / 3
  >>> chunked = chunked_token_divergence(hs, ws, None, ht, wt, None, token_chunk=2, vocab_chunk=3)
  >>> bool(jnp.allclose(chunked, token_divergence(hs @ ws, ht @ wt), atol=1e-6))
  True
  """
  name = "chunked_token_divergence"
  check_choice(name, "divergence", divergence, DIVERGENCES)
  check_positive(name, temperature=temperature, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
  _check_beta(name, beta)
  hs, ws = _float(student_hidden), _float(student_kernel)
  ht, wt = jax.lax.stop_gradient((_float(teacher_hidden), _float(teacher_kernel)))
  n, vocab = hs.shape[0], wt.shape[-1]
  if (hs.ndim != 2 or ht.ndim != 2 or ht.shape[0] != n or ws.shape != (hs.shape[1], vocab)
      or wt.shape != (ht.shape[1], vocab)):
    raise ValueError(f"{name}: expected student_hidden [N, D_s], student_kernel [D_s, V], "
                     f"teacher_hidden [N, D_t], teacher_kernel [D_t, V]; got {hs.shape}, "
                     f"{ws.shape}, {ht.shape}, {wt.shape}")
  bs = jnp.zeros((vocab,), hs.dtype) if student_bias is None else _float(student_bias)
  bt = jax.lax.stop_gradient(jnp.zeros((vocab,), ht.dtype) if teacher_bias is None
                             else _float(teacher_bias))
  token_chunk, vocab_chunk = min(token_chunk, n), min(vocab_chunk, vocab)
  num_tokens, num_vocab = math.ceil(n / token_chunk), math.ceil(vocab / vocab_chunk)

  def token_chunks(h):  # [N, D] → [num_tokens, token_chunk, D], zero-padded
    h = jnp.pad(h, ((0, num_tokens * token_chunk - n), (0, 0)))
    return h.reshape(num_tokens, token_chunk, h.shape[-1])

  def chunk_logits(h_s, h_t, c):  # both sides' logits/T on vocabulary chunk c
    start = jnp.minimum(c * vocab_chunk, vocab - vocab_chunk)  # the last chunk ends at V
    new = start + jnp.arange(vocab_chunk) >= c * vocab_chunk  # not in the previous chunk

    def logits(h, w, b):
      z = (h @ jax.lax.dynamic_slice_in_dim(w, start, vocab_chunk, axis=1) +
           jax.lax.dynamic_slice_in_dim(b, start, vocab_chunk))
      return jnp.where(new, z / temperature, _NEG)

    return logits(h_s, ws, bs), logits(h_t, wt, bt)

  chunks = jnp.arange(num_vocab)

  @jax.checkpoint
  def token_step(_, hidden):
    h_s, h_t = hidden

    @jax.checkpoint
    def logsumexp_step(lse, c):
      z_s, z_t = chunk_logits(h_s, h_t, c)
      return (jnp.logaddexp(lse[0], jax.nn.logsumexp(z_s, axis=-1)),
              jnp.logaddexp(lse[1], jax.nn.logsumexp(z_t, axis=-1))), None

    empty = jnp.full((token_chunk,), _NEG, hs.dtype)
    (lse_s, lse_t), _ = jax.lax.scan(logsumexp_step, (empty, empty), chunks)

    @jax.checkpoint
    def divergence_step(total, c):
      z_s, z_t = chunk_logits(h_s, h_t, c)
      return total + _divergence_sum(z_s - lse_s[:, None], z_t - lse_t[:, None], divergence,
                                     beta), None

    total, _ = jax.lax.scan(divergence_step, jnp.zeros((token_chunk,), hs.dtype), chunks)
    return None, total

  _, values = jax.lax.scan(token_step, None, (token_chunks(hs), token_chunks(ht)))
  scale = 1.0 if divergence == "gjsd" else temperature**2
  return scale * values.reshape(-1)[:n]


def teacher_topk(teacher_logits: Array, k: int, *,
                 temperature: float = 1.0) -> tuple[Array, Array, Array]:
  """What an offline cache stores per token for `topk_kd`: the teacher's top-k logits.

  Args:
    teacher_logits: `[..., V]`.
    k: how many logits to keep, 1 ≤ k ≤ V (static).
    temperature: T > 0 of the distillation; pass the same T to `topk_kd`.
  Returns:
    `(values [..., k], indices [..., k] int32, logsumexp [...])`: the raw top-k logits (largest
    first), their vocabulary ids, and logsumexp(teacher_logits / T) over the FULL vocabulary,
    all float32 except the ids, under `stop_gradient`.

  >>> v, i, lse = teacher_topk(jnp.array([[1., 3., 2.]]), 2)
  >>> v.tolist(), i.tolist(), round(float(lse[0]), 4)
  ([[3.0, 2.0]], [[1, 2]], 3.4076)
  """
  check_positive("teacher_topk", temperature=temperature)
  t = jax.lax.stop_gradient(_float(teacher_logits))
  vocab = t.shape[-1]
  check_hparam("teacher_topk", "k", k, lambda k: 1 <= k <= vocab, f"in [1, {vocab}]")
  values, indices = jax.lax.top_k(t, k)
  return values, indices.astype(jnp.int32), jax.nn.logsumexp(t / temperature, axis=-1)


def topk_kd(student_logits: Array, teacher_topk_logits: Array, teacher_topk_indices: Array,
            teacher_logsumexp: Array, *, temperature: float = 1.0, tail: str = "bin") -> Array:
  """KD per token from stored top-k teacher logits (`teacher_topk`), T²-scaled like `kd`.

  tail="bin": the teacher's exact probabilities on its top-k ids, p_i = exp(v_i/T − lse_t),
  plus one tail bin with the rest of its mass r = max(1 − Σ p_i, 0); the student's full-vocabulary
  distribution q = softmax(s/T) is coarsened the same way (q at the k ids, and its tail mass
  logsumexp of the other logits/T minus its logsumexp, computed stably); the loss is T²·KL
  between the two (k + 1)-bin distributions. Coarsening cannot increase a KL (data-processing
  inequality), so this is a lower bound of the full-vocabulary `kd`, never decreasing as k grows,
  and equal to it at k = V.
  tail="renormalize" (MaxText-style): p̂ = softmax(v/T) over the k logits only and the loss
  T²·Σ_i p̂_i (log p̂_i − log q_i), with q the student's full-vocabulary softmax at the k ids;
  `teacher_logsumexp` is unused. It is ≥ 0 (= KL(p̂ ‖ q̂) − log Σ_i q_i, q̂ = q renormalised on
  the k ids) and equals the full `kd` only at k = V.

  Args:
    student_logits: `[..., V]`.
    teacher_topk_logits: `[..., k]` raw teacher logits; teacher_topk_indices: `[..., k]` their
      distinct vocabulary ids; teacher_logsumexp: `[...]` logsumexp(teacher_logits / T) over
      the full vocabulary, at the same T.
    temperature: T > 0.
    tail: "bin" (default) or "renormalize".
  Returns:
    `[...]` float32.

  Hinton et al., "Distilling the Knowledge in a Neural Network", 2015; top-k teacher-logit
  storage as in MaxText's offline distillation (google/maxtext; description only, no code read).
  Not registered: a config's taps cannot supply the cached top-k inputs.

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> [round(float(topk_kd(s, *teacher_topk(t, k))[0]), 4) for k in (1, 2, 3)]
  [0.3929, 0.4205, 0.4205]
  >>> round(float(kd(s, t, temperature=1.0)[0]), 4)
  0.4205
  """
  check_positive("topk_kd", temperature=temperature)
  check_choice("topk_kd", "tail", tail, TAILS)
  s = _float(student_logits)
  values = jax.lax.stop_gradient(_float(teacher_topk_logits))
  indices = jnp.asarray(teacher_topk_indices)
  log_q = jax.nn.log_softmax(s / temperature, axis=-1)
  log_q_top = jnp.take_along_axis(log_q, indices, axis=-1)
  if tail == "renormalize":
    return temperature**2 * _kl(jax.nn.log_softmax(values / temperature, axis=-1), log_q_top)
  lse_t = jax.lax.stop_gradient(_float(teacher_logsumexp))
  log_p_top = values / temperature - lse_t[..., None]
  loss = _kl(log_p_top, log_q_top)
  if indices.shape[-1] < s.shape[-1]:  # a tail bin exists
    teacher_tail = jnp.maximum(1.0 - jnp.sum(jnp.exp(log_p_top), axis=-1), 0.0)
    in_top = jnp.put_along_axis(jnp.zeros(s.shape, bool), indices, True, axis=-1, inplace=False)
    log_q_tail = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, log_q), axis=-1)
    loss = loss + xlogy(teacher_tail, teacher_tail) - teacher_tail * log_q_tail
  return temperature**2 * loss


register("generalized_jsd", generalized_jsd, per_example=True, kind="logits",
         paper="Agarwal et al., On-Policy Distillation of Language Models (GKD), ICLR 2024",
         reference="huggingface/trl GKDTrainer.generalized_jsd_loss")
