"""Job-independent config checks: numeric ranges, and what to say about an unknown field."""
import difflib
import re

import ml_collections

from kd_jax.workdir import config_dict, flatten

# Fields (by last name, in any group) that must be >= the given minimum.
_MINIMUM = {"batch_size": 1, "eval_batch_size": 1, "num_epochs": 1, "epochs": 1,
            "every_steps": 1, "keep": 1, "cpu_devices": -1}
# Fields (by last name) that must be > 0.
_POSITIVE = ("learning_rate", "lr")


def check_values(config: dict) -> None:
  """Raises ValueError naming the first field out of range (batch sizes, epochs, cadences >= 1;
  learning rates > 0)."""
  for field, value in flatten(config).items():
    name = field.rsplit(".", 1)[-1]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    if name in _MINIMUM and value < _MINIMUM[name]:
      raise ValueError(f"config.{field}={value!r} is out of range: it must be >= "
                       f"{_MINIMUM[name]}. Set it with --config.{field}=N.")
    if name in _POSITIVE and not value > 0:
      raise ValueError(f"config.{field}={value!r} is out of range: it must be > 0. Set it with "
                       f"--config.{field}=X.")


def _flag_form(field: str) -> str:
  """`distill.terms.1.loss` -> `distill.terms[1].loss`, as `--config.` overrides index lists."""
  return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", field)


def _field_names(config: ml_collections.ConfigDict) -> set[str]:
  """Every group and field of `config` in flag form (`distill`, `distill.terms[0].loss`, ...)."""
  names = set()
  for leaf in flatten(config_dict(config)):
    parts = leaf.split(".")
    names.update(_flag_form(".".join(parts[:i])) for i in range(1, len(parts) + 1))
  return names


def unknown_field(config: ml_collections.ConfigDict, field: str) -> str | None:
  """A message for `--config.<field>` if `field` is not in `config` (None if it is): the group
  that lacks it, that group's fields, and similar names anywhere in the config."""
  group, path = config, "config"
  for part in field.split("."):
    name, *indices = re.split(r"[][]+", part.rstrip("]"))
    if not isinstance(group, ml_collections.ConfigDict):
      return None
    if name not in group:
      similar = sorted(f for f in _field_names(config) if difflib.get_close_matches(
          name, [re.split(r"[.[]", f)[-1]], n=1, cutoff=0.75))
      hint = f" Did you mean {' or '.join(f'--config.{f}' for f in similar)}?" if similar else ""
      return (f"--config.{field}: {path} has no field {name!r}. Its fields: "
              f"{', '.join(sorted(group))}.{hint}")
    group, path = group[name], f"{path}.{name}"
    for index in indices:
      if not (isinstance(group, (list, tuple)) and index.isdigit()):
        return None
      if int(index) >= len(group):
        return (f"--config.{field}: {path} has {len(group)} entries, so its indices are "
                f"0 to {len(group) - 1}.")
      group, path = group[int(index)], f"{path}[{index}]"
  return None
