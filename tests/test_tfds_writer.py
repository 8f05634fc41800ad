"""tfds_writer's ordered spool: the same dataset bytes as TFDS's own (in-memory) shuffler."""
import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle

from datarater.curation import tfds_writer
from datarater.data import pipeline
from datarater.data import source as source_lib


def _files(folder):
  return {os.path.relpath(p, folder): open(p, 'rb').read()
          for p in sorted(glob.glob(os.path.join(folder, '**'), recursive=True)) if os.path.isfile(p)}


def test_spool_writes_the_bytes_tfds_shuffler_writes(tfds_dir, tmp_path, monkeypatch):
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  selection = {'train': np.arange(0, len(builder.as_data_source(split='train')), 3),
               'test': np.arange(50)}
  with monkeypatch.context() as m:  # small chunks, file readers closed every other chunk
    m.setattr(tfds_writer, 'CHUNK', 16)
    m.setattr(source_lib, 'RELEASE_EVERY', 32)
    spooled = tfds_writer.write_subset(builder, str(tmp_path / 'spool'), 'sub', selection)
  monkeypatch.setattr(tfds_writer, 'OrderedSpool', shuffle.Shuffler)
  shuffled = tfds_writer.write_subset(builder, str(tmp_path / 'tfds'), 'sub', selection)
  a, b = _files(spooled), _files(shuffled)
  assert len(a) >= 4 and a == b
  data = tfds.builder_from_directory(spooled).as_data_source(split='train')
  source = builder.as_data_source(split='train')
  assert len(data) == len(selection['train'])
  np.testing.assert_array_equal(data[5]['image'], source[15]['image'])


def test_spool_refuses_keys_out_of_order(tmp_path):
  spool = tfds_writer.OrderedSpool(str(tmp_path), 'salt', disable_shuffling=True)
  spool.add(3, b'abc')
  spool.add(7, b'')
  with pytest.raises(ValueError, match='ascend'):
    spool.add(7, b'x')
  assert (spool.num_examples, spool.size, spool.bucket_lengths) == (2, 3, [2])
  assert list(spool) == [(3, b'abc'), (7, b'')]
  with pytest.raises(ValueError, match='unshuffled'):
    tfds_writer.OrderedSpool(str(tmp_path), 'salt')


def test_block_walk_that_closes_its_readers_reads_the_same_examples(tfds_dir, monkeypatch):
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  whole = source_lib.Source(builder, 'train')
  expected = whole.take(np.arange(len(whole)))
  monkeypatch.setattr(source_lib, 'RELEASE_EVERY', 100)
  blocks = list(source_lib.Source(builder, 'train').blocks(64))
  for key, value in expected.items():
    np.testing.assert_array_equal(np.concatenate([b[key] for _, b in blocks]), value)


def test_a_subset_keeps_its_source_metadata(tfds_dir, tmp_path, monkeypatch):
  """A dataset's provenance (python_text records which standard library it read) survives
  filtering: the subset's info.metadata is the source's."""
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  monkeypatch.setattr(builder.info, '_metadata',
                      tfds.core.MetadataDict(stdlib='/usr/lib/python3.11', sources_sha256='ab12'))
  out = tfds_writer.write_subset(builder, str(tmp_path / 'sub'), 'sub', {'train': np.arange(9)})
  assert dict(tfds.builder_from_directory(out).info.metadata) == {
      'stdlib': '/usr/lib/python3.11', 'sources_sha256': 'ab12'}
