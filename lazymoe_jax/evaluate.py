r"""Batch evaluation: perplexity of a text, or completions for a file of prompts.

  python -m lazymoe_jax.evaluate --model=STORE --text_file=FILE [--context=N --stride=N/2]
  python -m lazymoe_jax.evaluate --model=STORE --prompts_jsonl=IN --output=OUT.jsonl \
      [--max_new_tokens=64 --temperature=0 --seed=0]

Perplexity is exp of the mean negative log-likelihood of every token after the first (a BOS is
prepended only where the model's tokenizer config asks for it). Texts longer than --context are
scored in windows that start every --stride tokens; each token is scored once, with as much
left context as its window gives (the sliding-window scheme of the transformers docs).

Prompt lines are JSON objects: {"id", "prompt", optional "max_new_tokens", "temperature",
"top_p", "top_k", "seed"}; a line's settings override the flags. Each result is one JSONL record
appended to --output and flushed; re-running with the same --output skips what is already
there (ids, and error records by line number), so an interrupted run resumes without losing or
duplicating anything. A malformed line becomes {"line": N, "error": "..."} and the run goes on.
A summary JSON is printed and written beside the output (OUT.summary.json).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags
from tqdm import tqdm

import lazymoe_jax
from lazymoe_jax import cli
from lazymoe_jax.errors import LazyMoEError
from lazymoe_jax.sampling import Sampler

PROMPT_KEYS = {"id", "prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed"}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity(engine, ids: list[int], context: int, stride: int, progress: bool = True) -> dict:
  """Sliding-window perplexity of token ids (every token after the first is scored once)."""
  if len(ids) < 2:
    raise ValueError("the text has fewer than 2 tokens: nothing to score.")
  limit = engine.spec.max_position_embeddings
  if context > limit:
    raise ValueError(f"context {context} exceeds the model's {limit} positions; its scores "
                     "there would measure positions it never saw. Use --context <= "
                     f"{limit}.")
  if not 0 < stride < context:  # overlap >= 1 keeps left context for every scored token
    raise ValueError(f"need 0 < stride < context (got stride={stride}, context={context}).")
  nll, scored, done = 0.0, 0, 1  # done: tokens [0, done) are scored or are the unscored first
  t0 = time.perf_counter()
  bar = tqdm(total=len(ids) - 1, unit="tok", disable=not progress, file=sys.stderr,
              mininterval=1.0)
  begin = 0
  while done < len(ids):
    end = min(begin + context, len(ids))
    window = ids[begin:end]
    logp = _log_softmax(engine.logits(window))
    targets = np.arange(done, end)  # positions scored in this window
    nll -= float(logp[targets - begin - 1, np.asarray(window)[targets - begin]].sum())
    scored += len(targets)
    bar.update(len(targets))
    bar.set_postfix(tok_s=f"{scored / (time.perf_counter() - t0):.1f}")
    done = end
    begin += stride
  bar.close()
  return {"perplexity": math.exp(nll / scored), "scored_tokens": scored,
          "nll_mean": nll / scored, "context": context, "stride": stride,
          "tokens_per_s": scored / (time.perf_counter() - t0)}


def _read_done(output: str) -> tuple[set, set]:
  """ids and error line numbers already written; drops a torn last line left by a kill."""
  done_ids, done_lines = set(), set()
  if not os.path.exists(output):
    return done_ids, done_lines
  with open(output, "rb") as f:
    data = f.read()
  keep = data if data.endswith(b"\n") or not data else data[:data.rfind(b"\n") + 1]
  if len(keep) != len(data):
    with open(output, "r+b") as f:  # the last record was cut short: it will be redone
      f.truncate(len(keep))
  for line in keep.decode("utf-8").splitlines():
    rec = json.loads(line)
    if "id" in rec:
      done_ids.add(rec["id"])
    elif "line" in rec:
      done_lines.add(rec["line"])
  return done_ids, done_lines


def _parse(line: str, seen: set) -> dict[str, Any]:
  rec = json.loads(line)
  if not isinstance(rec, dict):
    raise ValueError("a line must be a JSON object")
  unknown = set(rec) - PROMPT_KEYS
  if unknown:
    raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(PROMPT_KEYS)}")
  if "id" not in rec or "prompt" not in rec:
    raise ValueError('needs "id" and "prompt"')
  if not isinstance(rec["prompt"], str):
    raise ValueError('"prompt" must be a string')
  if not isinstance(rec["id"], (str, int)):
    raise ValueError('"id" must be a string or an integer')
  if rec["id"] in seen:
    raise ValueError(f"duplicate id {rec['id']!r}")
  for key, kind, ok, rule in (
      ("max_new_tokens", int, lambda v: v >= 0, "an integer >= 0"),
      ("top_k", int, lambda v: v >= 0, "an integer >= 0"),
      ("seed", int, lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)"),
      ("temperature", (int, float), lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
      ("top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")):
    if key in rec and (isinstance(rec[key], bool) or not isinstance(rec[key], kind)
                       or not ok(rec[key])):
      raise ValueError(f'"{key}" must be {rule}, got {rec[key]!r}')
  return rec


def run_prompts(engine, prompts_jsonl: str, output: str, max_new_tokens: int,
                sampler: Sampler, progress: bool = True) -> dict:
  """Completes every prompt line not yet in `output`; returns the summary."""
  done_ids, done_lines = _read_done(output)
  with open(prompts_jsonl, encoding="utf-8") as f:  # JSONL lines end at "\n" only (a prompt
    lines = [l.rstrip("\r") for l in f.read().split("\n")]  # may hold U+2028 and the like)
  if lines and not lines[-1]:
    lines.pop()
  counts = {"prompts": 0, "completed": 0, "skipped_already_done": 0, "errors": 0}
  prompt_tok = decode_tok = 0
  prompt_s = decode_s = 0.0
  seen: set = set()
  bar = tqdm(total=len(lines), unit="prompt", disable=not progress, file=sys.stderr,
              mininterval=1.0)
  with open(output, "a", encoding="utf-8") as out:

    def write(rec):
      out.write(json.dumps(rec) + "\n")
      out.flush()

    for n, line in enumerate(lines, start=1):
      bar.update(1)
      if not line.strip():
        continue
      counts["prompts"] += 1
      try:
        rec = _parse(line, seen)
        seen.add(rec["id"])
        if rec["id"] in done_ids:
          counts["skipped_already_done"] += 1
          continue
        s = Sampler(float(rec.get("temperature", sampler.temperature)),
                    float(rec.get("top_p", sampler.top_p)), int(rec.get("top_k", sampler.top_k)),
                    int(rec.get("seed", sampler.seed)))
        ids = engine.tokenizer.encode(rec["prompt"])
        t0 = time.perf_counter()
        new = engine.generate(ids, int(rec.get("max_new_tokens", max_new_tokens)), s.temperature,
                              s.top_p, s.top_k, s.seed)
        seconds = time.perf_counter() - t0
      except (ValueError, TypeError, LazyMoEError) as e:  # json errors are ValueErrors
        counts["errors"] += 1
        if n not in done_lines:
          write({"line": n, "error": f"{type(e).__name__}: {e}"})
        continue
      st = engine.stats()
      p_s = len(ids) / st["prompt_tokens_per_s"] if st["prompt_tokens_per_s"] else 0.0
      write({"id": rec["id"], "completion": engine.tokenizer.decode(new),
             "prompt_tokens": len(ids), "completion_tokens": len(new), "new_token_ids": new,
             "seconds": round(seconds, 4), "prompt_tokens_per_s": st["prompt_tokens_per_s"],
             "decode_tokens_per_s": st["decode_tokens_per_s"]})
      counts["completed"] += 1
      prompt_tok, decode_tok = prompt_tok + len(ids), decode_tok + len(new)
      prompt_s, decode_s = prompt_s + p_s, decode_s + max(seconds - p_s, 0.0)
      bar.set_postfix(decode_tok_s=f"{decode_tok / decode_s:.1f}" if decode_s else "-")
  bar.close()
  return {**counts, "prompt_tokens": prompt_tok, "completion_tokens": decode_tok,
          "prompt_tokens_per_s": prompt_tok / prompt_s if prompt_s else 0.0,
          "decode_tokens_per_s": decode_tok / decode_s if decode_s else 0.0}


def _engine_summary(engine) -> dict:
  st = engine.stats()
  touched = st["expert_hits"] + st["expert_misses"]
  return {"expert_hit_rate": st["expert_hits"] / touched if touched else 0.0,
          "expert_reads": st["expert_misses"], "mb_read": st["bytes_read"] / 1e6,
          "pool_slots": st["pool_slots"], "peak_rss_mb": st["peak_rss_bytes"] / 2**20}


def evaluate(model: str, text_file: str | None = None, prompts_jsonl: str | None = None,
             output: str | None = None, context: int | None = None, stride: int | None = None,
             max_new_tokens: int = 64, sampler: Sampler = Sampler(), progress: bool = True,
             **load_options) -> dict:
  """The CLI as a function: returns the summary (also written to OUTPUT.summary.json).
  load_options go to `lazymoe_jax.load` (expert_slots, memory_budget_gb, kv_bits, ...)."""
  if (text_file is None) == (prompts_jsonl is None):
    raise ValueError("give exactly one of --text_file and --prompts_jsonl.")
  for path in (text_file, prompts_jsonl):
    if path is not None and not os.path.exists(path):
      raise ValueError(f"input file {path} does not exist.")
  if prompts_jsonl is not None and output is None:
    raise ValueError("--prompts_jsonl needs --output (the JSONL file results are appended to).")
  engine = lazymoe_jax.load(model, **load_options)
  if text_file is not None:
    with open(text_file, encoding="utf-8") as f:
      ids = engine.tokenizer.encode(f.read())
    context = context or min(engine.spec.max_position_embeddings, 4096)  # the model's context
    summary = perplexity(engine, ids, context, stride or context // 2, progress)
  else:
    summary = run_prompts(engine, prompts_jsonl, output, max_new_tokens, sampler, progress)
  summary = {"model": os.path.abspath(model), **summary, **_engine_summary(engine)}
  if output is not None:
    with open(output + ".summary.json", "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("model", None, "Store folder (default: the shipped demo model).")
  flags.DEFINE_string("text_file", None, "Text to compute the perplexity of.")
  flags.DEFINE_integer("context", None, "Perplexity window (default: the model's "
                       "max_position_embeddings, at most 4096).")
  flags.DEFINE_integer("stride", None, "Distance between windows (default: context / 2).")
  flags.DEFINE_string("prompts_jsonl", None, "Prompts, one JSON object a line.")
  flags.DEFINE_string("output", None, "JSONL results (appended; re-run to resume).")
  flags.DEFINE_integer("max_new_tokens", 64, "Default tokens per completion.")
  flags.DEFINE_float("temperature", 0.0, "Default temperature (0 = greedy).")
  flags.DEFINE_float("top_p", 1.0, "Default nucleus mass.")
  flags.DEFINE_integer("top_k", 0, "Default top-k (0 = all).")
  flags.DEFINE_integer("seed", 0, "Default sampling seed.")
  cli.define_engine_flags()


FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv

  def work():
    cli.check_sampling_flags()
    model = FLAGS.model
    if model is None:
      from checkpoints_tools import default_model  # pylint: disable=import-outside-toplevel
      model = default_model.ensure_default_store(lambda s: print(s, file=sys.stderr))
    summary = evaluate(model, FLAGS.text_file, FLAGS.prompts_jsonl, FLAGS.output, FLAGS.context,
                       FLAGS.stride, FLAGS.max_new_tokens,
                       Sampler(FLAGS.temperature, FLAGS.top_p, FLAGS.top_k, FLAGS.seed),
                       **cli.engine_options())
    print(json.dumps(summary, indent=1))
  cli.run(work)


if __name__ == "__main__":
  define_flags()
  app.run(main)
