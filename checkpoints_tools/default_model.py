"""The model `python -m lazymoe_jax.generate` runs when no --model is given: the shipped demo.

The demo checkpoint ships inside the package (`lazymoe_jax/demo_model/`, Hugging Face Mixtral
layout, trained by `checkpoints_tools/train_demo.py`). On first use it is converted into a store
in the user's cache folder ($LAZYMOE_CACHE, else $XDG_CACHE_HOME or ~/.cache, under
lazymoe_jax/), then reused. A cached store that is incomplete, or was built from other files
than the shipped ones (a stamp beside it records their sha256), is rebuilt, never trusted.
Conversion holds a lock file beside the store, so that two first runs do not write the same
store at once: the second waits, then reuses the store the first built.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import filelock

import lazymoe_jax
from checkpoints_tools import convert_hf
from lazymoe_jax.errors import LazyMoEError
from lazymoe_jax.store import format as fmt

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(lazymoe_jax.__file__)), "demo_model")
NAME = "demo-mixtral-stdlib"
DESCRIPTION = "the shipped demo model (a small Mixtral trained on the Python standard library)"


def cache_dir() -> str:
  return os.environ.get("LAZYMOE_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lazymoe_jax")


def store_path() -> str:
  return os.path.join(cache_dir(), "stores", NAME)


def _fingerprint() -> dict[str, str]:
  out = {}
  for name in sorted(os.listdir(DEMO_DIR)):
    with open(os.path.join(DEMO_DIR, name), "rb") as f:
      out[name] = hashlib.sha256(f.read()).hexdigest()
  return out


def _stamp_path() -> str:
  return store_path() + ".source.json"


def _is_current(fingerprint: dict[str, str]) -> bool:
  try:
    fmt.read_manifest(store_path())
    with open(_stamp_path()) as f:
      return json.load(f) == fingerprint
  except (LazyMoEError, OSError, ValueError):
    return False


def _lock_path() -> str:
  return store_path() + ".lock"


def ensure_default_store(log: Callable[[str], None] = print, rebuild: bool = False) -> str:
  """Returns the cached demo store, converting the shipped checkpoint when needed.

  Args:
    log: progress messages.
    rebuild: convert again even if the store looks current (a load found it damaged).
  """
  fingerprint = _fingerprint()
  if not rebuild and _is_current(fingerprint):
    return store_path()
  os.makedirs(os.path.dirname(store_path()), exist_ok=True)
  # flock-based: released by the OS if the converting process dies, so never stale
  lock = filelock.FileLock(_lock_path())
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    log(f"waiting for another process converting {DESCRIPTION} into {store_path()} ...")
    lock.acquire()
  try:
    if not rebuild and _is_current(fingerprint):  # built by the process this one waited for
      return store_path()
    log(f"converting {DESCRIPTION} into {store_path()} (first use) ...")
    if os.path.exists(_stamp_path()):
      os.remove(_stamp_path())
    convert_hf.convert(DEMO_DIR, store_path(), overwrite=True, log=log)
    with open(_stamp_path(), "w") as f:
      json.dump(fingerprint, f)
    return store_path()
  finally:
    lock.release()
