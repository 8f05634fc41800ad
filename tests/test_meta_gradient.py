"""d(outer loss)/d(phi) through T unrolled inner steps equals central finite differences (float64)."""
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from inner_loop.unroll import InnerState
from outer_loop import meta_step, setup
from outer_loop.batches import MetaBatches
from tests.run_config import small_config
from tests.tiny import as_float64, estimator, tiny_batches, tiny_problem


def _fd_check(name, optimizer, steps, **kw):
  lr = 0.3 if optimizer == 'sgd' else 0.05
  problem = tiny_problem(optimizer=optimizer, lr=lr)
  est = estimator(name, optimizer, lr, **kw)
  inner, outer = jax.tree.map(jnp.asarray, tiny_batches(0, population=2, steps=steps, batch=8,
                                                        dtype=np.float64))
  state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2))
  flat_phi, unravel = ravel_pytree(state.rater_params)
  assert flat_phi.dtype == jnp.float64
  (_, _), grads = jax.jit(lambda phi: meta_step.meta_gradient(
      problem, est, phi, state.population, inner, outer))(state.rater_params)
  analytic = ravel_pytree(grads)[0]
  loss_of = jax.jit(lambda flat: meta_step.outer_loss(
      problem, est, unravel(flat), state.population, inner, outer)[0])
  eps = 1e-6
  # Jitted: eagerly, each batched op around the loss compiled a program of its own.
  numeric = jax.jit(lambda flat: jax.vmap(lambda e: (loss_of(flat + eps * e)
                                                     - loss_of(flat - eps * e)) / (2 * eps))(
                                                         jnp.eye(flat.size, dtype=flat.dtype)))(
                                                             flat_phi)
  assert float(jnp.linalg.norm(analytic)) > 1e-6  # the weights really change the outcome
  rel = float(jnp.linalg.norm(analytic - numeric) / jnp.linalg.norm(numeric))
  assert rel < 1e-5, rel


# Reverse mode through Adam steps: the fast suite's finite-difference check of it is
# test_advance_steps_train_outside_the_meta_gradient (Adam, T = 2 after 3 advance steps).
@pytest.mark.parametrize('optimizer,steps', [pytest.param('sgd', 1, marks=pytest.mark.slow),
                                             ('sgd', 3),
                                             pytest.param('adam', 3, marks=pytest.mark.slow)])
def test_reverse_meta_gradient_matches_finite_differences(optimizer, steps):
  with jax.enable_x64():
    _fd_check('reverse', optimizer, steps)


# SGD's replayed mixed mode: in the fast suite, reverse mode's finite differences (SGD, T = 3)
# and test_meta_modes.py::test_estimators_agree (mixed replay = reverse, SGD, T = 4).
@pytest.mark.parametrize('optimizer,steps', [pytest.param('sgd', 3, marks=pytest.mark.slow),
                                             ('adam', 6)])
def test_mixed_meta_gradient_matches_finite_differences(optimizer, steps):
  """SGD, T = 3: replay splits it into a 1-step head and one 2-step segment. Adam, T = 6: its
  first 4 steps are replayed from the exact input state, the last 2 undone by its inverse."""
  from outer_loop import mixed_mode  # pylint: disable=g-import-not-at-top
  if optimizer == 'adam':
    plan = mixed_mode.make_plan(steps, 'invert', 0, estimator('mixed', 'adam').inverse.exact_steps)
    assert plan.head == 4 and plan.part + plan.segment * plan.count == 2  # 2 steps undone
  with jax.enable_x64():
    _fd_check('mixed', optimizer, steps)


def _jitted_outer_step(problem, est):
  """outer_step jitted with the batches as arguments (not constants): tests of equal problems and
  shapes run one program, compiled once (the session's compilation cache)."""
  return jax.jit(lambda s, inner, outer: meta_step.outer_step(problem, est, s, inner, outer))


