"""Polyak averaging of the rater: an exponential moving average of its parameters over outer steps.

The average starts at zero and is debiased as Adam's moments are: after t updates with decay d,
    average_t = (1 - d) * sum_{s=1..t} d^(t - s) * phi_s / (1 - d^t),
a weighted mean of the iterates phi_1..phi_t (weights summing to 1). It does not change the
rater's training; it is the rater that is scored, reported and exported when `outer.ema` > 0.
"""
import jax
import jax.numpy as jnp
import optax


def init(params, decay: float):
  """The empty average (zeros like `params`), or None when `decay` is 0 (averaging off)."""
  return jax.tree.map(jnp.zeros_like, params) if decay else None


def update(average, params, decay: float):
  """One more iterate into the (undebiased) average: decay * average + (1 - decay) * params."""
  if average is None:
    return None
  return optax.incremental_update(params, average, 1.0 - decay)


def debiased(average, params, decay: float, count):
  """The averaged parameters after `count` updates (optax's bias correction); `params` (the last
  iterate) when averaging is off or nothing has been averaged yet."""
  if average is None:
    return params
  count = jnp.asarray(count, jnp.int32)
  corrected = optax.tree.bias_correction(average, decay, jnp.maximum(count, 1))
  return jax.tree.map(lambda a, p: jnp.where(count > 0, a, p), corrected, params)
