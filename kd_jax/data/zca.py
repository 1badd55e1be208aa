"""ZCA whitening fitted on a training set, as kornia's `ZCAWhitening` that MTT uses.

With X the centred, flattened train images `[N, D]`, Σ = XᵀX / (N − 1) = U diag(S) Uᵀ::

  whiten(x)   = (x − μ) · U diag((S + ε)^−½) Uᵀ
  unwhiten(y) = y · U diag((S + ε)^½) Uᵀ + μ

MTT fits it with ε = 0.1 (kornia's `eps`) on the normalised train set and trains experts and
synthetic images in the whitened space; `unwhiten` is for display.
"""
from typing import NamedTuple

import numpy as np


class ZCA(NamedTuple):
  """A fitted whitening. mean `[D]`; whiten, unwhiten `[D, D]` (float32)."""
  mean: np.ndarray
  whiten: np.ndarray
  unwhiten: np.ndarray


def fit_zca(images: np.ndarray, *, regularization: float = 0.1) -> ZCA:
  """Fits ZCA on `images` `[N, H, W, C]` (computed in float64)."""
  if regularization <= 0:
    raise ValueError(f"ZCA regularization must be > 0, got {regularization}")
  if images.ndim < 2 or images.shape[0] < 2:
    raise ValueError(f"fit_zca needs at least 2 images [N, ...], got shape {images.shape}")
  flat = np.asarray(images, np.float64).reshape(images.shape[0], -1)
  mean = flat.mean(0)
  centred = flat - mean
  cov = centred.T @ centred / (flat.shape[0] - 1)
  eigvals, eigvecs = np.linalg.eigh(cov)
  eigvals = np.clip(eigvals, 0.0, None) + regularization
  whiten = (eigvecs * eigvals ** -0.5) @ eigvecs.T
  unwhiten = (eigvecs * eigvals ** 0.5) @ eigvecs.T
  return ZCA(mean.astype(np.float32), whiten.astype(np.float32), unwhiten.astype(np.float32))


def _check(zca: ZCA, images):
  if int(np.prod(images.shape[1:])) != zca.mean.shape[0]:
    raise ValueError(f"images of shape {tuple(images.shape)} do not match the ZCA fitted on "
                     f"{zca.mean.shape[0]} features per image")


def zca_apply(zca: ZCA, images: np.ndarray) -> np.ndarray:
  """Whitens `images` `[N, H, W, C]`; returns float32 of the same shape."""
  _check(zca, images)
  flat = np.asarray(images, np.float32).reshape(images.shape[0], -1)
  return ((flat - zca.mean) @ zca.whiten).reshape(images.shape)


def zca_inverse(zca: ZCA, images: np.ndarray) -> np.ndarray:
  """Undoes `zca_apply`; returns float32 `[N, H, W, C]`."""
  _check(zca, images)
  flat = np.asarray(images, np.float32).reshape(images.shape[0], -1)
  return (flat @ zca.unwhiten + zca.mean).reshape(images.shape)
