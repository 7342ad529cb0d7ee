"""Process memory: glibc heap tuning and the free memory the default pool may take."""

from __future__ import annotations

import ctypes
import resource
import sys

import psutil

HEAP_KEEP = 64 << 20  # freed heap memory glibc keeps for reuse (see keep_heap_warm)


def keep_heap_warm() -> None:
  """Tells glibc malloc to serve blocks up to 32 MB (its ceiling) from the heap and to keep up
  to HEAP_KEEP of freed memory at the top of a heap instead of handing it back to the OS at
  every free (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). XLA-CPU mallocs each run's temporaries; a
  temporary of megabytes freed and allocated again on every decode step otherwise comes back
  as fresh pages, page-faulted in again each time. The bound is per malloc arena (malloc_trim
  does not shrink other threads' arenas); in the engine only XLA's executing thread makes such
  temporaries. Measurements and the rejected alternative (M_TOP_PAD): BUILD_NOTES "Measurements moved out of the code"."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (fixed; 32 MB is the most glibc accepts)
    libc.mallopt(-1, HEAP_KEEP)  # M_TRIM_THRESHOLD
  except (OSError, AttributeError):
    pass  # not glibc: nothing to do


def return_freed_memory() -> None:
  """Hands the heap's free pages back to the OS (glibc malloc_trim): restoring and re-encoding
  the dense params frees memory that would otherwise stay resident and be planned around."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass  # not glibc: nothing to do


def available_ram() -> int:
  """Memory the OS can give without swapping (MemAvailable on Linux)."""
  return int(psutil.virtual_memory().available)


def peak_rss() -> int:
  """The process's peak resident set in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
      1 if sys.platform == "darwin" else 1024)
