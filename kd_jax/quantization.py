"""Quantized students: k-bit weights in the forward pass, full-precision shadows trained through
a straight-through estimator (Polino, Pascanu & Alistarh, "Model compression via distillation
and quantization", ICLR 2018; reference: github.com/antspy/quantized_distillation).

Quantization of one params leaf (the reference's `uniformQuantization` with linear scaling):
the leaf is flattened (row-major) and cut into buckets of `bucket_size` consecutive values, the
last bucket padded with its last value. Each bucket is scaled to [0, 1] by its minimum β and
range α = max − min (α = 1 for a constant bucket), each value goes to the nearest of L = 2^k
points, and the quantized value is β + α·point. Uniform quantization has the points j/(L − 1),
j = 0..L − 1, with deterministic rounding (the paper's experiments); the exported weights are
the integer codes j, α and β per bucket.

Training: the forward pass sees q = Q(w) and the gradient at q updates the full-precision
shadows w (straight-through, ∂L/∂w := ∂L/∂q; the scaling gets no gradient), as the reference's
default `backprop_quantization_style='none'`.

Differentiable quantization (§4 of the paper, `learned_points`): each quantized leaf has its own
L points, trainable, starting at the uniform ones. ∂L/∂p_i = Σ_{j: code_j = i} α_j·∂L/∂q_j (the
reference's `nonUniformQuantization_variable.backward`); after every update the points are sorted
(as the reference does) and clipped to [0, 1], the scaled range (the reference leaves them free;
on digits a 2-bit KD student at lr 0.1 then diverged). Unlike the reference, which alternates
epochs that train the weights with epochs that train the points, both are trained every step.

Which leaves are quantized: every leaf of the params tree (weights and biases: the reference
quantizes every parameter), except those whose path (`"dense1/kernel"`) matches the regex
`full_precision`; the reference's experiments keep the first and last layer at full precision
(e.g. `full_precision="^(conv1|head)/"`). Model state (BatchNorm statistics) is not quantized.
"""
import dataclasses
import functools
import io
import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpoint
from kd_jax.step import TrainState

METHODS = ("uniform", "differentiable")
POINTS = "quantization"  # the trainable part that holds the learned points
_FLOAT_BITS = 32          # α, β and learned points are stored as float32


def _flat(params) -> dict[str, jax.Array]:
  return flax.traverse_util.flatten_dict(params, sep="/")


