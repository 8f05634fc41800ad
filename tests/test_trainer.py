"""The one trainer against explicit loops: its steps, data order, policies' weights, counting,
evaluation, recording, vmapped seeds and resume."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from datarater import checkpointing, seeding, tasks
from datarater import trainer as trainer_lib
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.policies import base, filtering, selection, weighting
from datarater.trainer import Trainer
from tests.conftest import digits_data


@pytest.fixture(scope='module')
def splits(tfds_dir):
  train = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  test = pipeline.load_split(digits_data(tfds_dir), 'test')
  return train, test


def _task(info, hidden=(32,)):
  return tasks.make_task(ml_collections.ConfigDict(
      {'name': 'mlp_classifier', 'hidden': hidden, 'activation': 'relu'}), info)


def _trainer(train, policy=None, optimizer=None, batch_size=100, **kw):
  return Trainer(_task(train.info), optimizer or optax.adam(1e-2),
                 policy or weighting.weighting_policy('uniform', len(train)), batch_size, **kw)


def _optax_step(task, opt):
  """One plain optax step on the mean loss of a batch (the oracle of the trainer's steps), jitted
  once per batch shape: eager, each of the loops below spent seconds dispatching its ops."""
  def step(params, state, batch):
    g = jax.grad(lambda p: jnp.mean(task.per_example_loss(p, batch)))(params)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def test_steps_are_optax_steps_on_the_recorded_batches(splits):
  """Plain optax steps on the mean loss of each recorded batch's real examples give the same
  parameters (the short last batch of an epoch included), and every epoch visits every example
  exactly once (the last batch padded with weight 0)."""
  train, _ = splits
  trainer = _trainer(train, optimizer=optax.sgd(0.1), batch_size=128, record_every=1)
  run = trainer.run(train, {}, [4], epochs=2)
  rec = run.recording
  positions, weights = rec.positions[0], rec.weights[0]
  assert positions.shape == (2 * 10, 128) and run.steps == 20
  for epoch in range(2):
    seen = positions[10 * epoch:10 * (epoch + 1)][weights[10 * epoch:10 * (epoch + 1)] > 0]
    assert sorted(seen) == list(range(len(train)))
  assert not np.array_equal(positions[:10], positions[10:])  # reshuffled each epoch
  task = trainer.task
  ckpts = jax.tree.map(np.asarray, rec.checkpoints)  # indexed in numpy: no compile per index
  params = jax.tree.map(lambda x: x[0, 0], ckpts)  # before step 0 = the init
  opt = optax.sgd(0.1)
  state, step = opt.init(params), _optax_step(task, opt)
  assert (weights[9] > 0).sum() == len(train) - 9 * 128  # a short last batch
  losses = jax.jit(task.per_example_loss)
  seen_losses = []  # each real example's loss at the parameters before its step
  for t in range(20):
    for got, want in zip(jax.tree.leaves(ckpts), jax.tree.leaves(params)):
      np.testing.assert_allclose(got[0, t], want, rtol=1e-5, atol=1e-6)
    batch = train.take(positions[t][weights[t] > 0])
    seen_losses.append(np.asarray(losses(params, batch), np.float64))
    params, state = step(params, state, batch)
  for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
  # The record's running training loss: the mean over the epoch's real examples (not padding).
  for epoch, record in enumerate(run.history):
    want = np.concatenate(seen_losses[10 * epoch:10 * (epoch + 1)]).mean()
    np.testing.assert_allclose(record['train']['loss'], [want], rtol=1e-5)


def test_unequal_chunks_compile_once_and_padding_steps_change_nothing(splits):
  """Evaluations that cut epochs into chunks of 3 and 4 steps, and a last epoch of 3 steps, run
  through ONE compiled program of padded chunks; the padding steps must not move Adam's state:
  the run equals plain optax Adam steps on its recorded batches."""
  train, _ = splits
  trainer = _trainer(train, optimizer=optax.adam(1e-2), batch_size=128, record_every=1)
  lowered = []

  class Counting:
    def __init__(self, fn):
      self.fn = fn

    def lower(self, *args):
      lowered.append(args[4].shape)
      return self.fn.lower(*args)
  programs = trainer._programs
  trainer._programs = lambda mesh: {**programs(mesh), 'chunk': programs(mesh)['chunk']._replace(
      fn=Counting(programs(mesh)['chunk'].fn))}
  run = trainer.run(train, {}, [2], steps=23, evals_per_epoch=3)
  assert len(lowered) == 1 and run.steps == 23
  assert [r['step'] for r in run.history] == [3, 7, 10, 13, 17, 20, 21, 22, 23]
  # A record's epoch is its step over the steps of a full epoch (ceil(N / 128) = 10), also in the
  # short last epoch: the run ends at epoch 2.3, not 3.
  spe = -(-len(train) // 128)
  assert spe == 10
  assert [r['epoch'] for r in run.history] == pytest.approx([r['step'] / spe for r in run.history],
                                                            abs=1e-6)
  rec = run.recording
  assert rec.positions.shape == (1, 23, 128)
  task, opt = trainer.task, optax.adam(1e-2)
  params = jax.tree.map(lambda x: x[0, 0], rec.checkpoints)
  state, step = opt.init(params), _optax_step(task, opt)
  for t in range(23):
    keep = rec.weights[0, t] > 0
    params, state = step(params, state, train.take(rec.positions[0, t][keep]))
  for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
  assert run.example_gradients == 2 * len(train) + 3 * 128


def test_vmapped_seeds_equal_single_runs_and_compute_is_counted(splits):
  train, test = splits
  trainer = _trainer(train)
  both = trainer.run(train, {'eval': test}, [0, 1], epochs=2, evals_per_epoch=2)
  assert both.example_gradients == 2 * len(train) and both.steps == 2 * 12
  assert [r['epoch'] for r in both.history] == [0.5, 1.0, 1.5, 2.0]
  assert [r['step'] for r in both.history] == [6, 12, 18, 24]
  assert both.history[1]['example_gradients'] == len(train)
  for member, seed in enumerate([0, 1]):  # each member is its seed's run alone, and they differ
    alone = trainer.run(train, {'eval': test}, [seed], epochs=2)
    np.testing.assert_allclose(both.final['eval']['loss'][member], alone.final['eval']['loss'][0],
                               rtol=1e-5)
    for got, want in zip(jax.tree.leaves(both.params), jax.tree.leaves(alone.params)):
      np.testing.assert_allclose(got[member], want[0], rtol=1e-4, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(both.params)[0][0], jax.tree.leaves(both.params)[0][1])
  assert np.mean(both.final['eval']['accuracy']) > 0.5  # it learns


def test_evaluation_is_the_mean_of_the_task_metrics(splits, monkeypatch):
  """Evaluated in blocks of 128: 300 test examples fill 2 and 44 of a third, padded; the means
  are over the 300 alone."""
  monkeypatch.setattr(trainer_lib, 'EVAL_BLOCK', 128)
  train, test = splits
  assert len(test) == 300
  trainer = _trainer(train)
  run = trainer.run(train, {'eval': test}, [0], steps=15)
  assert run.steps == 15 and run.final['step'] == 15
  params = jax.tree.map(lambda x: x[0], run.params)
  metrics = jax.jit(trainer.task.metrics)(params, test.take(np.arange(len(test))))
  for name, values in metrics.items():
    np.testing.assert_allclose(run.final['eval'][name][0], np.mean(values), rtol=1e-5)


class _IndexMetric:
  """A task whose metrics include each example's `index` (its position in the split)."""

  def __init__(self, task):
    self.task = task

  def __getattr__(self, name):
    return getattr(self.task, name)

  def metrics(self, params, batch):
    return {**self.task.metrics(params, batch), 'index': batch['index'].astype(jnp.float32)}


def test_evaluation_batches_hold_the_examples_positions(splits, monkeypatch):
  """Every batch a task sees holds `index` (a task may key its dropout on it): the evaluation's
  too, where it was missing (a KeyError at the first evaluation)."""
  monkeypatch.setattr(trainer_lib, 'EVAL_BLOCK', 128)
  train, test = splits
  trainer = Trainer(_IndexMetric(_task(train.info)), optax.sgd(0.1),
                    weighting.weighting_policy('uniform', len(train)), 100)
  run = trainer.run(train, {'eval': test}, [0], steps=2)
  assert run.final['eval']['index'][0] == pytest.approx(np.mean(np.arange(len(test))))


def test_selection_visits_its_examples_like_training_on_the_subset(splits):
  """A selection policy that always picks the clean examples trains exactly like the subset."""
  train, test = splits
  keep = jnp.asarray(np.flatnonzero(~train.is_corrupted), jnp.int32)

  def select(aux, state):
    return keep, jnp.ones(len(keep), jnp.float32), state
  clean_only = base.Policy('clean_only', len(keep), base.no_state, select, base.weigh_uniform,
                           base.keep_state)
  selected = _trainer(train, clean_only, batch_size=64).run(train, {'eval': test}, [0], epochs=2)
  subset = train.subset(np.asarray(keep))
  plain = _trainer(subset, batch_size=64).run(subset, {'eval': test}, [0], epochs=2)
  assert selected.example_gradients == plain.example_gradients == 2 * len(keep)
  np.testing.assert_allclose(selected.final['eval']['loss'], plain.final['eval']['loss'],
                             rtol=1e-5)


def test_zero_weights_leave_the_initialisation_and_weights_follow_the_table(splits):
  train, test = splits
  zero = _trainer(train, weighting.table('zero', np.zeros(len(train))))
  run = zero.run(train, {'eval': test}, [3], epochs=1)
  init, _ = zero.init([3], len(train))
  for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(init.models.params)):
    np.testing.assert_array_equal(a, b)
  assert run.example_gradients == 0
  ones = _trainer(train, weighting.table('one', np.ones(len(train)))).run(
      train, {'eval': test}, [3], epochs=1)
  uniform = _trainer(train).run(train, {'eval': test}, [3], epochs=1)
  np.testing.assert_allclose(ones.final['eval']['loss'], uniform.final['eval']['loss'], rtol=1e-6)


