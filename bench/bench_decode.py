r"""Whole-model decode speed with every expert resident, against the memory-bandwidth limit,
on the native kernels and on the pure-XLA path side by side.

  python -m bench.bench_decode [--encodings=bfloat16,int8] [--paths=native,xla] [--tokens=64]
      [--workdir=/tmp/lazymoe_bench]

Builds (once, in --workdir) a synthetic Mixtral-layout model with bench.make_synthetic (default
8 layers, hidden 1024, expert width 2816, 16 experts, top-2, vocab 32000), converts it per
encoding; then for each encoding and dense dtype runs one subprocess per kernel path
(LAZYMOE_KERNELS=native, =xla: the path is chosen when a program is traced, so one process
cannot time both), one after the other: each loads the store with a pool that holds every
expert, reads them all, then times greedy decoding. Prints tokens/s per path and their ratio,
the weight bytes one token reads (dense part + k experts per layer), the bandwidth that
implies, and its ratio to numpy's float32 matrix-vector bandwidth measured in the same run (a
tuned BLAS streaming a 256 MB matrix once per call).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

import lazymoe_jax
from bench import make_synthetic
from bench.bench_kernels import timeit
from checkpoints_tools import convert_hf

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_list("encodings", ["bfloat16", "int8"], "Expert encodings (converter names).")
  flags.DEFINE_integer("tokens", 64, "Tokens to decode.")
  flags.DEFINE_integer("prompt", 16, "Prompt tokens.")
  flags.DEFINE_string("workdir", "/tmp/lazymoe_bench", "Where the synthetic model and stores go.")
  flags.DEFINE_integer("layers", 8, "Synthetic model layers.")
  flags.DEFINE_integer("hidden", 1024, "Synthetic model hidden size.")
  flags.DEFINE_integer("intermediate", 2816, "Synthetic model expert width.")
  flags.DEFINE_integer("experts", 16, "Synthetic model experts.")
  flags.DEFINE_integer("vocab", 32000, "Synthetic model vocabulary.")
  flags.DEFINE_list("dense_dtypes", ["keep", "int8"], "Dense weights: keep (as stored, bf16) "
                    "or re-encoded at load (load(dense_dtype=...)).")
  flags.DEFINE_list("paths", ["native", "xla"], "Kernel paths (LAZYMOE_KERNELS) side by side.")
  flags.DEFINE_string("json", None, "Also write the rows here.")
  flags.DEFINE_string("worker", None, "Internal: measure one 'store,dense_dtype' and exit.")
  flags.DEFINE_string("result", None, "Internal: where the worker writes its row.")


FLAGS = flags.FLAGS
CONVERTER_NAMES = {"bfloat16": "bf16", "float32": "f32", "int8": "int8", "int4-g32": "int4"}


def numpy_gemv_bandwidth(seconds: float = 1.0) -> float:
  w = np.random.default_rng(0).standard_normal((16384, 4096), dtype=np.float32)  # 256 MB
  x = np.ones(4096, np.float32)
  return w.nbytes / timeit(lambda: w @ x, seconds) / 1e9


def active_bytes_per_token(engine) -> int:
  """Weight bytes one decode token reads: dense params (one embedding row) + k experts a layer."""
  cfg = engine.spec
  dense = sum(a.nbytes for layer in engine.forward.layers for a in jax.tree.leaves(layer))
  g = engine.forward.globals
  dense += g["final_norm"].nbytes + 4 * cfg.hidden_size  # one embedding row (float32 at most)
  dense += sum(a.nbytes for a in jax.tree.leaves(g.get("lm_head", g.get("embed"))))
  experts = len(cfg.moe_layers) * cfg.num_experts_per_tok * engine.experts.bytes_per_expert
  return dense + experts


def measure(store: str, dense_dtype: str) -> dict:
  """One row, in this process's kernel path (a worker subprocess)."""
  engine = lazymoe_jax.load(store, expert_slots=10**9,
                            dense_dtype=None if dense_dtype == "keep" else dense_dtype)
  for layer in engine.spec.moe_layers:  # every expert resident before timing
    engine.pool.acquire(layer, range(engine.spec.num_experts))
  prompt = np.random.default_rng(0).integers(3, FLAGS.vocab, FLAGS.prompt)
  engine.eos_ids = set()
  engine.generate(prompt, 4)  # compile
  t0 = time.perf_counter()
  engine.generate(prompt, FLAGS.tokens)
  wall = time.perf_counter() - t0
  st = engine.stats()
  return {"decode_tok_s": st["decode_tokens_per_s"], "kernels": st["kernels"],
          "active_MB_per_token": active_bytes_per_token(engine) / 1e6, "wall_s": wall,
          "prompt_tok_s": st["prompt_tokens_per_s"]}


