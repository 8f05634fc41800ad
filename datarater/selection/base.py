"""The per-epoch selection interface shared by every policy, and the explicit selection state.

A `SelectionPolicy` is three pure functions (optax-style):
  init(num_examples, key) -> SelectionState
  select(state) -> (indices [n] int32, weights [n] float32, state)   # this epoch's subset
  update(state, indices, weights, losses) -> state                   # after the epoch
`indices` may be padded with `num_examples` (out of range) at weight 0: such entries are skipped by
`update` and cost no example-gradient. All shapes are static, so `select`/`update` jit. Arrays a
policy needs (e.g. the SAE factor statistics) live in `state.aux`, not in closures, so they are
arguments of the compiled epoch rather than constants baked into it: one compilation then serves
every seed and dataset of the same shapes.
"""
from typing import Any, Callable, NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SelectionState:
  counts: jax.Array        # int32 [N]: epochs in which each example was trained on
  losses: jax.Array        # float32 [N]: each example's last observed training loss
  factor_usage: jax.Array  # float32 [M]: SAE factor mass trained on so far (M = 0 if unused)
  epoch: jax.Array         # int32 []: epochs completed
  key: jax.Array
  aux: Any = None          # the policy's constant arrays (a pytree), read by select/update


class SelectionPolicy(NamedTuple):
  init: Callable[[int, jax.Array], SelectionState]
  select: Callable[[SelectionState], tuple[jax.Array, jax.Array, SelectionState]]
  update: Callable[[SelectionState, jax.Array, jax.Array, jax.Array], SelectionState]
  num_selected: int  # n: examples (and example-gradients) per epoch


def init_state(num_examples: int, key: jax.Array, num_factors: int = 0,
               initial_loss: float = 1.0, aux: Any = None) -> SelectionState:
  return SelectionState(counts=jnp.zeros(num_examples, jnp.int32),
                        losses=jnp.full(num_examples, initial_loss, jnp.float32),
                        factor_usage=jnp.zeros(num_factors, jnp.float32),
                        epoch=jnp.zeros((), jnp.int32), key=key, aux=aux)


def record_epoch(state: SelectionState, indices: jax.Array, weights: jax.Array,
                 losses: jax.Array, codes: jax.Array | None = None) -> SelectionState:
  """The common update: selection counts, last losses and (with SAE codes) factor usage.

  Entries with weight 0 (padding, or examples pruned to weight 0) are not counted.
  """
  chex.assert_equal_shape([indices, weights, losses])
  used = weights > 0
  idx = jnp.where(used, indices, state.counts.shape[0])  # out of range -> dropped
  counts = state.counts.at[idx].add(1, mode='drop')
  last = state.losses.at[idx].set(losses.astype(jnp.float32), mode='drop')
  usage = state.factor_usage
  if codes is not None:
    usage = usage + jnp.sum(jnp.take(codes, idx, axis=0, mode='fill', fill_value=0.0), 0)
  return state.replace(counts=counts, losses=last, factor_usage=usage, epoch=state.epoch + 1)


def gini(counts) -> float:
  """Gini coefficient of non-negative counts: 0 = all equal, -> 1 = all mass on one example."""
  x = np.sort(np.asarray(counts, np.float64))
  n = len(x)
  if n == 0 or x.sum() == 0:
    return 0.0
  return float((2 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum())) - (n + 1) / n)


def percentile_rank(x: jax.Array) -> jax.Array:
  """Rank of each entry scaled to [0, 1] (0 = smallest); makes scores of any scale comparable."""
  n = x.shape[0]
  return jnp.argsort(jnp.argsort(x)).astype(jnp.float32) / max(n - 1, 1)
