"""Metric sinks (JSONL + TensorBoard event files), the progress bar, and finite checks."""
import json
import math
import os
import socket
import struct
import time

import jax
import numpy as np
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c
import tqdm

from kd_jax.checkpoint import atomic_write, naming_os_errors


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


class MetricWriter:
  """Appends flat metric dicts to `metrics.jsonl` and a TensorBoard event file, flushed at
  every write, so a killed run loses nothing it logged.

  Args:
    directory: the stage directory; files go to `directory/metrics.jsonl` and
      `directory/tensorboard/`.
    tensorboard: whether to write an event file (TFRecords of tensorboardX's protos; no
      TensorFlow needed).
    enabled: False makes every call a no-op (all hosts but the first, in multi-host runs).
    start_step: the step training resumes from. Records of later steps, left by a killed
      run, are dropped from `metrics.jsonl` and from the earlier event files (each rewritten
      to a temporary file and renamed), so no step appears twice; 0 (a fresh start) drops
      every record. Each writer starts a new event file. None appends to what is there.
  Raises:
    OSError: a write failed; the error names the file.
  """

  def __init__(self, directory: str, *, tensorboard: bool = True, enabled: bool = True,
               start_step: int | None = None):
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(directory, exist_ok=True)
    self._jsonl_path = os.path.join(directory, "metrics.jsonl")
    tb_dir = os.path.join(directory, "tensorboard")
    earlier = _event_files(tb_dir)
    if start_step is not None:
      last_kept = start_step if start_step > 0 else -1  # a fresh start may log step 0 again
      _truncate_jsonl(self._jsonl_path, last_kept)
      for path in earlier:
        _truncate_events(path, last_kept)
    self._jsonl = open(self._jsonl_path, "a")
    self._events = None
    if tensorboard:
      os.makedirs(tb_dir, exist_ok=True)
      # The pid and count keep a writer started in the same second as an earlier one from
      # taking its name.
      self._events_path = os.path.join(tb_dir, f"events.out.tfevents.{int(time.time()):010d}."
                                       f"{socket.gethostname()}.{os.getpid()}.{len(earlier)}")
      self._events = open(self._events_path, "ab")
      self._append_event(file_version="brain.Event:2")

  def _append_event(self, **fields) -> None:
    with naming_os_errors(self._events_path):
      self._events.write(_frame(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString()))
      self._events.flush()

  def write(self, step: int, metrics: dict) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    with naming_os_errors(self._jsonl_path):
      self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
      self._jsonl.flush()
    if self._events is not None:
      self._append_event(step=int(step), summary=summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=name, simple_value=value) for name, value in scalars.items()]))

  def close(self) -> None:
    if not self._enabled:
      return
    self._jsonl.close()
    if self._events is not None:
      self._events.close()


def read_jsonl(path: str) -> list[dict]:
  """Reads back a `metrics.jsonl` file (a last line cut short by a kill is skipped)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _truncate_jsonl(path: str, last_step: int) -> None:
  if os.path.exists(path):
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def _event_files(directory: str) -> list[str]:
  """Event files in `directory`, oldest first (their names start with the creation time)."""
  if not os.path.isdir(directory):
    return []
  return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
          if name.startswith("events.out.tfevents.")]


def _frame(payload: bytes) -> bytes:
  """One TFRecord: length, its masked CRC32C, the payload, its masked CRC32C."""
  header = struct.pack("Q", len(payload))
  return header + struct.pack("I", masked_crc32c(header)) + payload + struct.pack(
      "I", masked_crc32c(payload))


def _events(path: str) -> list:
  """`(payload, Event)` of each record of `path`, up to the first one cut short or garbled."""
  with open(path, "rb") as f:
    data = f.read()
  events, offset = [], 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack_from("Q", data, offset)
    payload = data[offset + 12:offset + 12 + length]
    record = _frame(payload)
    if data[offset:offset + len(record)] != record:
      break
    events.append((payload, event_pb2.Event.FromString(payload)))
    offset += len(record)
  return events


def _truncate_events(path: str, last_step: int) -> None:
  """Rewrites `path` without the summaries of steps after `last_step` (and any cut-short tail)."""
  kept = [payload for payload, event in _events(path)
          if not event.HasField("summary") or event.step <= last_step]
  atomic_write(path, b"".join(map(_frame, kept)))


def read_tensorboard(directory: str) -> dict[str, list[tuple[int, float]]]:
  """Scalars of the event files in `directory`: `{tag: [(step, value), ...]}` sorted by step.

  Should a step appear in several files (event files of a kd_jax older than the resume
  clean-up), the value from the newest file is kept.
  """
  scalars: dict[str, dict[int, float]] = {}
  for path in _event_files(directory):
    for _, event in _events(path):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
  return {tag: sorted(values.items()) for tag, values in scalars.items()}


class PendingMetrics:
  """Device metrics kept since the last host check, so the host syncs only at log steps.

  `check_and_mean()` fetches them, raises `NonFiniteLossError` naming the first
  step whose loss was not finite, and returns the mean of each metric.
  """

  def __init__(self, loss_key: str = "train/loss"):
    self._loss_key = loss_key
    self._items: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._items.append((step, metrics))

  def __len__(self):
    return len(self._items)

  def check_and_mean(self) -> dict:
    items, self._items = jax.device_get(self._items), []
    for step, metrics in items:
      loss = float(metrics[self._loss_key])
      if not math.isfinite(loss):
        raise NonFiniteLossError(f"{self._loss_key} became {loss} at step {step}")
    if not items:
      return {}
    return {k: float(np.mean([m[k] for _, m in items])) for k in items[0][1]}


def progress_bar(total: int, initial: int, description: str):
  """A tqdm bar with rate and ETA (the loss is shown as a postfix); off when `CI=true`."""
  disable = os.environ.get("CI") == "true"
  return tqdm.tqdm(total=total, initial=initial, desc=description, unit="step",
                   dynamic_ncols=True, disable=disable, leave=False)
