"""Teacher–student regimes on the embedded digits set (kd_jax.regimes.job).

    python -m kd_jax.main --config=configs/digits_regimes.py:regime=mutual --workdir=/tmp/mutual

Args (comma-separated after `:`): `regime=NAME` (one of `REGIMES` below), `seed=N`, `runlocal`
(a few steps, for CI). Every run also trains the student alone (`student_baseline`).

Student: the MLP with one hidden layer of 64, no shifts, SGD lr 0.05, 30 epochs, cosine: the
KD student's best recipe on validation (benchmarks/digits_kd_experiments.py --experiment=headline
prints the grid; train[:1000] → train[1000:], 3 seeds). Teachers: 30 epochs, ±1-pixel shifts
(`regime.teacher_crop_padding`) unless a teacher sets its own `crop_padding`.
The regimes' own hyperparameters are their papers' defaults unless the README says otherwise.
"""
import ml_collections

from configs import common, digits_kd

_CNN = {"model": "digits_cnn_teacher", "model_kwargs": {}, "checkpoint": ""}
# No shifts for an MLP teacher: shifts cost MLPs accuracy on these centred digits (the KD job's
# validation grid chose no shifts for the MLP student on every seed).
_MLP_WIDE = {"model": "mlp", "model_kwargs": {"hidden_sizes": (256, 256)}, "checkpoint": "",
             "crop_padding": 0}
REGIMES = {
    # MEAL V2 averaging of a CNN and a wide MLP (T=1, KD only, as MEAL V2); mtard: balanced.
    # weights: per teacher, () = equal; discriminator_weight > 0 adds MEAL V2's discriminator.
    "multi_teacher": {"teachers": {"cnn": _CNN, "mlp": _MLP_WIDE}, "balance": "none",
                      "weights": (), "discriminator_weight": 0.0, "temperature": 1.0,
                      "kd_weight": 1.0, "ce_weight": 0.0},
    "mtard": {"teachers": {"cnn": _CNN, "mlp": _MLP_WIDE}, "balance": "mtard", "weights": (),
              "discriminator_weight": 0.0, "temperature": 1.0, "kd_weight": 1.0,
              "ce_weight": 0.0},
    # DML between the MLP student and a CNN peer (T=1); bdkd: the student's divergence is BD-KD's.
    "mutual": {"peers": {"peer": {"model": "digits_cnn_student", "model_kwargs": {}}},
               "compact": "", "temperature": 1.0},
    "bdkd": {"peers": {"peer": {"model": "digits_cnn_student", "model_kwargs": {}}},
             "compact": "student", "temperature": 1.0},
    # Three generations: CE only, then half ground truth, half the previous generation (T=1).
    "born_again": {"gt_weights": (1.0, 0.5, 0.5), "temperature": 1.0},
    "uskd": {"feature": "stage1"},
    "tgeo": {"heldout_examples": 300, "lookahead_lr": 0.05, "temperature": 4.0},
    # 10% of train labeled; FixMatch's τ = 0.95, Tarvainen's EMA 0.99 with his momentum ramp,
    # the unlabeled weight ramped up over the first 40% of the steps.
    "mean_teacher": {"labeled_fraction": 0.1, "unlabeled_batch_size": 128, "decay": 0.99,
                     "momentum_warmup": 0.0, "threshold": 0.95, "low_threshold": -1.0,
                     "score_weighting": False, "unlabeled_weight": 1.0, "rampup_fraction": 0.4},
    # DINO on the MLP's hidden layer; probes fit on 10% of the train labels.
    "label_free": {"tap": "stage1", "out_dim": 256, "hidden_dim": 256, "bottleneck_dim": 64,
                   "momentum": 0.99, "strategy": "crop_scale", "probe_fraction": 0.1},
}
# Config names that select another regime with other settings.
_RUNS = {"mtard": "multi_teacher", "bdkd": "mutual"}


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, seed=0, regime="multi_teacher")
  if args.regime not in REGIMES:
    raise ValueError(f"regime={args.regime!r} is unknown; valid: {', '.join(REGIMES)}")
  c = digits_kd.get_config("runlocal,tune=false" if args.runlocal else "tune=false")
  c.unlock()
  c.job = "regimes"
  c.seed = args.seed
  c.data.crop_padding = 0
  c.tune.validation_examples = 0
  del c.distill
  c.regime = ml_collections.ConfigDict({"name": _RUNS.get(args.regime, args.regime),
                                        "teacher_crop_padding": 1, **REGIMES[args.regime]})
  if args.runlocal:
    c.teacher.num_epochs = c.student.num_epochs = 1
  c.lock()
  return c
