"""Workdirs a run must not resume: inputs named by path whose contents changed since the
checkpoint, or checkpoints that are all unreadable. Each is refused in one line, nothing
written; a rater whose checkpoints or params cannot be read is refused in one line too."""
import contextlib
import glob
import io
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from datarater import export, files
from datarater.curation.filter import filter_dataset
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.meta_train import meta_train
from datarater.train import train
from launch import cli, train as train_launcher, train_rater
from tests import forked
from tests.conftest import subprocess_env
from tests.run_config import as_flags, small_config
from tests.test_bad_input import _snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda *_: None


def _refused(launcher, argv, root, *named):
  """Runs `launcher` in this process: exit 2, one `error:` line holding `named`, `root`
  unchanged."""
  before = _snapshot(root)
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.invoke(launcher, [launcher.__name__.split('.')[-1], *argv])
  lines = [l for l in err.getvalue().splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), err.getvalue()[-3000:]
  for part in named:
    assert part in lines[0], (part, lines[0])
  assert _snapshot(root) == before
  return lines[0]


# The tests that read `finished_run` or `stopped_run` share them, on one pytest worker (each would
# make its own).
FINISHED = pytest.mark.xdist_group('resume_refusals_finished')


@pytest.fixture(scope='module')
def finished_run(tfds_dir, tmp_path_factory):
  """The small rater run of 4 outer steps on one device, run to its end once for the module:
  the tests that need such a run read it (or copy it) and never write in it."""
  run = tmp_path_factory.mktemp('finished') / 'run'
  meta_train(small_config(tfds_dir, steps=4), str(run), devices=jax.devices()[:1])
  return run


@pytest.fixture(scope='module')
def stopped_run(tfds_dir, tmp_path_factory):
  """`finished_run`'s config with a checkpoint at every step, stopped after step 2, once for the
  module: its tests copy it before they write in it."""
  config = small_config(tfds_dir, steps=4)
  config.checkpoint_every = 1  # a field that leaves the steps alone (a resume may change it)
  run = tmp_path_factory.mktemp('stopped') / 'run'
  meta_train(config, str(run), stop_after=2, devices=jax.devices()[:1])
  return run


def _copy(run, to):
  shutil.copytree(run, to, ignore=shutil.ignore_patterns('.lock'))
  return to


def _scores(path, n, seed):
  files.write_parquet(path, {'id': np.arange(n),
                             'value': np.random.default_rng(seed).normal(size=n)})


def test_a_rater_run_on_a_dataset_folder_written_again_is_not_resumed(tfds_dir, tmp_path):
  """launch.filter --overwrite writes another dataset into the folder data.dataset_dir names:
  the resumed run would mix the two, so it stops, naming the field and the folder (the folder
  unchanged, the run's own decision, `check_compatible` on its checkpointer, is to resume)."""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  n = len(pipeline.load_split(small_config(tfds_dir).data, 'train'))
  scores, folder = str(tmp_path / 'scores.parquet'), str(tmp_path / 'filtered')
  _scores(scores, n, 0)
  filter_dataset('sklearn_digits', folder, ['train'], scores=scores, keep=0.5,
                 data_dir=tfds_dir, batch_size=256)
  config = small_config(tfds_dir, steps=4)
  config.data.dataset_dir, config.data.label_noise = folder, 0.0
  workdir = tmp_path / 'run'
  meta_train(config, str(workdir), stop_after=2, devices=jax.devices()[:1])
  assert meta_train_lib.run_checkpointer(config, str(workdir)).check_compatible() == 2
  filter_dataset('sklearn_digits', folder, ['train'], scores=scores, keep=0.9,
                 data_dir=tfds_dir, batch_size=256, overwrite=True)
  _refused(train_rater, [*as_flags(config), f'--config.data.dataset_dir={folder}',
                         '--config.data.label_noise=0.0', f'--workdir={workdir}'], tmp_path,
           f"data.dataset_dir '{folder}' changed since the checkpoint", 'use a new --workdir')


