"""Compression on digits: quantized students and students on pruned data, each with and without KD.

    python -m kd_jax.main --config=configs/digits_compression.py:bits=4 --workdir=/tmp/quant4
    python -m kd_jax.main --config=configs/digits_compression.py:prune=0.3 --workdir=/tmp/prune3

The job of configs/digits_kd.py (CNN 32/64 teacher; MLP 64 students, label-only and KD; each
arm's recipe chosen on validation, which runs under the same quantization and pruning):
- `bits=K` (0: full precision): both students train K-bit weights in their forward pass with
  full-precision shadows (Polino et al., "Model compression via distillation and quantization",
  ICLR 2018): min–max scaling per bucket of `bucket=256` weights, every parameter quantized;
  `method=differentiable` learns the quantization points too (`points_lr`). The rows report
  the quantized accuracy, the size in bits and the shadows' accuracy; each student's stage
  directory holds `quantized.npz`.
- `prune=F` (0: none): the students train on the transfer set without the fraction F of its
  examples, kept by `score=random|el2n|forgetting` (scores from `score_runs=3` runs of the
  teacher's architecture for `score_epochs=3` epochs) from the `keep=hardest|easiest` end; the
  teacher trains on all of train (Ben-Baruch et al., "Distilling the Knowledge in Data Pruning",
  2024).
- `kd_weight=A`: the KD student's loss (1 − A)·CE + A·KD(T) (default 0.9).
The other args are those of configs/digits_kd.py (`seed=N`, `tune=false`, `pair=cnn`, ...);
`runlocal` is that config's CI size, with one scoring run of two epochs.
"""
from configs import common, digits_kd

_ARGS = {"bits": 0, "method": "uniform", "bucket": 256, "points_lr": 1e-4, "prune": 0.0,
         "score": "el2n", "keep": "hardest", "score_epochs": 3, "score_runs": 3,
         "kd_weight": 0.9}


def get_config(arg=None):
  items = [item for item in (arg or "").split(",") if item]
  ours = [item for item in items if item.partition("=")[0] in _ARGS]
  args = common.parse_arg(",".join(ours), **_ARGS)
  runlocal = common.parse_arg(",".join(i for i in items if i.partition("=")[0] == "runlocal"),
                              runlocal=False).runlocal
  c = digits_kd.get_config(",".join(item for item in items if item not in ours))
  with c.unlocked():
    q = c.student.quantize
    q.bits, q.method, q.bucket_size = args.bits, args.method, args.bucket
    q.points_learning_rate = args.points_lr
    p = c.data.prune
    p.fraction, p.score, p.keep = args.prune, args.score, args.keep
    p.score_epochs, p.score_runs = (2, 1) if runlocal else (args.score_epochs, args.score_runs)
    if "kd" in [term.loss for term in c.distill.terms]:
      for term in c.distill.terms:
        if term.loss in ("ce", "kd"):
          term.weight = args.kd_weight if term.loss == "kd" else round(1 - args.kd_weight, 6)
  return c