def test_outer_step_uses_the_meta_gradient():
  """The outer step's logged meta-gradient norm is the norm of d outer / d phi after resets."""
  problem, est = tiny_problem(), estimator()
  inner, outer = tiny_batches(1, population=2, steps=2, batch=8)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2)
  (_, _), grads = jax.jit(lambda s: meta_step.meta_gradient(
      problem, est, s.rater_params, s.population, inner, outer))(state)
  new_state, metrics = _jitted_outer_step(problem, est)(state, inner, outer)
  np.testing.assert_allclose(metrics['meta_grad_norm'],
                             jnp.linalg.norm(ravel_pytree(grads)[0]), rtol=1e-5)
  assert int(new_state.step) == 1
  # The first step of Adam (lr 1e-2) after clipping to norm 1, by hand: bias correction leaves
  # g / (|g| + eps) per coordinate, a step down the meta-gradient.
  g = np.asarray(ravel_pytree(grads)[0], np.float64)
  g = g * min(1.0, 1.0 / np.linalg.norm(g))
  moved = ravel_pytree(new_state.rater_params)[0] - ravel_pytree(state.rater_params)[0]
  np.testing.assert_allclose(moved, -1e-2 * g / (np.abs(g) + 1e-8), rtol=1e-4, atol=1e-9)


def _kish(problem, rater_params, inner, step):
  """Oracle: mean over members of Kish's ESS (sum w)^2 / (B sum w^2) of the weights
  exp(score / tau) (numpy, float64) on each member's batch `step` of `inner` [K, T, B, ...]."""
  out = []
  for member in range(jax.tree.leaves(inner)[0].shape[0]):
    batch = jax.tree.map(lambda x, m=member: x[m, step], inner)
    s = np.asarray(problem.rater.score(rater_params, batch), np.float64) / problem.temperature
    w = np.exp(s - s.max())
    out.append(w.sum() ** 2 / (len(w) * (w ** 2).sum()))
  return np.mean(out)


# (0.01, 0): a sharp softmax without advance steps, another outer step compiled for the same
# check as (0.7, 2).
@pytest.mark.parametrize('temperature,advance', [
    (0.7, 2), pytest.param(0.01, 0, marks=pytest.mark.slow)])
def test_weight_ess_is_the_kish_effective_sample_size(temperature, advance):
  """The logged `weight_ess` is Kish's (sum w)^2 / (B sum w^2) of each member's weights on its
  first unrolled batch (numpy, float64, from the raw scores; the formula is scale-free), mean
  over members; toward 1/B as the softmax sharpens. With A advance steps the first unrolled
  batch is batch A, not the first advance step's batch 0."""
  problem = dataclasses.replace(tiny_problem(), temperature=temperature, advance_steps=advance)
  inner, outer = tiny_batches(4, population=2, steps=advance + 2, batch=8)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(5), 2)
  _, metrics = _jitted_outer_step(problem, estimator())(state, inner, outer)
  kish = lambda step: _kish(problem, state.rater_params, inner, step)
  np.testing.assert_allclose(float(metrics['weight_ess']), kish(advance), rtol=1e-4)
  if advance:
    assert abs(kish(0) - kish(advance)) > 1e-3  # another batch's ESS would show
  assert 1 / 8 <= float(metrics['weight_ess']) <= 1 + 1e-6
  if temperature == 0.01:
    assert float(metrics['weight_ess']) < 0.5  # the check can tell a sharp softmax apart