def test_a_batch_of_zero_weights_is_no_step_after_training(splits):
  """An epoch whose selection weighs every example 0 trains on nothing: the parameters after it
  equal those before it (Adam's momentum from the epoch before must not move them)."""
  train, _ = splits
  n = len(train)

  def select(aux, state):  # epoch 0: every example; epoch 1: every example with weight 0
    weights = jnp.where(state.epoch == 0, 1.0, 0.0) * jnp.ones(n, jnp.float32)
    return jnp.arange(n, dtype=jnp.int32), weights, state
  policy = base.Policy('first_epoch_only', n, lambda num, key: selection.init_state(num, key),
                       select, base.weigh_uniform, selection.record_epoch)
  one = _trainer(train, policy).run(train, {}, [0], epochs=1)
  two = _trainer(train, policy).run(train, {}, [0], epochs=2)
  assert one.example_gradients == two.example_gradients == n
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_array_equal(a, b)


def test_a_filtered_out_epoch_is_no_step_for_adams_state_either(splits):
  """Plain optax Adam on the recorded batches, taking no step where a batch has no weight > 0,
  gives the run's parameters before every step and after the last: an epoch whose `weigh`
  filters every example out (not the selection) moves neither the parameters nor Adam's
  moments and step count, so the epoch after it trains as if it had not happened."""
  train, _ = splits
  n = len(train)

  def weigh(aux, state, params, batch, weights):  # epoch 1: every example filtered out
    return jnp.where(state.epoch == 1, 0.0, weights)
  policy = base.Policy('filter_epoch_1', n, lambda num, key: selection.init_state(num, key),
                       base.select_all(n), weigh, selection.record_epoch)
  trainer = _trainer(train, policy, optimizer=optax.adam(1e-2), batch_size=128, record_every=1)
  run = trainer.run(train, {}, [0], epochs=3)
  rec = run.recording
  positions, weights = rec.positions[0], rec.weights[0]
  assert run.steps == 30 and not (weights[10:20] > 0).any() and (weights[20:] > 0).any()
  task = trainer.task
  ckpts = jax.tree.map(np.asarray, rec.checkpoints)  # indexed in numpy: no compile per index
  params = jax.tree.map(lambda x: x[0, 0], ckpts)
  opt = optax.adam(1e-2)
  state, step = opt.init(params), _optax_step(task, opt)
  for t in range(30):
    for got, want in zip(jax.tree.leaves(ckpts), jax.tree.leaves(params)):
      np.testing.assert_allclose(got[0, t], want, rtol=1e-5, atol=1e-6, err_msg=f'step {t}')
    if (weights[t] > 0).any():
      params, state = step(params, state, train.take(positions[t][weights[t] > 0]))
  for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


