r"""How much better than TurboQuant could any 4-bit KV quantiser be on a model? A bound.

  python -m bench.kv_headroom [--model=STORE] [--windows=16] [--window=256]

Runs held-out windows through the engine with the float32 cache and reads back the keys (after
RoPE) and values every layer stored, per KV head. TurboQuant's random rotation makes every
coordinate equally important, so its error is (mean variance) x D_b, with D_b the Lloyd-Max
distortion of a unit-variance coordinate at b bits. A quantiser adapted to this very data (the
covariance's eigenvectors, bits allocated by reverse water-filling, and coding at Shannon's limit
for a Gaussian source of that covariance) reaches (geometric mean of the eigenvalues) x 4^-b at
high rate. Their ratio, AM/GM x D_b / 4^-b, in bits (log4), is the most any scheme exploiting
second-order structure can gain over TurboQuant at b bits: it prints per layer and head, for
keys (centered, as the cache stores them) and values.

The demo model's figures with these bits are in BUILD_NOTES.md (issue 6): they show why its
99% top-1 target at 4 bits is out of reach here.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

import lazymoe_jax
from checkpoints_tools import corpus, default_model
from lazymoe_jax.kv.turboquant import codebook_mse

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("model", None, "Store directory (default: the shipped demo model).")
  flags.DEFINE_integer("windows", 16, "Held-out windows.")
  flags.DEFINE_integer("window", 256, "Tokens per window.")
  flags.DEFINE_integer("bits", 4, "Bits per coordinate to compare at.")


FLAGS = flags.FLAGS


def cached_kv(engine, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per layer (k [K, T, D], v [K, T, D]) as the float32 cache holds them after a prefill."""
  cache = engine._new_cache(len(ids))  # pylint: disable=protected-access
  _, cache = engine._forward(ids.astype(np.int32), 0, cache)  # pylint: disable=protected-access
  t = len(ids)
  return [(np.asarray(c["k"])[:, :, :t].transpose(0, 2, 1), np.asarray(c["v"])[:, :t])
          for c in cache]


def headroom_bits(x: np.ndarray, bits: int, d_b: float) -> tuple[float, float, float]:
  """x [N, D] centered samples -> (AM/GM of the covariance eigenvalues, AM/GM of the channel
  variances, the bound's gain over TurboQuant in bits)."""
  ev = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 1e-12, None)
  var = np.clip(x.var(0), 1e-12, None)
  am_gm = float(ev.mean() / np.exp(np.log(ev).mean()))
  am_gm_ch = float(var.mean() / np.exp(np.log(var).mean()))
  gain = am_gm * d_b / 4.0 ** -bits
  return am_gm, am_gm_ch, float(np.log(gain) / np.log(4.0))


def main(argv) -> None:
  del argv
  engine = lazymoe_jax.load(FLAGS.model or default_model.ensure_default_store(lambda s: None))
  n = FLAGS.window
  ids = np.array(engine.tokenizer.encode(corpus.stdlib_corpus(1 << 17, held_out=True)))
  per_layer: dict[int, list[list[np.ndarray]]] = {}
  for i in range(FLAGS.windows):
    for layer, (k, v) in enumerate(cached_kv(engine, ids[i * n:(i + 1) * n])):
      slot = per_layer.setdefault(layer, [[], []])
      # centered per window, as TurboQuantKV(center=True) centers each sequence
      slot[0].append(k - k.mean(axis=1, keepdims=True))
      slot[1].append(v - v.mean(axis=1, keepdims=True))
  b = FLAGS.bits
  d = per_layer[0][0][0].shape[-1]
  d_b = codebook_mse(d, b)  # TurboQuant's distortion per unit of variance, at this head dim
  print(f"{FLAGS.windows} held-out windows of {n} tokens; at {b} bits TurboQuant's distortion "
        f"is {d_b:.4f} x mean variance, the Gaussian rate-distortion limit "
        f"4^-{b} = {4.0 ** -b:.4f} x geometric-mean eigenvalue")
  print("layer head | keys: AM/GM eig, AM/GM channels, bound's gain (bits) | values: same")
  worst = 0.0
  for layer, (ks, vs) in sorted(per_layer.items()):
    for h in range(ks[0].shape[0]):
      row = []
      for xs in (ks, vs):
        am_gm, am_gm_ch, gain = headroom_bits(np.concatenate([x[h] for x in xs]), b, d_b)
        worst = max(worst, gain)
        row.append(f"{am_gm:5.2f} {am_gm_ch:5.2f} {gain:+.2f}")
      print(f"  {layer:3d} {h:3d}  | {row[0]} | {row[1]}")
  print(f"largest possible gain over TurboQuant at {b} bits: {worst:.2f} bits, i.e. no quantiser "
        f"of this kind does better than TurboQuant at {b + worst:.1f} bits on this model")


if __name__ == "__main__":
  define_flags()
  app.run(main)
