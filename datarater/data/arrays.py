"""Arrays held in memory (numpy, a notebook's) as a TFDS dataset folder that every tool reads.

`write_arrays(out, {split: {feature: array [N, ...]}}, classes=..., supervised_keys=...)` writes
`out`, an array_record TFDS dataset folder, example i of each split being row i of its arrays (no
shuffling: i is the example's `index` and its id in scores files). `config.data.dataset_dir = out`
then reads it in every run (`meta_train`, `train`, valuations, `launch.*`), as any TFDS dataset:
checkpoints tie to its contents, and it decodes as the pipeline decodes TFDS features (uint8 as
pixels in [0, 1], other integers as int32, floats as float32). Features named in `classes` are
class labels; a class-label feature `corruption` whose class 0 is 'clean' records which examples
are bad (as `python_text` does), for the noise AUROC, with no noise planted on top.
"""
import os
import shutil
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds

from datarater import files
from datarater.curation import tfds_writer
from datarater.data import corruption as corruption_lib
from datarater.data import pipeline
from datarater.errors import UserError

INT32 = np.iinfo(np.int32)
NAME = 'arrays'  # the dataset's TFDS name


def _feature(name: str, x: np.ndarray, classes) -> tfds.features.FeatureConnector:
  """The TFDS feature of column `name` (arrays [N, ...] of one split), refused in one line when
  the pipeline could not read it back as given."""
  if name in classes:
    given = classes[name]
    count = given if isinstance(given, int) else len(given)
    if not np.issubdtype(x.dtype, np.integer) or x.ndim != 1:
      raise UserError(f'class-label feature {name!r} must be integers [N], got {x.dtype} '
                      f'{x.shape}')
    if x.size and (x.min() < 0 or x.max() >= count):
      raise UserError(f'feature {name!r} holds classes in [{x.min()}, {x.max()}], outside its '
                      f'{count} classes [0, {count})')
    return (tfds.features.ClassLabel(num_classes=given) if isinstance(given, int)
            else tfds.features.ClassLabel(names=list(given)))
  shape = x.shape[1:]
  if x.dtype == np.uint8 or x.dtype == np.bool_:
    return tfds.features.Tensor(shape=shape, dtype=x.dtype)
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (x.min() < INT32.min or x.max() > INT32.max):
      raise UserError(f'feature {name!r} holds integers in [{x.min()}, {x.max()}], outside '
                      'int32, which the pipeline reads integers as')
    return tfds.features.Tensor(shape=shape, dtype=np.int32)
  if np.issubdtype(x.dtype, np.floating):
    return tfds.features.Tensor(shape=shape, dtype=np.float32)
  raise UserError(f'feature {name!r} is {x.dtype}: give numbers (floats, integers, uint8 pixels '
                  'or bool)')


def _columns(splits: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
  """{split: {feature: numpy array}}, each split with the same features, of one length N >= 1."""
  if not splits:
    raise UserError('write_arrays needs at least one split')
  columns, names = {}, None
  for split, features in splits.items():
    if not isinstance(features, Mapping) or not features:
      raise UserError(f'split {split!r} must be a dict of feature arrays, got '
                      f'{type(features).__name__}')
    arrays = {k: np.asarray(v) for k, v in features.items()}
    if names is None:
      names = sorted(arrays)
    if sorted(arrays) != names:
      odd = set(arrays) ^ set(names)
      hint = (f' (a split with no corrupted examples records zeros: give it {pipeline.RECORDED}'
              f'=np.zeros(N, int))' if odd == {pipeline.RECORDED} else '')
      raise UserError(f'split {split!r} has features {sorted(arrays)}, another split {names}: '
                      f'every split holds the same features{hint}')
    lengths = {k: len(v) if v.ndim else 0 for k, v in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
      raise UserError(f'the features of split {split!r} must be arrays of one length N >= 1 (one '
                      f'row per example), got lengths {lengths}')
    columns[split] = arrays
  return columns


def write_arrays(out: str, splits: Mapping[str, Mapping[str, np.ndarray]], *,
                 classes: Optional[Mapping[str, Union[int, Sequence[str]]]] = None,
                 supervised_keys: Optional[tuple] = None, overwrite: bool = False) -> str:
  """Writes `splits` ({split name: {feature name: array [N, ...]}}) as the TFDS dataset folder
  `out` and returns its absolute path (for `data.dataset_dir`).

  `classes`: {feature: number of classes, or their names} for class-label features (integers in
  [0, C)); `supervised_keys`: (input, label), the features a classifier and its rater read unless
  `task.input` / `task.label` name others. Other features keep their per-example shape: floats
  are stored as float32, integers as int32, uint8 (pixels) and bool as given. `overwrite`
  replaces an earlier TFDS dataset folder at `out`; the folder is written beside it and renamed.
  """
  classes = dict(classes or {})
  columns = _columns(splits)
  first = next(iter(columns.values()))
  unknown = sorted(set(classes) - set(first))
  if unknown:
    raise UserError(f'classes names features {unknown} that the splits do not have '
                    f'({sorted(first)})')
  if supervised_keys is not None:
    if len(supervised_keys) != 2 or any(k not in first for k in supervised_keys):
      raise UserError(f'supervised_keys must be (input, label) among the features '
                      f'{sorted(first)}, got {supervised_keys!r}')
    supervised_keys = tuple(supervised_keys)
  feature = {}
  for split, arrays in columns.items():
    for name, x in arrays.items():
      this = _feature(name, x, classes)  # (checks each split's values)
      feature.setdefault(name, this)
      if repr(this) != repr(feature[name]):
        raise UserError(f'feature {name!r} is {this.shape} {this.np_dtype} per example in split '
                        f'{split!r}, {feature[name].shape} {feature[name].np_dtype} in another')
      arrays[name] = x.astype(np.int64 if name in classes else feature[name].np_dtype)
  files.check_not_in_dataset(out, 'write_arrays out', itself=False)
  with files.atomic_dir(out, overwrite, marker='dataset_info.json',
                        overwrite_with='overwrite=True') as tmp:
    builder = _Arrays(columns, feature, supervised_keys, data_dir=os.path.join(tmp, 'tfds'),
                      file_format='array_record')
    tfds_writer.prepare_unshuffled(builder)
    # What every reader checks: a `corruption` record whose class 0 is 'clean'.
    pipeline.corruption_kinds(pipeline.data_info(builder), corruption_lib.Corruption())
    folder = str(builder.data_dir)
    for entry in os.listdir(folder):  # the dataset folder itself becomes `out`
      os.rename(os.path.join(folder, entry), os.path.join(tmp, entry))
    shutil.rmtree(os.path.join(tmp, 'tfds'))
  return os.path.abspath(out)


class _Arrays(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The rows of in-memory arrays, each split in order."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Written by datarater.data.arrays.write_arrays.'}
  name = NAME

  def __init__(self, columns: dict, features: dict, supervised_keys, **kwargs):
    self.columns, self.feature_map, self.supervised = columns, features, supervised_keys
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(dict(self.feature_map)),
        supervised_keys=self.supervised, description='Arrays written by write_arrays.',
        disable_shuffling=True)  # example i of a split is row i

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the arrays are in memory.
    return {split: self._generate_examples(split) for split in self.columns}

  def _generate_examples(self, split):
    arrays = self.columns[split]
    for i in range(len(next(iter(arrays.values())))):
      yield i, {k: v[i] for k, v in arrays.items()}
