"""TFDS input pipeline: splits as feature dicts, a record of what was corrupted, batch streams.

A split is read through TFDS array_record data sources (no TensorFlow needed) and decoded by
feature type (`decode`): uint8 tensors and fixed-shape uint8 `Image`s (PNG or JPEG files, which
TFDS decodes with PIL or OpenCV) become float32 in [0, 1], class labels and other integers int32.
What a batch holds is the dataset's features, by their TFDS names, plus `index`; only tasks and
dataset modules know what a feature means. Batches are a pure function of
(seed, position in the example stream), so a stream's state is one integer that a checkpoint
stores and a resumed run continues from, on any number of devices or processes.
"""
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from typing import Mapping, Optional
from unittest import mock

import jax
import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format
from tensorflow_datasets.core import example_serializer

from datarater.data import corruption as corruption_lib
from datarater.data import idx_mnist  # registers the builder of idx files (Fashion-MNIST)
from datarater.data import python_text  # pylint: disable=unused-import  (registers the builder)
from datarater.data import sklearn_digits  # pylint: disable=unused-import  (registers the builder)
from datarater import files
from datarater import multihost
from datarater.errors import UserError

# Datasets built from local files, so never downloaded.
BUNDLED = {'python_text', 'sklearn_digits', *idx_mnist.NAMES}
ARRAY_RECORD = ('this codebase reads array_record files (random access, no TensorFlow): prepare it '
                "with builder.download_and_prepare(file_format='array_record')")
RECORDED = 'corruption'  # a class-label feature in which a dataset records its own bad data


def default_data_dir(data_dir: str = '') -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def _damaged(builder, why: str) -> UserError:
  return UserError(f'the record files of {builder.data_dir!r} are damaged or missing ({why})')


@contextlib.contextmanager
def damaged_records(builder):
  """Reading `builder`'s record files: a file missing or cut short (array_record's
  RuntimeError; 'should be at least 64KB big' for one cut below its first chunk) becomes one
  line naming the dataset's folder."""
  try:
    yield
  except RuntimeError as e:
    text = ' '.join(str(e).split())
    if not any(s in text for s in ('Riegeli', 'records file', 'open() failed', 'array_record',
                                   'ArrayRecord')):
      raise
    raise _damaged(builder, text[:240]) from None


def read_records(builder, data_source, positions, decode=None) -> list:
  """The examples at `positions` of `data_source` (a split of `builder`), as TFDS decodes them,
  or as `decode(records)` does from its stored records (`data_source.data_source`); a damaged
  record file is one line (`damaged_records`), and so is one cut at its first 64 KiB chunk,
  whose records array_record reads without an error as empty (examples of None values)."""
  with damaged_records(builder):
    examples = (data_source.__getitems__(positions) if decode is None
                else decode(data_source.data_source.__getitems__(positions)))
  if any(v is None for e in examples for v in e.values()):
    raise _damaged(builder, 'records read as empty: a file cut short')
  return examples


@contextlib.contextmanager
def quiet_tfds():
  """TFDS's own chatter off: its progress bars, stdout banners and absl warnings."""
  tfds.disable_progress_bar()
  absl = logging.getLogger('absl')
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl.setLevel(level)


def prepare(builder: tfds.core.DatasetBuilder, **kwargs) -> None:
  """`builder.download_and_prepare(**kwargs)` without TFDS's banners and progress bars, each
  tf.Example serialised with its feature map in key order: protobuf's own order follows a hash
  seeded anew in every process, so the same examples would make other file bytes in each build."""
  with quiet_tfds(), mock.patch.object(example_serializer.ExampleSerializer,
                                       'serialize_example', _serialize_sorted):
    builder.download_and_prepare(**kwargs)


def _serialize_sorted(self, example):
  return self.get_tf_example(example).SerializeToString(deterministic=True)


def _unreadable_info(where: str, e: Exception) -> UserError:
  """A dataset's dataset_info.json that TFDS cannot parse (hand-edited or cut short)."""
  return UserError(f'{where}: its dataset_info.json is unreadable ({type(e).__name__}: '
                   f'{" ".join(str(e).split())[:200]})')


