"""Writes a subset of a TFDS dataset as a new array_record TFDS dataset with the same features.

`write_subset(source_builder, data_dir, name, {split: ids})` builds `data_dir/name/VERSION/`, which
`tfds.builder_from_directory` loads (no TensorFlow needed; read it with `as_data_source`). The
features are copied from the source dataset's info; examples keep the source order (shuffling off),
and are read from the source in chunks, and serialised examples wait for their shard in a
temporary file (`OrderedSpool`), so the subset never sits in memory. The files are a pure
function of the selected examples (byte-identical across runs and processes).
"""
import copy
import os
import struct
import tempfile
from typing import Mapping, Optional
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import shuffle

from datarater.data import pipeline
from datarater.data import source as source_lib

CHUNK = 1024  # examples read from the source at a time


def _make_builder_class(source_info: tfds.core.DatasetInfo, name: str, description: str,
                        added: Optional[Mapping] = None):
  # Copied, not through JSON (that drops ClassLabel names); `added` features after the source's.
  features = (tfds.features.FeaturesDict({**source_info.features, **added}) if added
              else source_info.features)
  supervised = source_info.supervised_keys

  class FilteredDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A kept subset of another TFDS dataset (same features, same example order)."""
    VERSION = tfds.core.Version(str(source_info.version))
    RELEASE_NOTES = {str(source_info.version): description}

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
          features=copy.deepcopy(features),
          supervised_keys=supervised, description=description,
          metadata=tfds.core.MetadataDict(source_info.metadata or {}),  # the source's provenance
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in self.selection}

    def _generate_examples(self, split):
      source = self.sources[split]
      ids = self.selection[split]
      transform = self.transforms.get(split)
      for start in range(0, len(ids), CHUNK):
        chunk = [int(i) for i in ids[start:start + CHUNK]]
        if start % source_lib.RELEASE_EVERY < CHUNK:  # now and then, as the files are passed
          source_lib.release_readers(source)
        examples = source.__getitems__(chunk)
        if transform is not None:
          examples = transform(chunk, examples)
        yield from zip(chunk, examples)

  FilteredDataset.name = name
  return FilteredDataset


def write_subset(source_builder: tfds.core.DatasetBuilder, data_dir: str, name: str,
                 selection: Mapping[str, np.ndarray], description: str = '',
                 transforms: Optional[Mapping] = None,
                 sources: Optional[Mapping] = None, added: Optional[Mapping] = None) -> str:
  """Writes the examples `selection[split]` (source ids, in any order: written ascending) of each
  split; returns the dataset's folder (data_dir/name/version).

  `transforms[split](ids, examples) -> examples` may rewrite the examples of each chunk read on
  the way (e.g. the planted corruption of an experiment), and must fill the `added` features
  ({name: feature}, e.g. a corruption record) of every split. `sources[split]` is a data source
  of the split already open (its readers hold each file's record index, so a caller that has
  read the split passes it on).
  """
  cls = _make_builder_class(source_builder.info, name, description, added)
  builder = cls(data_dir=data_dir, file_format='array_record')
  builder.selection = {s: np.sort(np.asarray(ids, np.int64)) for s, ids in selection.items()}
  sources = dict(sources or {})
  builder.sources = {s: sources[s] if s in sources else source_builder.as_data_source(split=s)
                     for s in selection}
  builder.transforms = dict(transforms or {})
  # tf.Example's feature map is serialised in hash order, which varies between processes
  # (PYTHONHASHSEED); deterministic serialisation sorts the keys, so the files are byte-identical.
  with mock.patch.object(example_serializer.ExampleSerializer, 'serialize_example',
                         _serialize_deterministic), mock.patch.object(shuffle, 'Shuffler',
                                                                      OrderedSpool):
    pipeline.prepare(builder, download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder.data_dir


def _serialize_deterministic(self, example):
  return self.get_tf_example(example).SerializeToString(deterministic=True)


class OrderedSpool:
  """Stands in for TFDS's `shuffle.Shuffler` while a subset is written: with shuffling off the
  examples come in ascending key order, so they are appended to a temporary file as they come
  and read back in that order (the same records, shards and bytes). TFDS's own keeps up to 1 GB
  of them in memory, then sorts a bucket of them in memory: the writer's memory grew with N."""

  def __init__(self, dirpath, hash_salt, disable_shuffling: bool = False,
               ignore_duplicates: bool = False):
    del hash_salt, ignore_duplicates
    if not disable_shuffling:
      raise ValueError('OrderedSpool writes unshuffled datasets only')
    self._file = tempfile.TemporaryFile(dir=os.fspath(dirpath) if os.path.isdir(dirpath) else None)
    self._last = None
    self.num_examples = self.size = 0

  @property
  def bucket_lengths(self) -> list[int]:
    return [self.num_examples]

  def add(self, key: int, data: bytes) -> None:
    if self._last is not None and key <= self._last:
      raise ValueError(f'example keys must ascend: {key} came after {self._last}')
    self._last = key
    self._file.write(struct.pack('<qq', key, len(data)) + data)
    self.num_examples += 1
    self.size += len(data)

  def __iter__(self):
    self._file.seek(0)
    for _ in range(self.num_examples):
      key, length = struct.unpack('<qq', self._file.read(16))
      yield key, self._file.read(length)
    self._file.close()
