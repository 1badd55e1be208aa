"""A workdir belongs to one config, and to one run at a time.

- `WORKDIR/config.json` holds the resolved config. Its fingerprint is every field except
  `IGNORED_FIELDS`, which cannot change results. A rerun whose fingerprint differs is refused
  with the differing fields; `config.json` is written (atomically) only after the check passes.
- `WORKDIR/.lock` is held with `fcntl.flock` for the life of the process that runs the job, and
  records its pid and host. The kernel releases it when the process dies, however it dies, so a
  stale lock never blocks. (On NFS, flock works where the mount supports locks.)
- A finished workdir (`results.json` readable, config matching) can be read without writing.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable

from kd_jax.checkpoint import atomic_write_json

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"

# Fields that cannot change results: where logs go and how often, checkpoint cadence and
# retention (a resumed run is identical to an uninterrupted one), how hosts find each other,
# how many devices the CPU is split into (the same sharded step; only float rounding moves),
# which trajectory-matching states are kept rather than recomputed (the same gradient),
# and where the dataset is stored (its name and splits are part of the fingerprint).
# A group name covers all its fields.
IGNORED_FIELDS = ("log", "checkpoint.every_steps", "checkpoint.keep", "mesh.coordinator_address",
                  "mesh.num_processes", "mesh.process_id", "mesh.cpu_devices", "data.data_dir",
                  "distill.keep_every")


class WorkdirError(ValueError):
  """The workdir cannot be used for this run (another config's, in use, or not a directory)."""


def config_dict(config) -> dict:
  """A ConfigDict as the plain JSON dict stored in `config.json`."""
  return json.loads(config.to_json_best_effort())


def flatten(tree, prefix: str = "") -> dict:
  """`{"a": {"b": 1}, "t": [{"c": 2}]}` -> `{"a.b": 1, "t.0.c": 2}`; empty groups stay `{}`."""
  if isinstance(tree, list) and any(isinstance(x, dict) for x in tree):
    tree = {str(i): x for i, x in enumerate(tree)}
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def _ignored(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in IGNORED_FIELDS)


def fingerprint(config: dict) -> dict:
  """The fields of `config` (dotted names) that determine results."""
  return {k: v for k, v in flatten(config).items() if not _ignored(k)}


def config_diff(old: dict, new: dict) -> list[str]:
  """`"field: old → new"` for each fingerprinted field that differs."""
  old, new = fingerprint(old), fingerprint(new)
  missing = "(absent)"
  return [f"{k}: {old.get(k, missing)!r} → {new.get(k, missing)!r}"
          for k in sorted({*old, *new}) if old.get(k, missing) != new.get(k, missing)]


def check_path(path: str) -> None:
  """Raises WorkdirError if `path`, or the first existing directory above it, is not a directory."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is a file" if existing == os.path.abspath(path) else f"is below a file ({existing})"
    raise WorkdirError(f"--workdir={path} {what}, not a directory. Choose another --workdir.")


def check_config(path: str, config: dict, relevant: Callable[[dict], dict] | None = None) -> bool:
  """Checks `config` against the one stored in `path`; returns whether one is stored.

  `relevant(config) -> config` keeps the part results depend on (applied to both sides, so a
  stored config that holds more fields than this run reads still matches).

  Raises:
    WorkdirError: the stored config differs (the message lists the fields), cannot be read, or
      is missing from a workdir that holds other files.
  """
  stored_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(stored_path):
    leftovers = sorted(set(os.listdir(path)) - {LOCK_FILE}) if os.path.isdir(path) else []
    if leftovers:
      raise WorkdirError(
          f"--workdir={path} holds files ({', '.join(leftovers[:5])}) but no {CONFIG_FILE}, so "
          "which config made them is unknown. Use a fresh --workdir, or put back the "
          f"{CONFIG_FILE} of the run that made them.")
    return False
  try:
    with open(stored_path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{stored_path} cannot be read ({e}); use a fresh --workdir.") from None
  if relevant is not None:
    stored, config = relevant(stored), relevant(config)
  diffs = config_diff(stored, config)
  if diffs:
    listed = "\n".join(f"  {d}" for d in diffs)
    raise WorkdirError(
        f"--workdir={path} belongs to a run with another config; its results would not be this "
        f"config's. Differing fields (workdir → now):\n{listed}\n"
        "Use a fresh --workdir for the new config, or rerun with the workdir's config "
        f"({stored_path}).")
  return True


def read_results(path: str):
  """The parsed `results.json` of `path`, or None if it is missing or unreadable (then said on
  stderr, and the job recomputes it)."""
  results_path = os.path.join(path, RESULTS_FILE)
  if not os.path.exists(results_path):
    return None
  try:
    with open(results_path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    print(f"{results_path} is unreadable ({e}); recomputing the results", file=sys.stderr)
    return None


class Lock:
  """Holds `WORKDIR/.lock` (fcntl.flock, non-blocking) until `release()` or the process ends.

  Raises:
    WorkdirError: another process holds it; the message gives that process's pid and host.
  """

  def __init__(self, path: str):
    self.path = os.path.join(path, LOCK_FILE)
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "an unknown process"
      self._file.close()
      raise WorkdirError(
          f"--workdir={path} is in use by {holder}. Wait for that run to finish (or stop it), "
          "or use another --workdir.") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()} on host {socket.gethostname()} "
                     f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    self._file.flush()

  def release(self) -> None:
    self._file.close()  # closing the descriptor releases the flock


def claim(path: str, config: dict, *, primary: bool = True,
          relevant: Callable[[dict], dict] | None = None) -> Lock | None:
  """Makes `path` this run's: creates it, locks it, checks the config, writes `config.json`.

  Args:
    path: the workdir.
    config: the resolved config (`config_dict(config)`).
    primary: False on all processes of a multi-host run but the first: they only create the
      directory; the first locks it and writes the config.
    relevant: the part of a config results depend on (see `check_config`).
  Returns:
    The held lock (None when not primary); keep it for the run's life.
  """
  os.makedirs(path, exist_ok=True)
  if not primary:
    return None
  lock = Lock(path)
  try:
    check_config(path, config, relevant)  # again, now that no other run can write in between
    atomic_write_json(os.path.join(path, CONFIG_FILE), config)
  except BaseException:
    lock.release()
    raise
  return lock


# errno -> (what is wrong, how to fix it); {field} is the flag or config field of the path.
_WRITABLE = "make it writable for this user, or choose another {field}"
_FREE_SPACE = ("free some space and rerun: the run resumes from its last complete checkpoint, "
               "which is kept")
_FILE_IN_THE_WAY = ("a file is where a directory should be", "move the file, or choose another {field}")
_OS_ERRORS = {
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
    errno.EROFS: ("read-only file system", "choose a {field} on a writable file system"),
    errno.ENOSPC: ("no space left on the device", _FREE_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _FREE_SPACE),
    errno.ENOTDIR: _FILE_IN_THE_WAY,
    errno.EEXIST: _FILE_IN_THE_WAY,
}


def describe_os_error(error: OSError, paths: dict[str, str]) -> str | None:
  """A one-line message for an OSError the user can fix, or None for other errors.

  Args:
    error: the error.
    paths: `{field name: path}`, e.g. `{"--workdir": W, "data.data_dir": D}`; the message names
      the field whose path (the innermost) holds the failing file.
  """
  if error.errno not in _OS_ERRORS:
    return None
  what, fix = _OS_ERRORS[error.errno]
  filename = os.path.abspath(os.fspath(error.filename)) if error.filename else ""
  roots = {name: os.path.abspath(os.path.expanduser(root)) for name, root in paths.items()}
  owners = [name for name, root in roots.items()
            if filename and (filename + os.sep).startswith(root + os.sep)]
  field = max(owners, key=lambda name: len(roots[name]), default=None)
  where = ": ".join(filter(None, (field, filename))) or "writing"
  return f"{where}: {what}; {fix.format(field=field or 'path')}."
