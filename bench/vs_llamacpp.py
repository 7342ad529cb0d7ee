r"""llama.cpp and this engine on the same checkpoint, with the same threads, in one run.

  python -m bench.vs_llamacpp [--pairs=bf16,int8] [--paths=native,xla] [--threads=2]
      [--prompt=512] [--decode=64] [--repeats=3] [--breakdown] [--workdir=/tmp/vsllama] [--keep]

Needs llama-cpp-python, which the engine does not depend on: the optional `bench` extra (CI
never installs it; nor is this in the test suite). pip builds it from source with this
machine's compiler (-march=native), ~4-10 min on 2 cores:

  CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -e '.[bench]'

The HF -> GGUF converter (convert_hf_to_gguf.py and its gguf-py) ships only in that package's
sdist, under vendor/llama.cpp. Without --llama_cpp_dir the bench fetches the sdist with pip into
--workdir itself, as

  pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==<installed> -d DIR

(`--no-binary :all:` would also build the sdist's build requirements, cmake among them, from
source before downloading anything.)

One run, in --workdir (a few GB, deleted at the end unless --keep), one pair at a time so that
only one pair's files exist at once:
1. a synthetic Mixtral-layout Hugging Face checkpoint (bench.make_synthetic: by default 8
   layers, hidden 1024, 16 experts of width 2816, top-2, vocab 32000, bf16; embeddings of std
   --embed_std = 1.0, so routing is near-uniform instead of collapsing onto a few experts) with
   the demo model's sentencepiece tokenizer: one folder that both engines read;
2. per pair, its GGUF (llama.cpp's converter: bf16, or q8_0) and its store (checkpoints_tools:
   bf16 experts, or int8 experts + load(dense_dtype="int8"));
3. numpy's float32 matrix-vector bandwidth (the reference; measured at the start and the end);
4. each engine in its own subprocess pinned to the same --threads CPUs: llama.cpp through
   llama-cpp-python (n_threads = n_threads_batch = --threads, the prompt in one batch), then
   this engine once per kernel path (LAZYMOE_KERNELS=native, =xla), every expert resident.
   Each does a warm-up pass (compiles the programs; pages the GGUF in), then --repeats times a
   fresh sequence: a --prompt-token prefill, then --decode forced steps (the same fixed token
   ids for both engines, so routing varies as on text and both compute the same positions).
   The best repeat of each is reported, for both engines alike.
5. a table: prompt and decode tok/s, the ratio engine / llama.cpp in the same encoding, active
   weight bytes per decode token (dense + k experts per layer + one embedding row, in each
   engine's own encoding), and active bytes x tok/s / the reference bandwidth; plus the two
   engines' argmax agreement over the decoded positions (the same model: a check of the
   comparison, not a speed figure).

--breakdown also times the engine's decode step piece by piece, each program waited for before
the next starts: attention (of which the q/k/v and o products, timed on their own), router, the
host read of the ids, pool lookup, experts, output head and embedding; beside each, the bytes it
reads and the time those take at the reference bandwidth.
"""

from __future__ import annotations

