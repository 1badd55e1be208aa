"""Teacher–student regimes on the general step (`kd_jax.step.Method`s run by `kd_jax.trainer`):
`multi_teacher` (MEAL V2 averaging, MTARD balancing) and `mutual` (DML, BD-KD)."""
from kd_jax.regimes import multi_teacher, mutual  # noqa: F401
