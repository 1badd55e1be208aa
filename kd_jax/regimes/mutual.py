"""Online (mutual) distillation: K ≥ 2 networks trained together in one step (a
`kd_jax.step.Method`).

Network i minimises

    L_i = ce_weight·CE(s_i, y) + mutual_weight·1/(K−1)·Σ_{j≠i} D(s_i, sg(s_j)),

D = T²·KL(softmax(s_j/T) ‖ softmax(s_i/T)) (`losses.kd`), the peers' predictions under
stop-gradient (DML: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018). The
step's loss is Σ_i L_i; since peers are stopped, network i's gradient is that of L_i alone.
With `compact`, that network's D is BD-KD's balanced divergence instead (`losses.bdkd`:
forward and reverse KL weighted per example by the entropy gap; Amara et al., "BD-KD:
Balancing the Divergences for Online Knowledge Distillation", arXiv 2212.12965).

Departures: DML updates the networks in turn, each from the others' latest predictions; here
all are updated at once from the same predictions. BD-KD also changes the larger network's
objective; here only the compact network's divergence changes (and `losses.bdkd` is itself
transcribed from the paper, without a reference implementation).
"""
import math
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import optax

from kd_jax import losses, trainer
from kd_jax.step import TrainState, cross_entropy, hard_labels

RETURNED = "student"  # the network `trainer.train` returns


def network_variables(state: TrainState, name: str) -> dict:
  """`{"params", **model_state}` of network `name` in `state`."""
  return {"params": state.trainable[name], **state.extra["model_state"][name]}


