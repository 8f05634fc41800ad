"""tfds_writer's ordered spool: the same dataset bytes as TFDS's own (in-memory) shuffler; its
shards read back as the examples written."""
import glob
import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import shuffle
from tensorflow_datasets.core.utils import shard_utils

from datarater.curation import tfds_writer
from datarater.curation.filter import filter_dataset
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
  filtering: the subset's info.metadata is the source's (with the entries given added), and so
  are its homepage, citation and licence (the homepage was TFDS's catalogue page of the
  subset's name, the citation and licence empty)."""
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  monkeypatch.setattr(builder.info, '_metadata',
                      tfds.core.MetadataDict(stdlib='/usr/lib/python3.11', sources_sha256='ab12'))
  monkeypatch.setattr(builder.info.as_proto, 'citation', '@misc{digits, title={Digits}}')
  monkeypatch.setattr(builder.info.as_proto.redistribution_info, 'license', 'CC BY 4.0')
  out = tfds_writer.write_subset(builder, str(tmp_path / 'sub'), 'sub', {'train': np.arange(9)},
                                 metadata={'made_by': {'keep': 0.5}})
  info = tfds.builder_from_directory(out).info
  assert dict(info.metadata) == {'stdlib': '/usr/lib/python3.11', 'sources_sha256': 'ab12',
                                 'made_by': {'keep': 0.5}}
  assert info.homepage == builder.info.homepage and 'scikit-learn' in info.homepage
  assert info.citation == '@misc{digits, title={Digits}}'
  assert info.redistribution_info.license == 'CC BY 4.0'


def test_a_filtered_split_in_shards_reads_back_as_its_kept_examples(tfds_dir, tmp_path,
                                                                     monkeypatch):
  """With shards of at least 64 examples, launch.filter's output holds each split in several
  files named as TFDS names them, of the lengths its dataset_info.json records (counted in the
  files), each of 64 to 127 examples; as_data_source and the codebase's pipeline read them back
  as the source's kept examples, in order. Examples of 2 MiB shard as TFDS's own
  rule does (64 of them are over 64 MiB)."""
  monkeypatch.setattr(tfds_writer, 'SHARD_EXAMPLES', 64, raising=False)
  values = np.random.default_rng(0).normal(size=1197)
  pq.write_table(pa.table({'id': np.arange(1197), 'value': values}), tmp_path / 's.parquet')
  out = str(tmp_path / 'out')
  filter_dataset('sklearn_digits', out, ['train'], scores=str(tmp_path / 's.parquet'),
                 min_score=0.0, data_dir=tfds_dir)
  kept = np.flatnonzero(values >= 0)
  builder = tfds.builder_from_directory(out)
  source = pipeline.get_builder('sklearn_digits', tfds_dir)
  for split, ids in (('train', kept), ('test', np.arange(300))):
    paths = sorted(glob.glob(os.path.join(out, f'*-{split}.array_record-*')))
    n = len(paths)
    assert n > 1 and [os.path.basename(p) for p in paths] == [
        f'sklearn_digits_filtered-{split}.array_record-{k:05d}-of-{n:05d}' for k in range(n)]
    lengths = [array_record_module.ArrayRecordReader(p).num_records() for p in paths]
    assert list(builder.info.splits[split].shard_lengths) == lengths
    assert sum(lengths) == len(ids) and 64 <= min(lengths) and max(lengths) < 128
    written = builder.as_data_source(split=split)
    whole = source.as_data_source(split=split)
    for j, i in enumerate(ids):
      assert written[j]['label'] == whole[int(i)]['label']
      np.testing.assert_array_equal(written[j]['image'], whole[int(i)]['image'])
  section = ml_collections.ConfigDict({'name': 'x', 'data_dir': '', 'dataset_dir': out})
  read = pipeline.load_split(section, 'train')
  want = pipeline.read_split(source, 'train')
  np.testing.assert_array_equal(read.features['image'], want.features['image'][kept])
  np.testing.assert_array_equal(read.features['label'], want.features['label'][kept])
  monkeypatch.setattr(source_lib, 'RELEASE_EVERY', 100)  # readers closed as the walk goes
  blocks = list(source_lib.Source(pipeline.builder_of(section), 'train').blocks(64))
  np.testing.assert_array_equal(np.concatenate([b['label'] for _, b in blocks]),
                                want.features['label'][kept])
  ours, tfds_own = tfds_writer.ShardRule(), shard_utils.ShardConfig()
  assert ours.get_number_shards(2 << 30, 1024) == tfds_own.get_number_shards(2 << 30, 1024) == 32
  assert tfds_own.get_number_shards(40 << 20, 10 ** 6) == 1 < ours.get_number_shards(40 << 20,
                                                                                    10 ** 6)


def test_a_filter_keeping_everything_writes_the_source_records_byte_for_byte(tfds_dir, tmp_path):
  """keep=1.0 (no noise planted) gives back every split of the source: the same serialized
  records in the same order (read from the array_record files themselves), as many as each
  dataset_info says."""
  values = np.random.default_rng(1).normal(size=1197)
  pq.write_table(pa.table({'id': np.arange(1197), 'value': values}), tmp_path / 's.parquet')
  out = str(tmp_path / 'out')
  filter_dataset('sklearn_digits', out, ['train'], scores=str(tmp_path / 's.parquet'), keep=1.0,
                 data_dir=tfds_dir)
  source = pipeline.get_builder('sklearn_digits', tfds_dir)
  written = tfds.builder_from_directory(out)

  def records(folder, name, split):
    paths = sorted(glob.glob(os.path.join(folder, f'{name}-{split}.array_record-*')))
    readers = [array_record_module.ArrayRecordReader(p) for p in paths]
    return [record for r in readers for record in r.read_all()]
  assert set(written.info.splits) == set(source.info.splits)
  for split in source.info.splits:
    got = records(out, written.info.name, split)
    assert got == records(str(source.data_dir), source.info.name, split)
    assert written.info.splits[split].num_examples == len(got) > 0