def get_builder(name: str, data_dir: str = '',
                field: str = 'data.data_dir') -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for `name`; prepares the bundled datasets on first use. A
  `data_dir` that cannot hold datasets is refused naming `field`, the flag or config field that
  gave it."""
  given, data_dir = data_dir, default_data_dir(data_dir)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise UserError(f'{field} {given or data_dir!r} is a file, not a folder')
  with quiet_tfds():
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    except json_format.ParseError as e:
      raise _unreadable_info(f'TFDS dataset {name!r} in {field} {data_dir!r}', e) from None
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(f'unknown dataset {name!r}: not a TFDS dataset name '
                      f'(built in here: {", ".join(sorted(BUNDLED))})') from None
    except ValueError as e:  # a name TFDS cannot parse, e.g. a path; or one of another format
      why = str(e).splitlines()[0]
      if 'does not match the file formats' in why or 'File format is already set' in why:
        why = why[why.find('File format'):]
        raise UserError(f'dataset {name!r} in {field} {data_dir!r} is prepared in another file '
                        f'format ({why}): {ARRAY_RECORD}') from None
      raise UserError(f'dataset {name!r} is not a TFDS dataset name ({str(e).splitlines()[0]})'
                      ) from None
    except AssertionError as e:  # a version the builder does not have
      reason = str(e).splitlines()[0]
      reason = reason[reason.find('cannot be loaded'):] if 'cannot be loaded' in reason else reason
      raise UserError(f'dataset {name!r} {reason}') from None
    if not builder.is_prepared():
      if name.split(':')[0] not in BUNDLED:
        raise UserError(f'dataset {name!r} is not prepared in {data_dir!r}: prepare it in Python '
                        f'with tfds.builder({name!r}, data_dir={data_dir!r}, '
                        f"file_format='array_record').download_and_prepare()")
      try:
        prepare(builder)
      except OSError as e:
        raise UserError(f'{field} {given or data_dir!r}: cannot prepare {name!r} there '
                        f'({files.why_not(e.filename or data_dir, e)})') from None
  if builder.name == 'idx_mnist':
    idx_mnist.check_source(builder)
  return builder


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a task needs to know of a dataset: its decoded features and which are class labels."""
  name: str
  spec: Mapping[str, jax.ShapeDtypeStruct]  # one decoded example
  num_classes: Mapping[str, int]            # class-label features -> number of classes
  supervised_keys: Optional[tuple]          # (input, target) feature names, if the dataset says
  class_names: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # labels' names
  # Array features' dtypes as stored (uint8 decodes to [0, 1], other numbers keep their values).
  stored: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # Features left out of `spec` that a model might look for -> why (not in the JSON form).
  left_out: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

  def why_not(self, name) -> str:
    """' (why)' if feature `name` of the dataset was left out of `spec` (text, an image not
    of uint8 or of no fixed shape, another array of no fixed shape), else ''."""
    return f' ({name!r} {self.left_out[name]})' if name in self.left_out else ''

  def to_json(self) -> dict:
    return {'name': self.name, 'num_classes': dict(self.num_classes),
            'class_names': {k: list(v) for k, v in self.class_names.items()},
            'supervised_keys': list(self.supervised_keys) if self.supervised_keys else None,
            'spec': {k: {'shape': list(s.shape), 'dtype': np.dtype(s.dtype).name}
                     for k, s in self.spec.items()}, 'stored': dict(self.stored)}

  @classmethod
  def from_json(cls, d: dict) -> 'DataInfo':
    spec = {k: jax.ShapeDtypeStruct(tuple(v['shape']), np.dtype(v['dtype']))
            for k, v in d['spec'].items()}
    keys = d.get('supervised_keys')
    names = {k: tuple(v) for k, v in d.get('class_names', {}).items()}
    return cls(d['name'], spec, dict(d['num_classes']), tuple(keys) if keys else None, names,
               dict(d.get('stored', {})))

  def matches(self, other: 'DataInfo', features) -> bool:
    """Whether `other` has `features` with the same shapes, dtypes, class counts and, where both
    record it, stored dtypes (uint8 pixels and float pixels of 0-255 decode alike otherwise)."""
    def same_storage(k):  # older exports record no stored dtypes
      a, b = self.stored.get(k), other.stored.get(k)
      return a is None or b is None or a == b
    return all(k in other.spec and self.spec[k] == other.spec[k]
               and self.num_classes.get(k) == other.num_classes.get(k) and same_storage(k)
               for k in features)


