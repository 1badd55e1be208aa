"""Cached sampling from the causal LM: determinism, greedy = full-forward loop, prompt kept."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import TransformerLM
from kd_jax.sequence.sampling import sample

VOCAB, MAX_LEN, P, NEW = 11, 16, 3, 6


@pytest.fixture(scope="module")
def lm():
  """`(module, params, prompt [2, P])` of a tiny LM."""
  module = TransformerLM(VOCAB, width=16, depth=2, num_heads=2, mlp_dim=32, max_len=MAX_LEN)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, VOCAB, (2, P), dtype=np.int32)
  # Random values of init's shapes: tracing init is enough, compiling it would take seconds.
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        jax.eval_shape(lambda: module.init(jax.random.key(0), prompt,
                                                           train=False))["params"])
  return module, params, prompt


def test_sampling_is_deterministic_per_key_and_keeps_the_prompt(lm):
  module, params, prompt = lm
  run = lambda seed: np.asarray(sample(module, params, prompt, NEW, jax.random.key(seed)))
  tokens = run(0)
  assert tokens.shape == (2, P + NEW) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens[:, :P], prompt)
  assert np.all((tokens >= 0) & (tokens < VOCAB))
  np.testing.assert_array_equal(tokens, run(0))
  assert not np.array_equal(tokens, run(1))


def test_greedy_sampling_equals_a_greedy_loop_over_the_full_forward(lm):
  module, params, prompt = lm
  tokens = sample(module, params, prompt, NEW, jax.random.key(0), temperature=0.0)
  # The full forward on the growing sequence, zero-padded to one length (one compile; the LM is
  # causal, so the padding does not reach the logits read).
  forward = jax.jit(lambda x: module.apply({"params": params}, x, train=False).logits)
  expected = np.zeros((2, P + NEW), np.int32)
  expected[:, :P] = prompt
  for t in range(P, P + NEW):
    expected[:, t] = np.argmax(forward(expected)[:, t - 1], axis=-1)
  np.testing.assert_array_equal(tokens, expected)


def test_too_long_continuations_are_rejected(lm):
  module, params, prompt = lm
  with pytest.raises(ValueError, match="max_len=16"):
    sample(module, params, prompt, MAX_LEN - P + 1, jax.random.key(0))
