"""The offline corpus every machine with Python has: the interpreter's own stdlib sources.

Fixed split: `.py` files (no test/tests/idlelib/site-packages) sorted by path; every 10th file
is held out. Also the tokenizer trainer used for the demo model.
"""

from __future__ import annotations

import io
import os
import sysconfig


def stdlib_files(held_out: bool = False) -> list[str]:
  """Paths of the interpreter's stdlib `.py` files in the split, in a fixed (sorted) order.

  Files whose index in the sorted list is divisible by 10 are the held-out split.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "test", "tests", "idlelib"))
    paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
  paths.sort()
  return [p for i, p in enumerate(paths) if (i % 10 == 0) == held_out]


def read_source(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def stdlib_corpus(max_bytes: int, held_out: bool = False) -> str:
  """The split's files concatenated, stopping after the file that reaches max_bytes."""
  out, size = [], 0
  for p in stdlib_files(held_out):
    out.append(read_source(p))
    size += len(out[-1])
    if size >= max_bytes:
      break
  return "".join(out)


def train_tokenizer(dst: str, vocab_size: int, corpus: str) -> None:
  """Sentencepiece BPE with byte fallback and identity normalisation: decode(encode(s)) == s."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus.splitlines(keepends=True)), model_writer=model,
      vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_by_whitespace=False, allow_whitespace_only_pieces=True, add_dummy_prefix=False,
      user_defined_symbols=["\n", "\t"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
  with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
