"""One weighted inner step and T of them unrolled with `lax.scan`, differentiable end to end.

`loss_fn(params, batch) -> [B]` is a task's per-example loss; `weight_fn(batch) -> [B]` gives the
weights (from a rater, or uniform). Gradients with respect to anything `weight_fn` closes over
(the rater's parameters) flow back through every step, optimizer state included.
"""
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from datarater.tasks.base import PerExampleLoss, at_least_float32
from inner_loop.weighting import weight_ess

WeightFn = Callable[[dict], jax.Array]  # batch -> loss weights [B]


@flax.struct.dataclass
class InnerState:
  params: Any
  opt_state: Any


def init_inner_state(params, optimizer: optax.GradientTransformation) -> InnerState:
  return InnerState(params=params, opt_state=optimizer.init(params))


def weighted_loss(loss_fn: PerExampleLoss, params, batch: dict, weights: jax.Array):
  """(mean(w_i * l_i), per-example losses l [B]), in float32 at least (a bfloat16 loss too)."""
  losses = at_least_float32(loss_fn(params, batch))
  return jnp.mean(weights * losses), losses


def inner_step(loss_fn: PerExampleLoss, optimizer: optax.GradientTransformation,
               state: InnerState, batch: dict, weights: jax.Array):
  """One optimizer step on the weighted loss; returns (new state, per-example losses before it)."""
  (_, losses), grads = jax.value_and_grad(weighted_loss, argnums=1, has_aux=True)(
      loss_fn, state.params, batch, weights)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return InnerState(optax.apply_updates(state.params, updates), opt_state), losses


def weighted_step(loss_fn: PerExampleLoss, optimizer: optax.GradientTransformation,
                  weight_fn: WeightFn, state: InnerState, batch: dict):
  """`inner_step` on the weights `weight_fn(batch)`; returns (new state, (the weighted loss
  mean(w_i * l_i) before it, the weights' `weight_ess`, free from the weights it has))."""
  weights = weight_fn(batch)
  state, losses = inner_step(loss_fn, optimizer, state, batch, weights)
  return state, (jnp.mean(weights * losses), weight_ess(weights))


def unroll(loss_fn: PerExampleLoss, optimizer: optax.GradientTransformation, weight_fn: WeightFn,
           state: InnerState, batches: dict, remat: bool = False):
  """T inner steps over `batches` (leaves [T, B, ...]); returns (final state, (weighted losses
  [T], weight ESS [T])), as `weighted_step`.

  `remat=True` wraps each step in `jax.checkpoint`: the backward pass recomputes a step's
  activations instead of storing them, trading compute for memory that grows with T.
  """
  step = functools.partial(weighted_step, loss_fn, optimizer, weight_fn)
  if remat:
    step = jax.checkpoint(step)
  return jax.lax.scan(step, state, batches)
