"""The registry of dataset-distillation methods the `distill_dataset` job can run.

`distill.method` names a registered method or a user's class as `"package.module:ClassName"`.
Trajectory matching ("mtt", which covers TESLA and DATM through its fields) reads its
hyperparameters from the `distill` section, as before; every other method is a dataclass built
from the config section of its name (`config.dc`, `config.dm`, ...), and a user's class from
`config.method_kwargs`.
"""
import dataclasses
import importlib

from kd_jax.dataset_distill.datm import StartWindow
from kd_jax.dataset_distill.method import Method
from kd_jax.dataset_distill.trajectory_matching import ExpertRecipe, TrajectoryMatching

METHODS = {
    "mtt": "kd_jax.dataset_distill.trajectory_matching:TrajectoryMatching",
    "dc": "kd_jax.dataset_distill.gradient_matching:GradientMatching",
    "dm": "kd_jax.dataset_distill.distribution_matching:DistributionMatching",
    "sre2l": "kd_jax.dataset_distill.recovery:SRe2LRecovery",
    "rded": "kd_jax.dataset_distill.patch_selection:RDED",
    "infer": "kd_jax.dataset_distill.feature_compensator:INFER",
}
MATCHING_FIELDS = ("method", "ipc")  # the `distill` fields every method reads


def method_class(spec: str) -> type:
  """The class of a registered name or of `"package.module:ClassName"`."""
  path = METHODS.get(spec, spec)
  if ":" not in path:
    raise ValueError(f"distill.method={spec!r} is unknown; use one of {sorted(METHODS)} or "
                     "'package.module:ClassName' for your own method")
  module_name, class_name = path.split(":", 1)
  try:
    return getattr(importlib.import_module(module_name), class_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"distill.method={spec!r}: cannot import {path} ({e})") from None


def uses_teacher(spec: str) -> bool:
  """Whether the method reads `context.teacher` (its class attribute `uses_teacher = True`)."""
  return getattr(method_class(spec), "uses_teacher", False)


def results_config(config: dict) -> dict:
  """The part of a `distill_dataset` config (a plain dict) that its results depend on: the other
  methods' sections, trajectory matching's fields and experts (for another method) and the
  teacher (when neither the method nor an evaluation protocol reads it) are dropped, so changing
  them leaves a finished workdir valid."""
  spec = config["distill"]["method"]
  drop = {name for name in METHODS if name not in ("mtt", spec)}
  if spec in METHODS:
    drop.add("method_kwargs")
  if spec != "mtt":
    drop.add("experts")
  if not uses_teacher(spec) and "teacher" not in config["eval"]["protocols"]:
    drop.add("teacher")
  kept = {k: v for k, v in config.items() if k not in drop}
  if spec != "mtt":
    kept["distill"] = {k: v for k, v in config["distill"].items() if k in MATCHING_FIELDS}
  return kept


def _from_section(cls: type, section: dict, where: str) -> Method:
  valid = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(section) - valid)
  if unknown:
    raise ValueError(f"{where} has unknown fields {unknown}; {cls.__name__} takes: "
                     f"{', '.join(sorted(valid))}")
  return cls(**section)


def trajectory_matching(d, experts: ExpertRecipe) -> TrajectoryMatching:
  """MTT/TESLA/DATM from the `distill` config section (field meanings:
  kd_jax/dataset_distill/run.py)."""
  return TrajectoryMatching(
      iterations=d.iterations, syn_steps=d.syn_steps, expert_epochs=d.expert_epochs,
      window=StartWindow(d.min_start_epoch, d.current_max_start_epoch, d.max_start_epoch,
                         d.expansion_end_epoch),
      lr_img=d.lr_img, lr_lr=d.lr_lr, batch_syn=d.batch_syn, lr_label=d.lr_label,
      momentum_label=d.momentum_label, lr_init=d.lr_init, image_init=d.image_init,
      label_kind=d.label_kind, mode=d.mode, threshold=d.threshold if d.threshold > 0 else None,
      segments=d.segments, keep_every=d.keep_every, experts=experts)


def build(config, experts: ExpertRecipe) -> Method:
  """The method `config.distill.method` names, with its hyperparameters from the config."""
  spec = config.distill.method
  if spec == "mtt":
    return trajectory_matching(config.distill, experts)
  cls = method_class(spec)
  if spec in METHODS:
    return _from_section(cls, config[spec].to_dict(), f"config.{spec}")
  return _from_section(cls, config.method_kwargs.to_dict(), "config.method_kwargs")
