r"""llama.cpp and this engine on the same checkpoint, with the same threads, in one run.

  python -m bench.vs_llamacpp [--pairs=bf16,int8] [--paths=native,xla] [--threads=2]
      [--prompt=512] [--decode=64] [--repeats=3] [--breakdown] [--workdir=/tmp/vsllama] [--keep]
  python -m bench.vs_llamacpp --cgroup_gb=2 --layers=32 --prompt=64 [--cold=files|all]
      [--store_dir=DIR --keep]                      # capped, cold: time to first token

Needs llama-cpp-python, which the engine does not depend on: the optional `bench` extra (CI
never installs it; nor is this in the test suite). pip builds it from source with this
machine's compiler (-march=native), ~4-10 min on 2 cores:

  CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -e '.[bench]'

On the Sapphire Rapids VM of session 11, llama-cpp-python 0.3.36's q8_0 decode died with
SIGSEGV inside llama_decode, built -march=native and rebuilt without AMX alike (its bf16 ran);
the int8 pair then fails at llama.cpp's worker (BUILD_NOTES "session 11").

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
   this engine once per --paths entry (native, xla: LAZYMOE_KERNELS; layers: native kernels
   with the decode step run layer by layer, as when the pool may miss), every expert resident.
   Each does a warm-up pass (compiles the programs; pages the GGUF in), then --repeats times a
   fresh sequence: a --prompt-token prefill, then --decode forced steps (the same fixed token
   ids for both engines, so routing varies as on text and both compute the same positions).
   The best repeat of each is reported, for both engines alike.
5. a table: prompt and decode tok/s, the ratio engine / llama.cpp in the same encoding, active
   weight bytes per decode token (dense + k experts per layer + one embedding row, in each
   engine's own encoding), and active bytes x tok/s / the reference bandwidth; plus the two
   engines' argmax agreement over the decoded positions (the same model: a check of the
   comparison, not a speed figure).

Capped mode (--cgroup_gb=G; needs root and cgroup v1): the same files, but each worker
(llama.cpp, then this engine per --paths) runs once per repeat in its own fresh cgroup v1
memory cgroup limited to G GB (1e9 bytes), page cache included, which it joins before exec (so
it is charged from its first byte; bench/cgroups.py), with the model's files dropped from the
page cache just before (--cold=files: posix_fadvise DONTNEED on the GGUF and the store, after an
fsync; --cold=all: `sync; echo 3 > /proc/sys/vm/drop_caches` as shared/peers' run_capped.sh -c,
so the worker is charged for the libraries it maps too, and every process on the machine goes
cold). The bytes of those files still cached as the worker starts are measured (mincore) and
printed. llama.cpp loads with its defaults (mmap), this engine with memory_budget_gb = G (its
planned pool); both with a context of --prompt + --decode + 64 positions. No warm-up: one
cold pass per process, the repeats interleaved (llama.cpp, native, xla, llama.cpp, ...) and the
repeat with the shortest time to first token reported. Per worker: load time (the Llama(...) /
lazymoe_jax.load call), time to first token (the --prompt-token prompt in, its argmax out, after
loading; "x llama.cpp" is the target, <= 0.8 in issue 16), process start to first token
(imports and load included), prompt and decode tok/s, the cgroup's peak (and at the end of
loading), OOM kills, MB read from disk (/proc/self/io) in the prompt and per decode token; for
the engine also from its stats(): demand and speculative bytes per decode token and the
fraction of the prompt's and of decode's time with an expert read in flight ("disk busy").
The disk's cold O_DIRECT bandwidth on the store's chunk files is sampled before and after each
pair. The model files are checked against free disk space first (the 32-layer model needs ~30
GB for the bf16 pair: HF source + GGUF + store); --store_dir puts the stores elsewhere and reuses
one found there (a later `bench.bench_serve --model=STORE` can use it: add --keep). Files are
named after the model's shape, so runs of different shapes never mix them; what this run did not
create is never deleted.

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


# The engine's paths a run compares: the kernels (LAZYMOE_KERNELS), and for "layers" the native
# kernels with the decode step run layer by layer (Forward.whole_step off), as when the pool
# does not hold every expert (BUILD_NOTES "The whole decode step in one program").
PATH_ENV = {"native": {"LAZYMOE_KERNELS": "native"}, "xla": {"LAZYMOE_KERNELS": "xla"},
            "layers": {"LAZYMOE_KERNELS": "native", "LAZYMOE_BENCH_LAYERS": "1"}}


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_list("pairs", list(PAIRS), f"Encoding pairs to compare: {list(PAIRS)}.")
  flags.DEFINE_list("paths", ["native", "xla"], "This engine's paths: native, xla (LAZYMOE_KERNELS), "
                    "layers (native kernels, one program per layer as without a whole pool).")
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
  flags.DEFINE_float("cgroup_gb", None, "Capped mode: each worker in a fresh cgroup v1 memory "
                     "cgroup of this many GB (1e9 bytes, page cache included), cold page cache; "
                     "the engine loads with memory_budget_gb = this. Needs root.")
  flags.DEFINE_enum("cold", "files", ["files", "all"], "Capped mode: drop the model's files from "
                    "the page cache (files), or the whole machine's page cache (all).")
  flags.DEFINE_string("store_dir", None, "Where the converted stores go (default --workdir); a "
                      "store of the same shape found there is reused.")
  # one engine's measurement (the subprocesses this program starts)
  flags.DEFINE_enum("worker", None, ["llama", "engine"], "Internal: run one engine.")
  flags.DEFINE_string("model", None, "Internal: the GGUF file or store folder.")
  flags.DEFINE_string("dense_dtype", None, "Internal: load(dense_dtype=...).")
  flags.DEFINE_string("ids", None, "Internal: JSON file of prompt and decode ids.")
  flags.DEFINE_string("result", None, "Internal: where the worker writes its JSON.")
  flags.DEFINE_float("spawned_at", None, "Internal: time.time() when the parent started it.")


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


HEADS, KV_HEADS, HEAD_DIM, TOP_K = 16, 4, 64, 2  # the synthetic model's attention and routing


def model_key() -> str:
  """The synthetic model's shape, in the names of its files (a file of another shape is never
  taken for this one's)."""
  return (f"mixtral-{FLAGS.layers}L{FLAGS.experts}E-{FLAGS.hidden}h{FLAGS.intermediate}i-"
          f"v{FLAGS.vocab}-std{FLAGS.embed_std:g}")


