"""Writes a subset of a TFDS dataset as a new array_record TFDS dataset with the same features.

`write_subset(source_builder, data_dir, name, {split: ids})` builds `data_dir/name/VERSION/`, which
`tfds.builder_from_directory` loads (no TensorFlow needed; read it with `as_data_source`). The
features are copied from the source dataset's info; examples keep the source order (shuffling off),
and are read from the source in chunks, and serialised examples wait for their shard in a
temporary file (`OrderedSpool`), so the subset never sits in memory. The files are a pure
function of the selected examples (byte-identical across runs and processes).

Each split is written in shards (`NAME-SPLIT.array_record-0000K-of-0000N`, their lengths in
dataset_info.json) by TFDS's own rule for their number (`ShardRule`): a power of two, each shard
at least 64 MiB or `SHARD_EXAMPLES` examples, whichever is less, and under twice that (below
1024 shards; a smaller split in one). A reader's memory grows with the examples of the files it
opens, so a split in several files is walked in less memory than in one, and a batch read
fetches its files in parallel.

`Image` features are read and written as their stored bytes (PNG or JPEG files; TFDS encodes an
image array with TensorFlow, not needed here): an example's image is copied byte for byte unless
a transform changed its pixels; a changed image is written as a PNG file (lossless), also in a
feature whose format is JPEG (its readers, PIL, OpenCV or TensorFlow, decode either format).
"""
import copy
import dataclasses
import io
import os
import struct
import tempfile
from typing import Mapping, Optional
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle
from tensorflow_datasets.core.utils import shard_utils

from datarater.data import pipeline
from datarater.data import source as source_lib

CHUNK = 1024  # examples read from the source at a time
SHARD_EXAMPLES = 1 << 16  # a shard holds at least this many examples (or 64 MiB, if less)


