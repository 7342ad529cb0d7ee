"""Continuous batching on the engine's public step API, on one thread that owns the engine.

Each step: admit queued jobs up to `parallel`; feed the next prompt chunk(s) of jobs still in
prefill (chunks start at multiples of `prefill_chunk`, whatever else runs, so a request's
numerics do not depend on its neighbours); then one `engine.feed_batch` over every job that is
decoding; sample each with its own Sampler (its seed, its own step index, as engine.generate
does). Jobs join and leave only at step boundaries; a cancelled job leaves at the next one.

The HTTP side never touches the engine: it submits jobs, reads `snapshot()`, and receives
events through each job's `emit` callback (called on the engine thread).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from lazymoe_jax.detokenize import IncrementalDecoder
from lazymoe_jax.engine import memory
from lazymoe_jax.sampling import Sampler
from lazymoe_jax.server.protocol import APIError

log = logging.getLogger("lazymoe_jax.serve")

RATE_WINDOW_STEPS = 64  # tok/s figures over the last this many steps (kept while idle)
BUSY_WINDOW_S = 10.0  # disk busy % over this much wall time
PREALLOC_POSITIONS = 4096  # sessions up to this long get their whole KV cache at once


@dataclasses.dataclass(eq=False)
class Job:
  """One generation. Fields after `emit` belong to the engine thread.

  emit(event) receives, in order: {"type": "token", "text", "token_id", "logprob",
  "top_logprobs"} per generated token that is shown (text may be "" while held back), then
  {"type": "done", "finish_reason", "text", "prompt_tokens", "completion_tokens"} (text: what
  was held back until the end), or {"type": "error", "error": APIError}.
  """

  prompt_ids: list[int]
  max_tokens: int
  sampler: Sampler
  emit: Callable[[dict], None]
  stop: list[str] = dataclasses.field(default_factory=list)
  top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
  cancelled: bool = False
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  # engine thread
  session: object = None
  fed: int = 0
  generated: list[int] = dataclasses.field(default_factory=list)
  pending_token: int | None = None  # sampled, not yet fed
  held: str = ""  # text that could be the start of a stop string
  detok: IncrementalDecoder | None = None
  first_token_s: float | None = None


class Scheduler:
  """Owns the engine on its own thread.

  Args:
    load: builds the engine (called on the engine thread; /health is 503 until it returns).
    parallel: most sequences in one batch.
    max_queue: most jobs waiting for a place in the batch; more is a 503.
    prefill_chunk: prompt tokens fed per step (between decode steps).
    warmup: compile the prefill and decode programs before reporting ready.
  """

  def __init__(self, load: Callable[[], object], parallel: int = 8, max_queue: int = 64,
               prefill_chunk: int = 64, warmup: bool = True):
    if parallel < 1 or max_queue < 0 or prefill_chunk < 1:
      raise ValueError("parallel and prefill_chunk must be >= 1, max_queue >= 0.")
    self._load = load
    self.parallel = parallel
    self.max_queue = max_queue
    self.prefill_chunk = prefill_chunk
    self.warmup = warmup
    self.engine = None
    self.ready = threading.Event()
    self.load_error: BaseException | None = None
    self._cond = threading.Condition()
    self._queue: collections.deque[Job] = collections.deque()
    self._active: list[Job] = []
    self._stopping = False
    self._thread = threading.Thread(target=self._main, name="lazymoe-engine", daemon=True)
    # figures (written on the engine thread under _cond, read by snapshot())
    self._counts = collections.Counter()
    # (tokens, seconds, experts the step ran: acquires, or the resident program's count)
    self._decode_steps = collections.deque(maxlen=RATE_WINDOW_STEPS)
    self._prefill_steps = collections.deque(maxlen=RATE_WINDOW_STEPS)
    self._busy = collections.deque()  # (wall time, disk_busy_s)
    self._engine_stats: dict = {}
    self._kv_active = 0
    self._kv_peak = 0
    self._ttft = collections.deque(maxlen=RATE_WINDOW_STEPS)
    self._freed = False  # a session's KV cache was freed since the heap was last trimmed

  # ---- HTTP side ------------------------------------------------------------------------------
  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    self._thread.join(timeout)

  def submit(self, job: Job) -> None:
    """Queues a job, or raises APIError 503 (loading, queue full)."""
    with self._cond:
      if not self.ready.is_set():
        raise APIError(503, "the model is still loading; retry when GET /health answers 200.",
                       code="model_loading")
      # queued jobs a free running slot will take do not count against max_queue: the engine
      # thread admits them at its next step, and a burst arriving before that step would
      # otherwise find the queue "full" of jobs about to run (a flaky 503 in tests/test_serve)
      free = max(0, self.parallel - len(self._active))
      if len(self._queue) >= self.max_queue + free:
        raise APIError(503, f"the queue is full ({self.max_queue} requests waiting, "
                       f"{len(self._active)} running); retry later or start the server with "
                       "a larger --max_queue.", code="queue_full")
      self._queue.append(job)
      self._counts["submitted"] += 1
      self._cond.notify_all()

  def cancel(self, job: Job) -> None:
    """The job leaves at the next step (a client went away)."""
    with self._cond:
      if not job.cancelled:
        job.cancelled = True
        self._cond.notify_all()

  def snapshot(self) -> dict:
    """The server's and the engine's figures, safe to call from any thread."""
    with self._cond:
      dec_tok = sum(n for n, _, _ in self._decode_steps)
      dec_s = sum(s for _, s, _ in self._decode_steps)
      dec_experts = sum(e for _, _, e in self._decode_steps)
      pre_tok = sum(n for n, _ in self._prefill_steps)
      pre_s = sum(s for _, s in self._prefill_steps)
      busy = 0.0
      if len(self._busy) >= 2 and self._busy[-1][0] > self._busy[0][0]:
        busy = ((self._busy[-1][1] - self._busy[0][1]) / (self._busy[-1][0] - self._busy[0][0]))
      return {
          "ready": self.ready.is_set(),
          "queue_depth": len(self._queue),
          "active_sequences": len(self._active),
          "decoding_sequences": sum(1 for j in self._active if j.pending_token is not None),
          "parallel": self.parallel,
          "max_queue": self.max_queue,
          "requests_submitted": self._counts["submitted"],
          "requests_finished": self._counts["finished"],
          "requests_cancelled": self._counts["cancelled"],
          "requests_failed": self._counts["failed"],
          "prompt_tokens": self._counts["prompt_tokens"],
          "generated_tokens": self._counts["generated_tokens"],
          "decode_steps": self._counts["decode_steps"],
          "decode_tokens_per_s": dec_tok / dec_s if dec_s else 0.0,
          "prompt_tokens_per_s": pre_tok / pre_s if pre_s else 0.0,
          "mean_batch": dec_tok / len(self._decode_steps) if self._decode_steps else 0.0,
          # experts run per generated token over all MoE layers: what batching shares (a step
          # runs each expert its sequences pick once)
          "decode_experts_per_token": dec_experts / dec_tok if dec_tok else 0.0,
          "disk_busy_fraction": min(max(busy, 0.0), 1.0),
          "time_to_first_token_s": float(np.mean(self._ttft)) if self._ttft else 0.0,
          "kv_cache_bytes_active": self._kv_active,
          "kv_cache_bytes_peak": self._kv_peak,
          "engine": dict(self._engine_stats),
      }

  # ---- engine thread --------------------------------------------------------------------------
  def _main(self) -> None:
    try:
      self.engine = self._load()
      if self.warmup:
        self._warm_up()
        self._return_freed_memory()
      self._refresh_stats()
    except BaseException as e:  # pylint: disable=broad-except  (reported by /health and logs)
      self.load_error = e
      log.error("loading the model failed: %s", e)
      return
    self.ready.set()
    log.info("model ready")
    while True:
      with self._cond:
        if self._stopping:
          return
        self._admit()
        if not self._active:
          self._cond.wait(timeout=0.5)
          self._refresh_stats_locked()
          continue
      self._step()
      if self._freed:
        self._return_freed_memory()

  def _return_freed_memory(self) -> None:
    """Hands the heap's free pages back to the OS (malloc_trim) once KV caches were freed.
    glibc keeps freed memory resident, and the caches (megabytes per layer, from the heap)
    and the programs compiled between them leave free holes no later allocation of another
    size reuses: after the warm-up on the 9 GB model under a 2 GB plan, 434 MB of the heap
    was free but resident, which the plan had counted as KV or margin already (BUILD_NOTES
    "The server's memory beyond its plan"). Once per step at most, on the engine thread."""
    self._freed = False
    memory.return_freed_memory()

  def _warm_up(self) -> None:
    """Compiles the programs a request needs (prompt buckets up to one chunk, batched decode
    at every shape the stack can take) so that no client waits for XLA (seconds on the demo
    model)."""
    eng = self.engine
    # a pool with a slot for every expert reads them all now, so that decode runs as one
    # program per step (Forward.whole_step_ready) from the first request, and is compiled so
    eng.load_all_experts()
    n_max = min(self.prefill_chunk, eng.max_context - 2)
    # varied ids: prefill compiles one expert program per bucket of tokens an expert gets, so
    # a prompt of one repeated token would compile only the largest
    rng = np.random.RandomState(0)
    size = 8
    while True:
      n = min(size, n_max)
      seq = eng.session(min(eng.max_context, n + 2))
      seq.feed(rng.randint(0, eng.spec.vocab_size, n).tolist())
      eng.feed_batch([seq], [int(rng.randint(0, eng.spec.vocab_size))])
      seq.close()
      self._return_freed_memory()
      if n >= n_max:
        break
      size *= 2
    # batched decode: the programs of every stack shape (slot count, capacity) a batch of up
    # to --parallel sequences can take under the engine's memory plan, derived from the rules
    # the stack is sized with (BatchCache.shapes); one layer of a stack held at a time, or one
    # whole stack where the step is one program (every expert resident)
    eng.batch.warm(self.parallel, rng)
    self._return_freed_memory()

  def _admit(self) -> None:
    while self._queue and self._queue[0].cancelled:
      self._finish_locked(self._queue.popleft(), None)
    while self._queue and len(self._active) < self.parallel:
      job = self._queue.popleft()
      if job.cancelled:
        self._finish_locked(job, None)
        continue
      self._active.append(job)

  def _step(self) -> None:
    eng = self.engine
    with self._cond:
      for job in [j for j in self._active if j.cancelled]:
        self._finish_locked(job, None)
    # prefill: whole chunks from the oldest jobs, up to prefill_chunk tokens per step
    budget = self.prefill_chunk
    t0 = time.perf_counter()
    fed = 0
    for job in [j for j in self._active if j.fed < len(j.prompt_ids)]:
      end = min(len(job.prompt_ids), (job.fed // self.prefill_chunk + 1) * self.prefill_chunk)
      if fed and fed + end - job.fed > budget:
        break
      try:
        if job.session is None:
          n = len(job.prompt_ids) + job.max_tokens
          job.session = eng.session(n if n <= PREALLOC_POSITIONS else None)
          job.detok = IncrementalDecoder(eng.tokenizer, job.prompt_ids)
        logits = job.session.feed(job.prompt_ids[job.fed:end])
      except Exception as e:  # pylint: disable=broad-except  (one job fails, the server goes on)
        self._fail(job, e)
        continue
      fed += end - job.fed
      job.fed = end
      if job.fed == len(job.prompt_ids):
        job.first_token_s = time.perf_counter() - job.submitted
        self._on_logits(job, logits)
      if fed >= budget:
        break
    t1 = time.perf_counter()
    if fed:
      with self._cond:
        self._prefill_steps.append((fed, t1 - t0))
        self._counts["prompt_tokens"] += fed
    # decode: one step for every job holding a sampled token
    batch = [j for j in self._active if j.pending_token is not None and not j.cancelled]
    for job in [j for j in batch if j.session.position >= j.session.max_context]:
      # cannot happen while sessions are sized prompt + max_tokens; if it does, it fails alone
      self._fail(job, ValueError(f"the sequence reached its context of "
                                 f"{job.session.max_context} positions"))
      batch.remove(job)
    if batch:
      acquires = eng.pool.hits + eng.pool.misses
      try:
        logits = eng.feed_batch([j.session for j in batch], [j.pending_token for j in batch])
      except Exception as e:  # pylint: disable=broad-except
        for job in batch:
          self._fail(job, e)
        batch = []
      t2 = time.perf_counter()
      for job, row in zip(batch, logits if batch else []):
        self._on_logits(job, row)
      if batch:
        with self._cond:
          self._decode_steps.append((len(batch), t2 - t1,
                                     eng.pool.hits + eng.pool.misses - acquires))
          self._counts["decode_steps"] += 1
    self._refresh_stats()

  def _on_logits(self, job: Job, logits: np.ndarray) -> None:
    """Samples the next token of job and emits what it shows; ends the job when done. A
    failure here (the sampler, or a tokenizer that cannot decode the model's token, as in a
    store whose tokenizer has fewer pieces than the model's vocabulary) fails this job alone;
    before, it ended the engine thread and every client waited forever."""
    try:
      self._sample_and_emit(job, logits)
    except Exception as e:  # pylint: disable=broad-except  (one job fails, the server goes on)
      self._fail(job, e)

  def _sample_and_emit(self, job: Job, logits: np.ndarray) -> None:
    step = len(job.generated)
    tok = job.sampler(logits, step)
    job.generated.append(tok)
    job.pending_token = None
    with self._cond:
      self._counts["generated_tokens"] += 1
      if step == 0:
        self._ttft.append(job.first_token_s or 0.0)
    if tok in self.engine.eos_ids:
      self._done(job, "stop")
      return
    event = {"type": "token", "token_id": tok, "text": ""}
    if job.top_logprobs is not None:
      event["logprob"], event["top_logprobs"] = _logprobs(logits, tok, job.top_logprobs)
    text, stopped = self._stop_scan(job, job.detok.push(tok))
    event["text"] = text
    job.emit(event)
    if stopped:
      self._done(job, "stop", flush=False)
    elif len(job.generated) >= job.max_tokens:
      self._done(job, "length")
    else:
      job.pending_token = tok

  def _stop_scan(self, job: Job, piece: str) -> tuple[str, bool]:
    """(text to show now, whether a stop string ended it). Holds back the longest tail that
    could be the start of a stop string; a stop string itself is never shown."""
    text = job.held + piece
    if not job.stop:
      job.held = ""
      return text, False
    hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
    if hits:
      job.held = ""
      return text[:min(hits)], True
    hold = 0
    for s in job.stop:
      for k in range(min(len(s) - 1, len(text)), hold, -1):
        if text.endswith(s[:k]):
          hold = k
          break
    job.held = text[len(text) - hold:] if hold else ""
    return text[:len(text) - hold], False

  def _done(self, job: Job, reason: str, flush: bool = True) -> None:
    rest = ""
    if flush:
      rest, stopped = self._stop_scan(job, job.detok.flush())
      if not stopped:
        rest += job.held
      reason = "stop" if stopped else reason
    job.held = ""
    with self._cond:
      self._finish_locked(job, {"type": "done", "finish_reason": reason, "text": rest,
                                "prompt_tokens": len(job.prompt_ids),
                                "completion_tokens": len(job.generated)})

  def _fail(self, job: Job, e: Exception) -> None:
    log.exception("engine error in a request: %s", e)
    with self._cond:
      self._counts["failed"] += 1
      self._finish_locked(job, {"type": "error", "error": APIError(
          500, f"the engine failed on this request ({type(e).__name__}: {e}).",
          code="engine_error")})

  def _finish_locked(self, job: Job, event: dict | None) -> None:
    """Removes job (holding _cond) and sends its last event; None: it was cancelled."""
    if job in self._active:
      self._active.remove(job)
    if job.session is not None:  # frees its KV cache and its batch slot (engine thread only)
      job.session.close()
      self._freed = True
    job.session = None
    job.pending_token = None
    if event is None:
      self._counts["cancelled"] += 1
    else:
      if event["type"] == "done":
        self._counts["finished"] += 1
      job.emit(event)

  def _refresh_stats(self) -> None:
    with self._cond:
      self._refresh_stats_locked()

  def _refresh_stats_locked(self) -> None:
    if self.engine is None:
      return
    stats = self.engine.stats()
    now = time.perf_counter()
    self._engine_stats = stats
    self._busy.append((now, stats.get("disk_busy_s", 0.0)))
    while len(self._busy) > 2 and now - self._busy[1][0] > BUSY_WINDOW_S:
      self._busy.popleft()
    # sessions are read here only, on the engine thread, never while they are being fed
    self._kv_active = sum(j.session.kv_cache_bytes for j in self._active
                          if j.session is not None)
    self._kv_peak = max(self._kv_peak, self._kv_active)


def _logprobs(logits: np.ndarray, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
  """log_softmax(logits)[tok] and the k most likely (id, logprob), in float64 for the sum."""
  x = logits.astype(np.float64)
  m = x.max()
  lp = x - (m + np.log(np.exp(x - m).sum()))
  top = []
  if k:
    idx = np.argpartition(-lp, k - 1)[:k] if k < len(lp) else np.arange(len(lp))
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    top = [(int(i), float(lp[i])) for i in idx]
  return float(lp[tok]), top