def test_a_training_run_whose_scores_file_changed_is_not_resumed(tfds_dir, tmp_path,
                                                                  monkeypatch):
  """An untouched file is not read again; the same bytes written again resume; other scores at
  the same path are refused; a checkpoint of older code, which recorded no digest, resumes
  unchecked as it did. (After the first resume, the decisions are launch.train's own
  `check_compatible` on the run's checkpointer.)"""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.data.data_dir, config.train.epochs, config.train.seeds = tfds_dir, 4, (0,)
  config.train.checkpoint_every = 1
  n = len(pipeline.load_split(config.data, 'train'))
  scores, workdir = str(tmp_path / 'scores.parquet'), tmp_path / 'run'
  _scores(scores, n, 0)
  run = lambda **kw: train(config, 'scores', scores=scores, workdir=str(workdir), log=quiet, **kw)
  resumed = lambda: train_lib.run_checkpointer(config, str(workdir), 'scores', '', scores,
                                               False).check_compatible()
  assert run(stop_after=1) == {'stopped_after': 1}
  read, content_digest = [], files.content_digest
  monkeypatch.setattr(files, 'content_digest', lambda p: read.append(p) or content_digest(p))
  assert run(stop_after=2) == {'stopped_after': 2}
  assert not read  # names, sizes and times as recorded: the digest recorded is kept
  _scores(scores, n, 0)  # rewritten alike (a new modification time): read again, resumed
  assert resumed() == 2 and read == [scores]
  _scores(scores, n, 1)
  flags = ['--config=configs/digits.py', f'--config.data.data_dir={tfds_dir}',
           '--config.train.epochs=4', '--config.train.seeds=(0,)',
           '--config.train.checkpoint_every=1', '--policy=scores', f'--scores={scores}',
           f'--workdir={workdir}']
  _refused(train_launcher, flags, workdir, f"--scores '{scores}' changed since the checkpoint",
           'use a new --workdir')
  for meta_file in glob.glob(str(workdir / 'checkpoints' / '*' / 'meta' / 'metadata')):
    meta = json.load(open(meta_file))
    del meta['inputs']  # as written before the digests were recorded
    json.dump(meta, open(meta_file, 'w'))
  assert resumed() == 2