@pytest.mark.slow  # ~10 s a case: two compiles of the whole outer step
@pytest.mark.parametrize('name', ['reverse', 'mixed'])
def test_weight_ess_takes_no_rater_forward_of_its_own(name):
  """`weight_ess` comes from the weights the unroll computes anyway: by XLA's flop count, the
  compiled outer step costs less than one rater scoring of one batch more than the same step
  without it (the rater made the bulk of a scoring: 32 inputs), every other output is that
  step's, and it is still Kish's ESS of the first unrolled batches (float64 oracle)."""
  problem = tiny_problem(dim=32)
  est = estimator(name)
  inner, outer = tiny_batches(6, population=2, steps=2, batch=8, dim=32)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(2), 2)
  full = lambda s, i, o: meta_step.outer_step(problem, est, s, i, o)

  def without_ess(s, i, o):
    new_state, metrics = full(s, i, o)
    return new_state, {k: v for k, v in metrics.items() if k != 'weight_ess'}
  compiled = {f: jax.jit(f).lower(state, inner, outer).compile() for f in (full, without_ess)}
  flops = {f: c.cost_analysis()['flops'] for f, c in compiled.items()}
  one_batch = jax.tree.map(lambda x: x[0, 0], inner)
  scoring = jax.jit(problem.rater.score).lower(state.rater_params, one_batch).compile()
  assert flops[full] - flops[without_ess] < scoring.cost_analysis()['flops']
  (got_state, got), (want_state, want) = (c(state, inner, outer) for c in compiled.values())
  ess = got.pop('weight_ess')
  assert got.keys() == want.keys()
  # Bit for bit under XLA's default flags; the suite's FAST_COMPILE moves last bits whenever a
  # program's outputs change (the old separate forward's step too).
  for a, b in zip(*(jax.tree.leaves(x) for x in ((got_state, got), (want_state, want)))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(ess), _kish(problem, state.rater_params, inner, 0), rtol=1e-5)


def _advanced_by_hand(problem, state, inner, a):
  """Oracle: A optax steps per member of `state.population` on mean(w * loss), w = B
  softmax(score / tau) of `state.rater_params`, in a loop over members and steps."""
  opt, k = problem.inner_optimizer, jax.tree.leaves(inner)[0].shape[0]
  members = []
  for m in range(k):
    params = jax.tree.map(lambda x, m=m: x[m], state.population.params)
    opt_state = opt.init(params)
    for s in range(a):
      batch = jax.tree.map(lambda x, m=m, s=s: x[m, s], inner)
      scores = problem.rater.score(state.rater_params, batch)
      w = batch['label'].shape[0] * jax.nn.softmax(scores / problem.temperature)
      grads = jax.grad(lambda p, w=w, batch=batch: jnp.mean(
          w * problem.task.per_example_loss(p, batch)))(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    members.append(InnerState(params, opt_state))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def _seen_by_meta_gradient(problem, est, state, inner, outer):
  """What outer_step hands to meta_gradient, and the gradient it gets back (traced)."""
  seen, original = {}, meta_step.meta_gradient
  def spy(problem_, est_, phi, population, inner_, outer_):
    out = original(problem_, est_, phi, population, inner_, outer_)
    seen.update(population=population, inner=inner_, grads=out[1])
    return out
  with mock.patch.object(meta_step, 'meta_gradient', spy):
    meta_step.outer_step(problem, est, state, inner, outer)
  return seen


def test_outer_step_logs_the_losses_of_the_unroll():
  """The logged `inner_loss` is the mean over members and the T unrolled steps of each step's
  weighted loss mean(w * l) before the step, and `outer_loss` the mean over members of the
  held-out loss after the T steps: SGD by hand in a loop over members and steps (float64)."""
  problem, est = tiny_problem(), estimator()
  with jax.enable_x64():
    inner, outer = jax.tree.map(jnp.asarray, tiny_batches(1, population=2, steps=3, batch=8,
                                                          dtype=np.float64))
    state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2))
    _, metrics = jax.jit(lambda s: meta_step.outer_step(problem, est, s, inner, outer))(state)

    def by_hand(state):  # traced as one program (op by op it compiled ~100 small ones)
      step_losses, held_out = [], []
      for m in range(2):
        params = jax.tree.map(lambda x, m=m: x[m], state.population.params)
        for s in range(3):
          batch = jax.tree.map(lambda x, m=m, s=s: x[m, s], inner)
          w = 8 * jax.nn.softmax(problem.rater.score(state.rater_params, batch)
                                 / problem.temperature)
          loss = lambda p, w=w, batch=batch: jnp.mean(w * problem.task.per_example_loss(p, batch))
          step_losses.append(loss(params))
          params = jax.tree.map(lambda a, g: a - 0.1 * g, params, jax.grad(loss)(params))
        held_out.append(jnp.mean(problem.task.per_example_loss(
            params, jax.tree.map(lambda x, m=m: x[m], outer))))
      return jnp.stack(step_losses), jnp.stack(held_out)
    step_losses, held_out = (np.asarray(x) for x in jax.jit(by_hand)(state))
  assert np.ptp(step_losses) > 1e-3  # the steps' losses differ: a mean of some would show
  np.testing.assert_allclose(float(metrics['inner_loss']), np.mean(step_losses), rtol=1e-9)
  np.testing.assert_allclose(float(metrics['outer_loss']), np.mean(held_out), rtol=1e-9)


