"""Trajectory matching on CIFAR-100 with MTT's ConvNet-3 (GPU; needs a prepared TFDS data_dir).

    tfds build cifar100 --data_dir=$DATA --file_format=array_record
    python -m kd_jax.main --config=configs/dd_cifar100.py:ipc50,data_dir=$DATA --workdir=/tmp/dd_c100

Args as configs/dd_cifar10.py (`ipc1|ipc10|ipc50`, `datm`, `tesla`, `runlocal`, `data_dir=`,
`experts=`, `seed=`).
MTT IPC 50 from the MTT paper (Cazenavette et al., CVPR 2022): N 80, M 2, max_start 40, lr_img 1000, lr_lr 1e-5, α₀ 0.01,
batch_syn 125, ZCA (exact mode: about 1.5 GiB for the per-step functions, see
benchmarks/RESULTS.md). IPC 1 (20/3/20/1000/1e-5/0.01, ZCA) and IPC 10 (20/2/20/1000/1e-5/0.01,
ZCA) are MTT's README values as we read them, not in its paper's table.
Published ConvNet-3 accuracy: MTT 24.3 / 40.1 / 47.7, DATM 27.9 / 47.2 / 55.0; full data 56.2.
`datm` uses DATM's CIFAR-10 windows (we have no CIFAR-100 windows of DATM's; check DATM's
yaml files before relying on these).
"""
from configs.dd_cifar10 import DATM_WINDOWS, build

MTT = {1: dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1000.0, lr_lr=1e-5,
               lr_init=0.01, zca=True),
       10: dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=1000.0, lr_lr=1e-5,
                lr_init=0.01, zca=True),
       50: dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1000.0, lr_lr=1e-5,
                lr_init=0.01, zca=True, batch_syn=125)}


def get_config(arg=None):
  return build("cifar100", MTT, DATM_WINDOWS, arg)
