"""`write_arrays`: arrays held in memory as a TFDS dataset folder. Every split reads back row for
row (the arrays themselves are the oracle: a builder left shuffling, as TFDS's default is, puts
them in a hashed order), decoded as the pipeline decodes TFDS features, with the `corruption`
record given; bad arrays are refused in one line before anything is written. The README's "From
Python" example runs as written (slow: it meta-trains a rater)."""
import os
import runpy
import sys

import ml_collections
import numpy as np
import pytest

from datarater.data import pipeline
from datarater.data.arrays import write_arrays
from datarater.errors import UserError

CLASSES = {'label': 3, 'corruption': ('clean', 'flipped')}


def _arrays(n, seed=0):
  rng = np.random.default_rng(seed)
  return {'x': rng.normal(size=(n, 5)), 'pixels': rng.integers(0, 256, (n, 2, 2), np.uint8),
          'count': rng.integers(-9, 9, n), 'label': rng.integers(0, 3, n),
          'corruption': (rng.random(n) < 0.3).astype(int)}


def _data(folder, label_noise=0.0):
  return ml_collections.ConfigDict({'name': '', 'data_dir': '', 'dataset_dir': folder,
                                    'label_noise': label_noise})


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  splits = {'train': _arrays(70, 0), 'validation': _arrays(9, 1)}
  out = str(tmp_path_factory.mktemp('arrays') / 'data')
  return splits, write_arrays(out, splits, classes=CLASSES, supervised_keys=('x', 'label'))


def test_each_split_reads_back_row_for_row_decoded_with_its_corruption_record(written):
  splits, folder = written
  for name, arrays in splits.items():
    split = pipeline.load_split(_data(folder), name)
    np.testing.assert_array_equal(split.ids, np.arange(len(arrays['x'])))
    np.testing.assert_array_equal(split.features['x'], arrays['x'].astype(np.float32))
    np.testing.assert_array_equal(split.features['pixels'], arrays['pixels'] / np.float32(255))
    for key in ('count', 'label'):
      assert split.features[key].dtype == np.int32
      np.testing.assert_array_equal(split.features[key], arrays[key])
    np.testing.assert_array_equal(split.is_corrupted, arrays['corruption'] == 1)
    assert split.corruption_kinds == CLASSES['corruption']
  info = split.info
  assert info.supervised_keys == ('x', 'label') and info.num_classes == {'label': 3,
                                                                       'corruption': 2}


def test_the_folder_is_replaced_only_with_overwrite(written, tmp_path):
  """The refusals name the keyword argument that replaces (write_arrays has no --overwrite)."""
  splits, folder = written
  with pytest.raises(UserError, match=r'already exists \(pass overwrite=True to replace it\)'):
    write_arrays(folder, splits, classes=CLASSES)
  (tmp_path / 'notes').mkdir()  # not a dataset folder: kept even with overwrite=True
  with pytest.raises(UserError, match='dataset_info.json\\): overwrite=True replaces only'):
    write_arrays(str(tmp_path / 'notes'), splits, classes=CLASSES, overwrite=True)
  assert os.listdir(tmp_path) == ['notes']
  with pytest.raises(UserError, match='inside the TFDS dataset folder'):
    write_arrays(os.path.join(folder, 'again'), splits, classes=CLASSES)


@pytest.mark.parametrize('splits,classes,match', [
    ({}, {}, 'at least one split'),
    ({'train': {'x': np.zeros((3, 2)), 'y': np.zeros(4)}}, {}, 'one length'),
    ({'train': {'x': np.zeros((0, 2))}}, {}, 'one length'),
    ({'train': {'x': np.zeros(3)}, 'test': {'z': np.zeros(3)}}, {}, 'has features'),
    ({'train': {'x': np.zeros(3), 'corruption': np.array([0, 1, 0])}, 'test': {'x': np.zeros(3)}},
     {'corruption': ('clean', 'bad')}, r'records zeros: give it corruption=np.zeros\(N, int\)'),
    ({'train': {'x': np.zeros((3, 2))}, 'test': {'x': np.zeros((3, 4))}}, {}, "'x' is"),
    ({'train': {'y': np.array([0, 1, 3])}}, {'y': 3}, r'classes in \[0, 3\]'),
    ({'train': {'y': np.array([0.0, 1.0])}}, {'y': 3}, 'must be integers'),
    ({'train': {'y': np.array([0, 1])}}, {'z': 3}, r"features \['z'\]"),
    ({'train': {'s': np.array(['a', 'b'])}}, {}, "'s' is <U1"),
    ({'train': {'n': np.array([0, 2**40])}}, {}, 'outside int32'),
    ({'train': {'corruption': np.array([0, 1])}}, {'corruption': ('bad', 'clean')},
     "class 0 'bad'"),
])
def test_bad_arrays_are_refused_in_one_line_and_nothing_is_written(tmp_path, splits, classes,
                                                                   match):
  out = tmp_path / 'data'
  with pytest.raises(UserError, match=match) as e:
    write_arrays(str(out), splits, classes=classes)
  assert '\n' not in str(e.value)
  assert os.listdir(tmp_path) == []


def test_supervised_keys_must_name_two_features(tmp_path):
  with pytest.raises(UserError, match='supervised_keys'):
    write_arrays(str(tmp_path / 'd'), {'train': {'x': np.zeros(2)}}, supervised_keys=('x', 'y'))


@pytest.mark.slow
def test_the_readme_from_python_example_runs_as_written(tmp_path, monkeypatch):
  """As a notebook runs it: top to bottom in one process. Its printed noise AUROC is checked
  against sklearn's on the flips the example made itself, and its exported rater against the run
  it came from."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  from datarater import load_rater  # pylint: disable=g-import-not-at-top
  from tests.test_readme import _python_block  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'notebook.py'
  path.write_text(_python_block('notebook.py'))
  monkeypatch.setattr(sys, 'argv', [str(path)])
  ns = runpy.run_path(str(path), run_name='__main__')
  flipped = ns['splits']['train']['corruption'] == 1
  assert ns['auroc'] == pytest.approx(roc_auc_score(~flipped, ns['scores']))
  assert ns['report']['noise_auroc'] == pytest.approx(ns['auroc'])
  new = ns['new']
  exported = load_rater(os.path.join(ns['work'], 'exported'))(new)
  np.testing.assert_allclose(exported, load_rater(os.path.join(ns['work'], 'rater'))(new))
  assert np.isfinite(ns['values']).all() and len(ns['values']) == len(flipped)
  assert ns['filtered']['num_train'] == round(0.8 * len(flipped))
