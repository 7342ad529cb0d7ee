"""Streaming detokenization: the text of each new token, at a cost that does not grow with the
length of the text (decoding all of it again per token is quadratic in the output).

Both tokenizers decode a bounded window of recent tokens: the tokens of the last printed piece
(the prefix, decoded again so that whatever joins across the boundary, such as a leading space
or the bytes of a character, comes out as the whole text's decoding has it) and the tokens not
printed yet. A window whose decoding ends in U+FFFD is held back: the rest of a multi-byte
character split over byte tokens may follow.
"""

from __future__ import annotations

from collections.abc import Sequence

from lazymoe_jax import tokenizer as tokenizers_

REPLACEMENT = "\ufffd"
# A run of tokenizer.json byte tokens (<0xNN>) is held back whole up to this many (see
# _take). Tokens are held back while the window's decoding ends in U+FFFD up to twice
# this many (a character is at most 4 bytes, so 3 byte tokens suffice for one): past that the
# U+FFFD is taken as real (invalid bytes the model produced) and printed, so that a run of
# invalid bytes cannot grow the window.
MAX_HELD = 16
# Prompt tokens kept as the first prefix: enough for any join across the prompt boundary.
PROMPT_CONTEXT = 4
# The most tokens one push decodes: a printed piece and the tokens held after it, each at most
# 2 * MAX_HELD - 1 held while the text ends in U+FFFD plus a held run of MAX_HELD + 1.
MAX_WINDOW = 6 * MAX_HELD


