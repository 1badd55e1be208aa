"""CIFAR-100 KD benchmark pairs, RepDistiller/mdistiller recipe (GPU; needs a prepared TFDS data_dir).

    tfds build cifar100 --data_dir=$DATA --file_format=array_record   # once, needs TensorFlow
    python -m kd_jax.main --config=configs/cifar100_kd.py:teacher=resnet32x4,student=resnet8x4 \
        --workdir=/tmp/c100_resnet8x4 --config.data.data_dir=$DATA

Pairs benchmarked in the literature (published top-1 KD / DKD from Zhao et al., CVPR 2022, Table 1; not our runs):
resnet32x4→resnet8x4 (73.33 / 76.32), wrn_40_2→wrn_16_2 (74.92 / 76.23), resnet56→resnet20
(70.66 / 71.97), vgg13→vgg8 (72.98 / 74.68), resnet32x4→shufflenetv2.
Recipe: 240 epochs, SGD lr 0.05 (0.01 for MobileNet/ShuffleNet students), ×0.1 at epochs
150/180/210, wd 5e-4, batch 64, T=4, 0.1·CE + 0.9·KD.
Args: `teacher=NAME`, `student=NAME`, `runlocal` (a few mock-sized steps; CI runs it under
tfds.testing.mock_data), `seed=N`.
"""
from configs import common

PAIRS = (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"),
         ("vgg13", "vgg8"), ("resnet32x4", "shufflenetv2"))
SMALL_LR_STUDENTS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")


def get_config(arg=None):
  args = common.parse_arg(arg, teacher="resnet32x4", student="resnet8x4", runlocal=False, seed=0)
  learning_rate = 0.01 if args.student in SMALL_LR_STUDENTS else 0.05
  c = common.cifar100_kd_config(args.teacher, args.student, learning_rate=learning_rate,
                                runlocal=args.runlocal)
  c.seed = args.seed
  c.lock()
  return c