def _make_builder_class(source_info: tfds.core.DatasetInfo, name: str, description: str,
                        added: Optional[Mapping] = None, metadata: Optional[Mapping] = None):
  # Copied, not through JSON (that drops ClassLabel names); `added` features after the source's.
  features = (tfds.features.FeaturesDict({**source_info.features, **added}) if added
              else source_info.features)
  supervised = source_info.supervised_keys
  licence = source_info.redistribution_info.license if source_info.redistribution_info else ''

  class FilteredDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A kept subset of another TFDS dataset (same features, same example order)."""
    VERSION = tfds.core.Version(str(source_info.version))
    RELEASE_NOTES = {str(source_info.version): description}

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
          features=copy.deepcopy(features),
          supervised_keys=supervised, description=description,
          # the source's provenance, then `metadata`'s entries; its homepage, citation, licence
          metadata=tfds.core.MetadataDict({**(source_info.metadata or {}), **(metadata or {})}),
          homepage=source_info.homepage or None, citation=source_info.citation or None,
          license=licence or None, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in self.selection}

    def _generate_examples(self, split):
      source = self.sources[split]
      ids = self.selection[split]
      transform = self.transforms.get(split)
      images = {k: f for k, f in source_info.features.items()
                if isinstance(f, tfds.features.Image)}
      for start in range(0, len(ids), CHUNK):
        chunk = [int(i) for i in ids[start:start + CHUNK]]
        if start % source_lib.RELEASE_EVERY < CHUNK:  # now and then, as the files are passed
          source_lib.release_readers(source)
        stored = _read_stored(self.source_builder, source, source_info.features, images,
                              chunk)
        examples = stored if transform is None else transform(chunk, [dict(e) for e in stored])
        if images:
          examples = [{**e, **{k: _image_bytes(f, e[k], s[k]) for k, f in images.items()}}
                      for e, s in zip(examples, stored)]
        yield from zip(chunk, examples)

  FilteredDataset.name = name
  return FilteredDataset


def write_subset(source_builder: tfds.core.DatasetBuilder, data_dir: str, name: str,
                 selection: Mapping[str, np.ndarray], description: str = '',
                 transforms: Optional[Mapping] = None,
                 sources: Optional[Mapping] = None, added: Optional[Mapping] = None,
                 metadata: Optional[Mapping] = None) -> str:
  """Writes the examples `selection[split]` (source ids, in any order: written ascending) of each
  split; returns the dataset's folder (data_dir/name/version). Its info has the source's
  homepage, citation, licence and metadata (`metadata`'s entries added: JSON values), and
  `description`.

  `transforms[split](ids, examples) -> examples` may rewrite the examples of each chunk read on
  the way (e.g. the planted corruption of an experiment), and must fill the `added` features
  ({name: feature}, e.g. a corruption record) of every split; it gets `Image` features as their
  stored bytes and may give back uint8 arrays instead (an array equal to the stored image keeps
  its bytes). `sources[split]` is a data source of the split already open (its readers hold each
  file's record index, so a caller that has read the split passes it on).
  """
  cls = _make_builder_class(source_builder.info, name, description, added, metadata)
  builder = cls(data_dir=data_dir, file_format='array_record')
  builder.selection = {s: np.sort(np.asarray(ids, np.int64)) for s, ids in selection.items()}
  sources = dict(sources or {})
  builder.sources = {s: sources[s] if s in sources else source_builder.as_data_source(split=s)
                     for s in selection}
  builder.transforms = dict(transforms or {})
  builder.source_builder = source_builder  # (named in a damaged file's line)
  prepare_unshuffled(builder)
  return builder.data_dir


def prepare_unshuffled(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares `builder` (its info `disable_shuffling`, int keys ascending in each split) with
  its examples spooled on disk in order (`OrderedSpool`), files byte-identical across runs,
  each split in the shards of `ShardRule` (`pipeline.prepare`: feature maps in key order)."""
  with mock.patch.object(shuffle, 'Shuffler', OrderedSpool):
    pipeline.prepare(builder, download_config=_DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))


@dataclasses.dataclass(frozen=True)
class ShardRule(shard_utils.ShardConfig):
  """TFDS's number of shards of a split (`ShardConfig.calculate_number_shards`), its smallest
  shard lowered from `min_shard_size` bytes to `SHARD_EXAMPLES` examples' worth for a split of
  small examples."""

  def get_number_shards(self, total_size: int, num_examples: int,
                        uses_precise_sharding: bool = True) -> int:
    if self.num_shards:
      return self.num_shards
    example = (total_size + num_examples * self.overhead) / max(num_examples, 1)
    smallest = max(1, min(self.min_shard_size, int(example * SHARD_EXAMPLES)))
    # TFDS's rule (a classmethod) reads the class's sizes, not those of an instance.
    rule = type('Rule', (shard_utils.ShardConfig,), {'min_shard_size': smallest,
                                                     'max_shard_size': self.max_shard_size})
    return rule.calculate_number_shards(total_size, num_examples, uses_precise_sharding)


@dataclasses.dataclass(eq=False)
class _DownloadConfig(tfds.download.DownloadConfig):
  """TFDS's download config, its splits sharded by `ShardRule`."""

  def get_shard_config(self) -> shard_utils.ShardConfig:
    return ShardRule()


def _read_stored(builder, source, features, images: Mapping, ids: list) -> list:
  """The examples `ids` of a TFDS data source of `builder`, its `images` features left as their
  stored bytes (the source's own record readers, whatever decoding the source itself does); a
  damaged record file is one line (`pipeline.read_records`)."""
  skip = {k: tfds.decode.SkipDecoding() for k in images}
  decode = lambda records: [features.deserialize_example_np(r, decoders=skip) for r in records]
  return pipeline.read_records(builder, source, ids, decode if images else None)


def _image_bytes(feature, value, stored: bytes) -> bytes:
  """The bytes to write for an `Image` feature given `value` (its stored bytes, or a uint8
  array) where the example's stored image was `stored`: those bytes unless the pixels differ,
  else the array as a PNG file (PIL; its bytes are a function of the pixels)."""
  if isinstance(value, bytes):
    return value
  value = np.asarray(value)
  if value.dtype != np.uint8 or value.ndim != 3:
    raise ValueError(f'an image to write must be uint8 [H, W, C], got {value.dtype} '
                     f'{value.shape}')
  original = feature.decode_example_np(stored)
  if original.shape == value.shape and np.array_equal(original, value):
    return stored
  import PIL.Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  PIL.Image.fromarray(value[..., 0] if value.shape[-1] == 1 else value).save(buffer, format='PNG')
  return buffer.getvalue()


class OrderedSpool:
  """Stands in for TFDS's `shuffle.Shuffler` while a subset is written: with shuffling off the
  examples come in ascending key order, so they are appended to a temporary file as they come
  and read back in that order (the same records, shards and bytes). TFDS's own keeps up to 1 GB
  of them in memory, then sorts a bucket of them in memory: the writer's memory grows with N."""

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
