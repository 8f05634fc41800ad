"""Ranks: each entry's position in a stable ascending sort (0 = smallest; equal entries in index
order), with one sort instead of `argsort(argsort(x))`: the sort's inverse permutation.

`rank(x)` ranks along the last axis (a strict order, for choosing by position);
`percentile_rank` scales ranks to [0, 1], which makes scores of any scale comparable, and
`grouped_percentile_rank` ranks each entry within its group. As scores, equal entries share
their mean rank: a tie broken by position would favour examples by where they lie in the split.
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


def _mean_rank(key: jax.Array) -> jax.Array:
  """Each entry's rank in the ascending sort of 1-D `key`, equal entries sharing their mean."""
  ordered = jnp.sort(key)
  first = jnp.searchsorted(ordered, key, side='left')
  last = jnp.searchsorted(ordered, key, side='right') - 1
  return (first + last) / 2


def percentile_rank(x: jax.Array) -> jax.Array:
  """Rank of each entry of 1-D `x` scaled to [0, 1] (0 = smallest; ties share their mean)."""
  return (_mean_rank(x) / max(x.shape[0] - 1, 1)).astype(jnp.float32)


def grouped_percentile_rank(x: jax.Array, group: jax.Array, num_groups: int) -> jax.Array:
  """Rank of each entry among the entries of its group, scaled to [0, 1] (0 = smallest; ties
  share their mean)."""
  if num_groups == 1:
    return percentile_rank(x)
  # One integer key < N ordered by group, then by x: the index of the entry's run of equal
  # (group, x) pairs in that order (no product of group and N, which could overflow int32).
  order = jnp.lexsort((x, group))
  g, v = group[order], x[order]
  new_run = jnp.concatenate([jnp.ones(1, bool), (g[1:] != g[:-1]) | (v[1:] != v[:-1])])
  key = jnp.zeros_like(order).at[order].set(jnp.cumsum(new_run) - 1)
  size = jnp.bincount(group, length=num_groups)
  start = jnp.cumsum(size) - size
  return ((_mean_rank(key) - start[group]) / jnp.maximum(size[group] - 1, 1)).astype(jnp.float32)
