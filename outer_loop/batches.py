"""The bi-level step's data: inner batches [K, T, B, ...] and held-out batches [K, B, ...].

Which examples go where is a pure function of the outer step (`pipeline.stream_indices`), so a
resumed run continues the stream exactly, and every process agrees on the global batch while
reading only the rows that its own devices hold.
"""
import jax
import numpy as np

from datarater.data import pipeline

FEATURES = ('image', 'label')


class MetaBatches:
  """The train (possibly corrupted), held-out and eval splits, and the batch stream over them."""

  def __init__(self, config):
    d = config.data
    self.train = pipeline.load_split(d.name, d.train_split, d.data_dir, d.label_noise, d.noise_seed)
    self.heldout = pipeline.load_split(d.name, d.heldout_split, d.data_dir)
    self.eval = pipeline.load_split(d.name, d.eval_split, d.data_dir)
    self.seed = config.seed
    self.k, self.t = config.inner.population, config.inner.steps
    self.b_in, self.b_out = config.inner.batch_size, config.outer.batch_size

  def position(self, step: int) -> dict[str, int]:
    """Examples consumed from each stream before outer step `step` (the iterator state)."""
    return {'train': step * self.k * self.t * self.b_in, 'heldout': step * self.k * self.b_out}

  def indices_at(self, step: int):
    """Example indices (inner [K, T, B], held-out [K, B]) of outer step `step`."""
    pos = self.position(step)
    inner = pipeline.stream_indices(len(self.train), pos['train'], self.k * self.t * self.b_in,
                                    self.seed).reshape(self.k, self.t, self.b_in)
    outer = pipeline.stream_indices(len(self.heldout), pos['heldout'], self.k * self.b_out,
                                    self.seed + 1).reshape(self.k, self.b_out)
    return inner, outer

  def host_batches_at(self, step: int):
    """The whole global batches as numpy (for shapes, single-process tools and tests)."""
    inner, outer = self.indices_at(step)
    take = lambda split, idx: {name: getattr(split, name)[idx] for name in FEATURES}
    return take(self.train, inner), take(self.heldout, outer)

  def device_batches_at(self, step: int, inner_shardings, outer_shardings):
    """Global sharded jax.Arrays; each process gathers only the rows of its own devices."""
    inner, outer = self.indices_at(step)
    return (_gather(self.train, inner, inner_shardings),
            _gather(self.heldout, outer, outer_shardings))

  def input_spec(self) -> dict:
    return {'image_shape': list(self.train.image.shape[1:]), 'num_classes': self.train.num_classes}


def _gather(split: pipeline.Split, indices: np.ndarray, shardings: dict) -> dict:
  lead = indices.ndim

  def feature(name):
    values = getattr(split, name)
    shape = indices.shape + values.shape[1:]
    return jax.make_array_from_callback(
        shape, shardings[name], lambda idx: values[indices[idx[:lead]]][(Ellipsis,) + idx[lead:]])
  return {name: feature(name) for name in FEATURES}