class IncrementalDecoder:
  """Turns token ids, pushed one by one, into the new text each adds.

  The concatenation of the pushes and the final flush equals
  `tokenizer.decode(prompt_ids + pushed)[len(tokenizer.decode(prompt_ids)):]`, for the
  sentencepiece and the tokenizer.json tokenizers of lazymoe_jax.tokenizer, when the prompt
  ends at a character boundary (a prompt made from text does). Each push decodes at most
  MAX_WINDOW tokens (`window` is the current count; usually 2 or 3): the tokens of the last
  piece and the ones held back. The exceptions to exactness: more than 2 * MAX_HELD tokens in a row that leave
  the text ending in U+FFFD (invalid bytes) are printed as they decode then; a tokenizer.json
  run of more than MAX_HELD byte tokens that becomes invalid UTF-8 only later (the whole
  decoding then shows its earlier valid characters as U+FFFD, the pieces as they were).

  Args:
    tokenizer: a lazymoe_jax.tokenizer tokenizer (anything with decode(ids) -> str works
      through the generic window).
    prompt_ids: the ids the pushed ones continue (their text is not returned).
  """

  def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
    self.tokenizer = tokenizer
    self._json = isinstance(tokenizer, tokenizers_.JsonTokenizer)
    if isinstance(tokenizer, tokenizers_.NoTokenizer):  # ids only: nothing to decode
      self._ids, self.max_window = [], 0
      return
    self._stream = None
    # a short tail of the prompt as the printed prefix; for tokenizer.json all of a run of
    # byte tokens it ends with (decoded with the run's continuation, see _take) and the token
    # before it, or of a long run the bytes from a character's first one (a run that starts
    # with a continuation byte decodes as U+FFFD throughout)
    prompt_ids = [int(i) for i in prompt_ids]
    k = min(len(prompt_ids), PROMPT_CONTEXT)
    if self._json:
      while k < min(len(prompt_ids), 2 * MAX_HELD) and self._is_byte_token(prompt_ids[-k]):
        k += 1
      for _ in range(3):
        if k < len(prompt_ids) and 0x80 <= self._byte_value(prompt_ids[-k]) < 0xC0:
          k += 1
    tail = prompt_ids[len(prompt_ids) - k:]
    self._restart(tail)
    self.max_window = len(self._ids)  # the largest window decoded so far

  def _restart(self, printed: list[int]) -> None:
    """Makes `printed` (ids whose text was returned already) the window."""
    self._ids, self._prefix_n = printed, len(printed)
    self._prefix = self._decode(printed)
    # DecodeStream takes a prefix only when it decodes to whole characters and does not end in
    # a byte token; else (rare: a prompt ending in byte tokens, a forced piece ending in invalid
    # bytes) the generic window runs until the next piece
    self._stream, self._held, self._long_run = None, [], False
    if (self._json and not self._prefix.endswith(REPLACEMENT)
        and not (printed and self._is_byte_token(printed[-1]))):
      from tokenizers.decoders import DecodeStream  # pylint: disable=import-outside-toplevel
      self._stream = DecodeStream(ids=list(printed), skip_special_tokens=False)

  @property
  def window(self) -> int:
    """Token ids in the current window (printed prefix + held back)."""
    return len(self._ids) + len(self._held)

  def _decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids) if ids else ""

  def push(self, token_id: int) -> str:
    """Adds one token; returns the text it completes ("" while a character is incomplete).
    A store without a tokenizer streams each id as "<id> "."""
    if isinstance(self.tokenizer, tokenizers_.NoTokenizer):
      return f"{int(token_id)} "
    ids = self._take(int(token_id))
    if not ids:
      return ""
    self._ids += ids
    self.max_window = max(self.max_window, len(self._ids))
    if self._stream is not None:
      return self._push_stream(ids)
    text = self._decode(self._ids)
    if text.endswith(REPLACEMENT) and len(self._ids) - self._prefix_n < 2 * MAX_HELD:
      return ""
    return self._emit(text)

  def _take(self, token_id: int) -> list[int]:
    """The ids to add to the window now ([] while a run of byte tokens is held back).

    tokenizers' ByteFallback decodes a run of <0xNN> tokens together, each as U+FFFD when the
    run is not valid UTF-8, so even an ASCII byte token may change with what follows: the run
    goes in once it ends. A run longer than MAX_HELD (CJK text in a small vocabulary) goes in
    token by token after that, printed at character boundaries."""
    if not self._json:
      return [token_id]
    is_byte = self._is_byte_token(token_id)
    if is_byte and not self._long_run:
      if len(self._held) < MAX_HELD:
        self._held.append(token_id)
        self.max_window = max(self.max_window, len(self._ids) + len(self._held))
        return []
      self._long_run = True
    self._long_run = self._long_run and is_byte
    ids, self._held = self._held + [token_id], []
    return ids

  def _push_stream(self, ids: list[int]) -> str:
    # DecodeStream keeps the same window (the tokens of its last chunk + the pending ones);
    # _ids mirrors it, for the bound on held tokens and for flush
    try:
      chunk = self._stream.step(self.tokenizer.tok, ids)
    except Exception:  # pylint: disable=broad-except  (its prefix check: see the class doc)
      return self._emit(self._decode(self._ids))
    if chunk is not None:
      del self._ids[:self._prefix_n]
      self._prefix_n = len(self._ids)
      self._prefix = None  # decoded when needed (flush, a forced emit) only
      return chunk
    if len(self._ids) - self._prefix_n < 2 * MAX_HELD:
      return ""
    return self._emit(self._decode(self._ids))

  def _byte_value(self, token_id: int) -> int:
    """The byte of a <0xNN> token, else -1."""
    piece = self.tokenizer.tok.id_to_token(token_id) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
      try:
        return int(piece[3:5], 16)
      except ValueError:
        pass
    return -1

  def _is_byte_token(self, token_id: int) -> bool:
    return self._byte_value(token_id) >= 0

  def _prefix_text(self) -> str:
    if self._prefix is None:
      self._prefix = self._decode(self._ids[:self._prefix_n])
    return self._prefix

  def _emit(self, text: str) -> str:
    """Returns what `text` (the window's decoding) adds to the prefix; the window becomes the
    tokens of that new piece."""
    prefix = self._prefix_text()
    # the printed prefix decodes otherwise now only in the inexact cases of the class doc: the
    # characters past its length are the new ones
    new, printed = text[len(prefix):], self._ids[self._prefix_n:]
    if text.endswith(REPLACEMENT):  # printed as real: nothing later may join with it
      printed = []
    self._restart(printed)
    return new

  def flush(self) -> str:
    """The text held back (an incomplete character at the end, as U+FFFD); then resets."""
    if isinstance(self.tokenizer, tokenizers_.NoTokenizer):
      return ""
    self._ids += self._held
    text, prefix = self._decode(self._ids), self._prefix_text()
    self._restart([])
    return text[len(prefix):]


def token_bytes(tokenizer, token_id: int) -> bytes:
  """The bytes one token stands for, as OpenAI's logprobs report them: sentencepiece byte
  pieces (<0x0A>) as that byte, '▁' as a space; tokenizer.json tokens through its decoder."""
  if isinstance(tokenizer, tokenizers_.SentencePieceTokenizer):
    sp = tokenizer.sp
    if sp.is_byte(token_id):
      return bytes([int(sp.id_to_piece(token_id)[3:5], 16)])
    if sp.is_control(token_id):
      return sp.id_to_piece(token_id).encode()
    return sp.id_to_piece(token_id).replace("\u2581", " ").encode()
  if isinstance(tokenizer, tokenizers_.JsonTokenizer):
    return tokenizer.decode([token_id]).encode()
  return str(token_id).encode()
