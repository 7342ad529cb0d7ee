r"""Converts a Hugging Face MoE checkpoint folder into a LazyMoE store.

  python -m checkpoints_tools.convert_hf --src=HF_DIR --dst=STORE_DIR [--expert_dtype=bf16]

Streams tensor by tensor: memory holds about one layer's dense params plus one expert. The
store is built in a sibling folder and moved into place only once its manifest is written,
so an interrupted conversion never leaves something that looks like a store.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable

import numpy as np
import tensorstore as ts
from absl import app, flags
from safetensors import safe_open

from lazymoe_jax import cli
from lazymoe_jax import families
from lazymoe_jax.errors import CheckpointError
from lazymoe_jax.model import encodings
from lazymoe_jax.model.spec import MOE, ModelSpec
from lazymoe_jax.store import dense as dense_store
from lazymoe_jax.store import embedding as embedding_store
from lazymoe_jax.store import format as fmt

# Short names accepted by --expert_dtype besides every registered encoding's own name
# (model/encodings.py); "int4" takes --group_size.
EXPERT_DTYPE_ALIASES = {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}
TOKENIZER_FILES = (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "json"))
# --head_dtype: the output head's compute encoding, stored so that load does not re-encode it
HEAD_DTYPES = {"int8": "int8", "bf16": "bfloat16", "keep": None}
HEAD_ROW_BLOCK = 4096  # head rows encoded at a time (a 200k-row head in float32 is 2.3 GB)
EMBED_ROW_BLOCK = 16 * embedding_store.SHARD_ROWS  # embedding rows written at a time


FP8_SCALE_SUFFIX = "_scale_inv"  # `X.weight` float8_e4m3fn + `X.weight_scale_inv` float32
FP8_DTYPE = "F8_E4M3"
SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def fp8_block_dequantise(w: np.ndarray, scale_inv: np.ndarray,
                         block: tuple[int, int]) -> np.ndarray:
  """Block-scaled FP8 (DeepSeek-V3): w float8_e4m3fn [out, in], one float32 scale_inv per
  block x block tile ([ceil(out/b0), ceil(in/b1)], edge tiles partial) -> float32 w * scale."""
  b0, b1 = block
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, axis=0), b1, axis=1)
  return w.astype(np.float32) * scale[:w.shape[0], :w.shape[1]]


class SafetensorsFolder:
  """All tensors of a checkpoint folder (one file, or shards with an index json), by name.

  Block-scaled FP8 weights (a float8_e4m3fn `X.weight` with a `X.weight_scale_inv`) read as
  one float tensor, dequantised to the checkpoint's float dtype (`float_dtype`: that of the
  embeddings); their `*_scale_inv` tensors are then no tensors of their own (`fp8_scales`)."""

  def __init__(self, src: str, fp8_block: tuple[int, int] = (128, 128)):
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
      raise CheckpointError(f"{src} has no *.safetensors files; give a Hugging Face model folder "
                            "saved in safetensors format.")
    self.handles = {}
    self.where: dict[str, str] = {}
    for name in files:
      path = os.path.join(src, name)
      if not os.path.exists(path):
        raise CheckpointError(f"shard {path} listed in model.safetensors.index.json is missing.")
      try:
        h = safe_open(path, framework="numpy")
      except Exception as e:  # safetensors raises its own error type for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
      self.handles[name] = h
      for key in h.keys():
        self.where[key] = name
    self.src = src
    self.fp8_block = tuple(fp8_block)
    self.fp8 = {k for k in self.where if self._raw_dtype(k) == FP8_DTYPE}
    self.fp8_scales = {k + FP8_SCALE_SUFFIX for k in self.fp8}
    lonely = sorted(k for k in self.fp8 if k + FP8_SCALE_SUFFIX not in self.where)
    if lonely:
      raise CheckpointError(f"{len(lonely)} float8 tensor(s) have no {FP8_SCALE_SUFFIX} scales, "
                            f"e.g. {lonely[:3]}; only block-scaled FP8 (DeepSeek-V3's layout) is "
                            "supported.")
    others = sorted(k for k in self.where if self._raw_dtype(k).startswith("F8"))
    if set(others) - self.fp8:
      raise CheckpointError(f"float8 tensors other than e4m3 are not supported, e.g. "
                            f"{sorted(set(others) - self.fp8)[:3]}.")
    floats = [SAFETENSORS_FLOATS[self._raw_dtype(k)] for k in sorted(self.where)
              if "embed" in k and self._raw_dtype(k) in SAFETENSORS_FLOATS]
    self.float_dtype = floats[0] if floats else "float32"
    for key in sorted(self.fp8):
      want = tuple(-(-n // b) for n, b in zip(self.shape(key), self.fp8_block))
      got = self.shape(key + FP8_SCALE_SUFFIX)
      if len(self.shape(key)) != 2 or got != want:
        raise CheckpointError(
            f"{key + FP8_SCALE_SUFFIX} has shape {list(got)}; a {list(self.shape(key))} FP8 "
            f"weight in {list(self.fp8_block)} blocks needs {list(want)} (block size from "
            "config.json quantization_config.weight_block_size).")

  def _raw_dtype(self, key: str) -> str:
    return self.handles[self.where[key]].get_slice(key).get_dtype()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """safetensors' dtype name; an FP8 weight reads as its dequantised dtype."""
    if key in self.fp8:
      return {v: k for k, v in SAFETENSORS_FLOATS.items()}[self.float_dtype]
    return self._raw_dtype(key)

  def get(self, key: str, fp8_as_f32: bool = False) -> np.ndarray:
    """The tensor; an FP8 weight dequantised, to float_dtype or (fp8_as_f32) float32, which
    routed experts take so that re-encoding them rounds once."""
    if key in self.fp8:
      w = fp8_block_dequantise(self._read_fp8(key), self.get(key + FP8_SCALE_SUFFIX),
                               self.fp8_block)
      return w if fp8_as_f32 else w.astype(fmt.numpy_dtype(self.float_dtype))
    return self.handles[self.where[key]].get_tensor(key)

  def _read_fp8(self, key: str) -> np.ndarray:
    """The raw float8_e4m3fn tensor (safetensors' numpy API has no float8): located through
    the file's JSON header, read as bytes, viewed as ml_dtypes.float8_e4m3fn."""
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
    path = os.path.join(self.src, self.where[key])
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      begin, end = json.loads(f.read(n))[key]["data_offsets"]
      f.seek(8 + n + begin)
      raw = np.frombuffer(f.read(end - begin), np.uint8)
    return raw.view(ml_dtypes.float8_e4m3fn).reshape(self.shape(key))

  def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """tensor[start:stop] (a block of an embedding or head), reading only those rows."""
    stop = min(stop, self.shape(key)[0])
    if key in self.fp8:
      return self.get(key)[start:stop]
    return self.handles[self.where[key]].get_slice(key)[start:stop]

  def get_row(self, key: str, i: int) -> np.ndarray:
    """tensor[i] only (one expert of a fused [E, ...] tensor), without reading the rest."""
    if key in self.fp8:
      raise CheckpointError(f"{key}: FP8 in fused [E, ...] expert tensors is not supported.")
    return self.handles[self.where[key]].get_slice(key)[i:i + 1][0]


