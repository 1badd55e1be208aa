"""The language-model distillation job: a character-level teacher on the Python standard
library's own source, then one student per arm, each scored in bits per character.

`run(config, workdir)` (configs/stdlib_lm.py) trains, each as a resumable `kd_jax.trainer`
stage:

- `teacher`: the larger `TransformerLM` with next-token cross-entropy;
- `student_<arm>` for each name in `config.arms`, with the `kd_jax.sequence.SequenceLoss` of
  `config.losses.<arm>` (e.g. `alone`: cross-entropy only; `token_kd`; `topk`, which reads the
  teacher's top-k cache built in `<workdir>/teacher_topk`; `minilm`; `on_policy`). Every student
  starts from the same initialisation and sees the same batches.

Each network is scored on `config.data.eval_on`: `validation` (held-out standard-library files,
the reported figures) or `train_tail` (the last `data.tune_windows` training windows, held out of
training: the split for choosing hyperparameters). Returns `{"rows": [{stage, model, params,
bpc, ...}], "samples": {stage: text}, "corpus": {...}}`, also written to `results.json`.
"""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpoint, experiment, models, optim, sharding, trainer
from kd_jax.models.transformer_lm import TransformerLM
from kd_jax.sequence import corpus as corpus_lib
from kd_jax.sequence import topk_cache
from kd_jax.sequence.method import SequenceDistiller, SequenceLoss
from kd_jax.sequence.sampling import sample
from kd_jax.step import cross_entropy

EVAL_ON = ("validation", "train_tail")


def evaluate_bpc(apply_fn, variables, batches, mesh_axes=(("data", -1),)) -> dict:
  """Bits per character (mean next-token cross-entropy / ln 2) over the real tokens of
  `batches` (`{"tokens" [B, L + 1], "mask" [B, L]}`)."""
  mesh = sharding.make_mesh(mesh_axes)

  @jax.jit
  def sums(variables, batch):
    out, _ = apply_fn(variables, batch["tokens"][:, :-1], train=False)
    ce = cross_entropy(out.logits, batch["tokens"][:, 1:])
    return jnp.sum(ce * batch["mask"]), jnp.sum(batch["mask"])

  total, count = 0.0, 0.0
  for batch in batches:
    s, c = sums(variables, sharding.shard_batch(batch, mesh))
    total, count = total + float(s), count + float(c)
  return {"bpc": total / max(count, 1.0) / math.log(2), "tokens": int(count)}


