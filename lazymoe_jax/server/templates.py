"""Chat templates, rendered as transformers' apply_chat_template does, and harmony output.

The store carries the model's template (checkpoints_tools.convert_hf copies it from
chat_template.jinja or tokenizer_config.json) under manifest["chat_template"], with the bos and
eos token strings the template reads. Rendering follows transformers
(utils/chat_template_utils.py): a sandboxed immutable jinja2 environment with trim_blocks and
lstrip_blocks, loop controls, its tojson (no HTML escaping), raise_exception, strftime_now, and
the messages with None values dropped.
"""

from __future__ import annotations

import datetime
import json
import os
import re

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lazymoe_jax import tokenizer as tokenizer_lib

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(ValueError):
  """The template raised (raise_exception) or failed on these messages."""


class _Generation(jinja2.ext.Extension):
  """{% generation %}...{% endgeneration %} (transformers marks assistant tokens with it):
  parsed so such templates load; renders its body unchanged."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """namespace() without underscore-prefixed attributes (no way to CPython internals)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument  (jinja's own trick)
    self, args = args[0], args[1:]
    for name in dict(*args, **kwargs):
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, *args, **kwargs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"templates cannot set {name!r} on a namespace.")


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = dict
  env.globals["namespace"] = _Namespace
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise TemplateError(f"the chat template does not parse (line {e.lineno}: {e.message}).") from e


class ChatTemplate:
  """A compiled template with the special-token strings it reads.

  Args:
    source: the jinja template.
    special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...} strings given to it.
  """

  def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
    self.source = source
    self.template = compile_template(source)
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    # gpt-oss's harmony format: channels in the output, split by HarmonyParser
    self.harmony = "<|channel|>" in source
    # <think> reasoning (Qwen3, DeepSeek-R1), split by ThinkParser
    self.thinks = not self.harmony and "</think>" in source

  def output_parser(self):
    """A new parser of the model's output into (reasoning, content), or None."""
    return HarmonyParser() if self.harmony else ThinkParser() if self.thinks else None

  def render(self, messages: list[dict], add_generation_prompt: bool = True,
             tools: list | None = None, **kwargs) -> str:
    """The prompt text. kwargs reach the template (e.g. enable_thinking=False)."""
    chat = []
    for m in messages:
      m = {k: v for k, v in m.items() if v is not None}
      reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
      if reasoning is not None:  # transformers' aliases: gpt-oss reads `thinking`
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
      chat.append(m)
    try:
      return self.template.render(messages=chat, tools=tools, documents=None,
                                  add_generation_prompt=add_generation_prompt,
                                  **{**self.special_tokens, **kwargs})
    except jinja2.exceptions.TemplateError as e:
      raise TemplateError(f"the chat template refused these messages: {e}") from e
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
      raise TemplateError(f"the chat template failed on these messages ({type(e).__name__}: "
                          f"{e}); check the roles and contents.") from e


def load_store_template(store_dir: str, manifest: dict, tokenizer,
                        override: str | None = None) -> ChatTemplate | None:
  """The store's chat template (or the file `override`), None when it has none."""
  info = manifest.get("chat_template") or {}
  if isinstance(info, str):
    info = {"template": info}
  source = info.get("template")
  if override:
    with open(override, encoding="utf-8") as f:
      source = f.read()
  elif info.get("file"):
    with open(os.path.join(store_dir, info["file"]), encoding="utf-8") as f:
      source = f.read()
  if not source:
    return None
  specials = {"bos_token": info.get("bos_token"), "eos_token": info.get("eos_token")}
  for name, default in _token_strings(tokenizer).items():
    specials[name] = specials.get(name) or default
  return ChatTemplate(source, specials)


def _token_strings(tokenizer) -> dict[str, str | None]:
  """bos/eos strings from the tokenizer, for stores whose manifest does not name them."""
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    sp = tokenizer.sp
    return {"bos_token": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
            "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None}
  if isinstance(tokenizer, tokenizer_lib.JsonTokenizer) and tokenizer.bos_id is not None:
    return {"bos_token": tokenizer.tok.id_to_token(tokenizer.bos_id)}
  return {}


def encode_rendered(tokenizer, text: str, special_tokens: dict[str, str]) -> list[int]:
  """Token ids of a rendered prompt: the template wrote the special tokens itself, so none is
  added (as apply_chat_template(tokenize=True) encodes with add_special_tokens=False), and the
  special-token strings in the text become their ids."""
  if isinstance(tokenizer, tokenizer_lib.JsonTokenizer):
    return tokenizer.tok.encode(text, add_special_tokens=False).ids  # parses added tokens
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    sp = tokenizer.sp  # sentencepiece reads "<s>" as three characters: split it out
    ids_of = {s: sp.piece_to_id(s) for s in special_tokens.values() if s}
    ids_of = {s: i for s, i in ids_of.items() if i != sp.unk_id()}
    if not ids_of:
      return sp.encode(text)
    out = []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(ids_of, key=len, reverse=True)) + ")"
    for piece in re.split(pattern, text):
      if piece in ids_of:
        out.append(ids_of[piece])
      elif piece:
        out.extend(sp.encode(piece))
    return out
  return tokenizer.encode(text)  # NoTokenizer: raises its clear error


