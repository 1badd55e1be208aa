"""Difficulty-aligned trajectory matching (DATM; Guo et al., ICLR 2024): start-epoch windows.

Small synthetic sets can only learn easy (early) dynamics, large ones need late dynamics, so the
window of start epochs t ∈ [min_start, upper) is tied to IPC and, with sequential generation,
its upper end widens linearly over distillation iterations:

  upper(it) = min(current_max_start + ⌊(max_start − current_max_start) · it / expansion_end⌋,
                  max_start)

Updates are skipped when the matching loss exceeds `threshold` (DATM's guard against
mismatched trajectories). Windows below are DATM's for CIFAR-10 (Guo et al., ICLR 2024).
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class StartWindow:
  """Start epochs are drawn from [min_start, upper(it)); `expansion_end=0` keeps the window at
  [min_start, max_start) (MTT). `current_max_start` is DATM's initial upper end."""
  min_start: int
  current_max_start: int
  max_start: int
  expansion_end: int = 0

  def __post_init__(self):
    if not 0 <= self.min_start < self.current_max_start <= self.max_start:
      raise ValueError("start window needs 0 <= min_start < current_max_start <= max_start, got "
                       f"{self.min_start}, {self.current_max_start}, {self.max_start}")
    if self.expansion_end < 0:
      raise ValueError(f"expansion_end must be >= 0, got {self.expansion_end}")

  def upper(self, iteration: int) -> int:
    """Exclusive upper end of the start epoch at `iteration`."""
    if self.expansion_end == 0:
      return self.max_start
    grown = self.current_max_start + int(
        (self.max_start - self.current_max_start) * iteration / self.expansion_end)
    return min(grown, self.max_start)

  def sample(self, rng: np.random.Generator, iteration: int) -> int:
    return int(rng.integers(self.min_start, self.upper(iteration)))


def mtt_window(max_start: int) -> StartWindow:
  """MTT's fixed window [0, max_start)."""
  return StartWindow(0, max_start, max_start)


# DATM CIFAR-10 (min_start, current_max_start, max_start) by IPC.
_DATM_CIFAR10 = {1: (0, 4, 4), 10: (0, 10, 20), 50: (0, 20, 40), 500: (40, 60, 60),
                 1000: (40, 60, 60)}


def datm_window(ipc: int, *, expansion_end: int) -> StartWindow:
  """DATM's CIFAR-10 window for `ipc`; other IPCs take the nearest tabulated IPC below."""
  key = max([k for k in _DATM_CIFAR10 if k <= ipc], default=1)
  return StartWindow(*_DATM_CIFAR10[key], expansion_end=expansion_end)


def should_update(loss: float, threshold: float | None) -> bool:
  """DATM skips the update when the matching loss is above `threshold` (None: never skip)."""
  return threshold is None or loss <= threshold
