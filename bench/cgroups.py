"""Memory caps and cold page caches for the benchmarks (bench_stream, bench_120b, bench_serve,
vs_llamacpp): one fresh cgroup v1 memory cgroup per measured process, and the model's files
dropped from the page cache before it starts.

A process joins its cgroup before exec (`MemoryCgroup.command` wraps its command line), so
every page it ever touches, page cache included, is charged to it from the first byte. Page
cache stays charged to the cgroup that first read it, even after the reader exits, which is
why each measured process gets a fresh cgroup and why the files are dropped from the page
cache first: a page still cached from an earlier reader (the converter, a previous run) would
be neither read from disk nor charged to the new cgroup.

Importing this module loads neither JAX nor the engine (llama.cpp's measured process uses it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import mmap
import os

import numpy as np

CGROUP_ROOT = "/sys/fs/cgroup/memory"
_names = itertools.count()


def require(what: str) -> None:
  """A clear exit where cgroup v1 memory cgroups cannot be made (not root, or cgroup v2)."""
  if not os.access(CGROUP_ROOT, os.W_OK):
    raise SystemExit(f"error: {CGROUP_ROOT} is not writable: {what} needs root and cgroup v1 "
                     "with the memory controller.")


class MemoryCgroup:
  """A fresh memory cgroup under CGROUP_ROOT, capped at `limit` bytes (None: measure only),
  removed on exit (its charged page cache emptied first). Use as a context manager."""

  def __init__(self, name: str, limit: int | None = None):
    self.path = os.path.join(CGROUP_ROOT,
                             f"lazymoe_{name.replace('+', '_')}_{os.getpid()}_{next(_names)}")
    self.limit = limit

  def __enter__(self) -> MemoryCgroup:
    os.mkdir(self.path)  # fresh: an existing one would carry another run's charges
    if self.limit is not None:
      self.set_limit(self.limit)
    self.reset_peak()
    return self

  def __exit__(self, *exc) -> None:
    try:
      self._write("memory.force_empty", 0)  # drop the page cache still charged here
    except OSError:
      pass  # a process still inside (force_empty refuses): rmdir reparents the charges
    os.rmdir(self.path)

  def _write(self, name: str, value) -> None:
    with open(os.path.join(self.path, name), "w") as f:
      f.write(str(value))

  def stat_file(self, name: str) -> str:
    """One of the cgroup's files, e.g. memory.limit_in_bytes."""
    with open(os.path.join(self.path, name)) as f:
      return f.read()

  def command(self, cmd: list[str], cpus: list[int] | None = None) -> list[str]:
    """`cmd` started inside the cgroup: a shell that moves itself in, then execs it (pinned to
    `cpus` with taskset when given), so the command is charged for everything from its first
    byte. A shell rather than subprocess's preexec_fn: the parents here have JAX's threads
    running, and Python code between fork and exec in a threaded process can deadlock."""
    pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path, *pin, *cmd]

  def set_limit(self, limit: int) -> None:
    """Raises OSError (EBUSY) when usage is above `limit` and cannot be reclaimed."""
    self._write("memory.limit_in_bytes", int(limit))
    self.limit = limit

  def reset_peak(self) -> None:
    self._write("memory.max_usage_in_bytes", 0)

  def peak_bytes(self) -> int:
    return int(self.stat_file("memory.max_usage_in_bytes"))

  def oom_kills(self) -> int:
    return int(dict(l.split() for l in self.stat_file("memory.oom_control").splitlines())
               .get("oom_kill", 0))

  def stat(self) -> dict[str, int]:
    return {k: int(v) for k, v in (l.split() for l in self.stat_file("memory.stat").splitlines())}


def own() -> MemoryCgroup | None:
  """The MemoryCgroup this process runs in (None outside one): a measured process reads its
  own peak or memory.stat at the end of a phase (e.g. after loading) with it."""
  for line in open("/proc/self/cgroup"):
    if ":memory:" in line:
      path = CGROUP_ROOT + line.strip().split(":", 2)[2]
      if os.path.basename(path).startswith("lazymoe_"):
        cg = MemoryCgroup.__new__(MemoryCgroup)
        cg.path, cg.limit = path, None
        return cg
  return None


# ---- cold page cache ----------------------------------------------------------------------------
def files_under(*dirs_or_files: str) -> list[str]:
  out = []
  for p in dirs_or_files:
    if os.path.isfile(p):
      out.append(p)
    for root, _, names in os.walk(p):
      out.extend(os.path.join(root, n) for n in names)
  return out


def drop_page_cache(paths: list[str]) -> None:
  """Each file's pages out of the page cache (posix_fadvise DONTNEED). Dirty pages (a file just
  written) are not dropped by it, so each file is fsynced first."""
  # imported here: this module must not pull JAX into a measured process that is not the engine
  from lazymoe_jax.store.experts import drop_file_from_page_cache  # noqa: PLC0415
  for p in paths:
    try:
      fd = os.open(p, os.O_RDONLY)
    except OSError:
      continue  # gone: nothing cached
    try:
      os.fsync(fd)
    except OSError:
      pass
    finally:
      os.close(fd)
    drop_file_from_page_cache(p)


def drop_all_caches() -> None:
  """The whole machine's page cache, as `sync; echo 3 > /proc/sys/vm/drop_caches` (what
  shared/peers' run_capped.sh -c does): the measured process is then also charged for the
  libraries it maps (jaxlib, libllama). Every other process on the machine goes cold too."""
  os.sync()
  with open("/proc/sys/vm/drop_caches", "w") as f:
    f.write("3")


_libc = None


def cached_bytes(paths: list[str]) -> int:
  """Bytes of these files now in the page cache (mincore over a read-only mapping of each): 0
  after drop_page_cache is what "cold" means."""
  global _libc
  if _libc is None:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
  page, total = mmap.PAGESIZE, 0
  for p in paths:
    size = os.path.getsize(p)
    if not size:
      continue
    fd = os.open(p, os.O_RDONLY)
    try:
      addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
      if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap {p}")
      try:
        vec = ctypes.create_string_buffer((size + page - 1) // page)
        if _libc.mincore(addr, size, vec):
          raise OSError(ctypes.get_errno(), f"mincore {p}")
        total += int((np.frombuffer(vec.raw, np.uint8) & 1).sum()) * page
      finally:
        _libc.munmap(addr, size)
    finally:
      os.close(fd)
  return total
