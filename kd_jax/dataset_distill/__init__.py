"""Trajectory-matching dataset distillation (MTT, TESLA, DATM) on kd_jax's one train step.

Pieces: `experts` (expert trajectory buffers), `matching` (inner steps and the exact /
TESLA / unrolled matching gradient), `synthetic` (initial images and labels), `datm`
(start-epoch windows), `distill` (the loop), `evaluate` (K networks trained together,
optionally split over devices), `distilled_set` (files), `plots`, and `run.run(config,
workdir)` for the `distill_dataset` job.
"""
from kd_jax.dataset_distill.datm import StartWindow, datm_window, mtt_window, should_update
from kd_jax.dataset_distill.distill import MatchingConfig, Recording, SyntheticSet, distill
from kd_jax.dataset_distill.distilled_set import load_distilled, save_distilled
from kd_jax.dataset_distill.evaluate import evaluate_set, networks_accuracy, train_networks
from kd_jax.dataset_distill.experts import load_buffer, train_expert, train_experts
from kd_jax.dataset_distill.matching import (InnerStep, TrajectoryMatcher, make_inner_step, minibatch_plan,
                                             parameter_distance_loss)
from kd_jax.dataset_distill.synthetic import init_images, init_labels