def make_checkpoint(hf: str) -> bool:
  """Writes the HF checkpoint unless it is there; True when this call wrote it."""
  from bench import make_synthetic  # noqa: PLC0415
  if os.path.exists(os.path.join(hf, "config.json")):
    return False
  make_synthetic.make_synthetic(hf, FLAGS.layers, FLAGS.hidden, FLAGS.intermediate,
                                FLAGS.experts, TOP_K, FLAGS.vocab, HEADS, KV_HEADS, HEAD_DIM,
                                "bfloat16", embed_std=FLAGS.embed_std)
  shutil.copy(DEMO_TOKENIZER, os.path.join(hf, "tokenizer.model"))
  with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, f)
  return True


def estimated_bytes() -> dict[str, int]:
  """What each file of this run takes on disk, from the model's shape (checked against the
  free space before anything is written): the bf16 HF source, each GGUF, each store."""
  L, E, H, I, V = FLAGS.layers, FLAGS.experts, FLAGS.hidden, FLAGS.intermediate, FLAGS.vocab
  experts = L * E * 3 * H * I
  dense = L * (2 * H * HEADS * HEAD_DIM + 2 * H * KV_HEADS * HEAD_DIM + E * H + 2 * H)
  table = V * H  # the embedding, and the head
  bf16 = 2 * (experts + dense + 2 * table)
  return {"hf": bf16, "gguf-bf16": bf16,
          "gguf-q8_0": (experts + dense + 2 * table) * 34 // 32,  # 32 int8 + an f16 scale
          "store-bf16": bf16,
          # int8 experts with f32 row scales, dense and embedding bf16, head int8 (its default
          # when experts are quantised)
          "store-int8": experts + 4 * L * E * (2 * I + H) + 2 * (dense + table) + table + 4 * V}


