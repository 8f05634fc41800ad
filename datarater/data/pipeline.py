"""TFDS input pipeline: random-access splits, recorded label noise, and deterministic batches.

A split is read through `tfds` array_record data sources (no TensorFlow needed). Batches are a pure
function of (seed, position in the example stream), so the iterator's state is one integer that a
checkpoint stores and a resumed run continues from, on any number of devices or processes.
"""
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from datarater.data import sklearn_digits  # pylint: disable=unused-import  (registers the builder)
from datarater.errors import UserError

BUNDLED = {'sklearn_digits'}  # Datasets built locally from package data, so never downloaded.


def default_data_dir(data_dir: str = '') -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def get_builder(name: str, data_dir: str = '') -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for `name`; prepares the bundled datasets on first use."""
  data_dir = default_data_dir(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'unknown dataset {name!r}: not a TFDS dataset name '
                    f'(built in here: {", ".join(sorted(BUNDLED))})') from None
  if not builder.is_prepared():
    if name not in BUNDLED:
      raise UserError(f'dataset {name!r} is not prepared in {data_dir!r}: run '
                      f'`tfds build {name} --file_format=array_record --data_dir={data_dir}`')
    builder.download_and_prepare()
  return builder


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in memory as numpy arrays, with the labels possibly corrupted.

  `ids` are the examples' indices in the TFDS split (their key in every scores file);
  `clean_label` and `is_corrupted` record what the label noise did.
  """
  image: np.ndarray          # float32 [N, ...] in [0, 1]
  label: np.ndarray          # int32 [N], what training sees
  clean_label: np.ndarray    # int32 [N]
  is_corrupted: np.ndarray   # bool [N]
  ids: np.ndarray            # int64 [N]
  num_classes: int

  def __len__(self) -> int:
    return len(self.label)

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `idx` (any shape) as a batch dict with leading axes idx.shape."""
    return {'image': self.image[idx], 'label': self.label[idx], 'index': self.ids[idx]}


def symmetric_label_noise(labels: np.ndarray, num_classes: int, rate: float, seed: int):
  """Flips a `rate` fraction of labels (exactly round(rate*N)) to a different class, uniformly.

  Returns (noisy_labels, is_corrupted). Deterministic in `seed`.
  """
  if not 0.0 <= rate < 1.0:
    raise UserError(f'label_noise must be in [0, 1), got {rate}')
  rng = np.random.default_rng(seed)
  n = len(labels)
  corrupted = np.zeros(n, bool)
  corrupted[rng.permutation(n)[:int(round(rate * n))]] = True
  shift = rng.integers(1, num_classes, size=n)  # never 0: a corrupted label always changes
  noisy = np.where(corrupted, (labels + shift) % num_classes, labels)
  return noisy.astype(np.int32), corrupted


def load_split(name: str, split: str, data_dir: str = '', label_noise: float = 0.0,
               noise_seed: int = 0) -> Split:
  """Reads a split of the TFDS dataset `name` into memory; see `read_split`."""
  return read_split(get_builder(name, data_dir), split, label_noise, noise_seed)


def read_split(builder: tfds.core.DatasetBuilder, split: str, label_noise: float = 0.0,
               noise_seed: int = 0) -> Split:
  """Reads an image-classification split (`image`, `label` features) of a prepared builder.

  `split` is any TFDS split expression: a name ('train'), a slice ('train[:80%]',
  'train[100:400]') or a concatenation ('train[:299]+test'), as in `tfds.load` (e.g. for
  cross-validation folds). `ids` are then positions in that expression's example order.
  """
  name = builder.info.name
  try:
    builder.info.splits[split]  # Parses the expression and checks its splits and bounds.
  except (ValueError, KeyError, AssertionError) as e:
    raise UserError(f'dataset {name!r} has no split {split!r} (it has: '
                    f'{", ".join(builder.info.splits)}; slices like train[:80%] also work): '
                    f'{str(e).splitlines()[0]}') from None
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise UserError(f'dataset {name!r} has features {list(features)}; need `image` and `label`')
  source = builder.as_data_source(split=split)
  examples = source.__getitems__(list(range(len(source))))
  image = np.stack([np.asarray(e['image']) for e in examples]).astype(np.float32) / 255.0
  clean = np.array([e['label'] for e in examples], np.int32)
  num_classes = features['label'].num_classes
  label, corrupted = symmetric_label_noise(clean, num_classes, label_noise, noise_seed)
  return Split(image=image, label=label, clean_label=clean, is_corrupted=corrupted,
               ids=np.arange(len(clean), dtype=np.int64), num_classes=num_classes)


def stream_indices(num_examples: int, start: int, count: int, seed: int) -> np.ndarray:
  """Positions [start, start+count) of an endless stream of shuffled epochs over the split.

  Epoch e is `permutation(seed, e)`; position p is example perm_{p // N}[p % N]. Pure in its
  arguments, so the stream can be resumed or sharded by position alone.
  """
  positions = np.arange(start, start + count, dtype=np.int64)
  epochs = positions // num_examples
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    sel = epochs == epoch
    out[sel] = perm[positions[sel] % num_examples]
  return out
