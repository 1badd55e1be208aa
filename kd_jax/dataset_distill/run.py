"""`distill_dataset` job: experts → trajectory matching → evaluation protocol → outputs.

`run(config, workdir) -> results dict`. Config fields (see configs/dd_digits.py):
  seed
  data.name, data.data_dir ("" = TFDS default), data.train_split, data.test_split,
  data.zca (bool), data.zca_regularization (kornia eps, MTT 0.1)
  model.name, model.kwargs (dict of architecture fields, e.g. depth/width for convnet)
  dsa.enabled, dsa.strategy, dsa.mode ("single" as MTT)
  experts.num_experts, experts.epochs, experts.lr, experts.batch_size,
  experts.directory ("" = <workdir>/experts)
  distill.ipc, distill.iterations, distill.syn_steps (N), distill.expert_epochs (M),
  distill.min_start_epoch, distill.current_max_start_epoch, distill.max_start_epoch,
  distill.expansion_end_epoch (0 = fixed MTT window), distill.batch_syn (0 = all images),
  distill.lr_img, distill.lr_lr, distill.lr_label, distill.momentum_label, distill.lr_init (α₀),
  distill.image_init ("real" | "real_correct" | "noise"),
  distill.label_kind ("hard" MTT | "probs" TESLA | "logits" DATM),
  distill.mode ("exact" | "tesla" | "unrolled"), distill.threshold (<= 0: never skip),
  distill.segments ((expert, start epoch) pairs matched per iteration; 1 = MTT),
  distill.keep_every (exact/tesla: keep every k-th θ, recompute the rest; 1 = keep all)
  mesh.axes (`data` splits every expert and synthetic minibatch; `segment` runs the segments
  one per device group, e.g. (("segment", 4), ("data", -1))), mesh.rules (experts' params;
  the matched θ is one flat vector, replicated)
  eval.num_nets, eval.epochs, eval.batch_size, eval.fixed_lr, eval.every (iterations; 0 = end
  only), eval.curve_nets, eval.full_data_epochs (0 = skip full-data training), eval.vectorize
  (networks trained together, split over gcd(networks, local devices) devices)
Outputs in workdir: experts/ (buffer), distill/ (the matching loop's checkpoints/,
metrics.jsonl, tensorboard/, and curve.json, the evaluations so far), distilled.npz +
distilled.json, zca.npz (if ZCA), synthetic_images.png, accuracy_curve.png, results.json.
A rerun in the same workdir reuses the experts and resumes matching from its latest checkpoint.
"""
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import kd_jax
from kd_jax import data as data_lib
from kd_jax import sharding
from kd_jax.checkpoint import atomic_write_json
from kd_jax.data.dsa import diff_augment
from kd_jax.data.zca import fit_zca, zca_apply, zca_inverse
from kd_jax.dataset_distill import plots
from kd_jax.dataset_distill.datm import StartWindow
from kd_jax.dataset_distill.distill import MatchingConfig, Recording, SyntheticSet, distill
from kd_jax.dataset_distill.distilled_set import save_distilled
from kd_jax.dataset_distill.evaluate import evaluate_set
from kd_jax.dataset_distill.experts import train_experts
from kd_jax.dataset_distill.matching import label_targets
from kd_jax.dataset_distill.synthetic import init_images, init_labels, select_real
from kd_jax.models import create_model, init_model, make_apply_fn


def _load_data(config):
  data_dir = config.data.data_dir or None
  info = data_lib.dataset_info(config.data.name, data_dir)
  splits = {}
  for split in (config.data.train_split, config.data.test_split):
    images, labels = data_lib.load_arrays(config.data.name, split, data_dir)
    splits[split] = (data_lib.normalize(images, info.mean, info.std), labels)
  zca = None
  if config.data.zca:
    zca = fit_zca(splits[config.data.train_split][0],
                  regularization=config.data.zca_regularization)
    splits = {k: (zca_apply(zca, x), y) for k, (x, y) in splits.items()}
  return info, splits[config.data.train_split], splits[config.data.test_split], zca


def _logits_fn(apply_fn, unravel):
  @jax.jit
  def logits(theta, images):
    return apply_fn({"params": unravel(theta)}, images, train=False)[0].logits
  return lambda theta, images: np.concatenate(
      [np.asarray(logits(jnp.asarray(theta), images[i:i + 500]))
       for i in range(0, len(images), 500)])