def check_disk(plan: list[tuple[str, str, str]]) -> None:
  """plan: (pair or "hf", path, estimated_bytes key) of each file this run will write (those
  that exist are reused). Exits naming the shortfall when a filesystem cannot hold them: with --keep all of
  them, else the HF source plus the largest pair (one pair's GGUF and store exist at a time)."""
  est = estimated_bytes()
  need_by_dev: dict[int, list] = collections.defaultdict(list)
  for name, path, key in plan:
    if os.path.exists(path):
      continue
    parent = path
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    need_by_dev[os.stat(parent).st_dev].append((name, key, parent, est[key]))
  for items in need_by_dev.values():
    source = sum(b for n, _, _, b in items if n == "hf")
    pairs: dict[str, int] = collections.defaultdict(int)
    for n, _, _, b in items:
      if n != "hf":
        pairs[n] += b
    files = sum(pairs.values()) if FLAGS.keep else max(pairs.values(), default=0)
    need = int((source + files) * 1.05) + (256 << 20)  # 5% and 256 MB of slack
    free = shutil.disk_usage(items[0][2]).free
    if free < need:
      what = ", ".join(f"{k} {b / 1e9:.1f} GB" for _, k, _, b in items)
      raise SystemExit(
          f"error: not enough free disk space: this run needs {need / 1e9:.1f} GB at its peak "
          f"(of {what}: {'all kept (--keep)' if FLAGS.keep else 'one pair at a time'}; 5% "
          "slack) on the "
          f"filesystem of {items[0][2]}, which has {free / 1e9:.1f} GB free. Free some space, "
          "put --workdir / --store_dir on a larger disk, or run one pair at a time "
          "(--pairs=int8 needs the least).")


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
               dense_dtype: str | None = None, cgroup=None) -> dict:
  """One engine in a subprocess pinned to the first --threads CPUs this process may use; with
  `cgroup` (capped mode) inside that fresh MemoryCgroup from before its exec, and a failure
  (an OOM kill) is returned as a row with "error" instead of raised."""
  cpus = sorted(os.sched_getaffinity(0))[:FLAGS.threads]
  cmd = [sys.executable, "-m", "bench.vs_llamacpp", f"--worker={kind}", f"--model={model}",
         f"--ids={ids}", f"--result={result}", f"--threads={FLAGS.threads}",
         f"--repeats={FLAGS.repeats}", f"--breakdown={FLAGS.breakdown}"]
  if dense_dtype:
    cmd.append(f"--dense_dtype={dense_dtype}")
  if cgroup is not None:
    cmd += [f"--cgroup_gb={FLAGS.cgroup_gb}", f"--spawned_at={time.time()!r}"]
  full_env = dict(os.environ, **(env or {}))
  full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  pinned = ["taskset", "-c", ",".join(map(str, cpus))] + cmd
  if cgroup is None:
    subprocess.run(pinned, env=full_env, cwd=REPO, check=True)
  else:
    if os.path.exists(result):
      os.remove(result)
    log = result[:-len(".json")] + ".log"
    with open(log, "w") as err:
      done = subprocess.run(cgroup.command(cmd, cpus), env=full_env, cwd=REPO, stderr=err)
    if done.returncode:
      with open(log) as f:
        tail = f.read().strip().splitlines()[-1:]
      how = "killed by signal %d" % -done.returncode if done.returncode < 0 else \
            f"exit {done.returncode}"
      return {"error": f"{how}: {' '.join(tail)[-300:]} (log: {log})"}
  with open(result) as f:
    return json.load(f)


