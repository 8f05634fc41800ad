"""Per-epoch selection policies: full data, random, InfoBatch-style loss pruning, SAE scores.

Every policy except `full` trains on exactly n = max(1, round(ratio * N)) examples per epoch
(Python's round: halves to even, unlike `launch.filter --keep`'s halves up), so at equal
ratio all spend the same example-gradients; they differ only in which examples and weights. Their
per-model state is a `SelectionState`: how often each example was trained on, its last training
loss, the summed SAE codes of the examples trained on, the epoch and a key; `record_epoch` is
the shared `update`. The SAE policy builds its feature space offline (`sae_codes`) when it is made.
Only the SAE policy's choices read `train.epochs` (its curriculum's progress), so a finished run
of the others may be extended to more epochs.
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from datarater import config_checks, seeding, tasks
from datarater.config_checks import default, number
from datarater import features as features_lib
from datarater import sae as sae_lib
from datarater.errors import UserError
from datarater.policies import ranks, sae_scores
from datarater.policies.base import Policy, PolicyContext, register_policy, weigh_uniform

RATIO = {'ratio': default(number(0, 1, lo_open=True), 0.7)}  # the fraction trained on per epoch


@flax.struct.dataclass
class SelectionState:
  counts: jax.Array        # int32 [N]: epochs in which each example was trained on
  losses: jax.Array        # float32 [N]: each example's last observed training loss (0: unseen)
  factor_usage: jax.Array  # float32 [M]: SAE codes trained on so far, summed (M = 0 if unused)
  epoch: jax.Array         # int32 []: epochs completed
  key: jax.Array


def init_state(num_examples: int, key: jax.Array, num_factors: int = 0) -> SelectionState:
  return SelectionState(counts=jnp.zeros(num_examples, jnp.int32),
                        losses=jnp.zeros(num_examples, jnp.float32),
                        factor_usage=jnp.zeros(num_factors, jnp.float32),
                        epoch=jnp.zeros((), jnp.int32), key=key)


def record_epoch(aux, state: SelectionState, positions, weights, losses) -> SelectionState:
  """The common update: selection counts, last losses and (with SAE codes) factor usage.

  Entries with weight 0 (padding, or examples pruned to weight 0) are not counted.
  """
  used = weights > 0
  idx = jnp.where(used, positions, state.counts.shape[0])  # out of range -> dropped
  counts = state.counts.at[idx].add(1, mode='drop')
  last = state.losses.at[idx].set(losses.astype(jnp.float32), mode='drop')
  usage = state.factor_usage
  if aux is not None and 'codes' in aux:
    usage = usage + jnp.sum(jnp.take(aux['codes'], idx, axis=0, mode='fill', fill_value=0.0), 0)
  return state.replace(counts=counts, losses=last, factor_usage=usage, epoch=state.epoch + 1)


def gini(counts) -> float:
  """Gini coefficient of non-negative counts: 0 = all equal, -> 1 = all mass on one example."""
  x = np.sort(np.asarray(counts, np.float64))
  n = len(x)
  if n == 0 or x.sum() == 0:
    return 0.0
  return float((2 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum())) - (n + 1) / n)


def num_selected(num_examples: int, ratio: float) -> int:
  """max(1, round(ratio * N)), halves to even; ratio * N is rounded to 9 decimals first (0.7 * 45
  is 31.4999... in binary, a half here)."""
  if not 0.0 < ratio <= 1.0:
    raise UserError(f'policy.ratio must be in (0, 1], got {ratio}')
  return max(1, int(round(round(ratio * num_examples, 9))))


def _selection(name: str, n: int, select, aux=None, num_factors: int = 0,
               spans_epochs: bool = False, **cost) -> Policy:
  return Policy(name, n, lambda num, key: init_state(num, key, num_factors), select,
                weigh_uniform, record_epoch, aux, spans_epochs=spans_epochs, **cost)


def full(num_examples: int) -> Policy:
  """Every example every epoch, weight 1 (the reference)."""
  def select(aux, state):
    return (jnp.arange(num_examples, dtype=jnp.int32), jnp.ones(num_examples, jnp.float32), state)
  return _selection('full', num_examples, select)


def random(num_examples: int, ratio: float) -> Policy:
  """A fresh uniform random subset of n examples each epoch, weight 1."""
  n = num_selected(num_examples, ratio)

  def select(aux, state):
    key, sub = jax.random.split(state.key)
    idx = jax.random.permutation(sub, num_examples)[:n].astype(jnp.int32)
    return idx, jnp.ones(n, jnp.float32), state.replace(key=key)
  return _selection('random', n, select)


def infobatch(num_examples: int, ratio: float, max_prune_prob: float = 0.8) -> Policy:
  """InfoBatch-style: randomly prune well-learned (low-loss) examples, rescale the kept ones.

  Candidates are the examples whose last loss is below the mean (InfoBatch's rule; equal losses
  are not below theirs), widened to the lowest-loss ceil((N - n) / max_prune_prob) if there are
  too few, so exactly N - n are pruned with probability p = (N - n) / #candidates <=
  max_prune_prob (when the ratio is below 1-max_prune_prob, every example is a candidate and
  p = 1 - ratio exceeds it); kept candidates get weight 1 / (1 - p) so the expected gradient
  matches the full-data one. InfoBatch's annealing (its last ~12.5% of
  epochs on all data) is left out: every epoch trains on n examples, the budget every selection
  policy here has. Losses are those seen in training (the forward pass of the last epoch an
  example was in): the mean is over the examples seen so far, and those not yet trained on are
  never below it and rank after every seen one (a placeholder loss counted as seen would make
  them prunable or not by the task's loss scale). Equal losses are ranked in a random order, so
  epoch 0 (none seen) is random.
  """
  n = num_selected(num_examples, ratio)
  pruned = num_examples - n
  if not 0.0 < max_prune_prob < 1.0:
    raise UserError(f'policy.max_prune_prob must be in (0, 1), got {max_prune_prob}')
  min_candidates = min(num_examples, math.ceil(pruned / max_prune_prob))

  def select(aux, state):
    key, k_tie, k_prune = jax.random.split(state.key, 3)
    seen = state.counts > 0
    losses = jnp.where(seen, state.losses, jnp.inf)
    # The mean as the least seen loss plus the mean excess over it: equal losses have a mean
    # exactly equal to them (none below it), where a float32 sum rounds it to either side.
    least = jnp.min(losses)
    excess = jnp.sum(jnp.where(seen, state.losses - least, 0.0)) / jnp.maximum(jnp.sum(seen), 1)
    mean = least + excess
    tie = jax.random.uniform(k_tie, losses.shape)  # equal losses ranked in a random order
    loss_rank = ranks.inverse_permutation(jnp.lexsort((tie, losses)))
    below = losses < mean
    num_candidates = jnp.maximum(jnp.sum(below), min_candidates)
    candidate = loss_rank < num_candidates
    # Prune the `pruned` candidates with the smallest random priorities; keep everything else.
    priority = jnp.where(candidate, jax.random.uniform(k_prune, losses.shape), 2.0)
    kept = jnp.argsort(priority)[pruned:].astype(jnp.int32)
    prob = pruned / num_candidates.astype(jnp.float32)
    weights = jnp.where(candidate[kept], 1.0 / (1.0 - prob), 1.0).astype(jnp.float32)
    return kept, weights, state.replace(key=key)
  return _selection('infobatch', n, select)


def sae(codes, ratio: float, num_epochs: int, cfg, labels=None, num_classes: int = 0,
        setup_example_gradients: int = 0) -> Policy:
  """Top-n of the SAE curriculum score (see `sae_scores`), sampled with Gumbel noise; at
  temperature 0 the top n, equal scores in a random order (a tie broken by index would favour
  examples by where they lie in the split).

  `codes` [N, M] are the SAE codes of the training examples; `cfg` is the `sae_scores` config;
  `labels` [N] (the training labels, as seen) make representativeness class-conditional and
  enable the label guard (`cfg.mislabel_guard`): under `exclude` the suspected mislabels
  (`sae_scores.suspected_mislabels`, fixed when the policy is made) are selected only when the
  other examples cannot fill the budget of n.
  """
  codes = jnp.asarray(codes, jnp.float32)
  num_examples, num_factors = codes.shape
  n = num_selected(num_examples, ratio)
  config_checks.check_section('sae_scores', cfg, config_checks.SECTIONS['sae_scores'])
  if labels is not None and len(labels) != num_examples:
    raise UserError(f'SAE codes cover {num_examples} examples but the split has {len(labels)}')
  stats = sae_scores.factor_stats(codes, cfg.high_freq_fraction, labels, num_classes)
  guard = cfg.mislabel_guard
  suspect = (sae_scores.config_suspects(stats, cfg) if guard != 'off'
             else jnp.zeros(num_examples, bool))

  def select(aux, state):
    key, sub = jax.random.split(state.key)
    score = sae_scores.combined_score(aux['stats'], state.counts, state.factor_usage,
                                      state.epoch, num_epochs, cfg, aux['suspect'])
    # Gumbel top-n: n examples drawn without replacement from softmax(score / temperature); the
    # same order as score / temperature + noise, which a temperature above 1 uses (its product
    # with the noise overflows float32 from ~1e37 and ties the examples at inf in index order)
    noise = jax.random.gumbel(sub, score.shape)
    if cfg.temperature == 0:  # the top n, equal scores in the noise's order (not the split's)
      score = ranks.inverse_permutation(jnp.lexsort((noise, score)))
    elif cfg.temperature <= 1:
      score = score + cfg.temperature * noise
    else:
      score = score / cfg.temperature + noise
    if guard == 'exclude':  # after the noise: suspects only fill what the others cannot
      score = sae_scores.exclude_last(score, aux['suspect'])
    idx = jax.lax.top_k(score, n)[1].astype(jnp.int32)
    return idx, jnp.ones(n, jnp.float32), state.replace(key=key)
  aux = {'stats': stats, 'codes': codes, 'suspect': suspect}
  policy = _selection('sae', n, select, aux, num_factors, spans_epochs=True,  # its curriculum
                      setup_example_gradients=setup_example_gradients)

  def init(num, key):
    if num != num_examples:
      raise UserError(f'SAE codes cover {num_examples} examples but the split has {num}')
    return init_state(num, key, num_factors)
  return policy._replace(init=init)


def sae_codes(ctx: PolicyContext, seed: int = 0):
  """Offline stage of the SAE policy: features of the training split, an SAE on them, its codes.

  Returns (codes [N, M], info): the SAE metrics and the extractor's example-gradients.
  """
  feats, cost = features_lib.default_features(ctx.train, ctx.config.features)
  trained, metrics = sae_lib.train_sae(feats, ctx.config.sae, seeding.root_key(seed, 'sae'))
  return sae_lib.encode_all(trained, feats), {'sae': metrics, 'extractor_example_grads': cost,
                                              'feature_dim': int(feats.shape[1])}


@register_policy('full')
def _full(ctx: PolicyContext) -> Policy:
  return full(len(ctx.train))


@register_policy('random', schema=RATIO)
def _random(ctx: PolicyContext) -> Policy:
  return random(len(ctx.train), ctx.config.policy.ratio)


@register_policy('infobatch', schema={
    **RATIO, 'max_prune_prob': default(number(0, 1, lo_open=True, hi_open=True), 0.8)})
def _infobatch(ctx: PolicyContext) -> Policy:
  return infobatch(len(ctx.train), ctx.config.policy.ratio, ctx.config.policy.max_prune_prob)


@register_policy('sae', whole_split=True, schema=RATIO,
                 sections=('features', 'features.task', 'sae', 'sae_scores'))
def sae_policy(ctx: PolicyContext, codes=None, cost: int = 0) -> Policy:
  """The SAE policy of a config; `codes` skips the offline stage (precomputed SAE codes, which
  cost `cost` example-gradients)."""
  cfg = ctx.config
  if cfg.sae_scores.class_conditional:  # before the SAE is trained
    tasks.require_labels(ctx.task, 'sae_scores.class_conditional=True',
                         'set --config.sae_scores.class_conditional=false')
  if codes is None:
    codes, info = sae_codes(ctx, cfg.features.seed)
    cost = info['extractor_example_grads']
  labels, num_classes = None, 0
  if cfg.sae_scores.class_conditional:
    labels = np.asarray(ctx.task.labels(ctx.train.features))
    num_classes = tasks.num_classes(ctx.task)
  return sae(codes, cfg.policy.ratio, cfg.train.epochs, cfg.sae_scores, labels, num_classes,
             setup_example_gradients=cost)
