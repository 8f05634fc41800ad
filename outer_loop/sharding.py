"""Placing the outer step on a device mesh with axes ('population', 'batch').

The population axis K is split over as many devices as divide it (gcd(K, n)); the remaining
devices split every batch. The step itself is written for one device and compiled by `jax.jit`
with these shardings (GSPMD): the meta-gradient of the replicated rater parameters is summed
across devices by the compiler, so N devices compute the same step as one.
"""
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datarater.errors import UserError
from outer_loop.meta_step import outer_step

POP, BATCH = 'population', 'batch'


def make_mesh(population_size: int, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  pop = math.gcd(population_size, len(devices))
  return Mesh(np.array(devices).reshape(pop, len(devices) // pop), (POP, BATCH))


def check_batch_sizes(mesh: Mesh, **batch_sizes: int) -> None:
  """One-line error if a batch does not split evenly over the mesh's batch axis."""
  n = mesh.shape[BATCH]
  for name, size in batch_sizes.items():
    if size % n:
      raise UserError(f'{name}={size} does not divide over {n} devices on the batch axis '
                      f'({mesh.devices.size} devices, population axis {mesh.shape[POP]}); '
                      f'use a multiple of {n}')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def population_sharding(mesh: Mesh, tree):
  """Leaves with a leading population axis are split over it."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P(POP)), tree)


def batch_sharding(mesh: Mesh, tree, batch_axis: int):
  """Leaves [K, ..., B, ...]: population axis 0, batch axis `batch_axis`."""
  def spec(leaf):
    axes = [None] * np.ndim(leaf)
    axes[0], axes[batch_axis] = POP, BATCH
    return NamedSharding(mesh, P(*axes))
  return jax.tree.map(spec, tree)


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


def host_copy(tree):
  """Numpy copies of replicated global arrays, on any process (no cross-process transfer)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
