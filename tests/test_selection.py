"""Selection policies: exact budgets, InfoBatch rescaling, SAE scores, usage penalty flattens counts."""
import fractions
import itertools
import json
import math
import os
import shlex
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.selection import get_config
from datarater import tasks
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.policies import PolicyContext, make_policy
from datarater.policies import sae_scores as scores
from datarater.policies import selection as policies
from datarater.policies import ranks
from datarater.policies.ranks import percentile_rank
from datarater.policies.selection import gini, init_state, record_epoch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from tests import forked
from tests.conftest import digits_data


def synthetic_codes(n=300, factors=24, active=3, seed=0):
  """Non-negative sparse codes whose factor frequencies fall off (a few common, many rare)."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, factors + 1)
  codes = np.zeros((n, factors), np.float32)
  for i in range(n):
    codes[i, rng.choice(factors, active, replace=False, p=p / p.sum())] = rng.uniform(0.5, 1.5, active)
  return codes


def class_codes(n=600, classes=3, factors_per_class=6, shared=6, active=3, flip=0.15, seed=0):
  """Codes whose active factors come from the example's true class (plus shared rare factors).

  Returns (codes, seen labels, flipped mask): a `flip` share of labels is changed to another class,
  as symmetric label noise would, so the flipped examples' factors are those of a different class.
  """
  rng = np.random.default_rng(seed)
  m = classes * factors_per_class + shared
  true = rng.integers(0, classes, n)
  codes = np.zeros((n, m), np.float32)
  p = 1.0 / np.arange(1, factors_per_class + 1)
  for i in range(n):
    own = true[i] * factors_per_class + rng.choice(factors_per_class, active, replace=False,
                                                   p=p / p.sum())
    codes[i, own] = rng.uniform(0.5, 1.5, active)
    if rng.uniform() < 0.3:  # a rare factor shared by all classes
      codes[i, classes * factors_per_class + rng.integers(shared)] = rng.uniform(0.5, 1.5)
  flipped = rng.uniform(size=n) < flip
  labels = np.where(flipped, (true + rng.integers(1, classes, n)) % classes, true).astype(np.int32)
  return codes, labels, flipped


def run_selection(policy, num, epochs, seed=0, losses=None):
  """select/update for `epochs` epochs without training; returns the final state."""
  state = policy.init(num, jax.random.PRNGKey(seed))
  select, update = jax.jit(policy.select), jax.jit(policy.update)
  for _ in range(epochs):
    idx, w, state = select(policy.aux, state)
    l = jnp.zeros(idx.shape) if losses is None else jnp.asarray(losses)[idx]
    state = update(policy.aux, state, idx, w, l)
  return state


def _draws(policy, state, keys):
  """policy.select of `state` under each of `keys`, vmapped, as one compiled program (op by op,
  each of a selection's dozens of operations compiled alone)."""
  return jax.jit(jax.vmap(lambda k: policy.select(policy.aux, state.replace(key=k))))(keys)


# The score functions under test, each one compiled program (the policies run them traced).
diversity = jax.jit(scores.diversity)
representativeness, label_margin = jax.jit(scores.representativeness), jax.jit(
    scores.label_margin)
grouped_percentile_rank = jax.jit(ranks.grouped_percentile_rank, static_argnums=2)


def test_gini_is_the_mean_absolute_difference_over_twice_the_mean():
  """Gini = sum_ij |x_i - x_j| / (2 n^2 mean x), every pair by brute force in float64: 0 for
  equal counts, (n - 1) / n with all on one example, and every count vector in between."""
  rng = np.random.default_rng(0)
  for counts in (np.full(10, 3), np.eye(10)[0], np.arange(10), rng.integers(0, 9, 37),
                 rng.permutation(np.r_[np.zeros(20), rng.integers(1, 50, 13)])):
    x = np.asarray(counts, np.float64)
    want = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    assert gini(counts) == pytest.approx(want, abs=1e-12), counts
  assert gini(np.eye(10)[0]) == pytest.approx(0.9)
  assert gini(np.zeros(5)) == 0.0 and gini([]) == 0.0


def test_budget_is_the_decimal_ratio_times_n_rounded_halves_to_even():
  """Against exact rational arithmetic on the ratio as written: float error in ratio * N must
  not move a half (0.7 * 45 = 31.5 exactly, 31.4999... in binary)."""
  for percent in range(1, 101):
    ratio = float(fractions.Fraction(percent, 100))
    for num in range(1, 200):
      exact = fractions.Fraction(percent, 100) * num
      assert policies.num_selected(num, ratio) == max(1, round(exact)), (ratio, num)


@pytest.mark.parametrize('name', ['random', 'infobatch', 'sae'])
@pytest.mark.parametrize('ratio', [0.3, 0.7])
def test_exact_budget_of_distinct_examples(name, ratio):
  num = 300
  cfg = get_config()
  codes = synthetic_codes(num)
  policy = {'random': lambda: policies.random(num, ratio),
            'infobatch': lambda: policies.infobatch(num, ratio),
            'sae': lambda: policies.sae(codes, ratio, 10, cfg.sae_scores)}[name]()
  state = policy.init(num, jax.random.PRNGKey(0))
  state = state.replace(losses=jnp.asarray(np.random.default_rng(0).uniform(size=num), jnp.float32))
  select = jax.jit(policy.select)  # as the trainer runs it (eager, sae's took seconds)
  idx, w, state2 = select(policy.aux, state)
  assert idx.shape == (round(ratio * num),) == w.shape
  assert len(np.unique(idx)) == len(idx) and idx.min() >= 0 and idx.max() < num
  assert not np.array_equal(state.key, state2.key)  # randomness is consumed, not reused
  again, _, _ = select(policy.aux, state)
  np.testing.assert_array_equal(idx, again)          # same state -> same selection


def test_random_draws_a_fresh_uniform_subset_each_epoch():
  """Over 400 epochs each example is picked in a fraction `ratio` of them (binomial bound), and
  no two consecutive epochs pick the same subset."""
  num, ratio, epochs = 300, 0.3, 400
  policy = policies.random(num, ratio)
  select = jax.jit(lambda state: policy.select(policy.aux, state))
  state, picked, last = init_state(num, jax.random.PRNGKey(0)), np.zeros(num), None
  for _ in range(epochs):
    idx, _, state = select(state)
    idx = np.sort(np.asarray(idx))
    assert last is None or not np.array_equal(idx, last)
    picked[idx], last = picked[idx] + 1, idx
  assert np.abs(picked / epochs - ratio).max() < 5 * np.sqrt(ratio * (1 - ratio) / epochs)


def test_full_selects_everything_once():
  idx, w, _ = policies.full(50).select(None, init_state(50, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(idx, np.arange(50))
  np.testing.assert_array_equal(w, np.ones(50))


@pytest.mark.parametrize('case,max_prune', [('below_mean', 0.8), ('widened', 0.8),
                                             ('unseen', 0.8), ('widened_unseen', 0.8),
                                             ('widened', 0.7)])
def test_infobatch_prunes_only_low_loss_and_rescales(case, max_prune):
  """InfoBatch's rule by brute force: candidates are the losses below the mean of the examples
  seen (widened, when fewer, to the fewest lowest losses c with (N - n) / c <= max_prune_prob,
  those not yet seen last: 150 at 0.8, 172 at 0.7 (171 would prune with p > 0.7)); each draw
  prunes exactly N - n of them, each candidate with probability (N - n) / #candidates over draws,
  and rescales the kept candidates by 1 / (1 - p). An example not yet trained on is never below
  the mean (its stored loss, 0, is no loss seen)."""
  num, ratio, draws = 400, 0.7, 400
  rng = np.random.default_rng(1)
  if case.startswith('below_mean') or case == 'unseen':  # ~250 below the mean: more than 150
    losses = rng.exponential(size=num)
  else:  # 40 below the mean (9.5): widened to the lowest 150
    losses = np.concatenate([np.linspace(0.01, 0.1, 40), np.linspace(10, 11, num - 40)])
    losses = rng.permutation(losses)
  seen = np.ones(num, bool)
  if case.endswith('unseen'):  # 30 of the lowest 60 not trained on yet
    seen[rng.choice(np.argsort(losses)[:60], 30, replace=False)] = False
  losses = np.where(seen, losses, 0).astype(np.float32)
  pruned = num - round(num * ratio)
  need = next(c for c in range(pruned, num + 1) if pruned <= max_prune * c)
  mean = losses[seen].astype(np.float64).mean()
  below = np.flatnonzero(seen & (losses < mean))
  by_loss = np.argsort(np.where(seen, losses, np.inf), kind='stable')
  widened = case.startswith('widened')
  assert (len(below) < need) == widened
  candidates = below if not widened else by_loss[:need]
  assert seen[candidates].all()
  prob = pruned / len(candidates)
  assert prob <= max_prune
  policy = policies.infobatch(num, ratio, max_prune_prob=max_prune)
  state = init_state(num, jax.random.PRNGKey(3)).replace(
      losses=jnp.asarray(losses), counts=jnp.asarray(seen, jnp.int32))
  keys = jax.random.split(jax.random.PRNGKey(4), draws)
  idx, w, _ = _draws(policy, state, keys)
  times_pruned = np.zeros(num)
  for i, wi in zip(np.asarray(idx), np.asarray(w)):
    out = np.setdiff1d(np.arange(num), i)
    assert len(i) == len(set(i)) == num - pruned and set(out) <= set(candidates)
    want = np.where(np.isin(i, candidates), 1 / (1 - prob), 1.0)
    np.testing.assert_allclose(wi, want, rtol=1e-6)
    times_pruned[out] += 1
  assert not times_pruned[np.setdiff1d(np.arange(num), candidates)].any()
  bound = 5 * np.sqrt(prob * (1 - prob) / draws)
  assert np.abs(times_pruned[candidates] / draws - prob).max() < bound


def test_infobatch_ranks_equal_losses_in_a_random_order():
  """With every loss equal, or none seen (epoch 0), each example is kept with probability n / N
  wherever it lies in the split (float32 losses of 4.0: a tie-break added to the losses would be
  rounded away)."""
  num, ratio, draws = 200, 0.3, 400
  policy = policies.infobatch(num, ratio, max_prune_prob=0.8)
  for state in (init_state(num, jax.random.PRNGKey(0)),
                init_state(num, jax.random.PRNGKey(0)).replace(
                    counts=jnp.ones(num, jnp.int32), losses=jnp.full(num, 4.0, jnp.float32))):
    _equal_keep_rates(policy, state, num, draws)


def test_infobatch_candidates_below_the_exact_mean_of_tied_losses():
  """Losses tied at their exact mean (all equal; or a third of them halfway between two equally
  common values) are not below it, at values whose float32 sum rounds the mean either way: the
  candidates are the losses below the exact rational mean (widened to the fewest allowed), so
  the kept candidates weigh 1 / (1 - (N - n) / #candidates)."""
  v, d = np.float32(0.3), np.float32(2.0 ** -10)
  cases = {(100, 0.5): [np.full(100, x, np.float32) for x in (0.1, 0.3, 0.7, 1.1, 2.3)],
           (300, 0.9): [np.repeat(np.array([v - d, v, v + d], np.float32), 100),
                        np.full(300, 0.3, np.float32)]}
  for (num, ratio), tied in cases.items():
    policy = policies.infobatch(num, ratio, max_prune_prob=0.8)
    select = jax.jit(policy.select)
    pruned = num - policy.num_selected
    for losses in tied:
      mean = sum(map(fractions.Fraction, losses.tolist())) / num
      assert fractions.Fraction(float(np.float32(mean))) == mean  # a float32 value: ties exist
      below = sum(fractions.Fraction(x) < mean for x in losses.tolist())
      candidates = max(below, math.ceil(pruned / 0.8))
      state = init_state(num, jax.random.PRNGKey(0)).replace(
          counts=jnp.ones(num, jnp.int32), losses=jnp.asarray(losses))
      idx, w, _ = select(policy.aux, state)
      out = np.setdiff1d(np.arange(num), np.asarray(idx))
      assert losses[out].max() <= np.sort(losses)[candidates - 1], (num, losses[0])
      np.testing.assert_allclose(w.max(), 1 / (1 - pruned / candidates), rtol=1e-6,
                                 err_msg=f'{losses[0]} x {num}')


def _equal_keep_rates(policy, state, num, draws):
  keys = jax.random.split(jax.random.PRNGKey(1), draws)
  idx, _, _ = _draws(policy, state, keys)
  kept = np.zeros((draws, num))
  kept[np.arange(draws)[:, None], np.asarray(idx)] = 1
  share = policy.num_selected / num
  freq = kept.mean(0)
  assert np.abs(freq - share).max() < 5 * np.sqrt(share * (1 - share) / draws)
  np.testing.assert_allclose(freq.reshape(4, -1).mean(1), share, atol=0.02)  # by quarter


def test_record_epoch_counts_only_weighted_and_drops_padding():
  state = init_state(5, jax.random.PRNGKey(0), num_factors=2)
  codes = jnp.asarray([[1., 0.], [0., 2.], [1., 1.], [0., 0.], [3., 0.]])
  idx = jnp.asarray([0, 1, 4, 5, 5])  # 5 = padding
  w = jnp.asarray([1., 0., 2., 0., 0.])
  state = record_epoch({'codes': codes}, state, idx, w, jnp.asarray([.1, .2, .3, .4, .5]))
  np.testing.assert_array_equal(state.counts, [1, 0, 0, 0, 1])
  np.testing.assert_allclose(state.losses, [.1, 0., 0., 0., .3])
  np.testing.assert_allclose(state.factor_usage, [4., 0.])
  assert int(state.epoch) == 1


def test_representativeness_favours_common_factors_and_diversity_opens_gradually():
  codes = synthetic_codes(500, factors=20)
  stats = scores.factor_stats(jnp.asarray(codes), 0.5)
  freq = np.asarray(stats.frequency)
  common, rarest = int(np.argmax(freq)), int(np.argmin(np.where(freq > 0, freq, 9)))
  one_hot = jnp.asarray(np.eye(20, dtype=np.float32)[[common, rarest]])
  probe = stats.replace(mass=one_hot, group=jnp.zeros(2, jnp.int32))
  rep = np.asarray(representativeness(probe))
  assert rep[0] == pytest.approx(1.0) and rep[1] == 0.0
  usage = jnp.zeros(20)
  early = np.asarray(diversity(probe, usage, jnp.asarray(0.0), 0.15))
  late = np.asarray(diversity(probe, usage, jnp.asarray(1.0), 0.15))
  assert early[0] == late[0] == 0.0           # common factors carry no diversity
  assert late[1] == pytest.approx(1.0) and early[1] == 0.0    # the rarest factor comes in only late
  used = usage.at[rarest].set(10.0)
  assert diversity(probe, used, jnp.asarray(1.0), 0.15)[1] < late[1]
  # Every factor alone, unused, over a grid of progress: the high-frequency set is the most
  # frequent half and carries nothing; rare factors open in order of frequency (the more frequent
  # first), each gate rising over time from 0 to 1, the least rare open by t = 0.15 and the rarest
  # closed until 0.85.
  each = stats.replace(mass=jnp.eye(20), group=jnp.zeros(20, jnp.int32))
  high = np.asarray(stats.high)
  assert high.sum() == 10 and freq[high].min() >= freq[~high].max()
  grid = np.linspace(0, 1, 41)
  gates = np.stack([np.asarray(diversity(each, usage, jnp.asarray(t), 0.15)) for t in grid])
  assert not gates[:, high].any() and gates.min() == 0.0 and gates.max() == pytest.approx(1.0)
  assert (np.diff(gates, axis=0) >= -1e-6).all()  # no gate closes as progress grows
  rare = np.flatnonzero(~high)
  for a in rare:
    for b in rare:
      if freq[a] > freq[b]:  # a is less rare than b: at least as open at every t
        assert (gates[:, a] >= gates[:, b] - 1e-6).all(), (a, b)
  least, most = rare[np.argmax(freq[rare])], rare[np.argmin(freq[rare])]
  assert gates[grid >= 0.15, least].min() == pytest.approx(1.0)
  assert gates[grid <= 0.85, most].max() == pytest.approx(0.0)


def test_dead_factors_do_not_take_up_the_late_gates():
  """Rarity by its definition (float64): the live rare factors, most frequent first, at
  k / (#live rare - 1); factors no example uses (8 of 32 here; 25-53 of 128 in the bench's SAEs)
  get 1. So the rarest live factor stays closed until t = 1 - gate_width, as with no dead ones
  (they used to hold the rarest ranks: here it was fully open by t = 0.55)."""
  live = synthetic_codes(300, factors=24)
  codes = np.concatenate([live, np.zeros((300, 8), np.float32)], 1)[:, np.random.default_rng(
      0).permutation(32)]
  stats = scores.factor_stats(jnp.asarray(codes), 0.5)
  freq, high = np.asarray(stats.frequency, np.float64), np.asarray(stats.high)
  rare_live = [j for j in sorted(range(32), key=lambda j: (-freq[j], j)) if freq[j] > 0
               and not high[j]]
  want = np.where(high, 0.0, 1.0)
  want[rare_live] = np.arange(len(rare_live)) / (len(rare_live) - 1)
  assert high.sum() == 16 and len(rare_live) == 8
  np.testing.assert_allclose(stats.rarity, want, atol=1e-6)
  probe = stats.replace(mass=jnp.eye(32)[np.array(rare_live[-1:])], group=jnp.zeros(1, jnp.int32))
  gate = lambda t: float(diversity(probe, jnp.zeros(32), jnp.asarray(t), 0.15)[0])
  assert gate(0.85) == 0.0 and gate(1.0) == pytest.approx(1.0)


def test_class_conditional_scores_flag_label_flips():
  """Flipped labels: factors typical of another class -> low class-conditional R, negative margin;
  the split-wide R cannot tell them apart (it never sees labels)."""
  codes, labels, flipped = class_codes()
  cond = scores.factor_stats(jnp.asarray(codes), 0.5, labels, 3)
  glob = scores.factor_stats(jnp.asarray(codes), 0.5)
  auroc = lambda s: roc_auc_score(~flipped, np.asarray(s))  # clean should score higher
  assert auroc(representativeness(cond)) > 0.95
  assert abs(auroc(representativeness(glob)) - 0.5) < 0.1
  margin = np.asarray(label_margin(cond))
  assert np.mean(margin[flipped] < 0) > 0.9 and np.mean(margin[~flipped] < 0) < 0.1
  np.testing.assert_array_equal(label_margin(glob), 0.0)  # no labels, no margin


def _pairwise_rank(x: np.ndarray) -> np.ndarray:
  """Rank i = #{j: x_j < x_i} + #{j < i: x_j = x_i}, counted pairwise."""
  idx = np.arange(len(x))
  return ((x[None, :] < x[:, None]) |
          ((x[None, :] == x[:, None]) & (idx[None, :] < idx[:, None]))).sum(1)


def _pairwise_mean_rank(x: np.ndarray) -> np.ndarray:
  """Rank i = #{j: x_j < x_i} + (#{j: x_j = x_i} - 1) / 2: ties share their mean rank."""
  return ((x[None, :] < x[:, None]).sum(1) + ((x[None, :] == x[:, None]).sum(1) - 1) / 2)


def test_rank_counts_smaller_entries_and_earlier_ties():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 20, 300).astype(np.float32)   # many ties
  rank = jax.jit(ranks.rank)  # as the policies run it: traced
  np.testing.assert_array_equal(rank(jnp.asarray(x)), _pairwise_rank(x))
  got = np.asarray(jax.jit(percentile_rank)(jnp.asarray(x)), np.float64) * (len(x) - 1)
  np.testing.assert_allclose(got, _pairwise_mean_rank(x), atol=1e-3)  # whole or half numbers
  rows = rng.integers(0, 5, (4, 30)).astype(np.float32)  # along the last axis, row by row
  np.testing.assert_array_equal(rank(jnp.asarray(rows)),
                                np.stack([_pairwise_rank(r) for r in rows]))
  order = rng.permutation(50)
  np.testing.assert_array_equal(jax.jit(ranks.inverse_permutation)(jnp.asarray(order)),
                                np.argsort(order))


def test_grouped_percentile_rank_ranks_within_each_group():
  rng = np.random.default_rng(0)
  x, group = rng.integers(0, 9, 200).astype(np.float32), rng.integers(0, 4, 200).astype(np.int32)
  got = np.asarray(grouped_percentile_rank(jnp.asarray(x), jnp.asarray(group), 4))
  for g in range(4):  # many ties within and across groups
    mine = x[group == g]
    np.testing.assert_allclose(got[group == g], _pairwise_mean_rank(mine) / (len(mine) - 1),
                               atol=1e-6)
  one_group = grouped_percentile_rank(jnp.asarray(x), jnp.zeros(200, jnp.int32), 2)
  np.testing.assert_allclose(one_group, jax.jit(percentile_rank)(jnp.asarray(x)),
                             atol=1e-6)  # lexsort path


def test_mislabel_guard_keeps_flipped_examples_out_of_the_budget():
  """Flipped examples get far less than their share of the selections under either guard, least
  under `exclude`; without the guard (and without labels) the hardest-first preference picks
  them up."""
  codes, labels, flipped = class_codes(flip=0.2)
  epochs, ratio = 10, 0.5
  cfg = get_config().sae_scores
  shares = {}
  for name, lab, guard in (('exclude', labels, 'exclude'), ('penalty', labels, 'penalty'),
                           ('off', labels, 'off'), ('split-wide', None, 'exclude')):
    c = cfg.copy_and_resolve_references()
    c.mislabel_guard = guard
    policy = policies.sae(codes, ratio, epochs, c, labels=lab, num_classes=3)
    counts = np.asarray(run_selection(policy, len(codes), epochs).counts)
    shares[name] = counts[flipped].sum() / counts.sum()
  print(f'flipped share {flipped.mean():.3f}, of selections: {shares}')
  assert shares['exclude'] <= shares['penalty'] < 0.5 * flipped.mean()
  assert shares['off'] > flipped.mean() and shares['exclude'] < shares['split-wide']


def test_exclude_last_fills_the_budget_from_the_excluded_only_when_needed():
  rng = np.random.default_rng(0)
  score = jnp.asarray(rng.normal(size=50).astype(np.float32))
  excluded = jnp.asarray(rng.uniform(size=50) < 0.4)
  num_ok = int((~excluded).sum())
  shifted = scores.exclude_last(score, excluded)
  for n in (5, num_ok, num_ok + 7):
    top = set(np.asarray(jax.lax.top_k(shifted, n)[1]).tolist())
    ok = np.flatnonzero(~np.asarray(excluded))
    want = set(ok[np.argsort(-np.asarray(score)[ok])][:n].tolist())
    if n > num_ok:  # every non-excluded one, then the best-scoring excluded ones
      bad = np.flatnonzero(np.asarray(excluded))
      want |= set(bad[np.argsort(-np.asarray(score)[bad])][:n - num_ok].tolist())
    assert top == want
  cfg = get_config().sae_scores
  cfg.mislabel_guard = 'hard'
  with pytest.raises(UserError, match='mislabel_guard'):
    policies.sae(synthetic_codes(20), 0.5, 2, cfg)


def test_exclude_last_orders_by_exclusion_then_score_at_any_scale():
  """Top-n of the priorities = the first n of the sort by (excluded, descending score, index),
  in float64, for every n, at scores whose spacing is a few float32 units (where a shift by
  their span rounded an excluded entry up to a tie: [1e8 + 8 excluded, 1e8, 1e8] put it in the
  top 2), with exact ties, and at 1e30."""
  rng = np.random.default_rng(0)
  cases = [(np.float32([1e8 + 8, 1e8, 1e8]), np.array([True, False, False]))]
  for base in (0.0, 1e8, 1e30):
    score = np.float32(base) + rng.integers(-3, 4, 40).astype(np.float32) * np.spacing(
        np.float32(max(base, 1.0)))
    cases.append((score, rng.uniform(size=40) < 0.4))
  for score, excluded in cases:
    priority = jax.jit(scores.exclude_last)(jnp.asarray(score), jnp.asarray(excluded))
    want = sorted(range(len(score)), key=lambda i: (excluded[i], -np.float64(score[i]), i))
    num_ok = int((~excluded).sum())
    for n in {1, 2, num_ok, min(num_ok + 1, len(score))}:
      assert np.asarray(jax.lax.top_k(priority, n)[1]).tolist() == want[:n], (score, n)


@pytest.mark.parametrize('temperature', [1e7, 3e38])
def test_hard_guard_holds_at_huge_temperatures(temperature):
  """With n = the number of unsuspected examples, `exclude` selects exactly them whatever the
  Gumbel noise: at temperature 1e7 the shift by the scores' span rounded suspects into ~10% of
  the draws, at 3e38 (finite in float32, so a valid config) noise of inf and inf - inf = NaN
  into all."""
  codes, labels, _ = class_codes(flip=0.2)
  cfg = get_config().sae_scores
  cfg.mislabel_guard, cfg.temperature = 'exclude', temperature
  suspect = np.asarray(scores.config_suspects(
      scores.factor_stats(jnp.asarray(codes), cfg.high_freq_fraction, labels, 3), cfg))
  num_ok = int((~suspect).sum())
  policy = policies.sae(codes, num_ok / len(codes), 4, cfg, labels=labels, num_classes=3)
  assert policy.num_selected == num_ok and suspect.any()
  state = policy.init(len(codes), jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), 100)
  idx = np.asarray(jax.jit(jax.vmap(lambda k: policy.select(policy.aux,
                                                            state.replace(key=k))[0]))(keys))
  picked = np.zeros((len(keys), len(codes)), bool)
  np.put_along_axis(picked, idx, True, axis=1)
  np.testing.assert_array_equal(picked, np.broadcast_to(~suspect, picked.shape))


@pytest.mark.parametrize('temperature', [0.3, 2.0, 3e38])
def test_sae_policy_draws_one_example_from_the_softmax_of_its_scores(temperature):
  """With n = 1 the Gumbel draw picks example i with probability softmax(score / T)_i (float64,
  from the epoch's combined score), up to 5 standard errors over 4,000 draws; at T = 3e38
  (uniform) the noise T * g overflowed to inf, and the first of the tied examples won ~30%."""
  num = 12
  codes = synthetic_codes(num)
  cfg = get_config().sae_scores
  cfg.temperature, cfg.mislabel_guard = temperature, 'off'
  policy = policies.sae(codes, 1 / num, 5, cfg)
  assert policy.num_selected == 1
  state = policy.init(num, jax.random.PRNGKey(0))
  score = np.asarray(jax.jit(lambda s: scores.combined_score(
      policy.aux['stats'], s.counts, s.factor_usage, s.epoch, 5, cfg))(state), np.float64)
  want = np.exp((score - score.max()) / temperature)
  want /= want.sum()
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  idx = np.asarray(jax.jit(jax.vmap(lambda k: policy.select(policy.aux,
                                                            state.replace(key=k))[0]))(keys))
  freq = np.bincount(idx[:, 0], minlength=num) / len(keys)
  np.testing.assert_array_less(np.abs(freq - want), 5 * np.sqrt(want * (1 - want) / len(keys))
                               + 1e-9)


@pytest.mark.parametrize('ratio', [0.5, 0.95])
def test_hard_guard_never_selects_a_suspect_while_others_remain(ratio):
  """Under `exclude`, no epoch selects a suspect while unsuspected examples can fill the budget,
  whatever the usage penalty, diversity and Gumbel noise say; above that, all the others are in."""
  codes, labels, _ = class_codes(flip=0.2)
  cfg = get_config().sae_scores
  cfg.mislabel_guard, cfg.usage_penalty, cfg.temperature = 'exclude', 1.0, 1.0
  policy = policies.sae(codes, ratio, 8, cfg, labels=labels, num_classes=3)
  state = policy.init(len(codes), jax.random.PRNGKey(0))
  suspect = np.asarray(policy.aux['suspect'])
  num_ok = int((~suspect).sum())
  assert 0 < suspect.sum() and (num_ok > policy.num_selected) == (ratio == 0.5)
  select, update = jax.jit(policy.select), jax.jit(policy.update)
  for _ in range(8):
    idx, w, state = select(policy.aux, state)
    picked = np.zeros(len(codes), bool)
    picked[np.asarray(idx)] = True
    if ratio == 0.5:
      assert not picked[suspect].any()
    else:
      assert picked[~suspect].all() and picked[suspect].sum() == policy.num_selected - num_ok
    state = update(policy.aux, state, idx, w, jnp.zeros(idx.shape))


def test_confident_error_count_adapts_to_the_noise_level():
  """The adaptive rule's count is ~0 on clean labels and tracks the number flipped under label noise
  (a conservative estimate, as confident learning's is: ~0.7-0.8x here); its suspects (the lowest
  margins) are nearly all flipped ones."""
  for flip in (0.0, 0.1, 0.3):
    codes, labels, flipped = class_codes(flip=flip)
    stats = scores.factor_stats(jnp.asarray(codes), 0.5, labels, 3)
    count = int(jax.jit(scores.confident_error_count)(stats))
    suspect = np.asarray(scores.suspected_mislabels(stats, 'confident'))
    print(f'flip {flip}: {flipped.sum()} flipped, estimated {count}')
    assert suspect.sum() == count
    if flip == 0.0:
      assert count <= 0.01 * len(codes)
    else:
      assert 0.6 * flipped.sum() <= count <= 1.1 * flipped.sum()
      assert flipped[suspect].mean() > 0.9
  no_labels = scores.factor_stats(jnp.asarray(codes), 0.5)
  assert int(scores.confident_error_count(no_labels)) == 0
  assert not np.asarray(scores.suspected_mislabels(no_labels, 'confident')).any()
  with pytest.raises(UserError, match='mislabel_rule'):
    scores.suspected_mislabels(stats, 'nope')


def test_class_conditional_scores_on_real_digits_with_label_noise(tfds_dir):
  """20% flipped digits labels: an SAE on raw pixels, class-conditional R ranks them low."""
  from datarater import sae as sae_lib  # pylint: disable=g-import-not-at-top
  train = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  cfg = get_config()
  cfg.sae.steps = 100  # (AUROCs ~0.98 and ~0.99; 500 steps: ~0.98 and ~1.0)
  pixels = train.features['image'].reshape(len(train), -1)
  trained, _ = sae_lib.train_sae(pixels, cfg.sae, jax.random.PRNGKey(0))
  stats = scores.factor_stats(sae_lib.encode_all(trained, pixels), 0.5, train.features['label'],
                              10)
  clean = ~train.is_corrupted
  assert roc_auc_score(clean, np.asarray(representativeness(stats))) > 0.9
  assert roc_auc_score(clean, np.asarray(label_margin(stats))) > 0.9
  with pytest.raises(UserError, match='labels'):
    scores.factor_stats(jnp.ones((5, 3)), 0.5, np.array([0, 1, 2, 3, 9]), 4)


def test_sae_policy_without_noise_selects_the_top_n_of_the_score_of_its_epoch():
  """Temperature 0: at every epoch e of E the SAE policy selects n examples whose combined score
  at e (sae_scores.combined_score, checked against its definition above) -- from the counts and
  factor usage recorded so far -- is at least every unselected one's, each with weight 1."""
  num, epochs, ratio = 300, 5, 0.3
  codes = synthetic_codes(num)
  cfg = get_config().sae_scores
  cfg.temperature, cfg.mislabel_guard = 0.0, 'off'
  policy = policies.sae(codes, ratio, epochs, cfg)
  stats = scores.factor_stats(jnp.asarray(codes), cfg.high_freq_fraction)
  state = policy.init(num, jax.random.PRNGKey(0))
  select, update = jax.jit(policy.select), jax.jit(policy.update)
  combined = jax.jit(lambda counts, usage, epoch: scores.combined_score(
      stats, counts, usage, epoch, epochs, cfg))
  for epoch in range(epochs):
    want = np.asarray(combined(state.counts, state.factor_usage, jnp.asarray(epoch)), np.float64)
    idx, w, state = select(policy.aux, state)
    picked = np.zeros(num, bool)
    picked[np.asarray(idx)] = True
    assert picked.sum() == policy.num_selected == round(ratio * num)
    np.testing.assert_array_equal(w, 1.0)
    assert want[picked].min() >= want[~picked].max() - 1e-6, epoch
    state = update(policy.aux, state, idx, w, jnp.zeros(idx.shape))


def test_sae_policy_at_temperature_zero_takes_tied_scores_in_a_random_order():
  """Temperature 0, every example's codes the same (every score tied), with or without the hard
  guard: each example is selected with probability n / N wherever it lies in the split."""
  num, draws = 200, 200
  codes = np.tile(synthetic_codes(1), (num, 1))
  cfg = get_config().sae_scores
  cfg.temperature = 0.0
  for guard in ('off', 'exclude'):
    cfg.mislabel_guard = guard
    policy = policies.sae(codes, 0.3, 5, cfg)
    _equal_keep_rates(policy, policy.init(num, jax.random.PRNGKey(0)), num, draws)


@pytest.mark.parametrize('temperature', [0.0, 0.1])
def test_usage_penalty_flattens_selection_counts(temperature):
  num, epochs = 400, 20
  codes = synthetic_codes(num)
  cfg = get_config().sae_scores
  cfg.temperature = temperature
  ginis = {}
  for penalty in (0.0, 1.0):
    cfg.usage_penalty = penalty
    state = run_selection(policies.sae(codes, 0.3, epochs, cfg), num, epochs)
    assert int(state.counts.sum()) == epochs * 120
    ginis[penalty] = gini(state.counts)
  print(f'Gini of selection counts (T={temperature}): without penalty {ginis[0.0]:.3f}, '
        f'with {ginis[1.0]:.3f}')
  assert ginis[1.0] < 0.8 * ginis[0.0], ginis


def _context(tfds_dir, cfg, noise=0.0):
  cfg.data = digits_data(tfds_dir, noise)
  train = pipeline.load_split(cfg.data, 'train', corrupt=True)
  return PolicyContext(train, None, tasks.make_task(cfg.task, train.info), cfg)


def test_bad_input_is_a_user_error(tfds_dir):
  cfg = get_config()
  ctx = _context(tfds_dir, cfg)
  with pytest.raises(UserError, match='bogus'):
    make_policy('bogus', ctx)
  cfg.policy.ratio = 0.0
  with pytest.raises(UserError, match='0.0'):
    make_policy('random', ctx)
  cfg.policy.ratio = 0.5
  with pytest.raises(UserError, match='10 examples'):  # class-conditional: caught at build time
    policies.sae_policy(ctx, codes=synthetic_codes(10))
  cfg.sae_scores.class_conditional = False
  policy = policies.sae_policy(ctx, codes=synthetic_codes(10))
  with pytest.raises(UserError, match='10 examples'):
    policy.init(len(ctx.train), jax.random.PRNGKey(0))


def test_infobatch_spends_the_budget_learns_and_trains_on_noisy_examples(tfds_dir):
  """In the trainer: exactly n example-gradients per epoch; InfoBatch keeps the high-loss
  examples, so under 20% label noise the noisy ones take more than their share."""
  import optax  # pylint: disable=g-import-not-at-top
  from datarater.trainer import Trainer  # pylint: disable=g-import-not-at-top
  cfg = get_config()
  ctx = _context(tfds_dir, cfg, noise=0.2)
  cfg.policy.ratio = 0.5
  policy = make_policy('infobatch', ctx)
  val = pipeline.load_split(cfg.data, 'validation')
  run = Trainer(ctx.task, optax.adam(3e-3), policy, 64).run(ctx.train, {'validation': val}, [0],
                                                            epochs=4)
  n = round(0.5 * len(ctx.train))
  assert policy.num_selected == n and run.example_gradients == 4 * n
  assert [h['example_gradients'] for h in run.history] == [n * e for e in (1, 2, 3, 4)]
  assert run.final['validation']['accuracy'][0] > 0.7  # chance is 0.1
  counts = np.asarray(run.policy_state.counts[0])
  assert counts.sum() == 4 * n
  assert counts[ctx.train.is_corrupted].sum() / counts.sum() > 0.22


def test_bench_folds_partition_train_and_test(tfds_dir):
  """bench.selection's folds: test folds tile train+test, each fold trains on exactly the rest."""
  from collections import Counter  # pylint: disable=g-import-not-at-top
  from bench.selection import fold_splits  # pylint: disable=g-import-not-at-top
  rows = lambda s: Counter(map(bytes, np.concatenate([
      s.features['image'].reshape(len(s), -1), s.features['label'][:, None]], 1)))
  load = lambda expr: pipeline.load_split(digits_data(tfds_dir), expr)
  pool = rows(load('train')) + rows(load('test'))
  tested = Counter()
  for fold in range(5):
    train_expr, test_expr = fold_splits(fold, 5, 1197)
    train, test = rows(load(train_expr)), rows(load(test_expr))
    assert train + test == pool
    assert 299 <= sum(test.values()) <= 300
    tested += test
  assert tested == pool


@pytest.mark.slow
def test_bench_gini_ablation_has_both_rows_when_the_configs_penalty_is_zero():
  """A usage penalty of 0 is a valid config: both rows of the ablation are its one policy (the
  second row was missing and the Markdown table raised KeyError after every run)."""
  from bench import selection as bench  # pylint: disable=g-import-not-at-top
  cfg = get_config()
  cfg.sae_scores.usage_penalty = 0.0
  codes, labels, _ = class_codes(n=200)
  ginis = bench.count_gini_ablation(codes, labels, 3, 0.5, 3, cfg, 0)
  assert set(ginis) == {'without_penalty', 'with_penalty'}
  assert ginis['without_penalty'] == ginis['with_penalty'] > 0

def test_confident_joint_errors_match_the_definition_with_an_empty_class():
  """The confident joint's off-diagonal count against a float64 loop over its definition: class
  c's threshold is its members' mean score for c; example i is an error when some other class
  clearing its threshold scores higher than every class that does, its label included (a tie
  with the label is not higher). A class with no members has no threshold (its scores count for
  nothing), whether it lies between present classes or after them."""
  rng = np.random.default_rng(0)
  num, classes = 300, 4
  for empty in (None, 1, 3):
    present = [c for c in range(classes) if c != empty]
    labels = rng.choice(present, num)
    per_class = rng.uniform(0, 0.8, (num, classes))
    per_class[np.arange(num), labels] = rng.uniform(0.3, 1.0, num)
    for i in range(20):  # exact ties between the label and another class, high and low
      per_class[i, present[(present.index(labels[i]) + 1) % 3]] = per_class[i, labels[i]] = (
          0.96875 if i % 2 else 0.03125)
    thresh = {c: per_class[labels == c, c].mean() for c in present}
    want = 0
    for i in range(num):
      score = {c: per_class[i, c] for c in present if per_class[i, c] >= thresh[c]}
      own = score.pop(labels[i], -np.inf)
      want += any(s > own for s in score.values())
    got = int(scores.confident_joint_errors(jnp.asarray(per_class, jnp.float32),
                                            jnp.asarray(labels)))
    assert got == want and 0 < want < num // 2, (empty, got, want)
  # A score equal to its class's threshold clears it: every member of class c scores value_c for
  # c (dyadic: the threshold is value_c exactly), and 40 examples score their label's value and
  # exactly the next class's value for it (an error when the latter is higher, if >= clears).
  labels = rng.integers(0, classes, num)
  per_class = rng.uniform(0, 0.25, (num, classes))
  value = np.array([0.5, 0.625, 0.75, 0.875])
  per_class[np.arange(num), labels] = value[labels]
  at = rng.choice(num, 40, replace=False)
  other = (labels[at] + 1) % classes
  per_class[at, other] = value[other]
  thresh = {c: per_class[labels == c, c].mean() for c in range(classes)}
  assert all(per_class[i, c] == thresh[c] for i, c in zip(at, other))

  def errors(clears):
    def confident(i, c):
      return per_class[i, c] if clears(per_class[i, c], thresh[c]) else -np.inf
    return sum(any(confident(i, c) > confident(i, labels[i]) for c in range(classes)
                   if c != labels[i]) for i in range(num))
  want = errors(lambda s, t: s >= t)
  assert want > errors(lambda s, t: s > t)  # the ties decide
  assert int(scores.confident_joint_errors(jnp.asarray(per_class, jnp.float32),
                                           jnp.asarray(labels))) == want


def test_knn_label_shares_match_a_brute_force_neighbour_count():
  """Each row's class shares equal a float64 numpy count over its k most cosine-similar other rows,
  among all rows or a reference sample (chunks that do not divide N included, shared among
  threads or not, or under jit: bit for bit the same), and the `knn` rule's suspects are nearly
  all flipped."""
  codes, labels, flipped = class_codes(n=301, flip=0.15)
  stats = scores.factor_stats(jnp.asarray(codes), 0.5, labels, 3)
  k = 7
  x = codes.astype(np.float64)
  unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sample = scores.knn_reference(len(codes), 150, jax.random.PRNGKey(3))
  assert scores.knn_reference(len(codes), 0, jax.random.PRNGKey(3)) is None
  assert scores.knn_reference(len(codes), len(codes), jax.random.PRNGKey(3)) is None
  assert len(set(np.asarray(sample).tolist())) == 150
  for reference in (None, sample):
    ref = np.arange(len(codes)) if reference is None else np.asarray(reference)
    sim = unit @ unit[ref].T
    sim[ref[None, :] == np.arange(len(codes))[:, None]] = -np.inf  # never its own neighbour
    for chunk, threads in ((64, 3), (1024, 0)):  # chunks that do not divide N over 3 threads
      shares = np.asarray(scores.knn_label_shares(stats, k, chunk=chunk, reference=reference,
                                                  threads=threads))
      for i in range(len(codes)):
        order = np.argsort(-sim[i])
        kth = sim[i, order[k - 1]]
        if np.isclose(sim[i, order[k]], kth, atol=1e-6):
          continue  # a tie at the k-th neighbour: either choice is a valid k-nearest set
        want = np.bincount(labels[ref[order[:k]]], minlength=3) / k
        np.testing.assert_allclose(shares[i], want, atol=1e-6)
    by_thread = [np.asarray(scores.knn_label_shares(stats, k, chunk=64, reference=reference,
                                                    threads=t)) for t in (1, 3, 5)]
    by_thread.append(np.asarray(jax.jit(lambda st, r: scores.knn_label_shares(
        st, k, chunk=64, reference=r))(stats, reference)))  # traced: one program
    for other in by_thread[1:]:
      np.testing.assert_array_equal(other, by_thread[0])
  suspect = np.asarray(scores.suspected_mislabels(stats, 'knn', knn=k))
  shares = scores.knn_label_shares(stats, k)
  assert suspect.sum() == int(scores.confident_joint_errors(shares, jnp.asarray(labels)))
  assert 0.6 * flipped.sum() <= suspect.sum() <= 1.2 * flipped.sum()
  assert flipped[suspect].mean() > 0.9
  with pytest.raises(UserError, match='mislabel_knn'):
    scores.knn_label_shares(stats, len(codes))
  with pytest.raises(UserError, match='mislabel_knn'):
    scores.knn_label_shares(stats, 150, reference=sample)


def test_knn_label_shares_of_tied_neighbours_are_their_expected_shares():
  """Duplicated codes with differing labels tie at the k-th similarity: each example's shares
  are the mean, over every equally likely choice of the tied neighbours (enumerated), of the
  label counts of its k nearest; so they do not depend on where the examples lie in the split
  (permuting the examples permutes the shares). Codes of one or four equal active factors: every
  cosine similarity is exact in float32."""
  patterns = np.zeros((6, 8), np.float32)
  for p, active in enumerate(([0], [0, 1, 2, 3], [4], [4, 5, 6, 7], [1, 2, 3, 5], [2])):
    patterns[p, active] = 1.0
  rng = np.random.default_rng(0)
  codes = np.repeat(patterns, 4, axis=0)
  labels = rng.integers(0, 3, len(codes)).astype(np.int32)
  k = 6
  unit = codes / np.linalg.norm(codes, axis=1, keepdims=True)
  sim = unit.astype(np.float64) @ unit.T.astype(np.float64)
  np.fill_diagonal(sim, -np.inf)
  want = np.zeros((len(codes), 3))
  straddles = 0
  for i in range(len(codes)):
    kth = np.sort(sim[i])[-k]
    above, tied = np.flatnonzero(sim[i] > kth), np.flatnonzero(sim[i] == kth)
    straddles += len(above) + len(tied) > k
    picks = list(itertools.combinations(tied, k - len(above)))
    for pick in picks:
      want[i] += np.bincount(labels[np.concatenate([above, pick]).astype(int)], minlength=3)
    want[i] /= k * len(picks)
  assert straddles > len(codes) // 2
  shares = lambda c, l: np.asarray(scores.knn_label_shares(
      scores.factor_stats(jnp.asarray(c), 0.5, l, 3), k, threads=1))
  np.testing.assert_allclose(shares(codes, labels), want, rtol=1e-6)
  perm = rng.permutation(len(codes))
  np.testing.assert_allclose(shares(codes[perm], labels[perm]), want[perm], rtol=1e-6)


def test_knn_label_shares_equal_a_float64_oracle_with_and_without_duplicated_rows():
  """On random codes, and on the same codes with a third of the rows copies of a few others
  (exact ties, many past the k + 1 nearest, more than STRADDLE_BATCH in one chunk), the shares
  equal the definition in float64: sort each row's similarities, every neighbour above the k-th
  counts 1 and those tied at it share the places left; among all rows and a reference sample,
  in chunks that do not divide N, over two threads."""
  rng = np.random.default_rng(5)
  n, m, k, chunk = 250, 16, 7, 64
  base = (rng.exponential(size=(n, m)) * (rng.random((n, m)) < 0.4)).astype(np.float32)
  base[:, 0] += 0.1  # no empty code
  dup = base.copy()
  copies = rng.choice(n, 90, replace=False)
  dup[copies] = base[rng.choice(copies[:6], 90)]   # groups of identical rows, spread over chunks
  labels = rng.integers(0, 3, n).astype(np.int32)
  sample = np.asarray(scores.knn_reference(n, 120, jax.random.PRNGKey(1)))
  for codes, ties in ((base, False), (dup, True)):
    x = codes.astype(np.float64) / codes.sum(1, keepdims=True)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    stats = scores.factor_stats(jnp.asarray(codes), 0.5, labels, 3)
    for ref in (np.arange(n), sample):
      sim = np.einsum('im,jm->ij', unit, unit[ref], optimize=False)  # same order in every column
      sim[ref[None, :] == np.arange(n)[:, None]] = -np.inf
      want, straddles = np.zeros((n, 3)), np.zeros(n, bool)
      for i in range(n):
        desc = np.sort(sim[i])[::-1]
        kth = desc[k - 1]
        near = desc[np.abs(desc - kth) < 1e-5]
        assert np.all(near == kth), 'a near tie float32 could order either way'
        weight = (sim[i] > kth) + (sim[i] == kth) * (k - np.sum(sim[i] > kth)) / np.sum(
            sim[i] == kth)
        want[i] = np.bincount(labels[ref], weight, minlength=3) / k
        straddles[i] = desc[k] == kth
      per_chunk = np.bincount(np.arange(n) // chunk, straddles)
      if ties:
        assert per_chunk.max() > scores.STRADDLE_BATCH, per_chunk
      else:
        assert not straddles.any()
      reference = None if len(ref) == n else jnp.asarray(ref)
      got = scores.knn_label_shares(stats, k, chunk=chunk, reference=reference, threads=2)
      np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


def test_knn_label_shares_hold_one_chunk_by_reference_array():
  """The search holds one [chunk, R] array of similarities at a time (what `chunk` bounds), not
  the masks and weights of every reference example besides: the compiled program's temporaries
  stay under 1.25 times it (they were 4.3 times it)."""
  n, m, k, chunk = 4096, 4, 50, 1024
  codes = jnp.asarray(np.random.default_rng(0).exponential(size=(n, m)), jnp.float32)
  stats = scores.factor_stats(codes, 0.5, np.arange(n) % 2, 2)
  search = jax.jit(lambda st: scores.knn_label_shares(st, k, chunk=chunk))  # traced: one program
  temp = search.lower(stats).compile().memory_analysis().temp_size_in_bytes
  assert temp < 1.25 * chunk * n * 4, temp / (chunk * n * 4)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA's CPU lowering of top_k")
def test_knn_label_shares_find_the_kth_similarity_without_sorting_the_rows():
  """The k-th similarity of each row comes from XLA's TopK (a partial selection, what the
  threads are for): read off as top_k's last column, it had XLA sort every [chunk, R] row
  whole, tens of times slower (3.4 s against 0.05 s for one chunk of 1024 x 20,000 on 2 cores).
  The compiled program holds no sort."""
  n, dim, k, chunk = 300, 8, 5, 64
  unit = jnp.ones((n, dim)) / np.sqrt(dim)
  onehot = jax.nn.one_hot(jnp.arange(n) % 3, 3)
  hlo = scores._knn_chunks.lower(unit, unit, onehot, jnp.arange(n), jnp.zeros(2, jnp.int32),
                                 k=k, chunk=chunk, num_rows=n).compile().as_text()
  assert ' sort(' not in hlo and 'TopK' in hlo


@pytest.mark.slow
def test_bench_offline_only_reports_the_guard_without_training(tfds_dir, tmp_path):
  """`bench.selection --offline_only` on digits: one row per (noise, seed), no training runs; the
  guard's recall and precision describe one suspect set: recall x corrupted examples (counted
  from the pipeline's own corruption record) = precision x suspected examples."""
  from bench.runs import corrupted  # pylint: disable=g-import-not-at-top
  from tests.conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = forked.run('bench.selection', [
      '--offline_only', '--folds=1', '--seeds=1', f'--config.data.data_dir={tfds_dir}',
      '--config.sae.steps=100', '--config.features.train_steps=40',  # small: this tests bookkeeping
      f'--out={tmp_path}/guard'], subprocess_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / 'guard.json').read_text())
  assert 'runs' not in result and (tmp_path / 'guard.md').is_file()
  assert shlex.split(result['made_by']['command']) == ['python', *proc.args[1:]]
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True,
                        text=True)
  if head.returncode == 0:  # a git checkout: the version names its commit
    assert head.stdout.strip()[:7] in result['made_by']['code_version']
  rows = result['offline']
  assert sorted((r['noise'], r['seed']) for r in rows) == [(0.0, 0), (0.2, 0)]
  cfg = get_config()
  cfg.data.data_dir = tfds_dir
  for r in rows:
    c = corrupted(cfg, r['noise'])
    c.data.noise_seed = r['seed']
    train = pipeline.load_split(c.data, c.data.train_split, corrupt=True)
    if not r['noise']:
      assert 'suspect_recall' not in r and not train.is_corrupted.any()
      continue
    suspected = r['suspect_share'] * len(train)
    true_positives = r['suspect_recall'] * train.is_corrupted.sum()
    assert true_positives > 0
    np.testing.assert_allclose(true_positives, r['suspect_precision'] * suspected, rtol=1e-6)


