"""Reads one routed expert of one layer into caller buffers.

The expert arrays are tensorstore zarr3 arrays (opened here to check their metadata against the
manifest); one chunk = one (layer, expert) and the chunk files are raw bytes, so the hot path
reads those files itself, bypassing the page cache (O_DIRECT on Linux, F_NOCACHE on macOS,
see uncached_read_mechanism), on a pool of reader threads (see read_chunk)."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
import warnings
import zlib

import numpy as np
import tensorstore as ts

from lazymoe_jax.errors import StoreError
from lazymoe_jax.model import encodings
from lazymoe_jax.store import format as fmt


DIRECT_ALIGN = 4096  # O_DIRECT needs buffer address, offset and length aligned (4 KiB is safe)
# Reads a computation waits for, and speculative ones on their own threads, so that a queue of
# prefetches never delays a miss.
_READERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="lazymoe-read")
_PREFETCHERS = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                     thread_name_prefix="lazymoe-prefetch")


_MECHANISM: str | None = None  # uncached_read_mechanism's choice, made on first use
_WARNED: set[str] = set()
_CACHED_WARNING = ("the OS page cache keeps a second copy of the expert bytes read: a memory "
                   "cgroup's figures include it, RSS and the memory plan do not, so a budget "
                   "can be exceeded. For exact figures run on Linux (O_DIRECT, posix_fadvise) "
                   "or macOS (F_NOCACHE).")


def _warn_once(key: str, message: str) -> None:
  if key not in _WARNED:
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def uncached_read_mechanism() -> str:
  """How expert chunks are read past the OS page cache, chosen once per process: "o_direct"
  where os has O_DIRECT (Linux), else "f_nocache" where fcntl has F_NOCACHE (macOS), else
  "buffered" with a one-time warning that the page cache is then not bypassed."""
  global _MECHANISM  # pylint: disable=global-statement
  if _MECHANISM is None:
    try:
      import fcntl  # pylint: disable=import-outside-toplevel  (absent on Windows)
    except ImportError:
      fcntl = None
    if hasattr(os, "O_DIRECT"):
      _MECHANISM = "o_direct"
    elif fcntl is not None and hasattr(fcntl, "F_NOCACHE"):
      _MECHANISM = "f_nocache"
    else:
      _MECHANISM = "buffered"
      if not hasattr(os, "posix_fadvise"):
        _warn_once("page-cache", "this platform has neither O_DIRECT nor F_NOCACHE nor "
                   "posix_fadvise: expert reads go through the page cache, which is not "
                   "bypassed, so " + _CACHED_WARNING)
  return _MECHANISM


def _no_cache(fd: int) -> None:
  """macOS: reads on fd no longer fill the page cache."""
  import fcntl  # pylint: disable=import-outside-toplevel
  fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)


def _drop_from_page_cache(fd: int) -> None:
  """The pool is the expert cache: do not let the OS page cache keep a second, unbounded copy
  (it would be charged to the memory budget and make "fits in N GB" untrue). A no-op, with a
  one-time warning, where os has no posix_fadvise (macOS, Windows)."""
  if not hasattr(os, "posix_fadvise"):
    _warn_once("page-cache", "os.posix_fadvise is not available on this platform: pages read "
               "through the cache are not dropped after use, so " + _CACHED_WARNING)
    return
  os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_file_from_page_cache(path: str) -> None:
  """_drop_from_page_cache for a path (a missing file has nothing cached)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    _drop_from_page_cache(fd)
  finally:
    os.close(fd)


SPECULATIVE_PIECE = 1 << 20  # a guess reads in pieces this size, each after demand reads


class Cancelled(Exception):
  """A speculative read stopped before its end (its guess turned out unneeded)."""