class HarmonyParser:
  """Splits gpt-oss output into reasoning (the analysis channel) and content (final, and any
  other channel), fed text as it streams. The prompt ends with `<|start|>assistant`; the model
  writes `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final
  <|message|>...`. Text that could be the start of a marker is held back."""

  MAX_HEADER = 256  # a header longer than this is no header: shown as content

  def __init__(self):
    self._buf = ""
    self._in_body = False
    self._channel = "final"

  def push(self, text: str) -> tuple[str, str]:
    """(reasoning, content) that text completes."""
    self._buf += text
    reasoning, content = [], []
    while self._buf:
      if not self._in_body:
        i = self._buf.find("<|message|>")
        if i < 0:
          if len(self._buf) > self.MAX_HEADER:
            self._in_body, self._channel = True, "final"
            continue
          break
        m = re.search(r"<\|channel\|>\s*([A-Za-z_]+)", self._buf[:i])
        self._channel = m.group(1) if m else "final"
        self._buf = self._buf[i + len("<|message|>"):]
        self._in_body = True
        continue
      i = self._buf.find("<|")
      if i < 0:  # a last "<" may be the start of a marker
        keep = 1 if self._buf.endswith("<") else 0
        out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        (reasoning if self._channel == "analysis" else content).append(out)
        break
      else:
        j = self._buf.find("|>", i)
        if j < 0:  # an incomplete marker: wait for the rest
          out, self._buf = self._buf[:i], self._buf[i:]
          (reasoning if self._channel == "analysis" else content).append(out)
          break
        out = self._buf[:i]
        marker = self._buf[i:j + 2]
        self._buf = self._buf[j + 2:]
        if marker in ("<|end|>", "<|return|>", "<|call|>", "<|start|>"):
          self._in_body = False  # the message ended; a header follows
        else:
          out += marker  # not a harmony marker: the text of the message
      (reasoning if self._channel == "analysis" else content).append(out)
    return "".join(reasoning), "".join(content)

  def flush(self) -> tuple[str, str]:
    rest, self._buf = self._buf, ""
    if not self._in_body:
      return "", ""  # an unfinished header is no text
    return (rest, "") if self._channel == "analysis" else ("", rest)


class ThinkParser:
  """Splits `<think>...</think>` reasoning (Qwen3, DeepSeek-R1 templates) from the answer, fed
  text as it streams: reasoning only when the output opens with <think> (with thinking off,
  Qwen3's prompt already closed an empty block and the output is all content)."""

  OPEN, CLOSE = "<think>", "</think>"

  def __init__(self):
    self._buf = ""
    self._state = "start"  # start -> reasoning -> after -> content, or start -> content

  def push(self, text: str) -> tuple[str, str]:
    """(reasoning, content) that text completes."""
    self._buf += text
    if self._state == "start":
      head = self._buf.lstrip()
      if head.startswith(self.OPEN):
        self._buf, self._state = head[len(self.OPEN):], "reasoning"
      elif self.OPEN.startswith(head):
        return "", ""  # "" or the start of <think>: wait
      else:
        self._state = "content"
    if self._state == "reasoning":
      i = self._buf.find(self.CLOSE)
      if i < 0:
        keep = _partial_suffix(self._buf, self.CLOSE)
        out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out, ""
      reasoning, self._buf = self._buf[:i], self._buf[i + len(self.CLOSE):]
      self._state = "after"
      return reasoning, self.push("")[1]
    if self._state == "after":  # the newlines the template puts after </think> are no answer
      self._buf = self._buf.lstrip("\n")
      if not self._buf:
        return "", ""
      self._state = "content"
    out, self._buf = self._buf, ""
    return "", out

  def flush(self) -> tuple[str, str]:
    rest, self._buf = self._buf, ""
    return (rest, "") if self._state == "reasoning" else ("", rest)


def _partial_suffix(text: str, marker: str) -> int:
  """Length of the longest tail of text that is a proper prefix of marker."""
  for k in range(min(len(marker) - 1, len(text)), 0, -1):
    if text.endswith(marker[:k]):
      return k
  return 0
