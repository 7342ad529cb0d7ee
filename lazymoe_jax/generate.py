r"""Generates text from a converted store, streaming it as it is produced.

  python -m lazymoe_jax.generate [--model=STORE_DIR] [--prompt="def f(x):"] \
      [--max_new_tokens=64] [--temperature=0] [--top_p=1] [--top_k=0] [--seed=0] [--expert_slots=N]

With no --model it runs the built-in default model (built into the cache on first use).
Ends with one summary line: prompt and decode tokens/s, experts read, hit rate, MB read, peak RSS.
"""

from __future__ import annotations

import sys

from absl import app, flags

import lazymoe_jax
from lazymoe_jax import cli
from lazymoe_jax.detokenize import IncrementalDecoder
from lazymoe_jax.errors import StoreError
from lazymoe_jax.sampling import Sampler

DEFAULT_PROMPT = 'def read_file(path):\n    """Return the contents of the file."""\n'

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("model", None, "Store folder (from checkpoints_tools.convert_hf). Default: "
                      "the built-in demo model.")
  flags.DEFINE_string("prompt", DEFAULT_PROMPT, "Prompt text.")
  flags.DEFINE_list("prompt_ids", None, "Prompt as token ids (for stores without a tokenizer).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate (stops early at eos).")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  cli.define_engine_flags()


FLAGS = flags.FLAGS


def summary_line(stats: dict, prompt_tokens: int, new_tokens: int) -> str:
  touched = stats["expert_hits"] + stats["expert_misses"]
  hit_rate = stats["expert_hits"] / touched if touched else 0.0
  return (f"[{prompt_tokens} prompt tokens at {stats['prompt_tokens_per_s']:.1f} tok/s | "
          f"{new_tokens} new at {stats['decode_tokens_per_s']:.1f} tok/s | experts read "
          f"{stats['expert_misses']}, hit rate {hit_rate:.1%}, {stats['bytes_read'] / 1e6:.1f} MB "
          f"read | pool {stats['pool_slots']} slots | peak RSS "
          f"{stats['peak_rss_bytes'] / 2**20:.0f} MiB]")


def run(model: str | None, prompt: str, prompt_ids: list[int] | None, max_new_tokens: int,
        sampler: Sampler, out=sys.stdout, **load_options) -> list[int]:
  """Loads the store (`lazymoe_jax.load(model, **load_options)`), streams the continuation to
  `out`, prints the summary; returns the new ids."""
  if model is None:
    from checkpoints_tools import default_model  # pylint: disable=import-outside-toplevel
    print(f"No --model: using {default_model.DESCRIPTION}.", file=sys.stderr)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    try:
      return _run(default_model.ensure_default_store(log), prompt, prompt_ids, max_new_tokens,
                  sampler, out, load_options)
    except StoreError as e:  # a damaged cache is rebuilt once, never trusted
      print(f"the cached demo store is damaged ({e}); rebuilding it", file=sys.stderr)
      return _run(default_model.ensure_default_store(log, rebuild=True), prompt, prompt_ids,
                  max_new_tokens, sampler, out, load_options)
  return _run(model, prompt, prompt_ids, max_new_tokens, sampler, out, load_options)


def _run(model, prompt, prompt_ids, max_new_tokens, sampler, out, load_options) -> list[int]:
  engine = lazymoe_jax.load(model, **load_options)
  if engine.plan is not None:
    print(engine.plan.describe(), file=sys.stderr)
  ids = [int(i) for i in prompt_ids] if prompt_ids else engine.tokenizer.encode(prompt)
  has_text = not isinstance(engine.tokenizer, lazymoe_jax.tokenizer.NoTokenizer)
  # stream() checks the prompt's length against the context when called, so a prompt that is
  # too long is refused before any of it is echoed
  tokens = engine.stream(ids, max_new_tokens, sampler)
  if has_text and not prompt_ids:
    out.write(prompt)
  new = []
  # Only a bounded window of recent tokens is decoded per token (decoding all the text again
  # each time is quadratic); it begins with the prompt's last tokens, so pieces that join
  # across the boundary (a leading space, a multi-byte character) come out right.
  decoder = IncrementalDecoder(engine.tokenizer, ids) if has_text else None
  for tok in tokens:
    new.append(tok)
    out.write(decoder.push(tok) if decoder else f"{tok} ")
    out.flush()
  if decoder:  # what was held back waiting for the rest of a character
    out.write(decoder.flush())
  out.write("\n")
  print(summary_line(engine.stats(), len(ids), len(new)), file=out)
  return new


def main(argv) -> None:
  del argv
  cli.run(cli.check_sampling_flags)  # before loading: a bad flag costs no conversion
  cli.run(lambda: run(
      FLAGS.model, FLAGS.prompt, FLAGS.prompt_ids, FLAGS.max_new_tokens,
      Sampler(FLAGS.temperature, FLAGS.top_p, FLAGS.top_k, FLAGS.seed), **cli.engine_options()))


if __name__ == "__main__":
  define_flags()
  app.run(main)
