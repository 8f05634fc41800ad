"""launch.valuate end to end on the digits: one row per training example keyed by id, errors."""
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from configs.valuate import get_config
from datarater.data import pipeline
from datarater.errors import UserError
from launch import valuate


def small_config(tfds_dir):
  c = get_config()
  c.data.data_dir = tfds_dir
  v = c.valuation
  v.train_steps, v.checkpoint_every, v.reference_steps, v.dvemb_steps = 20, 10, 20, 6
  v.batch_size = 32
  return c


@pytest.mark.parametrize('method', ['tracin', 'mimic',
                                    pytest.param('dvemb', marks=pytest.mark.slow)])
def test_valuate_writes_one_score_per_example(tfds_dir, tmp_path, method):
  config = small_config(tfds_dir)
  summary = valuate.valuate(method, config, str(tmp_path), progress=False)
  table = pq.read_table(os.path.join(tmp_path, f'scores_{method}.parquet')).to_pydict()
  train = pipeline.load_split('sklearn_digits', 'train', tfds_dir, 0.2, 0)
  np.testing.assert_array_equal(table['id'], train.ids)
  np.testing.assert_array_equal(table['is_corrupted'], train.is_corrupted)
  np.testing.assert_array_equal(table['label'], train.label)
  sign = 1 if summary['higher_is_better'] else -1
  np.testing.assert_allclose(table['value'], sign * np.asarray(table['score']))
  assert np.isfinite(table['score']).all() and np.std(table['score']) > 0
  assert 0.0 <= summary['noise_auroc'] <= 1.0
  assert not [f for f in os.listdir(tmp_path) if 'tmp' in f]
  if method == 'mimic':  # the filter keeps exactly the examples valued at or above its threshold
    np.testing.assert_array_equal(table['keep'],
                                  np.asarray(table['value']) >= summary['keep_threshold'])
    assert 0 < summary['kept'] < len(table['id'])


def test_valuate_errors_are_one_line_and_write_nothing(tfds_dir, tmp_path):
  config = small_config(tfds_dir)
  with pytest.raises(UserError, match="'shapley'"):
    valuate.valuate('shapley', config, str(tmp_path / 'a'))
  config.valuation.projection = 'sparse'
  with pytest.raises(UserError, match="'sparse'"):
    valuate.valuate('dvemb', config, str(tmp_path / 'b'))
  with pytest.raises(UserError, match='rater workdir .* does not exist'):
    valuate.valuate('datarater', small_config(tfds_dir), str(tmp_path / 'c'))
  config = small_config(tfds_dir)
  config.valuation.layers = 'dense_9'
  with pytest.raises(UserError, match="'dense_9'"):
    valuate.valuate('tracin', config, str(tmp_path / 'e'))
  config = small_config(tfds_dir)
  config.valuation.checkpoint_every = 7
  with pytest.raises(UserError, match='checkpoint_every=7'):
    valuate.valuate('tracin', config, str(tmp_path / 'd'))
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # ~25 s: trains a (2-step) rater with launch.train_rater first
def test_valuate_datarater_scores_are_the_trained_raters(tfds_dir, tmp_path):
  """A rater trained for 2 outer steps by launch.train_rater, loaded and scored by valuate."""
  from configs.digits import get_config as rater_config  # pylint: disable=g-import-not-at-top
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  from launch import train_rater  # pylint: disable=g-import-not-at-top
  c = rater_config()
  c.data.data_dir = tfds_dir
  c.outer.steps, c.checkpoint_every, c.log_every = 2, 2, 1
  c.inner.population, c.inner.batch_size, c.outer.batch_size = 2, 16, 16
  c.final_eval.train_steps, c.final_eval.num_models = 2, 1
  train_rater.train(c, str(tmp_path))
  summary = valuate.valuate('datarater', small_config(tfds_dir), str(tmp_path), progress=False)
  table = pq.read_table(os.path.join(tmp_path, 'scores_datarater.parquet')).to_pydict()
  rater, params, _, _ = checkpointing.load_trained_rater(str(tmp_path))
  train = pipeline.load_split('sklearn_digits', 'train', tfds_dir, 0.2, 0)
  want = rater.apply(params, {'image': train.image, 'label': train.label})
  np.testing.assert_allclose(table['score'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(table['id'], train.ids)
  assert summary['higher_is_better']