import collections
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = os.path.join(REPO, "lazymoe_jax", "demo_model", "tokenizer.model")
# pair -> (GGUF --outtype, converter expert dtype, load(dense_dtype=...))
PAIRS = {"bf16": ("bf16", "bf16", None), "int8": ("q8_0", "int8", "int8")}
TEXT = ("def quicksort(items):\n    if len(items) <= 1:\n        return list(items)\n"
        "    pivot = items[len(items) // 2]\n    left = [x for x in items if x < pivot]\n"
        "    return quicksort(left) + [x for x in items if x == pivot] + quicksort(\n"
        "        [x for x in items if x > pivot])\n\nclass Stack:\n    def push(self, item):\n"
        "        self._items.append(item)\n")


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_list("pairs", list(PAIRS), f"Encoding pairs to compare: {list(PAIRS)}.")
  flags.DEFINE_list("paths", ["native", "xla"], "This engine's kernel paths (LAZYMOE_KERNELS).")
  flags.DEFINE_integer("threads", 2, "Threads (CPUs) for both engines.")
  flags.DEFINE_integer("prompt", 512, "Prompt tokens (prefill).")
  flags.DEFINE_integer("decode", 64, "Decode steps.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats per engine (best reported).")
  flags.DEFINE_bool("breakdown", False, "Also time the engine's decode step piece by piece.")
  flags.DEFINE_integer("layers", 8, "Synthetic model layers.")
  flags.DEFINE_integer("hidden", 1024, "Synthetic model hidden size.")
  flags.DEFINE_integer("intermediate", 2816, "Synthetic model expert width.")
  flags.DEFINE_integer("experts", 16, "Synthetic model experts per layer.")
  flags.DEFINE_integer("vocab", 32000, "Synthetic model vocabulary.")
  flags.DEFINE_float("embed_std", 1.0, "Embedding init std (near-uniform routing at 1.0).")
  flags.DEFINE_string("workdir", "/tmp/vsllama", "Checkpoint, GGUFs, stores, results.")
  flags.DEFINE_bool("keep", False, "Keep the checkpoint, GGUFs and stores.")
  flags.DEFINE_string("llama_cpp_dir", None, "vendor/llama.cpp of the llama-cpp-python sdist "
                      "(convert_hf_to_gguf.py, gguf-py); default: fetched into --workdir.")
  flags.DEFINE_string("json", None, "Also write every result here.")
  # one engine's measurement (the subprocesses this program starts)
  flags.DEFINE_enum("worker", None, ["llama", "engine"], "Internal: run one engine.")
  flags.DEFINE_string("model", None, "Internal: the GGUF file or store folder.")
  flags.DEFINE_string("dense_dtype", None, "Internal: load(dense_dtype=...).")
  flags.DEFINE_string("ids", None, "Internal: JSON file of prompt and decode ids.")
  flags.DEFINE_string("result", None, "Internal: where the worker writes its JSON.")


FLAGS = flags.FLAGS


# ---- the parent: files, subprocesses, the table -------------------------------------------------
def numpy_gemv_bandwidth() -> float:
  from bench.bench_decode import numpy_gemv_bandwidth as gemv  # noqa: PLC0415 (jax-free here)
  return gemv()


def llama_cpp_dir(workdir: str) -> str:
  """vendor/llama.cpp of the installed llama-cpp-python's sdist (fetched with pip once)."""
  if FLAGS.llama_cpp_dir:
    return FLAGS.llama_cpp_dir
  try:
    version = importlib.metadata.version("llama-cpp-python")
  except importlib.metadata.PackageNotFoundError:
    raise SystemExit("llama-cpp-python is not installed: CMAKE_BUILD_PARALLEL_LEVEL=2 pip "
                     "install -e '.[bench]' (a source build, ~4-10 min), see this file's "
                     "docstring.") from None
  src = os.path.join(workdir, "src")
  found = glob.glob(os.path.join(src, f"llama_cpp_python-{version}", "vendor", "llama.cpp"))
  if not found:
    os.makedirs(src, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                    "llama-cpp-python", f"llama-cpp-python=={version}", "-d", src], check=True)
    subprocess.run(["tar", "xzf", f"llama_cpp_python-{version}.tar.gz"], cwd=src, check=True)
    found = glob.glob(os.path.join(src, f"llama_cpp_python-{version}", "vendor", "llama.cpp"))
  return found[0]


def make_checkpoint(hf: str) -> None:
  from bench import make_synthetic  # noqa: PLC0415
  if os.path.exists(os.path.join(hf, "config.json")):
    return
  make_synthetic.make_synthetic(hf, FLAGS.layers, FLAGS.hidden, FLAGS.intermediate,
                                FLAGS.experts, 2, FLAGS.vocab, 16, 4, 64, "bfloat16",
                                embed_std=FLAGS.embed_std)
  shutil.copy(DEMO_TOKENIZER, os.path.join(hf, "tokenizer.model"))
  with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, f)


