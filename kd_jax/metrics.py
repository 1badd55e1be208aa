"""Metric sinks (JSONL + TensorBoard event files), the progress bar, and finite checks."""
import json
import math
import os

import jax
import numpy as np
import tqdm


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


class MetricWriter:
  """Appends flat metric dicts to `metrics.jsonl` and TensorBoard event files.

  Args:
    directory: the stage directory; files go to `directory/metrics.jsonl` and
      `directory/tensorboard/`.
    tensorboard: whether to write event files (tensorboardX; no TensorFlow needed).
    enabled: False makes every call a no-op (all hosts but the first, in multi-host runs).
  """

  def __init__(self, directory: str, *, tensorboard: bool = True, enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(directory, exist_ok=True)
    self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))
      self._tb.flush()

  def close(self) -> None:
    if not self._enabled:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """Reads back a `metrics.jsonl` file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class PendingMetrics:
  """Device metrics kept since the last host check, so the host syncs only at log steps.

  `check_and_mean()` fetches them, raises `NonFiniteLossError` naming the first
  step whose loss was not finite, and returns the mean of each metric.
  """

  def __init__(self, loss_key: str = "train/loss"):
    self._loss_key = loss_key
    self._items: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._items.append((step, metrics))

  def __len__(self):
    return len(self._items)

  def check_and_mean(self) -> dict:
    items, self._items = jax.device_get(self._items), []
    for step, metrics in items:
      loss = float(metrics[self._loss_key])
      if not math.isfinite(loss):
        raise NonFiniteLossError(f"{self._loss_key} became {loss} at step {step}")
    if not items:
      return {}
    return {k: float(np.mean([m[k] for _, m in items])) for k in items[0][1]}


def progress_bar(total: int, initial: int, description: str):
  """A tqdm bar with rate and ETA (the loss is shown as a postfix); off when `CI=true`."""
  disable = os.environ.get("CI") == "true"
  return tqdm.tqdm(total=total, initial=initial, desc=description, unit="step",
                   dynamic_ncols=True, disable=disable, leave=False)
