"""Choosing which examples to keep from their scores, offline and inside an input pipeline.

Offline (a whole split, `launch.filter`):
- `select_top`: exactly round(keep * N) examples with the highest scores (ties broken by the lower
  example id, so the choice is a pure function of (scores, ids)); with `balance=True`, every class
  keeps its share round(keep * N_c) (largest-remainder rounding so the total is still exact), so a
  filter cannot silently drop a class whose examples all score low.
- `select_threshold`: every example with score >= a given threshold.
- `StreamingQuantile`: for splits whose scores do not fit in memory, a fixed-size uniform reservoir
  sample (keyed, deterministic) of the scores seen; its (1 - keep) quantile is the threshold. The
  kept fraction is then approximate: with a reservoir of m scores the rank error of the threshold
  has standard deviation sqrt(keep * (1 - keep) / m) * N (0.4% of N for m = 16384, keep = 0.5).

Online (the two ways the DataRater paper deploys a rater), as iterator -> iterator steps that any
training loop can stack with `compose`:
- `BatchFilter`: draw M = ceil(N / (1 - rho)) examples, score them, keep the N best.
- `AcceptanceFilter`: accept each arriving example with the probability that it would survive
  batch-level filtering, computed from its score's rank among the last `window` scores; accepted
  examples are re-batched into batches of N.
"""
import math
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from datarater.errors import UserError

Batch = dict  # numpy arrays with a leading batch axis; must hold 'label'
ScoreFn = Callable[[Batch], np.ndarray]


def check_keep(keep: float) -> float:
  if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
    raise UserError(f'keep fraction must be in (0, 1], got {keep}')
  return float(keep)


def keep_count(num_examples: int, keep: float) -> int:
  """round(keep * N), at least 1: the exact number of examples `select_top` keeps."""
  check_keep(keep)
  return max(1, min(num_examples, int(math.floor(keep * num_examples + 0.5))))