def run_path(path: str, store: str, dense_dtype: str) -> dict:
  """measure() in a subprocess with LAZYMOE_KERNELS=path (same flags as this process)."""
  result = os.path.join(FLAGS.workdir, f"row-{path}.json")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, LAZYMOE_KERNELS=path, PYTHONPATH=os.pathsep.join(
      p for p in (repo, os.environ.get("PYTHONPATH")) if p))
  args = [a for a in sys.argv[1:] if not a.startswith(("--worker", "--result", "--json"))]
  subprocess.run([sys.executable, "-m", "bench.bench_decode", *args,
                  f"--worker={store},{dense_dtype}", f"--result={result}"],
                 env=env, cwd=repo, check=True)
  with open(result) as f:
    row = json.load(f)
  os.remove(result)
  if row["kernels"] != path:
    raise RuntimeError(f"asked for the {path} path, the engine ran {row['kernels']} (is the "
                       "native library built? pip install -e .)")
  return row


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.worker:
    store, dense_dtype = FLAGS.worker.split(",")
    with open(FLAGS.result, "w") as f:
      json.dump(measure(store, dense_dtype), f)
    return
  hf = os.path.join(FLAGS.workdir, f"synthetic-{FLAGS.layers}x{FLAGS.experts}-{FLAGS.hidden}")
  if not os.path.exists(os.path.join(hf, "config.json")):
    make_synthetic.make_synthetic(hf, FLAGS.layers, FLAGS.hidden, FLAGS.intermediate,
                                  FLAGS.experts, 2, FLAGS.vocab, 16, 4, 64, "bfloat16")
  ref = numpy_gemv_bandwidth()
  print(f"numpy f32 gemv reference: {ref:.1f} GB/s")
  rows = []
  for enc in FLAGS.encodings:
    store = f"{hf}-{enc}"
    if not os.path.exists(os.path.join(store, "manifest.json")):
      convert_hf.convert(hf, store, expert_dtype=CONVERTER_NAMES.get(enc, enc), overwrite=True,
                         log=lambda s: None)
    for dense_dtype in FLAGS.dense_dtypes:
      row = {"encoding": enc, "dense": dense_dtype, "numpy_gemv_GBps": ref}
      for path in FLAGS.paths:
        r = run_path(path, store, dense_dtype)
        gbs = r["active_MB_per_token"] * r["decode_tok_s"] / 1e3
        row[path] = dict(r, achieved_GBps=gbs, ratio_to_numpy_gemv=gbs / ref)
      rows.append(row)
      print(f"experts {enc:9s} dense {dense_dtype:5s} | "
            f"{row[FLAGS.paths[0]]['active_MB_per_token']:6.1f} MB/token active | " + " | ".join(
                f"{path} {row[path]['decode_tok_s']:6.1f} tok/s {row[path]['achieved_GBps']:5.1f}"
                f" GB/s = {row[path]['ratio_to_numpy_gemv']:.2f}x numpy" for path in FLAGS.paths)
            + ("" if len(FLAGS.paths) < 2 else f" | {FLAGS.paths[0]}/{FLAGS.paths[1]} "
               f"{row[FLAGS.paths[0]]['decode_tok_s'] / row[FLAGS.paths[1]]['decode_tok_s']:.2f}"),
            flush=True)
  print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