def test_padding_rows_stay_at_weight_0_whatever_weigh_gives(splits):
  """A `weigh` that gives every row weight 1 trains on the epoch's examples once each: the padding
  rows of the short last batch (copies of position 0) are not trained on or counted."""
  train, _ = splits
  ones = base.weighting_policy('ones', len(train), weigh=lambda aux, s, p, b, w: jnp.ones_like(w))
  run = _trainer(train, ones, batch_size=100, record_every=1).run(train, {}, [0], epochs=1)
  weights, positions = run.recording.weights[0], run.recording.positions[0]
  assert run.example_gradients == len(train)
  assert sorted(positions[weights > 0]) == list(range(len(train)))


@pytest.mark.slow  # 30 epochs' training: the fast suite checks the weights' steps exactly
# (test_zero_weights_leave_..., test_batch_filter_steps_are_float64_steps_...)
def test_clean_oracle_weights_beat_uniform_under_noise(splits):
  """Weights that zero the corrupted examples must do better than uniform at 20% noise."""
  train, test = splits
  kw = dict(epochs=15)
  oracle = weighting.table('oracle', (~train.is_corrupted) * 1.25)
  clean = _trainer(train, oracle, batch_size=128).run(train, {'eval': test}, [0, 1], **kw)
  uniform = _trainer(train, batch_size=128).run(train, {'eval': test}, [0, 1], **kw)
  assert np.mean(clean.final['eval']['loss']) < np.mean(uniform.final['eval']['loss'])


@pytest.mark.parametrize('length', [{'epochs': 0}, {'steps': 0}, {'epochs': -1}, {},
                                    {'epochs': 1, 'steps': 1}])
def test_a_run_of_no_epochs_or_steps_is_refused(splits, length):
  train, _ = splits
  with pytest.raises(UserError, match='give a positive number of epochs or steps'):
    _trainer(train).run(train, {}, [0], **length)


