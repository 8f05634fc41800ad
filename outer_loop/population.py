"""A population of K inner models (leading K axis) with staggered re-initialisation.

Member k is re-initialised whenever (step + offset_k) % R == 0, offset_k = k * R // K, so at any
outer step the population spans models young and old and the rater learns for every stage.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from inner_loop.unroll import InnerState

InitMember = Callable[[jax.Array], InnerState]  # key -> fresh InnerState


def init_population(init_member: InitMember, key: jax.Array, size: int) -> InnerState:
  return jax.vmap(init_member)(jax.random.split(key, size))


def reset_mask(step: jax.Array, size: int, reset_every: int) -> jax.Array:
  """bool [K]: which members are re-initialised at this outer step (never at step 0)."""
  # (step + offset) % R == 0 as step % R == (R - offset) % R, offsets exact in Python ints:
  # nothing leaves int32 for any R and step in it.
  due = jnp.asarray([(reset_every - k * reset_every // size) % reset_every for k in range(size)],
                    jnp.int32)
  return (step > 0) & (step % reset_every == due)


def staggered_reset(population: InnerState, init_member: InitMember, key: jax.Array,
                    step: jax.Array, reset_every: int) -> InnerState:
  """Replaces the members due at `step` by fresh ones drawn from fold_in(key, step)."""
  size = jax.tree.leaves(population)[0].shape[0]
  mask = reset_mask(step, size, reset_every)
  return _replace_members(population, mask, init_member, jax.random.fold_in(key, step))


def finite_members(population: InnerState) -> jax.Array:
  """bool [K]: members whose parameters and optimizer state are all finite."""
  size = jax.tree.leaves(population)[0].shape[0]
  ok = jnp.ones(size, bool)
  for leaf in jax.tree.leaves(population):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok &= jnp.all(jnp.isfinite(leaf.reshape(size, -1)), axis=1)
  return ok


def reset_diverged(population: InnerState, init_member: InitMember, key: jax.Array,
                   step: jax.Array) -> tuple[InnerState, jax.Array]:
  """Members with non-finite parameters or optimizer state start afresh; (population, count)."""
  ok = finite_members(population)
  reset_key = jax.random.fold_in(jax.random.fold_in(key, 0x7fffffff), step)
  return _replace_members(population, ~ok, init_member, reset_key), jnp.sum(~ok)


def _replace_members(population: InnerState, mask: jax.Array, init_member: InitMember,
                     key: jax.Array) -> InnerState:
  """Members where `mask` [K] is True replaced by those of a fresh population drawn from `key`.
  The K fresh members are drawn only at a step where some member is replaced (`lax.cond`: most
  outer steps replace none, and drawing them costs a tenth of a small model's step)."""
  size = mask.shape[0]

  def replace(population):
    def select(new, old):
      return jnp.where(mask.reshape((size,) + (1,) * (old.ndim - 1)), new, old)
    return jax.tree.map(select, init_population(init_member, key, size), population)
  return jax.lax.cond(jnp.any(mask), replace, lambda population: population, population)