def token_ids(hf: str, path: str) -> dict:
  """The prompt (BOS + the text's pieces, repeated to --prompt ids) and the decode ids (the
  text again from another offset), the same for both engines."""
  import sentencepiece  # noqa: PLC0415
  pieces = sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(hf, "tokenizer.model")).encode(TEXT)
  n = FLAGS.prompt + FLAGS.decode
  stream = [1] + pieces * (n // len(pieces) + 2)
  ids = {"prompt": stream[:FLAGS.prompt], "decode": stream[FLAGS.prompt + 7:n + 7]}
  with open(path, "w") as f:
    json.dump(ids, f)
  return ids


def gguf_active_bytes(path: str, top_k: int, experts: int, vocab: int) -> int:
  """Weight bytes one llama.cpp decode token reads: every tensor, the expert tensors (`*_exps`)
  at top_k / experts, the token embedding at one row."""
  import gguf  # noqa: PLC0415
  total = 0
  for t in gguf.GGUFReader(path).tensors:
    if "_exps" in t.name:
      total += int(t.n_bytes) * top_k // experts
    elif t.name == "token_embd.weight":
      total += int(t.n_bytes) // vocab
    else:
      total += int(t.n_bytes)
  return total


def run_worker(kind: str, model: str, ids: str, result: str, env: dict | None = None,
               dense_dtype: str | None = None) -> dict:
  """One engine in a subprocess pinned to the first --threads CPUs this process may use."""
  cpus = sorted(os.sched_getaffinity(0))[:FLAGS.threads]
  cmd = [sys.executable, "-m", "bench.vs_llamacpp", f"--worker={kind}", f"--model={model}",
         f"--ids={ids}", f"--result={result}", f"--threads={FLAGS.threads}",
         f"--repeats={FLAGS.repeats}", f"--breakdown={FLAGS.breakdown}"]
  if dense_dtype:
    cmd.append(f"--dense_dtype={dense_dtype}")
  full_env = dict(os.environ, **(env or {}))
  full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  subprocess.run(cmd, env=full_env, cwd=REPO, check=True,
                 preexec_fn=lambda: os.sched_setaffinity(0, cpus))
  with open(result) as f:
    return json.load(f)


def convert(hf: str, pair: str, work: str, ll: str) -> tuple[str, str]:
  from checkpoints_tools import convert_hf  # noqa: PLC0415
  outtype, expert_dtype, _ = PAIRS[pair]
  gguf_path = os.path.join(work, f"model-{outtype}.gguf")
  if not os.path.exists(gguf_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.join(ll, "gguf-py"), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, os.path.join(ll, "convert_hf_to_gguf.py"), hf,
                           "--outfile", gguf_path + ".part", "--outtype", outtype], env=env,
                          capture_output=True, text=True)
    if done.returncode:
      raise SystemExit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-4000:]}")
    os.rename(gguf_path + ".part", gguf_path)
  store = os.path.join(work, f"store-{expert_dtype}")
  if not os.path.exists(os.path.join(store, "manifest.json")):
    convert_hf.convert(hf, store, expert_dtype=expert_dtype, overwrite=True, log=lambda s: None)
  return gguf_path, store


def agreement(a: list[int], b: list[int]) -> float:
  return float(np.mean(np.asarray(a) == np.asarray(b)))


