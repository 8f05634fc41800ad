"""A meta-gradient estimator of one's own, with a setting of its own, is one module: registered
from outside the package (`estimators.register_estimator`), its `outer` field checked, at its
default where a config lacks it, refused under another estimator, and its meta-gradient that of
its definition (here truncated backpropagation through the last k of T inner steps)."""
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from configs.digits import get_config
from datarater import checkpointing
from datarater.errors import UserError
from outer_loop import estimators, meta_step
from tests.tiny import as_float64, estimator, tiny_batches, tiny_problem

NAME = 'truncated_for_test'
_OWN_ESTIMATOR = f'''
import dataclasses

import jax
import jax.numpy as jnp

from datarater.config_checks import default, integer
from datarater.errors import UserError
from inner_loop.unroll import unroll
from outer_loop import estimators


@dataclasses.dataclass(frozen=True)
class Truncated:
  last: int  # the inner steps backpropagated through; the earlier ones see phi held fixed

  def unroll(self, problem, phi, state, batches):
    steps = jax.tree.leaves(batches)[0].shape[0]
    part = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], batches)
    run = lambda p, s, b: unroll(problem.task.per_example_loss, problem.inner_optimizer,
                                 lambda batch: problem.weights(p, batch), s, b)
    state, head = run(jax.lax.stop_gradient(phi), state, part(0, steps - self.last))
    state, tail = run(phi, state, part(steps - self.last, steps))
    return state, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, tail)


@estimators.register_estimator({NAME!r}, schema={{'truncate_last': default(integer(1), 1)}})
def make(outer, inner, params):
  if outer.truncate_last > inner.steps:
    raise UserError(f'outer.truncate_last={{outer.truncate_last}} is more than '
                    f'inner.steps={{inner.steps}}')
  return Truncated(outer.truncate_last)
'''


@pytest.fixture
def own_estimator(tmp_path, tfds_dir, monkeypatch):
  """The truncated estimator, registered by a module outside the package that a config file
  imports: (that module, the config file)."""
  (tmp_path / 'own_estimator_for_test.py').write_text(_OWN_ESTIMATOR)
  (tmp_path / 'own_estimator_config.py').write_text(
      'import own_estimator_for_test\nfrom tests.run_config import small_config\n\n'
      f'def get_config():\n  c = small_config({tfds_dir!r}, steps=2)\n'
      f'  c.outer.meta_gradient = {NAME!r}\n  return c\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  yield importlib.import_module('own_estimator_for_test'), str(tmp_path / 'own_estimator_config.py')
  for table in (estimators.META_GRADIENTS, estimators.SCHEMAS):
    table.pop(NAME)
  sys.modules.pop('own_estimator_for_test')


@pytest.mark.slow
def test_an_estimator_of_ones_own_is_the_gradient_of_its_definition(own_estimator):
  """float64: its meta-gradient is the finite-difference gradient of the outer loss after the
  first T - k steps taken at a fixed phi0 (meta_step.advance) and the last k at phi, not the
  full meta-gradient; a k over T is refused in one line."""
  module, _ = own_estimator
  t, last = 3, 2
  with jax.enable_x64():
    problem = tiny_problem(optimizer='adam', lr=0.05)
    inner, outer = jax.tree.map(jnp.asarray, tiny_batches(0, 2, t, 8, dtype=np.float64))
    state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2))
    phi0, population = state.rater_params, state.population
    grad = lambda est: ravel_pytree(jax.jit(lambda phi: meta_step.meta_gradient(
        problem, est, phi, population, inner, outer)[1])(phi0))[0]
    est = estimator(NAME, 'adam', 0.05, steps=t, truncate_last=last)
    assert est == module.Truncated(last)
    analytic = grad(est)
    advanced = jax.jit(lambda p: meta_step.advance(
        problem, phi0, p, jax.tree.map(lambda x: x[:, :t - last], inner)))(population)
    flat, unravel = ravel_pytree(phi0)
    loss_of = jax.jit(lambda f: meta_step.outer_loss(
        problem, estimators.Reverse(), unravel(f), advanced,
        jax.tree.map(lambda x: x[:, t - last:], inner), outer)[0])
    eps = 1e-6
    numeric = jax.vmap(lambda e: (loss_of(flat + eps * e) - loss_of(flat - eps * e)) / (2 * eps))(
        jnp.eye(flat.size, dtype=flat.dtype))
    assert float(jnp.linalg.norm(numeric)) > 1e-6
    assert float(jnp.linalg.norm(analytic - numeric) / jnp.linalg.norm(numeric)) < 1e-5
    full = grad(estimators.Reverse())
    assert float(jnp.linalg.norm(analytic - full) / jnp.linalg.norm(full)) > 1e-3  # truncated
  with pytest.raises(UserError, match=r'^outer.truncate_last=4 is more than inner.steps=3$'):
    estimator(NAME, steps=t, truncate_last=4)
  with pytest.raises(UserError, match=r'^outer.truncate_last must be >= 1, got 0$'):
    estimator(NAME, steps=t, truncate_last=0)