@pytest.mark.parametrize('name', ['train', 'step'])
def test_an_evaluation_split_named_as_a_record_field_is_refused(splits, name):
  """A record holds the running training loss under 'train' (and its counts under 'step',
  ...): an evaluation split of the same name overwrote it, unsaid, in the history and figures."""
  train, test = splits
  with pytest.raises(UserError, match=f"evaluation split may not be named '{name}'"):
    _trainer(train).run(train, {name: test}, [0], steps=1)


def test_stopped_and_resumed_run_equals_uninterrupted(splits, tmp_path):
  """With a selection policy (its state is checkpointed too): stop after 2 of 4 epochs, resume."""
  train, test = splits
  config = ml_collections.ConfigDict({'x': 1})
  policy = selection.infobatch(len(train), 0.5)
  straight = _trainer(train, policy).run(train, {'eval': test}, [0, 1], epochs=4)
  ckpt = lambda: checkpointing.RunCheckpointer(str(tmp_path), config)
  stopped = _trainer(train, policy).run(train, {'eval': test}, [0, 1], epochs=4,
                                        checkpointer=ckpt(), stop_after=2)
  assert stopped.stopped_after == 2 and len(stopped.history) == 2
  resumed = _trainer(train, policy).run(train, {'eval': test}, [0, 1], epochs=4,
                                        checkpointer=ckpt())
  assert [r['step'] for r in resumed.history] == [r['step'] for r in straight.history]
  for a, b in zip(resumed.history, straight.history):
    np.testing.assert_allclose(a['eval']['loss'], b['eval']['loss'], rtol=1e-6)
  np.testing.assert_array_equal(resumed.policy_state.counts, straight.policy_state.counts)
  # The clocks go on from the checkpoint: a finished run run again reports its own (compile_s
  # was the last process's alone, 0 on a rerun).
  assert resumed.compile_s > stopped.compile_s > 0 and resumed.wall_s > stopped.wall_s > 0
  again = _trainer(train, policy).run(train, {'eval': test}, [0, 1], epochs=4,
                                      checkpointer=ckpt())
  assert (again.compile_s, again.wall_s) == (resumed.compile_s, resumed.wall_s)


def test_compile_time_is_counted_apart_from_the_training_and_kept_across_a_resume(
    splits, tmp_path, monkeypatch):
  """Each compilation made 1000 s long on the trainer's clock (by hand, counted as it happens):
  compile_s is 1000 s per compilation plus the real time (well under 1000 s), and wall_s stays
  under 1000 s, in a run stopped after an epoch and in its resumed run (whose compile_s adds its
  own compilations to the checkpoint's)."""
  import time as real_time  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  extra = {'s': 0.0, 'compiles': 0}
  compile_ = jax.stages.Lowered.compile

  def slow_compile(self, *a, **k):
    extra['s'] += 1000.0
    extra['compiles'] += 1
    return compile_(self, *a, **k)
  monkeypatch.setattr(jax.stages.Lowered, 'compile', slow_compile)
  monkeypatch.setattr(trainer_lib, 'time', types.SimpleNamespace(
      perf_counter=lambda: real_time.perf_counter() + extra['s']))
  train, test = splits
  config = ml_collections.ConfigDict({'x': 1})
  ckpt = lambda: checkpointing.RunCheckpointer(str(tmp_path), config)
  stopped = _trainer(train).run(train, {'eval': test}, [0], epochs=2, checkpointer=ckpt(),
                                stop_after=1)
  first = extra['compiles']
  assert first >= 2 and 1000 * first <= stopped.compile_s < 1000 * first + 500, stopped.compile_s
  assert 0 < stopped.wall_s < 500, stopped.wall_s
  resumed = _trainer(train).run(train, {'eval': test}, [0], epochs=2, checkpointer=ckpt())
  total = extra['compiles']
  assert total > first and 1000 * total <= resumed.compile_s < 1000 * total + 500, (
      resumed.compile_s, total)
  assert stopped.wall_s < resumed.wall_s < 500, resumed.wall_s


def test_diverged_models_stop_the_run_at_the_first_non_finite_loss(splits):
  """Adam at a huge learning rate: the run stops in one line naming the setting to lower and the
  first step whose training loss is not finite (it trained on, evaluating and checkpointing NaN):
  one step fewer runs to its end."""
  train, test = splits
  trainer = _trainer(train, optimizer=optax.adam(1e30), batch_size=64,
                     learning_rate_setting='LR (1e30)')
  with pytest.raises(UserError, match=r'the training loss is not finite at step (\d+) \(model '
                                      r'seed 3\): the models diverged; lower LR \(1e30\)$') as e:
    trainer.run(train, {'test': test}, [3], steps=30)
  step = int(e.value.args[0].split('at step ')[1].split()[0])
  assert step > 1
  run = trainer.run(train, {'test': test}, [3], steps=step - 1)
  assert run.steps == step - 1
  with pytest.raises(UserError, match=rf'not finite at step {step} '):
    trainer.run(train, {'test': test}, [3], steps=step)


