"""The default experiment does its job: the rater finds the corrupted labels, its weights help, and
the keep its score histogram suggests leaves most of the corrupted labels out."""
import jax
import numpy as np
import pytest

from configs.digits import get_config
from datarater import export
from datarater.curation import select
from datarater.data import pipeline
from datarater.meta_train import meta_train
from tests.conftest import otsu_keep


def _check(report):
  assert report['noise_auroc'] >= 0.85, report
  fresh = report['fresh_models']
  assert fresh['rater']['heldout']['loss'] < fresh['uniform']['heldout']['loss'], fresh


def test_short_default_run_separates_noisy_examples(tfds_dir, tmp_path):
  config = get_config()
  config.data.data_dir = tfds_dir
  config.outer.steps = 50  # noise AUROC 0.91; 4% of the kept labels corrupted (20% in all)
  config.final_eval.num_models = 1  # held-out loss 0.38 with the rater, 0.48 uniform, here
  config.final_eval.train_steps = 100
  # On 1 device: the steps run ~1.4x faster than on the 4 fake ones (1 == 4 devices is
  # tests/test_sharding.py's).
  report = meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  _check(report)
  # The suggested keep is the brute-force Otsu split of the exported rater's training scores.
  train = pipeline.load_split(config.data, config.data.train_split, corrupt=True)
  scores = export.load_rater(str(tmp_path / 'run'))(train.features)
  assert abs(report['suggested_keep'] - otsu_keep(scores)) <= 1 / len(scores)
  # Filtering at it at least halves the corrupted share (20% in the split).
  kept = select.select_top(np.asarray(scores), report['suggested_keep'])
  assert train.is_corrupted[kept].mean() < train.is_corrupted.mean() / 2


@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_full_default_run(tfds_dir, tmp_path, seed):
  config = get_config()
  config.data.data_dir = tfds_dir
  config.seed = config.data.noise_seed = seed
  _check(meta_train(config, str(tmp_path / 'run')))
