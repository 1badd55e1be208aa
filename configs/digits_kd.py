"""Knowledge distillation on the embedded digits set (real data, offline, minutes on a CPU).

    python -m kd_jax.main --config=configs/digits_kd.py --workdir=/tmp/kd_digits

Trains a 32/64-channel CNN teacher, a label-only MLP student (one hidden layer of 64) and the
same MLP with Hinton KD (0.1·CE + 0.9·KD, T=4), then prints their test accuracy. Teacher
recipe: SGD 0.05, momentum 0.9, wd 5e-4, cosine decay, 30 epochs, ±1-pixel random shifts.
Each student arm chooses its own recipe on validation (`TUNE`: shifts on/off × learning rate
× epochs, trained on train[:1000], scored on train[1000:], with a teacher trained on
train[:1000]), then trains on all of train; the table names each row's recipe.

Args (comma-separated after `:`):
- `runlocal`: a few steps and a two-recipe grid, for CI;
- `validate`: train on train[:1000] and evaluate on train[1000:] (no test split at all);
- `seed=N`; `tune=false`: skip tuning, both arms use shifts ±1, lr 0.05, 30 epochs;
- `pair=mlp|cnn|vit|cnn_vit|vit_cnn`: CNN → MLP(64) (default), CNN 32/64 → CNN 16/32, ViT →
  smaller ViT, and the heterogeneous CNN → ViT and ViT → CNN;
- `terms=A+B+...`: the KD student's terms, CE plus each named loss with the taps and weight of
  `TERMS` below (e.g. `terms=fitnet+kd`, `terms=dkd`; any registered loss name works), and
  `scale=S` multiplying the weights of those terms other than KD (chosen on validation by
  `benchmarks/digits_terms_table.py`); `temperature=T` sets KD's temperature;
- `omit=C`: Hinton's omitted-class experiment, the students never see class C (adds `+bias`
  rows with the class's logit bias fitted on the train split);
- `labels=F`: the students train on a stratified fraction F of train; `teacher_subset`: the
  teacher trains on that same fraction (else on all of train).

    python -m kd_jax.main --config=configs/digits_kd.py:pair=cnn,terms=fitnet+kd --workdir=/tmp/fitnet
    python -m kd_jax.main --config=configs/digits_kd.py:omit=3,temperature=8 --workdir=/tmp/omit3
    python -m kd_jax.main --config=configs/digits_kd.py:pair=cnn_vit,terms=ofa+ofa_stages --workdir=/tmp/ofa

Weights follow RepDistiller's CIFAR-100 defaults where its loss has the same normalisation
(FitNet 100, AT 1000, SP 3000, RKD 25 (its 25/50 distance/angle), PKT 30000, CC 0.02, VID 1,
CRD 0.8, NST 50, FT 200), ReviewKD 1, and DKD's recipe CE + DKD with a linear warm-up over the
first 1/12 of training (mdistiller: 20 of 240 epochs); "+kd" adds 0.9·KD(T=4) with CE at 0.1.
"""
from configs import common

# The CNN pair's taps (teacher: stage1 [8, 8, 32], stage2 [4, 4, 64], pre_logits [1024];
# student: stage1 [4, 4, 16], stage2 [2, 2, 32], pre_logits [128]). Feature maps are paired at
# the same 4×4 resolution; adapters are created automatically where widths differ.
_MAPS = {"student": "stage1", "teacher": "stage2"}
_VECTORS = {"student": "pre_logits", "teacher": "pre_logits"}
TERMS = {
    "kd": {"weight": 0.9, "hparams": {"temperature": 4.0}},
    "dkd": {"weight": 1.0},  # warm-up set from the run length below
    # The other logit losses at weight 1 (their papers' own loss scales).
    **{name: {"weight": 1.0} for name in (
        "reverse_kl", "jensen_shannon", "generalized_jsd", "logit_mse", "nkd", "dist",
        "logit_standardized_kd", "ofa", "meal_v2", "bdkd", "skd_instance", "skd_direction", "soft_teacher_cls")},
    "fitnet": {"weight": 100.0, **_MAPS},
    "at": {"weight": 1000.0, **_MAPS},
    "sp": {"weight": 3000.0, **_VECTORS},
    "rkd": {"weight": 25.0, **_VECTORS},
    "rkd_distance": {"weight": 25.0, **_VECTORS},
    "rkd_angle": {"weight": 50.0, **_VECTORS},
    "pkt": {"weight": 30000.0, **_VECTORS},
    "cc": {"weight": 0.02, **_VECTORS},
    "cka": {"weight": 1.0, **_VECTORS},
    "vid": {"weight": 1.0, **_MAPS},
    "crd": {"weight": 0.8, **_VECTORS},
    "nst": {"weight": 50.0, "student": "stage2", "teacher": "stage2"},
    "ft": {"weight": 200.0, **_MAPS},
    "fsp": {"weight": 1.0, "student": ("stage1", "stage2"), "teacher": ("stage1", "stage2")},
    "reviewkd_hcl": {"weight": 1.0, "student": ("stage1", "stage2"),
                     "teacher": ("stage2", "stage2")},
    "ofd": {"weight": 1e-3, **_MAPS},
    "ab": {"weight": 1e-3, **_MAPS},
    "ickd": {"weight": 1.0, **_MAPS},
    "kta_affinity": {"weight": 1.0, **_MAPS},
    "pad_l2": {"weight": 1.0, **_VECTORS},
    "nd": {"weight": 1.0, **_VECTORS},
    "uskd": {"weight": 1.0, "student": "stage2"},
    "meal_v2_discriminator": {"weight": 1.0},
    # The ViT pair (pair=vit): attention maps and values of the last blocks, equal head counts.
    "minilm_attention": {"weight": 1.0, "student": "attn/1", "teacher": "attn/2"},
    "minilm_value_relation": {"weight": 1.0, "student": "values/1", "teacher": "values/2"},
    "minilm": {"weight": 1.0, "student": ("attn/1", "values/1"), "teacher": ("attn/2", "values/2")},
    "minilmv2_relation": {"weight": 1.0, "student": "stage2", "teacher": "stage3",
                          "hparams": {"num_relation_heads": 2}},
}
_VIT_TEACHER = ("vit_tiny", {"patch_size": 2, "hidden_dim": 32, "depth": 3, "num_heads": 2,
                             "mlp_dim": 64})
