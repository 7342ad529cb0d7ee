r"""The honest "gpt-oss-120b in 8 GB" figure: a real slice measured, the rest extrapolated.

  python -m bench.bench_120b [--layers=4] [--budget_gb=8] [--tokens=16] [--dense_dtype=int8]
  python -m bench.bench_120b --full [--caps_gb=8,4] [--keep] [--workdir=DIR]

Full mode (--full) measures the whole model, with no extrapolation: it writes the 36-layer
store (write_full_store: ~65 GB, checked against free disk space first, waiting up to
--wait_minutes for it), then per cap runs one process in a fresh cgroup v1 memory cgroup capped
from its start (load included), page cache cold: load, a 64-token prompt (time to first token),
64 teacher-forced decode steps; it prints load time, TTFT, decode tok/s, demand and speculative
GB per token, hit rate, prefetch accuracy, disk busy %, the cgroup peak, and the disk's O_DIRECT
bandwidth sampled before and after that run. The store is deleted afterwards unless --keep.

Slice mode (the default):

gpt-oss-120b: 36 layers, 128 experts of hidden 2880 x width 2880, top-4, MXFP4 experts
(~13 MB each, 61 GB in all), attention 64 q / 8 kv heads of 64, vocab 201,088. This builds (once)
a slice with those real shapes but --layers layers (bench.make_synthetic.make_gpt_oss_mxfp4:
random weights, experts in the published MXFP4 layout, kept byte for byte in the store), then:
1. a probe process loads the slice and measures the runtime, the per-layer dense bytes, the
   global dense bytes (embedding + head) and the expert size;
2. from these it plans the *full* model in the budget (runtime + globals + 36 layers' dense +
   KV + margin, the rest expert slots) and gives the slice exactly its share: the same runtime,
   globals and margin, its layers' dense params and layers/36 of the full pool;
3. runs the slice decoding under a cgroup v1 cap of that slice budget (from the end of loading:
   orbax's restore peaks at ~2x the dense params, a one-off the full budget holds), cold page cache, with
   the engine's own memory plan for the same budget, and measures per token: wall time, time
   blocked on reads, MB read, hit rate; and the output head alone;
4. extrapolates: per-layer time = (token time - head time) / layers; full token = 36 x that
   + head. Also the I/O view: 36/layers x MB read per token at the disk's measured O_DIRECT
   bandwidth.
Assumptions are printed with the figure: random weights (routing from real-text token ids,
printed), a short context, this machine's 2 cores and disk.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from bench import bench_stream, cgroups

FULL_LAYERS = 36


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_integer("layers", 4, "Layers in the measured slice.")
  flags.DEFINE_float("budget_gb", 8.0, "Memory budget of the full model (GB, 1e9 bytes).")
  flags.DEFINE_integer("tokens", 16, "Decode steps timed (after 2 warm-up steps).")
  flags.DEFINE_integer("prompt", 8, "Prompt tokens.")
  flags.DEFINE_enum("dense_dtype", "int8", ["keep", "bfloat16", "int8"], "Dense weights.")
  flags.DEFINE_string("workdir", "/tmp/lazymoe_bench", "Where the slice goes.")
  flags.DEFINE_string("json", None, "Write the figures here too.")
  flags.DEFINE_string("child", None, "(internal) one measurement, given as JSON.")
  flags.DEFINE_bool("full", False, "Full mode: the whole 36-layer store, measured, no "
                    "extrapolation (prompt 64 and 64 decode tokens unless given).")
  flags.DEFINE_list("caps_gb", ["8", "4"], "Full mode: cgroup caps (GB), one run each.")
  flags.DEFINE_bool("keep", False, "Full mode: keep the 61 GB store afterwards.")
  flags.DEFINE_float("wait_minutes", 30, "Full mode: how long to wait for disk space.")
  flags.DEFINE_float("prefetch_threshold", None, "Full mode: the prefetch policy's confidence "
                     "threshold for every kind of guess (default: engine/prefetch.THRESHOLDS, per kind).")


FLAGS = flags.FLAGS


def _load(conf: dict, **kw):
  import lazymoe_jax  # pylint: disable=import-outside-toplevel
  dense = None if conf["dense_dtype"] == "keep" else conf["dense_dtype"]
  return lazymoe_jax.load(conf["store"], dense_dtype=dense, max_context=conf["context"], **kw)


def run_child(conf: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import steps  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.plan import resident_bytes  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  if conf["mode"] == "probe":
    engine = _load(conf, expert_slots=engine_slots_min(conf))
    layer_bytes = [sum(a.nbytes for a in jax.tree.leaves(p)) for p in engine.forward.layers]
    glob_bytes = sum(a.nbytes for a in jax.tree.leaves(engine.forward.globals))
    kv = engine.kv.init(engine.spec, conf["context"])
    return {"rss_after_load": resident_bytes(), "layer_dense_bytes": float(np.mean(layer_bytes)),
            "slice_dense_bytes": sum(layer_bytes), "global_dense_bytes": glob_bytes,
            "expert_bytes": engine.experts.bytes_per_expert,
            "kv_bytes_per_layer": engine.kv.nbytes(kv) / len(kv),
            "expert_f32_bytes": 3 * engine.spec.moe_intermediate_size * engine.spec.hidden_size * 4}
  engine = _load(conf, memory_budget_gb=conf["budget_gb"])
  print("LOADED", flush=True)  # the parent now caps the cgroup at the budget
  sys.stdin.readline()
  d = bench_stream.timed_decode(engine, np.array(conf["ids"], np.int32), conf["prompt"],
                                conf["tokens"], conf["context"])
  x = d.pop("x")
  head = bench_stream.timeit_head(lambda: steps.head(engine.spec, engine.forward.globals, x))
  return {"plan": engine.plan.describe(), "slots": engine.pool.num_slots, "head_s": head,
          **{k: v for k, v in d.items() if k != "prompt_s"}}


def run_capped_after_load(conf: dict, limit: int) -> dict:
  """The child in a fresh memory cgroup, capped at `limit` from the end of its loading on
  (orbax's restore of the dense params peaks at ~2x their size: a startup transient the full
  model's budget holds, since its pool is allocated after loading; that peak is reported)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  row: dict = {}
  with cgroups.MemoryCgroup("bench120b") as cg:
    proc = subprocess.Popen(cg.command([sys.executable, "-m", "bench.bench_120b", "--child",
                                        json.dumps(conf)]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
      if line.startswith("LOADED"):
        row["load_peak_MB"] = cg.peak_bytes() / 1e6
        stat = cg.stat()
        row["after_load_MB"] = {k: stat[k] / 1e6 for k in ("rss", "cache", "mapped_file")}
        try:
          cg.set_limit(limit)
        except OSError as e:  # usage above the cap and nothing reclaimable
          proc.kill()
          proc.wait()
          raise RuntimeError(f"cannot cap at {limit / 1e6:.0f} MB after loading: "
                             f"{row['after_load_MB']}") from e
        cg.reset_peak()
        proc.stdin.write("go\n")
        proc.stdin.flush()
      elif line.startswith("RESULT "):
        row.update(json.loads(line[7:]))
    if proc.wait() != 0:
      row["error"] = f"exit {proc.returncode}"
    row["cgroup_peak_MB"] = cg.peak_bytes() / 1e6
    row["oom_kills"] = cg.oom_kills()
    return row


def engine_slots_min(conf: dict) -> int:
  with open(os.path.join(conf["store"], "manifest.json")) as f:
    return json.load(f)["config"]["num_experts_per_tok"]


def ensure_slice() -> str:
  from bench import make_synthetic  # pylint: disable=import-outside-toplevel
  from checkpoints_tools import convert_hf  # pylint: disable=import-outside-toplevel
  hf = os.path.join(FLAGS.workdir, f"gptoss120b-slice-{FLAGS.layers}L")
  if not os.path.exists(os.path.join(hf, "config.json")):
    make_synthetic.make_gpt_oss_mxfp4(hf, FLAGS.layers)
  store = hf + "-store"
  if not os.path.exists(os.path.join(store, "manifest.json")):
    convert_hf.convert(hf, store, overwrite=True, log=lambda s: None)  # MXFP4 kept as published
  return store


# ---- full mode: the whole 36-layer model, no extrapolation ---------------------------------------
def full_store_bytes(cfg: dict) -> int:
  """Bytes the converted store takes: MXFP4 experts (+ f32 biases) and bf16 dense params."""
  h, i, e, v = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"],
                cfg["vocab_size"])
  q = cfg["num_attention_heads"] * cfg["head_dim"]
  kv = cfg["num_key_value_heads"] * cfg["head_dim"]
  expert = (2 * i * h + h * i) * 17 // 32 + (2 * i + h) * 4  # 16 bytes + 1 scale per 32, biases
  layer_dense = 2 * (2 * q * h + 2 * kv * h + q + 2 * kv + 2 * h + e * h + e + 64 + 2 * h)
  return cfg["num_hidden_layers"] * (e * expert + layer_dense) + 2 * (2 * v * h + h)


def wait_for_space(path: str, need: int, wait_minutes: float, log=print) -> None:
  """Returns once the file system of `path` has `need` bytes free, polling every 30 s for up to
  `wait_minutes` (the disk is shared); else exits with how much is missing."""
  import shutil  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  deadline = time.time() + 60 * wait_minutes
  while True:
    free = shutil.disk_usage(path).free
    if free >= need:
      return
    if time.time() >= deadline:
      sys.exit(f"not enough disk space for the full store: {path} has {free / 1e9:.1f} GB free, "
               f"the store needs {need / 1e9:.1f} GB (61 GB of MXFP4 experts + dense params + "
               f"1 GB slack). Free {(need - free) / 1e9:.1f} GB, or point --workdir at a larger "
               "disk.")
    log(f"waiting for disk space: {free / 1e9:.1f} of {need / 1e9:.1f} GB free at {path}")
    time.sleep(30)


def write_full_store(store: str, layers: int = FULL_LAYERS, wait_minutes: float = 30,
                     log=print) -> str:
  """The full gpt-oss-120b-shaped store at `store`, written straight to disk: the project's
  converter reads a GptOssMxfp4Source (tensors made on demand, expert by expert), so memory
  holds one layer's dense params and one expert, and no HF folder is ever written (it would
  double the 61 GB). Only config.json is on disk beside it."""
  from bench import make_synthetic  # pylint: disable=import-outside-toplevel
  from checkpoints_tools import convert_hf  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(store, "manifest.json")):
    return store
  cfg = make_synthetic.gpt_oss_config(layers)
  parent = os.path.dirname(os.path.abspath(store))
  os.makedirs(parent, exist_ok=True)
  wait_for_space(parent, full_store_bytes(cfg) + 10**9, wait_minutes, log)
  src = store + "-config"
  os.makedirs(src, exist_ok=True)
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  convert_hf.convert(src, store, overwrite=True, log=log,
                     source=make_synthetic.GptOssMxfp4Source(cfg))
  return store


def run_full_child(conf: dict) -> dict:
  """Inside the capped cgroup from the first byte: load, a prompt (time to first token: the
  prompt through every layer and the head), then teacher-forced decode steps with the head."""
  import time  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  import lazymoe_jax  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  t0 = time.perf_counter()
  engine = _load(conf, memory_budget_gb=conf["budget_gb"])
  load_s = time.perf_counter() - t0
  if conf.get("threshold") is not None:
    engine.forward.policy.threshold = conf["threshold"]
  pool, store = engine.pool, engine.experts
  ids = conf["ids"]
  n_prompt, n_tok = conf["prompt"], conf["tokens"]
  prompt_experts: set = set()
  engine.forward.trace = lambda layer, e, h: prompt_experts.update(
      (layer, int(x)) for x in np.unique(e))
  seq = engine.session(conf["context"])
  snap = lambda: (pool.demand_bytes, pool.speculative_bytes, pool.unused_bytes, pool.hits,  # noqa: E731
                  pool.misses, pool.prefetch_reads, pool.prefetch_used, pool.io_wait_s,
                  store.disk_busy.seconds(), time.perf_counter())
  a = snap()
  logits = seq.feed(ids[:n_prompt])
  first = int(np.argmax(logits))
  b = snap()
  engine.forward.trace = None
  steps_s = []
  for i in range(n_prompt, n_prompt + n_tok):
    t = time.perf_counter()
    logits = seq.feed(ids[i:i + 1])
    steps_s.append(time.perf_counter() - t)
  c = snap()

  def phase(x, y, n):
    d = [q - p for p, q in zip(x, y)]
    wall = d[9]
    return {"wall_s": wall, "demand_GB": d[0] / 1e9, "speculative_GB": d[1] / 1e9,
            "unused_GB": d[2] / 1e9, "hit_rate": d[3] / max(1, d[3] + d[4]),
            "prefetch_reads": d[5], "prefetch_accuracy": d[6] / d[5] if d[5] else None,
            "io_wait_s": d[7], "disk_busy_frac": d[8] / wall,
            "GBps_while_busy": (d[0] + d[1]) / d[8] / 1e9 if d[8] else None,
            "demand_GB_per_token": d[0] / 1e9 / n, "speculative_GB_per_token": d[1] / 1e9 / n}
  steady = steps_s[2:]
  return {"plan": engine.plan.describe(), "slots": pool.num_slots, "load_s": load_s,
          "process_to_loaded_s": time.perf_counter() - t_start - (c[9] - a[9]),
          "ttft_s": b[9] - a[9], "first_token": first,
          "prompt_distinct_experts": len(prompt_experts),
          "prompt_distinct_GB": len(prompt_experts) * store.bytes_per_expert / 1e9,
          "prefill": phase(a, b, n_prompt), "decode": phase(b, c, n_tok), "prompt_tokens": n_prompt, "decode_tok_s": n_tok / sum(steps_s),
          "decode_tok_s_steady": len(steady) / sum(steady) if steady else None,
          "first_steps_s": steps_s[:3], "policy": engine.forward.policy.table(),
          "peak_rss_MB": engine.stats()["peak_rss_bytes"] / 1e6}


def run_full() -> None:
  """Full mode (see the module docstring): the whole store, each cap its own process."""
  import shutil  # pylint: disable=import-outside-toplevel
  store = write_full_store(os.path.join(FLAGS.workdir, "gptoss120b-36L-store"),
                           wait_minutes=FLAGS.wait_minutes)
  n_prompt = FLAGS.prompt if FLAGS["prompt"].present else 64
  n_tok = FLAGS.tokens if FLAGS["tokens"].present else 64
  ids = real_text_ids(n_prompt + n_tok)
  chunks = [c for c in glob.glob(os.path.join(store, "experts", "**", "c", "**", "*"),
                                 recursive=True) if os.path.isfile(c)]
  every = [os.path.join(r, f) for r, _, fs in os.walk(store) for f in fs]
  rows = []
  try:
    for cap in [float(c) for c in FLAGS.caps_gb]:
      sample = bench_stream.sample_chunks(chunks, 64)
      disk1 = bench_stream.disk_bandwidth(sample[:32], 1)
      disk8 = bench_stream.disk_bandwidth(sample[32:], 8)
      cgroups.drop_page_cache(every)  # cold: nothing of the store in the page cache
      conf = {"store": store, "dense_dtype": FLAGS.dense_dtype, "context": n_prompt + n_tok + 8,
              "prompt": n_prompt, "tokens": n_tok, "ids": ids, "mode": "full",
              "budget_gb": cap, "name": f"full_{cap:g}GB", "threshold": FLAGS.prefetch_threshold}
      row = bench_stream.run_in_cgroup(conf, int(cap * 1e9), "bench.bench_120b")
      after = bench_stream.disk_bandwidth(bench_stream.sample_chunks(chunks, 32), 8)
      row.update(cap_gb=cap, disk_1_in_flight_GBps=disk1, disk_8_in_flight_GBps=disk8,
                 disk_after_GBps=after, disk_GBps=(disk8 + after) / 2)
      rows.append(row)
      print_full_row(row)
  finally:
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump(rows, f, indent=1)
    if not FLAGS.keep:
      shutil.rmtree(store, ignore_errors=True)
      shutil.rmtree(store + "-config", ignore_errors=True)
      print(f"deleted {store} (--keep keeps it)")


def print_full_row(row: dict) -> None:
  cap = row["cap_gb"]
  if "error" in row and "decode" not in row:
    print(f"gpt-oss-120b (36 layers) under a {cap:g} GB cgroup cap: FAILED {row['error']}; "
          f"cgroup peak {row.get('cgroup_peak_MB', 0):.0f} MB, OOM kills {row.get('oom_kills')}")
    return
  p, d, disk = row["prefill"], row["decode"], row["disk_GBps"]
  bound = disk / d["demand_GB_per_token"] if d["demand_GB_per_token"] else float("inf")
  ttft_io = row["prompt_distinct_GB"] / disk
  print(f"gpt-oss-120b, all 36 layers, under a {cap:g} GB cgroup cap from the first byte "
        f"({row['plan']}; {row['slots']} slots):")
  print(f"  load {row['load_s']:.1f} s (process start to loaded {row['process_to_loaded_s']:.1f}"
        f" s); cgroup peak {row['cgroup_peak_MB']:.0f} MB, OOM kills {row['oom_kills']}")
  print(f"  time to first token ({row['prompt_tokens']} prompt tokens): "
        f"{row['ttft_s']:.1f} s; the prompt needs {row['prompt_distinct_experts']} distinct "
        f"experts = {row['prompt_distinct_GB']:.1f} GB = {ttft_io:.1f} s at the disk's "
        f"{disk:.2f} GB/s; prefill read {p['demand_GB']:.1f} GB demand + "
        f"{p['speculative_GB']:.1f} GB speculative ({p['unused_GB']:.2f} unused), blocked on "
        f"reads {p['io_wait_s']:.1f} s, disk busy {p['disk_busy_frac']:.0%}")
  print(f"  decode {row['decode_tok_s']:.3f} tok/s ({row['decode_tok_s_steady']:.3f} after 2 "
        f"steps); per token {d['demand_GB_per_token']:.2f} GB demand + "
        f"{d['speculative_GB_per_token']:.2f} GB speculative, unused "
        f"{d['unused_GB'] / max(1e-9, d['demand_GB'] + d['speculative_GB']):.1%} of bytes read;"
        f" hit {d['hit_rate']:.1%}, prefetch accuracy {d['prefetch_accuracy']}, disk busy "
        f"{d['disk_busy_frac']:.0%} ({d['GBps_while_busy'] or 0:.2f} GB/s while busy), blocked "
        f"on reads {d['io_wait_s']:.1f} s in all")
  print(f"  disk (O_DIRECT, this run): {row['disk_1_in_flight_GBps']:.2f} GB/s 1 in flight, "
        f"{row['disk_8_in_flight_GBps']:.2f} 8 in flight before, {row['disk_after_GBps']:.2f} "
        f"after -> I/O bound {bound:.3f} tok/s; decode = {row['decode_tok_s'] / bound:.2f} x "
        "the bound")


def real_text_ids(n: int) -> list[int]:
  """Token ids of real text (the demo tokenizer on held-out stdlib source) so that routing
  sees real-text statistics; random ids when the demo model is not at hand."""
  ids = [int(i) for i in np.random.default_rng(0).integers(0, 2048, n)]
  try:
    import lazymoe_jax  # pylint: disable=import-outside-toplevel
    from checkpoints_tools import corpus, default_model  # pylint: disable=import-outside-toplevel
    demo = lazymoe_jax.load(default_model.ensure_default_store(lambda s: None), expert_slots=2)
    ids = [int(i) for i in demo.tokenizer.encode(corpus.stdlib_corpus(1 << 14, held_out=True))
           ][:n]
  except Exception:  # pylint: disable=broad-except
    pass
  return ids


def main(argv) -> None:
  del argv
  if FLAGS.child:
    conf = json.loads(FLAGS.child)
    run = run_full_child if conf.get("mode") == "full" else run_child
    print("RESULT " + json.dumps(run(conf)), flush=True)
    return
  if FLAGS.full:
    logging.set_verbosity(logging.WARNING)
    run_full()
    return
  logging.set_verbosity(logging.WARNING)
  from lazymoe_jax.plan import MARGIN_BASE  # pylint: disable=import-outside-toplevel
  store = ensure_slice()
  L, GB = FLAGS.layers, 1e9
  context = FLAGS.prompt + FLAGS.tokens + 8
  rng = np.random.default_rng(0)
  ids = [int(i) for i in rng.integers(0, 2048, FLAGS.prompt + FLAGS.tokens + 2)]
  try:  # real text's token ids when the demo tokenizer is at hand (routing like bench_stream)
    import lazymoe_jax  # pylint: disable=import-outside-toplevel
    from checkpoints_tools import corpus, default_model  # pylint: disable=import-outside-toplevel
    demo = lazymoe_jax.load(default_model.ensure_default_store(lambda s: None), expert_slots=2)
    ids = [int(i) for i in demo.tokenizer.encode(corpus.stdlib_corpus(1 << 14, held_out=True))
           ][:len(ids)]
    del demo
  except Exception:  # pylint: disable=broad-except
    pass
  base = {"store": store, "dense_dtype": FLAGS.dense_dtype, "context": context,
          "prompt": FLAGS.prompt, "tokens": FLAGS.tokens, "ids": ids}
  probe = bench_stream.run_in_cgroup({**base, "mode": "probe", "name": "probe"}, None,
                                     "bench.bench_120b")
  if "error" in probe:
    sys.exit(f"probe failed: {probe['error']}")
  runtime = probe["rss_after_load"] - probe["slice_dense_bytes"] - probe["global_dense_bytes"]
  margin = MARGIN_BASE + probe["expert_f32_bytes"]
  fixed_full = (runtime + probe["global_dense_bytes"] + FULL_LAYERS * probe["layer_dense_bytes"]
                + FULL_LAYERS * probe["kv_bytes_per_layer"] + margin)
  pool_full = FLAGS.budget_gb * GB - fixed_full
  slots_full = int(pool_full // probe["expert_bytes"])
  print(f"gpt-oss-120b in {FLAGS.budget_gb} GB, dense {FLAGS.dense_dtype}: runtime "
        f"{runtime / GB:.2f} GB (measured) + embedding/head {probe['global_dense_bytes'] / GB:.2f}"
        f" GB + 36 x {probe['layer_dense_bytes'] / 1e6:.1f} MB layer dense = "
        f"{FULL_LAYERS * probe['layer_dense_bytes'] / GB:.2f} GB + margin {margin / GB:.2f} GB "
        f"-> expert pool {max(pool_full, 0) / GB:.2f} GB = {slots_full} slots of "
        f"{probe['expert_bytes'] / 1e6:.1f} MB ({slots_full / FULL_LAYERS:.1f} per layer of 128; "
        f"the experts total {FULL_LAYERS * 128 * probe['expert_bytes'] / GB:.1f} GB)")
  if slots_full < FULL_LAYERS * 4:
    print("  (fewer slots than one token's experts over 36 layers: every layer re-reads)")
  if pool_full < 4 * probe["expert_bytes"]:
    sys.exit("the full model does not fit this budget at all; raise --budget_gb or use "
             "--dense_dtype=int8.")
  slice_budget = (runtime + probe["global_dense_bytes"] + probe["slice_dense_bytes"]
                  + L * probe["kv_bytes_per_layer"] + margin + pool_full * L / FULL_LAYERS)
  chunks = [c for c in glob.glob(os.path.join(store, "experts", "**", "c", "**", "*"),
                                 recursive=True) if os.path.isfile(c)]
  disk = bench_stream.disk_bandwidth(bench_stream.sample_chunks(chunks), 8)
  cgroups.drop_page_cache(chunks)
  row = run_capped_after_load({**base, "mode": "run", "budget_gb": slice_budget / GB},
                              int(slice_budget))
  disk = (disk + bench_stream.disk_bandwidth(bench_stream.sample_chunks(chunks), 8)) / 2
  if "error" in row:
    sys.exit(f"slice run failed: {row['error']}")
  per_layer = (row["token_s"] - row["head_s"]) / L
  full_token = FULL_LAYERS * per_layer + row["head_s"]
  mb_full = row["MB_read_per_token"] * FULL_LAYERS / L
  print(f"slice: {L} layers under a {slice_budget / GB:.2f} GB cgroup cap ({row['plan']})")
  print(f"  per token {row['token_s'] * 1e3:.0f} ms (head {row['head_s'] * 1e3:.0f} ms), blocked "
        f"on reads {row['io_wait_s_per_token'] * 1e3:.0f} ms, {row['MB_read_per_token']:.0f} MB "
        f"read, hit {row['hit_rate']:.1%}, prefetch accuracy "
        f"{row['prefetch_accuracy'] if row['prefetch_accuracy'] is None else round(row['prefetch_accuracy'], 2)}"
        f", cgroup peak {row.get('cgroup_peak_MB', float('nan')):.0f} MB after loading (loading "
        f"{row.get('load_peak_MB', float('nan')):.0f} MB), OOM kills {row.get('oom_kills')}")
  print(f"  routing: top expert {row['top_share']:.0%}, entropy {row['entropy_bits']:.2f} of "
        f"{row['uniform_entropy_bits']:.0f} bits, previous-token reuse {row['prev_token_reuse']:.0%}")
  print(f"per layer {per_layer * 1e3:.0f} ms -> full 36 layers {full_token * 1e3:.0f} ms/token = "
        f"**{1 / full_token:.2f} tok/s** for gpt-oss-120b in {FLAGS.budget_gb} GB; it reads "
        f"{mb_full / 1e3:.2f} GB/token; disk {disk:.2f} GB/s (O_DIRECT) -> I/O bound "
        f"{disk * 1e3 / mb_full:.2f} tok/s")
  print("assumptions: random weights (routing of real-text token ids, above; a trained model's "
        "locality raises the hit rate), context of "
        f"{context} positions, 2 CPU cores, this machine's disk; per-layer time scales linearly.")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"probe": probe, "slice": row, "slice_budget_gb": slice_budget / GB,
                 "slots_full": slots_full, "per_layer_s": per_layer, "full_token_s": full_token,
                 "full_tok_s": 1 / full_token, "MB_per_token_full": mb_full,
                 "disk_GBps": disk}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
