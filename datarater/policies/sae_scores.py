"""Scores in SAE factor space: representativeness, process-level diversity, usage penalty, schedule.

From the codes Z [N, M] (>= 0) of every training example:
- factor frequency f_j = share of examples in which factor j is active; the `high_freq_fraction`
  most frequent factors are the high-frequency set H, the rest are rare, each with a rarity
  rho_j in [0, 1] (0 = least rare, 1 = the rarest that some example uses; a factor no example
  uses gets 1 and weighs nothing);
- representativeness R_i = sum_{j in H} a_ij f_j / max f, with a_i = z_i / |z_i|_1: how much of the
  example is made of common factors (coverage of the high-frequency factors). Class-conditional
  (`labels` given): f, H and max f are those of the examples sharing i's label, so R_i is how
  typical i's factors are *of its labelled class*; a mislabelled example is made of factors common
  in another class and scores low (the feature space becomes noise-aware without any losses);
- diversity D_i(t) = sum_{j rare} a_ij gate_j(t) novelty_j (global frequencies): rare factors are
  let in gradually, the less rare first (gate_j(t) ramps linearly from 0 to 1 over
  t in [rho_j (1 - w), rho_j (1 - w) + w], w = gate_width, t = training progress in [0, 1], so every
  factor is fully in by the end), and factors already trained on a lot count less
  (novelty_j = 1 / (1 + usage_j / mean usage));
- usage penalty U_i = (epochs in which i was selected) / (epochs so far), updated after each epoch;
- label margin A_i = R_i under its own class - max R_i under another class (class-conditional only):
  strongly negative = the example's factors are another class's (likely mislabelled). The
  suspects (`suspected_mislabels`) are either the examples with A_i < -`mislabel_margin` (rule
  `margin`) or, adaptively (rule `confident`), the K lowest-margin examples, where K counts the
  examples that look more like another class than the typical member of that class does (a
  confident-learning estimate of the number of label errors); rule `knn` reads the labels of each
  example's k nearest neighbours in code space instead (cosine similarity): the K examples whose
  own label is rarest among their neighbours, K the confident-learning count of those shares
  (neighbours among a fixed random sample of `mislabel_knn_reference` examples on large splits);
- curriculum: score_i = alpha(t) rank(R)_i + beta(t) rank(D)_i - lambda U_i, with alpha, beta
  moving linearly from their start to end values over training. With class-conditional R, rank(R)
  is the percentile within the example's class. alpha > 0 spends the budget on the most
  representative examples first (the seed article's order); alpha < 0 leaves them out first: their
  factors are covered by the rest of their class, so they are redundant, and the least
  representative are the informative (hard) ones -- the label guard keeps that from favouring
  mislabels;
- label guard (`mislabel_guard`): `penalty` (default) subtracts `mislabel_penalty` from the
  suspects' scores -- a soft guard: the usage penalty, diversity and the Gumbel noise can still
  bring some back; `exclude` ranks every suspect below
  every other example after the noise (`exclude_last`), so suspects are selected only when the
  others cannot fill the budget; `off` ignores the margin.
"""
import concurrent.futures
import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from datarater.errors import UserError
from datarater.policies import ranks


@flax.struct.dataclass
class FactorStats:
  mass: jax.Array        # [N, M] a_ij: each example's share of its code on each factor
  frequency: jax.Array   # [M] f_j over the whole split
  high: jax.Array        # [M] bool: in the (split-wide) high-frequency set
  rarity: jax.Array      # [M] rho_j in [0, 1] for rare factors, 0 for high-frequency ones
  group: jax.Array       # [N] int32: the example's class (class-conditional) or 0
  # [G, M]: f_{j|g} / max f_{.|g} on the high-frequency set of group g, else 0
  rep_weight: jax.Array
  rep_rank: jax.Array    # [N]: percentile of R_i within its group (constant: computed once here)


def _high_and_rarity(freq: jax.Array, high_freq_fraction: float):
  """High-frequency mask (most frequent first) and rarity rank of the other factors, spread
  over [0, 1] by the rare factors some example uses: a factor none uses (an SAE's dead factor,
  often a third of them) carries no mass and gets 1, so it does not take up the latest gates."""
  m = freq.shape[-1]
  rank = ranks.rank(-freq)   # 0 = most frequent; the unused ones last
  num_high = max(1, int(round(high_freq_fraction * m)))
  high = rank < num_high
  num_live = jnp.sum(freq > 0, -1, keepdims=True)
  rarity = jnp.where(high, 0.0, jnp.minimum(
      (rank - num_high) / jnp.maximum(num_live - num_high - 1, 1), 1.0))
  return high, rarity.astype(jnp.float32)


