"""Knowledge distillation as a `kd_jax.step.Method`: weighted loss terms between a student and
frozen teachers, each term with its own loss, weight, hyperparameters, feature taps and adapter::

    distiller = Distiller(student_apply, [Term("ce", weight=1.0),
                                          Term("dkd", weight=1.0, warmup_steps=400),
                                          Term("fitnet", student="stage1", teacher="stage2")],
                          teachers={"teacher": teacher_apply})

Each term reads *taps* — `"logits"` or a name in `ModelOutput.features` — from the student and
from one teacher (or a tuple of teachers, stacked), on one batch view (`"image"`,
`"image_strong"`, ...). Learnable parts are created from the taps' shapes in `init`:

- an adapter on the student side where the shapes differ (`Term.adapter`): `"linear"` (a
  dense layer on the last axis, i.e. a 1×1 conv on NHWC maps), `"hint"` (FitNet's regressor:
  3×3 conv or dense, BatchNorm, ReLU), `"connector"` (OFD/AB: 1×1 conv + BatchNorm), `"none"`;
  `"auto"` picks the loss's own choice (`DEFAULT_ADAPTERS`) and none for losses that compare
  maps of any width (`WIDTH_FREE`);
- the loss's own modules: VID's regressor, PAD's variance branch, CRD's two embeddings (and its
  memory bank in the loss state), FT's paraphraser (pre-trained by reconstruction for
  `options.paraphraser_steps`, then frozen) and translator, ReviewKD's attention fusion, USKD's
  weak head, MEAL V2's discriminator (with its own optimizer; `options.adversarial` makes it
  climb the loss the student descends), OFA's branch projectors (an `ofa` term on student
  stage taps: each tap → logits by `kd_jax.models.ofa_branch.OFABranch`, compared with the
  teacher's logits; for heterogeneous pairs).

Loss state lives in `extra[term.name]`: CRD's memory, ND's running teacher class means, OFD's
running per-channel margins (the mean of the teacher's negative responses). Every term's value
is logged as `terms/<name>`; the step's loss is Σ weight·value.

A *cached* teacher (`Distiller(..., cached=("teacher",))`) is not run: its logits come from the
batch (`batch["teacher_logits"]`, `kd_jax.teacher_cache` stores them per step and row), so its
terms may read only its `"logits"` tap on the primary view.
"""
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.losses import modules as loss_modules
from kd_jax.models import ofa_branch
from kd_jax.models.output import ModelOutput
from kd_jax.step import TrainState, cross_entropy, hard_labels

TASK_LOSS = "ce"
ADAPTERS = ("auto", "none", "linear", "hint", "connector")
# Losses whose two sides may differ in width: "auto" adds no adapter.
WIDTH_FREE = ("at", "nst", "sp", "pkt", "rkd", "rkd_distance", "rkd_angle", "cc", "cka",
              "minilm", "minilm_attention", "minilm_value_relation", "minilmv2_relation")
