"""source.Source's block walk against brute force: every position read exactly once over the
shards, block b (of consecutive `size` positions, the last one shorter) read by shard b mod
num_shards, and `skip` leaving out a shard's own first blocks."""
import time

import numpy as np
import pytest

from datarater.data import pipeline
from datarater.data import source as source_lib


@pytest.fixture(scope='module')
def digits(tfds_dir):
  return pipeline.get_builder('sklearn_digits', tfds_dir)


@pytest.mark.parametrize('split,size,shards', [('train[:100]', 32, 1), ('train[:100]', 32, 3),
                                               ('train[:96]', 32, 2), ('train[:7]', 4, 4),
                                               ('train[:50]', 60, 2)])
def test_blocks_of_all_shards_read_every_position_once(digits, split, size, shards):
  src = source_lib.Source(digits, split)
  n = len(src)
  whole = src.take(np.arange(n))
  blocks = [[list(range(b, min(b + size, n))) for b in range(0, n, size)][s::shards]
            for s in range(shards)]  # brute force: block b of the split goes to shard b % shards
  seen = []
  for shard in range(shards):
    for skip in (0, 1):
      got = list(src.blocks(size, shard, shards, skip=skip))
      assert [p.tolist() for p, _ in got] == blocks[shard][skip:], (shard, skip)
      for positions, batch in got:
        for key, value in whole.items():
          if key != 'index':
            np.testing.assert_array_equal(batch[key], value[positions], key)
        np.testing.assert_array_equal(batch['index'], positions)
        if skip == 0:
          seen.extend(positions.tolist())
  assert sorted(seen) == list(range(n))


def test_the_next_block_is_read_while_the_caller_works_on_one(digits, monkeypatch):
  """While the caller holds block b (its device computation running), block b + 1 is already
  being read and decoded, unasked (read on demand, the device waited for every read); a read's
  error comes out where its block would have."""
  src = source_lib.Source(digits, 'train[:100]')
  started, take = [], src.take

  def logged(positions):
    started.append(int(positions[0]))
    if positions[0] == 64:
      raise RuntimeError('a planted read error')
    return take(positions)
  monkeypatch.setattr(src, 'take', logged)
  walk = src.blocks(32)
  assert next(walk)[0].tolist() == list(range(32))
  deadline = time.monotonic() + 10
  while len(started) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
  assert started == [0, 32]
  assert next(walk)[0].tolist() == list(range(32, 64))
  with pytest.raises(RuntimeError, match='a planted read error'):
    next(walk)


def test_a_block_read_is_corrupted_as_in_the_whole_split(tfds_dir):
  """With label noise planted: a streamed read of any positions, in blocks of any size, has the
  labels of the whole split loaded at once, and they differ from the stored labels exactly where
  the corruption record says."""
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  data = digits_data(tfds_dir, 0.3, 2)
  whole = pipeline.load_split(data, 'validation', corrupt=True)
  src = source_lib.open_source(data, 'validation', corrupt=True)
  n = len(src)
  np.testing.assert_array_equal(src.corruption_of(np.arange(n)), whole.corruption)
  stored = src.uncorrupted(np.arange(n))['label']
  positions = np.random.default_rng(0).permutation(n)
  for size in (1, 7, n):
    for start in range(0, n, size):
      p = positions[start:start + size]
      got = src.take(p)['label']
      np.testing.assert_array_equal(got, whole.features['label'][p], size)
      np.testing.assert_array_equal(got != stored[p], whole.corruption[p] != 0, size)


def test_a_read_with_repeats_reads_each_example_once(tfds_dir):
  """Positions repeated (a streamed chunk holds every seed's batches) come back as the whole
  split loaded at once has them, in their shape, with input corruptions and label noise planted,
  and the data source is asked for each example once."""
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  data = digits_data(tfds_dir, 0.3, 2)
  for kind in ('blur', 'duplicate', 'ood'):
    data.input_corruption[kind] = 0.1
  whole = pipeline.load_split(data, 'validation', corrupt=True)
  src = source_lib.open_source(data, 'validation', corrupt=True)
  n = len(src)
  rng = np.random.default_rng(0)
  positions = np.stack([rng.permutation(n)[:n // 2] for _ in range(3)]).reshape(3, 2, -1)
  asked = []
  read = src.data_source.__getitems__
  src.data_source.__getitems__ = lambda ids: asked.append(list(ids)) or read(ids)
  try:
    got = src.take(positions)
  finally:
    del src.data_source.__getitems__
  for key, value in whole.features.items():
    np.testing.assert_array_equal(got[key], value[positions], key)
  np.testing.assert_array_equal(got['index'], positions)
  wanted = np.unique(positions)
  # (a duplicate's source example is read too: every id asked beyond the wanted ones is one)
  first = asked[0]
  assert sorted(first) == wanted.tolist(), (len(first), len(wanted))
