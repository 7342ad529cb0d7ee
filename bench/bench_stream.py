r"""Streaming a model several times larger than the memory budget, under a real memory cap.

  python -m bench.bench_stream [--budget_gb=2] [--layers=32] [--tokens=48] [--workdir=/tmp/lazymoe_bench]

Builds (once) a synthetic Mixtral-layout bf16 model with bench.make_synthetic (32 layers, 16
experts, hidden 1024, expert width 2816: 8.7 GB of experts), then runs each configuration in a
child process inside a cgroup v1 memory cgroup whose limit is the budget (page cache included),
with the store's files dropped from the page cache first (cold). The engine plans its pool with
`memory_budget_gb` equal to the same budget. Configurations:
  naive     synchronous reads into top-k slots: no cache to speak of, no prefetch
  <policy>  the planned pool with that eviction policy, with and without speculative prefetch
            (lfu+prefetch:w1:d3 = read the 1 likeliest guess of each of the next 3 MoE layers)
and, without a cap, `resident`: every expert in RAM (the compute bound).
Tokens: the demo tokenizer's ids of held-out stdlib text (all < 2048), decoded teacher-forced one
token at a time, so routing follows real text's token repetitions; the routing statistics of
every run (top expert share, entropy, previous-token reuse) are printed beside its figures.
Also measured in the same run: the disk's cold O_DIRECT read bandwidth on the store's own
chunk files (one file at a time, and 8 in flight) and memory copy bandwidth. The disk here varies 2-3x from
minute to minute, so each configuration's I/O bound uses the mean of two samples (48 random
chunks, 8 in flight) taken just before and just after it: I/O bound = that bandwidth / bytes
read per token of the run; compute bound = resident decode tokens/s. And, independent of how
fast the disk happens to be: the fraction of the decode time with at least one expert read in
flight ("disk busy", stats()["disk_busy_s"]) and the bandwidth reached while busy. Beside each
hit rate, the oracle's (Belady's MIN on the run's own trace at the same pool size: the best any
eviction policy could do without prefetch). "x naive" is against the mean of the naive runs.
Needs root (cgroup v1 at /sys/fs/cgroup/memory); run nothing else heavy meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import math
import mmap
import os
import subprocess
import sys
import time

import numpy as np
import psutil
from absl import app, flags, logging

from bench import cgroups


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_float("budget_gb", 2.0, "Memory budget = cgroup limit (GB, 1e9 bytes).")
  flags.DEFINE_integer("layers", 32, "Synthetic model layers.")
  flags.DEFINE_integer("experts", 16, "Synthetic model experts.")
  flags.DEFINE_string("expert_dtype", "bf16", "Expert encoding of the store (converter name).")
  flags.DEFINE_integer("tokens", 48, "Decode steps timed (after 2 warm-up steps).")
  flags.DEFINE_integer("prompt", 32, "Prompt tokens (prefill timed).")
  flags.DEFINE_list("configs", ["naive", "lru", "lfu", "layer", "lfu+prefetch",
                                "lru+prefetch", "resident"], "Configurations to run.")
  flags.DEFINE_string("workdir", "/tmp/lazymoe_bench", "Where the synthetic model goes.")
  flags.DEFINE_string("json", None, "Write the rows here too.")
  flags.DEFINE_string("child", None, "(internal) run one configuration, given as JSON.")


FLAGS = flags.FLAGS


# ---- the measured machine -----------------------------------------------------------------------
def disk_bandwidth(paths: list[str], in_flight: int) -> float:
  """Cold read bandwidth (GB/s) of whole chunk files with O_DIRECT into aligned buffers,
  `in_flight` files at once: the raw disk, no page cache."""
  cgroups.drop_page_cache(paths)
  size = max(os.path.getsize(p) for p in paths)
  bufs = [mmap.mmap(-1, size) for _ in range(in_flight)]  # page-aligned, as O_DIRECT needs

  def read(i_path):
    i, path = i_path
    n = os.path.getsize(path) // 4096 * 4096
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
      return os.preadv(fd, [memoryview(bufs[i % in_flight])[:n]], 0)
    finally:
      os.close(fd)
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(in_flight) as ex:
    total = 0
    for start in range(0, len(paths), in_flight):
      total += sum(ex.map(read, enumerate(paths[start:start + in_flight], start)))
  return total / (time.perf_counter() - t0) / 1e9


def sample_chunks(chunks: list[str], n: int = 48) -> list[str]:
  return list(np.random.default_rng().choice(chunks, min(n, len(chunks)), replace=False))


def copy_bandwidth() -> float:
  a = np.ones(1 << 26, np.float32)  # 256 MB
  b = np.empty_like(a)
  best = math.inf
  for _ in range(5):
    t0 = time.perf_counter()
    np.copyto(b, a)
    best = min(best, time.perf_counter() - t0)
  return 2 * a.nbytes / best / 1e9  # read + write


# ---- one configuration, in a child process --------------------------------------------------------
def routing_summary(trace: list[tuple[int, np.ndarray]], num_experts: int) -> dict:
  by_layer: dict[int, list[np.ndarray]] = {}
  for layer, ids in trace:
    by_layer.setdefault(layer, []).append(ids)
  top, ent, reuse = [], [], []
  for seq in by_layer.values():
    picks = np.concatenate(seq)
    share = np.bincount(picks, minlength=num_experts) / picks.size
    top.append(share.max())
    nz = share[share > 0]
    ent.append(float(-(nz * np.log2(nz)).sum()))
    reuse += [len(set(a) & set(b)) / len(a) for a, b in zip(seq[:-1], seq[1:])]
  return {"top_share": float(np.mean(top)), "entropy_bits": float(np.mean(ent)),
          "uniform_entropy_bits": math.log2(num_experts), "prev_token_reuse": float(np.mean(reuse))}


def timeit_head(fn, n: int = 5) -> float:
  """Median seconds of fn() (a jitted call) after one warm-up call."""
  fn().block_until_ready()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn().block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def rss_anon() -> int:
  """Anonymous resident bytes of this process now (heap, pool, jax buffers; no file pages).
  On Linux psutil's rss - shared is /proc/self/statm's resident - shared: exactly RssAnon
  (shared counts the file and shmem pages)."""
  mem = psutil.Process().memory_info()
  return mem.rss - getattr(mem, "shared", 0)


def timed_decode(engine, ids: np.ndarray, n_prompt: int, n_tok: int, context: int) -> dict:
  """Prefill ids[:n_prompt] (timed), 2 warm-up decode steps (they compile), then n_tok
  teacher-forced decode steps (timed): per-token figures from the pool's counters, the
  fraction of the time the disk was busy, the peak anonymous RSS, the routing summary, the
  oracle's hit rate on this run's trace at this pool size (bench.cache_policies), and x (the
  last hidden state)."""
  from bench.cache_policies import oracle_hit_rate  # pylint: disable=import-outside-toplevel
  seq = engine.session(context)
  acquires: list[list[tuple[int, int]]] = []  # every acquire (a prefill layer: its experts)
  engine.forward.trace = lambda layer, e, h: acquires.append(
      [(layer, int(x)) for x in (e[0] if len(e) == 1 else np.unique(e))])
  t0 = time.perf_counter()
  seq.advance(ids[:n_prompt])
  prompt_s = time.perf_counter() - t0
  for i in range(n_prompt, n_prompt + 2):
    seq.advance(ids[i:i + 1])
  p = engine.pool
  counters = lambda: (p.hits, p.misses, p.bytes_read, p.prefetch_reads, p.prefetch_used,  # noqa: E731
                      p.io_wait_s, engine.experts.disk_busy.seconds())
  before = counters()
  first = len(acquires)
  anon = 0
  t0 = time.perf_counter()
  for i in range(n_prompt + 2, n_prompt + 2 + n_tok):
    x = seq.advance(ids[i:i + 1])
    anon = max(anon, rss_anon())
  x.block_until_ready()
  wall = time.perf_counter() - t0
  engine.forward.trace = None
  hits, misses, nbytes, pf, pf_used, io, busy = (a - b for a, b in zip(counters(), before))
  decode = [(keys[0][0], np.array([e for _, e in keys])) for keys in acquires[first:]]
  return {"x": x, "prompt_s": prompt_s, "token_s": wall / n_tok,
          "io_wait_s_per_token": io / n_tok, "MB_read_per_token": nbytes / n_tok / 1e6,
          "hit_rate": hits / max(1, hits + misses), "disk_busy_frac": busy / wall,
          "read_GBps_while_busy": nbytes / busy / 1e9 if busy else None,
          "oracle_hit_rate": oracle_hit_rate(acquires, p.num_slots,
                                             [i >= first for i in range(len(acquires))])
          if len(p.table) < p.num_slots or p.misses else None,  # None: preloaded, all resident
          "prefetch_accuracy": pf_used / pf if pf else None, "peak_anon_rss_MB": anon / 1e6,
          **routing_summary(decode, engine.spec.num_experts)}


def run_child(conf: dict) -> dict:
  import lazymoe_jax  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  store, name = conf["store"], conf["name"]
  n_prompt, n_tok = conf["prompt"], conf["tokens"]
  context = n_prompt + n_tok + 8
  policy, prefetch = name.split("+")[0], "+prefetch" in name
  if name == "naive":
    engine = lazymoe_jax.load(store, expert_slots=2, prefetch=False, max_context=context)
  elif name == "resident":
    engine = lazymoe_jax.load(store, expert_slots=10**9, prefetch=False, max_context=context)
    for layer in engine.spec.moe_layers:
      engine.pool.acquire(layer, range(engine.spec.num_experts))
  else:
    engine = lazymoe_jax.load(store, memory_budget_gb=conf["budget_gb"], cache_policy=policy,
                              prefetch=prefetch, max_context=context)
  for opt in name.split("+prefetch")[1].split(":")[1:] if "+prefetch" in name else []:
    if opt.startswith("w"):  # guesses read per layer ahead, most likely first
      engine.forward.prefetch_width = int(opt[1:])
    if opt.startswith("d"):  # MoE layers ahead
      engine.forward.prefetch_depth = int(opt[1:])
  d = timed_decode(engine, np.array(conf["ids"], np.int32), n_prompt, n_tok, context)
  import resource  # pylint: disable=import-outside-toplevel
  mem, cg = {}, cgroups.own()
  if cg:
    stat = cg.stat()
    mem = {k + "_MB_at_end": stat[k] / 1e6 for k in ("rss", "cache", "mapped_file")}
  return {"config": name, "slots": engine.pool.num_slots,
          "plan": engine.plan.describe() if engine.plan else None, **mem,
          "decode_tok_s": 1 / d["token_s"], "prompt_tok_s": n_prompt / d["prompt_s"],
          "compute_s_per_token": d["token_s"] - d["io_wait_s_per_token"],
          "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "expert_MB": engine.experts.bytes_per_expert / 1e6,
          **{k: v for k, v in d.items() if k not in ("x", "prompt_s", "token_s")}}


# ---- the parent: cgroups, cold cache, table --------------------------------------------------------
def run_in_cgroup(conf: dict, limit: int | None, module: str = "bench.bench_stream") -> dict:
  """Runs `python -m module --child JSON` (in a fresh memory cgroup capped at `limit` bytes
  when given); returns the child's RESULT row plus the cgroup's peak and OOM kills."""
  cmd = [sys.executable, "-m", module, "--child", json.dumps(conf)]

  def run(wrap=lambda c: c) -> dict:
    proc = subprocess.run(wrap(cmd), capture_output=True, text=True, check=False)
    row = {"config": conf["name"]}
    for line in proc.stdout.splitlines():
      if line.startswith("RESULT "):
        row = json.loads(line[7:])
    if proc.returncode != 0:
      row["error"] = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    return row
  if limit is None:
    return run()
  with cgroups.MemoryCgroup(conf["name"], limit) as cg:
    row = run(cg.command)  # joins before exec: everything the child maps is charged
    row["cgroup_peak_MB"] = cg.peak_bytes() / 1e6
    row["oom_kills"] = cg.oom_kills()
    return row


def ensure_model() -> str:
  from bench import make_synthetic  # pylint: disable=import-outside-toplevel
  from checkpoints_tools import convert_hf  # pylint: disable=import-outside-toplevel
  hf = os.path.join(FLAGS.workdir, f"synthetic-{FLAGS.layers}x{FLAGS.experts}-1024")
  if not os.path.exists(os.path.join(hf, "config.json")):
    make_synthetic.make_synthetic(hf, FLAGS.layers, 1024, 2816, FLAGS.experts, 2, 32000, 16, 4,
                                  64, "bfloat16")
  names = {"bf16": "bfloat16"}
  store = f"{hf}-{names.get(FLAGS.expert_dtype, FLAGS.expert_dtype)}"
  if not os.path.exists(os.path.join(store, "manifest.json")):
    convert_hf.convert(hf, store, expert_dtype=FLAGS.expert_dtype, overwrite=True,
                       log=lambda s: None)
  return store


def main(argv) -> None:
  del argv
  if FLAGS.child:
    print("RESULT " + json.dumps(run_child(json.loads(FLAGS.child))), flush=True)
    return
  logging.set_verbosity(logging.WARNING)
  cgroups.require("this benchmark")
  store = ensure_model()
  chunks = sorted(glob.glob(os.path.join(store, "experts", "**", "c", "**", "*"), recursive=True))
  chunks = [c for c in chunks if os.path.isfile(c)]
  model_gb = sum(os.path.getsize(c) for c in chunks) / 1e9
  cgroups.drop_page_cache(chunks)
  sample = list(np.random.default_rng(0).choice(chunks, min(96, len(chunks)), replace=False))
  disk1, disk8 = disk_bandwidth(sample[:48], 1), disk_bandwidth(sample[48:], 8)
  copy = copy_bandwidth()
  print(f"store {store}: {len(chunks)} expert chunk files, {model_gb:.2f} GB of experts; budget "
        f"{FLAGS.budget_gb} GB ({model_gb / FLAGS.budget_gb:.1f}x smaller)")
  print(f"disk cold reads on the store's chunks: {disk1:.2f} GB/s one at a time, {disk8:.2f} GB/s "
        f"8 in flight; memory copy {copy:.1f} GB/s")
  import lazymoe_jax  # pylint: disable=import-outside-toplevel
  from checkpoints_tools import corpus, default_model  # pylint: disable=import-outside-toplevel
  demo = lazymoe_jax.load(default_model.ensure_default_store(lambda s: None), expert_slots=2)
  ids = demo.tokenizer.encode(corpus.stdlib_corpus(1 << 16, held_out=True))
  ids = [int(i) for i in ids[:FLAGS.prompt + FLAGS.tokens + 2]]
  del demo
  rows = []
  limit = int(FLAGS.budget_gb * 1e9)
  for name in FLAGS.configs:
    disk_before = disk_bandwidth(sample_chunks(chunks), 8)
    cgroups.drop_page_cache(chunks)
    conf = {"store": store, "name": name, "budget_gb": FLAGS.budget_gb,
            "prompt": FLAGS.prompt, "tokens": FLAGS.tokens, "ids": ids}
    row = run_in_cgroup(conf, None if name == "resident" else limit)
    row["disk_GBps"] = (disk_before + disk_bandwidth(sample_chunks(chunks), 8)) / 2
    rows.append(row)
    if "error" in row:
      print(f"{name:14s} FAILED {row['error']}", flush=True)
      continue
    row["io_bound_tok_s"] = row["disk_GBps"] * 1e3 / row["MB_read_per_token"] if row[
        "MB_read_per_token"] else math.inf
    print(f"{name:14s} decode {row['decode_tok_s']:6.2f} tok/s | prompt {row['prompt_tok_s']:6.1f}"
          f" tok/s | {row['slots']:4d} slots | {row['MB_read_per_token']:7.1f} MB/tok | hit "
          f"{row['hit_rate']:5.1%} (oracle "
          f"{'-' if row['oracle_hit_rate'] is None else format(row['oracle_hit_rate'], '5.1%')}) | "
          "prefetch acc "
          f"{'-' if row['prefetch_accuracy'] is None else format(row['prefetch_accuracy'], '.0%')}"
          f" | io wait {row['io_wait_s_per_token'] * 1e3:6.0f} ms/tok, rest "
          f"{row['compute_s_per_token'] * 1e3:5.0f} ms/tok | disk busy {row['disk_busy_frac']:.0%}"
          f" of decode | cgroup peak "
          f"{row.get('cgroup_peak_MB', float('nan')):6.0f} MB, anon RSS "
          f"{row['peak_anon_rss_MB']:5.0f} MB"
          f" | routing: top {row['top_share']:.0%}, H {row['entropy_bits']:.2f}/"
          f"{row['uniform_entropy_bits']:.0f} bits, reuse {row['prev_token_reuse']:.0%} | disk "
          f"{row['disk_GBps']:.2f} GB/s", flush=True)
  by = {r["config"]: r for r in rows if "error" not in r}
  if "resident" in by:
    compute = by["resident"]["decode_tok_s"]
    print(f"compute bound (resident decode): {compute:.2f} tok/s")
    naives = [r["decode_tok_s"] for r in rows if r["config"] == "naive" and "error" not in r]
    naive = float(np.mean(naives)) if naives else None  # x naive: against the mean naive run
    if naive:
      print(f"naive: {naive:.2f} tok/s (mean of {len(naives)} runs)")
    for r in rows:
      if "error" in r or r["config"] in ("resident",):
        continue
      bound = min(r["io_bound_tok_s"], compute)
      r["ratio_to_bound"] = r["decode_tok_s"] / bound
      r["x_naive"] = r["decode_tok_s"] / naive if naive else None
      print(f"  {r['config']:14s} {r['decode_tok_s']:6.2f} tok/s = {r['ratio_to_bound']:.0%} of "
            f"min(I/O bound {r['io_bound_tok_s']:.2f}, compute {compute:.2f}); disk busy "
            f"{r['disk_busy_frac']:.0%} of the time, {r['read_GBps_while_busy'] or 0:.2f} GB/s "
            "while busy"
            + (f", {r['x_naive']:.2f}x naive" if r["x_naive"] else ""))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"disk_GBps_1": disk1, "disk_GBps_8": disk8, "copy_GBps": copy,
                 "model_GB": model_gb, "budget_gb": FLAGS.budget_gb, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
