"""Distillation losses as pure per-example JAX functions (optax conventions).

Student first, teacher second, hyperparameters keyword-only, no reduction inside.
Each public name is re-exported explicitly.
"""
from kd_jax.losses.registry import LossSpec, get_loss, list_losses, register
from kd_jax.losses.utils import masked_mean, warmup_factor

# --- logits (kd_jax/losses/logits.py) ---
from kd_jax.losses.logits import (bdkd, dist, dkd, jensen_shannon, kd, logit_mse,
                                  logit_standardized_kd, meal_v2, nd, nkd, ofa, reverse_kl,
                                  soft_teacher_cls, teacher_class_means, uskd)
from kd_jax.losses.meal import MealV2Discriminator, meal_v2_discriminator_loss
# --- end logits ---

# --- features / relations / attention / cka ---
# --- end features ---
