"""Config blocks shared by the experiment configs, and `:arg` parsing (`runlocal`, `seed=3`)."""
import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"runlocal,seed=3"` into a ConfigDict over `defaults` (flags without `=` are True).

  Unknown names raise `ValueError` listing the valid ones.
  """
  parsed = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if not value:
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      parsed[key] = type(default)(value) if default is not None else value
  return ml_collections.ConfigDict(parsed)


def mesh_config() -> ml_collections.ConfigDict:
  """The `mesh` group (kd_jax.sharding): device axes, parameter rules, multi-host start-up."""
  c = ml_collections.ConfigDict()
  c.axes = (("data", -1),)  # -1: all remaining devices
  c.rules = ()              # ((param-path regex, partition spec tuple), ...)
  # CPU only: -1 = one host device per core (as many as divide the batch sizes), 0 = XLA's
  # single device, N = N devices (kd_jax.sharding.use_host_cores). GPU/TPU are unaffected.
  c.cpu_devices = -1
  # Multi-host (jax.distributed); empty/0/-1 fall back to JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID, and to a single process when none is set.
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  return c


def term(loss: str, **fields) -> ml_collections.ConfigDict:
  """One `distill.terms` entry (see kd_jax.distiller.Term for the fields)."""
  return ml_collections.ConfigDict({"loss": loss, **fields})


def kd_terms(*, ce_weight: float, kd_weight: float, temperature: float) -> tuple:
  """Hinton KD: ce_weight·CE + kd_weight·KD(T)."""
  return (term("ce", weight=ce_weight),
          term("kd", weight=kd_weight, hparams={"temperature": temperature}))


def kd_config() -> ml_collections.ConfigDict:
  """The knowledge-distillation job: teacher → label-only baseline student → KD student."""
  c = ml_collections.ConfigDict()
  c.job = "kd"
  c.seed = 0
  c.precision = "float32"  # or "bfloat16": bf16 compute, f32 params and loss.

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"        # embedded; or any TFDS name prepared in data_dir (array_record)
  c.data.data_dir = ""          # "" = TFDS default (~/tensorflow_datasets)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.in_memory = False      # load the splits into RAM (small datasets: ~70x faster batches)
  c.data.batch_size = 64        # global batch
  c.data.eval_batch_size = 256
  c.data.crop_padding = 0       # random crop after zero padding by this many pixels
  c.data.flip = False           # random horizontal flip
  # Data pruning of the students' transfer set (kd_jax.data.pruning); the teacher keeps all of
  # train. Scores: random, or el2n / forgetting from `score_runs` runs of the teacher's
  # architecture for `score_epochs` epochs on that set.
  c.data.prune = ml_collections.ConfigDict()
  c.data.prune.fraction = 0.0   # the fraction of the transfer set removed (0: no pruning)
  c.data.prune.score = "random"  # random | el2n | forgetting
  c.data.prune.keep = "hardest"  # hardest | easiest: which end of the scores is kept
  c.data.prune.score_epochs = 3
  c.data.prune.score_runs = 3

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = ""
  c.teacher.model_kwargs = ml_collections.ConfigDict()  # extra create_model arguments
  c.teacher.num_epochs = 1
  c.teacher.checkpoint = ""     # a trained teacher's checkpoint dir: skips teacher training
  c.teacher.on_label_subset = False  # train the teacher on the students' labeled fraction too
  # The KD step reads the teacher's logits, cached per step and row (kd_jax.teacher_cache), instead
  # of running it: "" (off), "float32", "float16" or "top<k>" (k logits per row, e.g. "top10").
  c.teacher.cache = ""

  c.student = ml_collections.ConfigDict()
  c.student.model = ""
  c.student.model_kwargs = ml_collections.ConfigDict()
  c.student.num_epochs = 1
  c.student.baseline = True     # also train the label-only baseline student
  c.student.omit_class = -1     # leave this class out of the students' transfer set (Hinton §3)
  c.student.label_fraction = 1.0  # the students train on this stratified fraction of train
  # k-bit weights in both students' forward pass, full-precision shadows trained through a
  # straight-through estimator (kd_jax.quantization; Polino et al. 2018).
  c.student.quantize = ml_collections.ConfigDict()
  c.student.quantize.bits = 0   # 0: full precision
  c.student.quantize.method = "uniform"  # or "differentiable": learned quantization points
  c.student.quantize.bucket_size = 256   # values per min-max scaling bucket
  c.student.quantize.full_precision = ""  # regex of param paths kept in float32 ("^head/")
  c.student.quantize.points_learning_rate = 1e-4  # differentiable: SGD, momentum 0.9, Nesterov

  # Each student arm's recipe is chosen on validation: every (crop_padding, learning_rate,
  # num_epochs) of this grid trains on train minus its last `validation_examples` examples and
  # is scored on them; 0 skips tuning (data.crop_padding, optim.learning_rate,
  # student.num_epochs are then the students' recipe).
  c.tune = ml_collections.ConfigDict()
  c.tune.validation_examples = 0
  c.tune.crop_padding = (0,)
  c.tune.learning_rate = (0.05,)
  c.tune.num_epochs = (1,)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"
  c.optim.learning_rate = 0.05
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "cosine"   # constant | cosine | step
  c.optim.decay_epochs = ()
  c.optim.decay_rate = 0.1
  c.optim.warmup_epochs = 0.0

  c.distill = ml_collections.ConfigDict()
  # The KD student's loss: Σ weight·term. Each term is a dict with `loss` (a name in
  # kd_jax.losses.list_losses(), or "ce" for the task loss) and optionally `weight`,
  # `warmup_steps`, `hparams`, `student`/`teacher` taps ("logits" or a feature name),
  # `adapter`, `options`, `name` (see kd_jax.distiller.Term).
  c.distill.terms = kd_terms(ce_weight=0.1, kd_weight=0.9, temperature=4.0)

  c.mesh = mesh_config()

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.tensorboard = True
  return c


def cifar100_kd_config(teacher: str, student: str, *, learning_rate: float = 0.05,
                       runlocal: bool = False) -> ml_collections.ConfigDict:
  """RepDistiller/mdistiller CIFAR-100 recipe: 240 epochs, SGD 0.05 (0.01 for
  MobileNet/ShuffleNet students), ×0.1 at 150/180/210, wd 5e-4, batch 64, T=4,
  loss 0.1·CE + 0.9·KD (the config's default terms). `runlocal` shrinks it to mock-sized data for a laptop/CI."""
  c = kd_config()
  c.data.name = "cifar100"
  c.data.crop_padding = 4
  c.data.flip = True
  c.data.batch_size = 64
  c.teacher.model, c.student.model = teacher, student
  c.teacher.num_epochs = c.student.num_epochs = 240
  c.optim.learning_rate = learning_rate
  c.optim.schedule = "step"
  c.optim.decay_epochs = (150, 180, 210)
  c.checkpoint.every_steps = 2000
  c.log.every_steps = 200
  if runlocal:
    c.data.train_split = "train[:128]"
    c.data.eval_split = "test[:64]"
    c.data.batch_size = 16
    c.data.eval_batch_size = 32
    c.teacher.num_epochs = c.student.num_epochs = 1
    c.optim.decay_epochs = ()
    c.checkpoint.every_steps = 4
    c.log.every_steps = 2
  return c
