"""Hinton's omitted-class experiment on digits (Hinton, Vinyals & Dean 2015, §3).

    python -m kd_jax.main --config=configs/digits_omitted_class.py --workdir=/tmp/omit3

The teacher (CNN 32/64) trains on all of train; both MLP students train on train without a
single 3. The KD student (0.1·CE + 0.9·KD, T=20) learns the 3 only from the teacher's soft
targets on the other digits. The `+bias` rows add to the 3's logit the bias that maximises
accuracy on the train split (whose 3s the students never saw), never on test. Each arm's recipe
is chosen on validation as in configs/digits_kd.py. Args are those of configs/digits_kd.py and
override these defaults, e.g. `:omit=5,temperature=4,seed=1`.
"""
from configs import digits_kd


def get_config(arg=None):
  return digits_kd.get_config(",".join(filter(None, ["omit=3", "temperature=20", arg])))