def _decoded_dtype(feature) -> Optional[np.dtype]:
  """The dtype a TFDS feature decodes to, or None if it is not an array feature."""
  if isinstance(feature, tfds.features.ClassLabel):
    return np.dtype(np.int32)
  if is_image(feature):
    return np.dtype(np.float32)  # pixels -> [0, 1]
  dtype = getattr(feature, 'np_dtype', None)
  if dtype is None or not isinstance(feature, tfds.features.Tensor):
    return None
  dtype = np.dtype(dtype)
  if dtype == np.uint8:
    return np.dtype(np.float32)  # pixels -> [0, 1]
  if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
    return np.dtype(np.int32)
  if np.issubdtype(dtype, np.floating):
    return np.dtype(np.float32)
  return None


def is_image(feature) -> bool:
  """Whether a TFDS feature is a uint8 `Image` (stored as PNG or JPEG bytes, decoded to uint8
  [H, W, C] by PIL or OpenCV); other image dtypes (uint16, float32 depth maps) are not read."""
  return isinstance(feature, tfds.features.Image) and np.dtype(feature.np_dtype) == np.uint8


def _why_left_out(feature, dtype: Optional[np.dtype]) -> str:
  """Why `data_info` leaves a feature out of the spec, as a model that reads it is told."""
  shape = tuple(getattr(feature, 'shape', ()) or ())
  if isinstance(feature, tfds.features.Image) and dtype is None:
    return (f'is a {np.dtype(feature.np_dtype).name} image: only uint8 images are read; store '
            'it as a Tensor feature when preparing the dataset')
  if dtype is not None and is_image(feature):
    return (f'is an image of no fixed shape {shape}: resize the images to one shape when '
            'preparing the dataset')
  if dtype is not None:
    return f'has no fixed shape {shape}: pad or cut it to one shape when preparing the dataset'
  return f'is a {type(feature).__name__} feature, not an array of numbers, and is not read'


def data_info(builder: tfds.core.DatasetBuilder) -> DataInfo:
  features = builder.info.features
  spec, classes, names, stored, left_out = {}, {}, {}, {}, {}
  for name, feature in features.items():
    dtype = _decoded_dtype(feature)
    if dtype is None or None in tuple(feature.shape):  # not a fixed-shape array: left out
      left_out[name] = _why_left_out(feature, dtype)
      continue
    spec[name] = jax.ShapeDtypeStruct(tuple(feature.shape), dtype)
    stored[name] = np.dtype(feature.np_dtype).name
    if isinstance(feature, tfds.features.ClassLabel):
      classes[name] = feature.num_classes
      names[name] = tuple(feature.names)
  keys = builder.info.supervised_keys
  name = builder.info.full_name.rsplit('/', 1)[0]  # with the config, without the version
  return DataInfo(name, spec, classes, tuple(keys) if keys else None, names, stored, left_out)


