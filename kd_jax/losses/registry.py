"""Name → loss table, so configs can select losses by name.

Code calls the loss functions directly; the registry exists for configs, the README table and
error messages. What a loss consumes and which hyperparameters it takes are read from its
signature, so the two can never disagree:

- positional parameters are its inputs, in call order, student inputs before teacher inputs
  (`student_logits`, `teacher_logits`, `labels`, `student_features`, ...);
- `mask` is keyword-only and means one thing everywhere: 1 for a real entry and 0 for padding,
  over the leading axes of the inputs (`[B]` per example, `[B, T]` per token);
- every other keyword-only parameter is a hyperparameter, with its default.
"""
import dataclasses
import inspect
from typing import Any, Callable

_REGISTRY: dict[str, "LossSpec"] = {}
_ALIASES: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Metadata for one registered loss.

  Attributes:
    name: registry key, e.g. `"kd"`; `kd_jax.losses.<name>` is `fn`.
    fn: the pure loss function.
    inputs: positional parameter names of `fn`, in call order.
    takes_mask: whether `fn` accepts the keyword-only `mask`.
    hparams: keyword-only hyperparameters of `fn` (not `mask`) → their defaults
      (`inspect.Parameter.empty` for a required one).
    per_example: True if it returns one value per example `[B]`, False if one scalar per
      batch (relation losses).
    kind: `"logits"`, `"features"`, `"relations"` or `"attention"`.
    paper: short citation.
    reference: reference implementation (repository and class).
  """
  name: str
  fn: Callable
  inputs: tuple[str, ...]
  takes_mask: bool
  hparams: dict[str, Any]
  per_example: bool
  kind: str
  paper: str
  reference: str

  def check_hparams(self, hparams: dict) -> None:
    """Raises `ValueError` naming the loss and its valid hyperparameters if `hparams` has an
    unknown key or lacks a required one."""
    unknown = sorted(set(hparams) - set(self.hparams))
    missing = sorted(k for k, v in self.hparams.items()
                     if v is inspect.Parameter.empty and k not in hparams)
    if unknown or missing:
      problem = (f"does not take {', '.join(map(repr, unknown))}" if unknown
                 else f"needs {', '.join(map(repr, missing))}")
      raise ValueError(f"loss {self.name!r} {problem}; its hyperparameters are: "
                       f"{self.describe_hparams() or '(none)'}")

  def describe_hparams(self) -> str:
    """`"temperature=4.0, alpha=1.0"` (required ones without a default)."""
    return ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}"
                     for k, v in self.hparams.items())


def _signature(fn: Callable) -> tuple[tuple[str, ...], bool, dict[str, Any]]:
  inputs, hparams, takes_mask = [], {}, False
  for p in inspect.signature(fn).parameters.values():
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
      if p.name == "mask":
        raise ValueError(f"{fn.__name__}: `mask` must be keyword-only")
      inputs.append(p.name)
    elif p.kind == p.KEYWORD_ONLY:
      if p.name == "mask":
        takes_mask = True
      else:
        hparams[p.name] = p.default
  return tuple(inputs), takes_mask, hparams


def register(name: str, fn: Callable, *, per_example: bool, kind: str, paper: str,
             reference: str) -> Callable:
  """Adds `fn` to the registry under `name` (and its function name) and returns it unchanged."""
  if name in _REGISTRY or name in _ALIASES:
    raise ValueError(f"loss {name!r} is already registered")
  inputs, takes_mask, hparams = _signature(fn)
  _REGISTRY[name] = LossSpec(name, fn, inputs, takes_mask, hparams, per_example, kind, paper,
                             reference)
  if fn.__name__ != name and fn.__name__ not in _REGISTRY:
    _ALIASES[fn.__name__] = name
  return fn


def get_loss(name: str) -> LossSpec:
  """Returns the `LossSpec` registered as `name` (or under its function's name), or raises
  listing the valid names."""
  try:
    return _REGISTRY[_ALIASES.get(name, name)]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(_REGISTRY))}") from None


def list_losses() -> list[str]:
  """The registry names of every loss, sorted; each is importable as `kd_jax.losses.<name>`.

  >>> from kd_jax import losses
  >>> "kd" in list_losses(), list_losses() == sorted(list_losses())
  (True, True)
  >>> all(getattr(losses, name) is get_loss(name).fn for name in list_losses())
  True
  """
  return sorted(_REGISTRY)