def _networks_mesh(num_nets: int):
  """A `data` mesh over as many of this host's devices as split `num_nets` networks evenly
  (the evaluation trains networks, not minibatches, in parallel); None on one device."""
  devices = jax.local_devices()
  size = math.gcd(num_nets, len(devices))
  return sharding.make_mesh(((sharding.DATA_AXIS, size),), devices[:size]) if size > 1 else None


def _write_outputs(workdir, config, results, identity, info, zca, result, final_images,
                   final_targets, num_classes):
  """distilled.npz/.json, zca.npz, the two plots and results.json."""
  d, curve = config.distill, results["curve"]
  metadata = {**identity, "ipc": d.ipc, "label_kind": d.label_kind, "mode": d.mode,
              "mean": list(info.mean), "std": list(info.std), "normalised": True,
              "zca_file": "zca.npz" if zca is not None else ""}
  save_distilled(workdir, images=final_images, labels=final_targets, lr=results["learned_lr"],
                 metadata=metadata,
                 label_logits=np.asarray(result.labels) if d.label_kind == "logits" else None)
  display = final_images
  if zca is not None:
    np.savez(workdir / "zca.tmp.npz", mean=zca.mean, whiten=zca.whiten, unwhiten=zca.unwhiten)
    os.replace(workdir / "zca.tmp.npz", workdir / "zca.npz")
    display = zca_inverse(zca, final_images)
  plots.save_image_grid(workdir / "synthetic_images.png", display, num_classes=num_classes,
                        ipc=d.ipc)
  references = {"random real": results["random_real"]["mean"]}
  if "full_data" in results:
    references["full data"] = results["full_data"]["mean"]
  if curve:
    plots.save_accuracy_curve(workdir / "accuracy_curve.png", [c["iteration"] for c in curve],
                              [c["mean"] for c in curve], [c["std"] for c in curve],
                              references=references,
                              title=f"{config.data.name} IPC {d.ipc} ({d.mode})")
  atomic_write_json(workdir / "results.json", json.loads(json.dumps(results)))


