"""The default experiment does its job: the rater finds the corrupted labels, and its weights help."""
import pytest

from configs.digits import get_config
from datarater.meta_train import meta_train


def _check(report):
  assert report['noise_auroc'] >= 0.85, report
  fresh = report['fresh_models']
  assert fresh['rater']['heldout']['loss'] < fresh['uniform']['heldout']['loss'], fresh


def test_short_default_run_separates_noisy_examples(tfds_dir, tmp_path):
  config = get_config()
  config.data.data_dir = tfds_dir
  config.outer.steps = 100
  config.final_eval.num_models = 2
  config.final_eval.train_steps = 150
  _check(meta_train(config, str(tmp_path / 'run')))


@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_full_default_run(tfds_dir, tmp_path, seed):
  config = get_config()
  config.data.data_dir = tfds_dir
  config.seed = config.data.noise_seed = seed
  _check(meta_train(config, str(tmp_path / 'run')))
