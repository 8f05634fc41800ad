"""Choosing which examples of a split to keep from their scores (`launch.filter`).

- `select_top`: exactly round(keep * N) examples with the highest scores (ties broken by the lower
  example id, so the choice is a pure function of (scores, ids)); with `balance=True`, the
  round(keep * N) kept are shared among the classes in proportion to their sizes N_c (largest
  remainder, so the total is still exact; a class keeps N_c * round(keep * N) / N rounded down or
  up, which may be one less or one more than round(keep * N_c)), so a filter cannot silently drop
  a class whose examples all score low.
- `select_threshold`: every example with score >= a given threshold.
- `suggest_keep`: the keep fraction a score histogram suggests (the share of its upper cluster).
- `StreamingQuantile`: a threshold from a fixed-size uniform reservoir sample (keyed,
  deterministic) of the scores as they stream by, its (1 - keep) quantile (`launch.filter`
  still holds one float64 score per example; the sketch itself is O(capacity)). The
  kept fraction is then approximate: with a reservoir of m scores the rank error of the threshold
  has standard deviation sqrt(keep * (1 - keep) / m) * N (0.4% of N for m = 16384, keep = 0.5),
  and every example tied at the threshold is kept (tied scores can keep many more).
Online filtering during training is a training policy (`datarater.policies.filtering`).
"""
import math
from typing import Optional

import numpy as np

from datarater.errors import UserError


def check_keep(keep: float) -> float:
  if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
    raise UserError(f'keep fraction must be in (0, 1], got {keep}')
  return float(keep)


def keep_count(num_examples: int, keep: float) -> int:
  """round(keep * N), halves up, at least 1: the exact number of examples `select_top` keeps.
  keep * N is rounded to 9 decimals first: 0.205 * 300 is 61.4999... in binary, a half here."""
  check_keep(keep)
  return max(1, min(num_examples, int(math.floor(round(keep * num_examples, 9) + 0.5))))


def to_unit(values: np.ndarray) -> np.ndarray:
  """`values` (finite float64) times the power of two that puts the largest |value| in [0.5, 1),
  exactly: their squares and sums then neither overflow (at 1e160) nor underflow."""
  top = np.abs(values).max(initial=0.0)
  return np.ldexp(values, -np.frexp(top)[1]) if top > 0 else values


def suggest_keep(scores: np.ndarray) -> float:
  """The share of the upper of two clusters of the scores at Otsu's threshold: of all splits of
  the sorted scores between two distinct values, the one minimising the within-group variance
  (the optimum of 1-D 2-means, found exactly by cumulative sums).

  It assumes no shape per group, so a spike of confidently good scores beside a long tail does
  not make a group of its own, as it does for a 2-component Gaussian mixture (`mimic_filter`).
  """
  s = np.sort(np.asarray(scores, np.float64).ravel())
  if not np.isfinite(s).all():
    raise UserError('scores must be finite to suggest a keep fraction')
  n = s.size
  if n < 2 or s[0] == s[-1]:
    return 1.0
  s = to_unit(s)
  s = (s - s.mean()) / s.std()
  k = np.arange(1, n)                    # the lower group's size at each split
  lower = np.cumsum(s)[:-1]              # its sum; the upper group's is -lower (s sums to 0)
  # Minimising the within-group variance maximises the between-group one, n lower^2 / (k (n-k)).
  between = np.where(s[1:] > s[:-1], lower ** 2 / (k * (n - k)), -np.inf)
  return float(1 - k[np.argmax(between)] / n)


def _rank_order(scores: np.ndarray, ids: Optional[np.ndarray]) -> np.ndarray:
  """Positions sorted by (score descending, id ascending): a total, deterministic order.
  `ids=None`: the ids are the positions (a stable sort of the scores alone)."""
  scores = np.asarray(scores, np.float64)
  if not np.all(np.isfinite(scores)):
    bad = np.flatnonzero(~np.isfinite(scores))[0]
    raise UserError(f'score of example id {int(bad if ids is None else ids[bad])} is not finite')
  if ids is None:
    return np.argsort(-scores, kind='stable')
  return np.lexsort((np.asarray(ids), -scores))


def class_quotas(counts: np.ndarray, total: int) -> np.ndarray:
  """Integers q_c <= counts_c summing to `total`, proportional to counts (largest remainder)."""
  counts = np.asarray(counts, np.int64)
  quota, remainder = np.divmod(counts * total, max(1, counts.sum()))  # in integers: exact ties
  order = np.lexsort((np.arange(len(counts)), -remainder))  # largest remainder, then lower class
  for c in order[:total - quota.sum()]:
    quota[c] += 1
  return np.minimum(quota, counts)


def select_top(scores: np.ndarray, keep: float, ids: Optional[np.ndarray] = None,
               labels: Optional[np.ndarray] = None, num_classes: Optional[int] = None,
               balance: bool = False) -> np.ndarray:
  """Boolean keep-mask of exactly keep_count(N, keep) examples: the highest scores.

  With `balance`, each class c keeps its best-scored examples, as many as its share
  `class_quotas` gives it.
  """
  scores = np.asarray(scores)
  n = len(scores)
  k = keep_count(n, keep)
  mask = np.zeros(n, bool)
  if not balance:
    mask[_rank_order(scores, None if ids is None else np.asarray(ids))[:k]] = True
    return mask
  ids = np.arange(n) if ids is None else np.asarray(ids)
  if labels is None:
    raise UserError('per-class balance needs the labels')
  labels = np.asarray(labels)
  num_classes = int(num_classes or labels.max() + 1)
  quotas = class_quotas(np.bincount(labels, minlength=num_classes), k)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    mask[members[_rank_order(scores[members], ids[members])[:quotas[c]]]] = True
  return mask


def select_threshold(scores: np.ndarray, min_score: float) -> np.ndarray:
  """Keep-mask of every example whose score is >= `min_score`."""
  return np.asarray(scores) >= min_score


class StreamingQuantile:
  """Approximate quantiles of a stream in O(capacity) memory: a uniform reservoir sample.

  Algorithm R with a seeded generator: the same stream in the same chunks gives the same sample.
  """

  def __init__(self, capacity: int = 16384, seed: int = 0):
    self.capacity, self.count = int(capacity), 0
    self.sample = np.empty(self.capacity, np.float64)
    self._rng = np.random.default_rng(seed)

  def update(self, values: np.ndarray) -> None:
    v = np.asarray(values, np.float64).ravel()
    fill = min(len(v), max(0, self.capacity - self.count))  # the reservoir's first entries
    self.sample[self.count:self.count + fill] = v[:fill]
    self.count += fill
    rest = v[fill:]
    if len(rest):  # value i of the rest replaces slot j ~ U{0..count+i} if j < capacity
      j = self._rng.integers(0, self.count + 1 + np.arange(len(rest)))
      hit = np.flatnonzero(j < self.capacity)
      slots, first = np.unique(j[hit][::-1], return_index=True)  # a slot drawn twice: the later
      self.sample[slots] = rest[hit[::-1][first]]
      self.count += len(rest)

  def quantile(self, q: float) -> float:
    if self.count == 0:
      raise UserError('no scores seen: the split is empty')
    return float(np.quantile(self.sample[:min(self.count, self.capacity)], q, method='higher'))

  def keep_threshold(self, keep: float) -> float:
    """The score above which about a `keep` fraction of the stream lies (-inf at keep 1: every
    score, not only those above the sample's lowest)."""
    return -math.inf if check_keep(keep) == 1.0 else self.quantile(1.0 - keep)