def decode(info: DataInfo, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacked raw TFDS features (any of `info.spec`) -> decoded arrays (uint8 scaled to [0, 1]);
  features already decoded pass through (cast to the spec's dtype). Pixels recorded as stored
  in uint8 given otherwise must be floats in [0, 1] (UserError: an int64 or float array of
  0-255 would pass through unscaled). jax arrays are decoded alike, traced ones too (inside one's
  own jit: their values go unchecked)."""
  out = {}
  for name, x in raw.items():
    s, x = info.spec[name], x if isinstance(x, jax.Array) else np.asarray(x)
    pixels = s.dtype == np.float32 and info.stored.get(name, 'uint8') == 'uint8'
    if pixels and x.dtype == np.uint8:
      out[name] = x.astype(np.float32) / 255.0
      continue
    if pixels and info.stored.get(name) == 'uint8' and x.size:
      traced = isinstance(x, jax.core.Tracer)
      if not np.issubdtype(x.dtype, np.floating) or not traced and not (
          0 <= x.min() and x.max() <= 1):
        seen = '' if traced else f' in [{x.min():g}, {x.max():g}]'
        raise UserError(f'feature {name!r} holds pixels: give them as uint8 (0-255, as TFDS '
                        f'stores them) or as floats in [0, 1] (decoded), not {x.dtype}{seen}')
    out[name] = x.astype(s.dtype)
  return out


def stack_examples(info: DataInfo, examples) -> dict[str, np.ndarray]:
  """A list of TFDS examples (dicts) -> raw arrays [N, ...] of the array features."""
  return {name: np.stack([np.asarray(e[name]) for e in examples]) if examples
          else np.zeros((0, *s.shape)) for name, s in info.spec.items()}


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in memory: decoded features [N, ...], ids and the corruption record.

  `ids` are the examples' positions in the TFDS split expression (their key in scores files);
  `corruption[i]` is 0 for an untouched example, else the index of its kind in
  `corruption_kinds` (kinds[0] = 'clean'); `clean` keeps the original values of corrupted
  integer features (labels; corrupted inputs are not kept twice).
  A dataset that records its own bad data has a class-label feature `corruption` (class 0 =
  clean); its record is then read from there.
  """
  features: dict[str, np.ndarray]
  ids: np.ndarray               # int64 [N]
  corruption: np.ndarray        # int8 [N]
  corruption_kinds: tuple
  info: DataInfo
  clean: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def is_corrupted(self) -> np.ndarray:
    return self.corruption != 0

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at positions `idx` (any shape) as a batch, with `index` = those positions."""
    idx = np.asarray(idx)
    return {**{k: v[idx] for k, v in self.features.items()}, 'index': idx.astype(np.int32)}

  def blocks(self, size: int, shard: int = 0, num_shards: int = 1):
    """(positions, batch) of this shard's fixed-size blocks (`block_starts`), as
    `source.Source.blocks` walks a streamed split; the last block of the split is shorter."""
    for start in block_starts(len(self), size, shard, num_shards):
      positions = np.arange(start, min(start + size, len(self)))
      yield positions, self.take(positions)

  def subset(self, idx: np.ndarray) -> 'Split':
    """The examples at positions `idx`, keeping their ids and corruption record."""
    idx = np.asarray(idx)
    return dataclasses.replace(
        self, features={k: v[idx] for k, v in self.features.items()}, ids=self.ids[idx],
        corruption=self.corruption[idx], clean={k: v[idx] for k, v in self.clean.items()})


def block_starts(n: int, size: int, shard: int = 0, num_shards: int = 1) -> list[int]:
  """Start positions of the fixed-size blocks of a split of `n` examples that shard `shard` of
  `num_shards` reads: block b is shard b % num_shards's."""
  return list(range(shard * size, n, num_shards * size))


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  """UserError unless `split` is a valid split expression of the builder that selects at least
  one example."""
  try:
    selected = builder.info.splits[split]  # Parses the expression, checks splits and bounds.
  except (ValueError, KeyError, AssertionError) as e:
    raise UserError(f'dataset {builder.info.name!r} has no split {split!r} (it has: '
                    f'{", ".join(builder.info.splits)}; slices like train[:80%] also work): '
                    f'{str(e).splitlines()[0]}') from None
  for part in split.split('+'):  # TFDS reads a slice whose end is one before its start to the
    # split's end, and counts an earlier end as < 0 (a sum then reads fewer rows of the others)
    bounds, = tfds.core.ReadInstruction.from_spec(part.strip()).to_absolute(builder.info.splits)
    if None not in (bounds.from_, bounds.to) and bounds.to < bounds.from_:
      what = f'split {split!r}' + (f"'s part {part.strip()!r}" if '+' in split else '')
      raise UserError(f'{what} of {builder.info.name!r} selects no examples (its end is '
                      'before its start)')
  if not selected.num_examples:  # TFDS cannot open a data source of no files
    raise UserError(f'split {split!r} of {builder.info.name!r} selects no examples')


def shared_examples(builder: tfds.core.DatasetBuilder, a: str, b: str) -> int:
  """How many stored examples split expressions `a` and `b` both select (from the record
  ranges TFDS reads for each: e.g. 'train[:80%]' and 'train[70%:]' share 10%)."""
  def ranges(split):
    out = {}
    for f in builder.info.splits[split].file_instructions:
      take = f.take if f.take >= 0 else f.examples_in_shard - f.skip
      out.setdefault(f.filename, []).append((f.skip, f.skip + take))
    return out
  def covered(intervals):  # sorted, merged
    merged = []
    for lo, hi in sorted(intervals):
      if merged and lo <= merged[-1][1]:
        merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
      else:
        merged.append((lo, hi))
    return merged
  ra, rb = ranges(a), ranges(b)
  return sum(max(0, min(h1, h2) - max(l1, l2))
             for name in set(ra) & set(rb)
             for l1, h1 in covered(ra[name]) for l2, h2 in covered(rb[name]))


def corruption_kinds(info: DataInfo, corruption: corruption_lib.Corruption) -> tuple:
  """The kind names of a split's corruption record: the dataset's own (a class-label feature
  `corruption`) or those of the planted `corruption`, never both."""
  if RECORDED not in info.num_classes:
    return tuple(corruption.kinds)
  if len(corruption.kinds) > 1:
    raise UserError(f'dataset {info.name!r} records its own corruption; plant none '
                    '(data.label_noise = 0 and every data.input_corruption rate 0; '
                    'launch.filter: --label_noise=0)')
  names = tuple(info.class_names[RECORDED])
  if names[0] != corruption_lib.CLEAN:  # class 0 is what every reader takes as clean
    raise UserError(f'dataset {info.name!r} records its corruption with class 0 {names[0]!r}: '
                    f'class 0 of feature {RECORDED!r} must be {corruption_lib.CLEAN!r}')
  return names


def read_split(builder: tfds.core.DatasetBuilder, split: str,
               corruption: Optional[corruption_lib.Corruption] = None) -> Split:
  """Reads a split of a prepared builder into memory, corrupting it as `corruption` says.

  `split` is any TFDS split expression: a name ('train'), a slice ('train[:80%]',
  'train[100:400]') or a concatenation ('train[:299]+test'), as in `tfds.load` (e.g. for
  cross-validation folds). `ids` are then positions in that expression's example order.
  """
  check_split(builder, split)
  info = data_info(builder)
  raw = _read_raw(builder, info, split)
  n = len(next(iter(raw.values()))) if raw else 0
  corruption = corruption or corruption_lib.Corruption()
  raw, clean = corruption.apply(info, raw, np.arange(n), n)
  kinds = corruption_kinds(info, corruption)
  record = (raw[RECORDED].astype(np.int8) if RECORDED in info.num_classes
            else corruption.record(n))
  clean = {k: v for k, v in clean.items() if info.spec[k].dtype != np.float32}
  return Split(features=decode(info, raw), ids=np.arange(n, dtype=np.int64),
               corruption=record, corruption_kinds=tuple(kinds), info=info,
               clean=decode(info, clean))


_RAW_CACHE: 'collections.OrderedDict[tuple, dict]' = collections.OrderedDict()
RAW_CACHE_BYTES = 1 << 30  # raw arrays kept at most (Fashion-MNIST's train split: 47 MB)


def _read_raw(builder, info: DataInfo, split: str) -> dict[str, np.ndarray]:
  """The split's raw stacked features (read-only). TFDS decodes example by example (0.1 s for
  the 1,797 digits, seconds for 60k images), and a process often reads a split again (a bench's
  seeds, a run's final report): the splits read last are kept, up to `RAW_CACHE_BYTES`, keyed by
  the folder's file names, sizes and times (`files_digest`), so a dataset written again is read
  again."""
  try:
    key = (os.path.realpath(str(builder.data_dir)), files_digest(builder), split)
  except OSError:  # e.g. a broken link in the folder: read it (and fail) as without the cache
    key = None
  if key in _RAW_CACHE:
    _RAW_CACHE.move_to_end(key)
    return _RAW_CACHE[key]
  with damaged_records(builder):
    source = builder.as_data_source(split=split)
  raw = stack_examples(info, read_records(builder, source, list(range(len(source)))))
  for x in raw.values():
    x.setflags(write=False)  # shared by every later read: corruption and decoding copy
  nbytes = lambda arrays: sum(x.nbytes for x in arrays.values())
  if key is None or nbytes(raw) > RAW_CACHE_BYTES:  # a split over the whole budget is not kept
    return raw
  _RAW_CACHE[key] = raw
  while sum(map(nbytes, _RAW_CACHE.values())) > RAW_CACHE_BYTES:
    _RAW_CACHE.popitem(last=False)  # the oldest first
  return raw


def builder_of(data, data_dir_field: str = 'data.data_dir') -> tfds.core.DatasetBuilder:
  """The builder of a `data` config section: the TFDS folder `dataset_dir` if set (e.g. the
  output of launch.filter), else the dataset `name` prepared in `data_dir` (a bad one named as
  `data_dir_field`)."""
  if data.get('dataset_dir', ''):
    path = os.path.abspath(data.dataset_dir)
    if not os.path.exists(os.path.join(path, 'dataset_info.json')):
      raise UserError(f'data.dataset_dir {data.dataset_dir!r} is not a TFDS dataset folder '
                      '(no dataset_info.json)')
    try:
      with quiet_tfds():
        builder = tfds.builder_from_directory(path)
    except Exception as e:  # pylint: disable=broad-except  (a hand-edited or cut-short file)
      raise _unreadable_info(f'TFDS dataset folder {data.dataset_dir!r}', e) from None
    file_format = getattr(builder.info.file_format, 'value', builder.info.file_format)
    if file_format not in (None, 'array_record'):
      raise UserError(f'data.dataset_dir {data.dataset_dir!r} holds {file_format} files: '
                      f'{ARRAY_RECORD}')
    return builder
  return get_builder(data.name, data.data_dir, data_dir_field)


def dataset_name(data) -> str:
  """What names a `data` config section's dataset in files: its folder (absolute, links
  resolved) if `dataset_dir` is set, else its TFDS name."""
  if data.get('dataset_dir', ''):
    return os.path.realpath(data.dataset_dir)
  return data.name


def files_digest(builder) -> str:
  """sha256 of the names, sizes and modification times of a prepared dataset's files: what
  tells a dataset written again into the same folder (launch.filter --overwrite) from the old."""
  return files.stat_digest(str(builder.data_dir), hidden=True)


def check_same_everywhere(builder, name: str) -> None:
  """UserError on every process of a job unless each process's copy of dataset `name` (`builder`;
  each process may keep its own: --data_dir, data.data_dir) has the same name, version, features
  and split sizes: processes reading copies that differ in these would mix two datasets (a run
  training or valuing on both, a filter aborting the job)."""
  info = builder.info
  splits = {s: info.splits[s].num_examples for s in info.splits}
  layout = json.dumps([info.name, str(info.version), repr(info.features), splits], sort_keys=True)
  if not multihost.same_everywhere(hashlib.sha256(layout.encode()).hexdigest()):
    raise UserError(f'the processes of this job hold different copies of dataset {name!r} (this '
                    f'process, {jax.process_index()}: {info.name} {info.version}, split sizes '
                    f'{splits}): give every process the same prepared data')


def load_split(data, split: str, corrupt: bool = False) -> Split:
  """The split expression `split` of the dataset of a `data` config section.

  With `corrupt`, the config's corruption (`corruption.from_config`) is applied and recorded.
  """
  return read_split(builder_of(data), split, corruption_lib.from_config(data) if corrupt else None)


STREAM_TAG = 0x5354524D  # 'STRM': the shuffled stream's own generators
STREAM_VERSION = 2  # how stream_indices shuffles; meta-training checkpoints record it


def stream_indices(num_examples: int, start: int, count: int, seed: int) -> np.ndarray:
  """Positions [start, start+count) of an endless stream of shuffled epochs over the split.

  Epoch e is `permutation(seed, e)`; position p is example perm_{p // N}[p % N]. Pure in its
  arguments, so the stream can be resumed or sharded by position alone. The generator's seed
  starts with a tag of its own: numpy seeds [s, 0] and s alike, so without it epoch 0 of seed s
  would be the corruption record's permutation of noise seed s (every corrupted example first).
  """
  positions = np.arange(start, start + count, dtype=np.int64)
  epochs = positions // num_examples
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([STREAM_TAG, seed, int(epoch)]).permutation(num_examples)
    sel = epochs == epoch
    out[sel] = perm[positions[sel] % num_examples]
  return out
