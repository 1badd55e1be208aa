"""Distillation losses as pure per-example JAX functions (optax conventions).

Student first, teacher second, hyperparameters keyword-only, no reduction inside.
Each public name is re-exported explicitly.
"""
from kd_jax.losses.registry import LossSpec, get_loss, list_losses, register
from kd_jax.losses.utils import masked_mean, warmup_factor

# --- logits (kd_jax/losses/logits.py) ---
# --- end logits ---

# --- features / relations / attention / cka ---
# --- end features ---
