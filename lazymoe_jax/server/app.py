"""The HTTP endpoints: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus
/health, /metrics (Prometheus), /stats (JSON for the page), /tokenize, /detokenize and / (the
page). Handlers never touch the engine: they validate, submit a Job to the Scheduler and relay
its events. Every error is an OpenAI error object; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lazymoe_jax import tokenizer as tokenizer_lib
from lazymoe_jax.detokenize import token_bytes
from lazymoe_jax.sampling import Sampler
from lazymoe_jax.server import protocol, templates
from lazymoe_jax.server.protocol import APIError, GenParams
from lazymoe_jax.server.scheduler import Job, Scheduler

log = logging.getLogger("lazymoe_jax.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


async def _client_gone(request: Request) -> None:
  """Returns when the client of a request whose body has been read goes away.

  The server's next ASGI message after the body is `http.disconnect`, sent as soon as the
  connection drops, so a non-streaming request is cancelled at once rather than at a poll.
  """
  while (await request.receive())["type"] != "http.disconnect":
    pass


@dataclasses.dataclass
class ServerState:
  """What the endpoints share. `template` is set by the loader once the engine is up."""

  scheduler: Scheduler
  model_name: str
  api_key: str | None = None
  template: templates.ChatTemplate | None = None
  template_error: str | None = None  # why there is no template (named in the 400)
  sse_ping_s: float = 10.0
  started: float = dataclasses.field(default_factory=time.time)


def create_app(state: ServerState):
  """The ASGI app (FastAPI) over a started (or starting) Scheduler."""
  app = FastAPI(title="LazyMoE-JAX", docs_url=None, redoc_url=None, openapi_url=None)
  sched = state.scheduler
  registry = CollectorRegistry()
  requests_total = Counter("lazymoe_requests", "HTTP requests by endpoint and status.",
                           ["endpoint", "status"], registry=registry)
  registry.register(_EngineCollector(state))

  @app.exception_handler(APIError)
  async def api_error(request: Request, e: APIError):
    del request
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, e: StarletteHTTPException):
    msg = (f"no endpoint {request.method} {request.url.path}; see POST /v1/chat/completions, "
           "POST /v1/completions, GET /v1/models" if e.status_code in (404, 405) else
           str(e.detail))
    return JSONResponse(APIError(e.status_code, msg, code="not_found" if e.status_code == 404
                                 else "method_not_allowed").body(), status_code=e.status_code)

  @app.exception_handler(Exception)
  async def internal_error(request: Request, e: Exception):
    del request
    log.exception("internal error: %s", e)  # the traceback stays in the server's log
    return JSONResponse(APIError(500, f"internal server error ({type(e).__name__}); the "
                                 "server logged the details.", code="internal_error").body(),
                        status_code=500)

  def authorize(request: Request) -> None:
    if state.api_key is None:
      return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    # constant time whatever the length or content of the key sent
    ok = hmac.compare_digest(token.strip().encode(), state.api_key.encode())
    if scheme.lower() != "bearer" or not ok:
      raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                     "KEY' with the key the server was started with (--api_key).",
                     code="invalid_api_key", type_="authentication_error")

  def engine():
    if sched.load_error is not None:
      raise APIError(503, f"the model failed to load: {sched.load_error}", code="load_failed")
    if not sched.ready.is_set():
      raise APIError(503, "the model is still loading; retry when GET /health answers 200.",
                     code="model_loading")
    return sched.engine

  def check_model(name: str | None) -> None:
    if name is not None and name != state.model_name:
      raise APIError(404, f"model {name!r} does not exist here; this server serves "
                     f"{state.model_name!r} (GET /v1/models).", param="model",
                     code="model_not_found")

  # ---- OpenAI endpoints -----------------------------------------------------------------------
  @app.get("/v1/models")
  async def models(request: Request):
    authorize(request)
    eng = sched.engine
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": int(state.started),
        "owned_by": "lazymoe-jax",
        "max_model_len": eng.max_context if eng is not None else None}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    authorize(request)
    eng = engine()
    p = protocol.parse_request(protocol.parse_json(await request.body()), "chat")
    check_model(p.model)
    if state.template is None:
      raise APIError(400, f"this model has no chat template ({state.template_error}); use "
                     "POST /v1/completions with a prompt, or start the server with "
                     "--chat_template=FILE.jinja.", param="messages", code="no_chat_template")
    try:
      text = state.template.render(p.messages, add_generation_prompt=True, tools=p.tools,
                                   **p.chat_template_kwargs)
    except templates.TemplateError as e:
      raise APIError(400, str(e), param="messages", code="template_error") from e
    ids = templates.encode_rendered(eng.tokenizer, text, state.template.special_tokens)
    return await generate(request, p, ids)

  @app.post("/v1/completions")
  async def completions(request: Request):
    authorize(request)
    eng = engine()
    p = protocol.parse_request(protocol.parse_json(await request.body()), "completion")
    check_model(p.model)
    return await generate(request, p, prompt_ids(eng, p.prompt))

  def prompt_ids(eng, prompt) -> list[int]:
    if isinstance(prompt, str):
      if isinstance(eng.tokenizer, tokenizer_lib.NoTokenizer):
        raise APIError(400, "this store has no tokenizer; send 'prompt' as a list of token ids.",
                       param="prompt", code="no_tokenizer")
      return eng.tokenizer.encode(prompt)
    bad = [t for t in prompt if not 0 <= t < eng.spec.vocab_size]
    if bad:
      raise APIError(400, f"'prompt' has token ids outside [0, {eng.spec.vocab_size}), e.g. "
                     f"{bad[0]}.", param="prompt")
    return list(prompt)

  async def generate(request: Request, p: GenParams, ids: list[int]):
    eng = sched.engine
    limit = eng.max_context
    if not ids:
      raise APIError(400, "the prompt encodes to no tokens; give some text.", param="prompt")
    if p.max_tokens is None:
      if len(ids) >= limit:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {limit} "
                       "positions: shorten the prompt.", param="messages" if p.kind == "chat"
                       else "prompt", code="context_length_exceeded")
      max_tokens = limit - len(ids)
    else:
      max_tokens = p.max_tokens
      if len(ids) + max_tokens > limit:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                       f"exceeds this model's context of {limit} positions; lower max_tokens "
                       "or shorten the prompt.", param="max_tokens",
                       code="context_length_exceeded")
    seed = p.seed if p.seed is not None else secrets.randbits(31)
    sampler = Sampler(p.temperature, p.top_p, p.top_k, seed % (2**32))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(ev):  # on the engine thread
      try:
        loop.call_soon_threadsafe(queue.put_nowait, ev)
      except RuntimeError:
        pass  # the event loop is closed (shutting down): nobody is listening
    job = Job(prompt_ids=ids, max_tokens=max_tokens, sampler=sampler, emit=emit, stop=p.stop,
              top_logprobs=p.top_logprobs if p.logprobs else None)
    sched.submit(job)
    relay = _Relay(state, eng, p, len(ids))
    if p.stream:
      return EventSourceResponse(stream(job, queue, relay), ping=state.sse_ping_s, sep="\n")
    return await complete(request, job, queue, relay)

  async def stream(job: Job, queue: asyncio.Queue, relay: "_Relay"):
    finished = False
    try:
      for chunk in relay.start():
        yield json.dumps(chunk)
      while True:
        ev = await queue.get()
        if ev["type"] == "error":
          finished = True
          yield json.dumps(ev["error"].body())
          break
        for chunk in relay.event(ev):
          yield json.dumps(chunk)
        if ev["type"] == "done":
          finished = True
          break
      yield "[DONE]"
    finally:
      if not finished:  # the client went away (the generator was cancelled or closed)
        sched.cancel(job)

  async def complete(request: Request, job: Job, queue: asyncio.Queue, relay: "_Relay"):
    async def collect():
      while True:
        ev = await queue.get()
        if ev["type"] == "error":
          raise ev["error"]
        relay.event(ev)
        if ev["type"] == "done":
          return relay.whole()
    task = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
      done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
      if task in done:
        return JSONResponse(task.result())
      sched.cancel(job)
      return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    finally:
      gone.cancel()
      if not task.done():
        sched.cancel(job)
        task.cancel()

  # ---- the rest -------------------------------------------------------------------------------
  @app.get("/health")
  async def health():
    if sched.load_error is not None:
      return JSONResponse({"status": "error", "message": f"the model failed to load: "
                           f"{sched.load_error}"}, status_code=503)
    if not sched.ready.is_set():
      return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok", "model": state.model_name}

  @app.get("/metrics")
  async def metrics():
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

  @app.get("/stats")
  async def stats():
    return stats_json(state)

  @app.post("/tokenize")
  async def tokenize(request: Request):
    authorize(request)
    eng = engine()
    body = protocol.parse_json(await request.body())
    if "messages" in body:
      p = protocol.parse_request({"messages": body["messages"]}, "chat")
      if state.template is None:
        raise APIError(400, f"this model has no chat template ({state.template_error}).",
                       param="messages", code="no_chat_template")
      try:
        text = state.template.render(p.messages, add_generation_prompt=bool(
            body.get("add_generation_prompt", True)))
      except templates.TemplateError as e:
        raise APIError(400, str(e), param="messages", code="template_error") from e
      ids = templates.encode_rendered(eng.tokenizer, text, state.template.special_tokens)
    else:
      prompt = body.get("prompt")
      if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (or send 'messages').", param="prompt",
                       code="invalid_type")
      ids = prompt_ids(eng, prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": eng.max_context}

  @app.post("/detokenize")
  async def detokenize(request: Request):
    authorize(request)
    eng = engine()
    body = protocol.parse_json(await request.body())
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
      raise APIError(400, "'tokens' must be a list of token ids.", param="tokens",
                     code="invalid_type")
    ids = prompt_ids(eng, ids) if ids else []
    if isinstance(eng.tokenizer, tokenizer_lib.NoTokenizer):
      raise APIError(400, "this store has no tokenizer: ids cannot become text.",
                     param="tokens", code="no_tokenizer")
    return {"prompt": eng.tokenizer.decode(ids)}

  @app.get("/")
  async def page():
    with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
      return HTMLResponse(f.read())

  return _CountRequests(app, requests_total)


class _CountRequests:
  """The app counted by endpoint and status: a plain ASGI wrapper, as starlette's
  BaseHTTPMiddleware would hide a client's disconnect from request.is_disconnected() (which
  cancels non-streaming requests)."""

  def __init__(self, app: FastAPI, counter: Counter):
    self.app = app
    self.counter = counter

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["path"] == "/metrics":
      return await self.app(scope, receive, send)
    status = ["500"]

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = str(message["status"])
      await send(message)
    try:
      await self.app(scope, receive, send_status)
    finally:
      self.counter.labels(scope["path"], status[0]).inc()


class _Relay:
  """Turns one job's events into OpenAI chunks (streaming) and the whole response; both come
  from the same events, so a stream's text equals the non-streamed text."""

  def __init__(self, state: ServerState, eng, p: GenParams, prompt_tokens: int):
    self.p = p
    self.tokenizer = eng.tokenizer
    self.id = protocol.new_id(p.kind)
    self.created = protocol.now()
    self.model = state.model_name
    self.prompt_tokens = prompt_tokens
    # reasoning_content: gpt-oss harmony channels, or <think> blocks (Qwen3, DeepSeek-R1)
    self.parser = (state.template.output_parser() if p.kind == "chat" and state.template
                   is not None else None)
    self.content, self.reasoning, self.lp = [], [], []
    self.finish_reason = None
    self.completion_tokens = 0

  def _chunk(self, choice: dict | None, usage: dict | None = None) -> dict:
    obj = "chat.completion.chunk" if self.p.kind == "chat" else "text_completion"
    out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
           "choices": [] if choice is None else [{"index": 0, **choice}]}
    if self.p.include_usage:
      out["usage"] = usage
    return out

  def start(self) -> list[dict]:
    if self.p.kind != "chat":
      return []
    return [self._chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})]

  def _token_str(self, tok: int) -> str:
    if self.p.token_ids_in_logprobs:
      return f"token_id:{tok}"
    return token_bytes(self.tokenizer, tok).decode("utf-8", errors="replace")

  def _logprob(self, ev: dict) -> dict:
    tok = ev["token_id"]
    b = token_bytes(self.tokenizer, tok)
    return {"token": self._token_str(tok), "logprob": ev["logprob"], "bytes": list(b),
            "top_logprobs": [{"token": self._token_str(t), "logprob": lp,
                              "bytes": list(token_bytes(self.tokenizer, t))}
                             for t, lp in ev["top_logprobs"]]}

  def event(self, ev: dict) -> list[dict]:
    """Chunks for one scheduler event (also recorded for whole())."""
    text = ev.get("text", "")
    reasoning = ""
    if self.parser is not None:
      reasoning, text = self.parser.push(text)
      if ev["type"] == "done":
        r2, t2 = self.parser.flush()
        reasoning, text = reasoning + r2, text + t2
    self.content.append(text)
    self.reasoning.append(reasoning)
    lp = self._logprob(ev) if ev["type"] == "token" and "logprob" in ev else None
    if lp is not None:
      self.lp.append(lp)
    out = []
    if text or reasoning or lp is not None:
      if self.p.kind == "chat":
        delta = {}
        if reasoning:
          delta["reasoning_content"] = reasoning
        if text or not reasoning:
          delta["content"] = text
        out.append(self._chunk({"delta": delta, "logprobs": {"content": [lp]} if lp else None,
                                "finish_reason": None}))
      else:
        out.append(self._chunk({"text": text, "logprobs": self._completion_lp([lp]) if lp
                                else None, "finish_reason": None}))
    if ev["type"] == "done":
      self.finish_reason = ev["finish_reason"]
      self.completion_tokens = ev["completion_tokens"]
      if self.p.kind == "chat":
        out.append(self._chunk({"delta": {}, "logprobs": None,
                                "finish_reason": self.finish_reason}))
      else:
        out.append(self._chunk({"text": "", "logprobs": None,
                                "finish_reason": self.finish_reason}))
      if self.p.include_usage:
        out.append(self._chunk(None, protocol.usage(self.prompt_tokens,
                                                    self.completion_tokens)))
    return out

  def _completion_lp(self, entries: list[dict], offset: int = 0) -> dict:
    offsets, pos = [], offset
    for e in entries:
      offsets.append(pos)
      pos += len(bytes(e["bytes"]).decode("utf-8", errors="replace"))
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries], "text_offset": offsets}

  def whole(self) -> dict:
    usage = protocol.usage(self.prompt_tokens, self.completion_tokens)
    text = "".join(self.content)
    if self.p.kind == "chat":
      message = {"role": "assistant", "content": text}
      if self.parser is not None:
        message["reasoning_content"] = "".join(self.reasoning)
      choice = {"index": 0, "message": message, "logprobs": {"content": self.lp}
                if self.p.logprobs else None, "finish_reason": self.finish_reason}
      obj = "chat.completion"
    else:
      choice = {"index": 0, "text": text, "logprobs": self._completion_lp(self.lp)
                if self.p.logprobs else None, "finish_reason": self.finish_reason}
      obj = "text_completion"
    return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage}


