"""source.Source's block walk against brute force: every position read exactly once over the
shards, block b (of consecutive `size` positions, the last one shorter) read by shard b mod
num_shards, and `skip` leaving out a shard's own first blocks."""
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
