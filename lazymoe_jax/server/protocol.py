"""Request validation and the OpenAI response shapes.

Every problem with a request is an `APIError` whose message names the field, what was wrong and
what is accepted; app.py turns it into OpenAI's error object
{"error": {"message", "type", "param", "code"}} with its HTTP status.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions' `logprobs` gets the same
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; a small bound keeps the scan cheap)


class APIError(Exception):
  """An error for the client: HTTP status + OpenAI error object."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, type_: str | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.param = param
    self.code = code
    self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> APIError:
  return APIError(400, message, param=param, code=code)


@dataclasses.dataclass
class GenParams:
  """A validated /v1/chat/completions or /v1/completions request."""

  kind: str  # "chat" or "completion"
  model: str | None = None
  messages: list[dict] | None = None
  prompt: str | list[int] | None = None
  stream: bool = False
  include_usage: bool = False
  max_tokens: int | None = None  # None: up to the context
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop: list[str] = dataclasses.field(default_factory=list)
  logprobs: bool = False
  top_logprobs: int = 0
  chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
  tools: list | None = None
  token_ids_in_logprobs: bool = False  # vLLM's return_tokens_as_token_ids: "token_id:123"


def parse_json(raw: bytes) -> dict:
  """The request body as a JSON object."""
  try:
    body = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise bad(None, f"the request body is not valid JSON ({e}); send a JSON object with "
              "Content-Type: application/json.", code="invalid_json") from e
  if not isinstance(body, dict):
    raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}.",
              code="invalid_json")
  return body


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
  v = body.get(name)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, int):
    if isinstance(v, float) and v.is_integer():
      v = int(v)
    else:
      raise bad(name, f"'{name}' must be an integer, got {json.dumps(v)}.", "invalid_type")
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise bad(name, f"'{name}' must be {rng}, got {v}.")
  return v


def _num(body: dict, name: str, default: float, ok, rule: str) -> float:
  v = body.get(name)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise bad(name, f"'{name}' must be a number, got {json.dumps(v)}.", "invalid_type")
  if not ok(v):
    raise bad(name, f"'{name}' must be {rule}, got {v}.")
  return float(v)


def _bool(body: dict, name: str) -> bool:
  v = body.get(name, False)
  if v is None:
    return False
  if not isinstance(v, bool):
    raise bad(name, f"'{name}' must be true or false, got {json.dumps(v)}.", "invalid_type")
  return v


def _stop(body: dict) -> list[str]:
  v = body.get("stop")
  if v is None:
    return []
  stops = [v] if isinstance(v, str) else v
  if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
    raise bad("stop", "'stop' must be a string or a list of strings.", "invalid_type")
  if len(stops) > MAX_STOP:
    raise bad("stop", f"'stop' has {len(stops)} strings; at most {MAX_STOP} are accepted.")
  if any(s == "" for s in stops):
    raise bad("stop", "'stop' strings must not be empty.")
  return list(dict.fromkeys(stops))


def _messages(body: dict) -> list[dict]:
  msgs = body.get("messages")
  if msgs is None:
    raise bad("messages", "'messages' is required: a list of {\"role\", \"content\"} objects.",
              "missing_field")
  if not isinstance(msgs, list) or not msgs:
    raise bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} "
              "objects.", "invalid_type")
  out = []
  for i, m in enumerate(msgs):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise bad(where, f"'{where}' must be an object with 'role' and 'content'.", "invalid_type")
    role = m.get("role")
    if not isinstance(role, str) or not role:
      raise bad(f"{where}.role", f"'{where}.role' must be a string such as \"system\", "
                "\"user\" or \"assistant\".", "invalid_type")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text parts can reach a text model
      texts = []
      for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
            part.get("text"), str):
          raise bad(f"{where}.content[{j}]", f"'{where}.content[{j}]' must be "
                    "{\"type\": \"text\", \"text\": \"...\"}: this model reads text only.",
                    "invalid_type")
        texts.append(part["text"])
      content = "".join(texts)
    elif content is not None and not isinstance(content, str):
      raise bad(f"{where}.content", f"'{where}.content' must be a string or a list of text "
                "parts.", "invalid_type")
    if content is None and not m.get("tool_calls"):
      raise bad(f"{where}.content", f"'{where}.content' is missing.", "missing_field")
    # drop None values as transformers does: templates test for a missing key, not for None
    out.append({**{k: v for k, v in m.items() if v is not None}, "role": role,
                **({"content": content} if content is not None else {})})
  return out


