"""Character-level language-model distillation on the Python standard library's own source
(kd_jax.sequence.job): a 3-block teacher, then a 2-block, half-width student trained alone and
distilled four ways, all with one recipe (AdamW 3e-3, cosine, batch 32 × 64 characters; 1500
teacher and 800 student steps), fixed before any run and not tuned.

    python -m kd_jax.main --config=configs/stdlib_lm.py --workdir=/tmp/stdlib_lm

Args (comma-separated after `:`): `seed=N`; `runlocal` (a few steps, for CI); `arms=a+b` (a
subset of the arms below, joined by `+`); `tune` (score on the last training windows instead of
the validation files: the split for choosing hyperparameters).

The arms (each a `kd_jax.sequence.SequenceLoss`):
- `alone`: next-token cross-entropy;
- `token_kd`: ½ CE + ½ forward KL to the teacher per token (T = 1);
- `topk`: the same from the teacher's stored top-8 logits (tail mass as one bin);
- `minilm`: CE + MiniLM's attention and value-relation transfer, last block → last block;
- `on_policy`: ½ CE + ½ GKD's generalized JSD (β = 0.5) on the data for the first 400 steps;
  then half of each batch is the student's own continuation of its first 16 characters, scored
  by the teacher with the same divergence (GKD starts on-policy from a supervised student).
"""
import ml_collections

from configs import common

ARMS = ("alone", "token_kd", "topk", "minilm", "on_policy")


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, seed=0, arms="+".join(ARMS), tune=False)
  c = ml_collections.ConfigDict()
  c.job = "sequence"
  c.seed = args.seed

  c.data = ml_collections.ConfigDict()
  c.data.seq_length = 64        # characters per training window (and the models' max_len)
  c.data.batch_size = 32
  c.data.eval_batch_size = 128
  c.data.eval_on = "train_tail" if args.tune else "validation"
  c.data.tune_windows = 1024    # train windows held out when eval_on = "train_tail"
  c.data.eval_windows = 0       # score only the first N held-out windows (0 = all)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model_kwargs = {"width": 128, "depth": 3, "num_heads": 4, "mlp_dim": 512}
  c.teacher.num_steps = 1500
  c.teacher.learning_rate = 3e-3

  c.student = ml_collections.ConfigDict()
  c.student.model_kwargs = {"width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 256}
  c.student.num_steps = 800
  c.student.learning_rate = 3e-3

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100

  c.arms = tuple(args.arms.split("+"))
  c.losses = ml_collections.ConfigDict({
      "alone": {"ce_weight": 1.0},
      "token_kd": {"ce_weight": 0.5, "kd_weight": 0.5, "divergence": "forward_kl"},
      "topk": {"ce_weight": 0.5, "topk_weight": 0.5, "topk_tail": "bin"},
      "minilm": {"ce_weight": 1.0, "minilm_weight": 1.0, "minilm_relations": "attention_value"},
      "on_policy": {"ce_weight": 0.5, "kd_weight": 0.5, "divergence": "gjsd", "beta": 0.5,
                    "on_policy_fraction": 0.5, "on_policy_start_step": 400,
                    "prompt_length": 16},
  })
  c.topk = ml_collections.ConfigDict({"k": 8})

  c.samples = ml_collections.ConfigDict()
  c.samples.prompt = "def "
  c.samples.num_tokens = 60
  c.samples.temperature = 0.7   # sampled with the run's seed (0 = greedy)

  c.mesh = common.mesh_config()
  c.checkpoint = ml_collections.ConfigDict({"every_steps": 500, "keep": 2})
  c.log = ml_collections.ConfigDict({"every_steps": 100, "tensorboard": True})

  if args.runlocal:
    c.data.batch_size = 8
    c.data.eval_windows = 64
    c.data.tune_windows = 64
    c.teacher.model_kwargs = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}
    c.student.model_kwargs = {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
    c.teacher.num_steps = c.student.num_steps = 6
    c.losses.on_policy.on_policy_start_step = 3
    c.optim.warmup_steps = 2
    c.topk.k = 4
    c.checkpoint.every_steps = 3
    c.log.every_steps = 3
  c.lock()
  return c
