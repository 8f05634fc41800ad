"""TFDS `Image` features (PNG or JPEG files, as mnist and cifar10 store theirs): read as uint8
arrays, trained on, corrupted, and written by launch.filter's writer without TensorFlow. Oracles:
the arrays the dataset was made from, PIL's decoding of the stored files, the stored bytes."""
import io
import os

import ml_collections
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from datarater.curation import scores_file, tfds_writer
from datarater.curation.filter import filter_dataset
from datarater.data import corruption, pipeline
from datarater.errors import UserError
from datarater.tasks.classifier import mlp_classifier
from tests.test_tfds_writer import _files

SIZES = {'train': 60, 'validation': 20, 'test': 20}
PNG = b'\x89PNG\r\n\x1a\n'


def _arrays(split: str) -> dict:
  """The examples of a split, as generated: 8x8 grey digits-like images (PNG), 8x8 colour
  thumbnails (JPEG), photos of varying size (PNG) and labels."""
  rng = np.random.default_rng(list(SIZES).index(split))
  n = SIZES[split]
  return {'image': rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
          'thumb': rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
          'photo': [rng.integers(0, 256, (4 + i % 3, 5, 3), dtype=np.uint8) for i in range(n)],
          'label': rng.integers(0, 10, n)}


class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images given to TFDS as PIL images (which it encodes with PIL: no TensorFlow)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 1)),
        'thumb': tfds.features.Image(shape=(8, 8, 3), encoding_format='jpeg'),
        'photo': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=10)}), supervised_keys=('image', 'label'),
        disable_shuffling=True)  # the examples in the order made

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SIZES}

  def _generate_examples(self, split):
    a = _arrays(split)
    for i in range(SIZES[split]):
      yield i, {'image': PIL.Image.fromarray(a['image'][i, :, :, 0]),
                'thumb': PIL.Image.fromarray(a['thumb'][i]),
                'photo': PIL.Image.fromarray(a['photo'][i]), 'label': int(a['label'][i])}


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """The dataset's folder (prepared as array_record)."""
  builder = TinyImages(data_dir=str(tmp_path_factory.mktemp('images')),
                       file_format='array_record')
  pipeline.prepare(builder)
  return str(builder.data_dir)


def _stored(folder: str, split: str) -> list:
  """The examples of a split with every image as its stored bytes."""
  skip = {k: tfds.decode.SkipDecoding() for k in ('image', 'thumb', 'photo')}
  return list(tfds.builder_from_directory(folder).as_data_source(split=split, decoders=skip))


def _pil(data: bytes) -> np.ndarray:
  with PIL.Image.open(io.BytesIO(data)) as image:
    return np.asarray(image)


def test_fixed_shape_images_are_read_as_uint8_arrays(images):
  builder = tfds.builder_from_directory(images)
  info = pipeline.data_info(builder)
  assert sorted(info.spec) == ['image', 'label', 'thumb']  # the photos have no fixed shape
  assert info.spec['image'].shape == (8, 8, 1) and info.spec['thumb'].shape == (8, 8, 3)
  assert info.spec['image'].dtype == np.float32 and info.stored['image'] == 'uint8'
  want = _arrays('train')
  split = pipeline.read_split(builder, 'train')
  np.testing.assert_array_equal(split.features['image'],
                                want['image'].astype(np.float32) / 255)
  stored = _stored(images, 'train')
  assert all(e['image'].startswith(PNG) for e in stored)
  np.testing.assert_array_equal(split.features['image'][..., 0] * 255,
                                [_pil(e['image']) for e in stored])
  np.testing.assert_array_equal(split.features['thumb'] * 255, [_pil(e['thumb']) for e in stored])
  np.testing.assert_array_equal(split.features['label'], want['label'])
  planted = corruption.Corruption(blur=0.2, pixel_noise=0.2, seed=3)
  noisy = pipeline.read_split(builder, 'train', planted)
  changed = (noisy.features['image'] != split.features['image']).reshape(60, -1).any(axis=1)
  np.testing.assert_array_equal(changed, noisy.is_corrupted)
  assert noisy.is_corrupted.sum() == 24


def test_an_image_of_no_fixed_shape_is_refused_naming_why(images):
  info = pipeline.data_info(tfds.builder_from_directory(images))
  config = ml_collections.ConfigDict({'hidden': (4,), 'activation': 'relu', 'input': 'photo'})
  with pytest.raises(UserError, match=r"'photo' is an image of no fixed shape \(None, None, 3\): "
                     'resize the images'):
    mlp_classifier(config, info)


def test_a_rater_trains_on_an_image_dataset_with_planted_blur(images, tmp_path):
  from datarater.meta_train import meta_train  # pylint: disable=g-import-not-at-top
  from tests.run_config import small_config  # pylint: disable=g-import-not-at-top
  config = small_config('', steps=2)
  config.data.dataset_dir, config.data.input_corruption.blur = images, 0.1
  report = meta_train(config, str(tmp_path / 'run'))
  assert set(report['auroc_by_kind']) == {'label_symmetric', 'blur'}