def test_advance_steps_train_outside_the_meta_gradient():
  """With A advance steps the members first take A weighted Adam steps (phi fixed), and the
  meta-gradient is that of the T-step problem from the advanced members (finite differences)."""
  a, t, k = 3, 2, 2
  problem = dataclasses.replace(tiny_problem(optimizer='adam', lr=0.05, reset_every=100),
                                advance_steps=a)
  est = estimator('reverse', 'adam', 0.05)
  with jax.enable_x64():
    inner, outer = jax.tree.map(jnp.asarray, tiny_batches(2, population=k, steps=a + t, batch=8,
                                                          dtype=np.float64))
    state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(3), k))
    advanced = jax.jit(lambda state, inner: _advanced_by_hand(problem, state, inner, a))(
        state, inner)

    seen = jax.jit(lambda state, inner: _seen_by_meta_gradient(problem, est, state, inner,
                                                               outer))(state, inner)
    for got, want in zip(jax.tree.leaves(seen['population']), jax.tree.leaves(advanced)):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(seen['inner']['image'], inner['image'][:, a:])

    tail = jax.tree.map(lambda x: x[:, a:], inner)
    flat_phi, unravel = ravel_pytree(state.rater_params)
    loss_of = jax.jit(lambda flat: meta_step.outer_loss(problem, est, unravel(flat), advanced,
                                                        tail, outer)[0])
    eps = 1e-6
    numeric = jax.jit(lambda flat: jax.vmap(lambda e: (loss_of(flat + eps * e)  # one program
                                                       - loss_of(flat - eps * e)) / (2 * eps))(
                                                           jnp.eye(flat.size, dtype=flat.dtype)))(
                                                               flat_phi)
    analytic = ravel_pytree(seen['grads'])[0]
    assert float(jnp.linalg.norm(analytic)) > 1e-6
    assert float(jnp.linalg.norm(analytic - numeric) / jnp.linalg.norm(numeric)) < 1e-5


def test_members_due_for_a_reset_reach_the_meta_gradient_fresh():
  """At an outer step where some members are due (K=4, R=2, step 1: offsets k*R//K = 0,0,1,1, so
  (1 + offset) % 2 == 0 for members 2 and 3), the population the meta-gradient differentiates
  through has those members re-initialised from fold_in(key, step) (member k from the k-th of K
  split keys, population.py's documented rule), Adam state included, and the others
  bit-identical to before (their Adam states made non-fresh: count, moments + 1)."""
  k, due = 4, (2, 3)
  problem = tiny_problem(optimizer='adam', lr=0.05, reset_every=2)
  est = estimator('reverse', 'adam', 0.05)
  inner, outer = tiny_batches(6, population=k, steps=1, batch=4)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(2), k)
  used = jax.tree.map(lambda x: np.asarray(x) + 1, state.population.opt_state)  # numpy, no jit
  state = state.replace(step=jnp.int32(1), population=state.population.replace(opt_state=used))

  seen = jax.jit(lambda state: _seen_by_meta_gradient(problem, est, state, inner, outer)[
      'population'])(state)
  keys = jax.random.split(jax.random.fold_in(state.key, 1), k)
  member = lambda tree, m: jax.tree.map(lambda x: np.asarray(x)[m], tree)  # sliced in numpy
  init_member = jax.jit(problem.init_member)  # one program (op by op: a compile per operation)
  for m in range(k):
    got = member(seen, m)
    if m in due:
      want = jax.device_get(init_member(keys[m]))
      old = ravel_pytree(member(state.population, m).params)[0]
      assert not np.allclose(ravel_pytree(want.params)[0], old)  # a reset is visible
      jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)
    else:
      jax.tree.map(np.testing.assert_array_equal, got, member(state.population, m))


