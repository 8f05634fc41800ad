"""Runs that meet trouble: non-finite meta-gradients are skipped and never saved, a corrupted
latest checkpoint gives way to the newest intact one, collapsed weights are reported, --help,
file modes."""
import collections
import contextlib
import dataclasses
import glob
import io
import json
import logging
import os
import shutil
import stat
import sys
import time
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.flatten_util import ravel_pytree

from configs.digits import get_config
from datarater import checkpointing, export, files
from datarater.errors import UserError
from datarater.meta_train import meta_train, run_checkpointer
from launch import cli, train, train_rater
from outer_loop import meta_step, setup, sharding
from outer_loop.batches import MetaBatches
from tests.run_config import as_flags, small_config
from tests.tiny import estimator, tiny_batches, tiny_problem


def test_a_non_finite_meta_gradient_skips_the_step_and_resets_diverged_members():
  problem, est = tiny_problem(), estimator()
  inner, outer = tiny_batches(0, population=2, steps=2, batch=8)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2)
  step = jax.jit(lambda s, i, o: meta_step.outer_step(problem, est, s, i, o))
  good, metrics = step(state, inner, outer)
  assert int(good.skipped) == 0 and float(metrics['skipped_steps']) == 0
  poisoned = dict(inner, image=inner['image'].copy())
  poisoned['image'][1, 0, 0, 0] = np.nan  # member 1 meets a NaN input: its update is NaN
  bad, metrics = step(good, poisoned, outer)
  np.testing.assert_array_equal(ravel_pytree(bad.rater_params)[0],
                                ravel_pytree(good.rater_params)[0])  # rater untouched
  assert int(bad.skipped) == 1 and int(bad.skipped_in_a_row) == 1
  assert float(metrics['skipped_steps']) == 1 and float(metrics['diverged_members']) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(bad.population.params))
  # Member 0 went on as it would have without member 1's NaN; member 1 was re-initialised.
  clean, _ = step(good, inner, outer)
  member = lambda s, k: ravel_pytree(jax.tree.map(lambda x: x[k], s.population.params))[0]
  np.testing.assert_array_equal(member(bad, 0), member(clean, 0))
  assert not np.allclose(member(bad, 1), member(clean, 1))
  assert not np.allclose(member(bad, 1), member(good, 1))
  after, _ = step(bad, inner, outer)
  assert int(after.skipped_in_a_row) == 0 and int(after.skipped) == 1


def _one_error_line(argv) -> str:
  """launch.train_rater run in this process on `argv`: its exit code 2 and one line on stderr."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.invoke(train_rater, argv)
  lines = err.getvalue().strip().splitlines()
  assert code == 2 and len(lines) == 1, err.getvalue()
  return lines[0]


def test_a_rater_run_whose_meta_gradient_stays_non_finite_stops_with_finite_checkpoints(
    tfds_dir, tmp_path):
  workdir = tmp_path / 'nan'
  line = _one_error_line(['train_rater', *as_flags(small_config(tfds_dir, steps=10)),
                          f'--workdir={workdir}', '--config.inner.learning_rate=1e30',
                          '--config.outer.max_skipped_steps=3'])
  assert 'the meta-gradient was not finite at 4 outer steps in a row (by step 4)' in line
  state, _ = checkpointing.restore_latest_on_host(str(workdir / 'checkpoints'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))
  assert int(state['skipped']) >= 2  # what the checkpoint recorded as skipped
  export.export_rater(str(workdir), str(tmp_path / 'rater'))  # finite: exportable


@pytest.mark.parametrize('steps, max_skipped, in_a_row, stops', [
    (2, 20, 2, True),     # every step of a run shorter than max_skipped_steps: the rater untrained
    (2, 20, 1, False),    # one step taken
    (30, 20, 20, True),   # max_skipped_steps in a row
    (30, 20, 19, False),
])
def test_skipped_steps_stop_a_run_at_max_skipped_steps_in_a_row_or_at_all_of_a_shorter_one(
    steps, max_skipped, in_a_row, stops):
  """`check_skipped` on the longest run of skipped steps since the last check (a 2-step run
  whose both meta-gradients were NaN exited 0, its initial rater reported)."""
  from datarater import meta_train as mt  # pylint: disable=g-import-not-at-top
  config = small_config('', steps=steps)
  config.outer.max_skipped_steps = max_skipped
  progress = mt._Progress.__new__(mt._Progress)  # pylint: disable=protected-access
  # pylint: disable-next=protected-access
  progress._config, progress._longest_run, progress.totals = config, None, None
  progress._queued = collections.deque()  # pylint: disable=protected-access
  progress.add({'skipped_in_a_row': jnp.int32(in_a_row)})  # a step's, as the run queues it
  if stops:
    with pytest.raises(UserError, match=f'not finite at {in_a_row} outer steps in a row'):
      progress.check_skipped(steps)
  else:
    progress.check_skipped(steps)


@pytest.mark.slow
def test_a_two_step_rater_run_whose_every_meta_gradient_is_nan_exits_2(tfds_dir, tmp_path):
  """End to end: launch.train_rater, 2 outer steps of 20 allowed skipped, inner rate 1e30."""
  workdir = tmp_path / 'nan'
  line = _one_error_line(['train_rater', *as_flags(small_config(tfds_dir, steps=2)),
                          f'--workdir={workdir}', '--config.inner.learning_rate=1e30'])
  assert 'the meta-gradient was not finite at 2 outer steps in a row (by step 2)' in line
  assert not (workdir / 'report.json').exists()


def test_a_rater_whose_scores_overflow_is_no_success_and_trains_nothing(tfds_dir, tmp_path):
  """Outer steps of 1e30 leave finite parameters (~1e28) whose scores overflow: the run ends in
  one line with no report, and training with that rater stops at its first step."""
  def invoke(launcher, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      code = cli.invoke(launcher, argv)
    return code, err.getvalue().strip().splitlines()

  workdir = tmp_path / 'hot'
  code, lines = invoke(train_rater, ['train_rater', *as_flags(small_config(tfds_dir, steps=2)),
                                     f'--workdir={workdir}', '--config.outer.learning_rate=1e30'])
  assert code == 2 and len(lines) == 1, lines
  assert "the rater's scores are not finite on 1197 of 1197 training examples" in lines[0]
  assert not (workdir / 'report.json').exists()
  state, _ = checkpointing.restore_latest_on_host(str(workdir / 'checkpoints'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['rater_params']))
  code, lines = invoke(train, ['train', f'--config.data.data_dir={tfds_dir}',
                               '--config.train.epochs=1', '--policy=datarater',
                               f'--rater={workdir}', f'--workdir={tmp_path / "trained"}'])
  assert code == 2 and len(lines) == 1, lines
  assert 'policy datarater gave loss weights that are not finite at step 1' in lines[0]


def _call_steps_by(monkeypatch, call):
  """meta_train's compiled outer step, as it lowers, compiles and calls it, called as
  `call(compiled_step, state, inner_batches, outer_batches)`."""
  class Calling:
    def __init__(self, fn):
      self.fn = fn

    def lower(self, *args):
      return Calling(self.fn.lower(*args))

    def compile(self):
      return Calling(self.fn.compile())

    def __call__(self, *args):
      return call(self.fn, *args)

    def __getattr__(self, name):  # the compiled step's own (out_info)
      return getattr(self.fn, name)
  real_jit = sharding.jit_outer_step

  def calling_jit(*args):
    step_fn, *shardings = real_jit(*args)
    return (Calling(step_fn), *shardings)
  monkeypatch.setattr(sharding, 'jit_outer_step', calling_jit)


@pytest.mark.parametrize('log_every,checkpoint_every,by', [
    # slow: a variant where a record and a checkpoint coincide (in CI: a run of skipped steps
    # that spans a checkpoint, the check at the next one)
    pytest.param(5, 5, 5, marks=pytest.mark.slow), (10, 2, 4)])
def test_skipped_steps_in_a_row_that_end_between_checks_still_stop_the_run(
    tfds_dir, tmp_path, monkeypatch, log_every, checkpoint_every, by):
  """Steps 1-3 scripted as skipped in a row, then finite again: the run stops at its first record
  or checkpoint after them (records and checkpoints every 5 steps: step 5; records every 10,
  checkpoints every 2: step 4). And with each step's metrics made 30 ms later on the device (a
  host callback): as each step is dispatched, at most STEPS_IN_FLIGHT - 1 earlier steps are
  unfinished (XLA's CPU client queues at most 32 programs per device; a multi-device step queued
  past that can deadlock in its collective)."""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  real = sharding.outer_step

  def scripted(problem, estimator, state, inner, outer):
    new_state, metrics = real(problem, estimator, state, inner, outer)
    return new_state, {**metrics, 'skipped_in_a_row': jnp.where(state.step < 3, state.step + 1, 0)}
  monkeypatch.setattr(sharding, 'outer_step', scripted)

  def sleep_then(x):
    time.sleep(0.03)
    return x
  slow = jax.jit(lambda m: jax.pure_callback(
      sleep_then, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), m), m))
  dispatched, unfinished = [], []

  def slowed(step_fn, *args):
    unfinished.append(sum(not m['outer_loss'].is_ready() for m in dispatched))
    state, metrics = step_fn(*args)
    dispatched.append(slow(metrics))
    return state, dispatched[-1]
  _call_steps_by(monkeypatch, slowed)
  config = small_config(tfds_dir, steps=10)
  config.log_every, config.checkpoint_every = log_every, checkpoint_every
  config.outer.max_skipped_steps = 3
  with pytest.raises(UserError, match=rf'not finite at 3 outer steps in a row \(by step {by}\)'):
    meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert len(unfinished) == by
  assert max(unfinished) <= meta_train_lib.STEPS_IN_FLIGHT - 1, unfinished


def test_metrics_records_are_means_over_the_steps_not_skipped(tfds_dir, tmp_path, monkeypatch):
  """Each metrics.jsonl record holds, per metric, the float64 mean over the steps since the last
  record whose meta-gradient was finite, and counts the skipped steps and diverged members: a
  5-step run logging every 2 steps, step 3 skipped (a NaN pixel in member 0's first inner batch),
  each step's metrics recorded on the host as the compiled step returns them; its records are at
  steps 2 (2 steps), 4 (1 step taken, 1 skipped) and 5 (the partial last window: 1 step)."""
  per_step = []

  def recording(step_fn, *args):
    state, metrics = step_fn(*args)
    per_step.append(jax.device_get(metrics))
    return state, metrics
  _call_steps_by(monkeypatch, recording)
  real_batches = MetaBatches.device_batches_at

  def poisoned(self, step, *shardings):
    inner, outer = real_batches(self, step, *shardings)
    if step == 2 and len(per_step) == 2:  # outer step 3 (not the batches the step is lowered on)
      image = np.array(inner['image'])
      image[0, 0, 0] = np.nan
      inner = dict(inner, image=jax.device_put(image, inner['image'].sharding))
    return inner, outer
  monkeypatch.setattr(MetaBatches, 'device_batches_at', poisoned)
  from datarater import plots  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(plots, 'save_rater_report', lambda *a, **k: None)  # not read here
  config = small_config(tfds_dir, steps=5)
  config.log_every, config.checkpoint_every = 2, 5
  meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])

  assert len(per_step) == 5
  assert [int(m['skipped_steps']) for m in per_step] == [0, 0, 1, 0, 0]
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [2, 4, 5]
  for record, window in zip(records, ([0, 1], [2, 3], [4])):
    taken = [s for s in window if not per_step[s]['skipped_steps']]
    assert record['skipped_steps'] == len(window) - len(taken)
    assert record['diverged_members'] == sum(int(per_step[s]['diverged_members']) for s in window)
    for name in ('outer_loss', 'inner_loss', 'meta_grad_norm', 'weight_ess'):
      want = np.mean([np.float64(per_step[s][name]) for s in taken])
      np.testing.assert_allclose(record[name], want, rtol=1e-6, err_msg=(record['step'], name))
  assert records[1]['skipped_steps'] == 1 and records[1]['diverged_members'] >= 1
  assert not any('auroc_by_kind' in r for r in records)  # one kind: its AUROC is the overall one


@pytest.fixture(scope='module')
def stopped_runs(tfds_dir, tmp_path_factory):
  """small_config(steps=4) on 1 device, stopped after outer step 2 ('at2': checkpoint 2, record 2),
  and a copy of it resumed to its end ('at4': checkpoints 2 and 4, records 2 and 4, its report),
  both under umask 022. Read only: a test that changes one works on its own copy (`_copy_of`)."""
  base = tmp_path_factory.mktemp('stopped_runs')
  config = small_config(tfds_dir, steps=4)
  old = os.umask(0o022)  # test_written_files_are_readable_by_everyone reads the modes
  try:
    meta_train(config, str(base / 'at2'), stop_after=2, devices=jax.devices()[:1])
    shutil.copytree(base / 'at2', base / 'at4')
    meta_train(config, str(base / 'at4'), devices=jax.devices()[:1])
  finally:
    os.umask(old)
  assert sorted(os.listdir(base / 'at2' / 'checkpoints')) == ['2']
  assert sorted(os.listdir(base / 'at4' / 'checkpoints')) == ['2', '4']
  return base


# The tests that read `stopped_runs` stay on one pytest-xdist worker, which runs it once.
STOPPED_RUNS = pytest.mark.xdist_group('robustness_stopped_runs')


def _copy_of(stopped_runs, name: str, workdir):
  shutil.copytree(stopped_runs / name, workdir)
  return workdir


@STOPPED_RUNS
def test_a_checkpoint_of_the_stream_before_its_tag_is_not_resumed(tfds_dir, tmp_path,
                                                                   stopped_runs):
  """A checkpoint with no data_stream in its config fingerprint was shuffled otherwise (by code
  before the stream's generator tag): it is refused (the run's resume decision, `check_compatible`
  on its checkpointer), not resumed mixed."""
  config = small_config(tfds_dir, steps=4)
  workdir = _copy_of(stopped_runs, 'at2', tmp_path / 'old')
  (meta_file,) = glob.glob(str(workdir / 'checkpoints' / '2' / 'meta' / 'metadata'))
  meta = json.load(open(meta_file))
  del meta['config']['data_stream']
  json.dump(meta, open(meta_file, 'w'))
  with pytest.raises(UserError,
                     match=r'different config .data_stream=\(not recorded\) there, 2 here'):
    run_checkpointer(config, str(workdir)).check_compatible()


def _corrupt(step_dir, how: str):
  if how == 'truncated':
    for path in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  elif how == 'flipped':
    for path in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True):
      data = bytearray(open(path, 'rb').read())
      for i in range(0, len(data), 7):
        data[i] ^= 0xFF
      open(path, 'wb').write(bytes(data))
  elif how == 'renamed':  # valid JSON that lacks a field (one letter flipped in a key)
    path = os.path.join(step_dir, 'meta', 'metadata')
    meta = json.load(open(path))
    meta['stap'] = meta.pop('step')
    json.dump(meta, open(path, 'w'))
  else:
    with open(os.path.join(step_dir, 'meta', 'metadata'), 'w') as f:
      f.write('{"config": ')


@STOPPED_RUNS
@pytest.mark.parametrize('how', ['truncated', pytest.param('flipped', marks=pytest.mark.slow),
                                 pytest.param('garbled', marks=pytest.mark.slow),
                                 pytest.param('renamed', marks=pytest.mark.slow)])
def test_a_corrupted_latest_checkpoint_gives_way_to_the_newest_intact_one(tfds_dir, tmp_path,
                                                                           capsys, stopped_runs,
                                                                           how):
  config = small_config(tfds_dir, steps=4)
  config.final_eval.num_models = 0
  workdir = _copy_of(stopped_runs, 'at4', tmp_path / 'run')  # run to step 4
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  _corrupt(str(workdir / 'checkpoints' / '4'), how)
  config.outer.steps = 6
  capsys.readouterr()
  report = meta_train(config, str(workdir), devices=jax.devices()[:1])
  out = capsys.readouterr().out
  warned = [l for l in out.splitlines() if 'unreadable' in l]
  assert len(warned) == 1 and 'checkpoints/4 is unreadable' in warned[0], warned
  assert 'rest on a few examples' not in out  # a healthy run raises no collapse warning
  assert report['outer_steps'] == 6
  steps = [json.loads(l)['step'] for l in open(workdir / 'metrics.jsonl')]
  assert steps == [2, 4, 6]  # resumed from step 2: the records after it were written again
  export.export_rater(str(workdir), str(tmp_path / 'rater'))  # the run's newest, step 6


def test_a_checkpoint_record_without_what_a_resume_reads_is_unreadable():
  """Valid JSON that lacks a field (a flipped letter in a key) is passed over as unreadable, as
  a record that does not parse is (a KeyError traceback, exit 1)."""
  good = {'config': {}, 'step': 2, 'data_position': {}, 'extra': {'history': [], 'wall_s': 1.0,
                                                                  'steps': 4}}
  assert checkpointing.checked_meta(good, ('history', 'wall_s', 'steps')) is good
  for bad, fields in (([], ()), ({**good, 'config': None}, ()), ({**good, 'step': True}, ()),
                      ({**good, 'step': '2'}, ()), ({'config': {}, 'stap': 2}, ()),
                      ({**good, 'extra': {'history': []}}, ('history', 'steps'))):
    with pytest.raises(ValueError):
      checkpointing.checked_meta(bad, fields)


class _State(NamedTuple):
  w: jax.Array
  n: jax.Array
  empty: jax.Array


def test_a_checkpoint_whose_arrays_still_decode_to_other_values_is_passed_over(tmp_path, caplog,
                                                                                capsys):
  """A flipped bit in a checkpoint's array data (random bits: zstd stores them verbatim, so the
  file still decodes, to another value) makes it unreadable: a resume, and a read on one device
  (export, load_rater), take the one before; before, both read the damaged value as saved. The
  checksums recorded do not depend on the sharding (1 device = 4)."""
  config = get_config()
  values = [np.random.default_rng(s).integers(-2**31, 2**31, (64, 4), np.int32) for s in (1, 2)]
  ckpt = checkpointing.RunCheckpointer(str(tmp_path), config)
  # (read back on one device as dicts, the order of their leaves sorted; an empty one not saved)
  states = [_State(jnp.asarray(v), jnp.int32(i + 1), jnp.zeros((0, 3)))
            for i, v in enumerate(values)]
  for step, state in enumerate(states, 1):
    ckpt.save(step, state, {'position': step})
  ckpt.close()
  raw = values[1].tobytes()[:64]
  (data,) = [p for p in glob.glob(str(tmp_path / 'checkpoints' / '2' / 'state' / '**' / 'd' / '*'),
                                  recursive=True) if raw in open(p, 'rb').read()]
  blob = bytearray(open(data, 'rb').read())
  blob[blob.index(raw) + 9] ^= 0x01  # a bit of w[0, 2]
  open(data, 'wb').write(bytes(blob))
  with caplog.at_level(logging.WARNING, logger='datarater'):
    on_host, meta = checkpointing.restore_latest_on_host(str(tmp_path / 'checkpoints'))
    assert meta['step'] == 1
    np.testing.assert_array_equal(on_host['w'], values[0])
    state, meta = checkpointing.RunCheckpointer(str(tmp_path), config).restore_latest(
        checkpointing.abstract_of(states[0]))
    assert meta['step'] == 1 and int(state.n) == 1
    np.testing.assert_array_equal(state.w, values[0])
  assert os.listdir(tmp_path / 'checkpoints' / f'unreadable-2-{os.getpid()}')  # set aside
  # (the warnings go to the log, or to stdout once a run has set up the log's handler)
  out = caplog.text + capsys.readouterr().out
  warned = [line for line in out.splitlines() if 'unreadable' in line]
  assert len(warned) == 2 and all(checkpointing.DAMAGED in w for w in warned), warned
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('d',))
  tree = [values[1], values[1].view(np.float32)]
  four = jax.device_put(tree, jax.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
  assert checkpointing.checksums(four) == checkpointing.checksums(tree)


def _checksum_by_definition(x) -> int:
  """sum_i w_i * (2i + 1) mod 2**32 over the array's row-major 32-bit words w_i (an 8-byte value
  is two words, low then high; a narrower one is one word, zero-extended), in Python's ints."""
  x = np.ascontiguousarray(x)
  if x.dtype.itemsize == 8:
    words = x.view(np.uint32).reshape(-1, 2)
    if sys.byteorder == 'big':
      words = words[:, ::-1]
    words = words.reshape(-1).astype(np.uint64)
  else:
    words = x.reshape(-1).view(f'u{x.dtype.itemsize}').astype(np.uint64)
  odd = 2 * np.arange(len(words), dtype=np.uint64) + 1
  return int(np.sum((words * odd) % 2**32, dtype=np.uint64)) % 2**32


