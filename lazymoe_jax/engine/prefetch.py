"""Which guessed experts are worth reading: measured at run time, per kind of guess.

Layer l applies the routers of the next MoE layers to its hidden state: a guess of the experts
the d-th MoE layer after l will pick (d = the distance, in MoE layers, counting those the pool
holds whole and no guess is made for), ranked (rank 0 = the top score). Every guess is
recorded, read or not, and scored when its layer routes for real, so the rate at which guesses
of each (kind, distance, rank) are used is known at run time without reading any of them
("prefill" guesses are a prompt's union over its tokens, ranked by the best rank any token
gave). A guess is read only when that measured rate is at least `threshold`:

- on a disk that is the bottleneck, a read that is used saves one demand read later and one
  that is not costs one, so a guess wins on average when used at least half the time: 0.5,
  kept for prefill, whose guesses have a whole layer's compute to land in. A decode guess
  saves a demand read only if it lands before its layer routes, which on a saturated disk
  many do not: measured on the full gpt-oss-120b-shaped model under 8 GB, decode ran as fast
  at 0.75 as at 0.5 while its unused bytes fell from 19% to 8% of all read, so decode's
  threshold is 0.75 (BUILD_NOTES "session 8 ... the full model on a format-5 store");
- until `min_samples` guesses of a kind (at least one) were scored, that kind is not read.

The reads themselves go behind every demand read (store/experts.DemandGate), in pieces, so a
guess only ever uses time the disk would otherwise sit idle; an unneeded guess still in
flight when its layer routes is cancelled (store/pool.ExpertPool.acquire).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

THRESHOLDS = {"prefill": 0.5, "decode": 0.75, "batch": 0.75}  # batch: batched decode steps
MIN_SAMPLES = 32


class PrefetchPolicy:
  """`choose(layer, kind, distance, ranked) -> experts to read`; `observe(layer, experts)`."""

  def __init__(self, threshold: float | dict[str, float] | None = None,
               min_samples: int = MIN_SAMPLES):
    """threshold: one value for every kind of guess, or {kind: value} (default THRESHOLDS)."""
    threshold = dict(THRESHOLDS) if threshold is None else threshold
    for t in threshold.values() if isinstance(threshold, dict) else [threshold]:
      if not 0.0 <= t <= 1.0:
        raise ValueError(f"prefetch threshold={t} must be in [0, 1].")
    self.threshold = threshold
    self.min_samples = min_samples
    self.made: collections.Counter[tuple[str, int, int]] = collections.Counter()
    self.used: collections.Counter[tuple[str, int, int]] = collections.Counter()
    self.read: collections.Counter[tuple[str, int, int]] = collections.Counter()
    self._open: dict[int, list[tuple[tuple[str, int, int], int]]] = {}

  def rate(self, kind: str, distance: int, rank: int) -> float | None:
    """The measured rate at which such guesses were used (None: fewer than min_samples)."""
    key = (kind, distance, rank)
    made = self.made[key]
    return self.used[key] / made if made >= max(1, self.min_samples) else None

  def threshold_for(self, kind: str) -> float:
    t = self.threshold
    if not isinstance(t, dict):
      return t
    if kind not in t:
      raise ValueError(f"no prefetch threshold for guesses of kind {kind!r}: give one for each of "
                       f"{sorted(THRESHOLDS)}.")
    return t[kind]

  def choose(self, layer: int, kind: str, distance: int,
             ranked: Iterable[tuple[int, int]]) -> list[int]:
    """Records the guesses (expert, rank) for `layer`; returns the experts to read, in the
    order given."""
    chosen, threshold = [], self.threshold_for(kind)
    opened = self._open.setdefault(layer, [])
    for expert, rank in ranked:
      key = (kind, distance, rank)
      opened.append((key, int(expert)))
      rate = self.rate(*key)
      if rate is not None and rate >= threshold:
        chosen.append(int(expert))
        self.read[key] += 1
    return chosen

  def observe(self, layer: int, experts: Sequence[int]) -> None:
    """Scores every open guess for `layer` against the experts it really picked."""
    picked = {int(e) for e in experts}
    for key, expert in self._open.pop(layer, []):
      self.made[key] += 1
      self.used[key] += expert in picked

  def table(self) -> list[dict]:
    """Per (kind, distance, rank): guesses made, used rate, guesses read."""
    return [{"kind": k, "distance": d, "rank": r, "made": self.made[(k, d, r)],
             "used_rate": self.used[(k, d, r)] / self.made[(k, d, r)],
             "read": self.read[(k, d, r)]} for (k, d, r) in sorted(self.made)]


def ranked_union(guess_rows) -> list[tuple[int, int]]:
  """[(expert, best rank)] over the rows of a guess [T, width], likeliest ranks first (a row's
  rank-0 experts, then rank 1, ...), each expert once."""
  seen: dict[int, int] = {}
  for rank in range(guess_rows.shape[1]):
    for e in guess_rows[:, rank].tolist():
      seen.setdefault(int(e), rank)
  return list(seen.items())