def factor_stats(codes: jax.Array, high_freq_fraction: float, labels=None,
                 num_classes: int = 0) -> FactorStats:
  """Frequencies, high-frequency set and rarity of each factor, from the codes of the dataset.

  With `labels` [N] (ints in [0, num_classes)), representativeness weights are per class.
  """
  if not 0.0 < high_freq_fraction < 1.0:
    raise UserError(f'sae_scores.high_freq_fraction must be in (0, 1), got {high_freq_fraction}')
  codes = jnp.asarray(codes, jnp.float32)
  n = codes.shape[0]
  if labels is None:
    group, num_groups = jnp.zeros(n, jnp.int32), 1
  else:
    labels = np.asarray(labels)
    if labels.shape != (n,) or num_classes <= 0 or labels.min() < 0 or labels.max() >= num_classes:
      raise UserError(f'class-conditional SAE scores need {n} labels in [0, {num_classes}), got '
                      f'shape {labels.shape}' + (f' with range [{labels.min()}, {labels.max()}]'
                                                 if labels.size else ''))
    group, num_groups = jnp.asarray(labels, jnp.int32), num_classes
  return _factor_stats(codes, group, num_groups=num_groups, high_freq_fraction=high_freq_fraction)


@functools.partial(jax.jit, static_argnames=('num_groups', 'high_freq_fraction'))
def _factor_stats(codes, group, *, num_groups: int, high_freq_fraction: float) -> FactorStats:
  """`factor_stats` once its inputs are checked, as one program (op by op: ~100 dispatches)."""
  mass = codes / jnp.maximum(jnp.sum(codes, -1, keepdims=True), 1e-12)
  active = (codes > 0).astype(jnp.float32)
  freq = jnp.mean(active, 0)
  high, rarity = _high_and_rarity(freq, high_freq_fraction)
  members = jax.nn.one_hot(group, num_groups, dtype=jnp.float32)          # [N, G]
  group_freq = (members.T @ active) / jnp.maximum(members.sum(0), 1.0)[:, None]  # [G, M]
  group_high, _ = _high_and_rarity(group_freq, high_freq_fraction)
  peak = jnp.maximum(jnp.max(group_freq, -1, keepdims=True), 1e-12)
  rep_weight = jnp.where(group_high, group_freq / peak, 0.0)
  rep_rank = ranks.grouped_percentile_rank(_representativeness(mass, rep_weight, group), group,
                                           num_groups)
  return FactorStats(mass=mass, frequency=freq, high=high, rarity=rarity, group=group,
                     rep_weight=rep_weight, rep_rank=rep_rank)


def _representativeness(mass, rep_weight, group):
  return jnp.sum(mass * rep_weight[group], -1)


def representativeness(stats: FactorStats) -> jax.Array:
  """R_i: the example's code mass on high-frequency factors (of its group), weighted by
  frequency."""
  return _representativeness(stats.mass, stats.rep_weight, stats.group)


def class_representativeness(stats: FactorStats) -> jax.Array:
  """[N, G]: R_i as if example i were labelled g, for every group g."""
  return stats.mass @ stats.rep_weight.T


def label_margin(stats: FactorStats) -> jax.Array:
  """A_i = R_i under its own class minus its largest R_i under any other class (0 if unlabelled).

  Strongly negative = the example's factors are typical of another class: likely mislabelled.
  """
  num_groups = stats.rep_weight.shape[0]
  if num_groups == 1:
    return jnp.zeros(stats.mass.shape[0], jnp.float32)
  per_class = class_representativeness(stats)
  own = jnp.take_along_axis(per_class, stats.group[:, None], 1)[:, 0]
  mine = jax.nn.one_hot(stats.group, num_groups, dtype=bool)
  return own - jnp.max(jnp.where(mine, -jnp.inf, per_class), 1)