def _rep_rank_by_definition(codes, high_fraction, labels=None):
  """float64 numpy, from the documented definition: mass = codes / row sum; within each group
  (class, or one group without labels) the frequency f_j of factor j (share of the group's
  examples with code_j > 0), its high set the round(fraction x M) most frequent (ties to the
  lower index), weights f_j / max f on it and 0 elsewhere; R_i = mass_i . weights of i's group;
  rep_rank = R_i's average rank among its group's, over (group size - 1)."""
  codes = np.asarray(codes, np.float64)
  n, m = codes.shape
  group = np.zeros(n, int) if labels is None else np.asarray(labels)
  mass = codes / np.maximum(codes.sum(1, keepdims=True), 1e-12)
  out = np.zeros(n)
  for g in np.unique(group):
    mine = group == g
    freq = (codes[mine] > 0).mean(0)
    high = np.zeros(m, bool)
    high[np.argsort(-freq, kind='stable')[:max(1, round(high_fraction * m))]] = True
    r = mass[mine] @ np.where(high, freq / freq.max(), 0.0)
    out[mine] = (rankdata(r, 'average') - 1) / max(mine.sum() - 1, 1)
  return out


def test_the_curriculum_weights_move_linearly_from_start_to_end_over_the_epochs():
  """alpha and beta go from their start values (epoch 0) to their end values (epoch E - 1) in
  equal steps: at progress t = e / (E - 1), a representativeness weight 1 -> 0 gives
  (1 - t) R_rank and 0 -> 1 gives t R_rank; for diversity, whose percentile P(t) changes with the
  gates, the 1 -> 0 and 0 -> 1 scores stand in the ratio (1 - t) : t."""
  codes = synthetic_codes(200, factors=16, seed=4)
  stats = scores.factor_stats(jnp.asarray(codes), 0.5)
  rep, epochs = np.asarray(stats.rep_rank, np.float64), 5
  none = dict(rep_weight_start=0.0, rep_weight_end=0.0, div_weight_start=0.0,
              div_weight_end=0.0, gate_width=0.15, usage_penalty=0.0, mislabel_guard='off')
  for e in range(epochs):
    t = e / (epochs - 1)
    score = lambda **kw: np.asarray(scores.combined_score(  # pylint: disable=cell-var-from-loop
        stats, jnp.zeros(200, jnp.int32), jnp.zeros(16), jnp.asarray(e), epochs,
        ml_collections.ConfigDict({**none, **kw})), np.float64)
    np.testing.assert_allclose(score(rep_weight_start=1.0), (1 - t) * rep, atol=1e-6)
    np.testing.assert_allclose(score(rep_weight_end=1.0), t * rep, atol=1e-6)
    down, up = score(div_weight_start=1.0), score(div_weight_end=1.0)
    assert (down + up).min() >= 0 and (down + up).max() >= 0.5  # a percentile (ties: 0.5)
    np.testing.assert_allclose(t * down, (1 - t) * up, atol=1e-6)