def _rank_order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Positions sorted by (score descending, id ascending): a total, deterministic order."""
  scores = np.asarray(scores, np.float64)
  if not np.all(np.isfinite(scores)):
    bad = int(np.asarray(ids)[~np.isfinite(scores)][0])
    raise UserError(f'score of example id {bad} is not finite')
  return np.lexsort((np.asarray(ids), -scores))


def class_quotas(counts: np.ndarray, total: int) -> np.ndarray:
  """Integers q_c <= counts_c summing to `total`, proportional to counts (largest remainder)."""
  counts = np.asarray(counts, np.int64)
  exact = counts * (total / max(1, counts.sum()))
  quota = np.floor(exact).astype(np.int64)
  order = np.lexsort((np.arange(len(counts)), -(exact - quota)))  # largest remainder first
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
  ids = np.arange(n) if ids is None else np.asarray(ids)
  k = keep_count(n, keep)
  mask = np.zeros(n, bool)
  if not balance:
    mask[_rank_order(scores, ids)[:k]] = True
    return mask
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
    for v in np.asarray(values, np.float64).ravel():
      if self.count < self.capacity:
        self.sample[self.count] = v
      else:
        j = self._rng.integers(0, self.count + 1)
        if j < self.capacity:
          self.sample[j] = v
      self.count += 1

  def quantile(self, q: float) -> float:
    if self.count == 0:
      raise UserError('no scores seen: the split is empty')
    return float(np.quantile(self.sample[:min(self.count, self.capacity)], q, method='higher'))

  def keep_threshold(self, keep: float) -> float:
    """The score above which about a `keep` fraction of the stream lies."""
    return self.quantile(1.0 - check_keep(keep))


# ----------------------------------------------------------------------------- online filtering


def top_k_in_batch(scores: jax.Array, n: int) -> jax.Array:
  """Indices of the n highest scores of a batch (jittable; ties -> lower index)."""
  return jax.lax.top_k(scores, n)[1]


def survival_probability(rank_fraction: jax.Array, rho: float, batch_size: int) -> jax.Array:
  """P(an example survives batch-level filtering) given the fraction u of scores below its own.

  In a batch of M = ceil(N / (1 - rho)), it survives if fewer than N of the other M - 1 examples
  score higher; that count is Binomial(M - 1, 1 - u), so P = I_u(M - N, N) (regularised beta).
  """
  m = filtered_batch_source_size(batch_size, rho)
  if m == batch_size:
    return jnp.ones_like(rank_fraction)
  return jax.scipy.special.betainc(float(m - batch_size), float(batch_size),
                                   jnp.clip(rank_fraction, 0.0, 1.0))


def filtered_batch_source_size(batch_size: int, rho: float) -> int:
  """M = ceil(N / (1 - rho)) examples drawn per filtered batch of N."""
  if not 0 <= rho < 1:
    raise UserError(f'filter rate rho must be in [0, 1), got {rho}')
  return int(math.ceil(batch_size / (1.0 - rho) - 1e-9))


def _take(batch: Batch, idx: np.ndarray) -> Batch:
  return {k: np.asarray(v)[idx] for k, v in batch.items()}


class BatchFilter:
  """Input-pipeline step: batches of M = ceil(N / (1 - rho)) -> their N best-scored examples.

  Counts the examples it scored (`scored`) so training can report the scoring compute.
  """

  def __init__(self, score_fn: ScoreFn, rho: float, batch_size: int):
    self.score_fn, self.rho, self.batch_size = score_fn, rho, batch_size
    self.source_batch_size = filtered_batch_source_size(batch_size, rho)
    self.scored = 0

  def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
    for batch in batches:
      scores = np.asarray(self.score_fn(batch))
      self.scored += len(scores)
      order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
      yield _take(batch, np.sort(order[:self.batch_size]))


class AcceptanceFilter:
  """Input-pipeline step: accept each example with its batch-filter survival probability.

  The probability uses the rank of its score among the last `window` scores seen (itself
  included; a batch's scores join the window together); until the window holds `warmup` scores
  every example is accepted.
  Randomness comes from `seed` only. Accepted examples are re-batched into batches of N.
  """

  def __init__(self, score_fn: ScoreFn, rho: float, batch_size: int, window: int = 1024,
               warmup: int = 64, seed: int = 0):
    filtered_batch_source_size(batch_size, rho)  # validates rho
    self.score_fn, self.rho, self.batch_size = score_fn, rho, batch_size
    self.window, self.warmup = window, warmup
    self.rng = np.random.default_rng(seed)
    self.recent = np.empty(0, np.float64)
    self.scored = self.accepted = 0

  def accept_probabilities(self, scores: np.ndarray) -> np.ndarray:
    """Adds `scores` to the window and returns each one's acceptance probability."""
    scores = np.asarray(scores, np.float64)
    self.recent = np.concatenate([self.recent, scores])[-self.window:]
    if len(self.recent) < self.warmup:
      return np.ones(len(scores))
    ordered = np.sort(self.recent)
    below = np.searchsorted(ordered, scores, 'left')
    ties = np.searchsorted(ordered, scores, 'right') - below - 1  # others with the same score
    u = (below + 0.5 * ties) / (len(ordered) - 1)
    return np.asarray(survival_probability(jnp.asarray(u, jnp.float32), self.rho,
                                           self.batch_size), np.float64)

  def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
    pending: list[Batch] = []
    have = 0
    for batch in batches:
      scores = np.asarray(self.score_fn(batch))
      self.scored += len(scores)
      accept = self.rng.random(len(scores)) < self.accept_probabilities(scores)
      self.accepted += int(accept.sum())
      pending.append(_take(batch, np.flatnonzero(accept)))
      have += int(accept.sum())
      while have >= self.batch_size:
        joined = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        yield _take(joined, np.arange(self.batch_size))
        pending = [_take(joined, np.arange(self.batch_size, have))]
        have -= self.batch_size


def compose(*steps: Callable[[Iterable[Batch]], Iterator[Batch]]):
  """Chains iterator -> iterator pipeline steps left to right."""
  def run(batches: Iterable[Batch]) -> Iterator[Batch]:
    for step in steps:
      batches = step(batches)
    return iter(batches)
  return run