DEFAULT_ADAPTERS = {"fitnet": "hint", "ofd": "connector", "ab": "connector", "ickd": "connector"}
PRIMARY_VIEW = "image"
# Losses whose one input per side is a pair of layers (FSP's flow between two layers).
PAIR_INPUTS = ("fsp",)
# Hyperparameters the distiller computes from loss state when the term does not give them.
WIRED_HPARAMS = {"ofd": ("margin",)}


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss term.

  Attributes:
    loss: a registered loss (`kd_jax.losses.list_losses()`) or `"ce"`, the task loss.
    weight: its weight in the total loss.
    warmup_steps: the weight ramps linearly from 0 over this many steps (DKD's warm-up).
    hparams: the loss's hyperparameters (checked against its signature); a callable is a
      schedule, called with the step inside the jitted step (e.g. an annealed temperature).
    student, teacher: the taps compared: `"logits"`, a feature name, or a tuple of them.
    teacher_name: which frozen network is the teacher; a tuple stacks several (MEAL V2).
    adapter: see the module docstring.
    view: the batch key both networks see.
    name: the term's name in metrics and state (default: the loss name).
    options: settings of the loss's own modules (see `Distiller` errors for the valid ones).
  """
  loss: str
  weight: float = 1.0
  warmup_steps: int = 0
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  student: str | tuple[str, ...] = "logits"
  teacher: str | tuple[str, ...] = "logits"
  teacher_name: str | tuple[str, ...] = "teacher"
  adapter: str = "auto"
  view: str = PRIMARY_VIEW
  name: str = ""
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, config: Mapping, where: str) -> "Term":
    """A `Term` from a config dict; unknown keys raise naming `where` and the valid keys."""
    config = dict(config)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(valid))
    if unknown or "loss" not in config:
      problem = f"has unknown keys {unknown}" if unknown else "has no 'loss'"
      raise ValueError(f"{where} {problem}; a term takes: {', '.join(valid)}")
    for key in ("student", "teacher", "teacher_name"):
      if isinstance(config.get(key), list):
        config[key] = tuple(config[key])
    return cls(**config)

  def weight_at(self, step) -> jax.Array:
    return self.weight * losses.warmup_factor(step, self.warmup_steps)


def _taps(names) -> tuple[str, ...]:
  return (names,) if isinstance(names, str) else tuple(names)


def cached_logits_key(teacher_name: str) -> str:
  """The batch key of a cached teacher's logits `[B, C]`: `"teacher_logits"` for `"teacher"`."""
  return f"{teacher_name}_logits"


def read_tap(out: ModelOutput, name: str, side: str) -> jax.Array:
  """`out.logits` for `"logits"`, else `out.features[name]`, with an error listing the taps.

  Attention taps (`"attn/<block>"`, probabilities) are read as log-probabilities: the same
  softmax as the pre-softmax scores MiniLM compares.
  """
  if name == "logits":
    return out.logits
  if name not in out.features:
    raise ValueError(f"the {side} has no feature {name!r}; its taps are: "
                     f"{', '.join(['logits', *sorted(out.features)])}")
  if name.startswith("attn/"):  # attention probabilities → log-probabilities (MiniLM's scores)
    return jnp.log(jnp.maximum(out.features[name], jnp.finfo(jnp.float32).tiny))
  return out.features[name]


def _apply_module(module: nn.Module, variables: dict, *args, **kwargs):
  """Applies `module`, returning `(out, new_model_state)`; BatchNorm stats update in train mode."""
  state = {k: v for k, v in variables.items() if k != "params"}
  if kwargs.get("train") and state:
    out, new_state = module.apply(variables, *args, mutable=list(state), **kwargs)
    return out, {**state, **new_state}
  return module.apply(variables, *args, **kwargs), state


# ----------------------------------------------------------------------------- heads
# A head is a linen module owning a term's learnable parts. It maps the taps to the loss's
# student-side and teacher-side inputs: `head(student_taps, teacher_taps, train=) ->
# (student_inputs, teacher_inputs, aux)` with `aux` a dict of extra values (e.g. FT's
# reconstruction loss).


class _Adapter(nn.Module):
  """One student tap → the teacher tap's last-axis width."""
  kind: str
  features: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.kind == "linear":
      return nn.Dense(self.features)(x)
    if self.kind == "hint":
      return loss_modules.HintRegressor(self.features)(x, train=train)
    return loss_modules.HintRegressor(self.features, kernel_size=1, use_bias=False,
                                      use_relu=False)(x, train=train)


class _AdapterHead(nn.Module):
  """Adapters (or identity) on each student tap."""
  kinds: tuple[str, ...]       # one per student tap; "none" = identity
  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    adapted = [x if kind == "none" else _Adapter(kind, width, name=f"adapter{k}")(x, train=train)
               for k, (x, kind, width) in enumerate(zip(student, self.kinds, self.widths))]
    return adapted, list(teacher), {}


class _OFAHead(nn.Module):
  """OFA's branches: each student tap (a `"none"` kind passes logits through) → logits, each
  compared with the teacher's logits."""
  kinds: tuple[str, ...]
  downsample: tuple[int, ...]
  width: int
  blocks: int
  num_heads: int

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    num_classes = teacher[0].shape[-1]
    outs = [x if kind == "none" else
            ofa_branch.OFABranch(kind, num_classes, self.width, down, self.blocks,
                                 self.num_heads, name=f"branch{k}")(x, train=train)
            for k, (x, kind, down) in enumerate(zip(student, self.kinds, self.downsample))]
    return outs, [teacher[0]] * len(outs), {}


class _VIDHead(nn.Module):
  hidden_features: int

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    mean, variance = loss_modules.VIDRegressor(teacher[0].shape[-1], self.hidden_features)(
        student[0])
    return [mean, variance], list(teacher), {}


class _PADHead(nn.Module):
  adapter: str

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    x = student[0]
    if self.adapter != "none":
      x = _Adapter(self.adapter, teacher[0].shape[-1])(x, train=train)
    flat = x.reshape(x.shape[0], -1)
    log_variance = loss_modules.HintRegressor(flat.shape[-1], use_relu=False)(flat, train=train)
    return [x, log_variance], list(teacher), {}


class _CRDHead(nn.Module):
  embed_dim: int

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    return ([loss_modules.CRDEmbed(self.embed_dim, name="student_embed")(student[0])],
            [loss_modules.CRDEmbed(self.embed_dim, name="teacher_embed")(teacher[0])], {})


class _FTHead(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    paraphraser = loss_modules.Paraphraser(teacher[0].shape[-1], self.rate, name="paraphraser")
    factor, reconstruction = paraphraser(teacher[0], train=train)
    translated = loss_modules.Translator(factor.shape[-1], name="translator")(student[0],
                                                                             train=train)
    recon = losses.masked_mean(losses.fitnet(reconstruction, teacher[0]))
    return [translated], [jax.lax.stop_gradient(factor)], {"reconstruction": recon}


class _ReviewKDHead(nn.Module):
  """ReviewKD's attention-based fusion chain, deepest stage first; each fused map is compared
  with the teacher's map at the same stage (average-pooled to the student's size if larger)."""
  mid_channels: int

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    outs, residual = [], None
    for k in reversed(range(len(student))):
      fusion = loss_modules.AttentionFusion(self.mid_channels, teacher[k].shape[-1],
                                            use_attention=residual is not None,
                                            name=f"fusion{k}")
      out, residual = fusion(student[k], residual, train=train)
      outs.append(out)
    outs.reverse()
    pooled = [losses.adaptive_pool2d(t, o.shape[1:3]) if t.shape[1:3] != o.shape[1:3] else t
              for o, t in zip(outs, teacher)]
    return outs, pooled, {}


class _USKDHead(nn.Module):
  """USKD's weak head: a linear classifier on a student tap (flattened)."""
  num_classes: int

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    logits, feature = student
    weak = nn.Dense(self.num_classes, name="weak_head")(feature.reshape(feature.shape[0], -1))
    return [logits, weak], [], {}


class _DiscriminatorHead(nn.Module):
  reduction: int
  final_relu: bool

  @nn.compact
  def __call__(self, student, teacher, *, train: bool):
    discriminator = losses.MealV2Discriminator(self.reduction, self.final_relu,
                                               name="discriminator")
    teacher_logits = teacher[0]
    if teacher_logits.ndim > student[0].ndim:  # several teachers: their mean logits
      teacher_logits = jnp.mean(teacher_logits, axis=0)
    return [discriminator(student[0])], [discriminator(teacher_logits)], {}


# ----------------------------------------------------------------------------- terms

# Options of the loss's own modules: name → default.
OPTIONS = {
    "vid": {"hidden_features": 0},            # 0: the teacher's width
    "crd": {"embed_dim": 128, "num_negatives": 4096},
    "ft": {"rate": 0.5, "paraphraser_steps": 100},
    "reviewkd_hcl": {"mid_channels": 0},      # 0: the smallest teacher width
    "meal_v2_discriminator": {"reduction": 2, "final_relu": True, "adversarial": False},
    # branch: "auto" (by the tap's rank), "conv", "tokens" or "linear"; width 0: the widest
    # student tap; final_grid 0: the smallest grid among the student taps.
    "ofa": {"branch": "auto", "width": 0, "final_grid": 0, "blocks": 1, "num_heads": 4},
}


class _Compiled:
  """A validated term: its spec, taps and head, and how its inputs are assembled."""

  def __init__(self, term: Term, index: int, teachers: Mapping[str, Callable],
               num_data: int | None):
    self.term, self.where = term, f"distill.terms[{index}] ({term.loss})"
    self.name = term.name or term.loss
    if term.adapter not in ADAPTERS:
      raise ValueError(f"{self.where}: adapter={term.adapter!r} is unknown; valid: "
                       f"{', '.join(ADAPTERS)}")
    if not math.isfinite(term.weight):
      raise ValueError(f"{self.where}: weight must be finite, got {term.weight}")
    unknown = sorted(set(term.options) - set(OPTIONS.get(term.loss, {})))
    if unknown:
      valid = ", ".join(f"{k}={v!r}" for k, v in OPTIONS.get(term.loss, {}).items())
      raise ValueError(f"{self.where}: options {unknown} are unknown; valid: {valid or '(none)'}")
    self.options = {**OPTIONS.get(term.loss, {}), **term.options}
    self.student_taps = _taps(term.student)
    self.teacher_taps = _taps(term.teacher)
    self.teacher_names = _taps(term.teacher_name)
    if term.loss == TASK_LOSS:
      if term.hparams:
        raise ValueError(f"{self.where}: the task loss takes no hyperparameters")
      self.spec, self.uses_teacher = None, False
      return
    try:
      self.spec = losses.get_loss(term.loss)
      wired = {name: None for name in WIRED_HPARAMS.get(term.loss, ()) if name not in term.hparams}
      self.spec.check_hparams({**term.hparams, **wired})
    except ValueError as e:
      raise ValueError(f"{self.where}: {e}") from None
    self.uses_teacher = term.loss not in ("uskd",)
    if self.uses_teacher:
      missing = [n for n in self.teacher_names if n not in teachers]
      if missing:
        raise ValueError(f"{self.where}: teacher_name {missing} is not a frozen network; "
                         f"there are: {', '.join(sorted(teachers)) or '(none)'}")
    if term.loss == "uskd":
      self.student_taps = ("logits", *(t for t in self.student_taps if t != "logits"))
      if len(self.student_taps) != 2:
        raise ValueError(f"{self.where}: USKD's weak head needs one student feature, e.g. "
                         "student='stage1'")
    if term.loss == "crd" and not num_data:
      raise ValueError(f"{self.where}: CRD's memory bank needs the number of training examples "
                       "(Distiller(num_data=...))")
    self.num_data = num_data

  # --- learnable parts
  def head(self, student, teacher) -> nn.Module | None:
    """The term's head for these (abstract) taps, or None when nothing is learned."""
    loss, o = self.term.loss, self.options
    if loss == TASK_LOSS:
      return None
    if loss == "vid":
      return _VIDHead(o["hidden_features"] or teacher[0].shape[-1])
    if loss == "pad_l2":
      return _PADHead(self._adapter_kind(student[0], teacher[0]))
    if loss == "crd":
      return _CRDHead(o["embed_dim"])
    if loss == "ft":
      return _FTHead(o["rate"])
    if loss == "reviewkd_hcl":
      return _ReviewKDHead(o["mid_channels"] or min(t.shape[-1] for t in teacher))
    if loss == "uskd":
      return _USKDHead(student[0].shape[-1])
    if loss == "meal_v2_discriminator":
      return _DiscriminatorHead(o["reduction"], o["final_relu"])
    if loss == "ofa" and set(self.student_taps) != {"logits"}:
      return self._ofa_head(student, teacher)
    if len(student) != len(teacher):
      raise ValueError(f"{self.where}: {len(student)} student taps but {len(teacher)} teacher "
                       "taps; give one teacher tap per student tap")
    kinds = tuple(self._adapter_kind(s, t) for s, t in zip(student, teacher))
    if all(k == "none" for k in kinds):
      return None
    return _AdapterHead(kinds, tuple(t.shape[-1] for t in teacher))

  def _ofa_head(self, student, teacher) -> nn.Module:
    o = self.options
    if self.teacher_taps != ("logits",):
      raise ValueError(f"OFA's branches are compared with the teacher's logits; give "
                       f"teacher='logits', not {self.teacher_taps}")
    if o["branch"] not in ("auto", *ofa_branch.BRANCH_KINDS):
      raise ValueError(f"options.branch={o['branch']!r} is unknown; valid: auto, "
                       f"{', '.join(ofa_branch.BRANCH_KINDS)}")
    kinds = tuple("none" if name == "logits" else
                  ofa_branch.default_kind(x) if o["branch"] == "auto" else o["branch"]
                  for name, x in zip(self.student_taps, student))
    # Each map or token tap's grid side; vectors and passed-through logits have none.
    sides = [_grid_side(x) if kind in ("conv", "tokens") else 0 for x, kind in zip(student, kinds)]
    final = o["final_grid"] or min((side for side in sides if side), default=0)
    downsample = tuple(ofa_branch.halvings(side, final) if side else 0 for side in sides)
    width = o["width"] or max(x.shape[-1] for x, kind in zip(student, kinds) if kind != "none")
    return _OFAHead(kinds, downsample, width, o["blocks"], o["num_heads"])

  def _adapter_kind(self, student, teacher) -> str:
    kind = self.term.adapter
    if kind != "auto":
      return kind
    # Several teachers are stacked on a leading axis: compare one teacher's shape.
    teacher_shape = teacher.shape[1:] if len(self.teacher_names) > 1 else teacher.shape
    if student.shape == teacher_shape or self.term.loss in WIDTH_FREE:
      return "none"
    return DEFAULT_ADAPTERS.get(self.term.loss, "linear")

  def init_extra(self, rng, student, teacher, num_classes: int) -> dict:
    """The term's loss state."""
    loss = self.term.loss
    if loss == "crd":
      return {"memory": loss_modules.init_crd_memory(rng, self.num_data,
                                                     self.options["embed_dim"])}
    if loss == "nd":
      width = teacher[0].shape[-1]
      return {"sums": jnp.zeros((num_classes, width)), "counts": jnp.zeros((num_classes,))}
    if loss == "ofd":
      width = teacher[0].shape[-1]
      return {"negative_sums": jnp.zeros((width,)), "negative_counts": jnp.zeros((width,))}
    return {}

  # --- the value
  def value(self, student, teacher, aux, extra, batch, step, rng):
    """Returns `(value, new_extra, metrics)` for one term."""
    mask = batch.get("mask")
    if self.spec is None:
      return losses.masked_mean(cross_entropy(student[0], batch["label"]), mask), extra, {}
    spec, loss = self.spec, self.term.loss
    hparams = {k: v(step) if callable(v) else v for k, v in self.term.hparams.items()}
    provided, new_extra = {"labels": batch.get("label")}, extra
    if loss == "crd":
      provided["memory"] = extra["memory"]
      provided["indices"] = batch["index"]
      provided["contrast_indices"] = loss_modules.crd_contrast_indices(
          rng, batch["index"], self.options["num_negatives"], self.num_data)
    if loss == "nd":
      new_extra = update_class_sums(extra, teacher[0], batch["label"], mask)
      provided["class_means"] = class_means(new_extra)
    if loss == "ofd" and "margin" not in hparams:
      new_extra = _update_negative_means(extra, teacher[0], mask)
      hparams["margin"] = new_extra["negative_sums"] / jnp.maximum(new_extra["negative_counts"], 1)
    value = jnp.float32(0.0)
    for args in self._assemble(spec, student, teacher, provided):
      if spec.takes_mask:
        hparams["mask"] = _mask_for(args[0], mask, spec)
      out = spec.fn(*args, **hparams)
      if loss == "crd":
        out, memory = out
        new_extra = {**extra, "memory": memory}
      value += losses.masked_mean(out, mask) if spec.per_example else jnp.asarray(out, jnp.float32)
    metrics = {}
    if loss == "ft":
      warm = step < self.options["paraphraser_steps"]
      metrics[f"terms/{self.name}/reconstruction"] = aux["reconstruction"]
      value = jnp.where(warm, aux["reconstruction"], value)
    if loss == "meal_v2_discriminator" and self.options["adversarial"]:
      value = -value
    return value, new_extra, metrics

  def _assemble(self, spec, student, teacher, provided) -> list[list]:
    """The loss's positional arguments: one list per call. Student taps fill the student-side
    inputs in order and teacher taps the `teacher*` ones; a loss with one input per side gets
    one call per tap pair (summed, as torchdistill's multi-pair losses), or the pair of taps as
    one tuple where it compares two layers at once (`PAIR_INPUTS`, FSP)."""
    student_names = [n for n in spec.inputs if n not in provided and not n.startswith("teacher")]
    teacher_names = [n for n in spec.inputs if n.startswith("teacher")]
    if len(student_names) == len(teacher_names) == 1 and len(student) > 1:
      if self.term.loss in PAIR_INPUTS:
        pairs = [([tuple(student)], [tuple(teacher)])]
      else:
        pairs = [([s], [t]) for s, t in zip(student, teacher)]
    else:
      pairs = [(student, teacher)]
    calls = []
    for student_side, teacher_side in pairs:
      sides = {}
      for names, tensors, side in ((student_names, student_side, "student"),
                                   (teacher_names, teacher_side, "teacher")):
        if len(names) != len(tensors):
          raise ValueError(f"{self.where}: the loss takes {len(names)} {side} input(s) "
                           f"({', '.join(names)}) but the term gives {len(tensors)} {side} "
                           "tap(s)")
        sides.update({name: _as_input(name, x) for name, x in zip(names, tensors)})
      args = [sides[name] if name in sides else provided[name] for name in spec.inputs]
      missing = [name for name, value in zip(spec.inputs, args) if value is None]
      if missing:
        raise ValueError(f"{self.where}: the batch has no {missing}")
      calls.append(args)
    return calls


def _grid_side(x) -> int:
  """The side of a map `[B, H, W, C]` (H) or a square token sequence `[B, T, D]` (√T)."""
  return x.shape[1] if len(x.shape) == 4 else math.isqrt(x.shape[1])


def _as_input(name: str, x: jax.Array) -> jax.Array:
  """NHWC token grids become `[B, T, D]` for `*_states` inputs (MiniLMv2)."""
  if name.endswith("_states") and x.ndim == 4:
    return x.reshape(x.shape[0], -1, x.shape[-1])
  return x


def _mask_for(first_input, mask, spec):
  """The example mask, broadcast to `[B, T]` for per-token (attention) losses."""
  if mask is None or spec.kind != "attention":
    return mask
  tokens = first_input.shape[-2]
  return jnp.broadcast_to(mask[:, None], (mask.shape[0], tokens))


def update_class_sums(extra, teacher_features, labels, mask):
  """`{"sums" [C, D], "counts" [C]}` plus this batch's features `[B, ...]` per class."""
  weights = jax.nn.one_hot(hard_labels(labels), extra["counts"].shape[0])
  if mask is not None:
    weights = weights * mask[:, None]
  flat = teacher_features.reshape(teacher_features.shape[0], -1).astype(jnp.float32)
  return {"sums": extra["sums"] + weights.T @ flat, "counts": extra["counts"] + weights.sum(0)}


def class_means(extra):
  """Running teacher class means; classes not seen yet get a unit placeholder (never used)."""
  counts = extra["counts"][:, None]
  return jnp.where(counts > 0, extra["sums"] / jnp.maximum(counts, 1.0), 1.0)


def _update_negative_means(extra, teacher_features, mask):
  t = teacher_features.astype(jnp.float32)
  negative = (t < 0).astype(jnp.float32)
  if mask is not None:
    negative = negative * mask.reshape(mask.shape + (1,) * (t.ndim - 1))
  axes = tuple(range(t.ndim - 1))
  return {"negative_sums": extra["negative_sums"] + jnp.sum(t * negative, axes),
          "negative_counts": extra["negative_counts"] + jnp.sum(negative, axes)}


class Distiller:
  """A student trained on weighted terms against frozen teachers (a `kd_jax.step.Method`).

  Args:
    student: the student's apply function.
    terms: the loss terms (`Term`); `Term("ce")` alone is plain supervised training.
    teachers: `{name: apply_fn}` of the frozen networks.
    num_data: the number of training examples (CRD's memory bank; batches then carry `index`).
    cached: teachers read from the batch (`batch[cached_logits_key(name)]`, their logits on the
      primary view) instead of run; they are not in the state. Only logit taps can be cached.

  State: `trainable = {"student": params, <term name>: head params}`, `frozen = {teacher name:
  variables}`, `extra = {"model_state": {"student": ..., <term name>: ...}, <term name>: loss
  state}`.
  """

  evolving_frozen = ()  # the teachers never change

  def __init__(self, student: Callable, terms: Sequence[Term],
               teachers: Mapping[str, Callable] | None = None, *, num_data: int | None = None,
               cached: Sequence[str] = ()):
    if not terms:
      raise ValueError("distill.terms is empty; give at least one term, e.g. {'loss': 'ce'}")
    self.student = student
    self.teachers = dict(teachers or {})
    self.terms = [_Compiled(t, i, self.teachers, num_data) for i, t in enumerate(terms)]
    names = [c.name for c in self.terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"distill.terms: names {duplicates} repeat; give repeated losses a "
                       "distinct 'name'")
    if "student" in names or "model_state" in names:
      raise ValueError("distill.terms: 'student' and 'model_state' are reserved term names")
    self.views = sorted({c.term.view for c in self.terms} | {PRIMARY_VIEW})
    self.used_teachers = sorted({n for c in self.terms if c.uses_teacher
                                 for n in c.teacher_names})
    self.cached = tuple(cached)
    for c in self.terms:
      for name in set(self.cached) & set(c.teacher_names if c.uses_teacher else ()):
        if c.term.view != PRIMARY_VIEW or set(c.teacher_taps) != {"logits"}:
          raise ValueError(f"{c.where}: teacher {name!r} is cached (teacher.cache), which stores "
                           f"its logits on {PRIMARY_VIEW!r} only, but the term reads "
                           f"{list(c.teacher_taps)} on {c.term.view!r}; use teacher='logits' or "
                           "set teacher.cache=''")
    self._heads: dict[str, nn.Module] = {}

  @property
  def ascending_parts(self) -> tuple[str, ...]:
    """Trainable parts whose optimizer must climb the loss (`kd_jax.step.ascend`)."""
    return tuple(c.name for c in self.terms
                 if c.term.loss == "meal_v2_discriminator" and c.options["adversarial"])

  def _outputs(self, trainable, frozen, model_state, batch, rng, train):
    """Student outputs per view, teacher outputs per (name, view), new student model state."""
    student_out, new_state = {}, model_state.get("student", {})
    for k, view in enumerate(self.views):
      if view not in batch:
        raise ValueError(f"the batch has no view {view!r} (it has {sorted(batch)})")
      out, state = self.student({"params": trainable["student"], **model_state.get("student", {})},
                                batch[view], train=train, rngs={"dropout": jax.random.fold_in(rng, k)})
      student_out[view] = out
      if view == PRIMARY_VIEW:
        new_state = state
    teacher_out = {}
    for name in self.used_teachers:
      for view in {c.term.view for c in self.terms if name in c.teacher_names}:
        if name in self.cached:
          key = cached_logits_key(name)
          if key not in batch:
            raise ValueError(f"teacher {name!r} is cached but the batch has no {key!r}; add it "
                             "with kd_jax.teacher_cache.with_teacher_logits")
          out = ModelOutput(batch[key])
        else:
          out, _ = self.teachers[name](jax.lax.stop_gradient(frozen[name]), batch[view],
                                       train=False)
        teacher_out[name, view] = jax.lax.stop_gradient(out)
    return student_out, teacher_out, new_state

  def _term_taps(self, c: _Compiled, student_out, teacher_out):
    try:
      student = [read_tap(student_out[c.term.view], n, "student") for n in c.student_taps]
      if not c.uses_teacher:
        return student, []
      per_teacher = [[read_tap(teacher_out[name, c.term.view], n, f"teacher {name!r}")
                      for n in c.teacher_taps] for name in c.teacher_names]
    except ValueError as e:
      raise ValueError(f"{c.where}: {e}") from None
    if len(per_teacher) == 1:
      return student, per_teacher[0]
    return student, [jnp.stack(group) for group in zip(*per_teacher)]

  def init(self, rng: jax.Array, variables: Mapping[str, dict], batch) -> tuple:
    """`variables = {"student": {...}, <teacher name>: {...}}` → (trainable, frozen, extra)."""
    student_vars = dict(variables["student"])
    trainable = {"student": student_vars.pop("params")}
    frozen = {name: variables[name] for name in self.used_teachers if name not in self.cached}
    extra = {"model_state": {"student": student_vars}}
    student_out, teacher_out, _ = jax.eval_shape(
        lambda t, f, b: self._outputs(t, f, extra["model_state"], b, rng, False),
        trainable, frozen, batch)
    num_classes = student_out[PRIMARY_VIEW].logits.shape[-1]
    for k, c in enumerate(self.terms):
      student, teacher = jax.eval_shape(lambda s, t, c=c: self._term_taps(c, s, t), student_out,
                                        teacher_out)
      zeros = lambda xs: [jnp.zeros(x.shape, x.dtype) for x in xs]
      try:
        head = c.head(student, teacher)
        if head is not None:
          head_vars = dict(head.init(jax.random.fold_in(rng, k), zeros(student), zeros(teacher),
                                     train=False))
          trainable[c.name] = head_vars.pop("params")
          extra["model_state"][c.name] = head_vars
          self._heads[c.name] = head
        term_extra = c.init_extra(jax.random.fold_in(rng, 1000 + k), student, teacher,
                                  num_classes)
      except (ValueError, TypeError) as e:
        raise ValueError(f"{c.where}: {e}") from None
      if term_extra:
        extra[c.name] = term_extra
    return trainable, frozen, extra

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """Σ weight·value over the terms; see `kd_jax.step.Method.loss`."""
    model_state = extra["model_state"]
    student_out, teacher_out, student_state = self._outputs(trainable, frozen, model_state, batch,
                                                            rng, True)
    new_extra = {**extra, "model_state": {**model_state, "student": student_state}}
    total, metrics = jnp.float32(0.0), {}
    for k, c in enumerate(self.terms):
      student, teacher = self._term_taps(c, student_out, teacher_out)
      aux = {}
      try:
        if c.name in self._heads:
          (student, teacher, aux), new_extra["model_state"][c.name] = _apply_module(
              self._heads[c.name], {"params": trainable[c.name], **model_state[c.name]},
              student, teacher, train=True)
        value, term_extra, term_metrics = c.value(student, teacher, aux, extra.get(c.name), batch,
                                                  step, jax.random.fold_in(rng, 1000 + k))
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{c.where}: {type(e).__name__}: {e}") from None
      if term_extra:
        new_extra[c.name] = term_extra
      weight = c.term.weight_at(step)
      total = total + weight * value
      metrics.update(term_metrics)
      metrics[f"terms/{c.name}"] = value
      if c.term.warmup_steps:
        metrics[f"terms/{c.name}/weight"] = weight
    primary = student_out[PRIMARY_VIEW].logits
    correct = jnp.argmax(primary, -1) == hard_labels(batch["label"])
    metrics["train/accuracy"] = losses.masked_mean(correct, batch.get("mask"))
    return total, (metrics, new_extra)

  def after_update(self, old: TrainState, new: TrainState) -> TrainState:
    """Freezes FT's paraphraser (params and BatchNorm stats) once its pre-training is done."""
    for c in self.terms:
      if c.term.loss != "ft":
        continue
      frozen = old.step >= c.options["paraphraser_steps"]
      keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(frozen, x, y), a, b)
      trainable = {**new.trainable, c.name: {
          **new.trainable[c.name],
          "paraphraser": keep(old.trainable[c.name]["paraphraser"],
                              new.trainable[c.name]["paraphraser"])}}
      model_state = dict(new.extra["model_state"])
      if "paraphraser" in model_state.get(c.name, {}).get("batch_stats", {}):
        stats = model_state[c.name]["batch_stats"]
        model_state[c.name] = {**model_state[c.name], "batch_stats": {
            **stats, "paraphraser": keep(old.extra["model_state"][c.name]["batch_stats"]
                                         ["paraphraser"], stats["paraphraser"])}}
      new = new.replace(trainable=trainable, extra={**new.extra, "model_state": model_state})
    return new


def supervised(apply_fn: Callable) -> Distiller:
  """Plain cross-entropy training of one network (teachers, baselines, dataset distillation)."""
  return Distiller(apply_fn, [Term(TASK_LOSS)])


def supervised_state(variables: dict, tx) -> TrainState:
  """The `TrainState` of a `supervised` method from `{"params", **model_state}`."""
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState.create(tx, {"student": params}, {}, {"model_state": {"student": variables}})