def _prompt(body: dict) -> str | list[int]:
  p = body.get("prompt")
  if p is None:
    raise bad("prompt", "'prompt' is required: a string (or a list of token ids).",
              "missing_field")
  if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
    p = p[0]  # a batch of one prompt
  if isinstance(p, str):
    if not p:
      raise bad("prompt", "'prompt' is empty; give at least one character.")
    return p
  if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                       for t in p):
    return p
  if isinstance(p, list) and len(p) > 1:
    raise bad("prompt", "'prompt' holds several prompts; send one prompt per request.")
  raise bad("prompt", "'prompt' must be a non-empty string or a non-empty list of token ids.",
            "invalid_type")


def parse_request(body: dict, kind: str) -> GenParams:
  """Validates a chat (kind="chat") or completions (kind="completion") request body."""
  n = body.get("n")
  if n is not None and n != 1:
    raise bad("n", f"'n' must be 1 (one choice per request), got {json.dumps(n)}; send "
              "several requests for several choices.", "unsupported_value")
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise bad("model", "'model' must be a string (see GET /v1/models).", "invalid_type")
  p = GenParams(kind=kind, model=model)
  if kind == "chat":
    p.messages = _messages(body)
  else:
    p.prompt = _prompt(body)
  p.stream = _bool(body, "stream")
  opts = body.get("stream_options")
  if opts is not None:
    if not isinstance(opts, dict):
      raise bad("stream_options", "'stream_options' must be an object such as "
                "{\"include_usage\": true}.", "invalid_type")
    if not p.stream:
      raise bad("stream_options", "'stream_options' is only allowed with \"stream\": true.")
    p.include_usage = _bool(opts, "include_usage")
  mt = _int(body, "max_tokens", lo=1)
  mct = _int(body, "max_completion_tokens", lo=1)
  p.max_tokens = mct if mct is not None else mt
  p.temperature = _num(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "in [0, 2]")
  p.top_p = _num(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
  p.top_k = _int(body, "top_k", lo=-1) or 0
  p.top_k = max(p.top_k, 0)  # -1 means "all" in vLLM's convention, as 0 does here
  p.seed = _int(body, "seed", lo=-(2**63), hi=2**64 - 1)
  p.stop = _stop(body)
  if kind == "chat":
    p.logprobs = _bool(body, "logprobs")
    p.top_logprobs = _int(body, "top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS) or 0
    if p.top_logprobs and not p.logprobs:
      raise bad("top_logprobs", "'top_logprobs' needs \"logprobs\": true.")
    kw = body.get("chat_template_kwargs")
    if kw is not None and not isinstance(kw, dict):
      raise bad("chat_template_kwargs", "'chat_template_kwargs' must be an object, e.g. "
                "{\"enable_thinking\": false}.", "invalid_type")
    p.chat_template_kwargs = dict(kw or {})
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
      raise bad("tools", "'tools' must be a list of tool definitions.", "invalid_type")
    p.tools = tools
  else:
    lp = body.get("logprobs")
    if isinstance(lp, bool):
      raise bad("logprobs", "'logprobs' of /v1/completions is an integer (how many top "
                f"tokens per position, 0-{MAX_TOP_LOGPROBS}), not true/false.", "invalid_type")
    k = _int(body, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
    p.logprobs, p.top_logprobs = k is not None, k or 0
  p.token_ids_in_logprobs = _bool(body, "return_tokens_as_token_ids")
  return p


def new_id(kind: str) -> str:
  return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
  return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}
