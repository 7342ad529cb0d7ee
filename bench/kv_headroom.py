r"""How much better than TurboQuant could a 4-bit KV quantiser be on a model? An MSE bound.

  python -m bench.kv_headroom [--model=STORE] [--windows=16] [--window=256] [--bits=4]

Runs held-out windows through the engine with the float32 cache and reads back the keys and
values every layer stored, per KV head (keys also with RoPE undone: a cache may store keys before
RoPE and rotate them when read, KVQuant-style; RoPE is a rotation, so errors keep their size).
TurboQuant's random rotation makes every coordinate equally important, so its error on the
centered vectors it codes is (mean variance) x D_b, D_b the Lloyd-Max distortion of a coordinate
at b bits. A quantiser adapted to this very data (the covariance's eigenvectors, bits by reverse
water-filling, coding at Shannon's limit for a Gaussian source of that covariance) reaches
(geometric-mean eigenvalue) x 4^-b at high rate. The gain, log4 of the ratio, splits into the
data's structure, log4(AM/GM of the eigenvalues), and ideal coding, log4(D_b / 4^-b) (~0.61 bit
at 4 bits: what entropy-coded vector quantisation could add to any scalar quantiser).

What this bound leaves out: sources that are not Gaussian can be coded below it (the Gaussian is
the hardest source of a given covariance); it bounds the error of the vectors (MSE), not of the
attention or of the top-1 token; bits spread unevenly over layers, heads or tokens.
The demo model's figures are in BUILD_NOTES.md (issue 6).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app, flags

import lazymoe_jax
from checkpoints_tools import corpus, default_model
from lazymoe_jax.kv.turboquant import codebook_mse
from lazymoe_jax.model import layers

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("model", None, "Store directory (default: the shipped demo model).")
  flags.DEFINE_integer("windows", 16, "Held-out windows.")
  flags.DEFINE_integer("window", 256, "Tokens per window.")
  flags.DEFINE_integer("bits", 4, "Bits per coordinate to compare at.")


FLAGS = flags.FLAGS


def cached_kv(engine, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per layer (k [K, T, D], v [K, T, D]) as the float32 cache holds them after a prefill."""
  seq = engine.session(len(ids))
  seq.advance(ids.astype(np.int32))
  cache = seq.cache
  t = len(ids)
  return [(np.asarray(c["k"])[:, :, :t].transpose(0, 2, 1), np.asarray(c["v"])[:, :t])
          for c in cache]


def spectrum(x: np.ndarray) -> tuple[float, float, float]:
  """x [N, D] centered samples -> (mean variance, geometric-mean eigenvalue of the covariance,
  AM/GM of the channel variances)."""
  ev = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 1e-12, None)
  var = np.clip(x.var(0), 1e-12, None)
  return float(var.mean()), float(np.exp(np.log(ev).mean())), float(
      var.mean() / np.exp(np.log(var).mean()))


def gain_bits(mean_var_coded: float, gm_best: float, bits: int, d_b: float) -> float:
  """Bits the adapted quantiser gains over TurboQuant: log4 of the ratio of their errors,
  (mean variance of what TurboQuant codes) x D_b over (geometric-mean eigenvalue) x 4^-b."""
  return float(np.log(mean_var_coded * d_b / (gm_best * 4.0 ** -bits)) / np.log(4.0))


def unrope(engine, k: np.ndarray) -> np.ndarray:
  """k [K, T, D] keys of positions 0..T-1 after RoPE -> before it (rotated back)."""
  r = engine.spec.attention.rope
  kt = jnp.asarray(k.transpose(1, 0, 2))  # [T, K, D]
  pos = -jnp.arange(k.shape[1])
  back = layers.rope(kt, pos, r.theta, layers.rope_inv_freq(r), 1.0 / r.attention_factor)
  return np.asarray(back).transpose(1, 0, 2)


def main(argv) -> None:
  del argv
  engine = lazymoe_jax.load(FLAGS.model or default_model.ensure_default_store(lambda s: None))
  if engine.spec.attention.cache_kind == "latent":
    raise SystemExit("this model caches latents (multi-head latent attention), not keys and "
                     "values: the bound does not apply; choose a model with plain attention.")
  n = FLAGS.window
  ids = np.array(engine.tokenizer.encode(corpus.stdlib_corpus(1 << 17, held_out=True)))
  if len(ids) < FLAGS.windows * n:
    raise SystemExit(f"the held-out text has {len(ids)} tokens: fewer --windows or --window.")
  per_layer: dict[int, list[list[np.ndarray]]] = {}
  for i in range(FLAGS.windows):
    for layer, (k, v) in enumerate(cached_kv(engine, ids[i * n:(i + 1) * n])):
      slot = per_layer.setdefault(layer, [[], [], []])
      kp = unrope(engine, k)
      # centered per window, as TurboQuantKV(center=True) centers each sequence
      for j, x in enumerate((k, kp, v)):
        slot[j].append(x - x.mean(axis=1, keepdims=True))
  b = FLAGS.bits
  d_b = codebook_mse(engine.spec.attention.head_dim, b)  # TurboQuant's distortion per unit of variance
  coding = float(np.log(d_b / 4.0 ** -b) / np.log(4.0))
  print(f"{FLAGS.windows} held-out windows of {n} tokens; at {b} bits TurboQuant's error is "
        f"{d_b:.4f} x mean variance, the Gaussian rate-distortion limit 4^-{b} = {4.0 ** -b:.4f}"
        f" x geometric-mean eigenvalue (ideal coding alone: +{coding:.2f} bit)")
  print("layer head | keys after RoPE: AM/GM eig., AM/GM channels, gain | keys coded before "
        "RoPE: AM/GM eig., gain | values: AM/GM eig., AM/GM channels, gain   (gains in bits)")
  worst = {"k": 0.0, "v": 0.0}
  for layer, (ks, kps, vs) in sorted(per_layer.items()):
    for h in range(ks[0].shape[0]):
      (mk, gk, chk), (mkp, gkp, _), (mv, gv, chv) = (
          spectrum(np.concatenate([x[h] for x in xs])) for xs in (ks, kps, vs))
      g_k, g_kp, g_v = (gain_bits(mk, gk, b, d_b), gain_bits(mk, gkp, b, d_b),
                        gain_bits(mv, gv, b, d_b))
      worst["k"] = max(worst["k"], g_k, g_kp)
      worst["v"] = max(worst["v"], g_v)
      print(f"  {layer:3d} {h:3d}  | {mk / gk:5.2f} {chk:5.2f} {g_k:+.2f} | {mkp / gkp:6.2f} "
            f"{g_kp:+.2f} | {mv / gv:5.2f} {chv:5.2f} {g_v:+.2f}")
  print(f"largest gain over TurboQuant at {b} bits: keys {worst['k']:+.2f}, values "
        f"{worst['v']:+.2f} bits ({coding:.2f} of each from ideal coding): by this bound no "
        f"quantiser does better than TurboQuant at {b + worst['k']:.1f} bits for keys and "
        f"{b + worst['v']:.1f} for values")


if __name__ == "__main__":
  define_flags()
  app.run(main)
