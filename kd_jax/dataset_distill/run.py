"""`distill_dataset` job: (teacher) → any distillation method → evaluation protocols → outputs.

`run(config, workdir) -> results dict`. Config fields (see configs/dd_digits.py):
  seed
  data.name, data.data_dir ("" = TFDS default), data.train_split, data.test_split,
  data.zca (bool), data.zca_regularization (kornia eps, MTT 0.1)
  model.name, model.kwargs (dict of architecture fields, e.g. depth/width for convnet): the
  network the set is distilled for and evaluated on (stateless)
  dsa.enabled, dsa.strategy, dsa.mode ("single" as MTT)
  distill.method: "mtt" (trajectory matching: MTT, TESLA, DATM), "dc" (gradient matching with
  DSA), "dm" (distribution matching), "sre2l" (recovery from a BatchNorm teacher), "rded"
  (teacher-scored real patches), "infer" (inter-class feature compensators), or
  "package.module:ClassName" (your own `kd_jax.dataset_distill.method.Method`, built from
  method_kwargs); see kd_jax/dataset_distill/methods.py
  distill.ipc
  Trajectory matching reads the rest of `distill` and `experts`:
  experts.num_experts, experts.epochs, experts.lr, experts.batch_size,
  experts.directory ("" = <workdir>/experts)
  distill.iterations, distill.syn_steps (N), distill.expert_epochs (M),
  distill.min_start_epoch, distill.current_max_start_epoch, distill.max_start_epoch,
  distill.expansion_end_epoch (0 = fixed MTT window), distill.batch_syn (0 = all images),
  distill.lr_img, distill.lr_lr, distill.lr_label, distill.momentum_label, distill.lr_init (α₀),
  distill.image_init ("real" | "real_correct" | "noise"),
  distill.label_kind ("hard" MTT | "probs" TESLA | "logits" DATM),
  distill.mode ("exact" | "tesla" | "unrolled"), distill.threshold (<= 0: never skip),
  distill.segments ((expert, start epoch) pairs matched per iteration; 1 = MTT),
  distill.keep_every (exact/tesla: keep every k-th θ, recompute the rest; 1 = keep all)
  dc.*, dm.*, sre2l.*, rded.*, infer.*: each method's own hyperparameters (its dataclass fields)
  teacher.model.name, teacher.model.kwargs, teacher.epochs, teacher.lr, teacher.batch_size,
  teacher.weight_decay, teacher.crop_padding, teacher.directory ("" = <workdir>; it trains in
  <directory>/teacher, so runs may share one): the teacher that sre2l/rded/infer and the
  "teacher" protocol read; trained only when one of them is used
  mesh.axes (`data` splits every expert and synthetic minibatch; `segment` runs the segments
  one per device group, e.g. (("segment", 4), ("data", -1))), mesh.rules (experts' params;
  the matched θ is one flat vector, replicated)
  eval.num_nets, eval.epochs, eval.batch_size, eval.fixed_lr, eval.every (iterations; 0 = end
  only), eval.curve_nets, eval.full_data_epochs (0 = skip full-data training), eval.vectorize
  (networks trained together, split over gcd(networks, local devices) devices),
  eval.protocols ("labels": the set's own labels; "teacher": teacher soft labels per
  augmented batch through the KD step, the large-scale protocol), eval.temperature (its T)

Outputs in workdir: experts/ (buffer, trajectory matching), teacher/ (when used), distill/ (the
loop's checkpoints/, metrics.jsonl, tensorboard/, and curve.json, the evaluations so far),
distilled.npz + distilled.json, zca.npz (if ZCA), synthetic_images.png, accuracy_curve.png,
results.json. A rerun in the same workdir reuses the experts and teacher and resumes the
method from its latest checkpoint.
"""
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np

import kd_jax
from kd_jax import data as data_lib
from kd_jax import sharding
from kd_jax.checkpoint import atomic_write_json
from kd_jax.data.dsa import diff_augment
from kd_jax.data.zca import fit_zca, zca_apply, zca_inverse
from kd_jax.dataset_distill import methods, plots
from kd_jax.dataset_distill.distill import Recording, distill
from kd_jax.dataset_distill.distilled_set import save_distilled
from kd_jax.dataset_distill.evaluate import PROTOCOLS, evaluate_set
from kd_jax.dataset_distill.method import Context, DistilledSet
from kd_jax.dataset_distill.synthetic import select_real
from kd_jax.dataset_distill.teacher import TeacherRecipe, teacher_accuracy, train_teacher
from kd_jax.dataset_distill.trajectory_matching import ExpertRecipe
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


def _networks_mesh(num_nets: int):
  """A `data` mesh over as many of this host's devices as split `num_nets` networks evenly
  (the evaluation trains networks, not minibatches, in parallel); None on one device."""
  devices = jax.local_devices()
  size = math.gcd(num_nets, len(devices))
  return sharding.make_mesh(((sharding.DATA_AXIS, size),), devices[:size]) if size > 1 else None


