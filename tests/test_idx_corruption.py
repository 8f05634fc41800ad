"""The idx (Fashion-MNIST) builder against the Debian files, and every planted corruption kind
against independent checks, on small synthetic splits."""
import gzip
import os
import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import digits, fashion_mnist
from datarater import config_checks
from datarater.data import corruption, idx_mnist, pipeline
from datarater.errors import UserError

FASHION_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_FILES = [os.path.join(FASHION_DIR, f'{s}-{k}-ubyte.gz') for s in ('train', 't10k')
                 for k in ('images-idx3', 'labels-idx1')]
needs_fashion = pytest.mark.skipif(
    not all(map(os.path.exists, FASHION_FILES)),
    reason='needs Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)')
# The tests that prepare Fashion-MNIST (~5 s) stay on one pytest-xdist worker (test_fashion_launch's
# too): each worker has its own TFDS folder (conftest's tfds_dir), so one prepares it once.
FASHION_PREPARED = pytest.mark.xdist_group('fashion_prepared')
PAIRS = fashion_mnist.CONFUSIONS
ALL_KINDS = dict(label_noise=0.1, seed=3, label_noise_kind='confusion', confusions=PAIRS,
                 blur=0.05, pixel_noise=0.05, occlusion=0.05, duplicate=0.1, ood=0.05)


def _read_gz(path: str, offset: int) -> np.ndarray:
  return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


@pytest.fixture(scope='module')
def fashion(tfds_dir):
  """idx_mnist/fashion prepared once (in the session's TFDS folder) from the Debian files."""
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv(idx_mnist.ENV_DIR, raising=False)
    return pipeline.get_builder('idx_mnist/fashion', tfds_dir)


def _info(shape=(28, 28, 1), classes=10) -> pipeline.DataInfo:
  return pipeline.DataInfo('synthetic', {'image': jax.ShapeDtypeStruct(shape, np.float32),
                                         'label': jax.ShapeDtypeStruct((), np.int32)},
                           {'label': classes}, ('image', 'label'))


def _split(n, shape=(28, 28, 1), classes=10, seed=0) -> dict:
  """Raw features of a synthetic split: white-noise uint8 images, uniform labels."""
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (n, *shape), dtype=np.uint8),
          'label': rng.integers(0, classes, n)}


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return (a != b).reshape(len(a), -1).any(axis=1)


# ---- the idx builder

@needs_fashion
@FASHION_PREPARED
def test_builder_reads_exactly_the_debian_files(fashion):
  assert 'idx_mnist/fashion' in pipeline.BUNDLED
  assert fashion.info.full_name == 'idx_mnist/fashion/1.0.0'
  assert fashion.info.supervised_keys == ('image', 'label')
  assert fashion.info.features['label'].names[0] == 'T-shirt/top'
  assert fashion.info.features['label'].names[9] == 'Ankle boot'
  assert {s: i.num_examples for s, i in fashion.info.splits.items()} == {'train': 60000,
                                                                        'test': 10000}
  images = _read_gz(FASHION_FILES[0], 16).reshape(-1, 28, 28)
  labels = _read_gz(FASHION_FILES[1], 8)
  assert np.array_equal(np.bincount(labels), [6000] * 10)
  train = fashion.as_data_source(split='train')
  for i in (0, 1, 777, 31415, 59999):  # in file order
    assert train[i]['image'].shape == (28, 28, 1) and train[i]['image'].dtype == np.uint8
    np.testing.assert_array_equal(train[i]['image'][..., 0], images[i])
    assert train[i]['label'] == labels[i]
  test = pipeline.read_split(fashion, 'test')  # the whole test split, decoded
  np.testing.assert_array_equal(test.features['image'][..., 0] * 255.0,
                                _read_gz(FASHION_FILES[2], 16).reshape(-1, 28, 28))
  np.testing.assert_array_equal(test.features['label'], _read_gz(FASHION_FILES[3], 8))


@needs_fashion
@FASHION_PREPARED
def test_a_written_subset_keeps_the_class_names(fashion, tmp_path):
  """The filter's TFDS writer copies the features with their ClassLabel names (a JSON round
  trip of the features dropped them, leaving '0'..'9')."""
  from datarater.curation import tfds_writer  # pylint: disable=g-import-not-at-top
  out = tfds_writer.write_subset(fashion, str(tmp_path), 'sub', {'test': np.arange(10)})
  names = tfds.builder_from_directory(out).info.features['label'].names
  assert names[0] == 'T-shirt/top' and names == fashion.info.features['label'].names


