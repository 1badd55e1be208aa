"""Knowledge distillation on the embedded digits set (real data, offline, minutes on a CPU).

    python -m kd_jax.main --config=configs/digits_kd.py --workdir=/tmp/kd_digits

Trains a 32/64-channel CNN teacher, a label-only 16/32-channel student, and the same
student with Hinton KD, then prints their test accuracy. Recipe: SGD 0.05, momentum 0.9,
wd 5e-4, cosine decay, 30 epochs, ±1-pixel random shifts, same augmented view for both
networks. T=2 and α=0.5 were chosen on a validation split carved from train (train[:1100] /
train[1100:], 3 seeds) by `python benchmarks/digits_kd_sweep.py`, never on test.
Args (comma-separated after `:`): `runlocal` (a few steps, for CI), `validate` (evaluate on
train[1100:] and train on train[:1100]), `seed=N`.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, validate=False, seed=0)
  c = common.kd_config()
  c.seed = args.seed
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 500
  c.data.crop_padding = 1
  c.data.in_memory = True
  if args.validate:
    c.data.train_split, c.data.eval_split = "train[:1100]", "train[1100:]"
  c.teacher.model = "digits_cnn_teacher"
  c.student.model = "digits_cnn_student"
  c.teacher.num_epochs = 30
  c.student.num_epochs = 30
  c.checkpoint.every_steps = 200
  c.log.every_steps = 20
  c.distill.hparams.temperature = 2.0
  c.distill.alpha = 0.5
  if args.runlocal:
    c.teacher.num_epochs = c.student.num_epochs = 1
    c.checkpoint.every_steps = 8
    c.log.every_steps = 4
  c.lock()
  return c