def _check_protocols(config) -> tuple[str, ...]:
  protocols = tuple(config.eval.protocols)
  unknown = [p for p in protocols if p not in PROTOCOLS]
  if not protocols or unknown:
    raise ValueError(f"eval.protocols={protocols} must be a non-empty subset of {PROTOCOLS} "
                     "('labels': the set's own labels; 'teacher': teacher soft labels)")
  return protocols


def _write_outputs(workdir, config, results, identity, info, zca, result: DistilledSet,
                   num_classes):
  """distilled.npz/.json, zca.npz, the two plots and results.json."""
  d, curve = config.distill, results["curve"]
  metadata = {**identity, "method": d.method, "ipc": d.ipc, "label_kind": result.label_kind,
              "mean": list(info.mean), "std": list(info.std), "normalised": True,
              "stored_floats": result.stored_floats,
              "zca_file": "zca.npz" if zca is not None else ""}
  if d.method == "mtt":
    metadata["mode"] = d.mode
  save_distilled(workdir, images=result.images, labels=result.labels,
                 lr=result.lr if result.lr is not None else 0.0, metadata=metadata,
                 label_logits=result.label_logits)
  display = result.images
  if zca is not None:
    np.savez(workdir / "zca.tmp.npz", mean=zca.mean, whiten=zca.whiten, unwhiten=zca.unwhiten)
    os.replace(workdir / "zca.tmp.npz", workdir / "zca.npz")
    display = zca_inverse(zca, result.images)
  plots.save_image_grid(workdir / "synthetic_images.png", display[:num_classes * d.ipc],
                        num_classes=num_classes, ipc=d.ipc)
  references = {label: results[key]["mean"] for key, label in
                (("random_real", "random real"), ("full_data", "full data")) if key in results}
  if curve:
    plots.save_accuracy_curve(workdir / "accuracy_curve.png", [c["iteration"] for c in curve],
                              [c["mean"] for c in curve], [c["std"] for c in curve],
                              references=references,
                              title=f"{config.data.name} IPC {d.ipc} ({d.method})")
  atomic_write_json(workdir / "results.json", json.loads(json.dumps(results)))