def stats_json(state: ServerState) -> dict:
  """The figures the page shows: the scheduler's, the engine's, derived rates, the plan."""
  snap = state.scheduler.snapshot()
  eng_stats = snap.pop("engine")
  touched = eng_stats.get("expert_hits", 0) + eng_stats.get("expert_misses", 0)
  gen = snap["generated_tokens"]
  eng = state.scheduler.engine
  plan = getattr(eng, "plan", None) if eng is not None else None
  return {
      "model": state.model_name, **snap,
      "expert_hits": eng_stats.get("expert_hits", 0),
      "expert_misses": eng_stats.get("expert_misses", 0),
      "expert_hit_rate": eng_stats.get("expert_hits", 0) / touched if touched else 0.0,
      "bytes_read": eng_stats.get("bytes_read", 0),
      "bytes_read_per_token": eng_stats.get("bytes_read", 0) / gen if gen else 0.0,
      "disk_busy_s": eng_stats.get("disk_busy_s", 0.0),
      "pool_slots": eng_stats.get("pool_slots", 0),
      "pool_bytes": eng_stats.get("pool_bytes", 0),
      "dense_bytes": eng_stats.get("dense_bytes", 0),
      "embedding_held_bytes": eng_stats.get("embedding_held_bytes", 0),
      "expert_bytes": eng_stats.get("expert_bytes", 0),
      "peak_rss_bytes": eng_stats.get("peak_rss_bytes", 0),
      "max_context": eng.max_context if eng is not None else None,
      "memory_plan": plan.describe() if plan is not None else None,
      "memory_plan_bytes": dataclasses.asdict(plan) if plan is not None else None,
      "uptime_s": time.time() - state.started,
  }