class Mutual:
  """DML / BD-KD between the networks of `trainable` (see the module docstring).

  Args:
    networks: `{name: apply_fn}`, at least two, one named "student" (the one `trainer.train`
      returns); their variables come as `variables[name]`.
    temperature: T of the divergences (DML uses 1).
    ce_weight, mutual_weight: weights of each network's CE and mean divergence to its peers.
    compact: the network trained with BD-KD's balanced divergence (`None`: plain DML).
    balance: BD-KD's λ ≥ 1 for `compact`.
    view: the batch key every network sees.

  State: `trainable = {name: params}`, `frozen = {}`, `extra = {"model_state": {name: ...}}`.
  Metrics: `terms/<name>/ce`, `terms/<name>/mutual`, `train/<name>/accuracy`, and
  `train/accuracy` of "student".
  """

  evolving_frozen = ()

  def __init__(self, networks: Mapping[str, Callable], *, temperature: float = 1.0,
               ce_weight: float = 1.0, mutual_weight: float = 1.0, compact: str | None = None,
               balance: float = 2.0, view: str = "image"):
    names = tuple(networks)
    if len(names) < 2:
      raise ValueError(f"mutual: needs at least two networks, got {list(names)}")
    if RETURNED not in names:
      raise ValueError(f"mutual: name one network {RETURNED!r} (trainer.train returns it); got "
                       f"{list(names)}")
    if compact is not None and compact not in names:
      raise ValueError(f"mutual: compact={compact!r} is not a network; there are {list(names)}")
    checks = {"temperature": (temperature, temperature > 0, "> 0"),
              "balance": (balance, balance >= 1, ">= 1"),
              "ce_weight": (ce_weight, True, "finite"),
              "mutual_weight": (mutual_weight, True, "finite")}
    for field, (value, ok, requirement) in checks.items():
      if not (math.isfinite(value) and ok):
        raise ValueError(f"mutual: {field} must be {requirement}, got {value}")
    self.names, self.networks = names, dict(networks)
    self.temperature, self.ce_weight, self.mutual_weight = temperature, ce_weight, mutual_weight
    self.compact, self.balance, self.view = compact, balance, view

  def init(self, rng: jax.Array, variables: Mapping[str, dict], batch) -> tuple:
    """`variables = {name: {"params", **model_state}}` → (trainable, {}, extra)."""
    del rng
    missing = [n for n in self.names if n not in variables]
    if missing:
      raise ValueError(f"mutual: no variables for {missing} (given: {sorted(variables)})")
    classes = {n: jax.eval_shape(lambda v, x, n=n: self.networks[n](v, x, train=False)[0],
                                 variables[n], batch[self.view]).logits.shape[-1]
               for n in self.names}
    if len(set(classes.values())) > 1:
      found = ", ".join(f"{n} {c}" for n, c in classes.items())
      raise ValueError(f"mutual: the class counts differ ({found}); every network must predict "
                       "the same classes")
    trainable = {n: variables[n]["params"] for n in self.names}
    model_state = {n: {k: v for k, v in variables[n].items() if k != "params"}
                   for n in self.names}
    return trainable, {}, {"model_state": model_state}

  def divergence(self, name: str, logits: jax.Array, peer_logits: jax.Array) -> jax.Array:
    """`[B]` divergence of network `name` to one peer (the peer's logits are stopped)."""
    if name == self.compact:
      return losses.bdkd(logits, peer_logits, temperature=self.temperature,
                         balance=self.balance)
    return losses.kd(logits, peer_logits, temperature=self.temperature)

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """Σ_i L_i over the networks; see `kd_jax.step.Method.loss`."""
    del frozen, step
    if self.view not in batch:
      raise ValueError(f"mutual: the batch has no view {self.view!r} (it has {sorted(batch)})")
    mask = batch.get("mask")
    logits, model_state = {}, {}
    for k, name in enumerate(self.names):
      out, model_state[name] = self.networks[name](
          {"params": trainable[name], **extra["model_state"][name]}, batch[self.view], train=True,
          rngs={"dropout": jax.random.fold_in(rng, k)})
      logits[name] = out.logits
    total, metrics = jnp.float32(0.0), {}
    for name in self.names:
      ce = losses.masked_mean(cross_entropy(logits[name], batch["label"]), mask)
      mutual = sum(losses.masked_mean(self.divergence(name, logits[name], logits[peer]), mask)
                   for peer in self.names if peer != name) / (len(self.names) - 1)
      total = total + self.ce_weight * ce + self.mutual_weight * mutual
      correct = jnp.argmax(logits[name], -1) == hard_labels(batch["label"])
      metrics.update({f"terms/{name}/ce": ce, f"terms/{name}/mutual": mutual,
                      f"train/{name}/accuracy": losses.masked_mean(correct, mask)})
    metrics["train/accuracy"] = metrics[f"train/{RETURNED}/accuracy"]
    return total, (metrics, {**extra, "model_state": model_state})

  def after_update(self, old: TrainState, new: TrainState) -> TrainState:
    del old
    return new

  def evaluate(self, state: TrainState, eval_batches: Callable[[], Iterable[dict]],
               mesh_axes: tuple = (("data", -1),)) -> dict[str, dict]:
    """`trainer.evaluate` of every network in `state`: `{name: {"accuracy", "loss", "count"}}`."""
    return {n: trainer.evaluate(self.networks[n], network_variables(state, n), eval_batches(),
                                mesh_axes) for n in self.names}


def stage(name: str, networks: Mapping[str, tuple[Callable, dict]], *,
          tx: optax.GradientTransformation, num_steps: int, metadata: dict | None = None,
          **method_kwargs) -> trainer.Stage:
  """A `trainer.Stage` training `Mutual` from `{name: (apply_fn, variables)}`.

  `method_kwargs` go to `Mutual`; the checkpoint metadata records the networks and `compact`.
  """
  method = Mutual({n: apply for n, (apply, _) in networks.items()}, **method_kwargs)
  metadata = {**(metadata or {}), "regime": "mutual", "networks": list(method.names),
              "compact": method.compact}
  return trainer.Stage(name, method, {n: v for n, (_, v) in networks.items()}, metadata, tx,
                       num_steps)
