"""Appends what a benchmark prints to benchmarks/RESULTS.md, with its command, machine and date.

Each script runs its `main` under `recorded(title)`: the figures go to the terminal as usual and,
when the script finishes without an error, into RESULTS.md as a new dated section. Pass
`--no_record` to a script to print only: importing this module takes it out of `sys.argv`, so
scripts import it before they parse their flags.
"""
import contextlib
import datetime
import io
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
NO_RECORD = "--no_record"
RECORD = NO_RECORD not in sys.argv
if not RECORD:
  sys.argv.remove(NO_RECORD)


class _Tee(io.TextIOBase):
  """A text stream writing to several streams."""

  def __init__(self, *streams):
    super().__init__()
    self._streams = streams

  def write(self, text):
    for stream in self._streams:
      stream.write(text)
    return len(text)

  def flush(self):
    for stream in self._streams:
      stream.flush()


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def machine() -> str:
  """One line: CPU model and count, load average, jax version and devices if jax is loaded."""
  parts = [f"{_cpu_model()}, {os.cpu_count()} CPUs", platform.system()]
  if hasattr(os, "getloadavg"):
    parts.append("load average at the end " + " / ".join(f"{v:.2f}" for v in os.getloadavg()))
  jax = sys.modules.get("jax")
  if jax is not None:
    devices = jax.devices()
    parts.append(f"jax {jax.__version__}, {len(devices)} {devices[0].device_kind} device(s)")
  return "; ".join(parts)


@contextlib.contextmanager
def recorded(title: str, *, enabled: bool = True, results: Path = RESULTS):
  """Tees stdout; on success appends `## title (date)`, the command, the machine and the output."""
  enabled = enabled and RECORD and not any(
      arg in ("-h", "--help", "--helpfull") for arg in sys.argv)
  command = "PYTHONPATH=. python " + shlex.join(sys.argv)
  buffer = io.StringIO()
  finished = None
  with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
    try:
      yield
    except SystemExit as exit_:  # absl's app.run exits at the end, with code 0 on success
      if exit_.code not in (0, None):
        raise
      finished = exit_
  if enabled:
    _append(results, title, command, buffer.getvalue())
  if finished is not None:
    raise finished


def _append(results: Path, title: str, command: str, output: str) -> None:
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  block = (f"\n## {title} ({date})\n\nCommand: `{command}`\n\nMachine: {machine()}\n\n"
           f"```\n{output.rstrip()}\n```\n")
  with open(results, "a") as f:
    f.write(block)
  print(f"(appended to {results})")