def test_checkpoint_checksums_are_their_definition_and_see_every_flipped_bit():
  """Against the definition computed word by word: arrays of 1-, 2-, 4- and 8-byte values, one
  large enough to be summed in parts (> 2**22 values), and that one sharded over 4 devices; and
  every single flipped bit of a small float32 and float64 array changes the checksum (the first
  element's and the high words of 8-byte values too)."""
  rng = np.random.default_rng(0)
  arrays = {'i8': rng.integers(-128, 128, (7, 3), np.int8),
            'f16': rng.normal(size=(5, 4)).astype(np.float16),
            'f32': rng.normal(size=(3, 5)).astype(np.float32),
            'f64': rng.normal(size=(4, 3)), 'i64': rng.integers(-2**62, 2**62, (6,)),
            'scalar': np.float32(2.5), 'big': rng.normal(size=(1280, 4096)).astype(np.float32)}
  sums = checkpointing.checksums(arrays)
  assert sums == {k: _checksum_by_definition(v) for k, v in arrays.items()}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('d',))
  big = jax.device_put(arrays['big'], jax.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
  assert checkpointing.checksums({'big': big}) == {'big': sums['big']}
  for name in ('f32', 'f64'):
    x = arrays[name][:2, :2].copy()
    words = x.view(np.uint32).reshape(-1)
    before = checkpointing.checksums({'x': x})
    for i in range(len(words)):
      for bit in range(32):
        words[i] ^= np.uint32(1 << bit)
        assert checkpointing.checksums({'x': x}) != before, (name, i, bit)
        words[i] ^= np.uint32(1 << bit)


def test_a_run_log_resumes_past_a_half_written_last_line(tmp_path):
  """A kill mid-append leaves a partial last line; a resumed log drops it (and any other line
  that is not a record with the key, or not UTF-8 text: a damaged line once stopped the run with
  a traceback) and keeps the records up to the restored point."""
  path = tmp_path / 'history.jsonl'
  path.write_bytes(b'{"epoch": 1.0, "step": 10}\n[2]\n{"step": 15}\n{"epoch": 1.5, "s\xff"}\n'
                   b'{"epoch": 2.0, "step": 20}\n{"epoch": 2.0, "step')
  log = files.JsonlLog(str(path), 'epoch', resume_at=2)
  assert log.history == [{'epoch': 1.0, 'step': 10}, {'epoch': 2.0, 'step': 20}]
  log.write({'epoch': 3.0, 'step': 30})
  assert [json.loads(l)['epoch'] for l in open(path)] == [1, 2, 3]


def _strict_json(text: str):
  """`text` parsed as standard JSON: NaN and Infinity, which Python alone writes, are refused."""
  def refuse(name):
    raise ValueError(f'{name} is not standard JSON')
  return json.loads(text, parse_constant=refuse)


def test_an_output_is_refused_where_overwriting_it_would_replace_an_input(tmp_path):
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  run, inside = str(tmp_path / 'run'), str(tmp_path / 'run' / 'checkpoints')
  for out in (run, str(tmp_path)):  # the input itself, a folder holding it
    with pytest.raises(UserError, match='would replace --workdir'):
      files.check_apart(out, '--out', workdir=run)
  for out in (inside, str(tmp_path / 'run' / 'new')):  # a part of it, or a new folder in it
    with pytest.raises(UserError, match='is inside --workdir'):
      files.check_apart(out, '--out', workdir=run)
  files.check_apart(str(tmp_path / 'other'), '--out', workdir=run, rater='')


def test_leftovers_of_killed_writers_are_matched_by_name_literally(tmp_path):
  """`recover_dir` finds a dead writer's `.NAME.tmp-PID` / `.NAME.old-PID` folders with NAME and
  its folder taken literally: glob characters in them neither hide a leftover nor match another
  output's."""
  dead = 2 ** 22 + 1  # above Linux's default pid_max: no such process
  (tmp_path / f'.r1.old-{dead}').mkdir()
  (tmp_path / f'.r1.old-{dead}' / 'rater.json').write_text('r1')
  odd = tmp_path / 'd[1]'
  (odd / f'.r.tmp-{dead}').mkdir(parents=True)
  (odd / f'.r.old-{dead}').mkdir()
  files.recover_dir(str(tmp_path / 'r[1]'))  # '[1]' would match '1'
  files.recover_dir(str(odd / 'r'))
  assert sorted(os.listdir(tmp_path)) == [f'.r1.old-{dead}', 'd[1]']
  assert sorted(os.listdir(odd)) == ['r']  # the temp folder removed, the moved-aside one back


def test_an_overwrite_interrupted_between_its_renames_keeps_the_old_output(tmp_path,
                                                                             monkeypatch):
  """Ctrl-C after the old output was moved aside, before the new one took its place, left no
  output (the temporary folder removed, the old one hidden); an overwritten plain file was left
  beside the new output for good."""
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'a').write_text('old')
  rename, calls = os.rename, []
  def interrupted(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the second rename: the new output into place
      raise KeyboardInterrupt
    rename(src, dst)
  monkeypatch.setattr(os, 'rename', interrupted)
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_dir(str(out), overwrite=True) as tmp:
      open(os.path.join(tmp, 'a'), 'w').write('new')
  monkeypatch.setattr(os, 'rename', rename)
  assert sorted(os.listdir(tmp_path)) == ['out'] and (out / 'a').read_text() == 'old'
  plain = tmp_path / 'plain'
  plain.write_text('a file')
  with files.atomic_dir(str(plain), overwrite=True) as tmp:
    open(os.path.join(tmp, 'a'), 'w').write('new')
  assert sorted(os.listdir(tmp_path)) == ['out', 'plain'] and (plain / 'a').read_text() == 'new'


@pytest.mark.parametrize('theirs', ['folder', 'file'])
def test_an_output_another_run_wrote_meanwhile_is_kept_without_overwrite(tmp_path, theirs):
  """Two runs writing the same new output at once (two launch.filter commands, say): the one
  that finished second moved the first's output aside and deleted it, though neither was given
  --overwrite. Now the first's stays and the second stops in one line."""
  out = tmp_path / 'out'
  with pytest.raises(UserError, match='written by another run while this one ran.*--overwrite'):
    with files.atomic_dir(str(out), marker='rater.json') as tmp:
      open(os.path.join(tmp, 'rater.json'), 'w').write('second')
      if theirs == 'folder':  # the first run's output, renamed into place meanwhile
        out.mkdir()
        (out / 'rater.json').write_text('first')
      else:
        out.write_text('first')
  assert os.listdir(tmp_path) == ['out']  # its temporary folder gone, nothing moved aside
  assert (out / 'rater.json' if theirs == 'folder' else out).read_text() == 'first'


def test_a_leftover_under_this_processs_own_pid_is_a_dead_writers(tmp_path):
  """A pid reused (the same in every fresh container) made a dead writer's moved-aside output
  look alive: it was not put back, and the next --overwrite failed with a traceback."""
  aside = tmp_path / f'.out.old-{os.getpid()}'
  aside.mkdir()
  (aside / 'a').write_text('old')
  with pytest.raises(UserError, match='already exists'):
    with files.atomic_dir(str(tmp_path / 'out')):
      pass
  assert (tmp_path / 'out' / 'a').read_text() == 'old' and not aside.exists()


def test_written_json_is_standard_with_non_finite_floats_as_null(tmp_path):
  record = {'step': 2, 'auroc': float('nan'), 'hi': np.float32(np.inf), 'ok': np.float64(0.5),
            'rows': np.array([1.0, -np.inf]), 'pair': (np.nan, 3)}
  want = {'step': 2, 'auroc': None, 'hi': None, 'ok': 0.5, 'rows': [1.0, None], 'pair': [None, 3]}
  files.write_json(str(tmp_path / 'a.json'), record)
  assert _strict_json((tmp_path / 'a.json').read_text()) == want
  log = files.JsonlLog(str(tmp_path / 'a.jsonl'), 'step')
  log.write(record)
  (tmp_path / 'b.jsonl').write_text('{"step": 1, "x": NaN}\n')  # as older versions wrote
  files.JsonlLog(str(tmp_path / 'b.jsonl'), 'step', resume_at=1).write(record)
  for name in ('a.jsonl', 'b.jsonl'):
    lines = [_strict_json(l) for l in open(tmp_path / name)]
    assert lines[-1] == want and (name == 'a.jsonl' or lines[0] == {'step': 1, 'x': None})


def test_a_rater_run_without_corruption_records_no_auroc_and_scores_no_extra_pass(
    tfds_dir, tmp_path, monkeypatch, capsys):
  """No example recorded corrupted: no noise AUROC per logged step (and no pass over the
  training split for one), report.json's is null; the files are standard JSON. 3 steps, logged
  and checkpointed every 2: the last step is logged and checkpointed too, so run again, the
  finished run prints its report instead of running step 3 again."""
  from datarater import evaluation  # pylint: disable=g-import-not-at-top
  passes = []
  score_split = evaluation.score_split
  monkeypatch.setattr(evaluation, 'score_split', lambda *a, **k: passes.append(1) or
                      score_split(*a, **k))
  config = small_config(tfds_dir, steps=3)
  config.data.label_noise = 0.0
  workdir = tmp_path / 'run'
  report = meta_train(config, str(workdir), devices=jax.devices()[:1])
  assert len(passes) == 1  # the report's scores only (with label noise, one more per logged step)
  records = [_strict_json(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 3] and not any('noise_auroc' in r for r in records)
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())[-1] == 3
  written = _strict_json((workdir / 'report.json').read_text())
  assert written['noise_auroc'] is None and written == report
  assert 'noise AUROC' not in capsys.readouterr().out
  assert meta_train(config, str(workdir), devices=jax.devices()[:1]) == report
  assert 'this run finished at outer step 3' in capsys.readouterr().out


@STOPPED_RUNS
def test_a_rater_run_killed_mid_append_resumes(tfds_dir, tmp_path, stopped_runs):
  config = small_config(tfds_dir, steps=4)
  workdir = _copy_of(stopped_runs, 'at2', tmp_path / 'run')  # stopped after step 2
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "outer_lo')
  meta_train(config, str(workdir), devices=jax.devices()[:1])
  assert [json.loads(l)['step'] for l in open(workdir / 'metrics.jsonl')] == [2, 4]


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_a_run_may_be_extended_exactly_when_its_updates_so_far_stay(schedule):
  """Oracle: the outer optimizer's first 600 updates (a constant gradient) under a run length of
  600 and of 1,200 steps; the checkpoint's config fingerprint must match exactly when they do."""
  def updates(steps):
    config = get_config()
    config.outer.schedule, config.outer.steps = schedule, steps
    optimizer = setup.make_outer_optimizer(config.outer)
    grad = jnp.full((), 1e-3)
    step = lambda state, _: optimizer.update(grad, state)[::-1]
    return jax.lax.scan(step, optimizer.init(grad), length=600)[1], config
  (short, config_short), (long, config_long) = updates(600), updates(1200)
  same_updates = bool(np.allclose(short, long, rtol=1e-6, atol=0))
  assert same_updates == (schedule == 'constant')
  def fingerprint(config):  # what a meta-training checkpoint records of its config
    ckpt = run_checkpointer(config, 'not_written')
    return checkpointing.trajectory_fields(ckpt.config, ckpt.free_fields)
  assert same_updates == (fingerprint(config_short) == fingerprint(config_long))


def test_help_lists_the_flags_and_config_fields_and_exits_0():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.invoke(train_rater, ['train_rater', '--help'])
  assert code == 0
  text = out.getvalue()
  assert '--workdir' in text and '--config.inner.steps=2' in text
  assert '--config.outer.meta_gradient=' in text
  assert "--config: " in text and "(default 'configs/digits.py')" in text  # the file, not a dump
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.invoke(train_rater, ['train_rater', '--config=configs/nope.py', '--help'])
  assert code == 0 and "config fields: none listed (cannot load --config 'configs/nope.py'" in (
      out.getvalue())


def test_help_lists_the_fields_of_every_config_file_flag():
  """A second config file flag (bench.lm_curation's --bench: seeds, keeps, the fresh models) has
  its fields listed too, with their values after the overrides given (it was left out); the
  oracle is the file's own get_config('bench'), walked here."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from configs import text_bench  # pylint: disable=g-import-not-at-top
  argv = ['lm_curation', '--bench.transfer.steps=64', '--help']
  fv = flags.FlagValues()
  cli.define_config_file('config', 'configs/text_bench.py', 'Experiment config.', fv, argv)
  cli.define_config_file('bench', 'configs/text_bench.py:bench', 'Bench part.', fv, argv)
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stopped:
    cli.parse_flags(argv, 'doc', fv)
  assert stopped.value.code == 0
  bench = text_bench.get_config('bench')
  bench.transfer.steps = 64
  want, todo = set(), [('', bench)]
  while todo:
    prefix, section = todo.pop()
    for key, value in section.items():
      if hasattr(value, 'items'):
        todo.append((f'{prefix}{key}.', value))
      else:
        want.add(f'  --bench.{prefix}{key}={value!r}')
  listed = set(out.getvalue().splitlines())
  assert want <= listed, sorted(want - listed)
  assert '  --config.inner.population=2' in listed  # the experiment config's fields stay


@STOPPED_RUNS
def test_written_files_are_readable_by_everyone(stopped_runs):
  """The rater run's files, written under umask 022 (`stopped_runs`: a run stopped, then resumed
  to its report), are 0644: not the 0600 of the temporary files they are written as."""
  for name in ('config.json', 'report.json', 'metrics.jsonl', 'rater_report.png'):
    mode = stat.S_IMODE(os.stat(stopped_runs / 'at4' / name).st_mode)
    assert mode == 0o644, (name, oct(mode))


def test_weights_collapsed_onto_a_few_examples_are_reported(tfds_dir, tmp_path, capsys):
  """A temperature so low that each batch's weight sits on its top-scored example: the logged
  weight ESS is near 1/B and a warning line names the settings to change."""
  config = small_config(tfds_dir, steps=2)
  config.final_eval.num_models = 0
  config.rater.temperature = 1e-4
  meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  warned = [l for l in capsys.readouterr().out.splitlines() if 'rest on a few examples' in l]
  assert warned and 'rater.temperature=0.0001 too low' in warned[0], warned
  records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert records and all(r['weight_ess'] < 0.1 for r in records), records


@pytest.mark.slow  # in CI: test_progress_lines_and_steps_per_sec_follow_the_clock_of_the_steps
def test_between_logged_steps_a_progress_line_comes_at_least_every_heartbeat(
    tfds_dir, tmp_path, capsys, monkeypatch):
  """A run whose log_every is far apart (text: about 200 s) still says where it is: a short
  line with the step, rate and ETA; the metrics records stay at log_every."""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(meta_train_lib, 'HEARTBEAT_S', 0.0)
  config = small_config(tfds_dir, steps=4)
  config.log_every = config.checkpoint_every = 4
  meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  out = capsys.readouterr().out
  beats = [l for l in out.splitlines() if '(metrics every 4 steps)' in l]
  assert [l.split('step')[1].split('/')[0].strip() for l in beats] == ['1', '2', '3'], out
  assert all('steps/s | ETA' in l for l in beats)
  assert [json.loads(l)['step'] for l in open(tmp_path / 'run' / 'metrics.jsonl')] == [4]


def test_polyak_average_is_the_weighted_mean_of_the_finite_iterates():
  """outer.ema = d: after t finite steps the reported rater is sum_s (1-d) d^(t-s) phi_s / (1-d^t),
  computed here in float64 from the recorded iterates; a skipped step adds no iterate."""
  decay = 0.8
  problem, est = dataclasses.replace(tiny_problem(), ema=decay), estimator()
  step = jax.jit(lambda s, i, o: meta_step.outer_step(problem, est, s, i, o))
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2)
  iterates = []
  for t in range(6):
    inner, outer = tiny_batches(t, population=2, steps=2, batch=8)
    if t == 3:  # a non-finite meta-gradient: skipped
      inner = dict(inner, image=inner['image'].copy())
      inner['image'][1, 0, 0, 0] = np.nan
    state, _ = step(state, inner, outer)
    if t != 3:
      iterates.append(np.asarray(ravel_pytree(state.rater_params)[0], np.float64))
    got = np.asarray(ravel_pytree(problem.rater_params_of(state))[0], np.float64)
    n = len(iterates)
    w = (1 - decay) * decay ** np.arange(n - 1, -1, -1, dtype=np.float64) / (1 - decay ** n)
    np.testing.assert_allclose(got, w @ np.array(iterates), rtol=1e-5, atol=1e-7)
  assert int(state.skipped) == 1


@pytest.mark.parametrize('decay', [0.8, 0.9999, 0.9999999, 1 - 2 ** -24])  # the largest allowed
def test_polyak_average_has_no_scale_bias_at_any_decay(decay):
  """600 float32 iterates averaged with decay d: the debiased average equals the float64 weighted
  mean (1-d) sum_s d^(t-s) phi_s / (1-d^t) to float32 round-off, d near 1 included (rounding d
  and 1 - d apart once scaled every parameter by 0.84 at d = 0.9999999)."""
  from outer_loop import averaging  # pylint: disable=g-import-not-at-top
  phis = np.random.default_rng(0).normal(size=(600, 4)).astype(np.float32)
  average = averaging.init({'w': jnp.zeros(4)}, decay)
  update = jax.jit(lambda a, p: averaging.update(a, p, decay))
  for t, phi in enumerate(phis, 1):
    average = update(average, {'w': jnp.asarray(phi)})
    if t in (1, 2, 600):
      got = averaging.debiased(average, {'w': jnp.asarray(phi)}, decay, t)['w']
      w = (1 - decay) * decay ** np.arange(t - 1, -1, -1, dtype=np.float64)
      np.testing.assert_allclose(got, w @ phis[:t].astype(np.float64) / w.sum(), rtol=2e-5,
                                 atol=1e-6)



def test_polyak_average_of_no_iterates_is_the_last_iterate():
  """Before any update (or when every step so far was skipped) the average holds no iterate:
  the rater scored and exported is the last iterate itself, not the empty average's zeros."""
  from outer_loop import averaging  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.asarray([1.5, -2.0, 0.25], jnp.float32)}
  got = averaging.debiased(averaging.init(params, 0.9), params, 0.9, 0)
  np.testing.assert_array_equal(got['w'], params['w'])

