"""KD-step throughput: kd_jax (one jitted step) against a PyTorch eager reference of the same work,
and the kd_jax step with the teacher's logits read from a cache (`kd_jax.teacher_cache`).

One step = resnet32x4 teacher forward (eval mode, no gradient) + resnet8x4 student forward
and backward + SGD (momentum 0.9, weight decay 5e-4) on a CIFAR-shaped batch (64×32×32×3,
100 classes), loss 0.1·CE + 0.9·T²·KL with T = 4 (the RepDistiller/mdistiller recipe).
The cached step is the same step without the teacher forward: its logits for each step's batch
come from an array store built beforehand (float32), read and checked per step (the read is
timed apart). Both frameworks run in this process with the same thread count; measurements
alternate (kd_jax live, kd_jax cached, PyTorch live, ...) so machine load hits all alike, and
the ratios per round are reported.

kd_jax runs in its default CPU layout (`kd_jax.sharding.use_host_cores`: one host device per
core, the batch split over the `data` axis of the mesh), live (`jax_cores`) and cached
(`jax_cached`); `jax` is the same live step on a single device, as before that default.
`--devices=1` keeps the single device only (then `jax_cores` is that device too).

  pip install torch==2.13.0        # benchmark-only dependency, never needed by kd_jax
  python benchmarks/kd_step_throughput.py --rounds 5 --steps 5
  python benchmarks/kd_step_throughput.py --precision bfloat16
  python benchmarks/kd_step_throughput.py --profile   # where the JAX step's time goes

XLA CPU flags go through the environment, e.g.
`XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/kd_step_throughput.py`.
"""
import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import results_log  # noqa: E402  (benchmarks/, the script's folder)

BATCH, IMAGE, CLASSES = 64, (32, 32, 3), 100
TEMPERATURE, ALPHA, LR, MOMENTUM, WEIGHT_DECAY = 4.0, 0.9, 0.05, 0.9, 5e-4


def make_batches(n: int, seed: int = 0):
  rs = np.random.RandomState(seed)
  return [{"image": rs.normal(size=(BATCH, *IMAGE)).astype(np.float32),
           "label": rs.randint(0, CLASSES, size=(BATCH,)).astype(np.int32)} for _ in range(n)]


# ----------------------------------------------------------------------------- JAX
def build_jax(precision: str, cached: bool = False, mesh=None):
  """The jitted KD step (`cached`: the teacher's logits from the batch), on one device or, with
  `mesh`, sharded over its `data` axis as kd_jax's trainer runs it; returns `(run, state,
  compiled, compile_s, (teacher_apply, teacher_variables), to_device)`."""
  import jax
  import optax

  from kd_jax import models, sharding
  from kd_jax.distiller import Distiller, Term, cached_logits_key
  from kd_jax.precision import compute_dtype
  from kd_jax.step import TrainState, make_train_step, per_part_optimizer

  dtype = compute_dtype(precision)
  student = models.create_model("resnet8x4", num_classes=CLASSES, dtype=dtype)
  teacher = models.create_model("resnet32x4", num_classes=CLASSES, dtype=dtype)
  params, model_state = models.init_model(student, jax.random.PRNGKey(0), (1, *IMAGE))
  t_params, t_state = models.init_model(teacher, jax.random.PRNGKey(1), (1, *IMAGE))
  distiller = Distiller(models.make_apply_fn(student),
                        [Term("ce", weight=1 - ALPHA),
                         Term("kd", weight=ALPHA, hparams={"temperature": TEMPERATURE})],
                        {"teacher": models.make_apply_fn(teacher)},
                        cached=("teacher",) if cached else ())
  example = make_batches(1)[0]
  if cached:
    example[cached_logits_key("teacher")] = np.zeros((BATCH, CLASSES), np.float32)
  if mesh is None:
    to_device = lambda batch: jax.tree.map(jax.numpy.asarray, batch)
  else:
    to_device = lambda batch: sharding.shard_batch(batch, mesh)
  example = to_device(example)
  trainable, frozen, extra = distiller.init(
      jax.random.PRNGKey(2), {"student": {"params": params, **model_state},
                              "teacher": {"params": t_params, **t_state}}, example)
  # As kd_jax.trainer builds it: one optimizer per trainable part (here only the student).
  tx = per_part_optimizer(trainable, optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                                                 optax.sgd(LR, momentum=MOMENTUM)))
  state = TrainState.create(tx, trainable, frozen, extra)
  if mesh is None:
    step = jax.jit(make_train_step(distiller, tx), donate_argnums=0)
  else:
    step, state = sharding.shard_train_step(make_train_step(distiller, tx), state, mesh)
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = step.lower(state, example, rng).compile()
  compile_s = time.perf_counter() - t0

  def run(state, batches):
    for batch in batches:
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    return state, float(metrics["train/loss"])

  teacher_variables = {"params": t_params, **t_state}
  return (run, state, compiled, compile_s, (models.make_apply_fn(teacher), teacher_variables),
          to_device)


