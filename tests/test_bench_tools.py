"""The measuring tools the benchmarks rely on: the oracle cache bound, the disk-busy clock and the
KV quantiser headroom bound."""

import functools
import itertools

import numpy as np

from bench.cache_policies import oracle_hit_rate
from bench.kv_headroom import gain_bits, spectrum
from lazymoe_jax.store.experts import BusyClock


def _best_possible_hits(seq: list[int], slots: int) -> int:
  """Exhaustive search over every eviction choice (single-key requests)."""
  @functools.lru_cache(maxsize=None)
  def best(i: int, resident: frozenset) -> int:
    if i == len(seq):
      return 0
    k = seq[i]
    if k in resident:
      return 1 + best(i + 1, resident)
    if len(resident) < slots:
      return best(i + 1, resident | {k})
    return max(best(i + 1, (resident - {v}) | {k}) for v in resident)
  return best(0, frozenset())


def test_oracle_hand_computed():
  # pool of 2: a b a c a b -> a, b miss; a hit; c evicts b (used later than a); a hit; b miss
  acquires = [[(0, e)] for e in (1, 2, 1, 3, 1, 2)]
  assert oracle_hit_rate(acquires, 2) == 2 / 6
  assert oracle_hit_rate(acquires, 3) == 3 / 6
  # only the marked acquires count; the others warm the pool
  assert oracle_hit_rate(acquires, 2, [False, False, True, True, True, True]) == 2 / 4
  # an acquire larger than the pool goes in waves, as the engine's prefill does
  assert oracle_hit_rate([[(0, e) for e in range(5)]] * 2, 2) == 0.0


def test_oracle_equals_exhaustive_optimum():
  rng = np.random.default_rng(0)
  for _ in range(30):
    seq = [int(x) for x in rng.integers(0, 5, 10)]
    slots = int(rng.integers(1, 4))
    hits = oracle_hit_rate([[(0, e)] for e in seq], slots) * len(seq)
    assert round(hits) == _best_possible_hits(seq, slots), (seq, slots)


def _best_grouped_hits(acquires: list[list[tuple[int, int]]], slots: int) -> int:
  """Exhaustive optimum when each acquire's keys must be resident together (in waves of
  `slots` when larger than the pool): after a wave, keep any subset of the rest."""
  waves = [tuple(a[w0:w0 + slots]) for a in acquires for w0 in range(0, len(a), slots)]

  @functools.lru_cache(maxsize=None)
  def best(i: int, resident: frozenset) -> int:
    if i == len(waves):
      return 0
    keys = frozenset(waves[i])
    others = sorted(resident - keys)
    keep = min(slots - len(keys), len(others))
    return len(keys & resident) + max(best(i + 1, keys | frozenset(k))
                                      for k in itertools.combinations(others, keep))
  return best(0, frozenset())


def test_oracle_equals_exhaustive_optimum_for_grouped_acquires_and_waves():
  rng = np.random.default_rng(1)
  for trial in range(200):
    slots, k, n = int(rng.integers(2, 5)), int(rng.integers(1, 3)), int(rng.integers(3, 9))
    acquires = [[(0, int(e)) for e in rng.choice(6, k, replace=False)] for _ in range(n)]
    if trial % 4 == 0:  # one acquire larger than the pool: waves
      acquires[int(rng.integers(0, n))] = [(0, int(e)) for e in
                                           sorted(rng.choice(6, slots + 1, replace=False))]
    total = sum(len(a) for a in acquires)
    assert round(oracle_hit_rate(acquires, slots) * total) == _best_grouped_hits(
        acquires, slots), (acquires, slots)


def test_busy_clock_counts_the_union_of_overlapping_reads():
  now = [0.0]
  clock = BusyClock(clock=lambda: now[0])
  for t, op in ((0, "start"), (1, "start"), (3, "stop"), (4, "stop"),  # [0, 4]: 4 s, not 3 + 2
                (6, "start")):  # idle 4..6 not counted
    now[0] = t
    getattr(clock, op)()
  now[0] = 7.5
  assert clock.seconds() == 5.5  # a read in flight counts up to now
  clock.stop()
  now[0] = 9
  assert clock.seconds() == 5.5


def test_kv_headroom_bound():
  # eigenvalues 1 and 4 in a rotated basis, channel variances both 2.5: geometric mean 2,
  # channels' AM/GM 1; gain = log4(2.5 * D_b / (2 * 4^-b))
  rng = np.random.default_rng(0)
  z = rng.standard_normal((200_000, 2)) * np.array([1.0, 2.0])
  c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
  x = z @ np.array([[c, -s], [s, c]])
  mean_var, gm, am_gm_ch = spectrum(x - x.mean(0))
  assert abs(mean_var - 2.5) < 0.02 and abs(gm - 2.0) < 0.02 and abs(am_gm_ch - 1.0) < 0.01
  assert abs(gain_bits(mean_var, gm, 4, 0.0095) - np.log(1.25 * 0.0095 * 256) / np.log(4)) < 0.01
  assert gain_bits(1.0, 1.0, 4, 4.0 ** -4) == 0.0  # no structure, ideal coding: no gain
