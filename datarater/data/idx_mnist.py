"""A TFDS builder for MNIST-format (idx) image and label files in a local folder.

Fashion-MNIST, MNIST and KMNIST ship as four idx files (`train-images-idx3-ubyte`,
`train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, gzipped or not).
`idx_mnist/<config>` writes them once into an array_record TFDS dataset (splits `train` and
`test`, examples in file order) that is then read like any other TFDS dataset. The folder is the
config's default (Fashion-MNIST: where the Debian package `dataset-fashion-mnist` puts it) or the
environment variable DATARATER_IDX_DIR. A build records the folder and its files' sizes and
contents (sha256; `info.metadata['source']`), and a prepared dataset is refused when the folder
that would build it now (the variable's, or the default) holds other files (MNIST's, KMNIST's and
Fashion-MNIST's have equal sizes). TFDS's own `fashion_mnist` builder downloads and checks the
original archives' checksums, which Debian's re-gzipped copies do not match.
"""
import contextlib
import dataclasses
import gzip
import math
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

from datarater import files
from datarater.errors import UserError

ENV_DIR = 'DATARATER_IDX_DIR'
_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
          'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
_SHAPE = (28, 28)


@dataclasses.dataclass(eq=False)
class IdxConfig(tfds.core.BuilderConfig):
  """One dataset in idx files: its default folder ('' = only DATARATER_IDX_DIR), class names and
  how to get the files (for the missing-files error)."""
  directory: str = ''
  class_names: tuple = ()
  install: str = ''


_FASHION = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
            'Bag', 'Ankle boot')
_KMNIST = ('o', 'ki', 'su', 'tsu', 'na', 'ha', 'ma', 'ya', 're', 'wo')  # romanised hiragana

CONFIGS = (
    IdxConfig(name='fashion', description='Fashion-MNIST (Zalando), 28x28 grey-scale clothes.',
              directory='/usr/share/datasets/fashion-mnist', class_names=_FASHION,
              install='install it with `apt-get install dataset-fashion-mnist`'),
    IdxConfig(name='mnist', description='MNIST handwritten digits, 28x28 grey-scale.',
              class_names=tuple(str(i) for i in range(10))),
    IdxConfig(name='kmnist', description='Kuzushiji-MNIST, 28x28 grey-scale cursive hiragana.',
              class_names=_KMNIST),
)
NAMES = ('idx_mnist', *(f'idx_mnist/{c.name}' for c in CONFIGS))  # names pipeline.BUNDLED holds


def directory(config: IdxConfig) -> str:
  """The folder the files of `config` are read from: $DATARATER_IDX_DIR, else its default."""
  return os.environ.get(ENV_DIR, '') or config.directory


def _sizes(folder: str) -> dict:
  """{file name: bytes} of the idx files present in `folder`."""
  names = [n + gz for pair in _FILES.values() for n in pair for gz in ('.gz', '')]
  return {n: os.path.getsize(os.path.join(folder, n)) for n in names
          if os.path.isfile(os.path.join(folder, n))}


def _contents(folder: str) -> dict:
  """{file name: sha256 of its bytes} of the idx files present in `folder`."""
  out = {}
  for name in _sizes(folder):
    out[name] = files.content_digest_once(os.path.join(folder, name))  # read once a process
  return out


def check_source(builder: tfds.core.DatasetBuilder) -> None:
  """UserError if the idx files that would build `builder`'s config now are not the ones its
  prepared dataset was built from (a folder that holds none is no evidence either way)."""
  recorded = (builder.info.metadata or {}).get('source')
  folder = directory(builder.builder_config)
  if not recorded or not folder or not _sizes(folder):
    return  # built before sources were recorded, or nothing to compare with
  if ((os.path.realpath(folder), _sizes(folder)) != (recorded['folder'], recorded['files'])
      or 'contents' in recorded and _contents(folder) != recorded['contents']):
    raise UserError(
        f'idx_mnist/{builder.builder_config.name} in {builder.data_dir} was built from the idx '
        f'files in {recorded["folder"]}, not from those in {folder}'
        + (f' (${ENV_DIR})' if os.environ.get(ENV_DIR) else '')
        + (' now (rewritten since)' if os.path.realpath(folder) == recorded['folder'] else '')
        + f': remove {builder.data_dir} to rebuild it, or pass another --config.data.data_dir')


