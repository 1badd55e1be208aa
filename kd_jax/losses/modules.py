"""Learnable parts of feature losses, as small Flax linen modules, plus CRD's memory bank.

Their params live next to the student's (`TrainState.distill_params`); the losses in
`features.py` / `relations.py` stay pure functions of these modules' outputs. BatchNorm
layers follow torch's defaults (momentum 0.1 → flax `momentum=0.9`, epsilon 1e-5), so
weights exported from the reference modules load one-to-one (see the tests).
"""
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.losses.features import l2_normalize


def _batch_norm(train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class HintRegressor(nn.Module):
  """FitNet/OFD regressor: conv (or dense for `[B, D]`) → BatchNorm → ReLU.

  Maps a student map `[B, H, W, Cs]` to the teacher's channel count with a stride-1
  'SAME' conv (torchdistill `ConvReg`, RepDistiller `ConvReg` for equal spatial sizes).
  OFD's connector is `HintRegressor(C_t, kernel_size=1, use_bias=False, use_relu=False)`.

  Attributes:
    features: output channels (the teacher's C).
    kernel_size: odd conv kernel size.
    use_bias: conv bias.
    use_batch_norm: add a BatchNorm.
    use_relu: end with a ReLU.
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  use_batch_norm: bool = True
  use_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if x.ndim == 2:
      x = nn.Dense(self.features, use_bias=self.use_bias)(x)
    else:
      x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), padding="SAME",
                  use_bias=self.use_bias)(x)
    if self.use_batch_norm:
      x = _batch_norm(train)(x)
    return nn.relu(x) if self.use_relu else x


class _FactorBlock(nn.Module):
  """3×3 stride-1 conv (or transposed conv) → BatchNorm → LeakyReLU(0.1), as in FT."""
  features: int
  kernel_size: int = 3
  transpose: bool = False
  use_batch_norm: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = nn.ConvTranspose if self.transpose else nn.Conv
    x = conv(self.features, (self.kernel_size, self.kernel_size), padding="SAME")(x)
    if self.use_batch_norm:
      x = _batch_norm(train)(x)
    return nn.leaky_relu(x, 0.1)


class Paraphraser(nn.Module):
  """FT paraphraser: a 3-conv encoder to `⌊rate·C⌋` channels and a mirrored decoder.

  Stage 1 trains it on the teacher map by reconstruction (`fitnet(recon, teacher_map)`);
  stage 2 freezes it and uses `encode` as the teacher factor of `factor_transfer`.
  Reference: torchdistill `Paraphraser4FactorTransfer(k=rate)`.

  Attributes:
    channels: C, the teacher map's channels.
    rate: paraphrase rate k (the paper's default 0.5).
  """
  channels: int
  rate: float = 0.5
  kernel_size: int = 3
  use_batch_norm: bool = True

  def setup(self):
    if not 0 < self.rate:
      raise ValueError(f"Paraphraser: rate must be > 0, got {self.rate}")
    factor = int(self.channels * self.rate)
    block = lambda c, t: _FactorBlock(c, self.kernel_size, t, self.use_batch_norm)
    self.encoder = [block(self.channels, False), block(factor, False), block(factor, False)]
    self.decoder = [block(factor, True), block(self.channels, True), block(self.channels, True)]

  def encode(self, x: jax.Array, *, train: bool) -> jax.Array:
    for layer in self.encoder:
      x = layer(x, train=train)
    return x

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns `(factor, reconstruction)`."""
    factor = self.encode(x, train=train)
    reconstruction = factor
    for layer in self.decoder:
      reconstruction = layer(reconstruction, train=train)
    return factor, reconstruction


class Translator(nn.Module):
  """FT translator: three conv blocks from the student map to the paraphraser's factor size.

  Reference: torchdistill `Translator4FactorTransfer` (C_in → C_in → C_out → C_out).
  """
  features: int
  kernel_size: int = 3
  use_batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for c in (x.shape[-1], self.features, self.features):
      x = _FactorBlock(c, self.kernel_size, False, self.use_batch_norm)(x, train=train)
    return x


class VIDRegressor(nn.Module):
  """VID's variational student: three bias-free 1×1 convs for μ and a learned σ² per channel.

  σ²_c = softplus(α_c) + eps, with α initialised so that σ² = `init_variance`.
  Reference: torchdistill `Regressor4VID` (RepDistiller `VIDLoss` defaults 5.0, 1e-5).
  Works on NHWC maps and on `[B, D]` (a 1×1 conv is a dense layer on the last axis).

  Returns:
    `(mean [..., features], variance [features])`, fed as
    `features.vid(mean, teacher_features, variance)`.
  """
  features: int
  hidden_features: int
  init_variance: float = 5.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if not self.init_variance > self.eps > 0:
      raise ValueError(f"VIDRegressor: need init_variance > eps > 0, got "
                       f"init_variance={self.init_variance}, eps={self.eps}")
    h = nn.relu(nn.Dense(self.hidden_features, use_bias=False)(x))
    h = nn.relu(nn.Dense(self.hidden_features, use_bias=False)(h))
    mean = nn.Dense(self.features, use_bias=False)(h)
    alpha0 = math.log(math.expm1(self.init_variance - self.eps))
    alpha = self.param("softplus_variance", nn.initializers.constant(alpha0), (self.features,))
    return mean, jax.nn.softplus(alpha) + self.eps


class CRDEmbed(nn.Module):
  """CRD embedding head: flatten → dense → L2 normalise (torchdistill `Normalizer4CRD`)."""
  features: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return l2_normalize(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))


@flax.struct.dataclass
class CRDMemory:
  """CRD's memory bank, carried functionally through training.

  Attributes:
    student: `[N, D]` bank of student embeddings (torchdistill `memory_v1`).
    teacher: `[N, D]` bank of teacher embeddings (`memory_v2`).
    z_student, z_teacher: NCE normalisers, −1 until the first batch sets them.
  """
  student: jax.Array
  teacher: jax.Array
  z_student: jax.Array
  z_teacher: jax.Array


def init_crd_memory(rng: jax.Array, num_data: int, embed_dim: int) -> CRDMemory:
  """Banks uniform in ±1/√(D/3) (as torchdistill/RepDistiller), normalisers unset.

  >>> init_crd_memory(jax.random.key(0), 100, 8).student.shape
  (100, 8)
  """
  if num_data < 1 or embed_dim < 1:
    raise ValueError(f"init_crd_memory: num_data and embed_dim must be >= 1, got "
                     f"{num_data}, {embed_dim}")
  bound = 1.0 / math.sqrt(embed_dim / 3)
  k1, k2 = jax.random.split(rng)
  bank = lambda k: jax.random.uniform(k, (num_data, embed_dim), jnp.float32, -bound, bound)
  unset = jnp.float32(-1.0)
  return CRDMemory(student=bank(k1), teacher=bank(k2), z_student=unset, z_teacher=unset)


def crd_contrast_indices(rng: jax.Array, indices: jax.Array, num_negatives: int,
                         num_data: int) -> jax.Array:
  """`[B, K + 1]` contrast indices: the positive first, then K uniform draws from the bank.

  torchdistill draws negatives uniformly with replacement (alias sampling of uniform
  unigrams); RepDistiller's `CIFAR100InstanceSample` draws them from other classes instead
  (pass those as `contrast_indices` to `crd` directly). RepDistiller's default K is 16384.

  >>> crd_contrast_indices(jax.random.key(0), jnp.array([4, 2]), 3, 10)[:, 0]
  Array([4, 2], dtype=int32)
  """
  if num_negatives < 1:
    raise ValueError(f"crd_contrast_indices: num_negatives must be >= 1, got {num_negatives}")
  indices = jnp.asarray(indices, jnp.int32)
  negatives = jax.random.randint(rng, (indices.shape[0], num_negatives), 0, num_data, jnp.int32)
  return jnp.concatenate([indices[:, None], negatives], axis=1)


def _nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch `interpolate(mode='nearest')` on NHWC: source index ⌊i·in/out⌋."""
  for axis, out in zip((1, 2), size):
    source = (jnp.arange(out) * x.shape[axis]) // out
    x = jnp.take(x, source, axis=axis)
  return x


class AttentionFusion(nn.Module):
  """ReviewKD attention-based fusion (ABF) of a student stage with the deeper residual.

  x ← BN(conv1×1(x)); if `use_attention`: r = nearest-upsample(residual) to x's size,
  (a, b) = σ(conv1×1([x, r])) and x ← a·x + b·r; out = BN(conv3×3(x)). Returns `(out, x)`:
  `out` goes to `features.hierarchical_context` against the teacher's stage, `x` is the
  residual for the next (shallower) stage.

  Chaining (deepest stage first; the deepest ABF has `use_attention=False`):
    out, res = abfs[0](feats[-1], train=train)
    for f, abf in zip(feats[-2::-1], abfs[1:]): out, res = abf(f, res, train=train)

  Reference: torchdistill `AttentionBasedFusion` / `Student4KnowledgeReview`.
  """
  mid_channels: int
  out_channels: int
  use_attention: bool

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    kaiming = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # kaiming_uniform(a=1)
    x = _batch_norm(train)(nn.Conv(self.mid_channels, (1, 1), use_bias=False, kernel_init=kaiming)(x))
    if self.use_attention:
      if residual is None:
        raise ValueError("AttentionFusion(use_attention=True) needs the deeper stage's residual")
      residual = _nearest_resize(residual, x.shape[1:3])
      gates = nn.sigmoid(nn.Conv(2, (1, 1))(jnp.concatenate([x, residual], axis=-1)))
      x = x * gates[..., :1] + residual * gates[..., 1:]
    out = nn.Conv(self.out_channels, (3, 3), padding="SAME", use_bias=False, kernel_init=kaiming)(x)
    return _batch_norm(train)(out), x