def test_advance_steps_of_a_config_reach_the_problem_the_batches_and_the_step(tfds_dir):
  """inner.advance_steps=2 in a config (the small digits run, T=1): build_problem's problem
  advances A=2, MetaBatches' inner batches hold A + T steps, and the outer step takes the first A
  outside the meta-gradient: it differentiates through the last T from the members advanced by
  A weighted Adam steps (computed by hand in a loop, _advanced_by_hand)."""
  config = small_config(tfds_dir)
  a = 2
  config.inner.advance_steps, config.inner.steps = a, 1
  data = MetaBatches(config)
  problem, est = setup.build_problem(config, data.info)
  assert problem.advance_steps == a
  inner, outer = data.host_batches_at(0)
  k, t, b = config.inner.population, config.inner.steps, config.inner.batch_size
  assert inner['image'].shape[:3] == (k, a + t, b) and inner['label'].shape == (k, a + t, b)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(config.seed), k)
  seen = jax.jit(lambda state, inner, outer: _seen_by_meta_gradient(problem, est, state, inner,
                                                                    outer))(state, inner, outer)
  np.testing.assert_array_equal(seen['inner']['image'], inner['image'][:, a:])
  advanced = jax.jit(lambda state, inner: _advanced_by_hand(problem, state, inner, a))(
      state, inner)
  moved = ravel_pytree(advanced.params)[0] - ravel_pytree(state.population.params)[0]
  assert float(jnp.max(jnp.abs(moved))) > 1e-4  # the A steps moved the members
  for got, want in zip(jax.tree.leaves(seen['population']), jax.tree.leaves(advanced)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_outer_loss_and_meta_gradient_are_the_mean_over_members():
  """With K = 3 different members, the outer loss and d outer / d phi equal the hand mean of the
  three one-member problems (each member's own slice of the population and batches)."""
  problem, est = tiny_problem(), estimator()
  inner, outer = jax.tree.map(jnp.asarray, tiny_batches(2, population=3, steps=2, batch=8))
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 3)
  run = jax.jit(lambda pop, i, o: meta_step.meta_gradient(problem, est, state.rater_params,
                                                          pop, i, o))
  (loss, _), grads = run(state.population, inner, outer)
  members = jax.tree.map(np.asarray, (state.population, inner, outer))  # sliced in numpy
  singles = [run(*jax.tree.map(lambda x, k=k: x[k:k + 1], members)) for k in range(3)]
  losses = np.array([float(s[0][0]) for s in singles], np.float64)
  assert np.ptp(losses) > 1e-4  # the members differ
  np.testing.assert_allclose(float(loss), losses.sum() / 3, rtol=1e-5)
  member_grads = np.stack([np.asarray(ravel_pytree(s[1])[0], np.float64) for s in singles])
  np.testing.assert_allclose(ravel_pytree(grads)[0], member_grads.sum(0) / 3, rtol=1e-4,
                             atol=1e-7)



def _adam_by_hand(lr):
  """Adam as Kingma & Ba write it (b1 0.9, b2 0.999, eps 1e-8), with inner_loop.optimizers'
  documented eps_root 1e-12 under the square root: (init, step(params, grads, state))."""
  def init(params):  # numpy: no op compiled eagerly
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
    return np.zeros((), np.int32), zeros, zeros

  def step(params, grads, state):
    t, m, v = state
    t += 1
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
    v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
    new = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - 0.9 ** t)) / (
        jnp.sqrt(v / (1 - 0.999 ** t) + 1e-12) + 1e-8), params, m, v)
    return new, (t, m, v)
  return init, step