def diversity(stats: FactorStats, factor_usage: jax.Array, progress: jax.Array,
              gate_width: float) -> jax.Array:
  """D_i(t): mass on rare factors unlocked by progress t, discounted by how much each was used."""
  opens = stats.rarity * (1.0 - gate_width)  # factor j's gate ramps 0 -> 1 over [opens_j, +width]
  gate = jnp.clip((progress - opens) / gate_width, 0.0, 1.0)
  novelty = 1.0 / (1.0 + factor_usage / jnp.maximum(jnp.mean(factor_usage), 1e-12))
  return stats.mass @ jnp.where(stats.high, 0.0, gate * novelty)


def usage_penalty(counts: jax.Array, epoch: jax.Array) -> jax.Array:
  """U_i in [0, 1]: the share of past epochs in which example i was selected (0 before any)."""
  return counts.astype(jnp.float32) / jnp.maximum(epoch, 1).astype(jnp.float32)


def curriculum(progress: jax.Array, start: float, end: float) -> jax.Array:
  """A weight moving linearly from `start` (t = 0) to `end` (t = 1)."""
  t = jnp.clip(progress, 0.0, 1.0)
  return (1.0 - t) * start + t * end


GUARDS = ('penalty', 'exclude', 'off')
SUSPECT_RULES = ('margin', 'confident', 'knn')


def confident_joint_errors(per_class: jax.Array, group: jax.Array) -> jax.Array:
  """Number of examples off the diagonal of the confident joint of class scores [N, G].

  Per class c the threshold t_c is the mean score of class c over the examples labelled c (how
  typical of c its own members are). Example i counts as an error when some other class clears its
  threshold (s_i(c) >= t_c) and scores higher than every class that does, its own label included.
  A class no example is labelled with has no threshold and is never confident; another class
  that ties with the label is not higher.
  """
  mine = jax.nn.one_hot(group, per_class.shape[1], dtype=jnp.float32)
  members = jnp.sum(mine, 0)
  thresh = jnp.sum(mine * per_class, 0) / jnp.maximum(members, 1.0)   # [G]
  confident = jnp.where((per_class >= thresh) & (members > 0), per_class, -jnp.inf)
  own = jnp.max(jnp.where(mine > 0, confident, -jnp.inf), 1)       # -inf unless confident
  best_other = jnp.max(jnp.where(mine > 0, -jnp.inf, confident), 1)
  return jnp.sum(best_other > own).astype(jnp.int32)


def confident_error_count(stats: FactorStats) -> jax.Array:
  """Estimated number of label errors (confident-learning style, from class representativeness
  R_i(c)); 0 without labels."""
  if stats.rep_weight.shape[0] == 1:
    return jnp.zeros((), jnp.int32)
  return confident_joint_errors(class_representativeness(stats), stats.group)