def test_a_loss_not_finite_before_any_update_is_not_called_a_divergence():
  """A NaN loss at step 1 is the initial parameters' (an own model's nn.Embed reads NaN for
  tokens past its vocabulary): it said 'the models diverged; lower the learning rate'. Later
  steps' still say so, naming the setting."""
  losses = np.ones((2, 3, 4))
  losses[1, 0, 2] = np.nan
  with pytest.raises(UserError) as e:
    trainer_lib._check_losses(losses, [5, 6], 0, 'LR (0.1)')  # pylint: disable=protected-access
  line = str(e.value)
  assert line.startswith('the training loss is not finite at step 1 (model seed 6), before any '
                         'update: the model cannot read the data') and 'LR' not in line, line
  with pytest.raises(UserError, match=r'not finite at step 4 \(model seed 6\): the models '
                                      r'diverged; lower LR \(0.1\)$'):
    trainer_lib._check_losses(losses, [5, 6], 3, 'LR (0.1)')  # pylint: disable=protected-access


def test_a_streamed_run_reads_each_chunk_while_the_steps_before_it_run(tfds_dir, monkeypatch):
  """train.stream: chunk c + 1's batches are read (in a thread) while chunk c's steps run (read
  only after them, the device waited for every read): each compiled chunk of steps finds the
  next chunk's read started, unasked; and the run equals one of the split held in memory."""
  import threading  # pylint: disable=g-import-not-at-top
  from datarater.data import source as source_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(trainer_lib, 'STREAM_CHUNK', 4)  # 10 steps an epoch: chunks 4, 4, 2
  data = digits_data(tfds_dir)
  streamed = source_lib.open_source(data, 'train[:640]')
  read, real_read = [], Trainer._read
  started = threading.Condition()

  def logged_read(self, train, positions):
    with started:
      read.append(positions.shape[1])
      started.notify_all()
    return real_read(self, train, positions)
  monkeypatch.setattr(Trainer, '_read', logged_read)
  ahead_of_time = trainer_lib._AheadOfTime  # pylint: disable=protected-access
  found, real_call = [], ahead_of_time.__call__

  def call(self, name, fn, *args):
    if name == 'chunk_read':  # the reads started as these steps run (waited for 10 s at most)
      with started:
        if len(found) < 2:  # (the last chunk has none after it)
          started.wait_for(lambda: len(read) > len(found) + 1, timeout=10)
        found.append(len(read))
    return real_call(self, name, fn, *args)
  monkeypatch.setattr(ahead_of_time, '__call__', call)
  run = _trainer(streamed, batch_size=64).run(streamed, {}, [0], epochs=1)
  assert found == [2, 3, 3], found
  in_memory = pipeline.load_split(data, 'train[:640]')
  want = _trainer(in_memory, batch_size=64).run(in_memory, {}, [0], epochs=1)
  for got, expected in zip(jax.tree.leaves(run.params), jax.tree.leaves(want.params)):
    np.testing.assert_array_equal(got, expected)


def test_a_streamed_run_left_by_an_error_leaves_no_read_thread(tfds_dir, monkeypatch):
  """train.stream: a run stopped by an error while the next chunk is read ahead ends its read
  thread on the way out, not when the generator is collected (the traceback, held here, keeps
  the run's frame alive)."""
  import threading  # pylint: disable=g-import-not-at-top
  from datarater.data import source as source_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(trainer_lib, 'STREAM_CHUNK', 4)  # 10 steps an epoch: chunks 4, 4, 2
  streamed = source_lib.open_source(digits_data(tfds_dir), 'train[:640]')
  ahead_of_time = trainer_lib._AheadOfTime  # pylint: disable=protected-access
  real_call = ahead_of_time.__call__

  def call(self, name, fn, *args):
    if name == 'chunk_read':  # chunk 1 is being read ahead
      raise RuntimeError('a planted step error')
    return real_call(self, name, fn, *args)
  monkeypatch.setattr(ahead_of_time, '__call__', call)
  reading = lambda: [t for t in threading.enumerate() if t.name.startswith('datarater-read')]
  before = reading()
  with pytest.raises(RuntimeError, match='a planted step error') as e:
    _trainer(streamed, batch_size=64).run(streamed, {}, [0], epochs=1)
  assert e.value.__traceback__ is not None  # held here: its frames keep the run's locals alive
  assert [t for t in reading() if t not in before] == []


