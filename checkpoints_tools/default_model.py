"""The model `python -m lazymoe_jax.generate` runs when no --model is given.

Built on first use into the user's cache folder ($LAZYMOE_CACHE, else $XDG_CACHE_HOME or
~/.cache, under lazymoe_jax/), then reused. A cached store that is incomplete or does not
match the expected config is rebuilt, never trusted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

from checkpoints_tools import convert_hf, make_tiny
from lazymoe_jax import config as config_lib
from lazymoe_jax.errors import LazyMoEError
from lazymoe_jax.store import format as fmt

NAME = "tiny-random-mixtral-v1"
DESCRIPTION = ("the built-in tiny Mixtral (random weights, real stdlib-trained tokenizer; it "
               "produces gibberish until the trained demo model lands)")


def cache_dir() -> str:
  root = os.environ.get("LAZYMOE_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lazymoe_jax")
  return root


def _is_current(store: str) -> bool:
  try:
    manifest = fmt.read_manifest(store)
  except LazyMoEError:
    return False
  expected = config_lib.from_hf(make_tiny.TINY_CONFIG).to_dict()
  return manifest.get("config") == expected


def ensure_default_store(log: Callable[[str], None] = print, rebuild: bool = False) -> str:
  store = os.path.join(cache_dir(), "stores", NAME)
  if not rebuild and _is_current(store):
    return store
  log(f"building {DESCRIPTION} into {store} (first use) ...")
  os.makedirs(os.path.dirname(store), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(store)) as tmp:
    hf_dir = make_tiny.make_tiny(os.path.join(tmp, "hf"))
    convert_hf.convert(hf_dir, store, overwrite=True, log=log)
  return store


def remove_default_store() -> None:
  shutil.rmtree(os.path.join(cache_dir(), "stores", NAME), ignore_errors=True)