def cached_batches(batches, teacher, directory: str):
  """`batches` with the teacher's logits from a `kd_jax.teacher_cache` built in `directory`;
  returns them and the seconds per step of reading (memory map + per-row check)."""
  from kd_jax import teacher_cache

  indexed = [{**b, "index": np.arange(k * BATCH, (k + 1) * BATCH, dtype=np.int32)}
             for k, b in enumerate(batches)]
  source = lambda start: iter(indexed[start:])
  cache = teacher_cache.build(directory, source, *teacher, num_steps=len(indexed),
                              storage="float32", metadata={"benchmark": "kd_step_throughput"})
  t0 = time.perf_counter()
  read = [{k: v for k, v in b.items() if k != "index"}  # the step's batch: image, label, logits
          for b in teacher_cache.with_teacher_logits(source, cache)(0)]
  return read, (time.perf_counter() - t0) / len(read)


# ----------------------------------------------------------------------------- PyTorch
def build_torch(threads: int):
  import torch
  from torch import nn
  import torch.nn.functional as F

  torch.set_num_threads(threads)

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                     nn.BatchNorm2d(cout))
                       if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  class ResNet(nn.Module):  # RepDistiller's CIFAR ResNet, the same graph as kd_jax's

    def __init__(self, depth, widths=(32, 64, 128, 256), num_classes=CLASSES):
      super().__init__()
      n = (depth - 2) // 6
      self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                nn.BatchNorm2d(widths[0]), nn.ReLU())
      blocks, cin = [], widths[0]
      for width, stride in zip(widths[1:], (1, 2, 2)):
        for i in range(n):
          blocks.append(Block(cin, width, stride if i == 0 else 1))
          cin = width
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
      x = self.blocks(self.stem(x))
      return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

  torch.manual_seed(0)
  student, teacher = ResNet(8), ResNet(32).eval()
  opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

  def run(state, batches):
    del state
    for batch in batches:
      x, y = batch["image_nchw"], batch["label_t"]
      with torch.no_grad():
        t_logits = teacher(x)
      s_logits = student(x)
      kl = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, 1), F.log_softmax(t_logits / TEMPERATURE, 1),
                    reduction="batchmean", log_target=True) * TEMPERATURE**2
      loss = (1 - ALPHA) * F.cross_entropy(s_logits, y) + ALPHA * kl
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    return None, loss.item()

  def to_torch(batches):
    return [{"image_nchw": torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy()),
             "label_t": torch.from_numpy(b["label"].astype(np.int64))} for b in batches]

  params = sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.parameters())
  return run, to_torch, params, torch.__version__