@needs_fashion
@FASHION_PREPARED
def test_fashion_config_plants_confusions_in_the_train_split(fashion, tfds_dir):
  config = fashion_mnist.get_config()
  config_checks.validate(config, ['data', 'task', 'rater', 'features.task', 'train'])
  config.data.data_dir = tfds_dir
  split = pipeline.load_split(config.data, config.data.train_split, corrupt=True)
  labels = _read_gz(FASHION_FILES[1], 8)
  assert len(split) == 50000 and split.corruption_kinds == ('clean', 'label_confusion')
  np.testing.assert_array_equal(split.clean['label'], labels[:50000])
  assert split.is_corrupted.sum() == 10000
  np.testing.assert_array_equal(split.features['label'] != labels[:50000], split.is_corrupted)
  moves = set(zip(labels[:50000][split.is_corrupted], split.features['label'][split.is_corrupted]))
  allowed = {(a, b) for a, b in PAIRS} | {(b, a) for a, b in PAIRS}
  no_partner = {1, 3, 8}  # Trouser, Dress, Bag: any other class
  assert {m for m in moves if m[0] not in no_partner} <= allowed
  heldout = pipeline.load_split(config.data, config.data.heldout_split)
  np.testing.assert_array_equal(heldout.features['label'], labels[50000:55000])


def _idx_folder(folder, n_train: int, seed: int = 0) -> dict:
  """Random idx files (plain images, gzipped labels) in `folder`; their arrays by split."""
  rng = np.random.default_rng(seed)
  data = {'train': (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
          'test': (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))}
  folder.mkdir()
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    idx_mnist.write_idx(str(folder / f'{prefix}-images-idx3-ubyte'), data[split][0])
    idx_mnist.write_idx(str(folder / f'{prefix}-labels-idx1-ubyte.gz'), data[split][1],
                        compress=True)
  return data


def test_builder_reads_plain_idx_files_from_the_folder_the_environment_names(tmp_path,
                                                                             monkeypatch):
  folder = tmp_path / 'idx'
  data = _idx_folder(folder, 7)
  monkeypatch.setenv(idx_mnist.ENV_DIR, str(folder))
  builder = pipeline.get_builder('idx_mnist/mnist', str(tmp_path / 'tfds'))
  assert builder.info.features['label'].names == [str(i) for i in range(10)]
  for split, (images, labels) in data.items():
    read = pipeline.read_split(builder, split)
    np.testing.assert_array_equal(read.features['image'][..., 0] * 255.0, images)
    np.testing.assert_array_equal(read.features['label'], labels)


def test_a_dataset_built_from_other_idx_files_is_refused_not_read(tmp_path, monkeypatch):
  """The prepared dataset is tied to the files it was built from: pointing $DATARATER_IDX_DIR at
  other files (or unsetting it where the default folder holds other ones) does not silently
  read the old build."""
  first, second = tmp_path / 'first', tmp_path / 'second'
  _idx_folder(first, 7)
  _idx_folder(second, 9, seed=1)
  tfds_dir = str(tmp_path / 'tfds')
  monkeypatch.setenv(idx_mnist.ENV_DIR, str(first))
  assert pipeline.read_split(pipeline.get_builder('idx_mnist/mnist', tfds_dir), 'train').ids.size == 7
  assert pipeline.get_builder('idx_mnist/mnist', tfds_dir).is_prepared()  # same files: read
  monkeypatch.setenv(idx_mnist.ENV_DIR, str(second))
  with pytest.raises(UserError) as e:
    pipeline.get_builder('idx_mnist/mnist', tfds_dir)
  assert f'built from the idx files in {first}, not from those in {second}' in str(e.value)
  assert '\n' not in str(e.value)
  monkeypatch.delenv(idx_mnist.ENV_DIR)  # mnist has no default folder: nothing to compare with
  assert pipeline.get_builder('idx_mnist/mnist', tfds_dir).is_prepared()
  (second / 'train-images-idx3-ubyte').unlink()
  idx_mnist.write_idx(str(second / 'train-images-idx3-ubyte'),  # 9 other images, same size
                      np.zeros((9, 28, 28), np.uint8))
  monkeypatch.setenv(idx_mnist.ENV_DIR, str(second))
  other = str(tmp_path / 'tfds2')
  pipeline.get_builder('idx_mnist/mnist', other)
  idx_mnist.write_idx(str(second / 'train-images-idx3-ubyte'),  # the same size, other images
                      np.ones((9, 28, 28), np.uint8))
  with pytest.raises(UserError, match='built from the idx files in'):  # was read
    pipeline.get_builder('idx_mnist/mnist', other)
  idx_mnist.write_idx(str(second / 'train-images-idx3-ubyte'), np.zeros((9, 28, 28), np.uint8))
  assert pipeline.get_builder('idx_mnist/mnist', other).is_prepared()  # the same bytes again
  (second / 'train-labels-idx1-ubyte.gz').unlink()  # now a folder with three of the four files
  idx_mnist.write_idx(str(second / 'train-labels-idx1-ubyte'), np.zeros(9, np.uint8))
  with pytest.raises(UserError, match='built from the idx files in'):
    pipeline.get_builder('idx_mnist/mnist', other)


