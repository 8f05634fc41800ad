"""Polyak averaging of the rater: an exponential moving average of its parameters over outer steps.

The average starts at zero and is debiased as Adam's moments are: after t updates with decay d,
    average_t = (1 - d) * sum_{s=1..t} d^(t - s) * phi_s / (1 - d^t),
a weighted mean of the iterates phi_1..phi_t (weights summing to 1). It does not change the
rater's training; it is the rater that is scored, reported and exported when `outer.ema` > 0.
It is kept in float32 at least: in a bfloat16 rater's own dtype a decay of 0.999 rounds to 1,
and the average would stay zero (debiased: 0 / 0).
"""
import functools

import jax
import jax.numpy as jnp

from datarater.tasks.base import at_least_float32


def init(params, decay: float):
  """The empty average (zeros like `params`, float32 at least), or None when `decay` is 0."""
  return jax.tree.map(lambda x: at_least_float32(jnp.zeros_like(x)), params) if decay else None


def _decay(decay: float, like):
  """(d, 1 - d) in the dtype of `like`: d is rounded once and both weights use that d (1 - d exact
  for d >= 1/2), so the weights of the iterates sum to what `debiased` divides by, at any d."""
  d = jnp.asarray(decay, jnp.result_type(like))
  return d, 1 - d


def update(average, params, decay: float):
  """One more iterate into the (undebiased) average: d * average + (1 - d) * params."""
  if average is None:
    return None
  def one(a, p):
    d, e = _decay(decay, a)
    return d * a + e * p.astype(a.dtype)
  return jax.tree.map(one, average, params)


@functools.partial(jax.jit, static_argnames='decay')
def debiased(average, params, decay: float, count):
  """The averaged parameters after `count` updates, divided by the sum of the iterates' weights,
  1 - d^count (as -expm1(count log1p(-(1 - d))): no cancellation for d near 1), in the dtype of
  `params`; `params` (the last iterate) when averaging is off or nothing has been averaged yet."""
  if average is None:
    return params
  count = jnp.asarray(count, jnp.int32)
  def one(a, p):
    _, e = _decay(decay, a)
    total = -jnp.expm1(jnp.maximum(count, 1).astype(e.dtype) * jnp.log1p(-e))
    return jnp.where(count > 0, (a / total).astype(p.dtype), p)
  return jax.tree.map(one, average, params)
