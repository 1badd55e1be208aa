"""Teacher–student regimes on the general step (`kd_jax.step.Method`s run by `kd_jax.trainer`):
`multi_teacher` (MEAL V2 averaging, MTARD balancing), `mutual` (DML, BD-KD), `self_distill`
(USKD without a teacher, born-again generations), `tgeo` (TGeo-KD's learned per-example fusion);
`job` runs each from a config (configs/digits_regimes.py)."""
from kd_jax.regimes import multi_teacher, mutual, self_distill, tgeo  # noqa: F401
