"""launch.train resumes from its workdir: a stopped and resumed run equals an uninterrupted one."""
import json
import os
import subprocess
import sys

import pytest

from configs import selection as selection_config
from configs import train as train_config
from datarater.errors import UserError
from launch import train as launch_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda *_: None


def _history(report):
  """Per-epoch held-out and eval figures (they depend on every parameter of every model)."""
  return [(r['epoch'], r['examples'], r['steps'], r['heldout_loss'], r['eval_loss'],
           r['eval_accuracy_per_seed']) for r in report['history']]


def _weighting_config(tfds_dir, epochs):
  c = train_config.get_config()
  c.data.data_dir = tfds_dir
  c.train.epochs, c.train.seeds, c.train.checkpoint_every = epochs, (0, 1), 2
  return c


def _selection_config(tfds_dir):
  c = selection_config.get_config()
  c.data.data_dir = tfds_dir
  c.train.epochs, c.train.seeds, c.train.checkpoint_every = 3, (0, 1), 2
  c.selection_ratio = 0.5
  c.features.train_steps, c.sae.steps = 40, 100  # a small extractor and SAE: this tests resuming
  return c


def test_weighting_run_stopped_resumed_and_extended_equals_uninterrupted(tfds_dir, tmp_path):
  straight = launch_train.run(_weighting_config(tfds_dir, 5), 'uniform',
                              workdir=str(tmp_path / 'a'), log=quiet)

  # Stopped after epoch 3 (checkpoint_every=2: the stop writes its own), then resumed.
  config = _weighting_config(tfds_dir, 5)
  assert launch_train.run(config, 'uniform', workdir=str(tmp_path / 'b'), stop_after=3,
                          log=quiet) == {'stopped_after': 3}
  assert not (tmp_path / 'b' / 'report.json').exists()
  lines = []
  resumed = launch_train.run(config, 'uniform', workdir=str(tmp_path / 'b'), log=lines.append)
  assert lines[0] == 'resuming from the checkpoint at epoch 3'
  assert _history(resumed) == _history(straight)
  records = [json.loads(l) for l in open(tmp_path / 'b' / 'history.jsonl')]
  assert [r['epoch'] for r in records] == [1, 2, 3, 4, 5]  # no epoch twice, none missing

  # A finished 2-epoch run extended to 5 epochs: the epoch count may change for weighting.
  launch_train.run(_weighting_config(tfds_dir, 2), 'uniform', workdir=str(tmp_path / 'c'),
                   log=quiet)
  extended = launch_train.run(_weighting_config(tfds_dir, 5), 'uniform',
                              workdir=str(tmp_path / 'c'), log=quiet)
  assert _history(extended) == _history(straight)


@pytest.mark.parametrize('policy', ['infobatch', 'sae'])
def test_selection_run_resumed_mid_seed_equals_uninterrupted(tfds_dir, tmp_path, policy):
  """Two seeds of 3 epochs: stopped inside seed 0 (step 2) and inside seed 1 (step 5)."""
  straight = launch_train.run(_selection_config(tfds_dir), 'uniform', workdir=str(tmp_path / 'a'),
                              selection=policy, log=quiet)
  workdir = str(tmp_path / 'b')
  for stop in (2, 5):
    assert launch_train.run(_selection_config(tfds_dir), 'uniform', workdir=workdir,
                            selection=policy, stop_after=stop, log=quiet) == {'stopped_after': stop}
  resumed = launch_train.run(_selection_config(tfds_dir), 'uniform', workdir=workdir,
                             selection=policy, log=quiet)
  assert _history(resumed) == _history(straight)
  # InfoBatch's pruning follows the losses it saw, the SAE policy its usage counts: both resumed.
  assert resumed['count_gini'] == straight['count_gini']


def test_resume_with_another_config_is_refused_and_writes_nothing(tfds_dir, tmp_path):
  workdir = tmp_path / 'run'
  config = _weighting_config(tfds_dir, 4)
  launch_train.run(config, 'uniform', workdir=str(workdir), stop_after=2, log=quiet)
  before = (workdir / 'history.jsonl').read_text()

  other = _weighting_config(tfds_dir, 4)
  other.train.learning_rate = 0.01
  with pytest.raises(UserError, match='different config.*learning_rate'):
    launch_train.run(other, 'uniform', workdir=str(workdir), log=quiet)
  with pytest.raises(UserError, match='different config.*weighting'):
    launch_train.run(config, 'tracin_curriculum', workdir=str(workdir), log=quiet)
  with pytest.raises(UserError, match='checkpoint at epoch 2, past --config.train.epochs=1'):
    launch_train.run(_weighting_config(tfds_dir, 1), 'uniform', workdir=str(workdir), log=quiet)
  with pytest.raises(UserError, match='--stop_after needs --workdir'):
    launch_train.run(config, 'uniform', stop_after=1, log=quiet)
  assert (workdir / 'history.jsonl').read_text() == before


def test_command_line_stop_and_resume(tfds_dir, tmp_path):
  """The flags end to end: --stop_after exits 0 with a checkpoint, a rerun finishes the run."""
  def launch(*extra):
    return subprocess.run(
        [sys.executable, '-m', 'launch.train', '--config=configs/train.py',
         f'--config.data.data_dir={tfds_dir}', '--config.train.epochs=3',
         '--config.train.seeds=(0,)', f'--workdir={tmp_path}', *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'))
  first = launch('--stop_after=1')
  assert first.returncode == 0, first.stderr[-2000:]
  assert 'stopped after epoch 1 (checkpointed)' in first.stdout
  second = launch()
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'resuming from the checkpoint at epoch 1' in second.stdout
  assert json.loads((tmp_path / 'report.json').read_text())['final']['epoch'] == 3