class _EngineCollector:
  """Prometheus figures read from the scheduler's snapshot at scrape time."""

  def __init__(self, state: ServerState):
    self.state = state

  def describe(self):
    return []  # collected on demand: nothing to check at registration

  def collect(self):
    s = stats_json(self.state)

    def gauge(name, doc, value):
      return GaugeMetricFamily(f"lazymoe_{name}", doc, value=float(value or 0))

    def counter(name, doc, value):
      return CounterMetricFamily(f"lazymoe_{name}", doc, value=float(value or 0))

    yield gauge("ready", "1 once the model is loaded.", s["ready"])
    yield gauge("queue_depth", "Requests waiting for a place in the batch.", s["queue_depth"])
    yield gauge("active_sequences", "Sequences in the batch (prefill or decode).",
                s["active_sequences"])
    yield counter("requests_finished", "Generations that ended (stop or length).",
                  s["requests_finished"])
    yield counter("requests_cancelled", "Generations cancelled (client went away).",
                  s["requests_cancelled"])
    yield counter("requests_failed", "Generations the engine failed on.", s["requests_failed"])
    yield counter("prompt_tokens", "Prompt tokens fed.", s["prompt_tokens"])
    yield counter("generated_tokens", "Tokens generated.", s["generated_tokens"])
    yield gauge("decode_tokens_per_second", "Aggregate decode tokens/s over the last steps.",
                s["decode_tokens_per_s"])
    yield gauge("prompt_tokens_per_second", "Prefill tokens/s over the last chunks.",
                s["prompt_tokens_per_s"])
    yield gauge("mean_batch", "Mean sequences per decode step (last steps).", s["mean_batch"])
    yield gauge("decode_experts_per_token", "Experts run per generated token, all MoE layers "
                "(last steps; a batch runs each expert it picks once).",
                s["decode_experts_per_token"])
    yield gauge("time_to_first_token_seconds", "Mean time to first token (last requests).",
                s["time_to_first_token_s"])
    yield counter("expert_hits", "Expert lookups served by the pool.", s["expert_hits"])
    yield counter("expert_misses", "Expert lookups read from disk.", s["expert_misses"])
    yield counter("expert_bytes_read", "Bytes of experts read from disk.", s["bytes_read"])
    yield gauge("expert_hit_rate", "Hits / lookups since start.", s["expert_hit_rate"])
    yield gauge("bytes_read_per_generated_token", "Expert bytes read / generated tokens.",
                s["bytes_read_per_token"])
    yield counter("disk_busy_seconds", "Seconds the disk had a read in flight.",
                  s["disk_busy_s"])
    yield gauge("disk_busy_ratio", "Fraction of wall time the disk was busy (last 10 s).",
                s["disk_busy_fraction"])
    yield gauge("kv_cache_bytes", "KV cache bytes of the active sequences.",
                s["kv_cache_bytes_active"])
    yield gauge("kv_cache_peak_bytes", "Most KV cache bytes held at once.",
                s["kv_cache_bytes_peak"])
    yield gauge("pool_slots", "Expert pool slots.", s["pool_slots"])
    yield gauge("pool_bytes", "Expert pool bytes.", s["pool_bytes"])
    yield gauge("dense_bytes", "Dense parameter bytes in memory.", s["dense_bytes"])
    yield gauge("peak_rss_bytes", "Peak resident memory of the process.", s["peak_rss_bytes"])
    plan = GaugeMetricFamily("lazymoe_memory_plan_bytes", "The memory plan (--memory_budget_gb)"
                             " by part; absent without a budget.", labels=["part"])
    for part, value in (s["memory_plan_bytes"] or {}).items():
      if part.endswith("_bytes"):
        plan.add_metric([part[:-len("_bytes")]], float(value))
    if s["memory_plan_bytes"]:
      plan.add_metric(["pool"], float(s["memory_plan_bytes"]["slots"] *
                                      s["memory_plan_bytes"]["bytes_per_expert"]))
    yield plan