# Tensors some exporters write that carry no weights we need.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _plan(family, spec: ModelSpec):
  """[(part name, {param: [hf names]}, expert reader or None)] per part."""
  parts = [("globals", family.globals_names(spec), None)]
  for layer in range(spec.num_hidden_layers):
    experts = family.experts(spec, layer) if spec.layers[layer].mlp == MOE else None
    parts.append((f"layer_{layer:03d}", family.layer_names(spec, layer), experts))
  return parts


def _validate(family, spec: ModelSpec, folder: "SafetensorsFolder", plan,
              ignored_prefixes: tuple[str, ...] = ()) -> None:
  """Every expected tensor present with the right shape, nothing unexpected. Reads no data.
  Tensors under `ignored_prefixes` (e.g. multi-token-prediction layers) are skipped."""
  shapes = family.param_shapes(spec)
  expected: dict[str, tuple[int, ...]] = {}
  for _, dense, experts in plan:
    for param, names in dense.items():
      expected |= dict(zip(names, shapes[param]))
    if experts is not None:
      expected |= experts.expected_in(folder)
  present = set(folder.where)
  missing = sorted(set(expected) - present)
  ignorable = {k for k in present if k.endswith(IGNORED_SUFFIXES) or
               (ignored_prefixes and k.startswith(ignored_prefixes))} | folder.fp8_scales
  if spec.tie_word_embeddings:
    ignorable.add("lm_head.weight")  # some exporters write the tied head anyway
  unexpected = sorted(present - set(expected) - ignorable)
  if missing:
    raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) that a {spec.family} "
                          f"model with this config.json needs, e.g. {missing[:5]}.")
  if unexpected:
    raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) that a {spec.family} "
                          f"model with this config.json does not use, e.g. {unexpected[:5]}; "
                          "the config and the weights do not match.")
  for name, shape in expected.items():
    got = folder.shape(name)
    if got != shape:
      raise CheckpointError(f"tensor {name} has shape {list(got)}, expected {list(shape)} from "
                            "config.json.")