def test_filtered_images_keep_their_bytes_and_corrupted_ones_decode_as_trained_on(images,
                                                                                  tmp_path):
  """launch.filter's output: each kept example's stored image is the source's, byte for byte,
  unless the planted corruption rewrote it; a rewritten one is a PNG file of the corrupted
  pixels the training pipeline reads."""
  planted = corruption.Corruption(label_noise=0.1, blur=0.1, pixel_noise=0.1, occlusion=0.1,
                                  seed=1)
  scores = str(tmp_path / 'scores.parquet')
  values = np.random.default_rng(0).normal(size=60)
  scores_file.write(scores, np.arange(60), values, values, dataset=images, split='train',
                    planted=planted.describe())
  out = str(tmp_path / 'out')
  filter_dataset(images, out, ['train'], scores=scores, keep=0.7, corruption=planted)
  kept = np.flatnonzero(pq.read_table(os.path.join(out, 'scores_train.parquet'))['kept'])
  assert len(kept) == 42
  source = tfds.builder_from_directory(images)
  trained_on = pipeline.read_split(source, 'train', planted)
  written = pipeline.read_split(tfds.builder_from_directory(out), 'train')
  np.testing.assert_array_equal(written.features['image'], trained_on.features['image'][kept])
  np.testing.assert_array_equal(written.features['label'], trained_on.features['label'][kept])
  rewritten = np.isin(trained_on.corruption[kept], [2, 3, 4])  # blur, pixel noise, occlusion
  assert trained_on.corruption_kinds[2:] == ('blur', 'pixel_noise', 'occlusion')
  assert 0 < rewritten.sum() < len(kept)
  before, after = _stored(images, 'train'), _stored(out, 'train')
  for j, i in enumerate(kept):
    assert (after[j]['image'] == before[i]['image']) == (not rewritten[j])
    assert after[j]['image'].startswith(PNG)
    assert after[j]['thumb'] == before[i]['thumb'] and after[j]['photo'] == before[i]['photo']
  for split in ('validation', 'test'):  # copied splits: every byte of every image
    assert [e['image'] for e in _stored(out, split)] == [e['image'] for e in
                                                          _stored(images, split)]


def test_a_changed_jpeg_image_is_written_losslessly_as_png(images, tmp_path):
  """A transform that rewrites some JPEG thumbnails: those are stored as PNG files of exactly
  the new pixels (JPEG would change them), the others keep their JPEG bytes; the files are the
  same bytes when written again."""
  builder = tfds.builder_from_directory(images)
  before = _stored(images, 'train')
  feature = builder.info.features['thumb']

  def transform(ids, examples):
    out = []
    for i, e in zip(ids, examples):
      thumb = feature.decode_example_np(e['thumb'])
      out.append({**e, 'thumb': 255 - thumb if i % 2 else thumb})
    return out

  ids = np.arange(0, 60, 3)
  written = [tfds_writer.write_subset(builder, str(tmp_path / name), 'sub', {'train': ids},
                                      transforms={'train': transform}) for name in 'ab']
  assert _files(written[0]) == _files(written[1])
  after = _stored(written[0], 'train')
  for j, i in enumerate(ids):
    original = _pil(before[i]['thumb'])
    if i % 2:
      assert after[j]['thumb'].startswith(PNG)
      np.testing.assert_array_equal(_pil(after[j]['thumb']), 255 - original)
    else:
      assert after[j]['thumb'] == before[i]['thumb']
    assert after[j]['image'] == before[i]['image']
  decoded = tfds.builder_from_directory(written[0]).as_data_source(split='train')
  np.testing.assert_array_equal(decoded[1]['thumb'], 255 - _pil(before[3]['thumb']))


@pytest.mark.parametrize('size', [0, 1 << 16])
def test_a_copied_splits_record_file_cut_short_is_one_error_naming_the_folder(images, tmp_path,
                                                                              size):
  """launch.filter copies the splits it does not filter with their images as stored bytes
  (`tfds_writer`): a record file of one cut below its first 64 KiB chunk or at it (records read
  as empty) is one line naming the dataset folder, as when it is read for training; nothing is
  written."""
  import re  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  cut = str(tmp_path / 'cut')
  shutil.copytree(images, cut)
  records = next(f for f in os.listdir(cut) if '-test.array_record' in f)
  assert os.path.getsize(os.path.join(cut, records)) > size  # the cut shortens it
  with open(os.path.join(cut, records), 'r+b') as f:
    f.truncate(size)
  scores = str(tmp_path / 'scores.parquet')
  scores_file.write(scores, np.arange(60), np.zeros(60), np.zeros(60), dataset=cut,
                    split='train', planted=None)
  out = tmp_path / 'out'
  with pytest.raises(UserError, match=re.escape(
      f'the record files of {cut!r} are damaged or missing')):
    filter_dataset(cut, str(out), ['train'], scores=scores, keep=0.7)
  assert not out.exists()