def test_an_input_is_recorded_as_the_run_read_it_not_as_it_was_at_the_first_save(tmp_path):
  """A fresh run digests its inputs when it starts: contents replaced before its first
  checkpoint were recorded as read (a resume on them accepted, one on the contents it trained on
  refused). A file named itself is in its stat digest even when its name starts with '.' (the
  digest of nothing: a changed file resumed unread)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'ds'
  folder.mkdir()
  (folder / 'train.bin').write_bytes(b'v1' * 100)
  config = ml_collections.ConfigDict({'seed': 0, 'data': {'data_dir': '', 'dataset_dir':
                                                          str(folder)}})
  ckpt = lambda: checkpointing.RunCheckpointer(str(tmp_path / 'w'), config,
                                               inputs=checkpointing.path_inputs(config.data))
  run = ckpt()
  assert run.check_compatible() is None  # fresh: the run reads v1 now
  (folder / 'train.bin').write_bytes(b'v2' * 100)
  run.save(1, {'a': jnp.ones(3)}, {'position': 1})
  run.close()
  with pytest.raises(UserError, match='changed since the checkpoint'):
    ckpt().check_compatible()
  (folder / 'train.bin').write_bytes(b'v1' * 100)
  assert ckpt().check_compatible() == 1
  hidden = tmp_path / '.scores.bin'
  hidden.write_bytes(b'0' * 10)
  before = files.stat_digest(str(hidden))
  hidden.write_bytes(b'0' * 11)
  assert files.stat_digest(str(hidden)) != before != files.stat_digest(str(tmp_path / 'none'))


def test_a_checkpoint_folder_with_a_backslash_is_refused(tmp_path):
  """tensorstore reads a backslash as a separator: checkpoints under such a folder were written
  elsewhere and never read back."""
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=r"holds '\\\\' in its path"):
    checkpointing.check_writable_path(str(tmp_path / 'a\\run'), '--workdir')


@FINISHED
def test_a_training_run_whose_rater_trained_on_is_not_resumed(tfds_dir, tmp_path, finished_run):
  """--rater names a rater run that has since been extended: its rater is another. The same
  run reporting again (its config.json written anew, the rater unchanged) still resumes
  (launch.train's own decision, `check_compatible` on the run's checkpointer)."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  rater_run, workdir = str(tmp_path / 'rater_run'), str(tmp_path / 'run')
  rater_config = small_config(tfds_dir, steps=4)  # the config of `finished_run`, copied here
  _copy(finished_run, rater_run)
  config = digits.get_config()
  config.data.data_dir, config.train.epochs, config.train.seeds = tfds_dir, 3, (0,)
  assert train(config, 'datarater', rater=rater_run, workdir=workdir, stop_after=1,
               log=quiet) == {'stopped_after': 1}
  before = open(os.path.join(rater_run, 'config.json')).read()
  rater_config.log_every = 1  # a field a finished run may change: it only reports again
  meta_train(rater_config, rater_run, devices=jax.devices()[:1])
  assert open(os.path.join(rater_run, 'config.json')).read() != before
  assert train_lib.run_checkpointer(config, workdir, 'datarater', rater_run, '',
                                    False).check_compatible() == 1
  rater_config.outer.steps = 6
  meta_train(rater_config, rater_run, devices=jax.devices()[:1])
  _refused(train_launcher, ['--config=configs/digits.py', f'--config.data.data_dir={tfds_dir}',
                            '--config.train.epochs=3', '--config.train.seeds=(0,)',
                            '--policy=datarater', f'--rater={rater_run}', f'--workdir={workdir}'],
           tmp_path / 'run', f"--rater '{rater_run}' changed since the checkpoint")


def test_a_dataset_folder_that_cannot_be_read_is_one_line(tfds_dir, tmp_path):
  """A broken link inside data.dataset_dir: one line naming the field, nothing written."""
  folder = tmp_path / 'data'
  shutil.copytree(os.path.dirname(glob.glob(f'{tfds_dir}/sklearn_digits/*/dataset_info.json')[0]),
                  folder)
  os.symlink(tmp_path / 'nowhere', folder / 'broken')
  _refused(train_rater, [*as_flags(small_config(tfds_dir)), f'--config.data.dataset_dir={folder}',
                         f'--workdir={tmp_path / "run"}'], tmp_path / 'run',
           f"data.dataset_dir '{folder}' cannot be read to check it against the checkpoint")


def _garble_every_checkpoint(workdir):
  steps = os.listdir(workdir / 'checkpoints')
  for step in steps:
    with open(workdir / 'checkpoints' / step / 'meta' / 'metadata', 'w') as f:
      f.write('{"config": ')
  return sorted(steps, key=int, reverse=True)


@FINISHED
def test_a_rater_run_whose_every_checkpoint_is_unreadable_stops_and_keeps_its_files(
    tfds_dir, tmp_path, stopped_run):
  """Not a fresh start over the old run's metrics (nor a crash on its step folders)."""
  config = small_config(tfds_dir, steps=4)
  config.checkpoint_every = 1  # the config of `stopped_run`, copied here
  workdir = _copy(stopped_run, tmp_path / 'run')
  assert _garble_every_checkpoint(workdir) == ['2', '1']
  _refused(train_rater, [*as_flags(config), f'--workdir={workdir}'], tmp_path,
           f"error: no readable checkpoint in '{workdir}/checkpoints' (step(s) 2, 1 unreadable",
           'move it aside or use a new --workdir')


