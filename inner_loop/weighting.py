"""Per-example loss weights from scores: w = B * softmax(score / tau) over the batch (mean 1)."""
from typing import Optional

import jax
import jax.numpy as jnp

from datarater.tasks.base import at_least_float32


def softmax_weights(scores: jax.Array, temperature: float,
                    mask: Optional[jax.Array] = None) -> jax.Array:
  """Weights over the last axis that average 1; a lower temperature makes them sharper.

  With `mask` (1 = a real example, 0 = padding), the softmax runs over the real examples only
  and they average 1 among themselves; padding weighs 0. In float32 at least, whatever the
  scores' dtype (in bfloat16, a batch of 128's weights were up to 3% off, summing to 128.04).
  """
  scores = at_least_float32(jnp.asarray(scores))
  if mask is None:
    return scores.shape[-1] * jax.nn.softmax(scores / temperature, axis=-1)
  real = mask > 0
  soft = jax.nn.softmax(jnp.where(real, scores / temperature, -jnp.inf), axis=-1)
  return jnp.where(real, jnp.sum(real, -1, keepdims=True) * soft, 0.0)
