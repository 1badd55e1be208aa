"""Optimizers and learning-rate schedules named by config (the KD literature's recipes)."""
from typing import Sequence

import optax

SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_schedule(*, name: str, learning_rate: float, total_steps: int, steps_per_epoch: int,
                  decay_epochs: Sequence[int] = (), decay_rate: float = 0.1,
                  warmup_epochs: float = 0.0) -> optax.Schedule:
  """Learning rate per step.

  `step` multiplies by `decay_rate` at each of `decay_epochs` (RepDistiller/mdistiller:
  0.05 decayed ×0.1 at 150/180/210 of 240 epochs); `cosine` decays to 0 over
  `total_steps`; both after an optional linear warm-up.
  """
  if name not in SCHEDULES:
    raise ValueError(f"optim.schedule={name!r} is unknown; valid: {', '.join(SCHEDULES)}")
  if learning_rate <= 0:
    raise ValueError(f"optim.learning_rate must be > 0, got {learning_rate}")
  warmup = int(round(warmup_epochs * steps_per_epoch))
  if name == "constant":
    main = optax.constant_schedule(learning_rate)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup, 1))
  else:
    boundaries = {int(e * steps_per_epoch) - warmup: decay_rate for e in decay_epochs}
    main = optax.piecewise_constant_schedule(learning_rate, boundaries)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), main], [warmup])


def make_optimizer(*, name: str, schedule: optax.Schedule, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with PyTorch-style coupled weight decay (decay added to the gradient before
  momentum, as `torch.optim.SGD`), Adam, or AdamW (decoupled)."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name={name!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
  if weight_decay < 0:
    raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay}")
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(schedule))
  return optax.adamw(schedule, weight_decay=weight_decay)
