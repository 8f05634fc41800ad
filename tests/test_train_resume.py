"""launch.train resumes from its workdir: a stopped and resumed run equals an uninterrupted one."""
import contextlib
import io
import json
import os
import shutil
import signal

import numpy as np
import pytest

from configs import digits, selection
from datarater import policies
from datarater.errors import UserError
from datarater.train import train
from tests import forked
from tests.conftest import digits_data, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda *_: None


def _history(report):
  """Per-epoch held-out and eval figures (they depend on every parameter of every model) and the
  running training loss."""
  return [(r['epoch'], r['example_gradients'], r['step'], r['heldout'], r['eval'], r['train'])
          for r in report['history']]


def _config(tfds_dir, epochs, module=digits):
  c = module.get_config()
  c.data = digits_data(tfds_dir, c.data.label_noise)
  c.train.epochs, c.train.seeds, c.train.checkpoint_every = epochs, (0, 1), 2
  c.features.train_steps, c.sae.steps = 40, 100  # a small extractor and SAE: this tests resuming
  return c


@pytest.mark.slow
def test_weighting_run_stopped_resumed_and_extended_equals_uninterrupted(tfds_dir, tmp_path):
  straight = train(_config(tfds_dir, 5), 'uniform', workdir=str(tmp_path / 'a'), log=quiet)

  # Stopped after epoch 3 (checkpoint_every=2: the stop writes its own), then resumed.
  config = _config(tfds_dir, 5)
  assert train(config, 'uniform', workdir=str(tmp_path / 'b'), stop_after=3,
               log=quiet) == {'stopped_after': 3}
  assert not (tmp_path / 'b' / 'report.json').exists()
  lines = []
  resumed = train(config, 'uniform', workdir=str(tmp_path / 'b'), log=lines.append)
  assert 'resuming from the checkpoint at epoch 3' in lines
  assert _history(resumed) == _history(straight)
  records = [json.loads(l) for l in open(tmp_path / 'b' / 'history.jsonl')]
  assert [r['epoch'] for r in records] == [1, 2, 3, 4, 5]  # no epoch twice, none missing

  # A finished 2-epoch run extended to 5 epochs: the epoch count may change for weighting.
  train(_config(tfds_dir, 2), 'uniform', workdir=str(tmp_path / 'c'), log=quiet)
  extended = train(_config(tfds_dir, 5), 'uniform', workdir=str(tmp_path / 'c'), log=quiet)
  assert _history(extended) == _history(straight)


@pytest.mark.slow
def test_sae_selection_run_resumed_equals_uninterrupted(tfds_dir, tmp_path):
  """The SAE policy's usage counts and factor usage are checkpointed with the models."""
  straight = train(_config(tfds_dir, 3, selection), 'sae', workdir=str(tmp_path / 'a'), log=quiet)
  workdir = str(tmp_path / 'b')
  assert train(_config(tfds_dir, 3, selection), 'sae', workdir=workdir, stop_after=1,
               log=quiet) == {'stopped_after': 1}
  resumed = train(_config(tfds_dir, 3, selection), 'sae', workdir=workdir, log=quiet)
  assert _history(resumed) == _history(straight)
  with pytest.raises(UserError, match='different config.*train.epochs'):  # its choices span them
    train(_config(tfds_dir, 4, selection), 'sae', workdir=workdir, log=quiet)


# The tests that read `straight_runs` stay on one pytest-xdist worker, which runs each once.
STRAIGHT = pytest.mark.xdist_group('train_resume_straight')


@pytest.fixture(scope='module')
def straight_runs(tfds_dir):
  """policy -> the report of an uninterrupted 3-epoch run of `_config` (selection's for
  infobatch), in memory, made on first use."""
  done = {}

  def get(policy):
    if policy not in done:
      config = _config(tfds_dir, 3, selection if policy == 'infobatch' else digits)
      done[policy] = train(config, policy, log=quiet)
    return done[policy]
  return get