def test_combined_score_reaches_its_end_weights_with_every_gate_open_at_the_last_epoch():
  """At epoch E - 1 of E the curriculum is over: score = rep_end * R_rank + div_end *
  percentile(D) - lambda * counts / (E - 1), where every rare factor's gate is open, so
  D_i = sum over rare factors j of a_ij / (1 + u_j / mean(u)) (float64 numpy, ranks by
  scipy's average rankdata); at epoch 0 it is rep_start * R_rank + div_start * percentile(D(0))
  with div_start = 0. R_rank by its definition too (_rep_rank_by_definition), split-wide and
  within each class."""
  codes = synthetic_codes(200, factors=16, seed=4)
  labels = np.random.default_rng(1).integers(0, 3, 200)
  for lab in (None, labels):
    stats = (scores.factor_stats(jnp.asarray(codes), 0.5) if lab is None else
             scores.factor_stats(jnp.asarray(codes), 0.5, lab, 3))
    rep = _rep_rank_by_definition(codes, 0.5, lab)
    np.testing.assert_allclose(stats.rep_rank, rep, atol=1e-6)
    cfg = ml_collections.ConfigDict(dict(rep_weight_start=-1.0, rep_weight_end=1.0,
                                         div_weight_start=0.0, div_weight_end=0.5,
                                         gate_width=0.15, usage_penalty=0.3, mislabel_guard='off'))
    rng = np.random.default_rng(0)
    epochs = 4
    usage = rng.uniform(0.0, 5.0, 16)
    counts = rng.integers(0, epochs, 200)
    got = np.asarray(scores.combined_score(stats, jnp.asarray(counts, jnp.int32),
                                           jnp.asarray(usage, jnp.float32),
                                           jnp.asarray(epochs - 1), epochs, cfg))
    mass, high = np.asarray(stats.mass, np.float64), np.asarray(stats.high)
    d = mass @ np.where(high, 0.0, 1.0 / (1.0 + usage / usage.mean()))
    pct = (rankdata(d, 'average') - 1) / (len(d) - 1)
    np.testing.assert_allclose(got, rep + 0.5 * pct - 0.3 * counts / (epochs - 1), atol=1e-5)
    first = np.asarray(scores.combined_score(stats, jnp.zeros(200, jnp.int32),
                                             jnp.asarray(usage, jnp.float32), jnp.asarray(0),
                                             epochs, cfg))
    np.testing.assert_allclose(first, -rep, atol=1e-6)