def convert(hf: str, pair: str, work: str, store_dir: str, ll: str) -> tuple[str, str, list]:
  """The pair's GGUF and store (each reused if there); returns them and the ones made here."""
  from checkpoints_tools import convert_hf  # noqa: PLC0415
  outtype, expert_dtype, _ = PAIRS[pair]
  gguf_path, store = pair_paths(work, store_dir, pair)
  made = []
  if not os.path.exists(gguf_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.join(ll, "gguf-py"), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, os.path.join(ll, "convert_hf_to_gguf.py"), hf,
                           "--outfile", gguf_path + ".part", "--outtype", outtype], env=env,
                          capture_output=True, text=True)
    if done.returncode:
      raise SystemExit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-4000:]}")
    os.rename(gguf_path + ".part", gguf_path)
    made.append(gguf_path)
  if not os.path.exists(os.path.join(store, "manifest.json")):
    convert_hf.convert(hf, store, expert_dtype=expert_dtype, overwrite=True, log=lambda s: None)
    made.append(store)
  return gguf_path, store, made


def pair_paths(work: str, store_dir: str, pair: str) -> tuple[str, str]:
  outtype, expert_dtype, _ = PAIRS[pair]
  return (os.path.join(work, f"{model_key()}-{outtype}.gguf"),
          os.path.join(store_dir, f"{model_key()}-{expert_dtype}"))


def remove(paths: list[str]) -> None:
  for p in paths:
    if os.path.isdir(p):
      shutil.rmtree(p, ignore_errors=True)
    elif os.path.exists(p):
      os.remove(p)


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
  for pair in FLAGS.pairs:
    if pair not in PAIRS:
      raise SystemExit(f"--pairs: {pair!r} is not one of {list(PAIRS)}.")
  for path in FLAGS.paths:
    if path not in PATH_ENV:
      raise SystemExit(f"--paths: {path!r}: choose from {list(PATH_ENV)}.")
  capped = FLAGS.cgroup_gb is not None
  if not shutil.which("taskset"):
    raise SystemExit("taskset (util-linux) not found: the workers are pinned with it "
                     "(apt-get install util-linux).")
  if capped:
    from bench import cgroups  # noqa: PLC0415
    cgroups.require("--cgroup_gb")
    if FLAGS.cgroup_gb <= 0:
      raise SystemExit(f"--cgroup_gb={FLAGS.cgroup_gb}: give the cap in GB, > 0.")
    if FLAGS.breakdown:
      raise SystemExit("--breakdown times a resident engine: leave it out with --cgroup_gb.")
  work = os.path.abspath(FLAGS.workdir)
  made_work = not os.path.exists(work)
  store_dir = os.path.abspath(FLAGS.store_dir or work)
  made_store_dir = not os.path.exists(store_dir)
  os.makedirs(work, exist_ok=True)
  os.makedirs(store_dir, exist_ok=True)
  hf = os.path.join(work, f"hf-{model_key()}")
  plan = [("hf", hf, "hf")]
  for pair in FLAGS.pairs:
    gguf_path, store = pair_paths(work, store_dir, pair)
    plan += [(pair, gguf_path, f"gguf-{PAIRS[pair][0]}"),
             (pair, store, f"store-{PAIRS[pair][1]}")]
  made = []  # what this run wrote: deleted at the end unless --keep
  try:
    check_disk(plan)  # before a byte is written
    fetched = not os.path.exists(os.path.join(work, "src"))
    ll = llama_cpp_dir(work)
    if fetched and os.path.exists(os.path.join(work, "src")):
      made.append(os.path.join(work, "src"))
    if make_checkpoint(hf):
      made.append(hf)
    ids_path = os.path.join(work, "ids.json")
    token_ids(hf, ids_path)
    made.append(ids_path)
    with open(os.path.join(hf, "config.json")) as f:
      cfg = json.load(f)
    refs = [] if capped else [numpy_gemv_bandwidth()]
    if refs:
      print(f"numpy f32 gemv reference: {refs[0]:.1f} GB/s", flush=True)
    rows = []
    for pair in FLAGS.pairs:
      gguf_path, store, new = convert(hf, pair, work, store_dir, ll)
      made += new
      if capped:
        rows += capped_pair(pair, gguf_path, store, ids_path, work)
      else:
        rows += resident_pair(pair, gguf_path, store, ids_path, work, cfg)
      if not FLAGS.keep:
        remove(new)  # one pair's GGUF and store at a time
    if capped:
      print_capped_table(rows)
    else:
      refs.append(numpy_gemv_bandwidth())
      print_table(rows, refs)
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump({"refs_GBps": refs, "load_average": os.getloadavg(), "rows": rows,
                   "cgroup_gb": FLAGS.cgroup_gb, "cold": FLAGS.cold if capped else None}, f,
                  indent=1)
  finally:
    if FLAGS.keep:
      stores = [pair_paths(work, store_dir, p)[1] for p in FLAGS.pairs]
      print(f"kept {work}; the stores (for bench.bench_serve --model=...): "
            f"{', '.join(p for p in stores if os.path.exists(p))}")
    elif made_work:
      shutil.rmtree(work, ignore_errors=True)
    else:
      remove(made + glob.glob(os.path.join(work, "llama-*.*")) +
             glob.glob(os.path.join(work, "engine-*.*")))
    if not FLAGS.keep and made_store_dir:
      shutil.rmtree(store_dir, ignore_errors=True)