def test_a_run_with_skipped_steps_loads_its_average_debiased_by_the_iterates_it_holds(
    tfds_dir, tmp_path):
  """A run's checkpoint at outer step 5 with 2 steps skipped and outer.ema = d holds an average of
  3 iterates, so the loaded (and exported) rater is sum_s (1-d) d^(3-s) phi_s / (1-d^3) (float64
  here from the iterates); its compute counts all 5 steps, K * ((A + T) * B + B_outer) each, with
  A = 3 advanced steps and B = 16 != B_outer = 24 (the docstring's formula, by hand)."""
  from jax.flatten_util import ravel_pytree as ravel  # pylint: disable=g-import-not-at-top
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  decay = 0.6
  config = small_config(tfds_dir)
  config.outer.ema, config.inner.advance_steps, config.inner.steps = decay, 3, 2
  config.inner.population, config.inner.batch_size, config.outer.batch_size = 2, 16, 24
  info = pipeline.load_split(digits_data(tfds_dir), 'test').info
  rater = tasks.make_rater(config.rater, info)
  phis = [rater.init(jax.random.PRNGKey(s)) for s in range(3)]
  average = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), phis[0])
  for phi in phis:  # the undebiased average: d * average + (1 - d) * phi, one update per iterate
    average = jax.tree.map(lambda a, p: np.float32(decay) * a + np.float32(1 - decay) * p,
                           average, phi)
  state = {'step': jnp.int32(5), 'skipped': jnp.int32(2), 'rater_params': phis[-1],
           'rater_average': average}
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(json.dumps({'config': json.loads(config.to_json()),
                                               'data_info': info.to_json()}))
  ckpt = checkpointing.RunCheckpointer(str(run), config)
  ckpt.save(5, state, {})
  ckpt.close()
  flat = np.array([np.asarray(ravel(phi)[0], np.float64) for phi in phis])
  w = (1 - decay) * decay ** np.arange(2, -1, -1, dtype=np.float64)
  want = w @ flat / w.sum()
  assert w.sum() == pytest.approx(1 - decay ** 3)
  loaded = export.load_rater(str(run))
  np.testing.assert_allclose(np.asarray(ravel(loaded.params)[0], np.float64), want,
                             rtol=1e-5, atol=1e-7)
  assert not np.allclose(want, flat[-1], rtol=1e-2)
  assert loaded.training_example_gradients == 5 * 2 * ((3 + 2) * 16 + 24)
  meta = export.export_rater(str(run), str(tmp_path / 'exported'))
  assert meta['training_example_gradients'] == 5 * 2 * ((3 + 2) * 16 + 24)
  np.testing.assert_allclose(
      np.asarray(ravel(export.load_rater(str(tmp_path / 'exported')).params)[0], np.float64),
      want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_checkpoint_from_before_fields_were_added_resumes(tfds_dir, tmp_path, monkeypatch):
  """A checkpoint that does not record a field added since (task.input, ...) matches a config
  holding it at the value that behaves as its absence did, and no other value."""
  config, workdir = small_config(tfds_dir, steps=4), str(tmp_path / 'run')
  recorded = checkpointing.trajectory_fields
  monkeypatch.setattr(checkpointing, 'trajectory_fields', lambda *a, **k: {
      f: v for f, v in recorded(*a, **k).items() if f not in checkpointing.ADDED_FIELDS})
  meta_train(config, workdir, stop_after=2)
  monkeypatch.undo()
  assert 'task.input' in checkpointing.trajectory_fields(config)
  changed = config.copy_and_resolve_references()
  changed.task.label = 'label'
  with pytest.raises(UserError, match="task.label=\\(not recorded\\) there, 'label' here"):
    meta_train(changed, workdir)
  assert meta_train(config, workdir)['outer_steps'] == 4


@pytest.mark.parametrize('ema', [pytest.param(0.0, marks=pytest.mark.slow), 0.5])
def test_the_report_reuses_the_last_logged_steps_scores(tfds_dir, tmp_path, monkeypatch, ema):
  """With label noise and occlusions each logged step scores the training split (twice with
  outer.ema: the average and the last iterate) and records its noise AUROC overall and per kind
  from those scores (brute force over pairs here); the report reads the final step's scores, no
  pass of its own."""
  from datarater import evaluation  # pylint: disable=g-import-not-at-top
  passes = []  # (split, scores) of each scoring pass
  score_split = evaluation.score_split
  monkeypatch.setattr(evaluation, 'score_split', lambda *a, **k: passes.append(
      (a[1], score_split(*a, **k))) or passes[-1][1])
  config = small_config(tfds_dir, steps=4)
  config.outer.ema = ema
  config.data.input_corruption.occlusion = 0.1
  report = meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert len(passes) == len(records) * (2 if ema else 1) == (4 if ema else 2)
  for record, (split, scores) in zip(records, passes[::2 if ema else 1]):  # the reported rater's
    clean = scores[split.corruption == 0]
    pairs = lambda bad: np.mean((clean[:, None] > bad) + 0.5 * (clean[:, None] == bad))
    assert record['noise_auroc'] == pytest.approx(pairs(scores[split.is_corrupted]), abs=1e-9)
    assert sorted(record['auroc_by_kind']) == ['label_symmetric', 'occlusion']
    for kind, auroc in record['auroc_by_kind'].items():
      bad = scores[split.corruption == split.corruption_kinds.index(kind)]
      assert auroc == pytest.approx(pairs(bad), abs=1e-9), (record['step'], kind)
  assert report['noise_auroc'] == records[-1]['noise_auroc']
  assert report['auroc_by_kind'] == records[-1]['auroc_by_kind']
  if ema:
    assert report['last_iterate']['noise_auroc'] == records[-1]['noise_auroc_last_iterate']
  # As if killed after the last step, before its report: scored for the report alone.
  os.remove(tmp_path / 'run' / 'report.json')
  passes.clear()
  assert meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1]) == report
  assert len(passes) == (2 if ema else 1)


