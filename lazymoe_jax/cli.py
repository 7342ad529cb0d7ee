"""What every command-line entry point does around its work."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags, logging

from lazymoe_jax.errors import LazyMoEError


def run(work: Callable[[], object]) -> None:
  """Quiet library logging (orbax logs every save and restore at INFO) unless --verbosity was
  given, then run `work`; a LazyMoEError or ValueError ends the program with its message (no
  traceback: the messages say what is wrong and what to do)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    work()
  except (LazyMoEError, ValueError) as e:
    sys.exit(f"error: {e}")