def resident_pair(pair: str, gguf_path: str, store: str, ids_path: str, work: str,
                  cfg: dict) -> list[dict]:
  """Every expert resident, warm: llama.cpp, then the engine per --paths."""
  rows = []
  res = run_worker("llama", gguf_path, ids_path, os.path.join(work, f"llama-{pair}.json"))
  res.update(pair=pair, engine="llama.cpp", label=f"llama.cpp {PAIRS[pair][0]}",
             active_bytes=gguf_active_bytes(gguf_path, cfg["num_experts_per_tok"],
                                            cfg["num_local_experts"], cfg["vocab_size"]))
  rows.append(res)
  print(f"  {res['label']}: prompt {res['prompt_tok_s']:.1f} tok/s, decode "
        f"{res['decode_tok_s']:.1f} tok/s", flush=True)
  for path in FLAGS.paths:
    dense = PAIRS[pair][2]
    res = run_worker("engine", store, ids_path, os.path.join(work, f"engine-{pair}-{path}.json"),
                     env=PATH_ENV[path], dense_dtype=dense)
    res.update(pair=pair, engine="lazymoe", label=f"engine {path}, experts "
               f"{PAIRS[pair][1]}, dense {dense or 'bf16'}")
    rows.append(res)
    print(f"  {res['label']}: prompt {res['prompt_tok_s']:.1f} tok/s, decode "
          f"{res['decode_tok_s']:.1f} tok/s", flush=True)
  return rows


