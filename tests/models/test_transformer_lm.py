"""The causal transformer LM: feature taps, causality, and KV-cache decoding = full forward.

Checks run in NumPy: every eager jnp op on a new shape is a compile on CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import TransformerLM, make_apply_fn

VOCAB, WIDTH, HEADS, DEPTH, MAX_LEN, T = 11, 16, 2, 2, 16, 8


@pytest.fixture(scope="module")
def lm():
  """`(module, variables, tokens [2, T], forward)` of a tiny LM; `forward(x)` runs the jitted
  eval-mode apply function (one compile for every `[2, T]` input) and returns NumPy arrays."""
  module = TransformerLM(VOCAB, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=32,
                         max_len=MAX_LEN)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (2, T), dtype=np.int32)
  # Random values of init's shapes: tracing init is enough, compiling it would take seconds.
  variables = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                           jax.eval_shape(lambda: module.init(jax.random.key(0), tokens,
                                                              train=False)))
  apply_fn = jax.jit(make_apply_fn(module), static_argnames="train")
  forward = lambda x: jax.tree.map(np.asarray, apply_fn(variables, x, train=False))
  return module, variables, tokens, forward


def test_features_shapes_and_causal_attention(lm):
  _, variables, tokens, forward = lm
  out, state = forward(tokens)
  assert state == {}
  assert out.logits.shape == (2, T, VOCAB) and out.logits.dtype == np.float32
  head = variables["params"]["lm_head"]
  assert head["kernel"].shape == (WIDTH, VOCAB) and head["bias"].shape == (VOCAB,)
  np.testing.assert_allclose(out.logits, out.features["hidden"] @ head["kernel"] + head["bias"],
                             atol=1e-5)
  assert out.features["hidden"].shape == (2, T, WIDTH)
  below = np.tril(np.ones((T, T), bool))
  for i in range(DEPTH):
    assert out.features[f"block{i}"].shape == (2, T, WIDTH)
    for name in ("queries", "keys", "values"):
      assert out.features[f"{name}/{i}"].shape == (2, HEADS, T, WIDTH // HEADS)
    attn = out.features[f"attn/{i}"]
    assert attn.shape == (2, HEADS, T, T)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    assert np.all(attn[..., ~below] == 0) and np.all(attn[..., below] > 0)


def test_changing_token_t_changes_nothing_before_t(lm):
  _, _, tokens, forward = lm
  t = 5
  changed = tokens.copy()
  changed[:, t] = (changed[:, t] + 1) % VOCAB
  (before, _), (after, _) = forward(tokens), forward(changed)
  for name, a in [("logits", before.logits), *before.features.items()]:
    b = after.logits if name == "logits" else after.features[name]
    early = (slice(None),) * (2 if a.ndim == 4 else 1) + (slice(t),)  # [B, h, T, ...], [B, T, ...]
    np.testing.assert_allclose(a[early], b[early], atol=1e-6, err_msg=name)
  assert not np.allclose(before.logits[:, t:], after.logits[:, t:], atol=1e-3)


def test_kv_cache_decoding_matches_the_full_forward(lm):
  module, variables, tokens, forward = lm
  full = forward(tokens)[0].logits
  decode = jax.jit(lambda tok, cache, pos: module.apply(variables, tok, cache, pos,
                                                        method=TransformerLM.decode_step))
  cache = module.init_cache(2)
  assert jax.tree.map(np.shape, cache[0]) == {"key": (2, MAX_LEN, HEADS, WIDTH // HEADS),
                                              "value": (2, MAX_LEN, HEADS, WIDTH // HEADS)}
  for pos in range(T):
    logits, cache = decode(tokens[:, pos], cache, np.int32(pos))
    assert logits.shape == (2, VOCAB)
    np.testing.assert_allclose(logits, full[:, pos], atol=1e-5, err_msg=str(pos))
  # A multi-token prefill of the first half, then one step, agrees too.
  prefill, cache = jax.jit(lambda x: module.apply(variables, x, module.init_cache(2), 0,
                                                  method=TransformerLM.extend))(tokens[:, :4])
  np.testing.assert_allclose(prefill, full[:, :4], atol=1e-5)
  np.testing.assert_allclose(decode(tokens[:, 4], cache, np.int32(4))[0], full[:, 4], atol=1e-5)


def test_sequences_longer_than_max_len_are_rejected(lm):
  module, variables, _, _ = lm
  with pytest.raises(ValueError, match="17 tokens but max_len=16"):
    module.apply(variables, jnp.zeros((1, MAX_LEN + 1), jnp.int32), train=False)
