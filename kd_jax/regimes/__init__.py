"""Teacher–student regimes on the general step (`kd_jax.step.Method`s run by `kd_jax.trainer`):
`multi_teacher` (MEAL V2 averaging, MTARD balancing), `mutual` (DML, BD-KD), `self_distill`
(USKD without a teacher, born-again generations), `tgeo` (TGeo-KD's learned per-example fusion),
`mean_teacher` (semi-supervised EMA teacher with pseudo-labels), `label_free` (DINO-style
self-distillation without labels, linear probes); `job` runs each from a config
(configs/digits_regimes.py)."""
from kd_jax.regimes import (label_free, mean_teacher, multi_teacher, mutual,  # noqa: F401
                            self_distill, tgeo)