def test_bench_runs_draw_apart_across_folds_and_fold0_as_before(tfds_dir):
  """bench.selection's (fold, seed) runs: folds 1, 2 and 4 train on the test split at the same
  positions, folds 0, 3 and 4 on train[:598] (0 and 4 on train[:898]); each run draws its own
  corruption of those shared examples (agreeing on about 1 - 2p(1-p) of them; all or 94% when
  they shared seed s), its own initial model and data order. Fold 0 reads the config's split
  corrupted with noise seed s, as before."""
  from bench import selection as bench  # pylint: disable=g-import-not-at-top
  from datarater.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from inner_loop.optimizers import make_inner_optimizer  # pylint: disable=g-import-not-at-top
  base = get_config()
  base.data.data_dir = tfds_dir
  n_train, n_test, p = 1197, 300, 0.2
  runs, seeds = {}, []
  for fold in range(5):
    cfg = bench.run_config(base, p, fold, 0)
    runs[fold] = pipeline.load_split(cfg.data, bench.fold_splits(fold, 5, n_train)[0],
                                     corrupt=True)
    seeds += cfg.train.seeds
  task = tasks.make_task(cfg.task, runs[0].info)  # the initial models of the five runs, at once
  trainer = Trainer(task, make_inner_optimizer(cfg.train.optimizer, cfg.train.learning_rate),
                    policies.full(n_train), cfg.train.batch_size)
  state, order = trainer.init(seeds, n_train)
  params = np.concatenate([np.reshape(x, (5, -1)) for x in jax.tree.leaves(state.models.params)],
                          1)
  order = np.asarray(jax.random.key_data(order)).reshape(5, -1)
  shared = {(1, 2): slice(-n_test, None), (1, 4): slice(-n_test, None),  # 1,198 examples
            (2, 4): slice(-n_test, None), (0, 3): slice(0, 598),  # 1,197
            (0, 4): slice(0, 898)}  # records of 1,197 and 1,198 from one seed agree on 94%
  for (f, g), rows in shared.items():
    a, b = runs[f], runs[g]
    np.testing.assert_array_equal(a.clean['label'][rows], b.clean['label'][rows])  # same examples
    agree = np.mean(a.is_corrupted[rows] == b.is_corrupted[rows])
    assert abs(agree - (1 - 2 * p * (1 - p))) < 0.12, (f, g, agree)  # was 1: the same flips
  for f, g in itertools.combinations(range(5), 2):
    assert not np.array_equal(params[f], params[g]), ('init', f, g)
    assert not np.array_equal(order[f], order[g]), ('data order', f, g)
  fold0 = pipeline.load_split(digits_data(tfds_dir, p, noise_seed=0), 'train', corrupt=True)
  np.testing.assert_array_equal(runs[0].corruption, fold0.corruption)
  assert bench.run_config(base, p, 0, 7).train.seeds == (7,)
  drawn = [bench.run_seed(f, s) for f in range(10) for s in range(100)]
  assert len(set(drawn)) == len(drawn) and max(drawn) < 2 ** 31
