"""Shared helpers of the feature/relation loss tests: torchdistill reference values and inputs."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np

REF = np.load(Path(__file__).parent / "fixtures" / "features_reference.npz")
TOL = 1e-5


def ref(name):
  return jnp.asarray(REF[name])


def assert_close(actual, expected, tol=TOL):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=tol, rtol=tol)


def normal(seed, shape):
  # numpy draws: a jax.random draw compiles a new program for every shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