def test_compute_is_counted_over_real_examples_with_the_policys_own_costs(splits):
  """Counted by hand over 2 epochs of the 1197 examples in batches of 100 (the last of 97 and 3
  padding rows), under a policy that filters out the odd positions, scores each drawn example
  at 1.5 forward passes and cost 123 example-gradients and 45 forwards to make: example-gradients
  are the even positions' (599 an epoch), scoring forwards 1.5 per real example drawn (padding
  neither drawn nor scored), and the totals add the policy's setup."""
  train, _ = splits
  n = len(train)
  assert n == 1197
  even = lambda aux, s, p, batch, w: jnp.where(batch['index'] % 2 == 0, w, 0.0)
  policy = base.weighting_policy('even', n, weigh=even, forwards_per_example=1.5,
                                 setup_example_gradients=123, setup_forwards=45)
  report = _trainer(train, policy, batch_size=100).run(train, {}, [0, 1], epochs=2).report()
  assert report['example_gradients'] == 2 * 599
  assert report['scoring_forwards'] == int(1.5 * 2 * n)
  assert (report['setup_example_gradients'], report['setup_forwards']) == (123, 45)
  assert report['total_example_gradients'] == 2 * 599 + 123


def test_a_run_recorded_every_k_steps_keeps_the_parameters_before_steps_0_k_2k(splits):
  """record_every=4 over 12 steps: exactly 3 recorded parameter sets (no spare slot a valuation
  would take for a checkpoint), those before steps 0, 4 and 8 of plain optax SGD on the recorded
  batches; every step's batch is recorded."""
  train, _ = splits
  trainer = _trainer(train, optimizer=optax.sgd(0.1), batch_size=128, record_every=4)
  rec = trainer.run(train, {}, [1], steps=12).recording
  assert rec.positions.shape == rec.weights.shape == (1, 12, 128)
  assert {x.shape[:2] for x in jax.tree.leaves(rec.checkpoints)} == {(1, 3)}
  ckpts = jax.tree.map(np.asarray, rec.checkpoints)  # indexed in numpy: no compile per index
  init, _ = trainer.init([1], len(train))
  params = jax.tree.map(lambda x: x[0], init.models.params)
  opt = optax.sgd(0.1)
  state, step = opt.init(params), _optax_step(trainer.task, opt)
  for t in range(12):
    if t % 4 == 0:
      for got, want in zip(jax.tree.leaves(ckpts), jax.tree.leaves(params)):
        np.testing.assert_allclose(got[0, t // 4], want, rtol=1e-5, atol=1e-6, err_msg=f'{t}')
    keep = rec.weights[0, t] > 0
    params, state = step(params, state, train.take(rec.positions[0, t][keep]))


def test_checkpoints_are_written_every_k_epochs_and_at_the_end(splits, tmp_path):
  """checkpoint_every=2 over 5 epochs: saves after epochs 2, 4 and 5 (the end), the last two of
  them kept; a run stopped after 3 epochs saves there too."""
  import os  # pylint: disable=g-import-not-at-top
  train, _ = splits
  config = ml_collections.ConfigDict({'x': 1})
  saved = lambda d: sorted(int(s) for s in os.listdir(d / 'checkpoints') if s.isdigit())
  trainer = _trainer(train, batch_size=600)
  ckpt = lambda d: checkpointing.RunCheckpointer(str(tmp_path / d), config, max_to_keep=5)
  trainer.run(train, {}, [0], epochs=5, checkpoint_every=2, checkpointer=ckpt('a'))
  assert saved(tmp_path / 'a') == [2, 4, 5]
  trainer.run(train, {}, [0], epochs=5, checkpoint_every=2, stop_after=3, checkpointer=ckpt('b'))
  assert saved(tmp_path / 'b') == [2, 3]


def _linear_filter(train, rho: float):
  """The batch filter scoring each example by a fixed random projection of its image."""
  v = np.random.default_rng(7).normal(size=np.prod(train.info.spec['image'].shape))
  score = lambda aux, batch: batch['image'].reshape(batch['image'].shape[0], -1) @ aux
  return filtering.batch_filter(score, jnp.asarray(v, jnp.float32), rho, len(train)), v


def _weighting_or_selection(name: str, train):
  if name == 'batch_filter':  # its steps gather the kept rows of batches split over devices
    return _linear_filter(train, 0.5)[0]
  n = len(train)
  return selection.infobatch(n, 0.5) if name == 'infobatch' else weighting.weighting_policy(name, n)


def _assert_same_run(one, other):
  """Two runs equal up to float32 summation order (see test_four_devices_equal_one)."""
  assert [r['step'] for r in one.history] == [r['step'] for r in other.history]
  assert one.example_gradients == other.example_gradients
  for a, b in zip(one.history, other.history):
    for split in (k for k, v in a.items() if isinstance(v, dict)):
      for metric in a[split]:
        np.testing.assert_allclose(a[split][metric], b[split][metric], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves((one.params, one.policy_state)),
                  jax.tree.leaves((other.params, other.policy_state))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('policy,seeds', [('infobatch', [0, 1]),  # mesh (2, 2): CI runs this one
                                          pytest.param('uniform', [0, 1], marks=pytest.mark.slow),
                                          pytest.param('uniform', [3], marks=pytest.mark.slow),
                                          pytest.param('infobatch', [3], marks=pytest.mark.slow),
                                          pytest.param('batch_filter', [0, 1],
                                                       marks=pytest.mark.slow)])
def test_four_devices_equal_one(splits, policy, seeds):
  """The seeds over gcd(#seeds, 4) devices, the other devices splitting every batch (and every
  evaluation block): the run is one device's up to float32 summation order. A batch's loss and
  gradient are summed on each device, then across them: ~1e-7 relative per step, which 24 Adam
  steps grow to ~2e-5 on these parameters; histories ~1e-7. The recording too."""
  train, test = splits
  one, four = (_trainer(train, _weighting_or_selection(policy, train), record_every=6,
                        devices=jax.devices()[:n]).run(train, {'eval': test}, seeds, epochs=2,
                                                       evals_per_epoch=2) for n in (1, 4))
  pop = math.gcd(len(seeds), 4)
  for leaf in jax.tree.leaves((four.params, four.policy_state, four.recording.checkpoints)):
    assert leaf.sharding.mesh.shape == {'population': pop, 'batch': 4 // pop}
    assert leaf.sharding.spec[0] == 'population'
  _assert_same_run(one, four)
  for a, b in zip(jax.tree.leaves(one.recording.checkpoints),
                  jax.tree.leaves(four.recording.checkpoints)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(one.recording.positions, four.recording.positions)
  assert one.final['eval']['loss'] != one.history[0]['eval']['loss']  # the models trained


@pytest.mark.slow
def test_streamed_checkpoints_move_between_device_counts(tfds_dir, tmp_path):
  """A streamed run (a selection policy, 2 seeds) stopped after 1 of 3 epochs on 4 devices
  resumes on 1 device, and one stopped on 1 resumes on 4: both equal the uninterrupted 1-device
  run up to float32 summation order."""
  from datarater.data import source as source_lib  # pylint: disable=g-import-not-at-top
  data = digits_data(tfds_dir)
  streamed, test = source_lib.open_source(data, 'train[:640]'), pipeline.load_split(data, 'test')
  policy = selection.infobatch(len(streamed), 0.5)
  config = ml_collections.ConfigDict({'x': 1})

  def run(devices, workdir=None, **kw):
    ckpt = workdir and checkpointing.RunCheckpointer(str(workdir), config)
    return _trainer(streamed, policy, batch_size=64, devices=jax.devices()[:devices]).run(
        streamed, {'eval': test}, [0, 1], epochs=3, checkpointer=ckpt, **kw)
  straight = run(1)
  for first, then in ((4, 1), (1, 4)):
    assert run(first, tmp_path / f'{first}_{then}', stop_after=1).stopped_after == 1
    _assert_same_run(straight, run(then, tmp_path / f'{first}_{then}'))


def test_a_batch_that_does_not_split_over_the_devices_is_refused_in_one_line(splits):
  """The line names the config field (`batch_size_setting`; a bench's Trainer said
  'batch_size') and says what to do for a user who never asked for several devices."""
  train, _ = splits
  trainer = _trainer(train, batch_size=50, devices=jax.devices()[:4],
                     batch_size_setting='train.batch_size')
  with pytest.raises(UserError, match=r'^train\.batch_size=50 does not divide over 4 devices on '
                                      r'the batch axis \(4 devices, population axis 1\); use a '
                                      r'multiple of 4, or fewer devices \(a run takes every '
                                      r'device it sees: CUDA_VISIBLE_DEVICES picks some\)$'):
    trainer.run(train, {}, [0], epochs=1)
  assert trainer.mesh(2).shape == {'population': 2, 'batch': 2}  # 50 splits over 2 devices


def test_chunk_calls_place_no_host_array_through_device_put_in_one_process(splits, monkeypatch):
  """A run's jax.device_put calls do not grow with its chunks: in one process a chunk's host
  arrays (positions, weights, step numbers) go to the compiled program as they are (device_put
  of every argument took ~0.5 ms a call, ~2x a one-device run of small chunks)."""
  train, _ = splits
  trainer = _trainer(train, batch_size=200, devices=jax.devices()[:1])
  put, calls = jax.device_put, []
  monkeypatch.setattr(jax, 'device_put', lambda *a, **k: calls.append(1) or put(*a, **k))

  def puts(evals_per_epoch):
    calls.clear()
    trainer.run(train, {}, [0], epochs=1, evals_per_epoch=evals_per_epoch)
    return len(calls)
  assert trainer.steps_per_epoch == 6 and puts(1) == puts(6)


def test_a_trainers_models_start_from_the_tasks_init_compiled_once_per_process(splits):
  """Trainer.init traced the task's init (vmapped) into a program of its own, compiled again by
  every Trainer (~1.5 s of CPU per run for the digits MLP, as much as its steps). Now it calls
  `task.init` with each seed's key, a program compiled once per process, never traced; the
  models start where the documented keys say: task.init(fold_in(root_key(seed, 'train'), 0))."""
  train, _ = splits
  task, traced = _task(train.info), []

  class Spy(type(task)):
    def init(self, key):
      traced.append(isinstance(key, jax.core.Tracer))
      return super().init(key)
  spy = Spy(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)})
  state, _ = Trainer(spy, optax.adam(1e-2), weighting.weighting_policy('uniform', len(train)),
                     100).init([5, 2], len(train))
  assert traced == [False, False]
  for i, seed in enumerate([5, 2]):
    want = task.init(jax.random.fold_in(seeding.root_key(jnp.int32(seed), 'train'), 0))
    for got, w in zip(jax.tree.leaves(state.models.params), jax.tree.leaves(want)):
      np.testing.assert_array_equal(got[i], w)


def _as_float64(batch: dict) -> dict:
  return {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in batch.items()}


def test_batch_filter_steps_are_float64_steps_on_the_best_scored_rows(splits):
  """Under datarater_batch_filter (rho 0.5, B 128: 64 kept; the short last batch of 45 keeps 22),
  a float64 SGD step on the mean loss of the best-scored floor((1 - rho) b) of each batch's b
  real rows, chosen in numpy, gives the run's parameters, the rows it trained on and its
  counts."""
  train, _ = splits
  policy, v = _linear_filter(train, 0.5)
  trainer = _trainer(train, policy, optimizer=optax.sgd(0.1), batch_size=128, record_every=1)
  run = trainer.run(train, {}, [3], epochs=1)
  positions, used = run.recording.positions[0], run.recording.weights[0]
  task = trainer.task
  with jax.enable_x64():
    params = jax.tree.map(lambda x: np.asarray(x[0, 0], np.float64), run.recording.checkpoints)
    step = jax.jit(lambda p, b: jax.tree.map(lambda q, g: q - 0.1 * g, p, jax.grad(
        lambda p: jnp.mean(task.per_example_loss(p, b)))(p)))  # one program, not op by op
    kept_total = 0
    for t in range(10):
      real = positions[t][:min(128, len(train) - 128 * t)]  # padding comes last
      batch = train.take(real)
      scores = batch['image'].reshape(len(real), -1).astype(np.float64) @ v
      kept = real[np.argsort(-scores, kind='stable')[:max(1, len(real) // 2)]]
      assert sorted(kept) == sorted(positions[t][used[t] > 0]), t
      kept_total += len(kept)
      params = step(params, _as_float64(train.take(kept)))
  assert kept_total == 9 * 64 + 22 == run.example_gradients
  for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


def test_a_batch_filter_step_costs_its_kept_rows_gradients_and_the_scoring():
  """The step of a policy that keeps at most N = floor((1 - rho) B) rows (`Policy.kept_rows`)
  runs the task on those N only: its XLA flops are at most uniform's step less rho of its task
  gradient work (forward and backward over B rows), plus the scoring forward over B (and O(B)
  bookkeeping). Computing every row, as a weight-0 filter would, costs uniform's step plus the
  scoring."""
  from tests.tiny import tiny_info  # pylint: disable=g-import-not-at-top
  info, b, rho = tiny_info(dim=64), 128, 0.5
  task = _task(info, hidden=(64,))
  rater = tasks.make_rater(ml_collections.ConfigDict(
      {'name': 'mlp_rater', 'hidden': (16,), 'activation': 'relu'}), info)
  rater_params = rater.init(jax.random.key(1))
  data = {'image': jnp.zeros((512, 64), jnp.float32), 'label': jnp.zeros(512, jnp.int32)}
  model = trainer_lib.init_inner_state(task.init(jax.random.key(0)), optax.adam(1e-2))
  rows = jnp.zeros((1, b), jnp.int32), jnp.ones((1, b), jnp.float32)
  flops = lambda f, *args: jax.jit(f).lower(*args).compile().cost_analysis()['flops']

  def step_flops(policy):
    trainer = Trainer(task, optax.adam(1e-2), policy, b)
    one = functools.partial(trainer._chunk_one, read=False)
    return flops(one, model, policy.init(512, jax.random.key(0)), policy.aux, data, *rows,
                 np.int32(0), np.int32(1), jnp.zeros(()))
  uniform = step_flops(weighting.weighting_policy('uniform', 512))
  filtered = step_flops(filtering.batch_filter(rater.score, rater_params, rho, 512))
  batch = {k: v[:b] for k, v in data.items()}
  task_work = flops(jax.grad(lambda p, x: jnp.mean(task.per_example_loss(p, x))), model.params,
                    batch)
  scoring = flops(rater.score, rater_params, batch)
  bookkeeping = 32 * b  # ranking the scores, choosing and gathering the rows: O(B) flops
  assert filtered <= uniform - rho * task_work + scoring + bookkeeping, (
      filtered, uniform, task_work, scoring)
