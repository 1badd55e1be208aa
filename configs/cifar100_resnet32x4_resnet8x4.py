"""CIFAR-100 KD, resnet32x4 → resnet8x4, RepDistiller/mdistiller recipe (GPU; needs a prepared TFDS data_dir).

    tfds build cifar100 --data_dir=$DATA --file_format=array_record   # once, needs TensorFlow
    python -m kd_jax.main --config=configs/cifar100_resnet32x4_resnet8x4.py --workdir=/tmp/c100_resnet8x4 \
        --config.data.data_dir=$DATA

240 epochs, SGD lr 0.05, ×0.1 at epochs 150/180/210, wd 5e-4, batch 64, T=4, 0.1·CE + 0.9·KD.
Published (REFERENCES.md, RepDistiller/mdistiller READMEs) for comparison, not our measurement.
`:runlocal` shrinks it to a few mock-sized steps (CI runs it under tfds.testing.mock_data).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, seed=0)
  c = common.cifar100_kd_config("resnet32x4", "resnet8x4", learning_rate=0.05, runlocal=args.runlocal)
  c.seed = args.seed
  c.lock()
  return c