@STRAIGHT
def test_a_finished_infobatch_run_extended_to_more_epochs_equals_the_longer_run(
    tfds_dir, tmp_path, straight_runs):
  """InfoBatch's choices do not read train.epochs (only the SAE curriculum's do), so a finished
  run may be extended, as a weighting run may: it was refused as 'a different config'."""
  train(_config(tfds_dir, 2, selection), 'infobatch', workdir=str(tmp_path / 'b'), log=quiet)
  extended = train(_config(tfds_dir, 3, selection), 'infobatch', workdir=str(tmp_path / 'b'),
                   log=quiet)
  assert _history(extended) == _history(straight_runs('infobatch'))
  _check_train_figure(tmp_path / 'b', (0, 1))  # drawn again over the whole extended history


@pytest.mark.slow
@pytest.mark.parametrize('policy, unread', [('tracin_curriculum', ('dvemb_steps', 7)),
                                            ('mimic', ('tracin_mode', 'heldout_cos'))])
def test_a_valuing_policys_run_resumed_past_a_valuation_field_it_does_not_read_equals_uninterrupted(
    tfds_dir, tmp_path, policy, unread):
  """tracin_curriculum and mimic read their valuation fields alone (`policies.FIELDS`): a run
  stopped, then resumed under another value of a field they do not read, equals the
  uninterrupted run (it was refused as 'a different config')."""
  def config(**valuation):
    c = _config(tfds_dir, 2)
    c.train.seeds, c.task.hidden = (0,), (16,)
    c.valuation.train_steps, c.valuation.checkpoint_every, c.valuation.reference_steps = 10, 5, 10
    c.valuation.update(valuation)
    return c
  straight = train(config(), policy, workdir=str(tmp_path / 'a'), log=quiet)
  workdir = str(tmp_path / 'b')
  assert train(config(), policy, workdir=workdir, stop_after=1, log=quiet) == {'stopped_after': 1}
  lines = []
  resumed = train(config(**dict([unread])), policy, workdir=workdir, log=lines.append)
  assert 'resuming from the checkpoint at epoch 1' in lines
  assert _history(resumed) == _history(straight)


# The tests that read `stopped_at_3` stay on one pytest-xdist worker, which runs it once.
STOPPED_AT_3 = pytest.mark.xdist_group('train_resume_stopped_at_3')


@pytest.fixture(scope='module')
def stopped_at_3(tfds_dir, tmp_path_factory):
  """(config, workdir): a 4-epoch uniform run of seed 0, checkpointed every epoch, stopped after
  epoch 3. Read only: a test that may write in it works on its own copy."""
  config = _config(tfds_dir, 4)
  config.train.seeds, config.train.checkpoint_every = (0,), 1
  workdir = tmp_path_factory.mktemp('stopped') / 'run'
  assert train(config, 'uniform', workdir=str(workdir), stop_after=3,
               log=quiet) == {'stopped_after': 3}
  return config, workdir


@STOPPED_AT_3
def test_resume_with_another_config_is_refused_and_writes_nothing(tfds_dir, tmp_path,
                                                                   monkeypatch, stopped_at_3):
  config, stopped = stopped_at_3[0].copy_and_resolve_references(), stopped_at_3[1]
  workdir = tmp_path / 'run'
  shutil.copytree(stopped, workdir)
  before = (workdir / 'history.jsonl').read_text()

  other = config.copy_and_resolve_references()
  other.train.learning_rate = 0.01
  with pytest.raises(UserError, match='different config.*learning_rate'):
    train(other, 'uniform', workdir=str(workdir), log=quiet)
  with monkeypatch.context() as m:  # refused before the policy's set-up (a TracIn fit here)
    m.setattr(policies, 'start_policy', lambda *a, **k: pytest.fail('the policy was set up'))
    with pytest.raises(UserError, match='different config.*policy'):
      train(config, 'tracin_curriculum', workdir=str(workdir), log=quiet)
  shorter = config.copy_and_resolve_references()
  shorter.train.epochs = 1
  with pytest.raises(UserError, match='checkpoint at epoch 3, past train.epochs=1'):
    train(shorter, 'uniform', workdir=str(workdir), log=quiet)
  with pytest.raises(UserError, match='--stop_after needs --workdir'):
    train(config, 'uniform', stop_after=1, log=quiet)
  assert (workdir / 'history.jsonl').read_text() == before
  assert sorted(os.listdir(workdir / 'checkpoints')) == sorted(
      os.listdir(stopped / 'checkpoints'))