def test_a_training_run_whose_every_checkpoint_is_unreadable_stops_and_keeps_its_files(
    tfds_dir, tmp_path):
  workdir = tmp_path / 'run'
  flags = ['--config=configs/digits.py', f'--config.data.data_dir={tfds_dir}',
           '--config.train.epochs=3', '--config.train.seeds=(0,)',
           '--config.train.checkpoint_every=1', f'--workdir={workdir}']
  with contextlib.redirect_stdout(io.StringIO()):
    assert cli.invoke(train_launcher, ['train', *flags, '--stop_after=2']) == 0
  assert _garble_every_checkpoint(workdir) == ['2', '1']
  _refused(train_launcher, flags, tmp_path,
           f"error: no readable checkpoint in '{workdir}/checkpoints' (step(s) 2, 1 unreadable",
           'move it aside or use a new --workdir')


@FINISHED
def test_a_rater_whose_checkpoints_or_params_cannot_be_read_is_refused_in_one_line(
    tfds_dir, tmp_path, finished_run):
  """Every checkpoint's array files gone, or a params/ folder of foreign files: launch.export_rater
  and launch.filter say so in one line on stderr (their own processes: tensorstore's closed-loop
  tracebacks and orbax's warnings reach stderr there), not 'no checkpoint'."""
  run, copy, rater = finished_run, tmp_path / 'copy', tmp_path / 'rater'
  export.export_rater(str(run), str(rater))
  shutil.copytree(run, copy)
  for data in glob.glob(str(copy / 'checkpoints' / '*' / 'state' / '**' / 'd'), recursive=True):
    shutil.rmtree(data)
  shutil.rmtree(rater / 'params')
  os.makedirs(rater / 'params')
  (rater / 'params' / '_METADATA').write_text('x')

  def stderr_of(module, *argv):
    before = _snapshot(tmp_path)
    done = forked.run(module, argv, subprocess_env(1))
    assert done.returncode == 2 and _snapshot(tmp_path) == before, done.stderr[-3000:]
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), done.stderr[-3000:]
    return lines[0]
  unreadable = f"no readable checkpoint in '{copy}/checkpoints': every one is unreadable"
  assert unreadable in stderr_of('launch.export_rater', f'--workdir={copy}',
                                 f'--out={tmp_path}/out')
  filter_flags = ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', '--split=train',
                  '--keep=0.5', f'--out={tmp_path}/out']
  assert unreadable in stderr_of('launch.filter', f'--rater={copy}', *filter_flags)
  assert 'its params/ folder is unreadable' in stderr_of('launch.filter', f'--rater={rater}',
                                                         *filter_flags)


def test_a_workdir_whose_checkpoints_is_a_file_is_refused_before_any_work(tfds_dir, tmp_path):
  """It was taken for 'no checkpoints': the run trained, wrote config.json and its log, then
  died at its first save with orbax's tracebacks."""
  config = small_config(tfds_dir, steps=2)
  for launcher, argv in ((train_rater, as_flags(config)),
                         (train_launcher, [f'--config.data.data_dir={tfds_dir}',
                                           '--config.train.epochs=1'])):
    workdir = tmp_path / launcher.__name__.split('.')[-1]
    workdir.mkdir()
    (workdir / 'checkpoints').write_text('not a folder')
    _refused(launcher, [f'--workdir={workdir}', *argv], str(workdir), 'checkpoints',
             'which is not a folder')