def test_a_run_with_polyak_averaging_reports_and_exports_the_average(tfds_dir, tmp_path,
                                                                       monkeypatch):
  """The same run with and without outer.ema: identical training (the last iterates are equal);
  the averaged run, checkpointed after every step, stopped after step 2 and resumed, reports its
  last iterate's AUROCs as the plain run's and exports the weighted mean of the iterates it
  checkpointed."""
  decay, steps = 0.5, 3
  runs = {ema: str(tmp_path / f'ema{ema}') for ema in (0.0, decay)}
  configs = {}
  for ema in runs:
    configs[ema] = small_config(tfds_dir, steps=steps)
    configs[ema].outer.ema = ema
  configs[decay].checkpoint_every = 1
  one = jax.devices()[:1]
  plain = meta_train(configs[0.0], runs[0.0], devices=one)
  iterates = {}  # step: the rater's iterate as each checkpoint of the averaged run saves it
  save = checkpointing.RunCheckpointer.save

  def saving(self, step, state, *args, **kwargs):
    iterates[step] = np.asarray(ravel_pytree(jax.device_get(state.rater_params))[0], np.float64)
    return save(self, step, state, *args, **kwargs)
  monkeypatch.setattr(checkpointing.RunCheckpointer, 'save', saving)
  assert meta_train(configs[decay], runs[decay], stop_after=2, devices=one) == {}
  state, _ = checkpointing.restore_latest_on_host(os.path.join(runs[decay], 'checkpoints'))
  np.testing.assert_array_equal(ravel_pytree(state['rater_params'])[0], iterates[2])
  averaged = meta_train(configs[decay], runs[decay], devices=one)
  assert sorted(iterates) == [1, 2, 3]
  iterates = [iterates[s] for s in range(1, steps + 1)]
  assert averaged['last_iterate']['noise_auroc'] == plain['noise_auroc']
  assert averaged['last_iterate']['auroc_by_kind'] == plain['auroc_by_kind']
  assert 'last_iterate' not in plain
  w = (1 - decay) * decay ** np.arange(steps - 1, -1, -1, dtype=np.float64) / (1 - decay ** steps)
  exported = {}
  for ema, run in runs.items():
    export.export_rater(run, str(tmp_path / f'export{ema}'))
    exported[ema] = np.asarray(
        ravel_pytree(export.load_rater(str(tmp_path / f'export{ema}')).params)[0], np.float64)
  np.testing.assert_array_equal(exported[0.0], iterates[-1])
  np.testing.assert_allclose(exported[decay], w @ np.array(iterates), rtol=1e-5, atol=1e-7)
  assert not np.allclose(exported[decay], iterates[-1])
  # The run reports (and logs) the average's AUROC, not its last iterate's: sklearn's AUROC of
  # the exported average's scores of the training split, which score the bits the run scored
  # (`evaluation.SCORE_BLOCK`); the last iterate's differs by a few of the ~230k (clean,
  # corrupted) pairs after 3 steps (one pair is 4e-6).
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  train = pipeline.load_split(configs[decay].data, 'train', corrupt=True)
  auroc = {ema: roc_auc_score(~train.is_corrupted, export.load_rater(
      str(tmp_path / f'export{ema}'))(train.features)) for ema in runs}
  assert auroc[decay] != auroc[0.0]
  assert averaged['noise_auroc'] == auroc[decay]
  records = [json.loads(l) for l in open(os.path.join(runs[decay], 'metrics.jsonl'))]
  assert records[-1]['noise_auroc'] == averaged['noise_auroc']