# In CI: the Ctrl-C test's rerun (python -m launch.train, resumed) and launch.train
# --stop_after=2 (exit 0, its checkpoints) in tests/test_resume_refusals.py.
@pytest.mark.slow
def test_command_line_stop_and_resume(tfds_dir, tmp_path):
  """The flags end to end (the launcher's flags and main through `cli.invoke`, in this process;
  `python -m launch.train` itself runs in the Ctrl-C test below): --stop_after exits 0 with a
  checkpoint, a rerun finishes the run."""
  from launch import cli  # pylint: disable=g-import-not-at-top
  from launch import train as train_launcher  # pylint: disable=g-import-not-at-top
  def launch(*extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      code = cli.invoke(train_launcher, [
          'train', '--config=configs/digits.py', f'--config.data.data_dir={tfds_dir}',
          '--config.train.epochs=3', '--config.train.seeds=(0,)', f'--workdir={tmp_path}',
          *extra])
    return code, out.getvalue()
  code, out = launch('--stop_after=1')
  assert code == 0, out[-2000:]
  assert 'stopped after epoch 1 (checkpointed)' in out
  code, out = launch()
  assert code == 0, out[-2000:]
  assert 'resuming from the checkpoint at epoch 1' in out
  assert json.loads((tmp_path / 'report.json').read_text())['final']['epoch'] == 3


def _ctrl_c_as_epoch_1_is_checkpointed(args: list) -> None:
  """launch.train `args`, sent Ctrl-C as its first checkpoint's write begins."""
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  save = checkpointing.RunCheckpointer.save
  def interrupted(self, step, *rest, **kwargs):
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)
    save(self, step, *rest, **kwargs)
  checkpointing.RunCheckpointer.save = interrupted
  forked.as_main('launch.train', args)


def test_ctrl_c_as_a_checkpoint_is_written_stops_once_it_is(tfds_dir, tmp_path):
  """It interrupted orbax's write (tracebacks of its threads, at times a hang at exit, and no
  checkpoint): now the run stops with Ctrl-C's one line after the checkpoint, and resumes there."""
  args = ['--config=configs/digits.py', f'--config.data.data_dir={tfds_dir}',
          '--config.train.epochs=3', '--config.train.seeds=(0,)',
          '--config.train.checkpoint_every=1', f'--workdir={tmp_path}']
  done = forked.call(_ctrl_c_as_epoch_1_is_checkpointed, args, env=subprocess_env(1), timeout=120)
  assert done.returncode == -signal.SIGINT, done.stderr[-3000:]
  out = done.stdout + done.stderr
  assert 'Traceback' not in out and out.count('interrupted (Ctrl-C) at ') == 1, out[-3000:]
  again = forked.run('launch.train', args, subprocess_env(1))
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'resuming from the checkpoint at epoch 1' in again.stdout