# ----------------------------------------------------------------------------- profile
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([0-9,]*)\]\S* (\w[\w\-]*)\((.*)")
_COMPUTATION = re.compile(r"^%([\w.\-]+) \(")


def _parse_hlo(text: str):
  """`(shapes, ops_by_computation, calls)` of optimised HLO text."""
  shapes, ops, calls, current = {}, collections.defaultdict(set), {}, None
  for line in text.splitlines():
    if (m := _COMPUTATION.match(line)) or line.startswith("ENTRY"):
      current = m.group(1) if m else "ENTRY"
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, dims, opcode, rest = m.groups()
    shapes[name] = tuple(int(d) for d in dims.split(",") if d)
    ops[current].add(opcode)
    if (called := re.search(r"calls=%([\w.\-]+)", rest)):
      calls[name] = called.group(1)
  return shapes, ops, calls


def _valid_pairs(out: int, kernel: int, size: int, stride=1, pad_lo=0, lhs_dil=1, rhs_dil=1) -> int:
  """#(output position, kernel tap) pairs that read a real (unpadded, undilated) input element."""
  o, k = np.meshgrid(np.arange(out), np.arange(kernel), indexing="ij")
  pos = o * stride + k * rhs_dil - pad_lo
  return int(np.sum((pos >= 0) & (pos % lhs_dil == 0) & (pos // lhs_dil < size)))


def _conv_flops(line: str, shapes: dict, out_name: str, operands: list[str]) -> float:
  """Exact multiply-add count ×2 of one HLO convolution (padding and dilation excluded)."""
  lhs_l, rhs_l, out_l = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line).groups()
  lhs, rhs, out = shapes[operands[0]], shapes[operands[1]], shapes[out_name]
  window = re.search(r"window=\{([^}]*)\}", line).group(1)

  def field(key, n, default):
    m = re.search(rf"{key}=(\S+)", window)
    return [default] * n if not m else m.group(1).split("x")

  n = len(lhs_l) - 2
  strides = [int(v) for v in field("stride", n, 1)]
  pads = [int(v.split("_")[0]) for v in field("pad", n, "0_0")]
  lhs_dil = [int(v) for v in field("lhs_dilate", n, 1)]
  rhs_dil = [int(v) for v in field("rhs_dilate", n, 1)]
  groups = re.search(r"feature_group_count=(\d+)", line)
  macs = out[out_l.index("b")] * out[out_l.index("f")] * lhs[lhs_l.index("f")]
  macs /= int(groups.group(1)) if groups else 1
  for d in range(n):
    macs *= _valid_pairs(out[out_l.index(str(d))], rhs[rhs_l.index(str(d))],
                         lhs[lhs_l.index(str(d))], strides[d], pads[d], lhs_dil[d], rhs_dil[d])
  return 2.0 * macs


def conv_flop_share(compiled) -> dict:
  """Convolution FLOPs in the optimised HLO against XLA's cost analysis of the whole step."""
  text = compiled.as_text()
  shapes, _, _ = _parse_hlo(text)
  total = compiled.cost_analysis()
  total = (total[0] if isinstance(total, list) else total)["flops"]
  conv = 0.0
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m and m.group(3) == "convolution":
      conv += _conv_flops(line, shapes, m.group(1), re.findall(r"%([\w.\-]+)", m.group(4)))
  return {"step_gflop": round(total / 1e9, 2), "conv_gflop": round(conv / 1e9, 2),
          "conv_flop_share": round(conv / total, 4)}


def _category(name: str, ops: dict, calls: dict) -> str:
  called = ops.get(calls.get(name, ""), set())
  if "convolution" in called or "convolution" in name:
    return "convolution (incl. fused BN/ReLU)"
  if "dot" in called or name.startswith("dot"):
    return "dot"
  if "reduce" in called or name.startswith("reduce"):
    return "reduce (BN statistics, pooling)"
  if "transpose" in name or "copy" in name or called & {"transpose", "copy"}:
    return "copy/transpose"
  return "elementwise/other"


def profile_time_by_op(compiled, run, state, batches) -> dict:
  """Thunk time per op category from a jax.profiler trace of `len(batches)` steps.

  Times are summed over XLA:CPU's worker threads, so they can exceed wall time.
  """
  import jax
  from jax._src.lib import _profile_data

  _, ops, calls = _parse_hlo(compiled.as_text())
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir):
      run(state, batches)
    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    data = _profile_data.ProfileData.from_file(path)
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in calls or re.match(r"^[a-z_\-]+\.\d+$", event.name):
          per_op[event.name] += event.duration_ns
  per_category = collections.Counter()
  for name, ns in per_op.items():
    per_category[_category(name, ops, calls)] += ns
  total = sum(per_category.values()) or 1
  return {"thunk_ms_per_step": round(total / 1e6 / len(batches), 1),
          "share": {k: round(v / total, 4) for k, v in per_category.most_common()},
          "top_ops_ms_per_step": {k: round(v / 1e6 / len(batches), 1)
                                  for k, v in per_op.most_common(8)}}


# ----------------------------------------------------------------------------- main
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the arms")
  parser.add_argument("--steps", type=int, default=5, help="steps per round and arm")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads "
                      "(XLA:CPU uses one thread per core)")
  parser.add_argument("--devices", type=int, default=-1, help="kd_jax's CPU devices: -1 one per "
                      "core (the default layout), 1 a single device")
  parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--profile", action="store_true", help="print the JAX step's op breakdown")
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args()

  from kd_jax import sharding
  sharding.use_host_cores([BATCH], requested=args.devices if args.devices != 1 else 0)
  import jax

  mesh = sharding.make_mesh([(sharding.DATA_AXIS, -1)]) if len(jax.devices()) > 1 else None
  jax_run, jax_state, compiled, compile_s, teacher, to_jax = build_jax(args.precision)
  cores_run, cores_state, cores_compiled, cores_compile_s, _, to_cores = build_jax(
      args.precision, mesh=mesh)
  cached_run, cached_state, cached_compiled, cached_compile_s, _, _ = build_jax(
      args.precision, cached=True, mesh=mesh)
  torch_run, to_torch, torch_params, torch_version = build_torch(args.threads)
  batches = make_batches(args.steps)
  with tempfile.TemporaryDirectory() as directory:
    with_logits, read_s = cached_batches(batches, teacher, os.path.join(directory, "cache"))
  arms = {"jax": (jax_run, [to_jax(b) for b in batches]),
          "jax_cores": (cores_run, [to_cores(b) for b in batches]),
          "jax_cached": (cached_run, [to_cores(b) for b in with_logits]),
          "torch": (torch_run, to_torch(batches))}
  states = {"jax": jax_state, "jax_cores": cores_state, "jax_cached": cached_state, "torch": None}
  for name, (run, arm_batches) in arms.items():  # warm-up (first call, allocations)
    states[name], _ = run(states[name], arm_batches[:1])

  # Wall and process CPU seconds (all threads) per step. On a loaded machine the CPU time is
  # the steadier figure: it does not count time spent waiting for a core.
  wall, cpu, loss = {name: [] for name in arms}, {name: [] for name in arms}, {}
  for _ in range(args.rounds):
    for name, (run, arm_batches) in arms.items():
      t0, c0 = time.perf_counter(), time.process_time()
      states[name], loss[name] = run(states[name], arm_batches)
      wall[name].append((time.perf_counter() - t0) / args.steps)
      cpu[name].append((time.process_time() - c0) / args.steps)
  wall, cpu = ({k: np.asarray(v) for k, v in times.items()} for times in (wall, cpu))
  per_round = lambda x: [round(float(v), 3) for v in x]
  median = lambda x: round(float(np.median(x)), 3)

  def speedup(name, slower, faster):
    """`<name>_per_round` and `<name>_median` of wall[slower] / wall[faster]."""
    ratio = wall[slower] / wall[faster]
    return {f"{name}_per_round": per_round(ratio), f"{name}_median": median(ratio)}

  result = {
      "precision": args.precision, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "threads": args.threads, "cpu_count": os.cpu_count(), "jax_devices": len(jax.devices()),
      "load_average_1_5_15min": [round(x, 1) for x in os.getloadavg()], "jax": jax.__version__,
      "torch": torch_version, "jax_compile_s": round(compile_s, 2),
      "jax_cores_compile_s": round(cores_compile_s, 2),
      "jax_cached_compile_s": round(cached_compile_s, 2),
      "cache_read_ms_per_step": round(1e3 * read_s, 2),
      # Per device: the one-device live step, then the live and cached steps of the default layout.
      "gflop_per_step_live_cores_cached": [conv_flop_share(c)["step_gflop"]
                                           for c in (compiled, cores_compiled, cached_compiled)],
      **{f"{name}_s_per_step": [round(float(x), 4) for x in wall[name]] for name in arms},
      **{f"{name}_images_per_s_median": round(BATCH / float(np.median(wall[name])), 1)
         for name in arms},
      "speedup_jax_over_torch_per_round": per_round(wall["torch"] / wall["jax"]),
      "speedup_median": median(wall["torch"] / wall["jax"]),
      # The default layout (all cores) against PyTorch on all cores, and against one device.
      **speedup("cores_over_torch", "torch", "jax_cores"),
      "cores_over_one_device_median": median(wall["jax"] / wall["jax_cores"]),
      **speedup("cached_over_live", "jax_cores", "jax_cached"),
      **speedup("cached_over_torch_live", "torch", "jax_cached"),
      **{f"{name}_cpu_s_per_step": [round(float(x), 3) for x in cpu[name]] for name in arms},
      "cpu_time_speedup_median": median(cpu["torch"] / cpu["jax"]),
      "cpu_time_cores_over_torch_median": median(cpu["torch"] / cpu["jax_cores"]),
      "cpu_time_cached_over_live_median": median(cpu["jax_cores"] / cpu["jax_cached"]),
      "cpu_time_cached_over_torch_live_median": median(cpu["torch"] / cpu["jax_cached"]),
      # Both kd_jax states took the same steps on the same batches: equal up to rounding.
      "last_loss_live_cores_cached": [round(loss[k], 6) for k in ("jax", "jax_cores", "jax_cached")],
      "torch_params_student_teacher": torch_params,
  }
  if args.profile:
    result["flops"] = conv_flop_share(compiled)
    result["time_by_op"] = profile_time_by_op(compiled, jax_run, states["jax"], arms["jax"][1])
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  with results_log.recorded("KD-step throughput: kd_jax live and cached teacher vs PyTorch eager"):
    main()
