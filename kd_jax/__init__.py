"""kd_jax: knowledge distillation and dataset distillation in JAX/Flax."""
__version__ = "0.1.0"