def test_a_damaged_gzip_file_is_one_line_naming_it(tmp_path):
  path = str(tmp_path / 'train-labels-idx1-ubyte.gz')
  idx_mnist.write_idx(path, np.arange(3000) % 10, compress=True)
  whole = open(path, 'rb').read()
  for damaged in (whole[:len(whole) // 2], b'garbage'):  # cut short; not gzip at all
    open(path, 'wb').write(damaged)
    with pytest.raises(UserError, match=f'^{re.escape(path)} is not a readable gzip file'):
      idx_mnist.read_idx(path)


def test_an_idx_header_cut_short_or_too_large_is_one_line_naming_the_file(tmp_path):
  path = str(tmp_path / 'train-images-idx3-ubyte')
  whole = bytes([0, 0, 8, 3]) + np.array([2, 28, 28], '>u4').tobytes()
  open(path, 'wb').write(whole[:9])  # three dimensions announced, one and a bit given
  with pytest.raises(UserError, match=f'^{re.escape(path)} is cut short in its header'):
    idx_mnist.read_idx(path)
  # 65536 ** 4 = 2 ** 64 bytes: an int64 product wraps to 0, the size of this empty body
  open(path, 'wb').write(bytes([0, 0, 8, 4]) + np.array([65536] * 4, '>u4').tobytes())
  with pytest.raises(UserError, match=f'holds 0 bytes after its header, not the {2 ** 64} '):
    idx_mnist.read_idx(path)


def test_missing_files_are_one_line_naming_the_path_and_the_remedy(tmp_path, monkeypatch):
  empty = tmp_path / 'empty'
  empty.mkdir()
  monkeypatch.setenv(idx_mnist.ENV_DIR, str(empty))
  with pytest.raises(UserError) as e:
    pipeline.get_builder('idx_mnist/fashion', str(tmp_path / 'tfds'))
  message = str(e.value)
  assert '\n' not in message
  assert str(empty / 'train-images-idx3-ubyte.gz') in message
  assert 'apt-get install dataset-fashion-mnist' in message and idx_mnist.ENV_DIR in message
  monkeypatch.setenv(idx_mnist.ENV_DIR, str(tmp_path / 'nowhere'))
  with pytest.raises(UserError, match=f'missing folder {tmp_path / "nowhere"}') as e:
    pipeline.get_builder('idx_mnist/fashion', str(tmp_path / 'tfds'))
  monkeypatch.delenv(idx_mnist.ENV_DIR)
  with pytest.raises(UserError) as e:  # no default folder: the environment must name one
    pipeline.get_builder('idx_mnist/kmnist', str(tmp_path / 'tfds'))
  assert '\n' not in str(e.value) and idx_mnist.ENV_DIR in str(e.value)
  assert 'train-images-idx3-ubyte' in str(e.value)
  assert not tfds.builder('idx_mnist/kmnist', data_dir=str(tmp_path / 'tfds')).is_prepared()


# ---- which examples get which kind

def test_corruption_planted_away_from_what_a_model_reads_is_refused():
  """Label noise changes the supervised label, input corruption the supervised input: a model
  reading another feature of that kind instead would train on clean data that the record calls
  corrupted. What a model reads is traced, whatever its fields are called."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from datarater import tasks  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class Reads(tasks.Task):  # a loss over the features named (fields not called input/label)
    x_name: str = 'image'
    y_name: str = ''
    keyed: bool = False  # also reads the batch's positions (as dropout keyed by `index` would)
    def init(self, key):
      return jnp.zeros(())
    def per_example_loss(self, params, batch):
      x = batch[self.x_name].reshape(batch[self.x_name].shape[0], -1).sum(1)
      return (params + x + (batch[self.y_name] if self.y_name else 0) +
              (0 * batch['index'] if self.keyed else 0))

  info = _info()
  info = pipeline.DataInfo('synthetic', {**info.spec, 'pixels': info.spec['image'],
                                         'coarse_label': info.spec['label']},
                           {'label': 10, 'coarse_label': 5}, ('image', 'label'))
  fine, coarse = Reads(y_name='label'), Reads(y_name='coarse_label')
  pixels, images_only = Reads(x_name='pixels', y_name='label'), Reads()
  noisy = corruption.Corruption(label_noise=0.2)
  noisy.check_targets(info, fine, images_only)  # a model reading no class label passes
  with pytest.raises(UserError, match="label noise is planted in the dataset's supervised "
                     "feature 'label', but Reads reads 'coarse_label'"):
    noisy.check_targets(info, fine, coarse)
  with pytest.raises(UserError, match="but Reads reads 'coarse_label'"):
    noisy.check_targets(info, Reads(y_name='coarse_label', keyed=True))
  noisy.check_targets(info, pixels)  # no input corruption planted
  corruption.Corruption().check_targets(info, coarse, pixels)
  with pytest.raises(UserError, match="input corruption is planted .* 'image'.* reads 'pixels'"):
    corruption.Corruption(blur=0.1).check_targets(info, pixels)


def test_each_kind_gets_exactly_its_count_disjointly():
  c = corruption.Corruption(**ALL_KINDS)
  assert c.kinds == ('clean', 'label_confusion', 'blur', 'pixel_noise', 'occlusion',
                     'duplicate', 'ood')
  rates = [0.1, 0.05, 0.05, 0.05, 0.1, 0.05]
  for n in (1, 7, 100, 1001, 6000):
    record = c.record(n)
    assert record.dtype == np.int8 and record.shape == (n,)
    counts = np.bincount(record, minlength=len(c.kinds))
    assert list(counts[1:]) == [int(round(r * n)) for r in rates]
    assert counts[0] == n - sum(int(round(r * n)) for r in rates)
    # One seeded permutation, cut into consecutive runs in the order of the kinds.
    # One seeded permutation cut into consecutive runs: kind 1's, kind 2's, ..., then clean.
    along = record[np.random.default_rng(3).permutation(n)]
    assert np.all(np.diff(along[:n - counts[0]]) >= 0) and not along[n - counts[0]:].any()
  with pytest.raises(UserError, match='add up to 1.05'):
    corruption.Corruption(label_noise=0.5, blur=0.3, ood=0.25)
  with pytest.raises(UserError, match='ask for 12 of a split of 10'):  # round(1.5) = 2, six times
    corruption.Corruption(**{**ALL_KINDS, 'label_noise': 0.15, 'blur': 0.15, 'pixel_noise': 0.15,
                             'occlusion': 0.15, 'duplicate': 0.15, 'ood': 0.15}).record(10)
  with pytest.raises(UserError, match='add up to 1;'):  # 0.9999999999999999 as floats add
    corruption.Corruption(label_noise=0.7, blur=0.2, pixel_noise=0.1)
  with pytest.raises(UserError, match='add up to 1;'):  # 0.9999999999999999 even in math.fsum
    corruption.Corruption(label_noise=0.01, blur=0.29, pixel_noise=0.7)
  with pytest.raises(UserError, match='ask for 3 of a split of 3 examples: none would be left'):
    corruption.Corruption(label_noise=0.5, blur=0.4).record(3)  # round(1.5) = 2, round(1.2) = 1
  with pytest.raises(UserError, match='input_corruption.blur must be in'):
    corruption.Corruption(blur=-0.1)
  with pytest.raises(UserError, match='label_noise_kind'):
    corruption.Corruption(label_noise=0.1, label_noise_kind='pairs')


def test_counts_are_python_round_of_rate_times_n_at_exact_halves():
  """rate * n exactly x.5 (dyadic rates): each kind gets round(rate * n) examples, Python's
  round (halves to even), as the docstring and the record's other readers compute it."""
  halves = 0
  for n in range(2, 41):
    for rate in (0.125, 0.25, 0.375):
      if rate * n % 1 == 0.5:
        halves += 1
      for c in (corruption.Corruption(rate, 5), corruption.Corruption(0.0, 5, blur=rate),
                corruption.Corruption(0.125, 5, occlusion=rate)):
        record = c.record(n)
        for k, (_, r) in enumerate(c._rates(), 1):  # pylint: disable=protected-access
          assert (record == k).sum() == round(r * n), (n, r, c.kinds)
  assert halves == 20 and round(2.5) == 2  # halves to even occur, both ways (0.25 * 10, * 14)


def test_descriptions_tell_apart_confusions_that_corrupt_differently():
  """Equal descriptions corrupt a split identically: two confusion lists that move labels
  differently (same rate and seed) must describe differently, as must a symmetric draw."""
  n = 200
  raw = _split(n, seed=4)
  a = corruption.Corruption(0.3, 1, label_noise_kind='confusion', confusions=((0, 1),))
  b = corruption.Corruption(0.3, 1, label_noise_kind='confusion', confusions=((2, 3), (4, 5)))
  np.testing.assert_array_equal(a.record(n), b.record(n))
  labels_a = a.apply(_info(), raw, np.arange(n), n)[0]['label']
  labels_b = b.apply(_info(), raw, np.arange(n), n)[0]['label']
  assert (labels_a != labels_b).sum() > 10
  assert a.describe() != b.describe()
  assert a.describe() != corruption.Corruption(0.3, 1).describe()
  assert a.describe() == corruption.Corruption(0.3, 1, label_noise_kind='confusion',
                                               confusions=[[0, 1]]).describe()


def _old_symmetric(labels, rate, seed, classes):
  """The symmetric label noise as first implemented (the draw it must keep)."""
  n = len(labels)
  rng = np.random.default_rng(seed)
  flipped = np.zeros(n, bool)
  flipped[rng.permutation(n)[:int(round(rate * n))]] = True
  shift = rng.integers(1, classes, size=n)
  return np.where(flipped, (labels + shift) % classes, labels), flipped


@pytest.mark.parametrize('n,rate,seed,classes', [(1197, 0.2, 0, 10), (1197, 0.3, 7, 10),
                                                 (50000, 0.2, 0, 10), (333, 0.45, 11, 3)])
def test_symmetric_noise_alone_is_bit_identical_to_the_original_draw(n, rate, seed, classes):
  labels = np.random.default_rng(1).integers(0, classes, n)
  expected, flipped = _old_symmetric(labels, rate, seed, classes)
  c = corruption.Corruption(rate, seed)
  info = _info(classes=classes)
  out, clean = c.apply(info, {'label': labels}, np.arange(n), n)
  np.testing.assert_array_equal(out['label'], expected)
  np.testing.assert_array_equal(clean['label'], labels)
  np.testing.assert_array_equal(c.record(n), flipped.astype(np.int8))
  # Input corruptions beside it leave its examples and their new labels as they were.
  raw = {'label': labels, 'image': np.zeros((n, 4, 4, 1), np.uint8)}
  both = corruption.Corruption(rate, seed, blur=0.1, ood=0.1)
  record = both.record(n)
  np.testing.assert_array_equal(record == 1, flipped)
  out = both.apply(_info((4, 4, 1), classes), raw, np.arange(n), n)[0]
  np.testing.assert_array_equal(out['label'][flipped], expected[flipped])


# ---- what each kind does

def test_label_noise_on_one_class_is_refused_in_one_line():
  with pytest.raises(UserError, match="label noise needs two classes or more; 'label' has 1"):
    corruption.Corruption(0.2, 0).apply(_info(classes=1), _split(10, classes=1), np.arange(10), 10)


def test_a_reversed_part_of_a_sum_of_splits_is_refused_not_read_short(tfds_dir):
  """TFDS counts train[20:15] as -5 rows and reads 5 fewer of the other part: refused."""
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  for split, part in (('train[:10]+train[20:15]', 'train[20:15]'),
                      ('train[20:10] + test', 'train[20:10]')):
    with pytest.raises(UserError, match=re.escape(f"split {split!r}'s part {part!r} of "
                                                  "'sklearn_digits' selects no examples")):
      pipeline.check_split(builder, split)
  pipeline.check_split(builder, 'train[:10]+train[20:25]')  # both parts forward: read


@pytest.mark.parametrize('split', ['train[5:4]', 'train[10:20]+train[5:4]'])
def test_a_slice_ending_one_before_its_start_is_refused_not_read_to_the_end(tfds_dir, split):
  """TFDS reads train[5:4] as train[5:] (1192 rows): refused, as any end before the start."""
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  with pytest.raises(UserError, match=re.escape("'train[5:4]'") + '.* selects no examples'):
    pipeline.check_split(builder, split)


def test_the_record_says_what_changed():
  n = 400
  raw = _split(n)
  c = corruption.Corruption(**ALL_KINDS)
  out, clean = c.apply(_info(), raw, np.arange(n), n)
  record, kinds = c.record(n), c.kinds
  np.testing.assert_array_equal(clean['image'], raw['image'])
  np.testing.assert_array_equal(clean['label'], raw['label'])
  image_changed = _changed(out['image'], raw['image'])
  label_changed = out['label'] != raw['label']
  for k, kind in enumerate(kinds):
    at = record == k
    if kind == 'clean':
      assert not image_changed[at].any() and not label_changed[at].any()
    elif kind.startswith('label_'):
      assert label_changed[at].all() and not image_changed[at].any()
    elif kind in ('blur', 'pixel_noise', 'occlusion'):
      assert image_changed[at].all() and not label_changed[at].any()
    else:  # duplicate, ood: a new image under another example's label or a random one
      assert image_changed[at].all() and label_changed[at].mean() > 0.5
  assert out['image'].dtype == np.uint8 and out['image'].shape == raw['image'].shape


def test_blocks_of_any_size_are_corrupted_like_the_whole_split():
  n = 103
  raw = _split(n, seed=4)
  info = _info()
  c = corruption.Corruption(**ALL_KINDS)
  whole, _ = c.apply(info, raw, np.arange(n), n)
  source = lambda ids: {k: v[ids] for k, v in raw.items()}
  cuts = {1: range(1, n), 7: range(7, n, 7), 'uneven': [2, 3, 40, 41, 90]}
  for name, at in cuts.items():
    got = {k: np.empty_like(v) for k, v in raw.items()}
    for ids in np.split(np.arange(n), list(at)):
      ids = ids[::-1]  # any order within a block
      block, clean = c.apply(info, {k: v[ids] for k, v in raw.items()}, ids, n, source=source)
      for k in raw:
        got[k][ids] = block[k]
        np.testing.assert_array_equal(clean[k], raw[k][ids])
    for k in raw:
      np.testing.assert_array_equal(got[k], whole[k], err_msg=f'blocks {name}, feature {k}')
  dup = int(np.flatnonzero(c.record(n) == c.kinds.index('duplicate'))[0])
  with pytest.raises(UserError, match='outside it') as e:  # its source is in another block
    c.apply(info, {k: v[[dup]] for k, v in raw.items()}, np.array([dup]), n)
  assert '\n' not in str(e.value)


def test_confusion_moves_labels_only_along_the_pairs():
  n, classes = 20000, 10
  labels = np.random.default_rng(2).integers(0, classes, n)
  c = corruption.Corruption(0.2, 5, 'confusion', PAIRS)
  out, _ = c.apply(_info(), {'label': labels}, np.arange(n), n)
  flipped = c.record(n) == 1
  assert flipped.sum() == 4000
  np.testing.assert_array_equal(out['label'] != labels, flipped)
  partners = {y: {b for a, b in PAIRS if a == y} | {a for a, b in PAIRS if b == y}
              for y in range(classes)}
  for y in range(classes):
    moved = out['label'][flipped & (labels == y)]
    if partners[y]:
      assert set(moved) == partners[y]  # every partner, nothing else
      share = np.bincount(moved, minlength=classes)[sorted(partners[y])] / len(moved)
      np.testing.assert_allclose(share, 1 / len(partners[y]), atol=0.1)  # uniformly
    else:
      assert set(moved) == set(range(classes)) - {y}
  with pytest.raises(UserError, match='names class 12, but the dataset has 10 classes'):
    corruption.Corruption(0.2, 5, 'confusion', ((3, 12),)).apply(
        _info(), {'label': labels[:5]}, np.arange(5), n)
  with pytest.raises(UserError, match='confusions must be pairs'):
    corruption.Corruption(0.2, 5, 'confusion', ((3, 3),))


def _shift_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Mean |a - b shifted| over the interior, minimised over shifts of at most one pixel.
  a: [H, W], b: [M, H, W] -> [M]."""
  a = a.astype(np.float64)[1:-1, 1:-1]
  h, w = b.shape[1:]
  best = np.full(len(b), np.inf)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      moved = b[:, 1 - dy:h - 1 - dy, 1 - dx:w - 1 - dx].astype(np.float64)
      best = np.minimum(best, np.abs(moved - a).mean(axis=(1, 2)))
  return best


def test_near_duplicates_are_shifted_copies_of_clean_examples_with_their_labels():
  n = 300
  raw = _split(n, seed=6)
  c = corruption.Corruption(seed=1, duplicate=0.1, blur=0.1)
  out, _ = c.apply(_info(), raw, np.arange(n), n)
  record = c.record(n)
  clean = np.flatnonzero(record == 0)
  dups = np.flatnonzero(record == c.kinds.index('duplicate'))
  assert len(dups) == 30
  for i in dups:
    d = _shift_distance(out['image'][i, ..., 0], raw['image'][:, ..., 0])
    source = int(np.argmin(d))
    assert d[source] < 4.0  # white noise: unrelated images are ~85 grey levels apart
    assert np.sort(d)[1] > 60.0
    assert source in clean and out['label'][i] == raw['label'][source]


def test_near_duplicates_copy_every_clean_example_the_split_has():
  """Two clean examples and 198 near-duplicates: each duplicate carries its source's label, and
  labels here are the example ids, so both clean examples must appear as sources."""
  n = 200
  raw = _split(n, classes=n, seed=9)
  raw['label'] = np.arange(n)
  c = corruption.Corruption(seed=2, duplicate=0.99)
  record = c.record(n)
  clean = np.flatnonzero(record == 0)
  assert len(clean) == 2
  out, _ = c.apply(_info(classes=n), raw, np.arange(n), n)
  sources = out['label'][record != 0]
  assert set(sources.tolist()) == set(clean.tolist())
  assert min(np.bincount(sources, minlength=n)[clean]) > 50  # uniform: ~99 each


def test_each_near_duplicate_is_its_source_moved_one_pixel_in_one_of_the_eight_directions():
  """A near-duplicate is its source shifted by one pixel (dy, dx in -1..1, not both 0; edges
  repeated) plus noise of std DUPLICATE_NOISE_STD: on white noise, exactly one nonzero shift of
  the source (written from the definition, out[i, j] = src[clip(i - dy), clip(j - dx)]) lies
  within noise of the copy over the whole image, the unshifted source is far from it, and over
  120 copies every one of the 8 directions occurs."""
  n, h, w = 600, 10, 10
  raw = _split(n, shape=(h, w, 1), seed=8)
  c = corruption.Corruption(seed=2, duplicate=0.2)
  out, _ = c.apply(_info((h, w, 1)), raw, np.arange(n), n)
  dups = np.flatnonzero(c.record(n) == 1)
  assert len(dups) == 120
  images = raw['image'][..., 0].astype(np.float64)
  rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]

  def moved(src, dy, dx):
    return src[np.clip(rows - dy, 0, h - 1), np.clip(cols - dx, 0, w - 1)]

  seen, residuals = set(), []
  for i in dups:
    copy = out['image'][i, ..., 0].astype(np.float64)
    source = images[int(np.argmin(_shift_distance(out['image'][i, ..., 0],
                                                  raw['image'][..., 0])))]
    dist = {(dy, dx): np.abs(copy - moved(source, dy, dx)).max()
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    near = [s for s, d in dist.items() if d <= 6 * corruption.DUPLICATE_NOISE_STD]
    assert len(near) == 1 and near[0] != (0, 0), dist
    assert np.abs(copy - source).mean() > 30  # white noise: unshifted, ~85 grey levels apart
    seen.add(near[0])
    residuals.append((copy - moved(source, *near[0])).ravel())
  assert seen == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} - {(0, 0)}
  assert np.std(np.concatenate(residuals)) == pytest.approx(corruption.DUPLICATE_NOISE_STD,
                                                            rel=0.15)


def test_ood_images_are_upsampled_sklearn_digits():
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits().images * (255.0 / 16.0)
  n = 200
  # Images of the digits' own size: the digits themselves, exactly.
  raw = _split(n, shape=(8, 8), seed=2)
  c = corruption.Corruption(seed=4, ood=0.2)
  out, _ = c.apply(_info((8, 8)), raw, np.arange(n), n)
  ood = c.record(n) == 1
  exact = np.round(digits).astype(np.uint8)
  for image in out['image'][ood]:
    assert (exact == image).all(axis=(1, 2)).any()
  # 28x28x1: close to scipy's bilinear zoom of some digit.
  raw = _split(n, seed=3)
  out, _ = c.apply(_info(), raw, np.arange(n), n)
  zoomed = np.stack([ndimage.zoom(d, 28 / 8, order=1, grid_mode=True, mode='nearest')
                     for d in digits])
  z = zoomed.reshape(len(zoomed), -1)
  z = (z - z.mean(1, keepdims=True)) / np.linalg.norm(z - z.mean(1, keepdims=True), axis=1,
                                                        keepdims=True)
  for image in out['image'][ood]:
    x = image.reshape(-1).astype(np.float64)
    x = (x - x.mean()) / np.linalg.norm(x - x.mean())
    assert (z @ x).max() > 0.97
  labels = out['label'][ood]
  assert labels.min() >= 0 and labels.max() < 10 and len(set(labels)) > 5  # random labels


def _high_frequency_energy(images: np.ndarray) -> np.ndarray:
  """Each image's spectral energy above 1/4 cycle per pixel (per pixel)."""
  power = np.abs(np.fft.fft2(images.astype(np.float64), axes=(1, 2))) ** 2
  fy = np.fft.fftfreq(images.shape[1])[:, None]
  fx = np.fft.fftfreq(images.shape[2])[None, :]
  return power[:, np.sqrt(fy ** 2 + fx ** 2) > 0.25].sum(1) / images[0].size ** 2


def test_blur_noise_and_occlusion_do_what_they_say():
  n = 200
  raw = _split(n, seed=8)
  raw['image'] = (raw['image'] // 2 + 64).astype(np.uint8)  # grey levels 64-191: no clipping
  c = corruption.Corruption(seed=2, blur=0.1, pixel_noise=0.1, occlusion=0.1)
  out, _ = c.apply(_info(), raw, np.arange(n), n)
  record, before, after = c.record(n), raw['image'][..., 0], out['image'][..., 0]
  blur = record == c.kinds.index('blur')
  assert np.all(_high_frequency_energy(after[blur]) < 0.01 * _high_frequency_energy(before[blur]))
  noise = record == c.kinds.index('pixel_noise')
  diff = after[noise].astype(np.float64) - before[noise]
  assert np.all(diff.std(axis=(1, 2)) > 50.0) and abs(diff.mean()) < 5.0
  for i in np.flatnonzero(record == c.kinds.index('occlusion')):
    changed = after[i] != before[i]
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    assert np.all(after[i][box] == 128)  # one constant rectangle ...
    outside = np.ones_like(changed)
    outside[box] = False
    assert not changed[outside].any()  # ... and nothing else
    assert 0.38 <= changed[box].size / changed.size <= 0.62


def test_occlusions_reach_every_edge_of_the_image():
  """The rectangle's top-left corner is uniform over every place it fits: over many examples,
  rectangles shorter (narrower) than the image touch the first and the last row (column)."""
  n, h, w = 1200, 8, 10
  raw = {'image': np.zeros((n, h, w, 1), np.uint8), 'label': np.zeros(n, np.int64)}
  c = corruption.Corruption(seed=4, occlusion=0.9)
  out, _ = c.apply(_info((h, w, 1)), raw, np.arange(n), n)
  occluded = out['image'][c.record(n) != 0, ..., 0] == corruption.OCCLUSION_VALUE
  assert len(occluded) == 1080
  rows, cols = occluded.any(axis=2), occluded.any(axis=1)  # [examples, h], [examples, w]
  for hits, size in ((rows, h), (cols, w)):
    short = hits[hits.sum(1) < size]  # rectangles that do not span the whole side
    assert len(short) > 200
    first = short.argmax(1)
    last = size - 1 - short[:, ::-1].argmax(1)
    assert (first == 0).sum() > 20 and (last == size - 1).sum() > 20
    for span in np.unique(last - first + 1):  # each place of a span of that length is used
      assert set(first[last - first + 1 == span]) == set(range(size - span + 1)) or (
          (last - first + 1 == span).sum() < 40)


def test_input_corruption_keeps_any_image_shape():
  n = 60
  raw = _split(n, shape=(12, 10, 3), seed=9)
  c = corruption.Corruption(**ALL_KINDS)
  out, _ = c.apply(_info((12, 10, 3)), raw, np.arange(n), n)
  assert out['image'].shape == raw['image'].shape and out['image'].dtype == np.uint8
  with pytest.raises(UserError, match='uint8 images'):
    c.apply(_info((12, 10, 3)), {**raw, 'image': raw['image'].astype(np.float32)},
            np.arange(n), n)


# ---- configs

def test_configs_hold_every_corruption_field_and_are_checked():
  data = digits.get_config().data
  config_checks.check_section('data', data, config_checks.SECTIONS['data'])
  assert corruption.from_config(data) == corruption.Corruption(0.2, 0)
  data = fashion_mnist.get_config().data
  assert corruption.from_config(data) == corruption.Corruption(0.2, 0, 'confusion', PAIRS)
  data.input_corruption.occlusion = 0.1
  assert corruption.from_config(data).kinds == ('clean', 'label_confusion', 'occlusion')
  config = digits.get_config()
  config.data.input_corruption.blur = 1.5
  with pytest.raises(UserError, match=r'^data.input_corruption.blur must be < 1, got 1.5$'):
    config_checks.validate(config, ['data'])
  config = digits.get_config()
  config.data.label_noise_kind = 'pairs'
  with pytest.raises(UserError, match='data.label_noise_kind must be one of'):
    config_checks.validate(config, ['data'])
  config = digits.get_config()
  config.data.confusions = ((1, 2, 3),)
  with pytest.raises(UserError, match='data.confusions must be a tuple of pairs'):
    config_checks.validate(config, ['data'])
  config = digits.get_config()
  config.data.label_noise, config.data.input_corruption.duplicate = 0.6, 0.5
  with pytest.raises(UserError, match='add up to 1.1'):
    corruption.from_config(config.data)
  # The checked kinds are the library's; a config (or an older run's) without one plants none.
  assert set(digits.get_config().data.input_corruption) == set(corruption.INPUT_KINDS)
  for kind in corruption.INPUT_KINDS:
    config = digits.get_config()
    config.data.input_corruption[kind] = 1.5
    with pytest.raises(UserError, match=f'^data.input_corruption.{kind} must be < 1'):
      config_checks.validate(config, ['data'])
  config = digits.get_config()
  del config.data.input_corruption['ood']
  config_checks.validate(config, ['data'])
  assert corruption.from_config(config.data) == corruption.Corruption(0.2, 0)


def test_blur_is_spatial_and_leaves_colour_channels_apart():
  """Blur is a Gaussian over height and width (sigma 2-3 px, uniform): colour channels are never
  mixed. Channels constant at 0, 128 and 255 come back unchanged, and each channel of a random
  RGB image equals, in the interior (beyond the filter's reach of the border, so edge handling
  does not matter), a float64 2-D Gaussian of that channel alone, rounded to uint8."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  h, w = 40, 40
  flat = np.stack([np.full((h, w), v, np.uint8) for v in (0, 128, 255)], axis=-1)
  out = corruption._blur(flat, np.random.default_rng(0))  # pylint: disable=protected-access
  assert out.shape == flat.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, flat)

  image = np.random.default_rng(1).integers(0, 256, (h, w, 3)).astype(np.uint8)
  out = corruption._blur(image, np.random.default_rng(5))  # pylint: disable=protected-access
  sigma = np.random.default_rng(5).uniform(2.0, 3.0)  # the documented per-example draw
  reach = int(4.0 * sigma + 0.5)  # scipy's default truncation: 4 sigma
  inner = (slice(reach, h - reach), slice(reach, w - reach))
  for c in range(3):
    expected = ndimage.gaussian_filter(image[..., c].astype(np.float64), sigma)
    expected = np.clip(np.round(expected), 0, 255)
    diff = np.abs(out[..., c].astype(np.float64) - expected)[inner]
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95, (c, diff.max())


@pytest.mark.parametrize('compress', [False, True])
def test_an_idx_write_that_fails_leaves_the_earlier_file_whole(tmp_path, compress):
  """write_idx opened the file itself: one that failed (here converting the array) or was killed
  left it empty or cut short. Now the earlier file stays, and no temporary file is left."""
  path = str(tmp_path / ('train-labels-idx1-ubyte' + ('.gz' if compress else '')))
  labels = np.arange(30) % 10
  idx_mnist.write_idx(path, labels, compress)
  before = open(path, 'rb').read()
  assert b'.tmp-' not in before  # gzip's header names the file, not its temporary name
  with pytest.raises(TypeError):
    idx_mnist.write_idx(path, np.array([1, None], object), compress)
  assert open(path, 'rb').read() == before and os.listdir(tmp_path) == [os.path.basename(path)]
  np.testing.assert_array_equal(idx_mnist.read_idx(path), labels)