@pytest.mark.slow
def test_a_finished_run_prints_its_report_only_if_it_reports_these_steps_and_models(
    tfds_dir, tmp_path, capsys):
  """Run again, a finished run prints its report; one stopped past an older report (extended,
  then stopped and shortened), asked for fresh models the report lacks, or whose report lacks
  what is printed (hand-edited), reports anew."""
  config = small_config(tfds_dir, steps=2)
  workdir = str(tmp_path / 'run')
  first = meta_train(config, workdir, devices=jax.devices()[:1])
  capsys.readouterr()
  assert meta_train(config, workdir, devices=jax.devices()[:1]) == first
  assert 'this run finished at outer step 2' in capsys.readouterr().out
  report_path = os.path.join(workdir, 'report.json')
  files.write_json(report_path, {'outer_steps': 2, 'final_eval': config.final_eval.to_dict()})
  again = meta_train(config, workdir, devices=jax.devices()[:1])
  assert again['noise_auroc'] == first['noise_auroc'] and 'this run finished' not in (
      capsys.readouterr().out)
  assert json.load(open(report_path))['noise_auroc'] == first['noise_auroc']
  config.outer.steps = 4
  meta_train(config, workdir, stop_after=3, devices=jax.devices()[:1])
  config.outer.steps = 3
  third = meta_train(config, workdir, devices=jax.devices()[:1])
  assert third['outer_steps'] == 3 and 'this run finished' not in capsys.readouterr().out
  assert json.load(open(os.path.join(workdir, 'report.json')))['outer_steps'] == 3
  config.final_eval.num_models = 1
  with_models = meta_train(config, workdir, devices=jax.devices()[:1])
  assert with_models['fresh_models'] and not third['fresh_models']
  assert with_models['noise_auroc'] == third['noise_auroc']  # the same rater, reported again


@pytest.fixture(scope='module')
def killed_while_reporting(tfds_dir, tmp_path_factory):
  """small_config(steps=2) on 1 device, killed (Ctrl-C) while drawing its report's plot: its
  steps run and checkpointed, no report.json. Read only: its tests copy it."""
  from datarater import plots  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('killed_while_reporting') / 'run'
  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  with pytest.MonkeyPatch.context() as m:
    m.setattr(plots, 'save_rater_report', killed)
    with pytest.raises(KeyboardInterrupt):
      meta_train(small_config(tfds_dir, steps=2), str(workdir), devices=jax.devices()[:1])
  assert not (workdir / 'report.json').exists()
  return workdir


# The tests that read `killed_while_reporting` stay on one pytest-xdist worker, which runs it once.
KILLED_WHILE_REPORTING = pytest.mark.xdist_group('robustness_killed_while_reporting')


@KILLED_WHILE_REPORTING
def test_a_run_killed_while_reporting_reports_again_whole(tfds_dir, tmp_path,
                                                          killed_while_reporting):
  """Killed while drawing its report's plot, a finished run has no report.json yet: run again,
  it writes both (not only report.json, then prints it forever without the plot); temporary
  files a killed run left in the workdir are removed."""
  workdir = tmp_path / 'run'
  shutil.copytree(killed_while_reporting, workdir)
  (workdir / '.rater_report.png.tmp-dead1234').write_bytes(b'')  # as SIGKILL leaves it
  meta_train(small_config(tfds_dir, steps=2), str(workdir), devices=jax.devices()[:1])
  assert (workdir / 'report.json').exists() and (workdir / 'rater_report.png').exists()
  assert not list(workdir.glob('.*.tmp-*'))


def test_temporary_files_a_killed_run_left_in_its_workdirs_folders_are_removed(tmp_path):
  """SIGKILL while launch.valuate pickled a fitted run into WORKDIR/fit (or wrote a gradient
  store's progress) left its temporary file there for good: only the workdir's own were removed
  (and a fitted run's can be large). Orbax's checkpoints and hidden folders (another writer's
  temporary folder) are left alone, as are finished files."""
  workdir = tmp_path / 'run'
  stale = [workdir / 'fit' / '.tracin-ab12.pkl.tmp-x1y2z3', workdir / '.metrics.jsonl.tmp-q',
           workdir / 'store_tracin-ab12' / '.progress.json.tmp-k9']
  kept = [workdir / 'checkpoints' / '8' / '.meta.tmp-1', workdir / 'fit' / 'tracin-ab12.pkl',
          workdir / '.out.tmp-123' / '.rater.json.tmp-w']
  for path in stale + kept:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'as SIGKILL left it')
  with files.workdir_lock(str(workdir)):
    assert [p.exists() for p in stale + kept] == [False] * len(stale) + [True] * len(kept)


def test_write_failures_reported_in_library_types_are_one_line(capsys):
  """A full disk as orbax reports it (ValueError), a RuntimeError raised from an OSError (as
  TFDS's writer does): one line, exit 2. An error raised while handling an OSError is a bug and
  keeps its traceback."""
  import errno  # pylint: disable=g-import-not-at-top
  from datarater import errors  # pylint: disable=g-import-not-at-top

  def raised_from_oserror():
    try:
      raise OSError(errno.EROFS, 'Read-only file system', '/data/out')
    except OSError as e:
      raise RuntimeError('Failed to finalize writing of split "train"') from e
  cases = ((lambda: (_ for _ in ()).throw(ValueError(
      'RESOURCE_EXHAUSTED: Error writing "manifest.ocdbt": No space left on device\nmore')),
            'error: no space left on device (RESOURCE_EXHAUSTED: Error writing'),
           (raised_from_oserror, 'error: Read-only file system (/data/out)'),
           (lambda: np.zeros(2 ** 50, np.int64),  # numpy's MemoryError, a size from a config
            'error: out of memory (Unable to allocate'),
           (lambda: (_ for _ in ()).throw(RuntimeError(  # as XLA reports a device's
               'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8796093022208 bytes.')),
            'error: out of memory (RESOURCE_EXHAUSTED: Out of memory while trying'))
  for fail, line in cases:
    with pytest.raises(SystemExit) as exit_info, errors.exit_on_user_error():
      fail()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(line), err

  def bug_while_handling():
    try:
      raise OSError(errno.ENOENT, 'No such file or directory', 'x')
    except OSError:
      return {}['missing']
  with pytest.raises(KeyError), errors.exit_on_user_error():
    bug_while_handling()


def test_a_checkpoint_write_that_fails_in_orbax_threads_is_one_line(tmp_path, caplog, capfd):
  """A write that fails in orbax's background save threads (here a file-size limit; a full disk
  or a quota fails the same way) ends in one line naming the OS error: orbax logged it first with
  tracebacks (about 470 lines on a full disk) and tensorstore printed closed-loop tracebacks, and
  a file too large was a traceback. No step is kept half-written."""
  import resource  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import errors  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'seed': 0})
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path / 'run'), config)
  state = {'w': np.arange(2 ** 19, dtype=np.float32)}  # 2 MiB in one file
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, limits[1]))
  capfd.readouterr()
  try:
    with pytest.raises(SystemExit) as exit_info, errors.exit_on_user_error():
      checkpointer.save(1, state, {'train': 0})
      checkpointer.close()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)
  assert exit_info.value.code == 2
  err = capfd.readouterr().err
  assert err.startswith('error: File too large (') and len(err.strip().splitlines()) == 1, err
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
  assert not (tmp_path / 'run' / 'checkpoints' / '1').exists()


def test_only_orbaxs_background_save_reports_are_dropped(tmp_path, caplog):
  """Once a checkpoint is saved, absl's logger drops orbax's report of a failed background save
  (orbax raises it again) but passes the same words at ERROR from anywhere else, and orbax's
  lower-level messages: those are nobody's one-line error."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path / 'run'),
                                               ml_collections.ConfigDict({'seed': 0}))
  checkpointer.save(1, {'w': jnp.ones(3)}, {'train': 0})
  checkpointer.close()
  absl_log = logging.getLogger('absl')
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'future.py')
  # (the second: a metadata file that a full disk failed, logged with its traceback before
  # orbax raises it again; it came before a launcher's one-line error)
  for message in ('Failed to run 4 Handler Commit operations in background save thread, '
                  'directory: x', 'Failed to write metadata=%s path=%s: %s'):
    caplog.clear()
    for path, level in ((orbax_file, logging.ERROR), (__file__, logging.ERROR),
                        (os.path.join(os.sep, 'site-packages', 'tensorstore', 'x.py'),
                         logging.ERROR), (orbax_file, logging.WARNING)):
      absl_log.handle(absl_log.makeRecord('absl', level, path, 1, message, (), None))
    assert [(r.pathname, r.levelno) for r in caplog.records] == [
        (__file__, logging.ERROR),
        (os.path.join(os.sep, 'site-packages', 'tensorstore', 'x.py'), logging.ERROR),
        (orbax_file, logging.WARNING)], message


def test_a_checkpoint_without_orbaxs_metadata_file_is_read_without_a_warning(tmp_path, caplog):
  """A checkpoint folder without orbax's _CHECKPOINT_METADATA (copied without it, or cut short)
  reads, and orbax's warning of it is not printed: it came before a launcher's one-line error
  (a resume with another config), as a second line."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'seed': 0})
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path / 'run'), config)
  checkpointer.save(3, {'w': jnp.ones(3)}, {'train': 0})
  checkpointer.close()
  (tmp_path / 'run' / 'checkpoints' / '3' / '_CHECKPOINT_METADATA').unlink()
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert checkpointing.RunCheckpointer(str(tmp_path / 'run'), config).latest_step() == 3
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_progress_in_a_log_file_writes_a_line_once_its_interval_has_passed(monkeypatch, capsys):
  """When updates slow down, a line comes with the first update past the interval: tqdm's own
  count of updates between lines, fitted to the earlier rate, held them back (lines 40 s apart,
  then two 0.4 s apart, at an interval of 30 s)."""
  import time  # pylint: disable=g-import-not-at-top
  from datarater import progress  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(progress, 'LOG_INTERVAL_S', 0.05)
  with progress.bar(total=100, desc='scoring', unit='ex') as bar:
    for _ in range(40):  # fast: many updates per interval
      time.sleep(0.0025)
      bar.update(1)
    capsys.readouterr()
    for _ in range(4):  # slow: each update comes after the interval has passed
      time.sleep(0.0625)
      bar.update(1)
      assert capsys.readouterr().out.count('\n') == 1


def test_progress_in_a_log_file_is_whole_lines(monkeypatch, capsys):
  """stderr not a terminal (a job's log): the bar writes plain lines to stdout, no carriage
  returns, the last one the finished count; on a terminal it is tqdm's own bar."""
  from datarater import progress  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(progress, 'LOG_INTERVAL_S', 0.0)
  for leave in (True, False):  # a bar that would clear itself on a terminal too
    for _ in progress.bar(iterable=range(5), desc='scoring', unit='ex', leave=leave):
      pass
    captured = capsys.readouterr()
    err, lines = captured.out, captured.out.splitlines()
    assert not captured.err and '\r' not in err and err.endswith('\n') and len(lines) >= 2
    assert lines[-1].startswith('scoring: 100%') and '5/5' in lines[-1]


def test_reports_with_a_diverged_model_print_n_a(monkeypatch):
  """A metric written as null (NaN: a fresh model diverged) prints, and reprints from the
  files on a rerun, as n/a or nan instead of stopping the run."""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  from datarater.train import format_record  # pylint: disable=g-import-not-at-top
  lines = []
  monkeypatch.setattr(meta_train_lib.log, 'info', lambda msg, *a: lines.append(msg % a))
  report = files.json_safe({'noise_auroc': 0.8, 'auroc_by_kind': {'label_symmetric': 0.8},
                            'fresh_models': {'uniform': {'eval': {'loss': float('nan'),
                                                                  'accuracy': 0.1},
                                                         'heldout': {'loss': float('nan')}}}})
  meta_train_lib.log_report(get_config(), report)
  assert 'held-out loss n/a, test loss n/a, test accuracy 10.00%' in lines[-1], lines
  line = format_record({'epoch': 1.0, 'example_gradients': 10, 'step': 1,
                        'heldout': {'loss': [None, 0.5], 'accuracy': [0.5, 0.7]}}, 'test')
  assert 'held-out loss nan' in line and 'held-out accuracy 60.00%' in line


