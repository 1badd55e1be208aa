"""What every job builds from a config: data, batches, models, optimizers, loop options.

`Experiment(config)` reads the `data`, `optim`, `precision`, `log`, `checkpoint` and `mesh`
groups of a job config (configs/common.py:kd_config); the KD job and the regimes job build
their stages from it, so both read a config the same way.
"""
import dataclasses

import jax

from kd_jax import data, models, optim, precision, trainer


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one network trains: shift augmentation, peak learning rate, epochs."""
  crop_padding: int
  learning_rate: float
  num_epochs: int

  def __str__(self) -> str:
    shifts = f"shift ±{self.crop_padding}" if self.crop_padding else "no shift"
    return f"{shifts}, lr {self.learning_rate:g}, {self.num_epochs} ep"

  @property
  def slug(self) -> str:
    return f"crop{self.crop_padding}_lr{self.learning_rate:g}_ep{self.num_epochs}"


class Experiment:
  """Data sources, batch iterators, models and optimizers of one job config.

  Attributes:
    config: the job config.
    info: `data.DatasetInfo` of `config.data.name` (classes, image shape, mean/std).
    train_source, eval_source: the train and eval splits (in memory if `data.in_memory`).
    options: `trainer.LoopOptions` from the config's seed, log, checkpoint and mesh groups.
  """

  def __init__(self, config):
    self.config = config
    self.dtype = precision.compute_dtype(config.precision)
    data_dir = config.data.data_dir or None
    self.info = data.dataset_info(config.data.name, data_dir)
    self.train_source, self.eval_source = (
        self._open(split, data_dir) for split in (config.data.train_split, config.data.eval_split))
    if config.data.batch_size > len(self.train_source):
      raise ValueError(f"data.batch_size={config.data.batch_size} exceeds the "
                       f"{len(self.train_source)} examples of {config.data.name}:"
                       f"{config.data.train_split}; lower it")
    self.process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    self.options = loop_options(config)

  def _open(self, split: str, data_dir):
    if self.config.data.in_memory:
      return data.ArrayDataSource(*data.load_arrays(self.config.data.name, split, data_dir))
    return data.open_source(self.config.data.name, split, data_dir)

  def split_train(self, examples: int, field: str, hint: str = ""):
    """`(fit, held_out)`: the train split without and with only its last `examples` examples;
    an error names `field` unless each side holds at least one batch."""
    n, batch = len(self.train_source), self.config.data.batch_size
    if not batch <= examples <= n - batch:
      raise ValueError(f"{field}={examples} must leave at least one batch on each side of the "
                       f"{n} train examples{hint}")
    return (data.subset(self.train_source, range(n - examples)),
            data.subset(self.train_source, range(n - examples, n)))

  def build(self, model_name: str, model_kwargs: dict, field: str, rng):
    """Creates a model; returns `(apply_fn, variables, metadata)`; errors name `field`."""
    if not model_name:
      raise ValueError(f"{field} is empty; choose one of: {', '.join(models.list_models())}")
    try:
      module = models.create_model(model_name, num_classes=self.info.num_classes,
                                   dtype=self.dtype, **model_kwargs)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{field}: {e}") from None
    image_shape = tuple(self.info.image_shape)
    params, model_state = models.init_model(module, rng, (1, *image_shape))
    metadata = {"model": model_name, "model_kwargs": model_kwargs,
                "num_classes": self.info.num_classes, "image_shape": list(image_shape)}
    return models.make_apply_fn(module), {"params": params, **model_state}, metadata

  def train_batches(self, source, seed: int, crop_padding: int):
    """`start -> iterator` of training batches of `source` (shifts of `crop_padding` pixels)."""
    augment = data.AugmentConfig(crop_padding=crop_padding, flip=self.config.data.flip)
    return lambda start: data.train_batches(
        source, batch_size=self.config.data.batch_size, seed=seed, start_step=start,
        augment=augment, mean=self.info.mean, std=self.info.std, **self.process)

  def eval_batches(self, source=None):
    """Evaluation batches of `source` (default: the eval split), padded to whole shards."""
    size = -(-self.config.data.eval_batch_size // jax.device_count()) * jax.device_count()
    return data.eval_batches(self.eval_source if source is None else source, batch_size=size,
                             mean=self.info.mean, std=self.info.std, **self.process)

  def evaluate(self, apply_fn, variables, source=None) -> dict:
    """`trainer.evaluate` on `source` (default: the eval split)."""
    return trainer.evaluate(apply_fn, variables, self.eval_batches(source),
                            self.options.mesh_axes)

  def make_tx(self, learning_rate: float, num_epochs: int, num_examples: int):
    """The config's optimizer and schedule for `num_epochs` over `num_examples`; returns
    `(tx, total_steps)`."""
    steps_per_epoch = data.steps_per_epoch(num_examples, self.config.data.batch_size)
    total = num_epochs * steps_per_epoch
    o = self.config.optim
    schedule = optim.make_schedule(name=o.schedule, learning_rate=learning_rate,
                                   total_steps=total, steps_per_epoch=steps_per_epoch,
                                   decay_epochs=o.decay_epochs, decay_rate=o.decay_rate,
                                   warmup_epochs=o.warmup_epochs)
    return optim.make_optimizer(name=o.name, schedule=schedule, momentum=o.momentum,
                                nesterov=o.nesterov, weight_decay=o.weight_decay), total


def loop_options(config) -> trainer.LoopOptions:
  """`trainer.LoopOptions` from a job config's `seed`, `log`, `checkpoint` and `mesh` groups."""
  return trainer.LoopOptions(
      seed=config.seed, log_every=config.log.every_steps,
      checkpoint_every=config.checkpoint.every_steps, keep_checkpoints=config.checkpoint.keep,
      tensorboard=config.log.tensorboard, mesh_axes=tuple(map(tuple, config.mesh.axes)),
      mesh_rules=tuple(map(tuple, config.mesh.rules)))


def format_table(rows: list[dict]) -> str:
  """The table a job prints: each row's stage, model, size, test accuracy and recipe; with an
  omitted class (KD job) also the accuracy on that class and the `+bias` rows' fitted bias; with
  quantized students their size in bits and their full-precision shadows' accuracy."""
  omitted = "omitted_class_accuracy" in rows[0]
  quantized = any("full_precision_accuracy" in r for r in rows)
  header = f"{'stage':<28} {'model':<20} {'params':>8} {'test acc':>9}"
  header += f" {'omitted':>8} {'bias':>5}" if omitted else ""
  header += f" {'bits':>10} {'f32 acc':>8}" if quantized else ""
  lines = [header + "  recipe", "-" * (len(header) + 31)]
  for r in rows:
    line = f"{r['stage']:<28} {r['model']:<20} {r['params']:>8,} {100 * r['accuracy']:>8.2f}%"
    if omitted:
      bias = f"{r['class_bias']:>5.2f}" if "class_bias" in r else " " * 5
      line += f" {100 * r['omitted_class_accuracy']:>7.2f}% {bias}"
    if quantized:
      shadows = r.get("full_precision_accuracy")
      line += f" {r.get('bits', 0):>10,} " + (f"{100 * shadows:>7.2f}%" if shadows is not None
                                               else " " * 8)
    lines.append(f"{line}  {r.get('recipe', '')}")
  return "\n".join(lines)