def run(config, workdir) -> dict:
  """Runs the whole job; returns the results dict. In a multi-process run every process
  computes and process 0 writes (`workdir` on a filesystem all processes share)."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  protocols = _check_protocols(config)
  info, (train_x, train_y), (test_x, test_y), zca = _load_data(config)
  num_classes, image_shape = info.num_classes, tuple(train_x.shape[1:])
  model_kwargs = dict(config.model.kwargs)
  module = create_model(config.model.name, num_classes=num_classes, **model_kwargs)
  apply_fn = make_apply_fn(module)
  init_params = lambda key: init_model(module, key, (1, *image_shape))[0]
  _, model_state = init_model(module, jax.random.key(0), (1, *image_shape))
  if model_state:
    raise ValueError(f"model.name={config.model.name!r} with model.kwargs={model_kwargs} has "
                     f"mutable state ({', '.join(model_state)}); dataset distillation trains "
                     "and evaluates a stateless model, e.g. convnet with norm='instancenorm' "
                     "(the teacher, teacher.model, may have BatchNorm)")
  augment = None
  if config.dsa.enabled:
    augment = lambda x, key: diff_augment(x, key, strategy=config.dsa.strategy,
                                          mode=config.dsa.mode)

  identity = {"dataset": config.data.name, "train_split": config.data.train_split,
              "zca": bool(config.data.zca), "model": config.model.name,
              "model_kwargs": model_kwargs, "num_classes": num_classes,
              "image_shape": list(image_shape)}
  e = config.experts
  experts = ExpertRecipe(
      num_experts=e.num_experts, epochs=e.epochs, lr=e.lr, batch_size=e.batch_size,
      directory=e.directory,
      metadata={**identity, "dsa": config.dsa.strategy if config.dsa.enabled else ""},
      rules=tuple(map(tuple, config.mesh.rules)))
  method = methods.build(config, experts)  # bad method fields fail before anything trains
  mesh = sharding.make_mesh(tuple(map(tuple, config.mesh.axes)))
  teacher, results = None, {"method": config.distill.method, "ipc": config.distill.ipc,
                            "num_nets": config.eval.num_nets, "protocols": list(protocols)}
  if methods.uses_teacher(config.distill.method) or "teacher" in protocols:
    t = config.teacher
    recipe = TeacherRecipe(model=t.model.name, model_kwargs=dict(t.model.kwargs),
                           epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                           weight_decay=t.weight_decay, crop_padding=t.crop_padding)
    teacher = train_teacher(recipe, t.directory or workdir, train_x, train_y,
                            num_classes=num_classes,
                            metadata={k: identity[k] for k in ("dataset", "train_split", "zca")},
                            seed=config.seed)
    results["teacher_accuracy"] = teacher_accuracy(teacher, test_x, test_y)
    print(f"teacher {recipe.model}: test accuracy {100 * results['teacher_accuracy']:.2f}")
  t_teacher = time.time() - t0

  context = Context(train_images=train_x, train_labels=train_y, num_classes=num_classes,
                    ipc=config.distill.ipc, apply_fn=apply_fn, init_params=init_params,
                    augment=augment, teacher=teacher, seed=config.seed, workdir=workdir,
                    mesh=mesh)

  eval_kwargs = dict(epochs=config.eval.epochs, batch_size=config.eval.batch_size,
                     seed=config.seed + 1000, augment=augment, vectorize=config.eval.vectorize,
                     temperature=config.eval.temperature)
  evaluate = lambda x, y, lr, nets, **kw: evaluate_set(
      apply_fn, init_params, x, y, test_x, test_y, num_nets=nets, lr=lr,
      mesh=_networks_mesh(nets) if config.eval.vectorize else None, **{**eval_kwargs, **kw})

  d = config.distill
  recording = Recording(str(workdir / "distill"),
                        metadata={**identity, "method": d.method, "ipc": d.ipc,
                                  **({"label_kind": d.label_kind} if d.method == "mtt" else {})})
  curve_file = Path(recording.directory) / "curve.json"
  curve = json.loads(curve_file.read_text()) if curve_file.exists() else []

  def callback(it, values):
    curve[:] = [c for c in curve if c["iteration"] < it]  # a resumed run redoes later points
    if not (config.eval.every and (it % config.eval.every == 0 or it == method.iterations)):
      return None
    s = method.distilled(values)
    lr = s.lr if s.lr is not None else config.eval.fixed_lr
    if lr <= 0:
      return None
    r = evaluate(s.images, s.labels, lr, config.eval.curve_nets)
    curve.append({"iteration": it, **r})
    if jax.process_index() == 0:
      atomic_write_json(curve_file, curve)
    print(f"eval @ {it}: {100 * r['mean']:.2f} ± {100 * r['std']:.2f} (lr {lr:.5f})")
    return {"eval/accuracy": r["mean"], "eval/accuracy_std": r["std"]}

  t1 = time.time()
  result = distill(method, context, recording, callback=callback)
  t_distill = time.time() - t1

  nets = config.eval.num_nets
  real_idx = select_real(np.random.default_rng(config.seed + 1), train_y, num_classes, d.ipc)
  results.update({"label_kind": result.label_kind, "stored_floats": result.stored_floats,
                  "num_images": int(result.images.shape[0]), "curve": curve})
  if "labels" in protocols:
    if result.lr is not None:
      results["learned_lr"] = result.lr
      if result.lr > 0:
        results["distilled_learned_lr"] = evaluate(result.images, result.labels, result.lr, nets)
    results["distilled_fixed_lr"] = evaluate(result.images, result.labels, config.eval.fixed_lr,
                                             nets)
    results["random_real"] = evaluate(train_x[real_idx], train_y[real_idx],
                                      config.eval.fixed_lr, nets)
    if config.eval.full_data_epochs:
      results["full_data"] = evaluate(train_x, train_y, config.eval.fixed_lr, nets,
                                      epochs=config.eval.full_data_epochs)
  if "teacher" in protocols:
    soft = lambda x, y: evaluate(x, y, config.eval.fixed_lr, nets, teacher=teacher)
    results["teacher_protocol"] = {"distilled": soft(result.images, result.labels),
                                   "random_real": soft(train_x[real_idx], train_y[real_idx])}
  results["seconds"] = {"teacher": t_teacher, "distill": t_distill, "total": time.time() - t0}
  results["kd_jax_version"] = kd_jax.__version__
  if jax.process_index() == 0:  # every process computed the same; one writes
    _write_outputs(workdir, config, results, identity, info, zca, result, num_classes)
  return results


def format_results(results: dict) -> str:
  """What the job prints: test accuracy (mean ± std over the evaluation networks) of the
  distilled set and its references, per label protocol."""
  cell = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
  lines = [f"{results['method']} at IPC {results['ipc']}: {results['num_images']} training "
           f"images, {results['stored_floats']} floats stored ({results['label_kind']} labels); "
           f"test accuracy of {results['num_nets']} networks, %"]
  if "teacher_accuracy" in results:
    lines.append(f"  teacher: {100 * results['teacher_accuracy']:.2f}")
  rows = (("distilled_learned_lr", f"distilled, learned α = {results.get('learned_lr', 0):.5f}"),
          ("distilled_fixed_lr", "distilled, fixed lr"), ("random_real", "random real subset"),
          ("full_data", "full data"))
  lines += [f"  [labels]  {label}: {cell(results[key])}" for key, label in rows if key in results]
  for key, label in (("distilled", "distilled"), ("random_real", "random real subset")):
    if key in results.get("teacher_protocol", {}):
      lines.append(f"  [teacher soft labels]  {label}: {cell(results['teacher_protocol'][key])}")
  return "\n".join(lines)