@pytest.mark.slow
def test_outer_steps_follow_the_bilevel_definition_by_brute_force():
  """Two outer steps (K=2 members, reset every R=2 steps, A=1 advance and T=2 unrolled Adam
  steps; at step 1 member 1 is reset, member 0 carries on) against a float64 brute force of the
  definitions: each member, reset at step s > 0 when (s + k R // K) % R == 0 (params from the
  k-th of K keys split from fold_in(key, s), a fresh Adam state), else carrying its parameters
  and Adam state from the last outer step, takes A + T hand-written Adam steps on
  sum_i softmax(score / tau)_i l_i; the outer loss is the mean over members of the mean
  held-out loss; the meta-gradient, by central differences of it in phi with the A advance
  steps' weights held at phi, is what the outer optimizer applies."""
  k, r, a, t, lr = 2, 2, 1, 2, 0.05
  problem = dataclasses.replace(tiny_problem(optimizer='adam', lr=lr, reset_every=r),
                                advance_steps=a)
  init, adam_step = _adam_by_hand(lr)
  task, rater = problem.task, problem.rater

  def member_loss(phi, phi_held, params, opt_state, inner, outer):
    for s in range(a + t):
      batch = jax.tree.map(lambda x, s=s: x[s], inner)
      scores = rater.score(phi if s >= a else phi_held, batch) / problem.temperature
      w = jnp.exp(scores) / jnp.sum(jnp.exp(scores))  # the batch softmax
      grads = jax.grad(lambda p, w=w, batch=batch: jnp.sum(w * task.per_example_loss(p, batch)))(
          params)
      params, opt_state = adam_step(params, grads, opt_state)
    return jnp.mean(task.per_example_loss(params, outer)), (params, opt_state)

  with jax.enable_x64():
    state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), k))
    unravel = ravel_pytree(state.rater_params)[1]

    @jax.jit
    def by_hand(phi, opt_state, members, inner, outer):
      """(outer loss, members after the step, central differences, the rater after the step);
      `members`: (params, Adam state) with a leading [K] axis."""
      def loss(flat_phi, flat_held):
        held_out, members_after = jax.vmap(
            lambda p, s, i, o: member_loss(unravel(flat_phi), unravel(flat_held), p, s, i, o))(
                *members, inner, outer)
        return jnp.mean(held_out), members_after
      flat_phi, eps = ravel_pytree(phi)[0], 1e-6
      numeric = jax.vmap(lambda e: (loss(flat_phi + eps * e, flat_phi)[0]
                                    - loss(flat_phi - eps * e, flat_phi)[0]) / (2 * eps))(
                                        jnp.eye(flat_phi.size, dtype=flat_phi.dtype))
      updates, _ = problem.outer_optimizer.update(unravel(numeric), opt_state, phi)
      return (*loss(flat_phi, flat_phi), numeric,
              ravel_pytree(optax.apply_updates(phi, updates))[0])

    stack = lambda trees: jax.tree.map(lambda *x: np.stack(x), *trees)  # numpy: nothing compiled
    member = lambda tree, m: jax.tree.map(lambda x: np.asarray(x)[m], tree)
    members = [(p, init(p)) for p in (member(state.population.params, m) for m in range(k))]
    step_fn = _jitted_outer_step(problem, estimator('reverse', 'adam', lr))
    for step in range(2):
      inner, outer = tiny_batches(10 + step, k, a + t, 8, dtype=np.float64)
      keys = jax.random.split(jax.random.fold_in(state.key, step), k)
      for m in range(k):
        if step and (step + m * r // k) % r == 0:
          fresh = as_float64(task.init(keys[m]))
          members[m] = (fresh, init(fresh))
      loss, after, numeric, phi = by_hand(state.rater_params, state.opt_state, stack(members),
                                          inner, outer)
      members = [member(after, m) for m in range(k)]
      state, metrics = step_fn(state, inner, outer)
      np.testing.assert_allclose(float(metrics['outer_loss']), float(loss), rtol=1e-12)
      for got, want in zip(jax.tree.leaves(state.population.params), jax.tree.leaves(after[0])):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
      np.testing.assert_allclose(float(metrics['meta_grad_norm']),
                                 np.linalg.norm(numeric), rtol=1e-6)
      np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in jax.tree.leaves(
          state.rater_params)]), phi, rtol=1e-6, atol=1e-9)
    assert np.asarray(state.population.opt_state[0].count).tolist() == [6, 3]  # 1 was reset
