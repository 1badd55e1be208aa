"""Dataset distillation on kd_jax's one train step: one method protocol, one loop.

Pieces: `method` (the protocol every method implements), `distill` (the one resumable, logged
outer loop), the methods — `trajectory_matching` (MTT, TESLA, DATM; with `experts`,
`matching`, `datm`, `synthetic`) — `methods` (the registry the job reads), `evaluate` (K
networks trained together on the set, with its labels or with teacher soft labels through the
KD step), `distilled_set` (files), `plots`, and `run.run(config, workdir)` for the
`distill_dataset` job.
"""
from kd_jax.dataset_distill.datm import StartWindow, datm_window, mtt_window, should_update
from kd_jax.dataset_distill.distill import Recording, distill
from kd_jax.dataset_distill.distilled_set import load_distilled, save_distilled
from kd_jax.dataset_distill.evaluate import evaluate_set, networks_accuracy, train_networks
from kd_jax.dataset_distill.experts import load_buffer, train_expert, train_experts
from kd_jax.dataset_distill.matching import (InnerStep, TrajectoryMatcher, make_inner_step,
                                             minibatch_plan, parameter_distance_loss)
from kd_jax.dataset_distill.method import Context, DistilledSet, Method, Start, Step, Teacher
from kd_jax.dataset_distill.synthetic import init_images, init_labels
from kd_jax.dataset_distill.trajectory_matching import ExpertRecipe, TrajectoryMatching