def run(config, workdir) -> dict:
  """Runs the whole job; returns the results dict. In a multi-process run every process
  computes and process 0 writes (`workdir` on a filesystem all processes share)."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  info, (train_x, train_y), (test_x, test_y), zca = _load_data(config)
  num_classes, image_shape = info.num_classes, tuple(train_x.shape[1:])
  model_kwargs = dict(config.model.kwargs)
  module = create_model(config.model.name, num_classes=num_classes, **model_kwargs)
  apply_fn = make_apply_fn(module)
  init_params = lambda key: init_model(module, key, (1, *image_shape))[0]
  params, model_state = init_model(module, jax.random.key(0), (1, *image_shape))
  if model_state:
    raise ValueError(f"model.name={config.model.name!r} with model.kwargs={model_kwargs} has "
                     f"mutable state ({', '.join(model_state)}); trajectory matching needs a "
                     "stateless model, e.g. convnet with norm='instancenorm'")
  _, unravel = ravel_pytree(params)
  augment = None
  if config.dsa.enabled:
    augment = lambda x, key: diff_augment(x, key, strategy=config.dsa.strategy,
                                          mode=config.dsa.mode)

  identity = {"dataset": config.data.name, "train_split": config.data.train_split,
              "zca": bool(config.data.zca), "model": config.model.name,
              "model_kwargs": model_kwargs, "num_classes": num_classes,
              "image_shape": list(image_shape)}
  mesh = sharding.make_mesh(tuple(map(tuple, config.mesh.axes)))
  expert_dir = Path(config.experts.directory or workdir / "experts")
  trajectories, _ = train_experts(
      expert_dir, apply_fn, init_params, train_x, train_y,
      metadata={**identity, "dsa": config.dsa.strategy if config.dsa.enabled else ""},
      num_experts=config.experts.num_experts, epochs=config.experts.epochs,
      lr=config.experts.lr, batch_size=config.experts.batch_size, seed=config.seed,
      augment=augment, mesh=mesh, rules=tuple(map(tuple, config.mesh.rules)))
  t_experts = time.time() - t0

  d = config.distill
  rng = np.random.default_rng(config.seed)
  logits_of = _logits_fn(apply_fn, unravel)
  final_epoch = trajectories.shape[1] - 1
  images, class_ids = init_images(rng, train_x, train_y, num_classes=num_classes, ipc=d.ipc,
                                  init=d.image_init,
                                  predict=lambda x: logits_of(trajectories[0, final_epoch], x))
  expert_logits = None
  if d.label_kind != "hard":
    expert_logits = np.stack([logits_of(trajectories[e, final_epoch], images)
                              for e in range(trajectories.shape[0])])
  labels = init_labels(d.label_kind, class_ids, num_classes, expert_logits)
  synthetic = SyntheticSet(jnp.asarray(images), jnp.asarray(labels),
                           jnp.asarray(d.lr_init, jnp.float32), d.label_kind)

  eval_kwargs = dict(epochs=config.eval.epochs, batch_size=config.eval.batch_size,
                     seed=config.seed + 1000, augment=augment, vectorize=config.eval.vectorize)
  targets = lambda s: np.asarray(label_targets(s.labels, s.label_kind))
  evaluate = lambda x, y, lr, nets, **kw: evaluate_set(
      apply_fn, init_params, x, y, test_x, test_y, num_nets=nets, lr=lr,
      mesh=_networks_mesh(nets) if config.eval.vectorize else None, **{**eval_kwargs, **kw})

  recording = Recording(str(workdir / "distill"),
                        metadata={**identity, "ipc": d.ipc, "label_kind": d.label_kind})
  curve_file = Path(recording.directory) / "curve.json"
  curve = json.loads(curve_file.read_text()) if curve_file.exists() else []

  def callback(it, s):
    curve[:] = [c for c in curve if c["iteration"] < it]  # a resumed run redoes later points
    if not (config.eval.every and (it % config.eval.every == 0 or it == d.iterations)
            and s.lr > 0):
      return None
    r = evaluate(np.asarray(s.images), targets(s), float(s.lr), config.eval.curve_nets)
    curve.append({"iteration": it, **r})
    if jax.process_index() == 0:
      atomic_write_json(curve_file, curve)
    print(f"eval @ {it}: {100 * r['mean']:.2f} ± {100 * r['std']:.2f} (learned lr "
          f"{float(s.lr):.5f})")
    return {"eval/accuracy": r["mean"], "eval/accuracy_std": r["std"]}

  matching = MatchingConfig(
      iterations=d.iterations, syn_steps=d.syn_steps, expert_epochs=d.expert_epochs,
      window=StartWindow(d.min_start_epoch, d.current_max_start_epoch, d.max_start_epoch,
                         d.expansion_end_epoch),
      batch_syn=d.batch_syn or images.shape[0], lr_img=d.lr_img, lr_lr=d.lr_lr,
      lr_label=d.lr_label, momentum_label=d.momentum_label, mode=d.mode,
      threshold=d.threshold if d.threshold > 0 else None, seed=config.seed,
      segments=d.segments, keep_every=d.keep_every)
  t1 = time.time()
  result = distill(trajectories, apply_fn, unravel, synthetic, matching, recording,
                   augment=augment, mesh=mesh, callback=callback)
  t_distill = time.time() - t1

  final_images, final_targets, learned_lr = (np.asarray(result.images), targets(result),
                                             float(result.lr))
  nets = config.eval.num_nets
  results = {"ipc": d.ipc, "num_nets": nets, "learned_lr": learned_lr, "curve": curve}
  if learned_lr > 0:
    results["distilled_learned_lr"] = evaluate(final_images, final_targets, learned_lr, nets)
  results["distilled_fixed_lr"] = evaluate(final_images, final_targets, config.eval.fixed_lr,
                                           nets)
  real_idx = select_real(np.random.default_rng(config.seed + 1), train_y, num_classes, d.ipc)
  results["random_real"] = evaluate(train_x[real_idx], train_y[real_idx], config.eval.fixed_lr,
                                    nets)
  if config.eval.full_data_epochs:
    results["full_data"] = evaluate(train_x, train_y, config.eval.fixed_lr, nets,
                                    epochs=config.eval.full_data_epochs)
  results["seconds"] = {"experts": t_experts, "distill": t_distill,
                        "total": time.time() - t0}

  results["kd_jax_version"] = kd_jax.__version__
  if jax.process_index() == 0:  # every process computed the same; one writes
    _write_outputs(workdir, config, results, identity, info, zca, result, final_images,
                   final_targets, num_classes)
  return results