def test_an_estimators_own_field_is_declared_in_its_module(own_estimator, capsys, tmp_path):
  """Through launch.train_rater, with no edit of config_checks, configs/digits.py,
  checkpointing.ADDED_FIELDS or tests/tiny.py: a bad value refused in one line, the field
  refused under another estimator, listed by --help only where read; a config without it holds
  its default, and a checkpoint recorded before it existed matches at that default."""
  from launch import cli, train_rater  # pylint: disable=g-import-not-at-top
  module, config_file = own_estimator
  run = lambda *flags: cli.invoke(train_rater, [
      'train_rater', f'--config={config_file}', f'--workdir={tmp_path / "run"}', *flags])
  capsys.readouterr()
  for flags, line in (
      (['--config.outer.truncate_last=0'], 'error: outer.truncate_last must be >= 1, got 0'),
      (['--config.outer.meta_gradient=reverse', '--config.outer.truncate_last=2'],
       "error: --config.outer.truncate_last is not read while outer.meta_gradient='reverse' (a "
       f"setting of meta_gradient={NAME!r}); give --config.outer.meta_gradient={NAME} too"),
      (['--config.outer.mixed_segment=2'],
       f"error: --config.outer.mixed_segment is not read while outer.meta_gradient={NAME!r} (a "
       "setting of meta_gradient='mixed'); give --config.outer.meta_gradient=mixed too")):
    assert run(*flags) == 2, flags
    assert capsys.readouterr().err == line + '\n'
  assert not (tmp_path / 'run').exists()
  for flags, listed in (([], True), (['--config.outer.meta_gradient=reverse'], False)):
    assert run(*flags, '--help') == 0
    assert ('--config.outer.truncate_last=1' in capsys.readouterr().out) == listed, flags
  # A config without the field (a script's, or one recorded before it existed): its default.
  config = get_config()
  assert 'truncate_last' not in config.outer
  filled = estimators.with_defaults(config)
  assert filled.outer.truncate_last == 1 and 'truncate_last' not in config.outer
  config.outer.meta_gradient = NAME
  assert estimators.make_estimator(config.outer, config.inner) == module.Truncated(1)
  older = checkpointing.trajectory_fields(config)
  ours = checkpointing.trajectory_fields(estimators.with_defaults(config))
  assert checkpointing.config_differences(older, ours, added=estimators.defaults()) == []
  assert checkpointing.config_differences(older, ours) == [
      'outer.truncate_last=(not recorded) there, 1 here']


@pytest.mark.slow
def test_an_estimator_of_ones_own_trains_a_rater_through_the_launcher(own_estimator, tmp_path):
  """launch.train_rater runs it for its 2 outer steps, its field set on the command line."""
  from launch import cli, train_rater  # pylint: disable=g-import-not-at-top
  _, config_file = own_estimator
  workdir = tmp_path / 'run'
  assert cli.invoke(train_rater, ['train_rater', f'--config={config_file}',
                                  f'--workdir={workdir}', '--config.outer.truncate_last=2']) == 0
  assert (workdir / 'report.json').exists()