class _Job:
  """The corpus, the two models and the loop settings of one run."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    d = config.data
    if d.eval_on not in EVAL_ON:
      raise ValueError(f"data.eval_on={d.eval_on!r} is unknown; valid: {', '.join(EVAL_ON)}")
    self.corpus = corpus_lib.load_corpus()
    train = corpus_lib.windows(self.corpus.train, d.seq_length)
    if d.eval_on == "validation":
      self.train_windows, held_out = train, corpus_lib.windows(self.corpus.validation,
                                                               d.seq_length)
    else:
      if not d.batch_size <= d.tune_windows <= len(train) - d.batch_size:
        raise ValueError(f"data.tune_windows={d.tune_windows} must leave at least one batch on "
                         f"each side of the {len(train)} training windows")
      self.train_windows, held_out = train[:-d.tune_windows], train[-d.tune_windows:]
    self.eval_windows = held_out[:d.eval_windows] if d.eval_windows else held_out
    self.options = experiment.loop_options(config)
    self.process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    self.teacher = self._model(config.teacher, "teacher")
    self.student = self._model(config.student, "student")
    self.losses = {}
    for arm in config.arms:
      if arm not in config.losses:
        raise ValueError(f"arms names {arm!r}, which is not in losses; there are: "
                         f"{', '.join(config.losses)}")
      self.losses[arm] = SequenceLoss.from_config(config.losses[arm].to_dict(), f"losses.{arm}")
    self.rng = jax.random.PRNGKey(config.seed)

  def _model(self, model_config, field: str) -> TransformerLM:
    kwargs = dict(model_config.model_kwargs)
    try:
      module = TransformerLM(corpus_lib.VOCAB_SIZE, max_len=self.config.data.seq_length, **kwargs)
      if module.width % module.num_heads:
        raise ValueError(f"width={module.width} must be a multiple of num_heads="
                         f"{module.num_heads}")
    except (TypeError, ValueError) as e:
      raise ValueError(f"{field}.model_kwargs: {e}") from None
    return module

  def init(self, module: TransformerLM, seed_offset: int) -> dict:
    tokens = jnp.zeros((1, self.config.data.seq_length), jnp.int32)
    init = jax.jit(lambda rng: module.init(rng, tokens, train=False)["params"])  # one compile
    return {"params": init(jax.random.fold_in(self.rng, seed_offset))}

  def batches(self, seed: int, extra=None):
    batches = lambda start: corpus_lib.train_batches(
        self.train_windows, batch_size=self.config.data.batch_size, seed=seed, start_step=start,
        **self.process)
    return batches if extra is None else topk_cache.with_topk(batches, extra)

  def metadata(self, module: TransformerLM, loss: SequenceLoss) -> dict:
    return {"model": "transformer_lm", "model_kwargs": dict(self.config.student.model_kwargs)
            if module is self.student else dict(self.config.teacher.model_kwargs),
            "vocab_size": corpus_lib.VOCAB_SIZE, "seq_length": self.config.data.seq_length,
            "corpus": self.corpus.fingerprint, "eval_on": self.config.data.eval_on,
            "loss": dataclasses.asdict(loss)}

  def stage(self, name: str, module, loss: SequenceLoss, variables: dict, training) -> trainer.Stage:
    o = self.config.optim
    schedule = optim.make_schedule(name=o.schedule, learning_rate=training.learning_rate,
                                   total_steps=training.num_steps, steps_per_epoch=1,
                                   warmup_epochs=o.warmup_steps)
    tx = optim.make_optimizer(name=o.name, schedule=schedule, weight_decay=o.weight_decay)
    teacher = self.teacher if loss.uses_teacher else None
    return trainer.Stage(name, SequenceDistiller(module, loss, teacher), variables,
                         self.metadata(module, loss), tx, training.num_steps)

  def score(self, name: str, module, variables: dict) -> dict:
    batch = -(-self.config.data.eval_batch_size // jax.device_count()) * jax.device_count()
    bpc = evaluate_bpc(models.make_apply_fn(module), variables, corpus_lib.eval_batches(
        self.eval_windows, batch_size=batch, **self.process), self.options.mesh_axes)
    return {"stage": name, "model": "transformer_lm",
            "params": models.count_params(variables["params"]), **bpc}

  def generate(self, module, variables) -> str:
    s = self.config.samples
    prompt = jnp.asarray(corpus_lib.encode(s.prompt))[None]
    tokens = sample(module, variables["params"], prompt, s.num_tokens,
                    jax.random.PRNGKey(self.config.seed), temperature=s.temperature)
    return corpus_lib.decode(np.asarray(tokens[0]))


def _placeholder_topk(job: _Job, k: int) -> dict:
  """Zero top-k arrays shaped like the cache (broadcast views: no memory), for start-up checks."""
  rows, length = job.train_windows.shape[0], job.train_windows.shape[1] - 1
  return {name: np.broadcast_to(np.zeros((), dtype), shape)
          for name, (shape, dtype) in topk_cache.topk_specs(rows, length, k).items()}


def run(config, workdir: str) -> dict:
  """Trains the teacher and every arm's student; returns (and writes) the results."""
  job = _Job(config, workdir)
  teacher_init, student_init = job.init(job.teacher, 1), job.init(job.student, 2)
  s = config.samples
  if len(corpus_lib.encode(s.prompt)) + s.num_tokens > config.data.seq_length:
    raise ValueError(f"samples: the prompt ({len(s.prompt)} characters) plus num_tokens="
                     f"{s.num_tokens} exceed data.seq_length={config.data.seq_length}")
  stages = {arm: job.stage(f"student_{arm}", job.student, loss,
                           {"student": student_init, "teacher": teacher_init}, config.student)
            for arm, loss in job.losses.items()}
  for stage in stages.values():  # bad shapes or layers fail before anything trains
    trainer.check_stage(stage, job.batches(config.seed + 1, _placeholder_topk(job, config.topk.k)),
                        config.seed)

  teacher_stage = job.stage("teacher", job.teacher, SequenceLoss(), {"student": teacher_init},
                            config.teacher)
  teacher_vars = trainer.train(teacher_stage, workdir, job.batches(config.seed), job.options)
  rows = [job.score("teacher", job.teacher, teacher_vars)]
  samples = {"teacher": job.generate(job.teacher, teacher_vars)}
  for arm, stage in stages.items():
    cache = None
    if stage.method.spec.topk_weight:
      cache = topk_cache.build_topk_cache(
          os.path.join(workdir, "teacher_topk"), models.make_apply_fn(job.teacher), teacher_vars,
          job.train_windows, k=config.topk.k, temperature=stage.method.spec.temperature,
          batch_size=config.data.eval_batch_size, data_fingerprint=job.corpus.fingerprint)
    stage.variables = {**stage.variables, "teacher": teacher_vars}
    variables = trainer.train(stage, workdir, job.batches(config.seed + 1, cache), job.options)
    rows.append({**job.score(stage.name, job.student, variables), "arm": arm})
    samples[stage.name] = job.generate(job.student, variables)
  results = {"rows": rows, "samples": samples,
             "corpus": {"fingerprint": job.corpus.fingerprint,
                        "python_version": job.corpus.python_version,
                        "train_characters": int(job.train_windows[:, 1:].size),
                        "eval_on": config.data.eval_on,
                        "eval_characters": int(rows[0]["tokens"])}}
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results


def format_results(results: dict) -> str:
  """The table the job prints (bits per character on the held-out text), then each sample."""
  lines = [f"{'stage':<24} {'params':>9} {'bpc':>7}   ({results['corpus']['eval_on']}, "
           f"{results['corpus']['eval_characters']:,} characters)", "-" * 64]
  lines += [f"{r['stage']:<24} {r['params']:>9,} {r['bpc']:>7.4f}" for r in results["rows"]]
  for stage, text in results["samples"].items():
    lines += ["", f"--- {stage} ---", text]
  return "\n".join(lines)
