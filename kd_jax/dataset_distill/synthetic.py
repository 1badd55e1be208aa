"""Initial synthetic sets: images from real samples or noise; hard, TESLA or DATM labels.

Synthetic images are ordered by class, `ipc` per class: image `c·ipc + j` belongs to class c.
Label kinds (see `matching.label_targets`)::

  "hard"   class ids, not learned (MTT).
  "probs"  TESLA's soft labels: softmax of the target expert's logits on the initial images,
           fixed during distillation (Cui et al., ICML 2023).
  "logits" DATM's learned soft labels (Guo et al., ICLR 2024): logits initialised as the mean,
           over the experts that classify the image correctly, of their logits; trained with
           their own optimizer, used through a softmax.
"""
from typing import Callable

import numpy as np

IMAGE_INITS = ("real", "real_correct", "noise")


def class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """Indices of each class in `labels` `[N]`."""
  return [np.flatnonzero(labels == c) for c in range(num_classes)]


def select_real(rng: np.random.Generator, labels: np.ndarray, num_classes: int, ipc: int,
                correct: np.ndarray | None = None) -> np.ndarray:
  """`[num_classes·ipc]` indices of real images, `ipc` per class in class order.

  With `correct` (`[N]` bool: the expert classifies image n correctly) only those are drawn,
  topped up with misclassified ones when a class has too few.
  """
  chosen = []
  for c, idx in enumerate(class_indices(labels, num_classes)):
    if len(idx) < ipc:
      raise ValueError(f"class {c} has {len(idx)} real images, fewer than ipc={ipc}")
    idx = rng.permutation(idx)
    if correct is not None:
      idx = np.concatenate([idx[correct[idx]], idx[~correct[idx]]])
    chosen.append(idx[:ipc])
  return np.concatenate(chosen)


def init_images(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, *,
                num_classes: int, ipc: int, init: str = "real",
                predict: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (synthetic images `[num_classes·ipc, H, W, C]` float32, class ids `[num_classes·ipc]`).

  init: "real" (random real images per class, MTT), "real_correct" (only images that
  `predict(images) -> logits` classifies correctly, DATM's samples_predicted_correctly) or
  "noise" (standard normal, in normalised pixel units).
  """
  if init not in IMAGE_INITS:
    raise ValueError(f"synthetic image init must be one of {IMAGE_INITS}, got {init!r}")
  class_ids = np.repeat(np.arange(num_classes), ipc).astype(np.int32)
  if init == "noise":
    return rng.standard_normal((num_classes * ipc, *images.shape[1:])).astype(np.float32), class_ids
  correct = None
  if init == "real_correct":
    if predict is None:
      raise ValueError("init='real_correct' needs predict(images) -> logits (an expert)")
    correct = np.argmax(predict(images), -1) == labels
  idx = select_real(rng, labels, num_classes, ipc, correct)
  return np.asarray(images[idx], np.float32), class_ids


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def datm_label_logits(expert_logits: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
  """DATM's initial label logits `[S, C]` from experts' logits `[E, S, C]`: the mean over the
  experts that predict `class_ids` correctly (over all experts for an image none gets right)."""
  correct = np.argmax(expert_logits, -1) == class_ids[None]          # [E, S]
  counts = correct.sum(0)
  weights = np.where(counts[None] > 0, correct, True).astype(np.float64)
  weights /= weights.sum(0, keepdims=True)
  return np.einsum("es,esc->sc", weights, expert_logits).astype(np.float32)


def init_labels(kind: str, class_ids: np.ndarray, num_classes: int,
                expert_logits: np.ndarray | None = None) -> np.ndarray:
  """Initial labels of `kind` ("hard", "probs", "logits").

  expert_logits: `[E, S, C]` logits of the synthetic images under E experts' final params
  (for "probs" only the first is used: TESLA's target expert).
  """
  if kind == "hard":
    return class_ids.astype(np.int32)
  if expert_logits is None:
    raise ValueError(f"label kind {kind!r} needs expert_logits [experts, images, classes]")
  if expert_logits.shape[1:] != (class_ids.shape[0], num_classes):
    raise ValueError(f"expert_logits must be [E, {class_ids.shape[0]}, {num_classes}], got "
                     f"{expert_logits.shape}")
  if kind == "probs":
    return softmax(expert_logits[0].astype(np.float64)).astype(np.float32)
  if kind == "logits":
    return datm_label_logits(expert_logits, class_ids)
  raise ValueError(f"label kind must be 'hard', 'probs' or 'logits', got {kind!r}")
