"""The outer step on 4 devices (population and/or batch split) equals the 1-device step."""
import dataclasses

import jax
import numpy as np
import pytest

from outer_loop import meta_step, sharding
from tests.tiny import tiny_batches, tiny_problem


def _run(problem, rater, devices, population, steps=2, unroll=2):
  inner, outer = tiny_batches(3, population=population, steps=unroll, batch=16)
  example = jax.tree.map(lambda x: x[0, 0], inner)
  init = lambda: meta_step.init_outer_state(problem, rater.init(jax.random.PRNGKey(1), example),
                                            jax.random.PRNGKey(2), population)
  mesh = sharding.make_mesh(population, devices)
  step_fn, state_sh, inner_sh, outer_sh = sharding.jit_outer_step(
      problem, mesh, jax.eval_shape(init), inner, outer)
  state = jax.jit(init, out_shardings=state_sh)()
  for _ in range(steps):
    state, metrics = step_fn(state, sharding.put_global(inner, inner_sh),
                             sharding.put_global(outer, outer_sh))
  return mesh, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize('population,meta_gradient,unroll',
                         [(4, 'reverse', 2), (2, 'reverse', 2), (1, 'reverse', 2),  # mesh (4,1),
                          (2, 'mixed', 9)])  # (2,2), (1,4); mixed T=9: undone, replayed ends
def test_four_devices_equal_one(population, meta_gradient, unroll):
  assert jax.device_count() >= 4, 'tests/conftest.py sets 4 fake CPU devices'
  problem, _, rater = tiny_problem(optimizer='adam', lr=0.05, reset_every=2,
                                   meta_gradient=meta_gradient)
  if meta_gradient == 'mixed':
    problem = dataclasses.replace(problem, mixed_segment=2)  # 4 replayed, 1 + 2 x 2 undone
  _, one_state, one_metrics = _run(problem, rater, jax.devices()[:1], population, unroll=unroll)
  mesh, four_state, four_metrics = _run(problem, rater, jax.devices()[:4], population,
                                        unroll=unroll)
  assert mesh.devices.size == 4 and mesh.shape['population'] == population
  for a, b in zip(jax.tree.leaves(one_state), jax.tree.leaves(four_state)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for k in one_metrics:
    np.testing.assert_allclose(one_metrics[k], four_metrics[k], rtol=2e-5)
  # The steps really moved the rater (the comparison is not of two untouched inits).
  assert one_metrics['meta_grad_norm'] > 0


def test_batch_must_divide_over_devices():
  mesh = sharding.make_mesh(1, jax.devices()[:4])
  from datarater.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match='inner.batch_size=6 does not divide over 4 devices'):
    sharding.check_batch_sizes(mesh, **{'inner.batch_size': 6})