def knn_label_shares(stats: FactorStats, k: int, chunk: int = 1024,
                     reference=None, threads: int = 0) -> jax.Array:
  """[N, G]: the share of each group among the labels of each example's k nearest neighbours.

  Neighbours by cosine similarity of the codes (the example itself left out; those tied at the
  k-th similarity share the places left, each counted by its expected share) among the examples
  at the indices `reference` (all N if None), found `chunk` rows at a time so that time is
  O(N * R) and memory O(chunk * R) for R reference examples. The chunks are shared among
  `threads` host threads (0: one per core, at most 8, on the CPU backend, where XLA's top-k runs
  on a single core; 1 elsewhere and under `jit`); every chunk is computed alike, so the result
  does not depend on them.
  """
  n, num_groups = stats.mass.shape[0], stats.rep_weight.shape[0]
  unit = stats.mass / jnp.maximum(jnp.linalg.norm(stats.mass, axis=-1, keepdims=True), 1e-12)
  onehot = jax.nn.one_hot(stats.group, num_groups, dtype=jnp.float32)
  if reference is None:
    reference, ref_unit, ref_onehot = jnp.arange(n), unit, onehot
  else:
    reference = jnp.asarray(reference, jnp.int32)
    ref_unit, ref_onehot = unit[reference], onehot[reference]
  if not 0 < k < reference.shape[0]:
    raise UserError(f'sae_scores.mislabel_knn must be in [1, {reference.shape[0] - 1}] for '
                    f'{reference.shape[0]} reference examples, got {k}')
  chunk = min(chunk, n)
  starts = np.arange(0, n, chunk, dtype=np.int32)
  padded = jnp.pad(unit, ((0, len(starts) * chunk - n), (0, 0)))
  if isinstance(unit, jax.core.Tracer):  # inside a transformation: one program, no threads
    threads = 1
  elif threads <= 0:
    threads = min(os.cpu_count() or 1, 8) if jax.default_backend() == 'cpu' else 1
  threads = min(threads, len(starts))
  per_thread = -(-len(starts) // threads)  # every thread gets as many chunks (one compilation)
  parts = np.resize(starts, threads * per_thread).reshape(threads, per_thread)
  search = lambda part: _knn_chunks(padded, ref_unit, ref_onehot, reference, part, k=k,
                                    chunk=chunk, num_rows=n)
  if threads == 1:
    shares = search(parts[0])
  else:  # each thread waits for its own chunks, so their top-k run at once
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      shares = jnp.concatenate(list(pool.map(lambda p: jax.block_until_ready(search(p)), parts)))
  return shares[:len(starts)].reshape(-1, num_groups)[:n]


def _tie_weights(values, kth, k: int):
  """The places (of k) of each of `values` (a row's similarities, or some of them holding all
  those >= its k-th, `kth`): 1 above it; those tied at it share the places left equally (the
  expected shares of a random pick: picked by index, they would depend on where they lie)."""
  above, tied = values > kth, values == kth
  room = k - jnp.sum(above, -1, keepdims=True)
  return above + tied * (room / jnp.sum(tied, -1, keepdims=True))


STRADDLE_BATCH = 16  # rows whose tie at the k-th reaches past their top k + 1 weighed together


@functools.partial(jax.jit, static_argnames=('k', 'chunk', 'num_rows'))
def _knn_chunks(padded, ref_unit, ref_onehot, reference, starts, *, k: int, chunk: int,
                num_rows: int):
  """[len(starts), chunk, G]: the k-NN label shares of the rows starting at each of `starts`
  (rows from `num_rows` on are padding). A row whose tie at its k-th similarity reaches past its
  top k + 1 is weighed whole, `STRADDLE_BATCH` such rows at a time."""
  def rows(start):
    index = start + jnp.arange(chunk)
    sim = jax.lax.dynamic_slice_in_dim(padded, start, chunk) @ ref_unit.T    # [chunk, R]
    sim = jnp.where(index[:, None] == reference, -jnp.inf, sim)
    # Every neighbour with a weight is among the top k + 1 unless the (k+1)-th ties with the
    # k-th: such a row (it `straddles`) is weighed over all R below.
    top, at = jax.lax.top_k(sim, k + 1)
    # The k-th and (k+1)-th values as minima: a slice of top_k's columns (on CPU) makes XLA sort
    # every row whole, tens of times slower.
    kth = jnp.min(jnp.where(jnp.arange(k + 1) == k, jnp.inf, top), -1, keepdims=True)
    straddles = (jnp.min(top, -1) == kth[:, 0]) & (index < num_rows)
    shares = jnp.sum(_tie_weights(top, kth, k)[..., None] * ref_onehot[at], 1)  # [chunk, G]

    def whole(carry):  # the next STRADDLE_BATCH straddling rows, weighed over all R
      shares, left = carry
      pick = jnp.nonzero(left, size=STRADDLE_BATCH, fill_value=chunk)[0]     # chunk: none
      row = jnp.minimum(pick, chunk - 1)
      weight = _tie_weights(sim[row], kth[row], k)                    # [STRADDLE_BATCH, R]
      mine = jnp.matmul(weight, ref_onehot, precision='highest')
      return shares.at[pick].set(mine, mode='drop'), left.at[pick].set(False, mode='drop')
    shares, _ = jax.lax.while_loop(lambda carry: jnp.any(carry[1]), whole, (shares, straddles))
    return shares / k
  return jax.lax.map(rows, starts)


def knn_reference(num_examples: int, size: int, key: jax.Array):
  """Sorted indices of a uniform sample of `size` examples (None: all, when size is 0 or >= N)."""
  if size < 0:
    raise UserError(f'sae_scores.mislabel_knn_reference must be >= 0, got {size}')
  if size == 0 or size >= num_examples:
    return None
  return jnp.sort(jax.random.choice(key, num_examples, (size,), replace=False))


def config_reference(num_examples: int, cfg):
  """The k-NN reference sample of an `sae_scores` config, drawn with key 0 (so the suspects are a
  function of the codes and labels); None: all examples."""
  return knn_reference(num_examples, cfg.mislabel_knn_reference, jax.random.PRNGKey(0))


def config_suspects(stats: FactorStats, cfg) -> jax.Array:
  """bool [N]: `suspected_mislabels` under an `sae_scores` config's rule and reference sample."""
  return suspected_mislabels(stats, cfg.mislabel_rule, cfg.mislabel_margin,
                             cfg.mislabel_knn,
                             config_reference(stats.mass.shape[0], cfg))


def suspected_mislabels(stats: FactorStats, rule: str = 'margin', margin: float = 0.25,
                        knn: int = 50, reference=None) -> jax.Array:
  """bool [N]: likely mislabelled examples (none without labels).

  `margin`: label margin A_i < -margin. `confident`: the `confident_error_count` examples with the
  lowest margin (the count adapts to the noise level; ties broken by index). `knn`: the
  confident-joint count of the `knn`-nearest-neighbour label shares (neighbours among the
  `reference` indices, all if None), taken lowest own-label share first (ties: lowest margin
  first).
  """
  if rule not in SUSPECT_RULES:
    raise UserError(f'sae_scores.mislabel_rule must be one of {SUSPECT_RULES}, got {rule!r}')
  if stats.rep_weight.shape[0] == 1:
    return jnp.zeros(stats.mass.shape[0], bool)
  if rule != 'knn':
    return _rule_suspects(stats, margin, rule=rule)
  shares = knn_label_shares(stats, knn, reference=reference)
  return _knn_suspects(shares, _label_margin(stats), stats.group)


_label_margin = jax.jit(label_margin)


# Each rule's arithmetic as one program (op by op, each of its ~20 operations would compile alone).
@functools.partial(jax.jit, static_argnames='rule')
def _rule_suspects(stats: FactorStats, margin, *, rule: str) -> jax.Array:
  a = label_margin(stats)
  if rule == 'margin':
    return a < -margin
  order_rank = ranks.rank(a)                              # 0 = lowest margin
  return order_rank < confident_error_count(stats)


@jax.jit
def _knn_suspects(shares, a, group) -> jax.Array:
  own = jnp.take_along_axis(shares, group[:, None], 1)[:, 0]
  order_rank = ranks.inverse_permutation(jnp.lexsort((a, own)))  # 0 = rarest own label
  return order_rank < confident_joint_errors(shares, group)


def exclude_last(score: jax.Array, excluded: jax.Array) -> jax.Array:
  """Priorities (int32, higher first) that put every excluded entry below every other one.

  Top-n of the result = top-n of the non-excluded entries, filled up (in score order) from the
  excluded ones only when fewer than n are not excluded; equal scores in index order, as
  `lax.top_k` takes them. A sort, not a shift of the scores: at scores of ~1e8 a shift by their
  span rounds an excluded entry back up to a tie with the others.
  """
  best_first = jnp.lexsort((-score, excluded.astype(jnp.int32)))
  return score.shape[-1] - 1 - ranks.inverse_permutation(best_first.astype(jnp.int32))


def combined_score(stats: FactorStats, counts, factor_usage, epoch, num_epochs: int, cfg,
                   suspect=None):
  """The selection score of every example at `epoch` (higher = more wanted).

  `suspect` [N] bool (likely mislabels) loses `mislabel_penalty` under the `penalty` guard; the
  `exclude` guard acts on the final (noisy) score in the policy, see `exclude_last`.
  """
  progress = epoch.astype(jnp.float32) / max(num_epochs - 1, 1)
  alpha = curriculum(progress, cfg.rep_weight_start, cfg.rep_weight_end)
  beta = curriculum(progress, cfg.div_weight_start, cfg.div_weight_end)
  div = ranks.percentile_rank(diversity(stats, factor_usage, progress, cfg.gate_width))
  score = alpha * stats.rep_rank + beta * div - cfg.usage_penalty * usage_penalty(counts, epoch)
  if suspect is not None and cfg.mislabel_guard == 'penalty':
    score = score - cfg.mislabel_penalty * suspect
  return score
