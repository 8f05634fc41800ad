"""The bi-level step's data: inner batches [K, A + T, B, ...] and held-out batches [K, B, ...].

Which examples go where is a pure function of the outer step (`pipeline.stream_indices`), so a
resumed run continues the stream exactly, and every process (each holding the whole splits)
agrees on the global batch while gathering only the rows that its own devices hold.
"""
import jax
import numpy as np

from datarater.data import pipeline
from datarater.errors import UserError
from datarater.mesh import batch_sharding


class MetaBatches:
  """The train (possibly corrupted), held-out and eval splits, and the batch stream over the
  first two."""

  def __init__(self, config):
    d = config.data
    self.train = pipeline.load_split(d, d.train_split, corrupt=True)
    self.heldout = pipeline.load_split(d, d.heldout_split)
    shared = pipeline.shared_examples(pipeline.builder_of(d), d.train_split, d.heldout_split)
    if shared:  # the outer loss would score clean copies of (possibly corrupted) training data
      raise UserError(f'data.heldout_split {d.heldout_split!r} shares {shared} examples with '
                      f'data.train_split {d.train_split!r}: the held-out loss the rater learns '
                      'from must come from other examples (choose disjoint splits)')
    self.eval = pipeline.load_split(d, d.eval_split)
    self.info = self.train.info
    self.seed = config.seed
    self.k = config.inner.population
    self.t = config.inner.advance_steps + config.inner.steps  # advanced, then unrolled
    self.b_in, self.b_out = config.inner.batch_size, config.outer.batch_size

  def position(self, step: int) -> dict[str, int]:
    """Examples consumed from each stream before outer step `step` (the iterator state)."""
    return {'train': step * self.k * self.t * self.b_in, 'heldout': step * self.k * self.b_out}

  def indices_at(self, step: int):
    """Example positions (inner [K, A + T, B], held-out [K, B]) of outer step `step`."""
    pos = self.position(step)
    inner = pipeline.stream_indices(len(self.train), pos['train'], self.k * self.t * self.b_in,
                                    self.seed).reshape(self.k, self.t, self.b_in)
    outer = pipeline.stream_indices(len(self.heldout), pos['heldout'], self.k * self.b_out,
                                    self.seed + 1).reshape(self.k, self.b_out)
    return inner, outer

  def host_batches_at(self, step: int):
    """The whole global batches as numpy (for shapes, single-process tools and tests)."""
    inner, outer = self.indices_at(step)
    return self.train.take(inner), self.heldout.take(outer)

  def device_batches_at(self, step: int, inner_shardings, outer_shardings):
    """Global sharded jax.Arrays; each process gathers only the rows of its own devices."""
    inner, outer = self.indices_at(step)
    return (_gather(self.train, inner, inner_shardings),
            _gather(self.heldout, outer, outer_shardings))


def take_on_mesh(split: pipeline.Split, positions: np.ndarray, mesh) -> dict:
  """`split.take(positions)` (positions [K, B]) as global arrays on `mesh`, placed as the run's
  batches are: members over its population axis, examples over its batch axis."""
  return _gather(split, positions,
                 batch_sharding(mesh, split.take(positions[:1, :1]), batch_axis=1))


def _gather(split: pipeline.Split, positions: np.ndarray, shardings: dict) -> dict:
  lead = positions.ndim
  columns = {**split.features, 'index': np.arange(len(split), dtype=np.int32)}

  def feature(name):
    values = columns[name]
    shape = positions.shape + values.shape[1:]
    return jax.make_array_from_callback(
        shape, shardings[name],
        lambda idx: values[positions[idx[:lead]]][(Ellipsis,) + idx[lead:]])
  return {name: feature(name) for name in columns}
