r"""Trains the shipped demo model: a small Mixtral on the Python standard library's sources.

  python -m checkpoints_tools.train_demo --out=lazymoe_jax/demo_model [--steps=3000]

Corpus: the `.py` files of the running interpreter's stdlib (no tests, no idlelib), sorted by
path; every 10th file is held out (see corpus.stdlib_corpus). A sentencepiece BPE tokenizer
(byte fallback, identity normalisation) is trained on the training split, then the model with
AdamW. The result is written in Hugging Face Mixtral layout (config.json, model.safetensors in
bfloat16, tokenizer.model), which transformers' MixtralForCausalLM loads as it is.
The math is the HF Mixtral forward (RMSNorm, RoPE, GQA, softmax-top-k-renormalised router,
SwiGLU experts); experts are computed densely during training (all experts on all tokens,
weighted by the sparse routing), which is exact and simple at this size.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from absl import app, flags, logging
from safetensors.numpy import save_file

from checkpoints_tools import corpus
from lazymoe_jax.model.layers import rms_norm, rope
from lazymoe_jax.model.routers import softmax_topk

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("out", "lazymoe_jax/demo_model", "Output folder (HF layout).")
  flags.DEFINE_integer("vocab_size", 2048, "Tokenizer vocabulary.")
  flags.DEFINE_integer("hidden", 256, "Hidden size.")
  flags.DEFINE_integer("layers", 4, "Decoder layers.")
  flags.DEFINE_integer("experts", 8, "Routed experts per layer.")
  flags.DEFINE_integer("top_k", 2, "Experts per token.")
  flags.DEFINE_integer("intermediate", 256, "Expert FFN width.")
  flags.DEFINE_integer("heads", 4, "Query heads.")
  flags.DEFINE_integer("kv_heads", 2, "Key/value heads (GQA).")
  flags.DEFINE_integer("head_dim", 64, "Head dimension.")
  flags.DEFINE_integer("seq_len", 256, "Training context.")
  flags.DEFINE_integer("batch", 16, "Sequences per step.")
  flags.DEFINE_integer("steps", 3000, "Optimizer steps.")
  flags.DEFINE_float("lr", 3e-3, "Peak learning rate (warmup then cosine decay).")
  flags.DEFINE_float("aux_loss", 0.01, "Load-balancing loss weight (Switch-style).")
  flags.DEFINE_float("capacity", 1.25, "Expert capacity factor in training (0: dense, exact).")
  flags.DEFINE_integer("seed", 0, "Seed for init and batch sampling.")
  flags.DEFINE_integer("eval_windows", 64, "Held-out windows of seq_len tokens for perplexity.")
  flags.DEFINE_integer("log_every", 100, "Steps between loss lines.")


FLAGS = flags.FLAGS
ROPE_THETA = 10000.0
EPS = 1e-5


def init_params(key, v, h, n_layers, e, i, hq, hk, d):
  ks = iter(jax.random.split(key, 16))

  def normal(shape, std=0.02):
    return jax.random.normal(next(ks), shape, jnp.float32) * std

  out_std = 0.02 / math.sqrt(2 * n_layers)
  return {
      "embed": normal((v, h)), "final_norm": jnp.ones(h), "lm_head": normal((v, h)),
      "layers": {
          "attn_norm": jnp.ones((n_layers, h)), "mlp_norm": jnp.ones((n_layers, h)),
          "wq": normal((n_layers, hq * d, h)), "wk": normal((n_layers, hk * d, h)),
          "wv": normal((n_layers, hk * d, h)), "wo": normal((n_layers, h, hq * d), out_std),
          "router": normal((n_layers, e, h)),
          "w_gate_up": normal((n_layers, e, 2 * i, h)),
          "w_down": normal((n_layers, e, h, i), out_std),
      },
  }


def _moe(xn, ids, w, w_gate_up, w_down, capacity: float):
  """Sparse dispatch (GShard-style): each expert gets a buffer of C token rows.

  xn [N, H], ids/w [N, k]. C = capacity * N * k / E; picks past an expert's C-th are dropped
  (weight 0) in training only. capacity=0 computes every expert on every token instead (exact).
  """
  n, k = ids.shape
  e = w_gate_up.shape[0]
  i = w_down.shape[-1]
  if not capacity:
    combine = jnp.sum(jax.nn.one_hot(ids, e) * w[..., None], axis=1)  # [N, E]
    gu = jnp.einsum("nh,eoh->eno", xn, w_gate_up)  # [E, N, 2I]
    y = jnp.einsum("eni,ehi->enh", jax.nn.silu(gu[..., :i]) * gu[..., i:], w_down)
    return jnp.einsum("enh,ne->nh", y, combine)
  c = int(math.ceil(capacity * n * k / e))
  flat_e = ids.reshape(-1)  # [N*k], token-major
  flat_tok = jnp.repeat(jnp.arange(n), k)
  onehot = jax.nn.one_hot(flat_e, e, dtype=jnp.int32)
  pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, flat_e[:, None], axis=1)[:, 0]
  keep = pos < c
  pos = jnp.where(keep, pos, c)  # row c is the overflow bin, sliced off below
  buf = jnp.zeros((e, c + 1, xn.shape[-1]), xn.dtype).at[flat_e, pos].set(xn[flat_tok])[:, :c]
  gu = jnp.einsum("ech,eoh->eco", buf, w_gate_up)  # [E, C, 2I]
  y = jnp.einsum("eci,ehi->ech", jax.nn.silu(gu[..., :i]) * gu[..., i:], w_down)
  y = jnp.pad(y, ((0, 0), (0, 1), (0, 0)))
  contrib = y[flat_e, pos] * (w.reshape(-1) * keep)[:, None]  # [N*k, H]
  return jnp.zeros_like(xn).at[flat_tok].add(contrib)


def forward(params, tokens, hk: int, d: int, k: int, capacity: float = 0.0):
  """tokens [B, T] -> logits [B, T, V], load-balancing loss. Legend: N = B*T tokens."""
  b, t = tokens.shape
  x = params["embed"][tokens]  # [B, T, H]
  pos = jnp.arange(t)
  causal = pos[:, None] >= pos[None, :]

  def layer(x, p):
    xn = rms_norm(x, p["attn_norm"], EPS)
    q = (xn @ p["wq"].T).reshape(b, t, -1, d)
    kk = (xn @ p["wk"].T).reshape(b, t, hk, d)
    v = (xn @ p["wv"].T).reshape(b, t, hk, d)
    q = jax.vmap(lambda a: rope(a, pos, ROPE_THETA))(q)
    kk = jax.vmap(lambda a: rope(a, pos, ROPE_THETA))(kk)
    q = q.reshape(b, t, hk, -1, d)  # [B, T, K, G, D]
    s = jnp.einsum("btkgd,bskd->bkgts", q, kk) / math.sqrt(d)
    s = jnp.where(causal, s, -jnp.inf)
    o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, -1)
    x = x + o @ p["wo"].T
    xn = rms_norm(x, p["mlp_norm"], EPS).reshape(b * t, -1)  # [N, H]
    logits = xn @ p["router"].T  # [N, E]
    ids, w = softmax_topk(logits, k, renormalize=True)
    x = x + _moe(xn, ids, w, p["w_gate_up"], p["w_down"], capacity).reshape(b, t, -1)
    e = logits.shape[-1]
    # Switch-Transformer balance: E * sum_e (share of picks) * (mean router prob)
    share = jnp.mean(jnp.sum(jax.nn.one_hot(ids, e), axis=1), axis=0) / k
    aux = e * jnp.sum(share * jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0))
    return x, aux

  x, aux = jax.lax.scan(layer, x, params["layers"])
  logits = rms_norm(x, params["final_norm"], EPS) @ params["lm_head"].T
  return logits, jnp.mean(aux)


def nll(params, tokens, hk, d, k, capacity):
  logits, aux = forward(params, tokens[:, :-1], hk, d, k, capacity)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jnp.mean(ce), aux


def to_hf(params, cfg: dict) -> dict[str, np.ndarray]:
  """Training pytree -> HF Mixtral per-expert tensors in bfloat16."""
  bf16 = lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)  # noqa: E731
  i = cfg["intermediate_size"]
  t = {"model.embed_tokens.weight": bf16(params["embed"]),
       "model.norm.weight": bf16(params["final_norm"]), "lm_head.weight": bf16(params["lm_head"])}
  lp = params["layers"]
  for l in range(cfg["num_hidden_layers"]):
    pre = f"model.layers.{l}."
    t[pre + "input_layernorm.weight"] = bf16(lp["attn_norm"][l])
    t[pre + "post_attention_layernorm.weight"] = bf16(lp["mlp_norm"][l])
    for ours, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
      t[f"{pre}self_attn.{hf}.weight"] = bf16(lp[ours][l])
    t[pre + "block_sparse_moe.gate.weight"] = bf16(lp["router"][l])
    for e in range(cfg["num_local_experts"]):
      ex = f"{pre}block_sparse_moe.experts.{e}."
      t[ex + "w1.weight"] = bf16(lp["w_gate_up"][l, e, :i])
      t[ex + "w3.weight"] = bf16(lp["w_gate_up"][l, e, i:])
      t[ex + "w2.weight"] = bf16(lp["w_down"][l, e])
  return t


def from_hf_rounded(params):
  """The params as the shipped bf16 file holds them (for the held-out figures)."""
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(ml_dtypes.bfloat16),
                                            jnp.float32), params)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  t_start = time.time()
  train_text = corpus.stdlib_corpus(1 << 40)
  held_text = corpus.stdlib_corpus(1 << 40, held_out=True)
  corpus.train_tokenizer(out, FLAGS.vocab_size, train_text[: 8 << 20])
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
  train = np.array(sp.encode(train_text), np.int32)
  held = np.array(sp.encode(held_text), np.int32)
  print(f"corpus: train {len(train_text) / 1e6:.2f} M chars -> {len(train) / 1e6:.2f} M tokens; "
        f"held-out {len(held_text) / 1e6:.2f} M chars -> {len(held) / 1e6:.2f} M tokens", flush=True)

  v, h, nl, e, i = FLAGS.vocab_size, FLAGS.hidden, FLAGS.layers, FLAGS.experts, FLAGS.intermediate
  hq, hk, d, k = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.top_k
  params = init_params(jax.random.PRNGKey(FLAGS.seed), v, h, nl, e, i, hq, hk, d)
  sched = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, min(200, FLAGS.steps // 10),
                                             FLAGS.steps, FLAGS.lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, 0.9, 0.95, weight_decay=0.1))
  state = opt.init(params)

  @jax.jit
  def step(params, state, tokens):
    def loss_fn(p):
      ce, aux = nll(p, tokens, hk, d, k, FLAGS.capacity)
      return ce + FLAGS.aux_loss * aux, (ce, aux)
    (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, ce, aux

  @jax.jit
  def eval_nll(params, tokens):
    logits, _ = forward(params, tokens[:, :-1], hk, d, k)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

  n_eval = FLAGS.eval_windows
  L = FLAGS.seq_len
  held_windows = held[: n_eval * (L + 1)].reshape(n_eval, L + 1)

  def held_out_ppl(p):
    ces = [np.asarray(eval_nll(p, held_windows[j:j + 8])) for j in range(0, n_eval, 8)]
    return float(np.exp(np.mean(np.concatenate(ces))))

  rng = np.random.default_rng(FLAGS.seed)
  curve = []
  t0 = time.time()
  for s in range(1, FLAGS.steps + 1):
    starts = rng.integers(0, len(train) - L - 1, FLAGS.batch)
    batch = np.stack([train[a:a + L + 1] for a in starts])
    params, state, ce, aux = step(params, state, batch)
    if s % FLAGS.log_every == 0 or s == FLAGS.steps:
      ce = float(ce)
      line = {"step": s, "train_loss": round(ce, 4), "aux": round(float(aux), 4),
              "tokens_per_s": round(s * FLAGS.batch * L / (time.time() - t0))}
      if s % (FLAGS.log_every * 5) == 0 or s == FLAGS.steps:
        line["held_out_ppl"] = round(held_out_ppl(params), 3)
      curve.append(line)
      print(json.dumps(line), flush=True)

  # Unigram baseline of the same tokenizer: add-one counts from the training split.
  counts = np.bincount(train, minlength=v).astype(np.float64) + 1.0
  targets = held_windows[:, 1:].reshape(-1)
  unigram_ppl = float(np.exp(-np.mean(np.log(counts / counts.sum())[targets])))
  shipped = from_hf_rounded(params)
  cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
         "vocab_size": v, "hidden_size": h, "intermediate_size": i, "num_hidden_layers": nl,
         "num_attention_heads": hq, "num_key_value_heads": hk, "head_dim": d,
         "num_local_experts": e, "num_experts_per_tok": k, "hidden_act": "silu",
         "max_position_embeddings": L, "rms_norm_eps": EPS,  # the trained context
         "rope_parameters": {"rope_theta": ROPE_THETA, "rope_type": "default"},
         "sliding_window": None, "tie_word_embeddings": False,
         "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16"}
  report = {
      "held_out_tokens": int(targets.size), "held_out_ppl_f32": held_out_ppl(params),
      "held_out_ppl_bf16": held_out_ppl(shipped), "unigram_ppl": unigram_ppl,
      "train_minutes": round((time.time() - t_start) / 60, 1), "curve": curve,
      "flags": {f: FLAGS[f].value for f in ("vocab_size", "hidden", "layers", "experts", "top_k",
                                            "intermediate", "heads", "kv_heads", "head_dim",
                                            "seq_len", "batch", "steps", "lr", "aux_loss", "capacity",
                                            "seed", "eval_windows")},
      "corpus": "CPython stdlib *.py (no test/tests/idlelib/site-packages), sorted paths, "
                "every 10th file held out",
  }
  save_file(to_hf(params, cfg), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>"}, f, indent=2)
  with open(os.path.join(out, "training_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
