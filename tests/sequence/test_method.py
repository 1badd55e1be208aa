"""SequenceDistiller: identities between its terms, on-policy rows, MiniLM across shapes, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.models.transformer_lm import TransformerLM
from kd_jax.sequence.method import SequenceDistiller, SequenceLoss

VOCAB, LENGTH, BATCH = 11, 8, 4
TEACHER = TransformerLM(VOCAB, width=16, depth=2, num_heads=4, mlp_dim=16, max_len=LENGTH)
STUDENT = TransformerLM(VOCAB, width=8, depth=1, num_heads=2, mlp_dim=8, max_len=LENGTH)


def _variables(module, seed):
  init = jax.jit(lambda rng: module.init(rng, jnp.zeros((1, LENGTH), jnp.int32), train=False))
  return {"params": init(jax.random.PRNGKey(seed))["params"]}


@pytest.fixture(scope="module")
def setup():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (BATCH, LENGTH + 1), 0, VOCAB)
  mask = np.ones((BATCH, LENGTH), np.float32)
  mask[1, 5:] = 0
  return {"tokens": tokens, "mask": jnp.asarray(mask)}, _variables(TEACHER, 1), _variables(
      STUDENT, 2)


def _loss(method, batch, variables, rng=0, step=0):
  trainable, frozen, extra = method.init(jax.random.PRNGKey(0), variables, batch)
  loss, (metrics, _) = jax.jit(method.loss)(trainable, frozen, extra, batch, jnp.int32(step),
                                            jax.random.PRNGKey(rng))
  return loss, metrics


def test_chunked_kd_equals_kd_on_logits(setup):
  batch, teacher, student = setup
  variables = {"student": student, "teacher": teacher}
  for divergence in ("forward_kl", "gjsd"):
    spec = dict(ce_weight=0.0, kd_weight=1.0, divergence=divergence, temperature=2.0)
    plain, _ = _loss(SequenceDistiller(STUDENT, SequenceLoss(**spec), TEACHER), batch, variables)
    chunked, _ = _loss(SequenceDistiller(STUDENT, SequenceLoss(
        **spec, chunked=True, token_chunk=5, vocab_chunk=4), TEACHER), batch, variables)
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    assert plain > 0


def test_topk_term_with_every_logit_equals_forward_kl(setup):
  batch, teacher, student = setup
  logits = TEACHER.apply(teacher, batch["tokens"][:, :-1], train=False).logits
  cached = dict(zip(("teacher_topk_logits", "teacher_topk_indices", "teacher_logsumexp"),
                    losses.teacher_topk(logits, VOCAB)))
  variables = {"student": student, "teacher": teacher}
  topk, metrics = _loss(SequenceDistiller(STUDENT, SequenceLoss(ce_weight=0.0, topk_weight=1.0)),
                        {**batch, **cached}, variables)
  kd, _ = _loss(SequenceDistiller(STUDENT, SequenceLoss(ce_weight=0.0, kd_weight=1.0), TEACHER),
                batch, variables)
  np.testing.assert_allclose(topk, kd, rtol=1e-5)
  assert float(metrics["terms/topk"]) == pytest.approx(float(topk))


def test_minilm_is_zero_against_itself_and_positive_across_shapes(setup):
  batch, teacher, student = setup
  for relations in ("attention_value", "qkv"):
    same = SequenceDistiller(TEACHER, SequenceLoss(ce_weight=0.0, minilm_weight=1.0,
                                                   minilm_relations=relations,
                                                   minilm_layers=((0, 0), (1, 1))), TEACHER)
    value, _ = _loss(same, batch, {"student": teacher, "teacher": teacher})
    assert abs(float(value)) < 1e-6
  # 1 block, 2 heads, width 8 against 2 blocks, 4 heads, width 16: MiniLMv2 relation heads.
  across = SequenceDistiller(STUDENT, SequenceLoss(ce_weight=0.0, minilm_weight=1.0,
                                                   minilm_relations="qkv", num_relation_heads=2,
                                                   minilm_layers=((0, 0), (-1, -1))), TEACHER)
  variables = {"student": student, "teacher": teacher}
  trainable, frozen, extra = across.init(None, variables, batch)
  value, grads = jax.jit(jax.value_and_grad(
      lambda t: across.loss(t, frozen, extra, batch, 0, jax.random.PRNGKey(0))[0]))(trainable)
  assert float(value) > 0
  assert float(jnp.abs(grads["student"]["block0"]["attention"]["query"]["kernel"]).sum()) > 0


def test_minilm_ignores_padded_tokens(setup):
  batch, teacher, student = setup
  method = SequenceDistiller(STUDENT, SequenceLoss(ce_weight=0.0, minilm_weight=1.0,
                                                   minilm_relations="qkv"), TEACHER)
  variables = {"student": student, "teacher": teacher}
  changed = batch["tokens"].at[1, 6:].set((batch["tokens"][1, 6:] + 3) % VOCAB)
  a, _ = _loss(method, batch, variables)
  b, _ = _loss(method, {**batch, "tokens": changed}, variables)
  # Padded positions (row 1, targets 5..7 ↔ inputs 6..7 beyond the mask) change nothing.
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_on_policy_rows_keep_the_prompt_and_mask_the_data_terms(setup):
  batch, teacher, student = setup
  method = SequenceDistiller(STUDENT, SequenceLoss(kd_weight=1.0, divergence="reverse_kl",
                                                   on_policy_fraction=0.5, prompt_length=3),
                             TEACHER)
  on_policy = jax.jit(method._on_policy)
  tokens, data_mask, kd_mask = on_policy(student["params"], batch["tokens"], batch["mask"],
                                         jax.random.PRNGKey(3))
  np.testing.assert_array_equal(tokens[:2, :3], batch["tokens"][:2, :3])
  np.testing.assert_array_equal(tokens[2:], batch["tokens"][2:])
  np.testing.assert_array_equal(data_mask[:2], 0)
  np.testing.assert_array_equal(data_mask[2:], batch["mask"][2:])
  # Sampled rows: the divergence covers the targets the student generated (positions 2..6).
  np.testing.assert_array_equal(kd_mask[:2], np.tile([0, 0, 1, 1, 1, 1, 1, 0], (2, 1)))
  again, _, _ = on_policy(student["params"], batch["tokens"], batch["mask"],
                          jax.random.PRNGKey(3))
  np.testing.assert_array_equal(tokens, again)
  loss, metrics = _loss(method, batch, {"student": student, "teacher": teacher})
  assert np.isfinite(float(loss)) and float(metrics["terms/kd"]) > 0


def test_on_policy_rows_start_at_their_step(setup):
  batch, teacher, student = setup
  variables = {"student": student, "teacher": teacher}
  spec = dict(kd_weight=1.0, divergence="gjsd")
  delayed = SequenceDistiller(STUDENT, SequenceLoss(**spec, on_policy_fraction=0.5,
                                                    prompt_length=3, on_policy_start_step=5),
                              TEACHER)
  data_only, _ = _loss(SequenceDistiller(STUDENT, SequenceLoss(**spec), TEACHER), batch,
                       variables, step=4)
  np.testing.assert_allclose(_loss(delayed, batch, variables, step=4)[0], data_only, rtol=1e-6)
  assert abs(float(_loss(delayed, batch, variables, step=5)[0]) - float(data_only)) > 1e-4


@pytest.mark.parametrize("fields, message", [
    ({"ce_weight": 0.0}, "every weight is 0"),
    ({"divergence": "kl"}, "divergence='kl' is unknown"),
    ({"kd_weight": 1.0, "on_policy_fraction": 0.5}, "prompt_length=0 must be >= 1"),
    ({"on_policy_fraction": 0.5, "prompt_length": 2}, "set kd_weight > 0"),
    ({"minilm_layers": [[1]]}, "must be (student block, teacher block) pairs"),
    ({"temperatur": 2.0}, "unknown fields ['temperatur']"),
])
def test_bad_fields_name_the_field(fields, message):
  with pytest.raises(ValueError) as e:
    SequenceLoss.from_config(fields, "losses.arm")
  assert message in str(e.value) and "losses.arm" in str(e.value)


def test_minilm_shape_errors(setup):
  batch, teacher, student = setup
  variables = {"student": student, "teacher": teacher}
  heads = SequenceDistiller(STUDENT, SequenceLoss(minilm_weight=1.0), TEACHER)
  with pytest.raises(ValueError, match="student has 2 heads and the teacher 4"):
    heads.init(None, variables, batch)
  layers = SequenceDistiller(STUDENT, SequenceLoss(minilm_weight=1.0, minilm_relations="qkv",
                                                   minilm_layers=((1, 0),)), TEACHER)
  with pytest.raises(ValueError, match="student block 1 does not exist"):
    layers.init(None, variables, batch)
  topk = SequenceDistiller(STUDENT, SequenceLoss(topk_weight=1.0))
  with pytest.raises(ValueError, match="build the teacher's top-k cache"):
    topk.init(None, variables, batch)
