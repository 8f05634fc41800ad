"""Ranks: each entry's position in a stable ascending sort (0 = smallest; equal entries in index
order), with one sort instead of `argsort(argsort(x))`: the sort's inverse permutation.

`rank(x)` ranks along the last axis; `percentile_rank` scales a rank to [0, 1], which makes
scores of any scale comparable; `grouped_percentile_rank` ranks each entry within its group.
"""
import jax
import jax.numpy as jnp


def inverse_permutation(order: jax.Array) -> jax.Array:
  """The permutation p with p[order[i]] = i along the last axis: `argsort(order)` without a
  sort."""
  invert = lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(o.shape[0], dtype=o.dtype))
  for _ in range(order.ndim - 1):
    invert = jax.vmap(invert)
  return invert(order)


def rank(x: jax.Array) -> jax.Array:
  """Position of each entry in the stable ascending sort of x's last axis (0 = smallest)."""
  return inverse_permutation(jnp.argsort(x, axis=-1))


def percentile_rank(x: jax.Array) -> jax.Array:
  """Rank of each entry of 1-D `x` scaled to [0, 1] (0 = smallest)."""
  return rank(x).astype(jnp.float32) / max(x.shape[0] - 1, 1)


def grouped_percentile_rank(x: jax.Array, group: jax.Array, num_groups: int) -> jax.Array:
  """Rank of each entry among the entries of its group, scaled to [0, 1] (0 = smallest)."""
  if num_groups == 1:
    return percentile_rank(x)
  pos = inverse_permutation(jnp.lexsort((x, group)).astype(group.dtype))  # by group, then by x
  size = jnp.bincount(group, length=num_groups)
  start = jnp.cumsum(size) - size
  return ((pos - start[group]) / jnp.maximum(size[group] - 1, 1)).astype(jnp.float32)
