r"""The server under concurrent streams: aggregate decode tok/s, bytes read per generated token,
time to first token per stream, for 1, 2, 4, 8 and 16 concurrent streaming clients.

  python -m bench.bench_serve [--model=STORE_DIR] [--memory_budget_gb=2 | --expert_slots=N] \
      [--streams=1,2,4,8,16] [--max_tokens=64] [--max_context=N] [--port=0] [--cgroup_gb=2]

Starts `python -m lazymoe_jax.serve` on 127.0.0.1 (a free port) with --parallel = the most
streams, waits for /health, runs one unmeasured round (compilation), then for each stream
count N sends N greedy streaming /v1/completions at once (different prompts) and reads:
  wall tok/s     completion tokens of the round / the round's wall time (prefill included)
  decode tok/s   the server's own figure: tokens / time of its decode steps (feed_batch calls)
  mean batch     sequences per decode step, as the server saw them
  bytes/token    expert bytes read from disk during the round / completion tokens
  experts/tok    experts the decode steps ran per generated token, all MoE layers (a batch
                 runs each expert its sequences pick once; the server's figure)
  weights MB/tok the weights a decode token reads: the dense weights once per step (the held
                 embedding table left out: one row a token) / mean batch, plus experts/tok x
                 the bytes of an expert (KV reads not counted); `bound` = the first row's
                 (one stream's, with the default --streams) weights MB/tok / this row's: the
                 most batching can gain where decode is bound by reading the weights
  (mean batch, experts/tok and decode tok/s are the server's figures over its last 64 steps)
  TTFT           time to the first text chunk per stream: min / mean / max
No --model: the shipped demo model (all experts resident unless a budget or slots are given).
A store without a tokenizer (bench.make_synthetic) gets prompts as token ids (the demo
tokenizer's ids of the same texts). --cgroup_gb runs the server in a fresh cgroup v1 memory
cgroup capped at that many GB (page cache included; needs root), as bench_stream does, and
reports the cgroup's peak; give --memory_budget_gb the same figure so the pool is planned for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import time
from http import client as http_client

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import cgroups  # noqa: E402  pylint: disable=wrong-import-position
from tests.serving import free_port, http  # noqa: E402  pylint: disable=wrong-import-position

PROMPTS = [
    "def read_file(path):\n", "class Stack:\n    def push(self, item):\n",
    "import os\n\n\ndef walk(top):\n", "def fibonacci(n):\n    ",
    "    def __repr__(self):\n        return", "for i in range(10):\n",
    "def parse_args(argv):\n    \"\"\"Parse", "with open(filename) as f:\n",
    "def main():\n", "class Config:\n    \"\"\"", "def _check(value):\n    if",
    "import sys\nimport json\n\n", "    try:\n        ", "def copy(src, dst):\n",
    "class Node:\n    def __init__(self, value):\n", "    @property\n    def name(self):\n",
]

flags.DEFINE_string("model", None, "Store folder (default: the shipped demo model).")
flags.DEFINE_float("memory_budget_gb", None, "Passed to the server.")
flags.DEFINE_integer("expert_slots", None, "Passed to the server.")
flags.DEFINE_list("streams", ["1", "2", "4", "8", "16"], "Concurrent stream counts.")
flags.DEFINE_integer("max_tokens", 64, "Tokens per stream.")
flags.DEFINE_integer("port", 0, "Port (0: a free one).")
flags.DEFINE_float("cgroup_gb", None, "Run the server under a cgroup v1 memory cap of this many "
                   "GB (1e9 bytes; needs root).")
flags.DEFINE_integer("prefill_chunk", 64, "Passed to the server.")
flags.DEFINE_integer("max_context", None, "Passed to the server (positions per sequence; the "
                     "KV cache of --parallel sequences is planned for it).")
FLAGS = flags.FLAGS


def one_stream(port: int, prompt, max_tokens: int) -> dict:
  t0 = time.perf_counter()
  conn = http_client.HTTPConnection("127.0.0.1", port, timeout=600)
  conn.request("POST", "/v1/completions", json.dumps({
      "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
      "stream_options": {"include_usage": True}}), {"Content-Type": "application/json"})
  resp = conn.getresponse()
  ttft, tokens = None, 0
  for line in resp:
    if not line.startswith(b"data:"):
      continue
    data = line[5:].strip()
    if data == b"[DONE]":
      break
    chunk = json.loads(data)
    if "error" in chunk:
      raise RuntimeError(chunk["error"]["message"])
    if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
      ttft = time.perf_counter() - t0
    if chunk.get("usage"):
      tokens = chunk["usage"]["completion_tokens"]
  conn.close()
  return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "tokens": tokens,
          "end": time.perf_counter()}


def run_round(url: str, port: int, n: int, max_tokens: int, prompts: list) -> dict:
  before = http("GET", url + "/stats")[1]
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    res = list(pool.map(lambda i: one_stream(port, prompts[i % len(prompts)], max_tokens),
                        range(n)))
  wall = max(r["end"] for r in res) - t0
  after = http("GET", url + "/stats")[1]
  tokens = sum(r["tokens"] for r in res)
  ttfts = [r["ttft"] for r in res]
  return {"streams": n, "tokens": tokens, "wall_s": wall, "wall_tok_s": tokens / wall,
          "decode_tok_s": after["decode_tokens_per_s"], "mean_batch": after["mean_batch"],
          "bytes_per_token": (after["bytes_read"] - before["bytes_read"]) / max(tokens, 1),
          "ttft_min": min(ttfts), "ttft_mean": sum(ttfts) / n, "ttft_max": max(ttfts),
          "experts_per_token": after["decode_experts_per_token"],
          "weight_bytes_per_token": weight_bytes(after)}


def weight_bytes(stats: dict) -> float:
  """Weight bytes a decode token reads (see the module doc): dense per step / batch
  plus experts per token x bytes per expert."""
  dense = stats["dense_bytes"] - stats["embedding_held_bytes"]
  return (dense / max(stats["mean_batch"], 1e-9) +
          stats["decode_experts_per_token"] * stats["expert_bytes"])


def _prompts(model: str | None) -> list:
  """The texts, or for a store without a tokenizer the demo tokenizer's ids of them."""
  if model is None:
    return PROMPTS
  from lazymoe_jax.store import format as fmt  # pylint: disable=import-outside-toplevel
  if fmt.read_manifest(model).get("tokenizer"):
    return PROMPTS
  from lazymoe_jax import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  demo = os.path.join(ROOT, "lazymoe_jax", "demo_model")
  tok = tokenizer_lib.load(demo, {"file": "tokenizer.model", "kind": "sentencepiece"}, 1)
  return [tok.encode(p) for p in PROMPTS]


