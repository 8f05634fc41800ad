"""The device mesh the library's compiled steps run on: axes ('population', 'batch').

A leading axis of independent members (a rater run's population, a trainer's seeds) of size K
is split over as many devices as divide it (gcd(K, n)); the remaining devices split every batch.
The steps are written for one device and compiled by `jax.jit` with these shardings (GSPMD):
what the members share (a rater's parameters, a split's features) is replicated, and the
compiler sums over the batch axis where a step reduces a batch, so N devices compute the same
steps as one.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datarater.errors import UserError

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
                      f'use a multiple of {n}, or fewer devices (a run takes every device it '
                      'sees: CUDA_VISIBLE_DEVICES picks some)')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spans_processes(placement) -> bool:
  """Whether a mesh, sharding or array holds devices of another process than this one (of a
  `jax.distributed` job): an array there is made from each process's own shards (`from_host`)
  and read whole by a collective (`gathered`)."""
  if isinstance(placement, Mesh):
    placement = replicated(placement)
  return not placement.is_fully_addressable


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


def from_host(tree, sharding):
  """Host arrays that every process holds alike, placed on `sharding`: each process puts only
  the shards its devices hold, from its own copy, running no program (`jax.device_put` onto
  devices of several processes first gathers every process's whole copy onto every device to
  compare them)."""
  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(place, tree)


def host_copy(tree):
  """Numpy copies of replicated global arrays, on any process (no cross-process transfer)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def gathered(x) -> np.ndarray:
  """A numpy copy of the whole of array `x` on every process: where `x` spans other processes'
  devices, gathered from them (a collective: every process calls it alike)."""
  if not isinstance(x, jax.Array) or not spans_processes(x):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