@FINISHED
def test_a_run_resumes_past_settings_of_sections_it_does_not_read(tfds_dir, tmp_path, capsys,
                                                                  finished_run, stopped_run):
  """A rater run stopped at step 2 resumes under a config with a setting added to its `policy`
  section and another changed in `valuation` (sections it does not read: a researcher adding a
  policy's setting) and ends with the uninterrupted run's rater; a changed setting of a section it
  reads is still refused (the run's resume decision, `check_compatible` on its checkpointer). So
  does a training run's checkpoint with a setting added to `outer` (launch.train's decision: its
  resumed runs equal uninterrupted ones in tests/test_train_resume.py), where one added to `train`
  is refused."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir, steps=4)  # the config of `finished_run`, run straight
  _copy(stopped_run, tmp_path / 'resumed')  # stopped at step 2 (its checkpoint_every aside)
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.policy.new_setting = 0.5
  changed.valuation.train_steps += 10
  other = ml_collections.ConfigDict(changed.to_dict())
  other.rater.temperature *= 2
  with pytest.raises(UserError, match='a checkpoint of a different config .*rater.temperature'):
    meta_train_lib.run_checkpointer(other, str(tmp_path / 'resumed')).check_compatible()
  capsys.readouterr()
  meta_train(changed, str(tmp_path / 'resumed'), devices=jax.devices()[:1])
  assert 'resumed from the checkpoint at outer step 2' in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(export.load_rater(str(finished_run)).params),
                  jax.tree.leaves(export.load_rater(str(tmp_path / 'resumed')).params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  workdir = str(tmp_path / 'trained')
  _save_one(train_lib.run_checkpointer(config, workdir, 'uniform', '', '', False),
            extra={'history': [], 'wall_s': 0.0, 'steps': 0})
  for section, refused in (('outer', False), ('train', True)):
    added = ml_collections.ConfigDict(config.to_dict())
    added[section].new_setting = 1
    _resumes_unless_refused(added, workdir, 'uniform', f'{section}.new_setting', refused)


def _save_one(ckpt, step: int = 2, extra=None) -> None:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ckpt.save(step, {'a': jnp.ones(3)}, {'train': 0}, extra)
  ckpt.close()


def test_a_checkpoint_that_recorded_every_section_resumes_past_those_the_run_does_not_read(
    tmp_path):
  """A rater run's checkpoint written before runs compared only the sections they read (its
  record holds `policy` and `valuation` fields, at other values than now) is resumed; the
  top-level `seed` and a section the run reads are still compared."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  config = small_config(str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'run')
  _save_one(meta_train_lib.run_checkpointer(config, workdir))
  (meta_file,) = glob.glob(os.path.join(workdir, 'checkpoints', '2', 'meta', 'metadata'))
  meta = json.load(open(meta_file))
  assert not [k for k in meta['config'] if k.startswith(('policy.', 'valuation.'))]
  meta['config'].update({'policy.ratio': 0.123, 'valuation.train_steps': 7})  # as recorded then
  json.dump(meta, open(meta_file, 'w'))
  assert meta_train_lib.run_checkpointer(config, workdir).check_compatible() == 2
  for field, value in (('seed', config.seed + 1),
                       ('inner.learning_rate', config.inner.learning_rate * 2)):
    other = ml_collections.ConfigDict(config.to_dict())
    section, _, name = field.rpartition('.')
    setattr(other[section] if section else other, name, value)
    with pytest.raises(UserError, match=rf'different config \({re.escape(field)}='):
      meta_train_lib.run_checkpointer(other, workdir).check_compatible()


@pytest.mark.parametrize('policy, field, value', [
    ('tracin_curriculum', 'valuation.train_steps', 7),
    ('sae', 'sae_scores.temperature', 0.9),
    ('sae', 'features.seed', 5)])
def test_a_training_run_compares_the_sections_its_policy_reads(tmp_path, policy, field, value):
  """A section a policy reads besides train's (`policies.SECTIONS`: tracin_curriculum's
  valuation, the SAE policy's features, sae, sae_scores) shapes the run: a checkpoint made under
  other values of it is refused, where a uniform run resumes past the same change."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  config = small_config(str(tmp_path / 'tfds'))
  changed = ml_collections.ConfigDict(config.to_dict())
  section, name = field.split('.')
  changed[section][name] = value
  for name_, refused in ((policy, True), ('uniform', False)):
    workdir = str(tmp_path / name_)
    _save_one(train_lib.run_checkpointer(config, workdir, name_, '', '', False),
              extra={'history': [], 'wall_s': 0.0, 'steps': 0})
    _resumes_unless_refused(changed, workdir, name_, field, refused)


def _resumes_unless_refused(config, workdir: str, policy: str, field: str, refused: bool):
  """launch.train's checkpoint in `workdir` under `config`: refused naming `field`, or resumed."""
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  resumed = train_lib.run_checkpointer(config, workdir, policy, '', '', False)
  if refused:
    with pytest.raises(UserError, match=rf'different config \({re.escape(field)}='):
      resumed.check_compatible()
  else:
    assert resumed.check_compatible() == 2