def _gather(folder: SafetensorsFolder, names: list[str], dtype=None,
            fp8_as_f32: bool = False) -> np.ndarray:
  pieces = [folder.get(n, fp8_as_f32) for n in names]
  out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
  return np.ascontiguousarray(out if dtype is None else out.astype(dtype))


def _tokenizer(src: str, dst: str, hf: dict, log: Callable[[str], None]) -> dict | None:
  tok_cfg = {}
  if os.path.exists(os.path.join(src, "tokenizer_config.json")):
    with open(os.path.join(src, "tokenizer_config.json")) as f:
      tok_cfg = json.load(f)
  for name, kind in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
      add_bos = tok_cfg.get("add_bos_token", kind == "sentencepiece" and
                            hf.get("bos_token_id") is not None)
      return {"kind": kind, "file": name, "add_bos": bool(add_bos)}
  log("WARNING: no tokenizer.model or tokenizer.json in the source folder; the store works on "
      "token ids only.")
  return None


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _chat_template(src: str, dst: str) -> dict | None:
  """Copies the model's chat template into the store (for the server): chat_template.jinja as
  transformers saves it, else tokenizer_config.json's chat_template (a string, or a list of
  named templates: the "default" one); with the bos/eos strings the template reads."""
  tok_cfg = {}
  if os.path.exists(os.path.join(src, "tokenizer_config.json")):
    with open(os.path.join(src, "tokenizer_config.json")) as f:
      tok_cfg = json.load(f)
  source = tok_cfg.get("chat_template")
  if isinstance(source, list):
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    source = named.get("default") or next(iter(named.values()), None)
  if os.path.exists(os.path.join(src, CHAT_TEMPLATE_FILE)):
    with open(os.path.join(src, CHAT_TEMPLATE_FILE), encoding="utf-8") as f:
      source = f.read()
  if not isinstance(source, str) or not source:
    return None
  with open(os.path.join(dst, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
    f.write(source)
  token = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731  (AddedToken)
  return {"file": CHAT_TEMPLATE_FILE, "bos_token": token(tok_cfg.get("bos_token")),
          "eos_token": token(tok_cfg.get("eos_token"))}


STORE_ENTRIES = {fmt.MANIFEST, fmt.DENSE_DIR, fmt.EXPERTS_DIR, embedding_store.EMBED_DIR,
                 CHAT_TEMPLATE_FILE} | {
    n for n, _ in TOKENIZER_FILES}


def _check_destination(src: str, dst: str, overwrite: bool) -> str:
  """Resolves dst (symlinks included) and refuses anything --overwrite must not delete."""
  dst = os.path.realpath(dst)
  real_src = os.path.realpath(src)
  if dst == real_src or real_src.startswith(dst + os.sep):
    raise CheckpointError(f"destination {dst} is or contains the source folder; choose a new "
                          "folder for the store.")
  if not os.path.exists(dst):
    return dst
  if not os.path.isdir(dst):
    raise CheckpointError(f"destination {dst} is a file; give a folder path.")
  entries = set(os.listdir(dst))
  if entries and not overwrite:
    raise CheckpointError(f"destination {dst} exists and is not empty; pass --overwrite to "
                          "replace it.")
  if entries - STORE_ENTRIES:
    raise CheckpointError(f"destination {dst} holds files that are not part of a store "
                          f"(e.g. {sorted(entries - STORE_ENTRIES)[:3]}); --overwrite only "
                          "replaces a store. Choose an empty or new folder.")
  return dst


def _remove_stale_partials(dst: str) -> None:
  """Deletes DST.partial-PID folders left by killed conversions (whose PID is gone)."""
  for path in glob.glob(glob.escape(dst) + ".partial-*"):
    pid = path.rsplit("-", 1)[-1]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _swap_into_place(tmp: str, dst: str) -> None:
  """Moves the finished store to dst; an old store there is removed only after that worked."""
  if not os.path.exists(dst):
    os.rename(tmp, dst)
    return
  old = f"{dst}.old-{os.getpid()}"
  os.rename(dst, old)
  try:
    os.rename(tmp, dst)
  except BaseException:
    os.rename(old, dst)  # put the previous store back; the new one stays in tmp
    raise
  shutil.rmtree(old)


def _eos_ids(src: str, spec: ModelSpec) -> list[int]:
  """eos ids from config.json and generation_config.json (chat models list more there)."""
  ids = list(spec.eos_token_ids)
  path = os.path.join(src, "generation_config.json")
  if os.path.exists(path):
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
    for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
      if int(i) not in ids:
        ids.append(int(i))
  return ids


def embedding_bytes(entry: dict) -> int:
  return int(np.prod(entry["shape"])) * fmt.numpy_dtype(entry["dtype"]).itemsize


def _globals(folder: SafetensorsFolder, dense: dict[str, list[str]], tmp: str,
             head_enc: encodings.Encoding | None) -> tuple[dict[str, np.ndarray], dict]:
  """The globals part without the embedding (written as its own table, read by rows at run
  time: store/embedding.py) and with the output head in its compute encoding (`head_enc`;
  None keeps the checkpoint's dtype), as arrays `lm_head`, `lm_head_<suffix>`. A tied head is
  the embedding, encoded (or copied) into the part: the head is resident, the table is not.
  Both are read and encoded by blocks of rows."""
  (embed_name,), head_name = dense["embed"], dense.get("lm_head", dense["embed"])[0]
  shape = folder.shape(embed_name)
  dtype = fmt.numpy_dtype(SAFETENSORS_FLOATS.get(folder.dtype(embed_name), "float32"))
  blocks = (folder.get_rows(embed_name, r, r + EMBED_ROW_BLOCK).astype(dtype)
            for r in range(0, shape[0], EMBED_ROW_BLOCK))
  entry = embedding_store.write(tmp, blocks, shape, dtype.name)
  tree = {k: _gather(folder, names) for k, names in dense.items() if k not in ("embed",
                                                                               "lm_head")}
  rows = folder.shape(head_name)[0]
  pieces = [folder.get_rows(head_name, r, r + HEAD_ROW_BLOCK)
            for r in range(0, rows, HEAD_ROW_BLOCK)]
  if head_enc is None:
    tree["lm_head"] = np.ascontiguousarray(np.concatenate(pieces))
  else:
    encoded = [head_enc.encode(np.asarray(p, np.float32)) for p in pieces]
    del pieces
    for suffix in encoded[0]:
      tree[fmt.array_name("lm_head", suffix)] = np.ascontiguousarray(
          np.concatenate([e[suffix] for e in encoded]))
  return tree, entry


def default_head_dtype(expert_encoding: encodings.Encoding) -> str:
  """int8 when the experts are quantised (the head is then the largest dense matrix read
  every token), else the checkpoint's dtype."""
  return "keep" if isinstance(expert_encoding, encodings.Float) else "int8"


def convert(src: str, dst: str, expert_dtype: str | None = None, overwrite: bool = False,
            log: Callable[[str], None] = print, group_size: int = 32,
            head_dtype: str | None = None, source=None) -> dict:
  """Converts HF folder `src` into a store at `dst`; returns the manifest.

  source: read the tensors from this object instead of src's *.safetensors (the reading
  interface of SafetensorsFolder; e.g. bench.make_synthetic.GptOssMxfp4Source, which makes
  them on demand); src still gives config.json and any tokenizer.

  expert_dtype: None keeps the source dtype (MXFP4 experts stay MXFP4, as published);
  bf16 | f16 | f32 | int8 (per-row scales) | int4 (groups of `group_size` = 32, 64 or 128
  inputs with one f16 scale each) | mxfp4 (blocks of 32 e2m1 values, one e8m0 scale each).
  head_dtype: the output head's stored compute encoding, int8 | bf16 | keep (the checkpoint's
  dtype); None: int8 when the experts are quantised, else keep.
  """
  cfg_path = os.path.join(src, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{cfg_path} not found: --src must be a Hugging Face model folder "
                          "(config.json plus *.safetensors).")
  with open(cfg_path) as f:
    hf = json.load(f)
  family = families.of_config(hf)
  spec = families.spec_from_hf(hf)
  choices = sorted(set(EXPERT_DTYPE_ALIASES) | set(encodings.names()) | {"int4"})
  if expert_dtype is not None and expert_dtype not in choices:
    raise CheckpointError(f"--expert_dtype={expert_dtype!r} is not supported; choose one of "
                          f"{choices}.")
  if group_size not in encodings.INT4_GROUPS:
    raise CheckpointError(f"--group_size={group_size} is not supported; choose one of "
                          f"{list(encodings.INT4_GROUPS)}.")
  if head_dtype is not None and head_dtype not in HEAD_DTYPES:
    raise CheckpointError(f"--head_dtype={head_dtype!r} is not supported; choose one of "
                          f"{list(HEAD_DTYPES)}.")
  dst = _check_destination(src, dst, overwrite)
  block = (hf.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
  folder = source if source is not None else SafetensorsFolder(src, fp8_block=tuple(block))
  if folder.fp8:
    log(f"{len(folder.fp8)} block-scaled FP8 weights ({list(block)} blocks): dequantised to "
        f"{folder.float_dtype} (experts: to --expert_dtype when given)")
  plan = _plan(family, spec)
  _validate(family, spec, folder, plan, family.ignored_prefixes(hf))

  moe_layers = list(spec.moe_layers)
  first = plan[1 + moe_layers[0]][2]
  src_dtype = (first.source_encoding(folder) or
               folder.dtype(first.source_name(folder)).lower())
  src_dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(src_dtype, src_dtype)
  name = EXPERT_DTYPE_ALIASES.get(expert_dtype, expert_dtype) if expert_dtype else src_dtype
  name = f"int4-g{group_size}" if name == "int4" else name
  try:
    enc = encodings.get(name)
    layout = fmt.expert_arrays(spec, enc)  # also checks that the int4 group divides the widths
  except ValueError as e:
    raise CheckpointError(f"experts ({src_dtype} in the checkpoint) cannot be stored as {name}: "
                          f"{e}") from e

  head_dtype = head_dtype or default_head_dtype(enc)
  head_enc = encodings.get(HEAD_DTYPES[head_dtype]) if HEAD_DTYPES[head_dtype] else None
  _remove_stale_partials(dst)
  tmp = f"{dst}.partial-{os.getpid()}"
  os.makedirs(os.path.join(tmp, fmt.DENSE_DIR))
  try:
    arrays, tensors = {}, {}
    for aname, (tensor, suffix, shape, dtype, tensor_enc) in layout.items():
      full = (len(moe_layers), spec.num_experts, *shape)
      path = os.path.join(fmt.EXPERTS_DIR, aname)
      arrays[aname] = ts.open(fmt.zarr3_spec(os.path.join(tmp, path), full, dtype),
                              create=True).result()
      tensors[aname] = {"path": path, "shape": list(full), "dtype": dtype, "tensor": tensor,
                        "suffix": suffix, "encoding": tensor_enc}
    crc = {aname: [] for aname in layout}
    t0, nbytes = time.perf_counter(), 0
    tables = {}
    for part, dense, experts in plan:
      if part == "globals":
        tree, embedding = _globals(folder, dense, tmp, head_enc)
        nbytes += embedding_bytes(embedding)
        head_name = head_enc.name if head_enc else tree["lm_head"].dtype.name
      else:
        tree = {param: _gather(folder, names) for param, names in dense.items()}
      tables[part] = dense_store.save_part(tmp, part, tree)
      nbytes += sum(a.nbytes for a in tree.values())
      del tree
      if experts is None:
        continue
      for aname in layout:
        crc[aname].append([])
      row = len(crc[next(iter(layout))]) - 1
      for e in range(spec.num_experts):
        for tensor, encoded in experts.read(folder, e, enc).items():
          for suffix, data in encoded.items():
            aname = fmt.array_name(tensor, suffix)
            data = np.ascontiguousarray(data)
            arrays[aname][row, e].write(data).result()
            crc[aname][row].append(zlib.crc32(data))
            nbytes += data.nbytes
      log(f"{part}: {spec.num_experts} experts written, {nbytes / 2**20:.1f} MiB so far, "
          f"{time.perf_counter() - t0:.1f} s")
    manifest = {
        "format": fmt.FORMAT, "version": fmt.VERSION,
        "family": spec.family, "hf_config": hf,
        "dense": {"dir": fmt.DENSE_DIR, "parts": [p for p, _, _ in plan], "tensors": tables},
        "embedding": embedding,
        "head": {"encoding": head_name},
        "experts": {"layers": moe_layers, "encoding": enc.name, "tensors": tensors,
                    "checksum": "crc32", "crc32": crc},
        "tokenizer": _tokenizer(src, tmp, hf, log),
        "chat_template": _chat_template(src, tmp),
        "generation": {"eos_token_ids": _eos_ids(src, spec)},
        "source": {"path": os.path.abspath(src), "expert_dtype": src_dtype},
    }
    fmt.write_manifest(tmp, manifest)  # last: only now is the store valid
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _swap_into_place(tmp, dst)
  log(f"store written to {dst}: {nbytes / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
  return manifest


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("src", None, "Hugging Face model folder (config.json + *.safetensors).")
  flags.DEFINE_string("dst", None, "Store folder to write.")
  flags.DEFINE_string("expert_dtype", None,
                      "Re-encode experts: bf16 | f16 | f32 | int8 | int4 | mxfp4 (default: keep).")
  flags.DEFINE_integer("group_size", 32, "int4 group size: 32, 64 or 128.")
  flags.DEFINE_enum("head_dtype", None, list(HEAD_DTYPES),
                    "Output head's stored encoding (default: int8 when the experts are "
                    "quantised, else keep the checkpoint's dtype).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty destination.")
  flags.mark_flags_as_required(["src", "dst"])


def main(argv) -> None:
  del argv
  cli.run(lambda: convert(FLAGS.src, FLAGS.dst, FLAGS.expert_dtype, FLAGS.overwrite,
                          group_size=FLAGS.group_size, head_dtype=FLAGS.head_dtype))


if __name__ == "__main__":
  define_flags()
  app.run(main)