def test_a_member_whose_optimizer_state_alone_is_infinite_is_reset():
  """Finite parameters are not enough: a member whose Adam second moment holds an inf (its next
  update is 0/inf or inf-driven) counts as diverged and starts afresh -- fresh parameters and
  optax's fresh Adam state (count 0, both moments zero) -- while the other members, finite
  everywhere, keep their parameters and optimizer state bit for bit. Two members diverged at
  once (1 and 3 of 4) get two different fresh models: a population is not collapsed."""
  from outer_loop import population as population_lib  # pylint: disable=g-import-not-at-top
  problem = tiny_problem(optimizer='adam')
  pop = population_lib.init_population(problem.init_member, jax.random.PRNGKey(3), 4)
  adam, rest = pop.opt_state
  # Moments as after some steps (finite, non-zero), then one inf in members 1 and 3's second
  # moments.
  mu = jax.tree.map(lambda m: jnp.full_like(m, 0.25), adam.mu)
  nu = jax.tree.map(lambda v: jnp.full_like(v, 0.5), adam.nu)
  first = jax.tree.leaves(nu)[0]
  poisoned_leaf = first.at[(1,) + (0,) * (first.ndim - 1)].set(jnp.inf)
  poisoned_leaf = poisoned_leaf.at[(3,) + (0,) * (first.ndim - 1)].set(jnp.inf)
  nu = jax.tree.unflatten(jax.tree.structure(nu), [poisoned_leaf] + jax.tree.leaves(nu)[1:])
  count = jnp.full_like(adam.count, 7)
  pop = dataclasses.replace(pop, opt_state=(adam._replace(count=count, mu=mu, nu=nu), rest))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(pop.params))

  np.testing.assert_array_equal(population_lib.finite_members(pop), [True, False, True, False])
  new, diverged = population_lib.reset_diverged(pop, problem.init_member, jax.random.PRNGKey(4),
                                                jnp.asarray(5))
  assert int(diverged) == 2
  member = lambda tree, k: ravel_pytree(jax.tree.map(lambda x: x[k], tree))[0]
  for k in (0, 2):  # untouched
    np.testing.assert_array_equal(member(new.params, k), member(pop.params, k))
    np.testing.assert_array_equal(member(new.opt_state, k), member(pop.opt_state, k))
  # Members 1 and 3: a fresh Adam state by optax's definition, and newly drawn finite
  # parameters, each its own draw, unlike any member before.
  new_adam = new.opt_state[0]
  for k in (1, 3):
    assert int(new_adam.count[k]) == 0
    assert not np.any(member(new_adam.mu, k)) and not np.any(member(new_adam.nu, k))
    assert np.all(np.isfinite(member(new.params, k)))
    for old in range(4):
      assert not np.allclose(member(new.params, k), member(pop.params, old)), (k, old)
  assert not np.allclose(member(new.params, 1), member(new.params, 3))
  np.testing.assert_array_equal(population_lib.finite_members(new), [True] * 4)
  # A population finite everywhere: no member reset, none counted.
  again, diverged = population_lib.reset_diverged(new, problem.init_member, jax.random.PRNGKey(5),
                                                  jnp.asarray(6))
  assert int(diverged) == 0
  np.testing.assert_array_equal(ravel_pytree(again)[0], ravel_pytree(new)[0])


def test_fresh_models_trained_with_the_rater_use_its_temperature(tfds_dir):
  """fresh_model_results' 'rater' entry is a Trainer run with the rater's weights at the problem's
  temperature tau = 0.1 (same seed and steps), and differs from the same run at tau = 1."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from datarater.meta_train import fresh_model_results  # pylint: disable=g-import-not-at-top
  from datarater.policies import weighting  # pylint: disable=g-import-not-at-top
  from datarater.tasks.classifier import mlp_rater  # pylint: disable=g-import-not-at-top
  from datarater.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from inner_loop.optimizers import make_inner_optimizer  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  train = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  heldout = pipeline.load_split(digits_data(tfds_dir), 'validation')
  data = types.SimpleNamespace(train=train, heldout=heldout, eval=heldout)
  mlp = ml_collections.ConfigDict({'hidden': (8,), 'activation': 'tanh'})
  task = tasks.make_task(ml_collections.ConfigDict({'name': 'mlp_classifier', **mlp}), train.info)
  rater = mlp_rater(mlp, train.info)
  rater_params = jax.tree.map(lambda x: 5.0 * x, rater.init(jax.random.PRNGKey(3)))
  problem = types.SimpleNamespace(task=task, rater=rater, temperature=0.1,
                                  inner_optimizer=make_inner_optimizer('sgd', 0.3))
  config = ml_collections.ConfigDict({'seed': 1, 'inner': {'batch_size': 32, 'learning_rate': 0.3},
                                      'final_eval': {'num_models': 1, 'train_steps': 8}})
  results = fresh_model_results(config, data, problem, rater_params)
  got = results['rater']['heldout']['loss']

  def by_hand(tau=None, seed=1):  # tau None: uniform weights
    policy = (weighting.weighting_policy('uniform', len(train)) if tau is None
              else weighting.rater_weights(rater, rater_params, tau, len(train)))
    run = Trainer(task, problem.inner_optimizer, policy, 32).run(
        train, {'heldout': heldout}, [seed], steps=8)
    return float(np.mean(run.final['heldout']['loss']))
  assert got == pytest.approx(by_hand(0.1), rel=1e-5)
  assert abs(by_hand(1.0) - got) > 1e-4
  # The uniform models start from the same seed (same initialisation and data order): the two
  # entries differ by the weights alone.
  uniform = results['uniform']['heldout']['loss']
  assert uniform == pytest.approx(by_hand(), rel=1e-5)
  assert abs(by_hand(seed=2) - uniform) > 1e-4


def _one_device_run_with_fresh_models(tfds_dir):
  """A rater run on 1 device (of 4) whose report trains 1 fresh model per weighting with
  inner.batch_size=6: 6 splits over that one device, not over a batch axis of all 4."""
  config = small_config(tfds_dir, steps=2)
  config.inner.population, config.inner.batch_size = 1, 6
  config.final_eval.num_models = 1
  return config


def test_a_run_on_some_devices_checks_its_fresh_models_batch_on_those(tfds_dir, tmp_path):
  """meta_train(devices=[one]) checks the report's fresh models' batch on that device (it was
  checked, and they were trained, on all 4 of the process: inner.batch_size=6 refused): the run
  goes on to its next check, here an outer batch larger than its split."""
  config = _one_device_run_with_fresh_models(tfds_dir)
  config.outer.batch_size = 10**6
  with pytest.raises(UserError, match=r'^outer\.batch_size=1000000 is more than the \d+ '):
    meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])


@pytest.mark.slow
def test_a_run_on_some_devices_trains_its_fresh_models_on_those(tfds_dir, tmp_path, monkeypatch):
  """The report's fresh models train on the run's devices (one of 4 here): every Trainer run
  of the report is placed on a mesh of that device alone, and the report holds their figures."""
  from datarater import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  meshes, mesh_of = [], trainer_lib.Trainer.mesh
  monkeypatch.setattr(trainer_lib.Trainer, 'mesh',
                      lambda self, n: meshes.append(mesh_of(self, n)) or meshes[-1])
  report = meta_train(_one_device_run_with_fresh_models(tfds_dir), str(tmp_path / 'run'),
                      devices=jax.devices()[:1])
  assert meshes and all(list(m.devices.flat) == jax.devices()[:1] for m in meshes)
  for weighting in ('rater', 'uniform'):
    assert np.isfinite(report['fresh_models'][weighting]['eval']['loss'])


@pytest.mark.slow
def test_asyncio_reports_of_unretrieved_tensorstore_read_errors_are_dropped(caplog, monkeypatch):
  """orbax reads a damaged checkpoint's arrays in several asyncio tasks and raises the first
  error; the others, collected unretrieved, made asyncio log a traceback each. Once a checkpoint
  has been read (`quiet_orbax`), those reports (of tasks and of futures) are dropped and any
  other's are kept."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top

  def unretrieved(message):
    async def fail():
      raise ValueError(message)

    async def start_and_drop():
      task = asyncio.ensure_future(fail())
      await asyncio.sleep(0)  # the task runs and fails; nobody asks for its result
      future = asyncio.get_running_loop().create_future()
      future.set_exception(ValueError(message))  # a future failed likewise
      del task, future

    caplog.clear()
    asyncio.run(start_and_drop())
    gc.collect()
    return [r for r in caplog.records if 'never retrieved' in r.getMessage()]

  tensorstore = 'NOT_FOUND: Error opening "zarr" driver [tensorstore_spec=\'{}\']'
  # As in a process that has read no checkpoint yet (this one may have).
  logging.getLogger('asyncio').removeFilter(checkpointing._unretrieved_tensorstore_error)
  monkeypatch.setattr(sys, 'unraisablehook', sys.__unraisablehook__)
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    assert len(unretrieved(tensorstore)) == 2
    with checkpointing.quiet_orbax():
      pass
    assert not unretrieved(tensorstore)
    assert len(unretrieved('another failure')) == 2


