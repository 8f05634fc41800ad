"""Placing the outer step on a device mesh with axes ('population', 'batch') (`datarater.mesh`).

The population axis K is split over as many devices as divide it (gcd(K, n)); the remaining
devices split every batch. The step itself is written for one device and compiled by `jax.jit`
with these shardings (GSPMD): the meta-gradient of the replicated rater parameters is summed
across devices by the compiler, so N devices compute the same step as one.
"""
import functools

import jax
from jax.sharding import Mesh

from datarater.mesh import batch_sharding, population_sharding, replicated
from outer_loop.meta_step import outer_step


def outer_state_sharding(mesh: Mesh, state):
  """Rater, optimizer state, step and key replicated; the population split over devices."""
  shardings = jax.tree.map(lambda _: replicated(mesh), state)
  return shardings.replace(population=population_sharding(mesh, state.population))


def jit_outer_step(problem, estimator, mesh: Mesh, abstract_state, example_inner, example_outer):
  """The outer step compiled for `mesh`: returns (step_fn, state, inner, outer shardings).

  `step_fn(state, inner_batches, outer_batches) -> (state, metrics)`, donating the old state.
  """
  state_sh = outer_state_sharding(mesh, abstract_state)
  inner_sh = batch_sharding(mesh, example_inner, batch_axis=2)
  outer_sh = batch_sharding(mesh, example_outer, batch_axis=1)
  step_fn = jax.jit(functools.partial(outer_step, problem, estimator),
                    in_shardings=(state_sh, inner_sh, outer_sh),
                    out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)
  return step_fn, state_sh, inner_sh, outer_sh

