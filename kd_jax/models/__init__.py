"""Flax model zoo. Every model maps `x [B, H, W, C]` to a `ModelOutput`."""
from kd_jax.models.apply import count_params, init_model, make_apply_fn
from kd_jax.models.output import ModelOutput
# --- zoo exports (owned by the model-zoo work) ---
from kd_jax.models.convnet import ConvNet
from kd_jax.models.registry import create_model, list_models
# --- end zoo exports ---