def print_table(rows: list[dict], refs: list[float]) -> None:
  ref = float(np.mean(refs))
  print(f"\nnumpy f32 gemv reference: {' / '.join(f'{r:.1f}' for r in refs)} GB/s (start / end; "
        f"ratios use the mean {ref:.1f}); threads {FLAGS.threads}; prompt {FLAGS.prompt}, "
        f"decode {FLAGS.decode}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print("| pair | engine | prompt tok/s | x llama.cpp | decode tok/s | x llama.cpp | "
        "active MB/token | GB/s | x ref | argmax = llama.cpp |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  base = {r["pair"]: r for r in rows if r["engine"] == "llama.cpp"}
  for r in rows:
    b = base.get(r["pair"])
    vs = (lambda f: "") if b is None or b is r else (lambda f: f"{f(r, b):.2f}")
    gbs = r["active_bytes"] * r["decode_tok_s"] / 1e9
    print(f"| {r['pair']} | {r['label']} | {r['prompt_tok_s']:.1f} | "
          f"{vs(lambda r, b: r['prompt_tok_s'] / b['prompt_tok_s'])} | {r['decode_tok_s']:.1f} | "
          f"{vs(lambda r, b: r['decode_tok_s'] / b['decode_tok_s'])} | "
          f"{r['active_bytes'] / 1e6:.1f} | {gbs:.1f} | {gbs / ref:.2f} | "
          f"{vs(lambda r, b: agreement(r['argmax'], b['argmax']))} |")
  for r in rows:
    if r.get("breakdown"):
      print_breakdown(r, ref)


def print_breakdown(r: dict, ref: float) -> None:
  bd = r["breakdown"]
  print(f"\n{r['pair']} {r['label']}: decode step piece by piece, ms per token (sum over "
        f"{bd['layers']} layers); each piece waited for. Real step {bd['real_step_ms']:.2f} ms, "
        f"sum of pieces {sum(bd['ms'].values()):.2f} ms, {bd['calls']} programs a step, "
        f"an empty jitted call {bd['empty_call_ms'] * 1e3:.0f} us")
  print("| piece | ms/token | ms/layer | MB read | ms at the reference bandwidth |")
  print("|---|---:|---:|---:|---:|")
  for k, ms in bd["ms"].items():
    mb = bd["bytes"].get(k, 0) / 1e6
    print(f"| {k} | {ms:.2f} | {ms / bd['layers']:.3f} | {mb:.1f} | "
          f"{mb / 1e3 / ref * 1e3:.2f} |")
  for k, ms in bd.get("standalone_ms", {}).items():
    mb = bd["bytes"].get(k, 0) / 1e6
    print(f"| (of attention) {k} | {ms:.2f} | {ms / bd['layers']:.3f} | {mb:.1f} | "
          f"{mb / 1e3 / ref * 1e3:.2f} |")


def main_parent() -> None:
  work = FLAGS.workdir
  os.makedirs(work, exist_ok=True)
  for pair in FLAGS.pairs:
    if pair not in PAIRS:
      raise SystemExit(f"--pairs: {pair!r} is not one of {list(PAIRS)}.")
  for path in FLAGS.paths:
    if path not in ("native", "xla"):
      raise SystemExit(f"--paths: {path!r}: choose native or xla.")
  ll = llama_cpp_dir(work)
  hf = os.path.join(work, "hf")
  make_checkpoint(hf)
  ids_path = os.path.join(work, "ids.json")
  token_ids(hf, ids_path)
  with open(os.path.join(hf, "config.json")) as f:
    cfg = json.load(f)
  refs = [numpy_gemv_bandwidth()]
  print(f"numpy f32 gemv reference: {refs[0]:.1f} GB/s", flush=True)
  rows = []
  try:
    for pair in FLAGS.pairs:
      gguf_path, store = convert(hf, pair, work, ll)
      res = run_worker("llama", gguf_path, ids_path, os.path.join(work, f"llama-{pair}.json"))
      res.update(pair=pair, engine="llama.cpp", label=f"llama.cpp {PAIRS[pair][0]}",
                 active_bytes=gguf_active_bytes(gguf_path, cfg["num_experts_per_tok"],
                                                cfg["num_local_experts"], cfg["vocab_size"]))
      rows.append(res)
      print(f"  {res['label']}: prompt {res['prompt_tok_s']:.1f} tok/s, decode "
            f"{res['decode_tok_s']:.1f} tok/s", flush=True)
      for path in FLAGS.paths:
        dense = PAIRS[pair][2]
        res = run_worker("engine", store, ids_path,
                         os.path.join(work, f"engine-{pair}-{path}.json"),
                         env={"LAZYMOE_KERNELS": path}, dense_dtype=dense)
        res.update(pair=pair, engine="lazymoe", label=f"engine {path}, experts "
                   f"{PAIRS[pair][1]}, dense {dense or 'bf16'}")
        rows.append(res)
        print(f"  {res['label']}: prompt {res['prompt_tok_s']:.1f} tok/s, decode "
              f"{res['decode_tok_s']:.1f} tok/s", flush=True)
      if not FLAGS.keep:
        os.remove(gguf_path)
        shutil.rmtree(store)
    refs.append(numpy_gemv_bandwidth())
    print_table(rows, refs)
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump({"refs_GBps": refs, "load_average": os.getloadavg(), "rows": rows}, f,
                  indent=1)
  finally:
    if not FLAGS.keep:
      shutil.rmtree(work, ignore_errors=True)


# ---- the workers: one engine each ---------------------------------------------------------------
def best(runs: list[tuple[float, float, list[int]]]) -> dict:
  """runs: (prefill s, decode s, argmax ids) per repeat -> best rates, every repeat kept."""
  n_prompt, n_decode = len(_IDS["prompt"]), len(_IDS["decode"])
  return {"prompt_tok_s": max(n_prompt / p for p, _, _ in runs),
          "decode_tok_s": max(n_decode / d for _, d, _ in runs),
          "prefill_s": [p for p, _, _ in runs], "decode_s": [d for _, d, _ in runs],
          "argmax": runs[-1][2]}


_IDS: dict = {}  # the worker's prompt and decode ids (--ids)


def llama_worker() -> dict:
  import llama_cpp  # noqa: PLC0415
  prompt, decode = _IDS["prompt"], _IDS["decode"]
  llm = llama_cpp.Llama(model_path=FLAGS.model, n_ctx=len(prompt) + len(decode) + 64,
                        n_batch=len(prompt), n_ubatch=len(prompt), n_threads=FLAGS.threads,
                        n_threads_batch=FLAGS.threads, verbose=False)
  n_vocab = llm.n_vocab()

  def last_argmax() -> int:
    p = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(p, shape=(n_vocab,))))

  def once() -> tuple[float, float, list[int]]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    out = []
    for tok in decode:
      llm.eval([tok])
      out.append(last_argmax())
    return t1 - t0, time.perf_counter() - t1, out

  llm.reset()  # warm-up: pages the mmapped GGUF in (nothing to compile)
  llm.eval(prompt[:32])
  res = best([once() for _ in range(FLAGS.repeats)])
  res["version"] = llama_cpp.__version__
  return res