class DemandGate:
  """Demand first: speculative reads go on only while no demand read is in flight.

  Demand reads register when submitted and leave as each chunk completes; a speculative read
  is cut into SPECULATIVE_PIECE pieces and waits here before each piece, so a guess delays a
  demand read by at most one piece already on its way to the disk. A guess can also be
  cancelled between pieces (`cancel` set): then it stops and its slot is empty."""

  def __init__(self):
    self._cond = threading.Condition()
    self._demand = 0

  def demand_start(self, n: int = 1) -> None:
    with self._cond:
      self._demand += n

  def demand_stop(self, _future=None) -> None:
    with self._cond:
      self._demand -= 1
      if not self._demand:
        self._cond.notify_all()

  @property
  def demand_in_flight(self) -> int:
    with self._cond:
      return self._demand

  def wait_idle(self, cancel: threading.Event | None = None) -> None:
    """Blocks while demand reads are in flight; raises Cancelled once `cancel` is set."""
    with self._cond:
      while self._demand and not (cancel is not None and cancel.is_set()):
        self._cond.wait(0.01)  # polls for `cancel`, set without the lock
    if cancel is not None and cancel.is_set():
      raise Cancelled


class _Speculative:
  """How one speculative chunk read proceeds: through `gate`, until `cancel`; `done` bytes."""

  def __init__(self, gate: DemandGate, cancel: threading.Event):
    self.gate, self.cancel, self.done = gate, cancel, 0


def _pread_into(fd: int, view: memoryview, offset: int, busy: "BusyClock | None" = None,
                spec: _Speculative | None = None) -> None:
  """Reads all of view from offset; a speculative read (`spec`) in pieces, each after the
  demand gate. `busy` runs during the reads only (not while a piece waits at the gate)."""
  done = 0
  while done < len(view):
    end = len(view) if spec is None else min(len(view), done + SPECULATIVE_PIECE)
    if spec is not None:
      spec.gate.wait_idle(spec.cancel)
    if busy is not None:
      busy.start()
    try:
      while done < end:
        n = os.preadv(fd, [view[done:end]], offset + done)
        if n == 0:
          raise EOFError
        done += n
        if spec is not None:
          spec.done += n
    finally:
      if busy is not None:
        busy.stop()


def read_chunk(path: str, buf: np.ndarray, crc32: int, busy: "BusyClock | None" = None,
               spec: _Speculative | None = None) -> None:
  """Reads one chunk file into `buf`. A chunk file is the array's raw bytes (zarr3 "bytes"
  codec, see format.zarr3_spec), so it is read straight into the slot with O_DIRECT: no page
  cache copy, and one large request the block layer splits into many in flight, faster than
  tensorstore's buffered read of the same chunks (BUILD_NOTES "O_DIRECT expert reads"). Falls back
  to a buffered read (then drops the pages) where O_DIRECT is refused or the buffer is not
  aligned; on macOS reads with F_NOCACHE instead (uncached_read_mechanism). Then checks the
  bytes against the crc32 recorded at conversion (on the reader thread, overlapping the other
  reads). Raises StoreError naming the file when it is missing,
  has the wrong size or the wrong checksum. `busy` (a BusyClock) runs during the reads only,
  not the checksum. `spec`: a speculative read, in pieces behind demand reads (DemandGate);
  raises Cancelled when its guess was cancelled."""
  if not buf.flags.c_contiguous:
    raise ValueError("read_chunk needs a C-contiguous buffer (a reshape would read into a copy)")
  view = memoryview(buf.reshape(-1).view(np.uint8))
  mechanism = uncached_read_mechanism()
  aligned = mechanism == "o_direct" and buf.ctypes.data % DIRECT_ALIGN == 0
  head = len(view) - len(view) % DIRECT_ALIGN if aligned else 0
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError as e:
    # tensorstore writes no file for a chunk equal to the fill value (all zeros): a zero
    # chunk is what the manifest's checksum says, or the file really is missing
    view[:] = b"\0" * len(view)
    if zlib.crc32(view) == crc32:
      return
    raise StoreError(f"expert chunk {path} is missing; the store is incomplete: re-convert the "
                     "model with --overwrite.") from e
  try:
    size = os.fstat(fd).st_size
    if size != len(view):
      raise StoreError(f"expert chunk {path} has {size} bytes where the manifest implies "
                       f"{len(view)} (truncated or damaged); re-convert the model with "
                       "--overwrite.")
    if mechanism == "f_nocache":
      _no_cache(fd)
    if head:
      try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
      except OSError:  # e.g. tmpfs: no O_DIRECT
        head = 0
      else:
        try:
          _pread_into(dfd, view[:head], 0, busy, spec)
        except (OSError, EOFError):  # refused or short direct read: the buffered path below
          head = 0
        finally:
          os.close(dfd)
    _pread_into(fd, view[head:], head, busy, spec)
    if head < len(view) and mechanism != "f_nocache":
      _drop_from_page_cache(fd)
  except EOFError as e:
    raise StoreError(f"expert chunk {path} ended early (truncated while reading?); re-convert "
                     "the model with --overwrite.") from e
  finally:
    os.close(fd)
  if zlib.crc32(view) != crc32:
    raise StoreError(f"expert chunk {path} is corrupt (crc32 mismatch with the manifest); "
                     "re-convert the model with --overwrite.")


