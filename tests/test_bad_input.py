"""Bad input stops with a one-line error naming the bad value, and the workdir is left as it was."""
import os
import subprocess
import sys

import pytest

from datarater.errors import UserError
from datarater.meta_train import meta_train
from tests.run_config import as_flags, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(path):
  if not os.path.exists(path):
    return None
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize('field,value,message', [
    ('data.name', 'no_such_dataset', "unknown dataset 'no_such_dataset'"),
    ('inner.steps', 0, 'inner.steps (T) must be >= 1, got 0'),
    ('rater.temperature', 0.0, 'rater.temperature (tau) must be > 0, got 0.0'),
    ('rater.temperature', -1.0, 'rater.temperature (tau) must be > 0, got -1.0'),
    ('inner.batch_size', 6, 'inner.batch_size=6 does not divide over 4 devices'),
    ('inner.optimizer', 'adamw2', "unknown inner optimizer 'adamw2'"),
    ('outer.mixed_recompute', 'backwards', "unknown outer.mixed_recompute 'backwards'"),
    ('outer.mixed_segment', -2, 'outer.mixed_segment must be >= 0 (0: default), got -2'),
])
def test_bad_config_writes_nothing(tfds_dir, tmp_path, field, value, message):
  config = small_config(tfds_dir)
  config.inner.population = 1  # so the 4 test devices all split the batch
  group, name = field.split('.')
  config[group][name] = value
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')) as err:
    meta_train(config, str(workdir))
  assert '\n' not in str(err.value)
  assert not workdir.exists()


def test_invert_needs_an_invertible_inner_optimizer(tfds_dir, tmp_path):
  config = small_config(tfds_dir)
  config.inner.optimizer, config.outer.mixed_recompute = 'sgd', 'invert'
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match="mixed_recompute='invert' needs an inner optimizer that can "
                                      r"be run backwards \(momentum, adam\), got "
                                      "inner.optimizer='sgd'"):
    meta_train(config, str(workdir))
  assert not workdir.exists()


def test_checkpoint_of_another_config_is_refused_untouched(tfds_dir, tmp_path):
  workdir = tmp_path / 'run'
  meta_train(small_config(tfds_dir), str(workdir), stop_after=2)
  before = _snapshot(workdir)
  other = small_config(tfds_dir)
  other.inner.steps = 3
  with pytest.raises(UserError, match=r'holds a checkpoint of a different config '
                                      r'\(inner.steps=2 there, 3 here\)'):
    meta_train(other, str(workdir))
  assert _snapshot(workdir) == before


def test_cli_prints_one_line_and_exits_2(tfds_dir, tmp_path):
  config = small_config(tfds_dir)
  result = subprocess.run(
      [sys.executable, '-m', 'launch.train_rater', f'--workdir={tmp_path / "run"}',
       *as_flags(config), '--config.rater.temperature=-0.5'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'error: rater.temperature (tau) must be > 0, got -0.5']
  assert not (tmp_path / 'run').exists()
