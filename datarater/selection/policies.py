"""Selection policies: full data, random per epoch, InfoBatch-style loss pruning, SAE scores.

Every policy except `full` trains on exactly n = round(ratio * N) examples per epoch, so at equal
ratio all spend the same example-gradients; they differ only in which examples and weights.
"""
import math

import jax
import jax.numpy as jnp

from datarater.errors import UserError
from datarater.selection import scores
from datarater.selection.base import SelectionPolicy, init_state, record_epoch

POLICIES = ('full', 'random', 'infobatch', 'sae')


def num_selected(num_examples: int, ratio: float) -> int:
  if not 0.0 < ratio <= 1.0:
    raise UserError(f'selection_ratio must be in (0, 1], got {ratio}')
  return max(1, int(round(ratio * num_examples)))


def full(num_examples: int) -> SelectionPolicy:
  """Every example every epoch, weight 1 (the reference)."""
  def select(state):
    return (jnp.arange(num_examples, dtype=jnp.int32), jnp.ones(num_examples, jnp.float32), state)
  return SelectionPolicy(init=init_state, select=select, update=record_epoch,
                         num_selected=num_examples)


def random(num_examples: int, ratio: float) -> SelectionPolicy:
  """A fresh uniform random subset of n examples each epoch, weight 1."""
  n = num_selected(num_examples, ratio)

  def select(state):
    key, sub = jax.random.split(state.key)
    idx = jax.random.permutation(sub, num_examples)[:n].astype(jnp.int32)
    return idx, jnp.ones(n, jnp.float32), state.replace(key=key)
  return SelectionPolicy(init=init_state, select=select, update=record_epoch, num_selected=n)


def infobatch(num_examples: int, ratio: float, max_prune_prob: float = 0.8) -> SelectionPolicy:
  """InfoBatch-style: randomly prune well-learned (low-loss) examples, rescale the kept ones.

  Candidates are the examples whose last loss is below the mean (InfoBatch's rule), widened to the
  lowest-loss ceil((N - n) / max_prune_prob) if there are too few, so exactly N - n are pruned with
  probability p = (N - n) / #candidates <= max_prune_prob; kept candidates get weight 1 / (1 - p)
  so the expected gradient matches the full-data one. Losses are those seen in training (the
  forward pass of the last epoch an example was in); all start equal, so epoch 0 is random.
  """
  n = num_selected(num_examples, ratio)
  pruned = num_examples - n
  if not 0.0 < max_prune_prob < 1.0:
    raise UserError(f'infobatch max_prune_prob must be in (0, 1), got {max_prune_prob}')
  min_candidates = min(num_examples, math.ceil(pruned / max_prune_prob))

  def select(state):
    key, k_tie, k_prune = jax.random.split(state.key, 3)
    losses = state.losses + 1e-6 * jax.random.uniform(k_tie, state.losses.shape)  # random ties
    loss_rank = jnp.argsort(jnp.argsort(losses))
    below = losses < jnp.mean(losses)
    num_candidates = jnp.maximum(jnp.sum(below), min_candidates)
    candidate = loss_rank < num_candidates
    # Prune the `pruned` candidates with the smallest random priorities; keep everything else.
    priority = jnp.where(candidate, jax.random.uniform(k_prune, losses.shape), 2.0)
    kept = jnp.argsort(priority)[pruned:].astype(jnp.int32)
    prob = pruned / num_candidates.astype(jnp.float32)
    weights = jnp.where(candidate[kept], 1.0 / (1.0 - prob), 1.0).astype(jnp.float32)
    return kept, weights, state.replace(key=key)
  return SelectionPolicy(init=init_state, select=select, update=record_epoch, num_selected=n)


def sae(codes, ratio: float, num_epochs: int, cfg, labels=None,
        num_classes: int = 0) -> SelectionPolicy:
  """Top-n of the SAE curriculum score (see `scores`), sampled with Gumbel noise of `temperature`.

  `codes` [N, M] are the SAE codes of the training examples; `cfg` is the `sae_scores` config;
  `labels` [N] (the training labels, as seen) make representativeness class-conditional and
  enable the label guard (`cfg.mislabel_guard`): under `exclude` the suspected mislabels
  (`scores.suspected_mislabels`, fixed at construction) are selected only when the other examples
  cannot fill the budget of n.
  The usage counts and factor usage in the state are updated after every epoch.
  """
  codes = jnp.asarray(codes, jnp.float32)
  num_examples, num_factors = codes.shape
  n = num_selected(num_examples, ratio)
  if cfg.temperature < 0:
    raise UserError(f'sae_scores.temperature must be >= 0, got {cfg.temperature}')
  if labels is not None and len(labels) != num_examples:
    raise UserError(f'SAE codes cover {num_examples} examples but the split has {len(labels)}')
  stats = scores.factor_stats(codes, cfg.high_freq_fraction, labels, num_classes)
  guard = scores.mislabel_guard(cfg)
  suspect = (scores.suspected_mislabels(stats, cfg.get('mislabel_rule', 'margin'),
                                        cfg.get('mislabel_margin', 0.25))
             if guard != 'off' else jnp.zeros(num_examples, bool))

  def init(num, key):
    if num != num_examples:
      raise UserError(f'SAE codes cover {num_examples} examples but the split has {num}')
    return init_state(num, key, num_factors, aux={'stats': stats, 'codes': codes,
                                                    'suspect': suspect})

  def select(state):
    key, sub = jax.random.split(state.key)
    score = scores.combined_score(state.aux['stats'], state.counts, state.factor_usage,
                                  state.epoch, num_epochs, cfg, state.aux['suspect'])
    score = score + cfg.temperature * jax.random.gumbel(sub, score.shape)
    if guard == 'exclude':  # after the noise: suspects only fill what the others cannot
      score = scores.exclude_last(score, state.aux['suspect'])
    idx = jax.lax.top_k(score, n)[1].astype(jnp.int32)
    return idx, jnp.ones(n, jnp.float32), state.replace(key=key)

  def update(state, indices, weights, losses):
    return record_epoch(state, indices, weights, losses, state.aux['codes'])
  return SelectionPolicy(init=init, select=select, update=update, num_selected=n)
