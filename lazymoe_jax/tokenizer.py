"""Tokenizers: a sentencepiece model or a Hugging Face tokenizer.json, as the store carries."""

from __future__ import annotations

import os

from lazymoe_jax.errors import StoreError, TokenizerMissingError


class SentencePieceTokenizer:
  def __init__(self, path: str, add_bos: bool):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.add_bos = add_bos and self.sp.bos_id() >= 0
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    ids = self.sp.encode(text)
    return [self.bos_id] + ids if self.add_bos else ids

  def decode(self, ids: list[int]) -> str:
    """Text of ids; ids past the tokenizer's pieces decode to nothing. Checkpoints often pad
    the vocabulary beyond the tokenizer, and a model can sample such an id; sentencepiece
    would raise, ending the stream."""
    n = self.sp.get_piece_size()
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n])


class JsonTokenizer:
  """tokenizer.json through the `tokenizers` library (BPE models such as gpt-oss, Qwen)."""

  def __init__(self, path: str, add_bos: bool, bos_id: int | None):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self.tok = Tokenizer.from_file(path)
    self.add_bos = add_bos and bos_id is not None
    self.bos_id = bos_id

  def encode(self, text: str) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if self.add_bos else ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NoTokenizer:
  """For stores converted without tokenizer files: the engine works on token ids only."""

  def encode(self, text: str) -> list[int]:
    raise TokenizerMissingError("this store was converted without a tokenizer (the source model "
                                "had no tokenizer.model / tokenizer.json); pass token ids instead.")

  decode = encode


def load(store_dir: str, info: dict | None, bos_id: int | None):
  if not info:
    return NoTokenizer()
  path = os.path.join(store_dir, info["file"])
  if not os.path.exists(path):
    raise StoreError(f"tokenizer file {path} named in the manifest is missing; re-convert.")
  if info["kind"] == "sentencepiece":
    return SentencePieceTokenizer(path, info.get("add_bos", True))
  return JsonTokenizer(path, info.get("add_bos", False), bos_id)