_VIT_STUDENT = ("vit_tiny", {"patch_size": 2, "hidden_dim": 16, "depth": 2, "num_heads": 2,
                             "mlp_dim": 32})
PAIRS = {
    "mlp": ("digits_cnn_teacher", {}, "mlp", {"hidden_sizes": (64,)}),
    "cnn": ("digits_cnn_teacher", {}, "digits_cnn_student", {"widths": (16, 32)}),
    "vit": (*_VIT_TEACHER, *_VIT_STUDENT),
    # Heterogeneous pairs (OFA's setting; "mlp" above is CNN → MLP).
    "cnn_vit": ("digits_cnn_teacher", {}, *_VIT_STUDENT),
    "vit_cnn": (*_VIT_TEACHER, "digits_cnn_student", {"widths": (16, 32)}),
}
# OFA's branch projectors (the `ofa_stages` term) per student: the student taps that get a
# branch, and the branch kind (a ViT's stage taps are token grids, so "tokens", not "conv").
OFA_BRANCHES = {"mlp": (("stage1",), "linear"), "cnn": (("stage1", "stage2"), "conv"),
                "vit": (("stage1", "stage2"), "tokens"),
                "cnn_vit": (("stage1", "stage2"), "tokens"),
                "vit_cnn": (("stage1", "stage2"), "conv")}


# Each student arm's grid (configs.common.kd_config `tune`): 2 × 2 × 2 recipes. ViT students
# also try lower learning rates: with KD's T²-scaled gradient a ViT diverges at 0.05–0.1 on
# validation (7–86% against 89–95% for CE alone), so 0.05 would handicap the KD arm.
TUNE = {"validation_examples": 300, "crop_padding": (0, 1), "learning_rate": (0.05, 0.1),
        "num_epochs": (30, 60)}
VIT_STUDENT_LEARNING_RATES = (0.01, 0.02, 0.05, 0.1)


def terms_from_names(names: str, total_steps: int, scale: float = 1.0,
                     temperature: float = 4.0, pair: str = "mlp") -> tuple:
  """`"fitnet+kd"` → (CE, FitNet, KD) terms; CE weighs 0.1 when KD is among them, else 1.
  `scale` multiplies the weights of the terms other than CE and KD (tuned on validation).
  `ofa_stages` is OFA's branch term on `pair`'s student (`OFA_BRANCHES`)."""
  names = [n for n in names.split("+") if n]
  terms = [common.term("ce", weight=0.1 if "kd" in names else 1.0)]
  for name in names:
    if name == "ofa_stages":
      taps, branch = OFA_BRANCHES[pair]
      fields = {"loss": "ofa", "name": name, "student": taps, "options": {"branch": branch},
                "weight": 1.0}
    else:
      fields = {"loss": name, **TERMS.get(name, {"weight": 1.0})}
    if name == "kd":
      fields["hparams"] = {"temperature": temperature}
    else:
      fields["weight"] = fields["weight"] * scale
    if name == "dkd":
      fields["warmup_steps"] = max(total_steps // 12, 1)
    terms.append(common.term(**fields))
  return tuple(terms)


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, validate=False, seed=0, pair="mlp", terms="kd",
                          scale=1.0, temperature=4.0, tune=True, omit=-1, labels=1.0,
                          teacher_subset=False)
  if args.pair not in PAIRS:
    raise ValueError(f"pair={args.pair!r} is unknown; valid: {', '.join(PAIRS)}")
  c = common.kd_config()
  c.seed = args.seed
  c.data.name = "digits"
  c.data.batch_size = 64
  c.data.eval_batch_size = 500
  c.data.crop_padding = 1
  c.data.in_memory = True
  if args.validate:
    c.data.train_split, c.data.eval_split = "train[:1000]", "train[1000:]"
  teacher, teacher_kwargs, student, student_kwargs = PAIRS[args.pair]
  c.teacher.model, c.student.model = teacher, student
  c.teacher.model_kwargs.update(teacher_kwargs)
  c.student.model_kwargs.update(student_kwargs)
  c.teacher.num_epochs = 30
  c.student.num_epochs = 30
  c.checkpoint.every_steps = 200
  c.log.every_steps = 20
  c.student.omit_class = args.omit
  c.student.label_fraction = args.labels
  c.teacher.on_label_subset = args.teacher_subset
  if args.tune and not args.validate:
    c.tune.update(TUNE)
    if student == "vit_tiny":
      c.tune.learning_rate = VIT_STUDENT_LEARNING_RATES
  if args.runlocal:
    c.teacher.num_epochs = c.student.num_epochs = 1
    c.tune.num_epochs, c.tune.learning_rate = (1,), (0.05,)
    c.checkpoint.every_steps = 8
    c.log.every_steps = 4
  steps_per_epoch = (1000 if args.validate else 1300) // c.data.batch_size
  c.distill.terms = terms_from_names(args.terms, c.student.num_epochs * steps_per_epoch,
                                     args.scale, args.temperature, args.pair)
  c.lock()
  return c