@pytest.mark.parametrize('policy, unread, read', [
    ('tracin_curriculum', ('valuation.dvemb_steps', 7), ('valuation.tracin_mode', 'heldout_cos')),
    ('mimic', ('valuation.tracin_mode', 'heldout_cos'), ('valuation.mimic_cosine', True)),
    ('random', ('policy.temperature', 0.5), ('policy.ratio', 0.5))])
def test_a_training_run_resumes_past_the_fields_its_policy_does_not_read(tmp_path, policy, unread,
                                                                         read):
  """Of a section a policy reads in part (`policies.FIELDS`: tracin_curriculum's and mimic's
  valuation fields, every policy's own), a field it does not read leaves its checkpoint
  resumable (the whole section was compared: 'a different config'); one it reads is refused."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  config = small_config(str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'run')
  _save_one(train_lib.run_checkpointer(config, workdir, policy, '', '', False),
            extra={'history': [], 'wall_s': 0.0, 'steps': 0})
  for (field, value), refused in ((unread, False), (read, True)):
    changed = ml_collections.ConfigDict(config.to_dict())
    section, name = field.split('.')
    assert changed[section][name] != value
    changed[section][name] = value
    _resumes_unless_refused(changed, workdir, policy, field, refused)


def test_a_training_run_resumes_past_the_top_level_seed_it_does_not_read(tmp_path):
  """launch.train reads `train.seeds`, not the top-level `seed` (the rater run's): a checkpoint
  made under another value of it is resumed (it was refused as 'a different config')."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  config = small_config(str(tmp_path / 'tfds'))
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.seed = config.seed + 1
  workdir = str(tmp_path / 'run')
  _save_one(train_lib.run_checkpointer(config, workdir, 'uniform', '', '', False),
            extra={'history': [], 'wall_s': 0.0, 'steps': 0})
  resumed = train_lib.run_checkpointer(changed, workdir, 'uniform', '', '', False)
  assert resumed.check_compatible() == 2


def test_a_free_field_frees_itself_and_its_subfields_not_the_fields_it_prefixes():
  """A resume compares every field but the free ones and those under a free section: `seed`
  free leaves `seed_offset` compared, `data` free leaves `database.y` (a field of one's own whose
  name a free one begins would otherwise change unchecked)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'seed': 1, 'seed_offset': 2, 'data': {'x': 3},
                                      'database': {'y': 4},
                                      'train': {'epochs': 5, 'epochs_per_eval': 6}})
  assert checkpointing.trajectory_fields(config, ('seed', 'data', 'train.epochs')) == {
      'seed_offset': 2, 'database.y': 4, 'train.epochs_per_eval': 6}


@pytest.mark.parametrize('shipped_config', ['digits', 'text'])
def test_a_checkpoint_of_a_config_without_the_precision_fields_resumes_under_their_defaults(
    tmp_path, shipped_config):
  """The shipped configs hold task.dtype / param_dtype (and the rater's, features.task's) at ''
  (flax's default), added after runs were checkpointed without them (the MLP's and CNN's, then
  the transformers' of configs/text.py): a checkpoint of a config without them resumes under one
  holding them at '', and the other way round, while bfloat16 there is refused; a valuation's
  fingerprint (its kept runs) is the same with or without them."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import text  # pylint: disable=g-import-not-at-top
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  from datarater.valuation import run as valuation_run  # pylint: disable=g-import-not-at-top
  shipped = small_config(str(tmp_path / 'tfds'))
  if shipped_config == 'text':
    shipped = text.get_config()
    shipped.data.data_dir = str(tmp_path / 'tfds')
  without = ml_collections.ConfigDict(shipped.to_dict())
  for section in (without.task, without.rater, without.features.task):
    del section['dtype'], section['param_dtype']
  for i, (made, resumed) in enumerate(((without, shipped), (shipped, without))):
    workdir = str(tmp_path / f'run{i}')
    _save_one(meta_train_lib.run_checkpointer(made, workdir))
    assert meta_train_lib.run_checkpointer(resumed, workdir).check_compatible() == 2
    bf16 = ml_collections.ConfigDict(resumed.to_dict())
    bf16.rater.dtype = 'bfloat16'
    with pytest.raises(UserError, match=r"different config \(rater.dtype='' there, 'bfloat16' "
                                        r"here\)"):
      meta_train_lib.run_checkpointer(bf16, workdir).check_compatible()
  fingerprint = lambda config: valuation_run.fingerprint('tracin', config, 'data', 'model')
  bf16.task.param_dtype = 'bfloat16'
  assert fingerprint(without) == fingerprint(shipped) != fingerprint(bf16)


def test_a_training_checkpoint_of_the_seeds_old_keys_is_refused_and_valuations_fit_again(
    tmp_path, monkeypatch):
  """The README's promise for checkpoints made before the components' keys were separated: a
  launch.train checkpoint that records no `key_derivation` is refused in one line, `a different
  config (key_derivation=(not recorded) there, 2 here)`, and a valuation's fit cache key moves
  with `seeding.KEYS_VERSION` (so its recorded runs are fitted again)."""
  from datarater import seeding  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  from datarater.valuation import run as valuation_run  # pylint: disable=g-import-not-at-top
  config = small_config(str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'run')
  _save_one(train_lib.run_checkpointer(config, workdir, 'uniform', '', '', False),
            extra={'history': [], 'wall_s': 0.0, 'steps': 0})
  assert train_lib.run_checkpointer(config, workdir, 'uniform', '', '', False
                                    ).check_compatible() == 2
  (meta_file,) = glob.glob(os.path.join(workdir, 'checkpoints', '2', 'meta', 'metadata'))
  meta = json.load(open(meta_file))
  assert meta['config'].pop('key_derivation') == 2  # as a checkpoint of older code records it
  json.dump(meta, open(meta_file, 'w'))
  with pytest.raises(UserError) as e:
    train_lib.run_checkpointer(config, workdir, 'uniform', '', '', False).check_compatible()
  assert 'a different config (key_derivation=(not recorded) there, 2 here)' in str(e.value)
  assert '\n' not in str(e.value)
  before = valuation_run.fingerprint('tracin', config, 'data', 'model')
  monkeypatch.setattr(seeding, 'KEYS_VERSION', 3)
  assert valuation_run.fingerprint('tracin', config, 'data', 'model') != before


def test_a_relative_checkpoint_folder_under_a_folder_that_is_not_utf8_is_refused(
    tmp_path, monkeypatch):
  """`--workdir=run` from a current folder whose name is not UTF-8 (Latin-1 'café'): the path
  given is UTF-8, so it was taken, and orbax's first save stopped in a tensorstore traceback
  (the oracle: a save there fails). Refused in one line naming the folder."""
  cwd = os.fsdecode(bytes(tmp_path) + b'/caf\xe9')
  os.mkdir(cwd)
  monkeypatch.chdir(cwd)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  with pytest.raises(Exception):  # pylint: disable=broad-exception-caught
    with ocp.CheckpointManager(os.path.abspath('orbax'),
                               options=ocp.CheckpointManagerOptions(create=True)) as manager:
      manager.save(0, args=ocp.args.StandardSave({'a': np.ones(2)}))
      manager.wait_until_finished()
  with pytest.raises(UserError, match=r"--workdir 'run' is in '.*caf\\udce9/run', which is not "
                     'UTF-8') as e:
    checkpointing.check_writable_path('run', '--workdir')
  assert '\n' not in str(e.value)
