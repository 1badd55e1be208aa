"""The distilled set on disk: `distilled.npz` (allow_pickle=False) + `distilled.json`.

Arrays: `images` `[S, H, W, C]` float32 (in the space the experts trained in: normalised, and
ZCA-whitened when `metadata["zca"]` is set), `labels` the training targets (`[S]` class ids or
`[S, C]` probabilities), `lr` the learned step size α (scalar), and for DATM also
`label_logits` `[S, C]`. `images`/`labels` are what `kd_jax.data.ArrayDataSource.from_npz`
reads, so any kd_jax training can use the set (pass mean=None: images are already normalised).
Written atomically.
"""
import json
import os
from pathlib import Path

import numpy as np

import kd_jax
from kd_jax.checkpoint import atomic_write_json
from kd_jax.dataset_distill.experts import check_metadata

ARRAYS = "distilled.npz"
METADATA = "distilled.json"


def save_distilled(directory, *, images: np.ndarray, labels: np.ndarray, lr: float,
                   metadata: dict, label_logits: np.ndarray | None = None) -> Path:
  """Writes the set; `metadata` (JSON-able) should name the dataset, model, ipc, label kind,
  normalisation and ZCA. Returns the `.npz` path."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {"images": np.asarray(images, np.float32), "labels": np.asarray(labels),
            "lr": np.asarray(lr, np.float32)}
  if label_logits is not None:
    arrays["label_logits"] = np.asarray(label_logits, np.float32)
  tmp = directory / (ARRAYS + ".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, directory / ARRAYS)
  atomic_write_json(directory / METADATA, {
      **metadata, "kd_jax_version": kd_jax.__version__,
      "num_images": int(arrays["images"].shape[0]),
      "image_shape": list(arrays["images"].shape[1:]),
      "label_shape": list(arrays["labels"].shape[1:])})
  return directory / ARRAYS


def load_distilled(directory, expected: dict | None = None) -> tuple[dict, dict]:
  """Returns (arrays, metadata); checks shapes against the metadata and `expected` fields."""
  directory = Path(directory)
  metadata = json.loads((directory / METADATA).read_text())
  if expected is not None:
    check_metadata(metadata, expected, f"distilled set {directory / METADATA}")
  with np.load(directory / ARRAYS, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  shape = [metadata["num_images"], *metadata["image_shape"]]
  if list(arrays["images"].shape) != shape:
    raise ValueError(f"{directory / ARRAYS} images have shape {arrays['images'].shape}, "
                     f"metadata says {shape}")
  return arrays, metadata
