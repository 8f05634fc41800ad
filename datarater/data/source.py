"""A split read on demand: decoded, corrupted examples by position, in blocks, never all at once.

`Source(builder, split, corruption)` is the streaming counterpart of `pipeline.Split`: the same
features, ids, corruption record and `take(positions)`, but examples are read from the TFDS
array_record files (`as_data_source`, random access) when asked for, and corrupted block by
block (`Corruption.apply` gives a block the same values as the whole split). Memory is a few
bytes per example (the corruption record) plus two blocks. `blocks(size, shard)` walks the split
in fixed-size blocks, optionally only those of one process of a multi-process job, reading each
block in a background thread while the caller works on the one before (`read_ahead`).
"""
import concurrent.futures
import threading
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from datarater.data import corruption as corruption_lib
from datarater.data import pipeline


RELEASE_EVERY = 1 << 17  # examples a sequential walk reads between closing its file readers
RECORD_BLOCK = 4096  # examples read at once for a dataset's own corruption record


class Source:
  """Random access to the decoded examples of a split expression."""

  def __init__(self, builder, split: str,
               corruption: Optional[corruption_lib.Corruption] = None):
    pipeline.check_split(builder, split)
    self.info = pipeline.data_info(builder)
    self.split = split
    self._builder = builder
    self._reading = threading.RLock()  # the record files: one reader at a time (`blocks` reads
    with pipeline.damaged_records(builder):  # ahead in a thread)
      self.data_source = builder.as_data_source(split=split)  # the split's records, by id
    self._n = len(self.data_source)
    self.corruption = corruption or corruption_lib.Corruption()
    self.ids = np.arange(self._n, dtype=np.int64)
    self.corruption_kinds = pipeline.corruption_kinds(self.info, self.corruption)
    self.corruption_record = (None if pipeline.RECORDED in self.info.num_classes  # per block
                              else self.corruption.record(self._n))

  def __len__(self) -> int:
    return self._n

  def uncorrupted(self, positions) -> dict:
    """Raw (undecoded) features of the examples at `positions` (1-d), as stored."""
    with self._reading:
      examples = pipeline.read_records(self._builder, self.data_source,
                                       [int(p) for p in np.asarray(positions)])
    return pipeline.stack_examples(self.info, examples)

  def raw(self, positions) -> dict:
    """Raw (undecoded) features of the examples at `positions` (1-d), corrupted."""
    positions = np.asarray(positions, np.int64)
    return self.corruption.apply(self.info, self.uncorrupted(positions), positions, self._n,
                                 source=self.uncorrupted)[0]

  def take(self, positions) -> dict:
    """Decoded features of the examples at `positions` (any shape), with `index` = positions."""
    positions = np.asarray(positions)
    # Each example once (a streamed chunk holds every seed's batches: on a small split, the same
    # examples several times), then repeated where asked.
    unique, inverse = np.unique(positions.reshape(-1), return_inverse=True)
    batch = pipeline.decode(self.info, self.raw(unique))
    batch = {k: v[inverse].reshape(*positions.shape, *v.shape[1:]) for k, v in batch.items()}
    batch['index'] = positions.astype(np.int32)
    return batch

  def corruption_of(self, positions) -> np.ndarray:
    """The corruption record (kind index) of the examples at `positions`."""
    positions = np.asarray(positions, np.int64)
    if self.corruption_record is not None:
      return self.corruption_record[positions]
    # A dataset's own record is a feature of each example: whole examples are read, a block at a
    # time, so a record of the whole split costs a byte an example.
    flat = positions.reshape(-1)
    out = np.empty(len(flat), np.int8)
    for i in range(0, len(flat), RECORD_BLOCK):
      out[i:i + RECORD_BLOCK] = self.raw(flat[i:i + RECORD_BLOCK])[pipeline.RECORDED]
    return out.reshape(positions.shape)

  def block_starts(self, size: int, shard: int = 0, num_shards: int = 1) -> list[int]:
    """Start positions of the fixed-size blocks that shard `shard` of `num_shards` reads."""
    return pipeline.block_starts(self._n, size, shard, num_shards)

  def blocks(self, size: int, shard: int = 0, num_shards: int = 1,
             skip: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
    """(positions, batch) of this shard's blocks after its first `skip`; the last block of the
    split is shorter (callers that compile per shape pad it). Read ahead (`read_ahead`): the
    next block is read while the caller works on this one; a loop that may stop early closes
    the walk (`contextlib.closing`), which ends its read thread."""
    def walk():  # (positions, whether the files behind are done with) of each block, lazily
      walked = 0
      for start in self.block_starts(size, shard, num_shards)[skip:]:
        positions = np.arange(start, min(start + size, self._n))
        walked += len(positions)
        release = walked > RELEASE_EVERY
        walked = len(positions) if release else walked
        yield positions, release

    def read(block):
      positions, release = block
      if release:
        with self._reading:
          release_readers(self.data_source)
      return positions, self.take(positions)
    return read_ahead(read, walk())


def read_ahead(read: Callable[[Any], Any], items: Iterable) -> Iterator[Any]:
  """`read(item)` of each item in order, each computed in a background thread while the caller
  works on the one before (its device computation then overlaps the host's reading and
  decoding). One thread: the reads run one at a time, in order. A read's error is raised where
  its result would have been yielded. Closing the generator early (`close`, as
  `contextlib.closing` does on leaving its block) waits for the read in flight and ends the
  thread; left unclosed, the thread lives until the generator is collected."""
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='datarater-read') as pool:
    pending = None
    for item in items:
      ahead = pool.submit(read, item)
      if pending is not None:
        yield pending.result()
      pending = ahead
    if pending is not None:
      yield pending.result()


def release_readers(data_source) -> None:
  """Closes the open file readers of a TFDS array_record data source (each holds its file's
  record index in memory, ~50 bytes a record); the next read reopens the file it needs.
  Sequential walks call it now and then, so memory does not grow with the files passed."""
  readers = getattr(data_source, 'data_source', None)
  if hasattr(readers, '__exit__'):
    readers.__exit__(None, None, None)


def open_source(data, split: str, corrupt: bool = False) -> Source:
  """The streaming split `split` of the dataset of a `data` config section."""
  return Source(pipeline.builder_of(data), split,
                corruption_lib.from_config(data) if corrupt else None)