@STOPPED_AT_3
@pytest.mark.parametrize('how', ['truncated', pytest.param('renamed', marks=pytest.mark.slow)])
def test_resumed_past_an_unreadable_checkpoint_equals_uninterrupted(tfds_dir, tmp_path, caplog,
                                                                    capsys, stopped_at_3, how):
  """The newest checkpoint (epoch 3) is damaged, its arrays cut short or its record valid JSON
  without its step (a KeyError traceback): the run resumes from epoch 2, writes epochs 3 and 4
  again, once each, and its history equals an uninterrupted run's."""
  from tests.test_robustness import _corrupt  # pylint: disable=g-import-not-at-top
  config, stopped = stopped_at_3[0].copy_and_resolve_references(), stopped_at_3[1]
  straight = train(config, 'uniform', workdir=str(tmp_path / 'a'), log=quiet)
  workdir = tmp_path / 'b'
  shutil.copytree(stopped, workdir)  # stopped after epoch 3
  _corrupt(str(workdir / 'checkpoints' / '3'), how)
  lines = []
  resumed = train(config, 'uniform', workdir=str(workdir), log=lines.append)
  assert 'resuming from the checkpoint at epoch 2' in lines
  # (the warning goes to the log, or to stdout once a run has set up the log's handler)
  assert 'checkpoints/3 is unreadable' in caplog.text + capsys.readouterr().out
  assert _history(resumed) == _history(straight)
  records = [json.loads(l) for l in open(workdir / 'history.jsonl')]
  assert [r['epoch'] for r in records] == [1, 2, 3, 4]  # no epoch twice, none missing


@STRAIGHT
@pytest.mark.parametrize('policy', [pytest.param('uniform', marks=pytest.mark.slow), 'infobatch'])
def test_a_streamed_training_split_trains_like_one_in_memory(tfds_dir, tmp_path, straight_runs,
                                                             policy):
  """train.stream reads the batches from the TFDS files as the steps go: the same steps, so the
  same figures; stopped and resumed from a streamed run's checkpoint in memory, too (streaming is
  not part of the trajectory)."""
  config = _config(tfds_dir, 3, selection if policy == 'infobatch' else digits)
  memory = straight_runs(policy)
  config.train.stream = True
  lines = []
  streamed = train(config, policy, workdir=str(tmp_path / 's'), stop_after=2, log=lines.append)
  assert streamed == {'stopped_after': 2} and 'streamed)' in lines[0], lines[0]
  config.train.stream = False
  assert not (tmp_path / 's' / 'train_report.png').exists()  # drawn with the report
  resumed = train(config, policy, workdir=str(tmp_path / 's'), log=quiet)
  for got, want in zip(_history(resumed), _history(memory)):
    assert got[:3] == want[:3]
    for split in (3, 4, 5):  # heldout, eval, the running training loss
      for metric, values in want[split].items():
        np.testing.assert_allclose(got[split][metric], values, rtol=1e-5, atol=1e-6)
  _check_train_figure(tmp_path / 's', config.train.seeds)


def _check_train_figure(workdir, seeds):
  """The run's train_report.png exists, and its figure drawn again from history.jsonl has
  labelled axes and, in each panel, one line per seed over every epoch of the history."""
  from datarater import plots  # pylint: disable=g-import-not-at-top
  assert (workdir / 'train_report.png').stat().st_size > 0
  records = [json.loads(l) for l in open(workdir / 'history.jsonl')]
  assert [r['epoch'] for r in records] == list(range(1, len(records) + 1))
  fig = plots.train_figure(records, seeds, 'title')
  try:
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert sorted(panels) == ['accuracy', 'loss (mean per example)']
    for ylabel, ax in panels.items():
      assert ax.get_xlabel().startswith('training step') and ax.get_title()
      splits = ('train', 'eval') if ylabel.startswith('loss') else ('eval',)
      metric = ylabel.split()[0]
      for split in splits:
        for i, seed in enumerate(seeds):
          line, = [l for l in ax.get_lines() if l.get_label() == f'{split} seed {seed}']
          assert list(line.get_xdata()) == [r['step'] for r in records]
          np.testing.assert_allclose(line.get_ydata(), [r[split][metric][i] for r in records])
  finally:
    plots.plt.close(fig)


def test_the_sae_policy_refuses_a_streamed_split_in_one_line(tfds_dir):
  config = _config(tfds_dir, 1, selection)
  config.train.stream = True
  with pytest.raises(UserError, match='policy sae reads the whole training split'):
    train(config, 'sae', log=quiet)