def capped_pair(pair: str, gguf_path: str, store: str, ids_path: str, work: str) -> list[dict]:
  """Capped mode for one pair: each worker --repeats times, each time a fresh process in a
  fresh capped cgroup with the model's files cold; the repeat with the shortest time to first
  token is the row (every repeat's TTFT kept in it)."""
  from bench import bench_stream, cgroups  # noqa: PLC0415
  dense = PAIRS[pair][2]
  workers = [("llama", gguf_path, {}, None, f"llama.cpp {PAIRS[pair][0]}", f"llama-{pair}")]
  workers += [("engine", store, PATH_ENV[path], dense,
               f"engine {path}, experts {PAIRS[pair][1]}, dense {dense or 'bf16'}",
               f"engine-{pair}-{path}") for path in FLAGS.paths]
  files = cgroups.files_under(gguf_path, store)
  chunks = [c for c in glob.glob(os.path.join(store, "experts", "**", "c", "**", "*"),
                                 recursive=True) if os.path.isfile(c)]
  disk_before = bench_stream.disk_bandwidth(bench_stream.sample_chunks(chunks, 32), 8)
  runs: dict[str, list[dict]] = collections.defaultdict(list)
  limit = int(FLAGS.cgroup_gb * 1e9)
  for rep in range(FLAGS.repeats):
    for kind, model, env, dtype, label, name in workers:
      if FLAGS.cold == "all":
        cgroups.drop_all_caches()
      else:
        cgroups.drop_page_cache(files)
      cached = cgroups.cached_bytes(files)
      load = os.getloadavg()[0]
      with cgroups.MemoryCgroup(name, limit) as cg:
        res = run_worker(kind, model, ids_path, os.path.join(work, f"{name}.json"), env=env,
                         dense_dtype=dtype, cgroup=cg)
        res.update(cgroup_peak_MB=cg.peak_bytes() / 1e6, oom_kills=cg.oom_kills())
      res.update(pair=pair, engine="llama.cpp" if kind == "llama" else "lazymoe", label=label,
                 repeat=rep, cached_at_start_MB=cached / 1e6, load_average_at_start=load)
      asked = env.get("LAZYMOE_KERNELS")
      if "error" not in res and asked and res["kernels"] != asked:
        res["error"] = f"asked LAZYMOE_KERNELS={asked}, the engine ran {res['kernels']}"
      runs[label].append(res)
      if "error" in res:
        print(f"  {label} (repeat {rep + 1}): FAILED {res['error']}; cgroup peak "
              f"{res['cgroup_peak_MB']:.0f} MB, OOM kills {res['oom_kills']}", flush=True)
      else:
        print(f"  {label} (repeat {rep + 1}): load {res['load_s']:.2f} s, first token "
              f"{res['ttft_s']:.2f} s after it, decode {res['decode_tok_s']:.2f} tok/s, "
              f"cgroup peak {res['cgroup_peak_MB']:.0f} MB", flush=True)
  disk_after = bench_stream.disk_bandwidth(bench_stream.sample_chunks(chunks, 32), 8)
  rows = []
  for *_, label, _ in workers:
    ok = [r for r in runs[label] if "error" not in r]
    row = dict(min(ok, key=lambda r: r["ttft_s"]) if ok else runs[label][-1])
    row.update(ttft_all_s=[r.get("ttft_s") for r in runs[label]],
               failed=sum("error" in r for r in runs[label]),
               disk_GBps=(disk_before + disk_after) / 2, disk_GBps_before_after=[disk_before,
                                                                                disk_after])
    rows.append(row)
  return rows