def engine_worker() -> dict:
  import lazymoe_jax  # noqa: PLC0415
  from bench.bench_decode import active_bytes_per_token  # noqa: PLC0415
  prompt, decode = _IDS["prompt"], _IDS["decode"]
  engine = lazymoe_jax.load(FLAGS.model, expert_slots=10**9, dense_dtype=FLAGS.dense_dtype)
  for layer in engine.spec.moe_layers:  # every expert resident before timing
    engine.pool.acquire(layer, range(engine.spec.num_experts))

  def once() -> tuple[float, float, list[int]]:
    seq = engine.session(len(prompt) + len(decode))
    t0 = time.perf_counter()
    seq.feed(prompt)  # logits on the host: waited for
    t1 = time.perf_counter()
    out = [int(np.argmax(seq.feed([tok]))) for tok in decode]
    return t1 - t0, time.perf_counter() - t1, out

  once()  # warm-up: compiles the prompt's and the decode step's programs
  res = best([once() for _ in range(FLAGS.repeats)])
  res.update(kernels=engine.stats()["kernels"], active_bytes=active_bytes_per_token(engine))
  if FLAGS.breakdown:
    seq = engine.session(len(prompt) + len(decode))
    seq.feed(prompt)
    res["breakdown"] = decode_breakdown(engine, seq, decode)
  return res


