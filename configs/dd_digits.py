"""Dataset distillation on the embedded digits set (2 CPU cores, minutes): every method.

    python -m kd_jax.main --config=configs/dd_digits.py:ipc10 --workdir=/tmp/dd_digits_ipc10

    python -m kd_jax.main --config=configs/dd_digits.py:ipc10,method=dm,teacher_labels \
        --workdir=/tmp/dd_digits_dm_ipc10

Args (comma-separated after `:`): `ipc1` | `ipc10` | `ipc50` (default ipc10), `method=NAME`
(mtt, dc, dm, sre2l, rded, infer; default mtt), `datm` (trajectory matching with DATM's learned
soft labels, correctly classified initial images and a widening start window),
`teacher_labels` (also evaluate with teacher soft labels), `runlocal` (tiny settings for CI),
`seed=N`, `experts=DIR` (share one expert buffer between runs), `teacher_dir=DIR` (share one
teacher between runs).

Model: MTT's ConvNet (instance norm, average pooling) at depth 2, width 32. Digits are 8×8×1:
depth 3 would pool to 1×1 and width 128 costs 16× the compute of width 32 for no gain on 1,300
8×8 images; depth 2 ends on a 2×2×32 map (~12k params).
Experts: MTT's recipe (SGD 0.01, no momentum, DSA) with batch 64 instead of 256: 1,300 images
give only 5 steps per epoch at 256, too few to move in a few epochs.
Teacher (sre2l, rded, infer and the teacher protocol): ConvNet depth 2, width 64, BatchNorm,
30 epochs of SGD 0.05 (cosine), ±1-pixel shifts.
`dd_config()` is the block shared by the dd_* configs (field meanings: kd_jax/dataset_distill/run.py).
"""
import dataclasses

import ml_collections

from configs import common
from kd_jax.dataset_distill import methods


def dd_config() -> ml_collections.ConfigDict:
  """Every field of the distill_dataset job, with MTT's defaults where MTT has one."""
  c = ml_collections.ConfigDict()
  c.job = "distill_dataset"
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name="digits", data_dir="", train_split="train", test_split="test", zca=False,
      zca_regularization=0.1))
  c.model = ml_collections.ConfigDict(dict(
      name="convnet", kwargs=ml_collections.ConfigDict(dict(depth=3, width=128)),))
  c.dsa = ml_collections.ConfigDict(dict(
      enabled=True, strategy="color_crop_cutout_flip_scale_rotate", mode="single"))
  c.experts = ml_collections.ConfigDict(dict(
      num_experts=100, epochs=50, lr=0.01, batch_size=256, directory=""))
  c.distill = ml_collections.ConfigDict(dict(
      method="mtt", ipc=10, iterations=5000, syn_steps=30, expert_epochs=2, min_start_epoch=0,
      current_max_start_epoch=20, max_start_epoch=20, expansion_end_epoch=0, batch_syn=0,
      lr_img=1000.0, lr_lr=1e-5, lr_label=2.0, momentum_label=0.9, lr_init=0.01,
      image_init="real", label_kind="hard", mode="exact", threshold=0.0, segments=1,
      keep_every=1))
  for name, cls in method_classes().items():  # each method's own fields, its defaults
    c[name] = ml_collections.ConfigDict(method_defaults(cls))
  c.method_kwargs = ml_collections.ConfigDict()  # a user's distill.method="pkg.mod:Class"
  c.teacher = ml_collections.ConfigDict(dict(
      model=ml_collections.ConfigDict(dict(
          name="convnet", kwargs=ml_collections.ConfigDict(dict(depth=3, width=128,
                                                                norm="batchnorm")))),
      epochs=30, lr=0.05, batch_size=64, weight_decay=5e-4, crop_padding=1, directory=""))
  c.mesh = common.mesh_config()
  c.eval = ml_collections.ConfigDict(dict(
      num_nets=5, epochs=1000, batch_size=256, fixed_lr=0.01, every=1000, curve_nets=5,
      full_data_epochs=0, vectorize=True, protocols=("labels",), temperature=4.0))
  return c


def method_classes() -> dict:
  """The registered methods configured by a section of their own (all but trajectory
  matching, which reads `distill`)."""
  return {name: methods.method_class(name) for name in methods.METHODS if name != "mtt"}


def method_defaults(cls) -> dict:
  """A method dataclass's init fields with their defaults (fields without one are left out:
  the config must set them)."""
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.init and f.name != "name" and f.default is not dataclasses.MISSING}


def get_config(arg=None):
  args = common.parse_arg(arg, ipc1=False, ipc10=False, ipc50=False, runlocal=False, seed=0,
                          experts="", method="mtt", datm=False, teacher_labels=False,
                          teacher_dir="")
  c = dd_config()
  c.seed = args.seed
  c.model.kwargs = ml_collections.ConfigDict(dict(depth=2, width=32))
  c.experts.update(num_experts=10, epochs=20, lr=0.01, batch_size=64, directory=args.experts)
  ipc = 1 if args.ipc1 else 50 if args.ipc50 else 10
  c.distill.update(method=args.method, ipc=ipc, iterations=200, syn_steps=20, expert_epochs=2,
                   lr_img=100.0, lr_lr=1e-5, lr_init=0.01, max_start_epoch=10,
                   current_max_start_epoch=10,
                   batch_syn=100 if ipc == 50 else 0)  # IPC 50: minibatches, as MTT's batch_syn
  if args.datm:  # DATM: learned soft labels, correctly classified inits, a widening window
    c.distill.update(label_kind="logits", image_init="real_correct", min_start_epoch=0,
                     current_max_start_epoch=5, max_start_epoch=10, expansion_end_epoch=100,
                     threshold=1.0)
  # The other methods at digits scale: their papers' settings, fewer iterations.
  c.dc.update(dc_iterations=1000 if ipc == 1 else 200)  # IPC 10: 10 outer × 50 inner loops
  c.dm.update(iterations=5000)
  c.sre2l.update(iterations=500, jitter=1)
  c.rded.update(factor=1)  # RDED's CIFAR setting: low resolution, one patch per image
  c.infer.update(iterations=500, jitter=1)
  c.teacher.model.kwargs = ml_collections.ConfigDict(dict(depth=2, width=64, norm="batchnorm"))
  c.teacher.directory = args.teacher_dir
  c.eval.update(num_nets=5, epochs=300, every=100, curve_nets=3, full_data_epochs=100,
                protocols=("labels", "teacher") if args.teacher_labels else ("labels",))
  if args.runlocal:  # no DSA: its six branches dominate compile time
    c.dsa.enabled = False
    c.experts.update(num_experts=2, epochs=3)
    c.distill.update(iterations=3, syn_steps=3, max_start_epoch=1, current_max_start_epoch=1,
                     expansion_end_epoch=0)
    c.dc.update(dc_iterations=2, outer_loop=2, inner_loop=2)
    c.dm.update(iterations=3)
    c.sre2l.update(iterations=3)
    c.infer.update(iterations=3)
    c.rded.update(mipc=20)
    c.teacher.update(epochs=1)
    c.eval.update(num_nets=2, epochs=3, every=2, curve_nets=2, full_data_epochs=2)
  c.lock()
  return c
