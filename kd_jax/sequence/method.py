"""Language-model distillation as a `kd_jax.step.Method`: a causal-LM student, a frozen LM
teacher, token-level terms, optionally on the student's own samples.

Batches are `{"tokens": [B, L + 1] int32, "mask": [B, L]}` (inputs `tokens[:, :-1]`, targets
`tokens[:, 1:]`; mask 1 = real target) plus, for `topk_weight > 0`, the teacher's cached top-k
`teacher_topk_logits`/`teacher_topk_indices` `[B, L, k]` and `teacher_logsumexp` `[B, L]`.
Every term is a mean over real tokens (`kd_jax.losses.masked_mean`):

- `ce_weight`: next-token cross-entropy on the data;
- `kd_weight`: a token-level divergence to the teacher (`kd_jax.losses.token_divergence`:
  forward KL, reverse KL, JS, GKD's generalized JSD); `chunked` computes it from the hidden
  states and both LM heads without the `[B·L, V]` logits (`chunked_token_divergence`);
- `topk_weight`: KD from the stored top-k teacher logits (`kd_jax.losses.topk_kd`);
- `minilm_weight`: MiniLM self-attention transfer between chosen layers
  (`minilm_relations="attention_value"`: attention distributions + value relations, equal head
  counts) or MiniLMv2's Q-Q, K-K and V-V relations re-split into `num_relation_heads`
  (`"qkv"`: any head counts and widths);
- `on_policy_fraction`: from step `on_policy_start_step` on, that fraction of each batch's rows
  is replaced by the student's own continuation of the rows' first `prompt_length` tokens
  (sampled with its KV cache, no gradient through the sampling), scored by the teacher: GKD's
  on-policy data (Agarwal et al., "On-Policy Distillation of Language Models", ICLR 2024, whose
  students start from supervised training). Those rows carry only the divergence term, on the
  sampled tokens; cross-entropy stays on the data rows.
"""
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.losses import tokens
from kd_jax.distiller import read_tap
from kd_jax.models import make_apply_fn
from kd_jax.models.transformer_lm import TransformerLM
from kd_jax.sequence.sampling import sample
from kd_jax.step import cross_entropy

MINILM_RELATIONS = ("attention_value", "qkv")
TOPK_KEYS = ("teacher_topk_logits", "teacher_topk_indices", "teacher_logsumexp")


@dataclasses.dataclass(frozen=True)
class SequenceLoss:
  """The weighted terms of language-model distillation (see the module docstring)."""
  ce_weight: float = 1.0
  kd_weight: float = 0.0
  divergence: str = "forward_kl"
  temperature: float = 1.0
  beta: float = 0.5
  chunked: bool = False
  token_chunk: int = 1024
  vocab_chunk: int = 8192
  topk_weight: float = 0.0
  topk_tail: str = "bin"
  minilm_weight: float = 0.0
  minilm_layers: tuple = ()        # ((student block, teacher block), ...); () = last → last
  minilm_relations: str = "attention_value"
  num_relation_heads: int = 0      # "qkv": 0 = the student's head count
  on_policy_fraction: float = 0.0
  on_policy_start_step: int = 0    # data-only steps first (GKD starts from a trained student)
  prompt_length: int = 0
  sample_temperature: float = 1.0

  @classmethod
  def from_config(cls, config: Mapping[str, Any], where: str) -> "SequenceLoss":
    """From a config dict; unknown keys and bad values raise naming `where.<field>`."""
    config = dict(config)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
      raise ValueError(f"{where} has unknown fields {unknown}; valid: {', '.join(valid)}")
    if "minilm_layers" in config:
      config["minilm_layers"] = tuple(tuple(pair) for pair in config["minilm_layers"])
    loss = cls(**config)
    loss.check(where)
    return loss

  def check(self, where: str = "loss") -> None:
    weights = {n: getattr(self, n) for n in ("ce_weight", "kd_weight", "topk_weight",
                                             "minilm_weight")}
    for name, value in weights.items():
      if not value >= 0:
        raise ValueError(f"{where}.{name}={value} must be >= 0")
    if not any(weights.values()):
      raise ValueError(f"{where}: every weight is 0; set ce_weight, kd_weight, topk_weight or "
                       "minilm_weight > 0")
    if self.divergence not in tokens.DIVERGENCES:
      raise ValueError(f"{where}.divergence={self.divergence!r} is unknown; valid: "
                       f"{', '.join(tokens.DIVERGENCES)}")
    if self.topk_tail not in tokens.TAILS:
      raise ValueError(f"{where}.topk_tail={self.topk_tail!r} is unknown; valid: "
                       f"{', '.join(tokens.TAILS)}")
    if self.minilm_relations not in MINILM_RELATIONS:
      raise ValueError(f"{where}.minilm_relations={self.minilm_relations!r} is unknown; valid: "
                       f"{', '.join(MINILM_RELATIONS)}")
    if any(len(pair) != 2 for pair in self.minilm_layers):
      raise ValueError(f"{where}.minilm_layers={self.minilm_layers} must be (student block, "
                       "teacher block) pairs, e.g. ((1, 3),)")
    if not 0.0 <= self.on_policy_fraction <= 1.0:
      raise ValueError(f"{where}.on_policy_fraction={self.on_policy_fraction} must be in [0, 1]")
    if self.on_policy_fraction and not self.kd_weight:
      raise ValueError(f"{where}: on-policy rows are scored by the kd term; set kd_weight > 0 "
                       "(e.g. divergence='reverse_kl' or 'gjsd')")
    if self.on_policy_start_step < 0:
      raise ValueError(f"{where}.on_policy_start_step={self.on_policy_start_step} must be >= 0")
    if self.on_policy_fraction and self.prompt_length < 1:
      raise ValueError(f"{where}.prompt_length={self.prompt_length} must be >= 1 with "
                       "on-policy rows (the student continues the rows' first tokens)")

  @property
  def uses_teacher(self) -> bool:
    return bool(self.kd_weight or self.minilm_weight)