def test_asyncio_reports_of_unretrieved_orbax_write_errors_are_dropped(caplog, tmp_path):
  """A full disk fails several of orbax's file writes at once (each in a thread, behind an
  asyncio future): orbax raises the first, which the launcher reports in one line, and asyncio
  logged the others, never retrieved, with a traceback after that line. Those reports (an
  OSError raised in orbax's code) are dropped; another's of the same error is kept."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import errno  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top

  def oserror_from(write):
    try:
      asyncio.run(write())
    except OSError as e:
      return e
    raise AssertionError('the write did not fail')

  async def own_write():
    (tmp_path / 'missing' / 'x').write_text('x')
  from_orbax = oserror_from(
      lambda: async_path.write_text(epath.Path(tmp_path / 'missing' / 'x'), 'x'))
  from_elsewhere = oserror_from(own_write)
  assert from_orbax.errno == from_elsewhere.errno == errno.ENOENT

  def unretrieved(error):
    async def drop():
      asyncio.get_running_loop().create_future().set_exception(error)
    caplog.clear()
    asyncio.run(drop())
    # Freed as its coroutine ends (no cycle); the young generations for good measure: a full
    # collection takes about a second in a worker late in the suite (~1M objects).
    gc.collect(1)
    return [r for r in caplog.records if 'never retrieved' in r.getMessage()]

  with caplog.at_level(logging.ERROR, logger='asyncio'), checkpointing.quiet_orbax():
    assert not unretrieved(from_orbax)
    assert len(unretrieved(from_elsewhere)) == 1


@pytest.mark.slow
def test_orbax_metadata_reads_never_awaited_warn_no_more_once_a_checkpoint_is_read():
  """A coroutine of orbax's metadata read dropped unawaited (as after a damaged checkpoint's read
  failed) warns as the garbage collector finds it, until `quiet_orbax` has run; another
  coroutine dropped so still warns."""
  import gc  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata.array_metadata_store import Store
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top

  async def other_read():
    pass

  def warned(make, installed):
    with warnings.catch_warnings(record=True) as seen:
      warnings.simplefilter('always')  # the filter, if installed, goes in front of it
      if installed:
        with checkpointing.quiet_orbax():
          pass
      coroutine = make()
      del coroutine
      gc.collect()
    return [str(w.message) for w in seen if 'was never awaited' in str(w.message)]

  metadata_read = lambda: Store._get_array_metadatas(None, None)  # pylint: disable=protected-access
  assert len(warned(metadata_read, installed=False)) == 1
  assert not warned(metadata_read, installed=True)
  assert len(warned(other_read, installed=True)) == 1


def test_the_report_figure_shows_an_auroc_below_chance_and_constant_scores(tmp_path,
                                                                           monkeypatch):
  """Its AUROC axis began at 0.4 (a rater ranking corrupted examples first was cut off) and
  equal scores gave an empty histogram."""
  from datarater import plots  # pylint: disable=g-import-not-at-top
  drawn = []
  monkeypatch.setattr(files, 'save_figure', lambda fig, path, **kw: drawn.append(fig))
  history = [{'step': s, 'outer_loss': 1.0, 'inner_loss': 1.0, 'noise_auroc': a}
             for s, a in ((1, 0.45), (2, 0.21), (3, None), (4, float('nan')))]
  plots.save_rater_report(str(tmp_path / 'r.png'), history, np.full(10, 2.0),
                          np.arange(10) < 3)
  auroc_axis, histogram = drawn[0].axes[1], drawn[0].axes[2]
  low, high = auroc_axis.get_ylim()
  assert low <= 0.21 and high == 1.0
  assert sum(p.get_height() for p in histogram.patches if hasattr(p, 'get_height')) > 0
  assert histogram.get_legend_handles_labels()[1] == ['clean (7)', 'corrupted (3, AUROC 0.500)']


def test_the_report_figure_names_its_axes_shows_each_kind_and_the_suggested_keep(tmp_path,
                                                                                monkeypatch):
  """The figure's title says which run on what data; every panel labels its axes; losses over
  decades get a log axis; each corruption kind has its own histogram labelled with its count and
  its AUROC against the clean examples (brute force over pairs here); a dashed line marks the
  lowest score the suggested keep keeps. Scores of +-1e308 (finite) drew bins of inf - inf: a
  ValueError that ended every rerun of a finished rater run before its report.json."""
  from datarater import plots  # pylint: disable=g-import-not-at-top
  drawn = []
  monkeypatch.setattr(files, 'save_figure', lambda fig, path, **kw: drawn.append(fig))
  rng = np.random.default_rng(0)
  record = np.repeat([0, 1, 2], [60, 25, 15])
  scores = rng.normal(size=100) - record
  history = [{'step': s, 'outer_loss': 3.0 * 10.0 ** -s, 'inner_loss': 2.0 * 10.0 ** -s,
              'noise_auroc': 0.5 + s / 10} for s in range(1, 5)]
  kinds = ('clean', 'label_symmetric', 'occlusion')
  plots.save_rater_report(str(tmp_path / 'r.png'), history, scores, record, kinds,
                          'Rater run on digits train', keep=0.6)
  fig = drawn[0]
  assert fig.get_suptitle() == 'Rater run on digits train'
  assert all(ax.get_xlabel() and ax.get_ylabel() and ax.get_title() for ax in fig.axes)
  assert fig.axes[0].get_yscale() == 'log'
  histogram = fig.axes[2]
  labels = histogram.get_legend_handles_labels()[1]
  clean = scores[record == 0]
  for k in (1, 2):
    bad = scores[record == k]
    pairs = (clean[:, None] > bad[None, :]) + 0.5 * (clean[:, None] == bad[None, :])
    assert f'{kinds[k]} ({len(bad)}, AUROC {pairs.mean():.3f})' in labels
  cut = np.sort(scores)[::-1][60 - 1]  # 0.6 of 100 scores (no ties)
  lines = [l for l in histogram.get_lines() if l.get_linestyle() == '--']
  assert [l.get_xdata()[0] for l in lines] == [cut] and 'suggested keep 60%' in labels
  huge = np.concatenate([[-1e308, 1e308], scores])
  plots.save_rater_report(str(tmp_path / 'h.png'), history, huge, np.r_[0, 1, record], kinds)
  assert sum(p.get_height() for p in drawn[1].axes[2].patches if hasattr(p, 'get_height')) > 0
  assert '/ 1e+308' in drawn[1].axes[2].get_xlabel()


def test_the_report_figure_draws_the_auroc_of_each_kind_over_steps(tmp_path, monkeypatch):
  """The AUROC panel showed the overall AUROC alone. Records holding each kind's (brute force over
  pairs here; one not defined at step 2, null) draw a line per kind beside the overall one, in
  the colour of the kind's histogram; records without them (an older run's) draw the overall."""
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  from datarater import plots  # pylint: disable=g-import-not-at-top
  drawn = []
  monkeypatch.setattr(files, 'save_figure', lambda fig, path, **kw: drawn.append(fig))
  rng = np.random.default_rng(1)
  record = np.repeat([0, 1, 2], [60, 25, 15])
  kinds = ('clean', 'label_symmetric', 'occlusion')
  pairs = lambda s, bad: np.mean((s[record == 0][:, None] > s[bad]) +
                                 0.5 * (s[record == 0][:, None] == s[bad]))
  history = []
  for step in (5, 10, 15):
    scores = rng.normal(size=100) - record * step / 10
    history.append({'step': step, 'outer_loss': 1.0, 'inner_loss': 1.0,
                    'noise_auroc': pairs(scores, record > 0),
                    'auroc_by_kind': {kind: pairs(scores, record == k)
                                      for k, kind in enumerate(kinds) if k}})
  history[1]['auroc_by_kind']['occlusion'] = None
  plots.save_rater_report(str(tmp_path / 'r.png'), history, scores, record, kinds)
  panel, histogram = drawn[0].axes[1], drawn[0].axes[2]
  lines = {l.get_label(): l for l in panel.get_lines()}
  assert list(lines) == ['all corrupted', 'label_symmetric', 'occlusion', 'chance']
  want = {'all corrupted': [h['noise_auroc'] for h in history],
          **{kind: [h['auroc_by_kind'][kind] for h in history] for kind in kinds[1:]}}
  for name, values in want.items():
    assert list(lines[name].get_xdata()) == [5, 10, 15]
    np.testing.assert_array_equal(lines[name].get_ydata(),
                                  [np.nan if v is None else v for v in values], err_msg=name)
  outlines = {p.get_label().split(' ')[0]: p.get_edgecolor() for p in histogram.patches}
  for kind in kinds[1:]:
    assert colors.to_rgba(lines[kind].get_color()) == outlines[kind], kind
  old = [{k: v for k, v in h.items() if k != 'auroc_by_kind'} for h in history]
  plots.save_rater_report(str(tmp_path / 'old.png'), old, scores, record, kinds)
  assert [l.get_label() for l in drawn[1].axes[1].get_lines()] == ['all corrupted', 'chance']


@KILLED_WHILE_REPORTING
def test_a_report_figure_that_cannot_be_drawn_leaves_the_report_written(
    tfds_dir, tmp_path, monkeypatch, capsys, killed_while_reporting):
  """An error drawing rater_report.png ended the finished run before report.json, and so every
  rerun: the report was never written. Now it is a warning. (Here a rerun of a run whose steps
  are done, the module's `killed_while_reporting`: it only reports.)"""
  from datarater import plots  # pylint: disable=g-import-not-at-top
  def broken(*args, **kwargs):
    raise ValueError('a plotting bug')
  monkeypatch.setattr(plots, 'save_rater_report', broken)
  workdir = tmp_path / 'run'
  shutil.copytree(killed_while_reporting, workdir)
  capsys.readouterr()
  report = meta_train(small_config(tfds_dir, steps=2), str(workdir), devices=jax.devices()[:1])
  assert json.load(open(workdir / 'report.json'))['noise_auroc'] == report['noise_auroc']
  assert not (workdir / 'rater_report.png').exists()
  out = capsys.readouterr().out
  assert 'could not draw' in out and 'a plotting bug' in out and 'rater_report.png' not in out[
      out.index('wrote'):]


class _FakeClock:
  """meta_train's clock (`time.time`), advanced by hand: 100 s per compilation of the outer step
  and 1 s per outer step the run calls, nothing otherwise."""

  def __init__(self):
    self.now = 0.0

  def time(self):
    return self.now

  def stepping(self, fn):
    clock = self

    class Stepping:
      def lower(self, *args):
        lowered = fn.lower(*args)

        class Lowered:
          def compile(self):
            clock.now += 100.0
            return clock.stepping(lowered.compile())
        return Lowered()

      def __call__(self, *args):
        clock.now += 1.0
        return fn(*args)

      def __getattr__(self, name):  # the compiled step's own (out_info)
        return getattr(fn, name)
    return Stepping()


def _clocked_rater_runs(tfds_dir: str, folder: str) -> None:
  """The rater runs of the test below on a `_FakeClock` (100 s per compilation of the outer step
  by hand, 100 s per XLA compilation by JAX's event, 1 s per step), in `folder`; their progress
  lines on stdout. Run in a process forked from one that has compiled nothing: every program they
  use compiles there (JAX's event fires on a persistent-cache hit too), as in a fresh run, and no
  other test's compiled programs are cleared."""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  from datarater import plots  # pylint: disable=g-import-not-at-top
  clock = _FakeClock()
  meta_train_lib.time = clock
  meta_train_lib.HEARTBEAT_S = 2.5
  real_jit = sharding.jit_outer_step
  sharding.jit_outer_step = lambda *a: (
      lambda step_fn, *shardings: (clock.stepping(step_fn), *shardings))(*real_jit(*a))
  plots.save_rater_report = lambda *a, **k: None  # not read here
  def compiled(event, secs, **kwargs):
    del secs, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      clock.now += 100.0
  jax.monitoring.register_event_duration_secs_listener(compiled)
  config = small_config(tfds_dir, steps=9)
  config.final_eval.num_models = 0
  config.log_every = config.checkpoint_every = 9
  meta_train(config, os.path.join(folder, 'run'), devices=jax.devices()[:1])
  config = small_config(tfds_dir, steps=8)
  config.final_eval.num_models = 0
  config.log_every, config.checkpoint_every = 4, 8
  meta_train(config, os.path.join(folder, 'resumed'), stop_after=6, devices=jax.devices()[:1])
  meta_train(config, os.path.join(folder, 'resumed'), devices=jax.devices()[:1])


def test_progress_lines_and_steps_per_sec_follow_the_clock_of_the_steps(tfds_dir, tmp_path):
  """On a clock that moves 1 s per outer step, 100 s per compilation of it (by hand) and 100 s
  per XLA compilation (JAX's event), a run of 9 steps recording only at its end with
  HEARTBEAT_S = 2.5 writes a progress line once more than 2.5 s have passed since the last one:
  at steps 3 and 6 only, each at 1.00 steps/s with the ETA of the steps left at that rate (6 s,
  3 s); its record says 1.0 steps/s (compilation not counted: a program compiled after the
  loop's clock started would add 100 s). A run stopped
  at step 6 and resumed, recording at 4 and 8, says 1.0 steps/s at both records: the resumed one
  times the 2 steps it ran in 2 s, not the 4 since the last record. (The runs: a forked process,
  `_clocked_rater_runs`.)"""
  from tests import conftest, forked  # pylint: disable=g-import-not-at-top
  done = forked.call(_clocked_rater_runs, tfds_dir, str(tmp_path), env=conftest.subprocess_env(4))
  assert done.returncode == 0, done.stderr[-3000:]
  beats = [l for l in done.stdout.splitlines() if '(metrics every 9 steps)' in l]
  assert [' '.join(l.split()[l.split().index('step'):]) for l in beats] == [
      'step 3/9 | 1.00 steps/s | ETA 6 s (metrics every 9 steps)',
      'step 6/9 | 1.00 steps/s | ETA 3 s (metrics every 9 steps)'], beats
  read = lambda run: [json.loads(l) for l in open(tmp_path / run / 'metrics.jsonl')]
  assert [(r['step'], r['steps_per_sec']) for r in read('run')] == [(9, 1.0)]
  assert [(r['step'], r['steps_per_sec']) for r in read('resumed')] == [(4, 1.0), (8, 1.0)]


@pytest.mark.slow
def test_a_flat_meta_gradient_is_reported_since_the_first_step_of_its_stretch(
    tfds_dir, tmp_path, monkeypatch, capsys):
  """The meta-gradient norm scripted 0 at outer steps 3-6 and 9-10 of a 10-step run recording
  every 2 steps: the warning at records 4 and 6 names step 3 (where the stretch of flat records
  began), none at 8, and at 10 step 9 (a new stretch), though the run stopped at step 5 and was
  resumed in between."""
  real = sharding.outer_step
  flat = jnp.array([s in (3, 4, 5, 6, 9, 10) for s in range(1, 11)])

  def scripted(problem, estimator, state, inner, outer):
    new_state, metrics = real(problem, estimator, state, inner, outer)
    return new_state, {**metrics, 'meta_grad_norm': jnp.where(
        flat[state.step], 0.0, metrics['meta_grad_norm'])}
  monkeypatch.setattr(sharding, 'outer_step', scripted)
  from datarater import plots  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(plots, 'save_rater_report', lambda *a, **k: None)  # not read here
  config = small_config(tfds_dir, steps=10)
  config.final_eval.num_models = 0
  config.log_every, config.checkpoint_every = 2, 2
  meta_train(config, str(tmp_path / 'run'), stop_after=5, devices=jax.devices()[:1])
  meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  records, warned = [], {}
  for line in capsys.readouterr().out.splitlines():
    if '| outer loss' in line:
      records.append(int(line.split('step')[1].split('/')[0]))
    elif 'exactly 0 since outer step' in line:
      warned[records[-1]] = int(line.split('since outer step ')[1].split(':')[0])
  assert records == [2, 4, 6, 8, 10] and warned == {4: 3, 6: 3, 10: 9}, (records, warned)


@pytest.mark.slow
def test_a_checkpoint_without_progress_resumes_records_over_the_steps_since_the_resume(
    tfds_dir, tmp_path, monkeypatch):
  """A checkpoint written before checkpoints kept the progress between records (here its
  `progress` dropped as it is saved), resumed at step 3 of a run recording every 2 steps: its
  record at step 4 holds the means of step 4 alone, as an uninterrupted run recording every step
  logs them at step 4; later records are whole again."""
  from datarater import plots  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(plots, 'save_rater_report', lambda *a, **k: None)  # not read here
  config = small_config(tfds_dir, steps=6)
  config.final_eval.num_models = 0
  every_step = config.copy_and_resolve_references()
  every_step.log_every = every_step.checkpoint_every = 1
  meta_train(every_step, str(tmp_path / 'straight'), devices=jax.devices()[:1])
  save = checkpointing.RunCheckpointer.save
  monkeypatch.setattr(checkpointing.RunCheckpointer, 'save', lambda self, step, state, pos,
                      extra=None: save(self, step, state, pos, {k: v for k, v in extra.items()
                                                                 if k != 'progress'}))
  meta_train(config, str(tmp_path / 'old'), stop_after=3, devices=jax.devices()[:1])
  monkeypatch.setattr(checkpointing.RunCheckpointer, 'save', save)
  meta_train(config, str(tmp_path / 'old'), devices=jax.devices()[:1])
  read = lambda run: {r['step']: r for r in map(json.loads, open(tmp_path / run / 'metrics.jsonl'))}
  straight, got = read('straight'), read('old')
  assert sorted(got) == [2, 4, 6]
  for name in ('outer_loss', 'inner_loss', 'meta_grad_norm', 'weight_ess'):
    np.testing.assert_allclose(got[4][name], straight[4][name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[6][name], (straight[5][name] + straight[6][name]) / 2,
                               rtol=1e-5, err_msg=name)


def test_a_failed_background_save_is_raised_by_check_and_closing_keeps_the_blocks_own_error(
    tmp_path):
  """A save whose write fails in orbax's background threads (a file-size limit): `check()` raises
  that OS error once orbax has reported it, with no later save, wait or close; and an error that
  leaves a `closing()` block stands, not the failed save's own error raised again at close."""
  import resource  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path / 'run'),
                                               ml_collections.ConfigDict({'seed': 0}))
  state = {'w': np.arange(2 ** 19, dtype=np.float32)}  # 2 MiB in one file
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, limits[1]))
  raised = None
  try:
    with pytest.raises(KeyError, match='the run'):
      with checkpointer.closing():
        checkpointer.save(1, state, {'train': 0})
        deadline = time.monotonic() + 60
        while raised is None and time.monotonic() < deadline:
          try:
            checkpointer.check()
          except Exception as e:  # pylint: disable=broad-except
            raised = e
          time.sleep(0.05)
        raise KeyError('the run')
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)
  assert raised is not None and 'File too large' in str(raised), raised
  assert not (tmp_path / 'run' / 'checkpoints' / '1').exists()


