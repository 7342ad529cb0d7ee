"""Incremental detokenization: text for each new token as it is generated.

    dec = IncrementalDecoder(tokenizer, context=prompt_ids)
    for tok in new_tokens:
      out.write(dec.push(tok))   # "" while a multi-byte character is incomplete
    out.write(dec.flush())       # whatever was held back

Decoding one token at a time is wrong for both tokenizer kinds: sentencepiece drops the leading
space of a piece decoded alone, and byte-level BPE splits multi-byte characters across tokens.
The concatenated pushes plus flush equal decode(context + tokens) minus decode(context).
"""

from __future__ import annotations

from collections.abc import Sequence

from lazymoe_jax import tokenizer as tokenizer_lib

CONTEXT_TOKENS = 6  # prompt tokens kept as a prefix: enough for a leading space or a merge
REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class IncrementalDecoder:
  """Text pieces for tokens pushed one by one.

  Args:
    tokenizer: the engine's tokenizer (sentencepiece or tokenizer.json; `NoTokenizer` gives
      each id as "<id> " so that id-only stores still stream something readable).
    context: the prompt's token ids; its last few tokens decide how the first new token joins
      (a leading space in sentencepiece).
  """

  def __init__(self, tokenizer, context: Sequence[int] = ()):
    self.tokenizer = tokenizer
    self._stream = None
    tail = [int(t) for t in context[-CONTEXT_TOKENS:]]
    if isinstance(tokenizer, tokenizer_lib.JsonTokenizer) and _has_decode_stream():
      from tokenizers.decoders import DecodeStream  # pylint: disable=import-outside-toplevel
      # DecodeStream keeps the byte-level state itself; ids= primes it with the prompt's tail
      self._stream = DecodeStream(ids=tail, skip_special_tokens=False)
    # prefix trick (sentencepiece, or tokenizers without DecodeStream): decode a bounded window
    # that starts a few tokens back and emit what goes beyond the text those tokens gave
    self._ids = tail
    self._prefix = 0  # window start in _ids
    self._read = len(tail)  # tokens before this are emitted

  def push(self, token_id: int) -> str:
    """The text that token_id completes ("" while a character is incomplete)."""
    if isinstance(self.tokenizer, tokenizer_lib.NoTokenizer):
      return f"{int(token_id)} "
    if self._stream is not None:
      return self._stream.step(self.tokenizer.tok, int(token_id)) or ""
    self._ids.append(int(token_id))
    before = self.tokenizer.decode(self._ids[self._prefix:self._read])
    after = self.tokenizer.decode(self._ids[self._prefix:])
    if len(after) > len(before) and not after.endswith(REPLACEMENT):
      self._prefix, self._read = self._read, len(self._ids)
      # keep the window bounded: the ids before _prefix are never decoded again
      if self._prefix > 4 * CONTEXT_TOKENS:
        del self._ids[:self._prefix - CONTEXT_TOKENS]
        self._read -= self._prefix - CONTEXT_TOKENS
        self._prefix = CONTEXT_TOKENS
      return after[len(before):]
    return ""

  def flush(self) -> str:
    """What is held back at the end (an incomplete character comes out as U+FFFD)."""
    if self._stream is not None or isinstance(self.tokenizer, tokenizer_lib.NoTokenizer):
      return ""  # DecodeStream never holds back text it could decode; a cut byte stays cut
    if self._read == len(self._ids):
      return ""
    before = self.tokenizer.decode(self._ids[self._prefix:self._read])
    after = self.tokenizer.decode(self._ids[self._prefix:])
    self._prefix = self._read = len(self._ids)
    return after[len(before):]


def _has_decode_stream() -> bool:
  try:
    from tokenizers.decoders import DecodeStream  # pylint: disable=import-outside-toplevel
    return "ids" in (DecodeStream.__text_signature__ or "")
  except ImportError:
    return False


def token_bytes(tokenizer, token_id: int) -> bytes:
  """The bytes one token stands for, as OpenAI's logprobs report them: sentencepiece byte
  pieces (<0x0A>) as that byte, '▁' as a space; tokenizer.json tokens through its decoder."""
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    sp = tokenizer.sp
    if sp.is_byte(token_id):
      return bytes([int(sp.id_to_piece(token_id)[3:5], 16)])
    if sp.is_control(token_id):
      return sp.id_to_piece(token_id).encode()
    return sp.id_to_piece(token_id).replace("\u2581", " ").encode()
  if isinstance(tokenizer, tokenizer_lib.JsonTokenizer):
    return tokenizer.decode([token_id]).encode()
  return str(token_id).encode()