class SequenceDistiller:
  """A `TransformerLM` student trained on `SequenceLoss` terms against a frozen teacher.

  State (the layout every kd_jax method uses): `trainable = {"student": params}`, `frozen =
  {"teacher": variables}` (when a term reads the teacher), `extra = {"model_state":
  {"student": {}}}`.
  """

  evolving_frozen = ()

  def __init__(self, student: TransformerLM, loss: SequenceLoss,
               teacher: TransformerLM | None = None):
    loss.check()
    if loss.uses_teacher and teacher is None:
      raise ValueError("kd_weight and minilm_weight need a teacher model")
    self.student, self.teacher, self.spec = student, teacher, loss
    self.student_apply = make_apply_fn(student)
    self.teacher_apply = make_apply_fn(teacher) if loss.uses_teacher else None
    self.layer_pairs = loss.minilm_layers or ((-1, -1),)

  def init(self, rng, variables, batch):
    del rng
    self._check_shapes(variables, batch)
    trainable = {"student": variables["student"]["params"]}
    frozen = {"teacher": variables["teacher"]} if self.spec.uses_teacher else {}
    return trainable, frozen, {"model_state": {"student": {}}}

  def _check_shapes(self, variables, batch) -> None:
    """Errors for what would otherwise fail deep inside the step."""
    spec, length = self.spec, batch["tokens"].shape[1] - 1
    if spec.topk_weight:
      missing = [k for k in TOPK_KEYS if k not in batch]
      if missing:
        raise ValueError(f"topk_weight > 0 but the batch has no {missing}: build the teacher's "
                         "top-k cache (kd_jax.sequence.topk_cache)")
    if spec.on_policy_fraction and not spec.prompt_length < length:
      raise ValueError(f"prompt_length={spec.prompt_length} must be shorter than the sequence "
                       f"length {length}")
    if not spec.minilm_weight:
      return
    for side, model in (("student", self.student), ("teacher", self.teacher)):
      for pair in self.layer_pairs:
        block = pair[0 if side == "student" else 1]
        if not -model.depth <= block < model.depth:
          raise ValueError(f"minilm_layers: {side} block {block} does not exist; the {side} has "
                           f"{model.depth} blocks (0..{model.depth - 1}, or negative from the end)")
    heads = self.student.num_heads, self.teacher.num_heads
    if spec.minilm_relations == "attention_value" and heads[0] != heads[1]:
      raise ValueError(f"minilm_relations='attention_value' compares attention maps head by head, "
                       f"but the student has {heads[0]} heads and the teacher {heads[1]}; use "
                       "minilm_relations='qkv' (MiniLMv2 relation heads)")
    relation_heads = spec.num_relation_heads or self.student.num_heads
    for side, model in (("student", self.student), ("teacher", self.teacher)):
      if spec.minilm_relations == "qkv" and model.width % relation_heads:
        raise ValueError(f"num_relation_heads={relation_heads} must divide the {side}'s width "
                         f"{model.width}")

  def _on_policy(self, params, tokens, mask, rng):
    """Rows [0, n) become the student's continuations of their first `prompt_length` tokens;
    returns the new tokens, the data-row mask (for cross-entropy) and the divergence mask."""
    n = round(self.spec.on_policy_fraction * tokens.shape[0])
    if n == 0:
      return tokens, mask, mask
    length, prompt = tokens.shape[1] - 1, self.spec.prompt_length
    # The student reads L tokens (its max_len), so it samples up to position L − 1; the last
    # target of a sampled row is a placeholder, masked out.
    sampled = sample(self.student, jax.lax.stop_gradient(params), tokens[:n, :prompt],
                     length - prompt, rng, temperature=self.spec.sample_temperature)
    tokens = jnp.concatenate([jnp.pad(sampled, ((0, 0), (0, 1))), tokens[n:]])
    rows = jnp.arange(tokens.shape[0])[:, None] < n
    position = jnp.arange(length)[None, :]
    generated = (position >= prompt - 1) & (position < length - 1)  # targets that were sampled
    data_mask = jnp.where(rows, 0.0, mask)
    return tokens, data_mask, jnp.where(rows, generated.astype(mask.dtype), mask)

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """Σ weight·term; see `kd_jax.step.Method.loss`."""
    spec = self.spec
    mask = batch["mask"].astype(jnp.float32)
    tokens, data_mask, kd_mask = batch["tokens"], mask, mask
    sample_rng, dropout_rng = jax.random.split(rng)
    if spec.on_policy_fraction:
      tokens, data_mask, kd_mask = jax.lax.cond(
          step >= spec.on_policy_start_step,
          lambda: self._on_policy(trainable["student"], tokens, mask, sample_rng),
          lambda: (tokens, mask, mask))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    student, _ = self.student_apply({"params": trainable["student"]}, inputs, train=True,
                                    rngs={"dropout": dropout_rng})
    teacher = None
    if spec.uses_teacher:
      teacher, _ = self.teacher_apply(jax.lax.stop_gradient(frozen["teacher"]), inputs,
                                      train=False)
      teacher = jax.lax.stop_gradient(teacher)
    terms = {}
    if spec.ce_weight:
      ce = cross_entropy(student.logits, targets)
      terms["ce"] = (spec.ce_weight, losses.masked_mean(ce, data_mask))
    if spec.kd_weight:
      terms["kd"] = (spec.kd_weight, losses.masked_mean(
          self._divergence(trainable, frozen, student, teacher), kd_mask))
    if spec.topk_weight:
      topk = losses.topk_kd(student.logits, *(batch[k] for k in TOPK_KEYS),
                            temperature=spec.temperature, tail=spec.topk_tail)
      terms["topk"] = (spec.topk_weight, losses.masked_mean(topk, data_mask))
    if spec.minilm_weight:
      terms["minilm"] = (spec.minilm_weight, self._minilm(student, teacher, mask))
    total = sum(weight * value for weight, value in terms.values())
    correct = jnp.argmax(student.logits, -1) == targets
    metrics = {f"terms/{name}": value for name, (_, value) in terms.items()}
    metrics["train/accuracy"] = losses.masked_mean(correct, data_mask)
    return total, (metrics, extra)

  def after_update(self, old_state, new_state):
    del old_state
    return new_state

  def _divergence(self, trainable, frozen, student, teacher):
    """Per-token divergence `[B, L]`, from the logits or chunked from hidden states."""
    spec = self.spec
    hparams = {"divergence": spec.divergence, "temperature": spec.temperature, "beta": spec.beta}
    if not spec.chunked:
      return losses.token_divergence(student.logits, teacher.logits, **hparams)
    hidden_s, hidden_t = student.features["hidden"], teacher.features["hidden"]
    head_s, head_t = trainable["student"]["lm_head"], frozen["teacher"]["params"]["lm_head"]
    flat = lambda x: x.reshape(-1, x.shape[-1])
    values = losses.chunked_token_divergence(
        flat(hidden_s), head_s["kernel"], head_s["bias"], flat(hidden_t),
        jax.lax.stop_gradient(head_t["kernel"]), jax.lax.stop_gradient(head_t["bias"]),
        token_chunk=spec.token_chunk, vocab_chunk=spec.vocab_chunk, **hparams)
    return values.reshape(hidden_s.shape[:2])

  def _minilm(self, student, teacher, mask):
    """MiniLM (or MiniLMv2) transfer summed over the layer pairs, mean over real tokens."""
    value = jnp.float32(0.0)
    heads = self.spec.num_relation_heads or self.student.num_heads
    for s, t in self.layer_pairs:
      s, t = s % self.student.depth, t % self.teacher.depth
      if self.spec.minilm_relations == "attention_value":
        per_token = (losses.attention_kl(read_tap(student, f"attn/{s}", "student"),
                                         read_tap(teacher, f"attn/{t}", "teacher"), mask=mask) +
                     losses.value_relation_kl(student.features[f"values/{s}"],
                                              teacher.features[f"values/{t}"], mask=mask))
      else:
        per_token = sum(losses.self_relation_kl(_concat_heads(student.features[f"{k}/{s}"]),
                                                _concat_heads(teacher.features[f"{k}/{t}"]),
                                                mask=mask, num_relation_heads=heads)
                        for k in ("queries", "keys", "values"))
      value += losses.masked_mean(per_token, mask)
    return value


def _concat_heads(x: jax.Array) -> jax.Array:
  """`[B, h, T, d]` per-head projections → `[B, T, h·d]` (MiniLMv2 re-splits them)."""
  batch, heads, tokens, width = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(batch, tokens, heads * width)
