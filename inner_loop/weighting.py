"""Per-example loss weights from scores: w = B * softmax(score / tau) over the batch (mean 1)."""
from typing import Optional

import jax
import jax.numpy as jnp

from datarater.errors import UserError
from datarater.tasks.base import at_least_float32


def check_batch_size(batch_size: int, field: str) -> None:
  """Refuses batches of one example: its softmax weight is 1 whatever its score, so the weights
  would weigh nothing (and a rater trained through them would get no meta-gradient)."""
  if batch_size < 2:
    raise UserError(f'{field}={batch_size}: the loss weights are a softmax over each batch, '
                    'always 1 for a batch of one example whatever its score; use 2 or more')


def softmax_weights(scores: jax.Array, temperature: float,
                    mask: Optional[jax.Array] = None) -> jax.Array:
  """Weights over the last axis that average 1; a lower temperature makes them sharper.

  With `mask` (1 = a real example, 0 = padding), the softmax runs over the real examples only
  and they average 1 among themselves; padding weighs 0. In float32 at least, whatever the
  scores' dtype (bfloat16's 8 bits of precision would put the weights and their sum percents off).
  The largest real score is subtracted before dividing by the temperature, so any finite scores
  give finite weights (else large scores over a small temperature overflow to inf, the weights
  NaN).
  """
  scores = at_least_float32(jnp.asarray(scores))
  real = jnp.ones(scores.shape, bool) if mask is None else mask > 0
  top = jnp.max(jnp.where(real, scores, -jnp.inf), axis=-1, keepdims=True)
  shifted = jnp.where(real, scores - jax.lax.stop_gradient(top), -jnp.inf)  # <= 0, or -inf
  soft = jax.nn.softmax(shifted / temperature, axis=-1)
  return jnp.where(real, jnp.sum(real, -1, keepdims=True) * soft, 0.0)


def weight_ess(weights: jax.Array) -> jax.Array:
  """Kish effective sample size of mean-1 weights over the last axis as a fraction of it,
  (sum w)^2 / (B sum w^2) = 1 / mean(w^2): 1 for uniform weights, 1/B when one example takes all.
  Not differentiated (a statistic to log)."""
  return 1.0 / jnp.mean(jax.lax.stop_gradient(weights) ** 2, axis=-1)
