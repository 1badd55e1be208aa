"""Name → loss table with metadata, so configs can select losses by name.

Code calls the loss functions directly; the registry exists for configs, the README
table and error messages that list the valid names.
"""
import dataclasses
from typing import Callable

_REGISTRY: dict[str, "LossSpec"] = {}


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Metadata for one registered loss.

  Attributes:
    name: registry key, e.g. `"kd"`.
    fn: the pure loss function.
    inputs: what the loss consumes, in call order, from
      `{"student_logits", "teacher_logits", "labels", "student_features",
      "teacher_features", "student_attention", "teacher_attention", ...}`.
    per_example: True if it returns one value per example, False if one scalar
      per batch (relation losses).
    kind: `"logits"`, `"features"`, `"relations"` or `"attention"`.
    paper: short citation.
    reference: reference implementation (repository and class).
  """
  name: str
  fn: Callable
  inputs: tuple[str, ...]
  per_example: bool
  kind: str
  paper: str
  reference: str


def register(name: str, fn: Callable, *, inputs, per_example: bool, kind: str,
             paper: str, reference: str) -> Callable:
  """Adds `fn` to the registry under `name` and returns it unchanged."""
  if name in _REGISTRY:
    raise ValueError(f"loss {name!r} is already registered")
  _REGISTRY[name] = LossSpec(name, fn, tuple(inputs), per_example, kind, paper, reference)
  return fn


def get_loss(name: str) -> LossSpec:
  """Returns the `LossSpec` registered as `name`, or raises listing valid names."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(_REGISTRY))}") from None


def list_losses() -> list[str]:
  return sorted(_REGISTRY)