def print_capped_table(rows: list[dict]) -> None:
  la = " ".join(f"{x:.2f}" for x in os.getloadavg())
  print(f"\nunder a {FLAGS.cgroup_gb:g} GB cgroup cap from each worker's first byte, cold "
        f"(--cold={FLAGS.cold}); threads {FLAGS.threads}; prompt {FLAGS.prompt}, decode "
        f"{FLAGS.decode}; best of {FLAGS.repeats} by time to first token; load average now {la}")
  print("| pair | engine | load s | TTFT s | x llama.cpp | again s | start to 1st token s | "
        "prompt tok/s | "
        "decode tok/s | x llama.cpp | cgroup peak MB (at loaded) | OOM kills | MB read: load / "
        "prompt / per decode token | engine MB/token demand + spec. | disk busy prompt / decode | "
        "argmax = llama.cpp |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  base = {r["pair"]: r for r in rows if r["engine"] == "llama.cpp" and "error" not in r}
  for r in rows:
    if "error" in r:
      print(f"| {r['pair']} | {r['label']} | FAILED ({r['failed']} of {FLAGS.repeats}): "
            f"{r['error']} |  |  |  |  |  |  |  | {r['cgroup_peak_MB']:.0f} | {r['oom_kills']} |"
            "  |  |  |  |")
      continue
    b = base.get(r["pair"])
    vs = (lambda f: "") if b is None or b is r else (lambda f: f"{f(r, b):.2f}")
    eng = ""
    busy = ""
    if r["engine"] == "lazymoe":
      eng = (f"{r['demand_MB_per_token']:.1f} + {r['speculative_MB_per_token']:.1f}")
      busy = f"{r['prompt_disk_busy_frac']:.0%} / {r['decode_disk_busy_frac']:.0%}"
    print(f"| {r['pair']} | {r['label']} | {r['load_s']:.2f} | {r['ttft_s']:.2f} | "
          f"{vs(lambda r, b: r['ttft_s'] / b['ttft_s'])} | {r['ttft_again_s']:.2f} | "
          f"{r['start_to_first_token_s']:.2f} | "
          f"{r['prompt_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
          f"{vs(lambda r, b: r['decode_tok_s'] / b['decode_tok_s'])} | "
          f"{r['cgroup_peak_MB']:.0f} ({r['load_peak_MB']:.0f}) | {r['oom_kills']} | "
          f"{r['load_read_MB']:.0f} / {r['prompt_read_MB']:.0f} / "
          f"{r['decode_read_MB_per_token']:.1f} | {eng} | {busy} | "
          f"{vs(lambda r, b: agreement(r['argmax'], b['argmax']))} |")
  for r in rows:
    extra = f"; plan: {r['plan']}" if r.get("plan") else ""
    print(f"{r['pair']} {r['label']}: of the model's files {r.get('cached_at_start_MB', 0):.1f} "
          f"MB were cached as it started; disk {r['disk_GBps']:.2f} GB/s (O_DIRECT on the "
          f"store's chunks, 8 in flight, mean of before/after the pair); TTFT of each repeat "
          f"{r['ttft_all_s']}{extra}")
  for pair, b in base.items():
    for r in rows:
      if r["pair"] == pair and r["engine"] == "lazymoe" and "error" not in r:
        x = r["ttft_s"] / b["ttft_s"]
        print(f"time to first token, {r['label']} / {b['label']}: {x:.2f} (issue 16's target "
              f"<= 0.8: {'met' if x <= 0.8 else 'not met'}); from process start "
              f"{r['start_to_first_token_s'] / b['start_to_first_token_s']:.2f}")


# ---- the workers: one engine each ---------------------------------------------------------------
def best(runs: list[tuple[float, float, list[int]]]) -> dict:
  """runs: (prefill s, decode s, argmax ids) per repeat -> best rates, every repeat kept."""
  n_prompt, n_decode = len(_IDS["prompt"]), len(_IDS["decode"])
  return {"prompt_tok_s": max(n_prompt / p for p, _, _ in runs),
          "decode_tok_s": max(n_decode / d for _, d, _ in runs),
          "prefill_s": [p for p, _, _ in runs], "decode_s": [d for _, d, _ in runs],
          "argmax": runs[-1][2]}


_IDS: dict = {}  # the worker's prompt and decode ids (--ids)


def read_bytes() -> int:
  """Bytes this process has had read from storage (/proc/self/io read_bytes: page-cache misses
  and mmap faults as well as O_DIRECT reads)."""
  with open("/proc/self/io") as f:
    return int(dict(l.split(": ") for l in f.read().splitlines())["read_bytes"])


def cold_run(load, prefill, step, stats=None) -> tuple[dict, object]:
  """Capped mode's one cold pass, the same for both engines: load() -> the model; prefill(model,
  ids) -> first token (the prompt's argmax, on the host); step(model, token) -> argmax; stats:
  the engine's counters (None for llama.cpp). Returns the timings and bytes of each phase, and
  the model."""
  from bench import cgroups  # noqa: PLC0415
  prompt, decode = _IDS["prompt"], _IDS["decode"]
  io = [read_bytes()]
  t = [time.perf_counter()]
  model = load()
  t.append(time.perf_counter())
  io.append(read_bytes())
  own = cgroups.own()
  res = {"load_s": t[1] - t[0], "load_peak_MB": own.peak_bytes() / 1e6 if own else None,
         "load_read_MB": (io[1] - io[0]) / 1e6}
  s0 = stats(model) if stats else None
  first = prefill(model, prompt)
  t.append(time.perf_counter())
  io.append(read_bytes())
  s1 = stats(model) if stats else None
  res["start_to_first_token_s"] = time.time() - FLAGS.spawned_at
  out = [step(model, tok) for tok in decode]
  t.append(time.perf_counter())
  io.append(read_bytes())
  ttft, dec = t[2] - t[1], t[3] - t[2]
  res.update(ttft_s=ttft, first_token=first, prompt_tok_s=len(prompt) / ttft,
             decode_tok_s=len(decode) / dec, decode_s=dec, argmax=out,
             prompt_read_MB=(io[2] - io[1]) / 1e6,
             decode_read_MB_per_token=(io[3] - io[2]) / 1e6 / len(decode))
  s2 = stats(model) if stats else None
  # the same prompt again in a fresh sequence: its programs compiled, the memory as the first
  # pass left it (the engine's pool; llama.cpp's page cache, under the same cap)
  t.append(time.perf_counter())
  prefill(model, prompt)
  res["ttft_again_s"] = time.perf_counter() - t[4]
  if stats:
    d = lambda a, b, k: b[k] - a[k]  # noqa: E731
    res.update(
        prompt_engine_MB=d(s0, s1, "bytes_read") / 1e6,
        prompt_disk_busy_frac=d(s0, s1, "disk_busy_s") / ttft,
        prompt_io_wait_s=d(s0, s1, "io_wait_s"),
        engine_MB_per_token=d(s1, s2, "bytes_read") / 1e6 / len(decode),
        demand_MB_per_token=d(s1, s2, "demand_bytes") / 1e6 / len(decode),
        speculative_MB_per_token=d(s1, s2, "speculative_bytes") / 1e6 / len(decode),
        unused_speculative_MB=d(s1, s2, "unused_speculative_bytes") / 1e6,
        decode_disk_busy_frac=d(s1, s2, "disk_busy_s") / dec,
        decode_io_wait_s=d(s1, s2, "io_wait_s"),
        hit_rate=d(s1, s2, "expert_hits") / max(1, d(s1, s2, "expert_hits")
                                                 + d(s1, s2, "expert_misses")),
        kernels=s2["kernels"], peak_rss_MB=s2["peak_rss_bytes"] / 1e6)
  return res, model


def llama_worker() -> dict:
  import llama_cpp  # noqa: PLC0415
  prompt, decode = _IDS["prompt"], _IDS["decode"]

  def load():  # llama.cpp's defaults otherwise (mmap on)
    return llama_cpp.Llama(model_path=FLAGS.model, n_ctx=len(prompt) + len(decode) + 64,
                           n_batch=len(prompt), n_ubatch=len(prompt), n_threads=FLAGS.threads,
                           n_threads_batch=FLAGS.threads, verbose=False)

  def last_argmax(llm) -> int:
    p = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(p, shape=(llm.n_vocab(),))))

  def prefill(llm, ids) -> int:
    llm.reset()
    llm.eval(ids)
    return last_argmax(llm)

  def step(llm, tok) -> int:
    llm.eval([tok])
    return last_argmax(llm)

  if FLAGS.cgroup_gb is not None:
    res, _ = cold_run(load, prefill, step)
    return {**res, "version": llama_cpp.__version__}
  llm = load()

  def once() -> tuple[float, float, list[int]]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    out = [step(llm, tok) for tok in decode]
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
  if FLAGS.cgroup_gb is not None:
    def load():  # the pool planned for the cap, the same context as llama.cpp's
      return lazymoe_jax.load(FLAGS.model, memory_budget_gb=FLAGS.cgroup_gb,
                              dense_dtype=FLAGS.dense_dtype,
                              max_context=len(prompt) + len(decode) + 64)
    seq = []  # the sequence, made inside the timed prompt (its KV cache is allocated there)

    def prefill(engine, ids) -> int:
      if seq:
        seq.pop().close()
      seq.append(engine.session(len(prompt) + len(decode) + 64))
      return int(np.argmax(seq[0].feed(ids)))

    res, engine = cold_run(load, prefill, lambda engine, tok: int(np.argmax(seq[0].feed([tok]))),
                           lambda engine: engine.stats())
    return {**res, "plan": engine.plan.describe() if engine.plan else None,
            "slots": engine.pool.num_slots, "compilation_cache": engine.compilation_cache}
  engine = lazymoe_jax.load(FLAGS.model, expert_slots=10**9, dense_dtype=FLAGS.dense_dtype)
  engine.forward.whole_step = os.environ.get("LAZYMOE_BENCH_LAYERS") != "1"
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
  res.update(kernels=engine.stats()["kernels"], whole_steps=engine.stats()["whole_steps"],
             active_bytes=active_bytes_per_token(engine))
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