def decode_breakdown(engine, seq, tokens: list[int]) -> dict:
  """ms per decode token in each piece of the engine's decode step (the programs of
  engine/forward.py Forward.run for one token, each waited for before the next starts), after
  a real step timed the usual way for comparison. Lookahead prefetch is left out (every expert
  is resident: it finds nothing to read; its routers run inside attn_router in the real
  step)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from lazymoe_jax.model import layers as L  # noqa: PLC0415
  from lazymoe_jax.model import steps  # noqa: PLC0415
  from lazymoe_jax.model.spec import DENSE_MLP  # noqa: PLC0415
  fw, spec = engine.forward, engine.spec
  half = len(tokens) // 2
  t0 = time.perf_counter()
  for tok in tokens[:half]:
    seq.feed([tok])
  real = (time.perf_counter() - t0) / half

  proj = jax.jit(lambda w, x: L.linear(x, w))
  empty = jax.jit(lambda x: x + 1)
  ms: dict[str, float] = collections.defaultdict(float)
  alone: dict[str, float] = collections.defaultdict(float)

  def timed(key: str, fn, table=ms):
    c = time.perf_counter()
    out = jax.block_until_ready(fn())
    table[key] += (time.perf_counter() - c) * 1e3
    return out

  q_width = spec.attention.num_heads * spec.attention.head_dim
  o_in = jnp.zeros((1, q_width), jnp.float32)
  for i, tok in enumerate(tokens[half:]):
    if i == 1:  # the first pass compiled attn_router and the products
      ms.clear()
      alone.clear()
    seq.reserve(1)
    cache = seq.cache
    pos = jnp.asarray(np.array([seq.position], np.int32))
    x = timed("embedding", lambda: fw.embed(np.array([tok], np.int32)))
    for layer, p in enumerate(fw.layers):
      window = spec.layers[layer].window
      if spec.layers[layer].mlp == DENSE_MLP:
        x, cache[layer] = timed("dense layer", lambda: steps.dense_layer(
            spec, fw.kv, window, p, x, pos, cache[layer]))
        continue
      xa = L.rms_norm(x, p["attn_norm"], spec.norm_eps)
      timed("q/k/v products", lambda: proj(p["wqkv"], xa), alone)
      timed("o product", lambda: proj(p["wo"], o_in), alone)
      h, xn, routed, weights, cache[layer] = timed("attention + router", lambda: steps.attn_router(
          spec, fw.kv, window, p, x, pos, cache[layer]))
      ids = timed("ids to host", lambda: np.asarray(routed)[0, :1])
      slots = timed("pool lookup", lambda: fw.pool.acquire(layer, ids[0]))
      x = timed("experts", lambda: steps.moe_decode(spec, fw.shared[layer], h, xn, weights,
                                                    tuple(fw.pool.arrays(s) for s in slots)))
    timed("output head", lambda: fw.head_rows(x, 1))
    seq.cache = cache
    seq.position += 1
  n = len(tokens) - half - 1
  z = jnp.zeros((1, spec.hidden_size), jnp.float32)
  call = np.median([_time_call(empty, z) for _ in range(50)])
  nbytes = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))  # noqa: E731
  moe = [p for i, p in enumerate(fw.layers) if spec.layers[i].mlp != DENSE_MLP]
  g = fw.globals
  bytes_ = {"q/k/v products": sum(nbytes(p["wqkv"]) for p in moe),
            "o product": sum(nbytes(p["wo"]) for p in moe),
            "attention": sum(nbytes(p["wqkv"]) + nbytes(p["wo"]) for p in moe)
                         + sum(nbytes(c) for c in seq.cache),
            "router": sum(nbytes(p["router"]) for p in moe),
            "experts": len(moe) * spec.num_experts_per_tok * engine.experts.bytes_per_expert,
            # a version 5 store reads embedding rows from disk: one bf16 row a token
            "output head": nbytes(g["lm_head"] if "lm_head" in g else g["embed"])
                           + nbytes(g["final_norm"]),
            "embedding": (nbytes(g["embed"]) // spec.vocab_size if "embed" in g
                          else 2 * spec.hidden_size)}
  return {"layers": spec.num_hidden_layers, "real_step_ms": real * 1e3,
          "ms": {k: v / n for k, v in ms.items()},
          "standalone_ms": {k: v / n for k, v in alone.items()},
          "bytes": bytes_, "empty_call_ms": float(call) * 1e3,
          "calls": 2 + 2 * len(moe)}


def _time_call(fn, x) -> float:
  c = time.perf_counter()
  fn(x).block_until_ready()
  return time.perf_counter() - c


def main_worker() -> None:
  with open(FLAGS.ids) as f:
    _IDS.update(json.load(f))
  res = llama_worker() if FLAGS.worker == "llama" else engine_worker()
  with open(FLAGS.result, "w") as f:
    json.dump(res, f)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.worker:
    main_worker()
  else:
    main_parent()


if __name__ == "__main__":
  define_flags()
  app.run(main)