@pytest.mark.parametrize('launcher', ['train_rater', 'train'])
def test_a_task_whose_loss_is_nan_at_init_is_refused_before_the_step_compiles(
    launcher, tfds_dir, tmp_path):
  """A model with fewer classes (5) than the labels (10) reads its logits out of range: NaN
  losses. launch.train_rater compiled and skipped outer.max_skipped_steps steps before it
  stopped, launch.train compiled its steps and stopped at step 1; now both stop before,
  counting the examples whose label is past the model's classes (the NaN ones)."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from datarater.tasks import classifier  # pylint: disable=g-import-not-at-top
  from datarater.train import train as train_models  # pylint: disable=g-import-not-at-top

  def five_classes(config, info):  # the user's bug: the last layer's width
    task = classifier.mlp_classifier(config, info)
    return dataclasses.replace(task, module=task.module.clone(
        features=(*config.hidden, 5)))
  tasks.register_task('five_classes_for_test', classifier.MLP_SCHEMA)(five_classes)
  config = small_config(tfds_dir, steps=2)
  config.task.name = 'five_classes_for_test'
  config.train.batch_size, config.train.epochs, config.train.seeds = 16, 1, (0,)
  workdir = tmp_path / 'run'
  if launcher == 'train_rater':
    data = MetaBatches(config)
    first = data.train.take(data.indices_at(0)[0][0, 0])['label']
    run = lambda: meta_train(config, str(workdir))
    where = 'the 16 examples of its first inner batch'
  else:
    first = pipeline.load_split(config.data, config.data.train_split,
                                corrupt=True).take(np.arange(16))['label']
    run = lambda: train_models(config, 'uniform', workdir=str(workdir), log=lambda _: None)
    where = 'the first 16 examples of data.train_split'
  try:
    with pytest.raises(UserError) as raised:
      run()
  finally:
    tasks.TASKS.pop('five_classes_for_test')
  assert 0 < int((first >= 5).sum()) < 16
  model = ('inner model 0 of inner.population=2' if launcher == 'train_rater'
           else 'model seed 0')
  assert (f'its per_example_loss is not finite on {int((first >= 5).sum())} of {where} at its '
          f'initial parameters ({model})') in str(raised.value), str(raised.value)
  assert not workdir.exists()


def _first_weight(params):
  """The first entry of the first kernel (2-d leaf) of a model's parameters."""
  return next(x for x in jax.tree.leaves(params) if x.ndim == 2)[0, 0]


def _nan_at_some_inits(config, info):
  """An MLP classifier whose loss is NaN where its first kernel weight is > 0: a loss that some
  initialisations make non-finite and others not."""
  from datarater.tasks import classifier  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class NanAtSomeInits(classifier.Classifier):
    def per_example_loss(self, params, batch):
      return (super().per_example_loss(params, batch)
              + jnp.where(_first_weight(params) > 0, jnp.nan, 0.0))
  return NanAtSomeInits(**vars(classifier.mlp_classifier(config, info)))


class _Started(Exception):
  """Raised where a run would start training, past its checks."""


@pytest.fixture
def nan_at_some_inits():
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.tasks import classifier  # pylint: disable=g-import-not-at-top
  tasks.register_task('nan_at_some_inits_for_test', classifier.MLP_SCHEMA)(_nan_at_some_inits)
  yield 'nan_at_some_inits_for_test'
  tasks.TASKS.pop('nan_at_some_inits_for_test')


def test_launch_train_checks_the_initial_loss_of_every_model_it_trains(
    nan_at_some_inits, tfds_dir, tmp_path, monkeypatch):
  """The check read task.init(key(train.seeds[0])), parameters no model of the run starts from:
  with a loss NaN at some initialisations it refused runs whose models start finite and passed
  runs whose first step is NaN. Now a run is refused exactly when one of its models (the
  trainer's own initialisation, `Trainer.init`) starts where the loss is NaN, naming it."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from datarater.policies import weighting  # pylint: disable=g-import-not-at-top
  from datarater.train import train as train_models  # pylint: disable=g-import-not-at-top
  from datarater.trainer import Trainer, initial_params  # pylint: disable=g-import-not-at-top
  from inner_loop.optimizers import make_inner_optimizer  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir)
  config.task.name = nan_at_some_inits
  config.train.batch_size, config.train.epochs = 16, 1
  split = pipeline.load_split(config.data, config.data.train_split, corrupt=True)
  task = tasks.make_task(config.task, split.info)
  seeds = list(range(12))
  trainer = Trainer(task, make_inner_optimizer('sgd', 0.1),
                    weighting.weighting_policy('uniform', 8), 16)
  started = trainer.init(seeds, 8)[0].models.params
  for checked, run in zip(jax.tree.leaves(initial_params(task, seeds)), jax.tree.leaves(started)):
    np.testing.assert_array_equal(checked, run)  # what the check reads: the run's start
  nan = np.asarray(jax.vmap(_first_weight)(started)) > 0
  old = np.asarray(jax.vmap(lambda s: _first_weight(task.init(jax.random.key(s))))(
      jnp.asarray(seeds))) > 0
  starts_nan = seeds[int(np.argmax(nan & ~old))]  # the old check passed it
  starts_finite = seeds[int(np.argmax(~nan & old))]  # the old check refused it
  assert nan[starts_nan] and not old[starts_nan] and old[starts_finite] and not nan[starts_finite]

  def run(*args, **kwargs):
    raise _Started()
  monkeypatch.setattr(Trainer, 'run', run)
  config.train.seeds = (starts_finite,)
  with pytest.raises(_Started):
    train_models(config, 'uniform', log=lambda _: None)
  config.train.seeds = (starts_finite, starts_nan)
  with pytest.raises(UserError) as raised:
    train_models(config, 'uniform', workdir=str(tmp_path / 'run'), log=lambda _: None)
  assert ('its per_example_loss is not finite on 16 of the first 16 examples of '
          f'data.train_split at its initial parameters (model seed {starts_nan}), before any '
          'update') in str(raised.value), str(raised.value)
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow  # (~3 s: the fast suite checks these messages on the five-class task)
def test_launch_train_rater_checks_the_initial_loss_of_every_inner_model_it_starts(
    nan_at_some_inits, tfds_dir, tmp_path, monkeypatch):
  """The check read task.init(key(seed)), parameters no inner model of the rater run starts
  from (those of `fresh_state`, rooted at seeding.root_key(seed, 'rater')). Now a run is refused
  exactly when one of its inner models starts where the loss is NaN, naming it and its batches;
  the run's own initial state is read where it starts (`_run`)."""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir)
  config.task.name = nan_at_some_inits
  info = pipeline.load_split(config.data, config.data.heldout_split).info
  problem = setup.build_problem(config, info)[0]

  seeds = jnp.arange(40)  # (fresh_state reads the config's seed and inner.population)
  nan = np.asarray(jax.jit(jax.vmap(lambda s: jax.vmap(_first_weight)(meta_train_lib.fresh_state(
      types.SimpleNamespace(seed=s, inner=config.inner), problem).population.params)))(seeds)) > 0
  old = np.asarray(jax.vmap(lambda s: _first_weight(problem.task.init(jax.random.key(s))))(
      seeds)) > 0
  found = {}
  for seed in range(len(seeds)):
    found.setdefault((bool(nan[seed].any()), bool(old[seed])), (seed, nan[seed]))
  (finite_seed, _), (nan_seed, nan) = found[(False, True)], found[(True, False)]
  started = []

  def run(config, workdir, stop_after, mesh, data, problem, *args):
    started.append(np.asarray(jax.vmap(_first_weight)(
        jax.jit(lambda: meta_train_lib.fresh_state(config, problem))().population.params)))
    raise _Started()
  monkeypatch.setattr(meta_train_lib, '_run', run)
  config.seed = finite_seed
  with pytest.raises(_Started):
    meta_train_lib.meta_train(config, str(tmp_path / 'finite'))
  assert not (started[0] > 0).any(), started  # the run starts where the loss is finite
  config.seed = nan_seed
  with pytest.raises(UserError) as raised:
    meta_train_lib.meta_train(config, str(tmp_path / 'nan'))
  member = int(np.argmax(nan))
  assert ('its per_example_loss is not finite on 16 of the 16 examples of its first inner batch '
          f'at its initial parameters (inner model {member} of inner.population=2), before any '
          'update') in str(raised.value), str(raised.value)
  assert not (tmp_path / 'nan').exists()


def test_a_valuation_checks_per_example_losses_at_its_recorded_runs_initial_parameters(
    nan_at_some_inits, tfds_dir):
  """`factory.check_per_example` read task.init(key(valuation.seed)), parameters the recorded
  run (`record_run`, purpose 'valuation') does not start from: with a loss NaN at some
  initialisations it refused seeds whose run starts finite. Now it refuses exactly the seeds
  whose recorded run starts where the loss is NaN (the trainer's own initialisation)."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from datarater.policies import weighting  # pylint: disable=g-import-not-at-top
  from datarater.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  from inner_loop.optimizers import make_inner_optimizer  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir)
  config.task.name = nan_at_some_inits
  split = pipeline.load_split(config.data, config.data.heldout_split)
  task = tasks.make_task(config.task, split.info)
  seeds = list(range(12))
  recorded = Trainer(task, make_inner_optimizer('sgd', 0.1),
                     weighting.weighting_policy('uniform', 8), 16, purpose='valuation')
  recorded = recorded.init(seeds, 8)[0].models.params
  nan = np.asarray(jax.vmap(_first_weight)(recorded)) > 0
  old = np.asarray(jax.vmap(lambda s: _first_weight(task.init(jax.random.key(s))))(
      jnp.asarray(seeds))) > 0
  for seed in (seeds[int(np.argmax(nan & ~old))], seeds[int(np.argmax(~nan & old))]):
    assert nan[seed] != old[seed]
    config.valuation.seed = seed
    if nan[seed]:
      with pytest.raises(UserError, match='is NaN on 4 of 4 examples at its initial parameters'):
        factory.check_per_example(config, task, split)
    else:
      factory.check_per_example(config, task, split)
