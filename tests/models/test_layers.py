"""Shared layers: PyTorch-equivalent BatchNorm update and ShuffleNet's channel shuffle."""
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models.layers import batch_norm, channel_shuffle


def test_batch_norm_running_stats_move_like_pytorch_momentum_0_1():
  x = jax.random.normal(jax.random.key(0), (16, 4, 4, 3)) * 2.0 + 5.0
  bn = batch_norm(train=True, dtype=jnp.float32)
  variables = bn.init(jax.random.key(1), x)
  _, updated = bn.apply(variables, x, mutable=["batch_stats"])
  # PyTorch: running = 0.9 · running + 0.1 · batch statistic, from mean 0 and var 1
  # (with the biased batch variance here; see `batch_norm`).
  mean = x.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * x.var(axis=(0, 1, 2)),
                             rtol=1e-4)


def test_channel_shuffle_matches_the_pytorch_view_permute_definition():
  groups, per_group = 3, 4
  x = jnp.arange(2 * groups * per_group, dtype=jnp.float32).reshape(1, 1, 2, groups * per_group)
  out = channel_shuffle(x, groups)
  for a in range(groups):
    for b in range(per_group):
      assert out[..., b * groups + a].tolist() == x[..., a * per_group + b].tolist()
