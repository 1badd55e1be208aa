"""Distillation losses as pure per-example JAX functions (optax conventions).

Positional inputs, student first and the teacher's counterpart second, then auxiliary inputs;
`mask` (1 = real entry, 0 = padding) and hyperparameters keyword-only; no reduction inside.
Each public name is re-exported explicitly, and every registered loss is importable under its
registry name (`kd_jax.losses.<name> is kd_jax.losses.get_loss(name).fn`).
"""
from kd_jax.losses.registry import LossSpec, get_loss, list_losses, register
from kd_jax.losses.utils import masked_mean, warmup_factor

# --- logits (kd_jax/losses/logits.py) ---
from kd_jax.losses.logits import (bdkd, dist, dkd, jensen_shannon, kd, logit_mse,
                                  logit_standardized_kd, meal_v2, nd, nkd, ofa, reverse_kl,
                                  skd_direction, skd_instance, soft_teacher_cls,
                                  teacher_class_means, uskd)
from kd_jax.losses.meal import MealV2Discriminator, meal_v2_discriminator_loss
from kd_jax.losses.tokens import (chunked_token_divergence, generalized_jsd, teacher_topk,
                                  token_divergence, topk_kd)
# --- end logits ---

# --- features / relations / attention / cka ---
from kd_jax.losses.attention import attention_kl, minilm, self_relation_kl, value_relation_kl
from kd_jax.losses.features import (activation_boundary, adaptive_pool2d, affinity,
                                    attention_transfer, factor_transfer, fitnet, fsp, fsp_matrix,
                                    hierarchical_context, inter_channel_correlation, nst, ofd,
                                    ofd_margin, prime_aware_l2, vid)
from kd_jax.losses.kernel_alignment import cka_loss, linear_cka, rbf_cka
from kd_jax.losses.modules import (AttentionFusion, CRDEmbed, CRDMemory, HintRegressor,
                                   Paraphraser, Translator, VIDRegressor, crd_contrast_indices,
                                   init_crd_memory)
from kd_jax.losses.relations import (correlation_congruence, crd, pkt, rkd, rkd_angle,
                                     rkd_distance, similarity_preserving)
# --- end features ---

# --- registry names of the losses whose function has a longer name ---
ab = activation_boundary
at = attention_transfer
cc = correlation_congruence
cka = cka_loss
ft = factor_transfer
ickd = inter_channel_correlation
kta_affinity = affinity
meal_v2_discriminator = meal_v2_discriminator_loss
minilm_attention = attention_kl
minilm_value_relation = value_relation_kl
minilmv2_relation = self_relation_kl
pad_l2 = prime_aware_l2
reviewkd_hcl = hierarchical_context
sp = similarity_preserving
# --- end registry names ---