def main(argv) -> None:
  del argv
  counts = [int(s) for s in FLAGS.streams]
  port = FLAGS.port or free_port()
  args = [sys.executable, "-m", "lazymoe_jax.serve", "--host=127.0.0.1", f"--port={port}",
          f"--parallel={max(counts)}", f"--max_queue={max(counts)}",
          f"--prefill_chunk={FLAGS.prefill_chunk}"]
  if FLAGS.model:
    args.append(f"--model={FLAGS.model}")
  if FLAGS.memory_budget_gb:
    args.append(f"--memory_budget_gb={FLAGS.memory_budget_gb}")
  if FLAGS.expert_slots:
    args.append(f"--expert_slots={FLAGS.expert_slots}")
  if FLAGS.max_context:
    args.append(f"--max_context={FLAGS.max_context}")
  prompts = _prompts(FLAGS.model)
  with contextlib.ExitStack() as stack:
    cg = None
    if FLAGS.cgroup_gb is not None:
      cgroups.require("--cgroup_gb")
      cg = stack.enter_context(cgroups.MemoryCgroup("bench_serve", int(FLAGS.cgroup_gb * 1e9)))
    # joins before exec: everything the server maps is charged
    proc = subprocess.Popen(cg.command(args) if cg else args, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    serve(proc, port, counts, prompts, cg)


def serve(proc, port: int, counts: list[int], prompts: list, cg) -> None:
  """The measured rounds against the started server; stops it at the end."""
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 1800
    while True:
      try:
        if http("GET", url + "/health", timeout=5)[0] == 200:
          break
      except OSError:
        pass
      if proc.poll() is not None or time.time() > deadline:
        raise SystemExit("the server did not start")
      time.sleep(0.5)
    run_round(url, port, min(2, max(counts)), 8, prompts)  # compiles what warm-up did not
    print(f"load average {os.getloadavg()[0]:.1f}; {http('GET', url + '/stats')[1]['memory_plan']}")
    print(f"{'streams':>7} {'tokens':>6} {'wall s':>7} {'wall tok/s':>10} {'decode tok/s':>12} "
          f"{'batch':>5} {'KB read/tok':>11} {'experts/tok':>11} {'weights MB/tok':>14} "
          f"{'bound':>5} {'TTFT min/mean/max s':>20}")
    rows = []
    for n in counts:
      r = run_round(url, port, n, FLAGS.max_tokens, prompts)
      rows.append(r)
      print(f"{n:>7} {r['tokens']:>6} {r['wall_s']:>7.2f} {r['wall_tok_s']:>10.1f} "
            f"{r['decode_tok_s']:>12.1f} {r['mean_batch']:>5.2f} "
            f"{r['bytes_per_token'] / 1e3:>11.1f} {r['experts_per_token']:>11.2f} "
            f"{r['weight_bytes_per_token'] / 1e6:>14.1f} "
            f"{rows[0]['weight_bytes_per_token'] / r['weight_bytes_per_token']:>4.2f}x "
            f"{r['ttft_min']:>6.2f}/{r['ttft_mean']:.2f}/{r['ttft_max']:.2f}", flush=True)
    for key in ("wall_tok_s", "decode_tok_s"):
      base = rows[0][key]
      print(f"{key.replace('_', ' ')} x one stream: " + ", ".join(
          f"{r['streams']}: {r[key] / base:.2f}x" for r in rows))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if cg:
      print(f"cgroup peak {cg.peak_bytes() / 1e6:.0f} MB of {FLAGS.cgroup_gb * 1e3:.0f} MB, "
            f"OOM kills {cg.oom_kills()}")
  finally:
    proc.terminate()
    proc.wait(30)


if __name__ == "__main__":
  app.run(main)