def _find(folder: str, name: str, config: IdxConfig) -> str:
  """The path of idx file `name` (or `name`.gz) in `folder`; UserError naming what is missing."""
  for path in (os.path.join(folder, name + '.gz'), os.path.join(folder, name)):
    if os.path.isfile(path):
      return path
  if not folder:
    raise UserError(f'idx_mnist/{config.name} needs its idx files ({name}[.gz] and the other '
                    f'three): put them in a folder and set {ENV_DIR} to it')
  where = os.path.join(folder, name + '.gz') if os.path.isdir(folder) else f'folder {folder}'
  source = f' (from ${ENV_DIR})' if os.environ.get(ENV_DIR) else ''
  how = (f'{config.install}, or set {ENV_DIR} to a folder holding the four idx files'
         if config.install else f'put the four idx files in a folder and set {ENV_DIR} to it')
  raise UserError(f'idx_mnist/{config.name}: missing {where}{source}: {how}')


def read_idx(path: str) -> np.ndarray:
  """The uint8 array of an idx file (gzipped or not), shaped by its header."""
  try:
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, or not gzip at all
    raise UserError(f'{path} is not a readable gzip file ({type(e).__name__}: {e})') from None
  if len(data) < 4 or data[:3] != b'\x00\x00\x08':
    raise UserError(f'{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})')
  ndim = data[3]
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise UserError(f'{path} is cut short in its header ({len(data)} bytes; {ndim} dimensions '
                    f'need {offset})')
  dims = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  if len(data) - offset != math.prod(dims):  # Python integers: no overflow
    raise UserError(f'{path} holds {len(data) - offset} bytes after its header, not the '
                    f'{math.prod(dims)} of shape {dims}')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def write_idx(path: str, array: np.ndarray, compress: bool = False) -> None:
  """Writes `array` (as unsigned bytes) as an idx file, gzipped with `compress`: `read_idx`'s
  inverse. Atomically: a write that fails or is killed leaves an earlier file as it was."""
  header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, '>u4').tobytes()
  with files.atomic_path(path) as tmp, open(tmp, 'wb') as raw, (  # gzip's header names `path`
      gzip.GzipFile(path, 'wb', fileobj=raw) if compress else contextlib.nullcontext(raw)) as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


class IdxMnist(tfds.core.GeneratorBasedBuilder):
  """MNIST-format idx files as a TFDS dataset (image uint8 28x28x1, label: 10 classes)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = list(CONFIGS)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(*_SHAPE, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(names=list(self.builder_config.class_names)),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # examples in file order
        description=f'{self.builder_config.description} Read from local idx files.',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are local.
    config, folder = self.builder_config, directory(self.builder_config)
    paths = {s: tuple(_find(folder, f, config) for f in names) for s, names in _FILES.items()}
    self.info.metadata.update(source={'folder': os.path.realpath(folder), 'files': _sizes(folder),
                                      'contents': _contents(folder)})
    return {s: self._generate_examples(*p) for s, p in paths.items()}

  def _generate_examples(self, images_path: str, labels_path: str):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.shape[1:] != _SHAPE or labels.shape != images.shape[:1]:
      raise UserError(f'{images_path} and {labels_path}: expected N 28x28 images and N labels, '
                      f'got shapes {images.shape} and {labels.shape}')
    if labels.max(initial=0) >= len(self.builder_config.class_names):
      raise UserError(f'{labels_path} has label {labels.max()}, beyond the '
                      f'{len(self.builder_config.class_names)} classes')
    for i in range(len(labels)):
      yield i, {'image': images[i, :, :, None], 'label': int(labels[i])}