def _unflat(flat: dict):
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _num_buckets(size: int, bucket_size: int) -> int:
  return -(-size // bucket_size)


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """k-bit quantization of a params tree (see the module docstring).

  Attributes:
    bits: k, 1..16; each quantized weight takes one of 2^k values.
    bucket_size: values per min–max scaling bucket (the reference's experiments: 256).
    full_precision: regex of the leaf paths kept in float32 ("" keeps none).
    learned_points: differentiable quantization (trainable points per leaf).
  """
  bits: int
  bucket_size: int = 256
  full_precision: str = ""
  learned_points: bool = False

  def __post_init__(self):
    if not 1 <= self.bits <= 16:
      raise ValueError(f"bits must be in 1..16 (0 turns quantization off), got {self.bits}")
    if self.bucket_size < 1:
      raise ValueError(f"bucket_size must be >= 1, got {self.bucket_size}")
    try:
      re.compile(self.full_precision)
    except re.error as e:
      raise ValueError(f"full_precision={self.full_precision!r} is not a regex ({e})") from None

  @property
  def levels(self) -> int:
    return 2 ** self.bits

  def quantized_paths(self, params) -> list[str]:
    """The paths of the leaves of `params` that are quantized."""
    return [path for path in _flat(params)
            if not (self.full_precision and re.search(self.full_precision, path))]

  def init_points(self, params) -> dict:
    """Uniform initial points `{path tree: [L]}` for the quantized leaves (learned points)."""
    return _unflat({path: jnp.linspace(0.0, 1.0, self.levels)
                    for path in self.quantized_paths(params)})

  def _encode_leaf(self, x: jax.Array, points: jax.Array | None):
    flat = jnp.ravel(x).astype(jnp.float32)
    buckets = _num_buckets(flat.size, self.bucket_size)
    padded = jnp.pad(flat, (0, buckets * self.bucket_size - flat.size), mode="edge")
    padded = padded.reshape(buckets, self.bucket_size)
    offset = padded.min(axis=1)
    scale = padded.max(axis=1) - offset
    scale = jnp.where(scale < 1e-10, 1.0, scale)
    unit = (padded - offset[:, None]) / scale[:, None]
    if points is None:  # ties round up, in both branches
      codes = jnp.floor(unit * (self.levels - 1) + 0.5)
    else:
      codes = jnp.searchsorted((points[1:] + points[:-1]) / 2, unit, side="right")
    return codes.astype(jnp.int32).ravel()[:flat.size].reshape(x.shape), scale, offset

  def _decode_leaf(self, codes, scale, offset, points):
    unit = codes / (self.levels - 1) if points is None else points[codes]
    bucket = jnp.arange(codes.size).reshape(codes.shape) // self.bucket_size
    return offset[bucket] + scale[bucket] * unit

  @functools.partial(jax.jit, static_argnums=0)
  def encode(self, params, points=None) -> dict:
    """`{path: (codes int32 [leaf shape], scale [B], offset [B])}` of the quantized leaves of
    `params` over their B buckets; `points` the learned points tree (sorted) or None."""
    flat, flat_points = _flat(params), _flat(points) if points is not None else {}
    return {path: self._encode_leaf(flat[path], flat_points.get(path))
            for path in self.quantized_paths(params)}

  @functools.partial(jax.jit, static_argnums=0)
  def decode(self, encoded: dict, points=None) -> dict:
    """`{path: β + α·point}` (float32) of `encode`'s output."""
    flat_points = _flat(points) if points is not None else {}
    return {path: self._decode_leaf(*parts, flat_points.get(path))
            for path, parts in encoded.items()}

  @functools.partial(jax.jit, static_argnums=0)
  def __call__(self, params, points=None):
    """`params` with every quantized leaf replaced by its quantized value; the gradient passes
    straight through to the leaf (and reaches `points`, the learned points tree, when given)."""
    sg = jax.lax.stop_gradient
    values = self.decode(self.encode(sg(params), sg(points)), points)
    return _unflat({path: (values[path] + (w - sg(w))).astype(w.dtype) if path in values else w
                    for path, w in _flat(params).items()})

  def size_bits(self, params) -> int:
    """Bits to store `params` quantized: k per quantized value, α and β per bucket (and the L
    points per leaf when learned) in float32, kept leaves at their own width."""
    quantized = set(self.quantized_paths(params))
    total = 0
    for path, w in _flat(params).items():
      if path in quantized:
        total += w.size * self.bits + 2 * _FLOAT_BITS * _num_buckets(w.size, self.bucket_size)
        total += _FLOAT_BITS * self.levels if self.learned_points else 0
      else:
        total += w.size * np.dtype(w.dtype).itemsize * 8
    return int(total)


def model_bits(params) -> int:
  """Bits of `params` stored as they are (32 per float32 value)."""
  return int(sum(x.size * np.dtype(x.dtype).itemsize * 8 for x in jax.tree.leaves(params)))


class Quantized:
  """`method` (a `kd_jax.step.Method`) whose student runs with quantized weights.

  `trainable["student"]` holds the full-precision shadows; with learned points,
  `trainable["quantization"]` holds the points (a part with its own optimizer, see
  `kd_jax.step.per_part_optimizer`).
  """

  def __init__(self, method, quantizer: Quantizer):
    self.method, self.quantizer = method, quantizer

  @property
  def evolving_frozen(self) -> tuple[str, ...]:
    return self.method.evolving_frozen

  @property
  def ascending_parts(self) -> tuple[str, ...]:
    return getattr(self.method, "ascending_parts", ())

  def init(self, rng, variables, batch):
    trainable, frozen, extra = self.method.init(rng, variables, batch)
    if POINTS in trainable:
      raise ValueError(f"{POINTS!r} is the quantization points' part; rename the term that uses it")
    if not self.quantizer.quantized_paths(trainable["student"]):
      raise ValueError(f"student.quantize.full_precision={self.quantizer.full_precision!r} "
                       "matches every parameter of the student; nothing would be quantized")
    if self.quantizer.learned_points:
      trainable = {**trainable, POINTS: self.quantizer.init_points(trainable["student"])}
    return trainable, frozen, extra

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """`method.loss` with the student's params quantized (the points part removed)."""
    trainable = {k: v for k, v in trainable.items() if k != POINTS} | {
        "student": self.quantizer(trainable["student"], trainable.get(POINTS))}
    return self.method.loss(trainable, frozen, extra, batch, step, rng)

  def after_update(self, old: TrainState, new: TrainState) -> TrainState:
    new = self.method.after_update(old, new)
    if POINTS not in new.trainable:
      return new
    return new.replace(trainable={**new.trainable, POINTS: jax.tree.map(
        lambda p: jnp.clip(jnp.sort(p), 0.0, 1.0), new.trainable[POINTS])})


def export(path: str, quantizer: Quantizer, params, points=None) -> None:
  """Writes the quantized `params` to the `.npz` file `path` atomically: per quantized leaf
  `<leaf path>.codes` (uint8/uint16), `.scale` and `.offset` `[buckets]` (and `.points` `[L]`
  when learned), kept leaves as they are, and the settings; `load` reads it back."""
  arrays = {"@bits": np.int64(quantizer.bits), "@bucket_size": np.int64(quantizer.bucket_size)}
  encoded = jax.device_get(quantizer.encode(params, points))
  flat_points = _flat(points) if points is not None else {}
  for leaf, w in _flat(params).items():
    if leaf not in encoded:
      arrays[leaf] = np.asarray(w)
      continue
    codes, arrays[f"{leaf}.scale"], arrays[f"{leaf}.offset"] = encoded[leaf]
    arrays[f"{leaf}.codes"] = codes.astype(np.uint8 if quantizer.bits <= 8 else np.uint16)
    if leaf in flat_points:
      arrays[f"{leaf}.points"] = np.asarray(flat_points[leaf])
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  checkpoint.atomic_write(path, buffer.getvalue())


def load(path: str):
  """The params tree of a file written by `export`, quantized leaves decoded to float32."""
  with np.load(path) as f:
    arrays = dict(f)
  quantizer = Quantizer(int(arrays.pop("@bits")), int(arrays.pop("@bucket_size")))
  leaves = {name[:-len(".codes")] for name in arrays if name.endswith(".codes")}
  encoded = {leaf: (arrays.pop(f"{leaf}.codes").astype(np.int32), arrays.pop(f"{leaf}.scale"),
                    arrays.pop(f"{leaf}.offset")) for leaf in leaves}
  points = {leaf: arrays.pop(f"{leaf}.points") for leaf in leaves if f"{leaf}.points" in arrays}
  return _unflat({**arrays, **jax.device_get(quantizer.decode(encoded, _unflat(points)))})