class BusyClock:
  """Seconds during which at least one read was in flight: how busy the disk was kept (the
  rest of the wall time it sat idle, whatever its speed)."""

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self._lock = threading.Lock()
    self._in_flight = 0
    self._since = 0.0
    self._busy = 0.0

  def start(self) -> None:
    with self._lock:
      if not self._in_flight:
        self._since = self._clock()
      self._in_flight += 1

  def stop(self) -> None:
    with self._lock:
      self._in_flight -= 1
      if not self._in_flight:
        self._busy += self._clock() - self._since

  def seconds(self) -> float:
    with self._lock:
      return self._busy + (self._clock() - self._since if self._in_flight else 0.0)


class ExpertStore:
  """Handles to the expert arrays; knows shapes and bytes without reading any data."""

  def __init__(self, store_dir: str, manifest: dict):
    self.store_dir = store_dir
    self.disk_busy = BusyClock()
    self.gate = DemandGate()
    ex = manifest["experts"]
    self.layers: list[int] = list(ex["layers"])  # model layer index of each array row
    self.row = {layer: r for r, layer in enumerate(self.layers)}
    self.encoding = encodings.get(ex["encoding"])
    self.specs = ex["tensors"]  # array name -> {path, shape, dtype, tensor, suffix, encoding}
    try:
      self.tensor_encodings = {s["tensor"]: encodings.get(s["encoding"])
                               for s in self.specs.values()}
    except ValueError as e:
      raise StoreError(f"{store_dir}: {e} The store was written by another version; re-convert "
                       "with --overwrite.") from e
    weights = {t: e.name for t, e in self.tensor_encodings.items() if t.startswith("w_")}
    if set(weights.values()) != {self.encoding.name}:
      raise StoreError(f"{store_dir}: expert weights in {weights} where the manifest says "
                       f"{self.encoding.name}; re-convert with --overwrite.")
    self.crc32 = {name: ex["crc32"][name] for name in self.specs}
    self.dtypes = {n: fmt.numpy_dtype(s["dtype"]) for n, s in self.specs.items()}
    self.shapes = {n: tuple(s["shape"][2:]) for n, s in self.specs.items()}
    self.nbytes = {n: int(np.prod(self.shapes[n])) * self.dtypes[n].itemsize for n in self.specs}
    self.bytes_per_expert = sum(self.nbytes.values())
    self.num_experts = int(next(iter(self.specs.values()))["shape"][1])  # per layer

    self.arrays = {}
    for name, spec in self.specs.items():
      path = os.path.join(store_dir, spec["path"])
      try:
        arr = ts.open(fmt.zarr3_spec(path), open=True, read=True).result()
      except Exception as e:  # tensorstore raises ValueError subclasses with its own text
        raise StoreError(f"expert array {path} cannot be opened ({e}); the store is incomplete "
                         "or damaged: re-convert with --overwrite.") from e
      if tuple(arr.shape) != tuple(spec["shape"]):
        raise StoreError(f"expert array {path} has shape {arr.shape}, manifest says "
                         f"{spec['shape']}; re-convert with --overwrite.")
      self.arrays[name] = arr

  def chunk_path(self, name: str, row: int, expert: int) -> str:
    return fmt.chunk_path(self.store_dir, name, row, expert, len(self.specs[name]["shape"]))

  def as_tree(self, arrays: dict) -> dict[str, encodings.Weight]:
    """{array name: a} -> {tensor: Weight}, the form the expert programs take."""
    by_tensor: dict[str, dict] = {}
    for name, a in arrays.items():
      by_tensor.setdefault(self.specs[name]["tensor"], {})[self.specs[name]["suffix"]] = a
    return {t: encodings.Weight(self.tensor_encodings[t], a) for t, a in by_tensor.items()}

  def read_into(self, layer: int, expert: int, buffers: dict[str, np.ndarray]) -> int:
    """Reads expert `expert` of model layer `layer` into `buffers`; returns bytes read."""
    return self.finish_read(self.start_read(layer, expert, buffers))

  def start_read(self, layer: int, expert: int, buffers: dict[str, np.ndarray],
                 speculative: bool = False) -> tuple:
    """Starts reading every array of the expert into `buffers` (each chunk file on a reader
    thread, see read_chunk); returns a handle for finish_read. A demand read (the default)
    goes to the disk at once, as one request per chunk file, all of them in flight together;
    a speculative one waits behind every demand read (DemandGate) and can be cancelled."""
    row = self.row[layer]
    cancel = threading.Event()
    if speculative:
      specs = {name: _Speculative(self.gate, cancel) for name in self.arrays}
      futures = {name: _PREFETCHERS.submit(read_chunk, self.chunk_path(name, row, expert),
                                           buffers[name], self.crc32[name][row][expert],
                                           self.disk_busy, specs[name])
                 for name in self.arrays}
    else:
      specs = {}
      self.gate.demand_start(len(self.arrays))  # before any submit: no guess slips in first
      futures = {}
      for name in self.arrays:
        futures[name] = _READERS.submit(read_chunk, self.chunk_path(name, row, expert),
                                        buffers[name], self.crc32[name][row][expert],
                                        self.disk_busy)
        futures[name].add_done_callback(self.gate.demand_stop)
    return layer, expert, futures, buffers, cancel, specs

  @staticmethod
  def cancel(handle: tuple) -> None:
    """Stops a speculative read at its next piece (finish_read then raises Cancelled)."""
    handle[4].set()

  def bytes_done(self, handle: tuple) -> int:
    """Bytes a read has taken from the disk so far (all of them for a demand read)."""
    if not handle[5]:
      return self.bytes_per_expert
    return sum(s.done for s in handle[5].values())

  @staticmethod
  def read_done(handle: tuple) -> bool:
    return all(f.done() for f in handle[2].values())

  @staticmethod
  def wait_quietly(handle: tuple) -> None:
    """Waits until no thread writes into the handle's buffers any more, whatever the outcome
    (before its slot is reused after an error or an interrupt)."""
    concurrent.futures.wait(list(handle[2].values()))

  def finish_read(self, handle: tuple) -> int:
    """Waits for a started read (every chunk of it, before judging any); returns bytes read.
    Any failure is a StoreError naming the chunk file; a cancelled guess raises Cancelled."""
    layer, expert, futures = handle[:3]
    # every chunk waited for first. A failure is raised as a new exception, never the one the
    # future holds: raising that one here would add this frame to its traceback, and the
    # future (referenced from this frame) holding it would make a reference cycle that keeps
    # this frame's callers alive (the decode step: its activations, the batch's KV stack)
    # until the garbage collector finds it (BUILD_NOTES "The server's memory beyond its plan")
    concurrent.futures.wait(list(futures.values()))
    failed = {name: fut.exception() for name, fut in futures.items()
              if fut.exception() is not None}
    if any(isinstance(e, Cancelled) for e in failed.values()):
      raise Cancelled
    for name, e in failed.items():
      if isinstance(e, StoreError):
        raise StoreError(str(e)) from e.__cause__
      path = self.chunk_path(name, self.row[layer], expert)
      raise StoreError(f"reading expert {expert} of layer {layer} failed at {path}: {e}. The "
                       "store is damaged: re-convert with --overwrite.") from e
    return self.bytes_per_expert
