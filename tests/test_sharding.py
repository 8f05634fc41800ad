"""The outer step on 4 devices (population and/or batch split) equals the 1-device step."""
import dataclasses

import jax
import numpy as np
import pytest

from datarater.errors import UserError
from datarater.mesh import check_batch_sizes, make_mesh
from outer_loop import meta_step, sharding
from tests.tiny import estimator, tiny_batches, tiny_problem


def _put(tree, shardings):
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: x[i]),
                      tree, shardings)


def _run(problem, est, devices, population, steps=2, unroll=2, diverged=None):
  """(mesh, state, last metrics) after `steps` outer steps; member `diverged` (if any) starts
  with NaN parameters."""
  inner, outer = tiny_batches(3, population=population, steps=problem.advance_steps + unroll,
                              batch=16)
  init = lambda: meta_step.init_outer_state(problem, jax.random.PRNGKey(1), population)
  mesh = make_mesh(population, devices)
  step_fn, state_sh, inner_sh, outer_sh = sharding.jit_outer_step(
      problem, est, mesh, jax.eval_shape(init), inner, outer)
  state = jax.jit(init, out_shardings=state_sh)()
  if diverged is not None:
    params = jax.tree.map(lambda x: np.asarray(x).copy(), state.population.params)
    for leaf in jax.tree.leaves(params):
      leaf[diverged] = np.nan
    state = state.replace(population=state.population.replace(params=_put(
        params, state_sh.population.params)))
  for _ in range(steps):
    state, metrics = step_fn(state, _put(inner, inner_sh), _put(outer, outer_sh))
  return mesh, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize('population,meta_gradient,unroll,advance',
                         [pytest.param(4, 'reverse', 2, 0, marks=pytest.mark.slow),  # mesh (4, 1)
                          pytest.param(1, 'reverse', 2, 0, marks=pytest.mark.slow),  # (1, 4)
                          (2, 'reverse', 2, 3),  # mesh (2, 2), 3 advance steps
                          pytest.param(2, 'mixed', 9, 0, marks=pytest.mark.slow)])  # (2, 2); mixed T = 9: 4 replayed, 1 + 2 x 2 undone
def test_four_devices_equal_one(population, meta_gradient, unroll, advance):
  """(CI runs the (2, 2) case: it shards the population and the batch at once.)"""
  assert jax.device_count() >= 4, 'tests/conftest.py sets 4 fake CPU devices'
  problem = dataclasses.replace(tiny_problem(optimizer='adam', lr=0.05, reset_every=2),
                                advance_steps=advance)
  est = estimator(meta_gradient, 'adam', 0.05, segment=2)
  _, one_state, one_metrics = _run(problem, est, jax.devices()[:1], population, unroll=unroll)
  mesh, four_state, four_metrics = _run(problem, est, jax.devices()[:4], population,
                                        unroll=unroll)
  assert mesh.devices.size == 4 and mesh.shape['population'] == population
  for a, b in zip(jax.tree.leaves(one_state), jax.tree.leaves(four_state)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for k in one_metrics:
    np.testing.assert_allclose(one_metrics[k], four_metrics[k], rtol=2e-5)
  # The steps really moved the rater (the comparison is not of two untouched inits).
  assert one_metrics['meta_grad_norm'] > 0


@pytest.mark.slow  # (the CI case above shards the population; this adds a diverged member)
def test_a_member_diverged_on_four_devices_is_reset_as_on_one():
  """A member whose parameters are NaN makes the step skipped and is drawn afresh (under a
  `lax.cond` whose predicate reduces over the sharded population): on a (2, 2) mesh as on one
  device, the same state and counts after the step."""
  problem = tiny_problem(optimizer='adam', lr=0.05, reset_every=100)
  est = estimator('reverse', 'adam', 0.05)
  _, one_state, one_metrics = _run(problem, est, jax.devices()[:1], 2, steps=1, diverged=1)
  mesh, four_state, four_metrics = _run(problem, est, jax.devices()[:4], 2, steps=1, diverged=1)
  assert mesh.shape == {'population': 2, 'batch': 2}
  assert one_metrics['diverged_members'] == four_metrics['diverged_members'] == 1
  assert one_metrics['skipped_steps'] == four_metrics['skipped_steps'] == 1
  for a, b in zip(jax.tree.leaves(one_state), jax.tree.leaves(four_state)):
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_batch_must_divide_over_devices():
  mesh = make_mesh(1, jax.devices()[:4])
  with pytest.raises(UserError, match='inner.batch_size=6 does not divide over 4 devices'):
    check_batch_sizes(mesh, **{'inner.batch_size': 6})


def _record_memory(monkeypatch, names) -> dict:
  """From here on, each program `jax.jit` makes of a function named in `names` is compiled
  before it runs, and its name maps to its bytes on one device (XLA's memory analysis of the
  program compiled for its devices: arguments + outputs + temporaries)."""
  real_jit, seen = jax.jit, {}

  def jit(fn, *args, **kwargs):
    jitted = real_jit(fn, *args, **kwargs)
    name = getattr(fn, '__name__', '')
    if name not in names:
      return jitted

    def call(*inputs):
      compiled = jitted.lower(*inputs).compile()
      m = compiled.memory_analysis()
      seen[name] = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
      return compiled(*inputs)
    return call
  monkeypatch.setattr(jax, 'jit', jit)
  return seen


@pytest.mark.parametrize('launcher', ['train_rater', 'train'])
def test_start_up_checks_need_no_more_memory_on_a_device_than_its_share_of_the_run(
    launcher, tfds_dir, tmp_path, monkeypatch):
  """The launchers' start-up checks (initial parameters, initial losses, the rater's per-example
  scores) ran every model on every example of its batches on one device, where the run splits
  the models and the batches over the mesh: a model that fits the run could run out of memory
  there. Now, with 2 models of batches of 16 on 4 devices (mesh 2 x 2), each check needs no more
  memory on a device than with 1 model of batches of 8 on 1 device: one device's share."""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  from datarater.train import train  # pylint: disable=g-import-not-at-top
  from tests.run_config import small_config  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir)
  config.train.epochs = 1
  stop = tmp_path / 'file'  # a --workdir that is a file: refused right after the checks
  stop.write_text('')
  names = {'start_state', 'losses_of', 'rows'} if launcher == 'train_rater' else {'losses_of'}

  def checks_memory(models, devices, batch_size):
    seen = _record_memory(monkeypatch, names)
    with pytest.raises(UserError, match='exists and is not a folder'):
      if launcher == 'train_rater':
        config.inner.population = models
        config.inner.batch_size = config.outer.batch_size = batch_size
        meta_train_lib.meta_train(config, str(stop), devices=jax.devices()[:devices])
      else:  # (a training run takes every device of its process)
        monkeypatch.setattr(jax, 'local_devices', lambda: jax.devices()[:devices])
        config.train.seeds, config.train.batch_size = tuple(range(models)), batch_size
        train(config, 'uniform', workdir=str(stop), log=lambda _: None)
    monkeypatch.undo()
    assert set(seen) == names, seen  # (every check was compiled and measured)
    return seen

  share, four = checks_memory(1, 1, 8), checks_memory(2, 4, 16)
  for name in names:
    assert four[name] <= 1.1 * share[name] + 1024, (name, four[name], share[name])
