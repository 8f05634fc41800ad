"""Online filtering policies: a trained rater drops examples as batches arrive (weight 0).

The two ways the DataRater paper deploys a rater online:
- `datarater_batch_filter`: of each batch of B, only the N = floor((1 - rho) B) best-scored get a
  gradient (weight B / N, so the loss is the mean over the N kept; padding is not counted in B);
  a rho with N = 0 for train.batch_size is refused (`kept_per_batch`); it declares N
  (`Policy.kept_rows`), so the trainer's steps compute the task on those N rows alone;
- `datarater_accept`: each example is kept with the probability that it would survive batch-level
  filtering of M = ceil(B / (1 - rho)) examples down to B, given its score's rank among the
  rater's scores of the whole training split (computed once; an example whose score equals
  others' takes each of their ranks with equal chance, ties broken at random as in a shuffled
  batch); kept examples share the batch's loss equally. Per-example decisions need no batch, so
  this runs inside any input pipeline. Its kept count has no bound below B, so the trainer's
  steps still compute the task on every row (weight 0 on those dropped): no compute saved.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from datarater.config_checks import default, number
from datarater.errors import UserError
from datarater.policies import ranks
from datarater.policies.base import (FromScores, Policy, PolicyContext, keep_state, no_state,
                                     register_policy, select_all)
from datarater.policies.weighting import loaded_rater

RHO = {'rho': default(number(0, 1, hi_open=True), 0.2)}  # the fraction of each batch filtered out


def check_rho(rho: float) -> float:
  if not 0 <= rho < 1:
    raise UserError(f'policy.rho (the filtered fraction) must be in [0, 1), got {rho}')
  return float(rho)


def _floor_kept(batch_size: int, rho: float) -> int:
  # In float64 on the host: in float32 (1 - rho) * B can fall below an integer by more than 1e-6.
  return int(math.floor((1 - rho) * batch_size + 1e-6))


def kept_per_batch(batch_size: int, rho: float) -> int:
  """N = floor((1 - rho) B), the examples of a batch of B the batch filter keeps. A rho that
  keeps none is refused: the filter keeps at least one, so it would filter less than rho."""
  n = _floor_kept(batch_size, check_rho(rho))
  if n < 1:
    raise UserError(f'policy.rho={rho} keeps floor((1 - rho) * {batch_size}) = 0 of each batch of '
                    f'train.batch_size={batch_size}: use rho <= {1 - 1 / batch_size:.4g} or '
                    f'train.batch_size >= {math.ceil(1 / (1 - rho) - 1e-6)}')
  return n


def source_batch_size(batch_size: int, rho: float) -> int:
  """M = ceil(B / (1 - rho)): examples drawn per filtered batch of B."""
  return int(math.ceil(batch_size / (1.0 - check_rho(rho)) - 1e-9))


def survival_probability(rank_fraction: jax.Array, rho: float, batch_size: int) -> jax.Array:
  """P(an example survives batch-level filtering) given the fraction u of scores below its own.

  In a batch of M = ceil(B / (1 - rho)), it survives if fewer than B of the other M - 1 examples
  score higher; that count is Binomial(M - 1, 1 - u), so P = I_u(M - B, B) (regularised beta).
  """
  m = source_batch_size(batch_size, rho)
  if m == batch_size:
    return jnp.ones_like(rank_fraction)
  return jax.scipy.special.betainc(float(m - batch_size), float(batch_size),
                                   jnp.clip(rank_fraction, 0.0, 1.0))


def batch_filter(score_fn, score_params, rho: float, num_examples: int, **cost) -> Policy:
  """Keeps the best floor((1 - rho) B) of every batch; `score_fn(params, batch) -> [B]`."""
  check_rho(rho)

  def kept_rows(b: int) -> int:
    # N of b real rows, at least one: an epoch's short last batch may round to none
    # (kept_per_batch refuses a rho that does so for a full batch). It grows with b, so N of B
    # bounds every batch's (`Policy.kept_rows`).
    return max(1, _floor_kept(b, rho))

  def weigh(aux, state, params, batch, weights):
    del state, params
    real = weights > 0
    b = jnp.sum(real)
    kept = jnp.asarray([kept_rows(k) for k in range(weights.shape[0] + 1)], b.dtype)
    n = kept[b]
    scores = jnp.where(real, score_fn(aux, batch), -jnp.inf)
    rank = ranks.rank(-scores)  # 0 = best; ties to the lower position
    keep = real & (rank < n)
    return jax.lax.stop_gradient(weights * keep * (b / n))
  return Policy('datarater_batch_filter', num_examples, no_state, select_all(num_examples), weigh,
                keep_state, score_params, forwards_per_example=1.0, kept_rows=kept_rows,
                **cost)


def tie_survival(ref: np.ndarray, rho: float, batch_size: int):
  """(distinct reference scores, float32 [U]; survival probability of an example holding each
  score, [U]) of the sorted float32 reference scores `ref`: the mean of
  `survival_probability(r / N)` over the ranks r of the reference scores equal to it (one rank
  each when distinct), since equal scores are ordered at random in a batch. Averaged in float64
  on the host."""
  n = len(ref)
  values, first, count = np.unique(ref, return_index=True, return_counts=True)
  ranks_p = np.asarray(survival_probability(jnp.arange(n) / n, rho, batch_size), np.float64)
  return values, (np.add.reduceat(ranks_p, first) / count).astype(np.float32)


def acceptance_probability(aux, scores: jax.Array, rho: float, batch_size: int) -> jax.Array:
  """P(kept) of examples with `scores`, from the reference in `aux` ('sorted', 'values',
  'tied'): the tied mean (`tie_survival`) for a score the reference holds, else the survival
  probability of the fraction of reference scores below it."""
  below = jnp.searchsorted(aux['sorted'], scores, side='left') / aux['sorted'].shape[0]
  k = jnp.minimum(jnp.searchsorted(aux['values'], scores, side='left'),
                  aux['values'].shape[0] - 1)
  return jnp.where(aux['values'][k] == scores, aux['tied'][k],
                   survival_probability(below, rho, batch_size))


def acceptance_filter(score_fn, score_params, reference_scores: np.ndarray, rho: float,
                      batch_size: int, **cost) -> Policy:
  """Keeps each example with its survival probability (see the module docstring).

  The state holds a key and the epoch, so every (epoch, example) gets its own draw.
  """
  check_rho(rho)
  num_examples = len(reference_scores)
  ref = np.sort(np.asarray(reference_scores, np.float32))
  values, tied = tie_survival(ref, rho, batch_size)
  aux = {'params': score_params, 'sorted': jnp.asarray(ref), 'values': jnp.asarray(values),
         'tied': jnp.asarray(tied)}

  def init(num, key):
    del num
    return {'key': key, 'epoch': jnp.zeros((), jnp.int32)}

  def weigh(aux, state, params, batch, weights):
    del params
    p = acceptance_probability(aux, score_fn(aux['params'], batch), rho, batch_size)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(state['key'], state['epoch']),
                                                 i))(batch['index'])
    accept = (weights > 0) & (jax.vmap(jax.random.uniform)(keys) < p)
    real = jnp.sum(weights > 0)
    return jax.lax.stop_gradient(weights * accept * (real / jnp.maximum(jnp.sum(accept), 1)))

  def update(aux, state, positions, weights, losses):
    del aux, positions, weights, losses
    return {**state, 'epoch': state['epoch'] + 1}
  return Policy('datarater_accept', num_examples, init, select_all(num_examples), weigh, update,
                aux, forwards_per_example=1.0, **cost)


@register_policy('datarater_batch_filter', reads=('rater',), schema=RHO)
def _batch_filter(ctx: PolicyContext) -> Policy:
  kept_per_batch(ctx.config.train.batch_size, ctx.config.policy.rho)  # before loading the rater
  rater = loaded_rater(ctx, 'datarater_batch_filter')
  return batch_filter(rater.rater.score, rater.params, ctx.config.policy.rho, len(ctx.train),
                      setup_example_gradients=rater.training_example_gradients,
                      check_data=rater.rater.check_data)


@register_policy('datarater_accept', reads=('rater',), schema=RHO)
def _accept(ctx: PolicyContext) -> FromScores:
  rater = loaded_rater(ctx, 'datarater_accept')
  return FromScores(lambda b: rater.rater.score(rater.params, b), lambda scores: (
      acceptance_filter(rater.rater.score, rater.params, scores, ctx.config.policy.rho,
                        ctx.config.train.batch_size,
                        setup_example_gradients=rater.training_example_gradients,
                        setup_forwards=len(ctx.train), check_data=rater.rater.check_data)),
                    'rater scores')
