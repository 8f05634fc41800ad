"""The meta-gradient estimators (reverse, remat, mixed) give the same d(outer)/d(phi); float64.

Mixed mode's custom VJP is also checked against plain reverse mode for every input (rater params
and initial inner state) and every output (final state and the inner losses), with uneven
splits of the unroll and both ways of recovering inner states (optimizer run backwards, replay).
The optimizer inverses are checked alone, against optax, and the outer optimizer's learning-rate
schedule against its closed form.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from datarater.errors import UserError
from inner_loop.optimizers import (check_meta_differentiable, in_float32, make_inner_optimizer,
                                   make_step_inverse)
from inner_loop.unroll import InnerState, inner_step, unroll
from outer_loop import meta_step, mixed_mode
from outer_loop.setup import make_outer_optimizer
from tests.tiny import as_float64, estimator, tiny_batches, tiny_problem

LEARNING_RATES = {'sgd': 0.3, 'momentum': 0.1, 'adam': 0.05}


def _jit(fn):
  """jax.jit with cheap XLA passes: these programs are tiny and compiling dominates the test."""
  return jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0,
                                       'xla_llvm_disable_expensive_passes': True})


def _setup(optimizer, steps, population=2, batch=8):
  """A float64 tiny problem, its outer state and batches (K members, T steps)."""
  problem = tiny_problem(optimizer=optimizer, lr=LEARNING_RATES[optimizer])
  inner, outer = tiny_batches(0, population=population, steps=steps, batch=batch,
                              dtype=np.float64)
  state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), population))
  assert {x.dtype for x in jax.tree.leaves(state.rater_params)} == {np.dtype(np.float64)}
  return problem, state, jax.tree.map(jnp.asarray, inner), jax.tree.map(jnp.asarray, outer)


def _flat(tree) -> np.ndarray:
  """ravel_pytree's vector in numpy (op by op, JAX compiles a concatenation per tree)."""
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize('optimizer,steps', [('sgd', 4),
                                             pytest.param('adam', 9, marks=pytest.mark.slow),
                                             pytest.param('momentum', 9, marks=pytest.mark.slow)])
def test_estimators_agree(optimizer, steps):
  """Every estimator; mixed by running the optimizer backwards where it can (adam T = 9: the
  first 4 steps replayed, the rest undone) and by replay."""
  with jax.enable_x64():
    problem, state, inner, outer = _setup(optimizer, steps)
    lr = LEARNING_RATES[optimizer]
    variants = {'reverse': estimator('reverse', optimizer, lr),
                'remat': estimator('remat', optimizer, lr),
                'mixed replay': estimator('mixed', optimizer, lr, recompute='replay')}
    if optimizer != 'sgd':
      variants['mixed invert'] = estimator('mixed', optimizer, lr, recompute='invert')
      assert estimator('mixed', optimizer, lr).recompute == 'invert'  # auto
    results = {}
    for name, est in variants.items():
      (loss, (population, inner_losses, _)), grads = _jit(
          lambda phi, pop, i, o, est=est: meta_step.meta_gradient(problem, est, phi, pop, i, o))(
              state.rater_params, state.population, inner, outer)
      results[name] = (loss, _flat(population), inner_losses, _flat(grads))
    ref_loss, ref_pop, ref_losses, ref_grad = results['reverse']
    assert ref_losses.shape == (2, steps)
    assert float(np.linalg.norm(ref_grad)) > 1e-6  # the rater weights matter
    for name, (loss, pop, losses, grad) in results.items():
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, err_msg=name)
      np.testing.assert_allclose(pop, ref_pop, rtol=1e-12, atol=1e-14, err_msg=name)
      np.testing.assert_allclose(losses, ref_losses, rtol=1e-12, err_msg=name)
      assert _rel(grad, ref_grad) < 1e-9, (name, _rel(grad, ref_grad))


@pytest.mark.parametrize('optimizer,segment,recompute,steps',
                         [('momentum', 1, 'replay', 5), ('adam', 0, 'invert', 9),
                          ('momentum', 2, 'invert', 5),
                          *(pytest.param(*case, marks=pytest.mark.slow) for case in (
                              ('adam', 2, 'replay', 5), ('momentum', 2, 'invert', 9),
                              ('adam', 2, 'invert', 9), ('adam', 3, 'invert', 9)))])
def test_mixed_vjp_of_every_input_and_output(optimizer, segment, recompute, steps):
  """Custom VJP = jax.vjp of the plain unroll, for d/d(phi, initial state) of (state, losses).

  replay, T = 5: segment 1 keeps every state; segment 2 runs a 1-step head, then two 2-step
  segments recomputed from their starts. invert (momentum: no head; adam: 4 steps replayed from
  the input), the rest undone from exact ends replayed from the input: momentum T = 5 with a
  1-step part and two 2-step segments (the fast suite's case of every piece of the invert
  backward pass: the last segment, one before it, the part); T = 9: adam with one 5-step segment
  (0: default), a 1-step part and two 2-step segments (2), or a 2-step part and one 3-step
  segment (3).
  """
  with jax.enable_x64():
    lr = LEARNING_RATES[optimizer]
    mixed = estimator('mixed', optimizer, lr, recompute=recompute, segment=segment)
    exact = mixed.inverse.exact_steps if recompute == 'invert' else 0
    problem, state, inner, _ = _setup(optimizer, steps=steps, population=1)
    member = jax.tree.map(lambda x: x[0], state.population)
    batches = jax.tree.map(lambda x: x[0], inner)
    plan = mixed_mode.make_plan(steps, recompute, segment, exact)
    assert plan.head + plan.part + plan.count * plan.segment == steps
    assert recompute != 'invert' or plan.head < steps
    plain = lambda phi, s: unroll(problem.task.per_example_loss, problem.inner_optimizer,
                                  lambda b: problem.weights(phi, b), s, batches)
    custom = lambda phi, s: mixed.unroll(problem, phi, s, batches)

    out_ref = jax.eval_shape(plain, state.rater_params, member)
    rng = np.random.default_rng(segment)

    def random_cotangent(x):
      if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.asarray(rng.normal(size=x.shape))
      return np.zeros(x.shape, jax.dtypes.float0)
    ct = jax.tree.map(random_cotangent, out_ref)  # on final params, opt state and all T losses

    @_jit
    def both(phi, s, ct):
      out_r, vjp_r = jax.vjp(plain, phi, s)
      out_m, vjp_m = jax.vjp(custom, phi, s)
      return out_r, out_m, vjp_r(ct), vjp_m(ct)
    out_r, out_m, ref, got = both(state.rater_params, member, ct)
    np.testing.assert_allclose(_flat(out_m), _flat(out_r), rtol=1e-12)
    floats = lambda t: _flat(jax.tree.map(
        lambda x: x if jnp.issubdtype(x.dtype, jnp.inexact) else None, t))
    for name, r, g in zip(('phi', 'initial state'), ref, got):
      assert floats(r).size > 0 and float(np.linalg.norm(floats(r))) > 1e-6, name
      assert _rel(floats(g), floats(r)) < 1e-10, (name, _rel(floats(g), floats(r)))


def test_unknown_estimator_and_invert_without_inverse_are_refused():
  with pytest.raises(UserError, match='meta_gradient'):
    estimator('forward')
  with pytest.raises(UserError, match='invert'):
    estimator('mixed', 'sgd', recompute='invert')
  assert make_step_inverse('sgd', 0.1) is None


def test_a_segment_may_undo_exactly_the_limit_of_steps():
  """Mixed mode undoes at most INVERT_SEGMENT steps from one exact state: a segment of that many
  is allowed ('invert', or 'auto' for Adam), one more refused unless replayed."""
  limit = mixed_mode.INVERT_SEGMENT
  for recompute in ('auto', 'invert'):
    assert estimator('mixed', 'adam', recompute=recompute, segment=limit).segment == limit
    with pytest.raises(UserError, match=f'mixed_segment={limit + 1} undoes more than {limit} '):
      estimator('mixed', 'adam', recompute=recompute, segment=limit + 1)
  assert estimator('mixed', 'adam', recompute='replay', segment=limit + 1).segment == limit + 1


@pytest.mark.parametrize('optimizer', ['momentum', 'adam'])
def test_step_inverse_undoes_the_optax_step(optimizer):
  """theta, s from (theta', s') and g, for the optax optimizer itself (its state layout too)."""
  with jax.enable_x64():
    opt = make_inner_optimizer(optimizer, 0.05)
    inverse = make_step_inverse(optimizer, 0.05)
    rng = np.random.default_rng(0)
    params = {'w': jnp.asarray(rng.normal(size=(4, 3))), 'b': jnp.asarray(rng.normal(size=3))}
    state = opt.init(params)
    for _ in range(3):
      grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
      updates, state_next = opt.update(grads, state, params)
      params_next = optax.apply_updates(params, updates)
      back = (inverse.params(params_next, state_next), inverse.opt_state(state_next, grads))
      assert jax.tree.structure(back) == jax.tree.structure((params, state))
      for got, want in zip(jax.tree.leaves(back), jax.tree.leaves((params, state))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
      params, state = params_next, state_next



def test_undoing_a_fresh_adams_first_step_gives_optaxs_zero_moments_exactly():
  """float32, gradients over 8 decades: subtracting (1 - b2) g^2 from nu back out of optax's
  nu = (1 - b2) g^2 rounds apart for some g; undoing step 1 must give optax's init (zeros),
  where Adam's derivatives are ~1 / sqrt(eps_root) large, not that round-off."""
  opt, inverse = make_inner_optimizer('adam', 0.05), make_step_inverse('adam', 0.05)
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=64), jnp.float32)}
  grads = {'w': jnp.asarray(rng.normal(size=64) * 10.0 ** rng.uniform(-6, 2, 64), jnp.float32)}
  init = opt.init(params)
  back = inverse.opt_state(opt.update(grads, init, params)[1], grads)
  assert jax.tree.structure(back) == jax.tree.structure(init)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(init)):
    np.testing.assert_array_equal(got, want)


def test_undoing_adam_where_nu_was_zero_before_a_large_gradient_keeps_nu_at_zero():
  """float32: a coordinate whose gradient was 0 until a step (nu = 0, count > 1) then takes
  nu' = (1 - b2) g^2; subtracting (1 - b2) g g back rounds below 0 for some g, and
  undoing the step before from that nu would take sqrt of a negative (NaN). Undoing both steps
  must recover the state and parameters of the forward run."""
  opt, inverse = make_inner_optimizer('adam', 0.05), make_step_inverse('adam', 0.05)
  rng = np.random.default_rng(0)
  theta0 = {'w': jnp.asarray(rng.normal(size=256), jnp.float32)}
  zero = {'w': jnp.zeros(256, jnp.float32)}
  grads = {'w': jnp.asarray(rng.normal(size=256), jnp.float32)}
  s0 = opt.init(theta0)
  u1, s1 = opt.update(zero, s0, theta0)  # count 1, moments 0
  theta1 = optax.apply_updates(theta0, u1)
  u2, s2 = opt.update(grads, s1, theta1)
  theta2 = optax.apply_updates(theta1, u2)
  back1 = inverse.opt_state(s2, grads)
  assert float(jnp.min(back1[0].nu['w'])) >= 0  # nu is a mean of squares
  np.testing.assert_allclose(back1[0].nu['w'], 0.0, atol=1e-9)  # round-off of 1e-3 g^2
  np.testing.assert_allclose(inverse.params(theta2, s2)['w'], theta1['w'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(inverse.params(theta1, back1)['w'], theta0['w'], rtol=1e-6)


def test_adam_step_vjp_is_the_vjp_of_the_optax_step():
  """The closed-form backward step (from the state after it) = jax.vjp of optax's Adam update,
  for the gradient, the moments and the params, at the first step (count 1) and later ones."""
  with jax.enable_x64():
    opt, inverse = make_inner_optimizer('adam', 0.05), make_step_inverse('adam', 0.05)
    rng = np.random.default_rng(0)
    normal = lambda tree: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), tree)
    params = normal({'w': np.zeros((4, 3)), 'b': np.zeros(3)})
    state = opt.init(params)

    def update(g, opt_state, params):
      updates, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    for _ in range(3):
      grads = normal(params)
      out, vjp = jax.vjp(update, grads, state, params)
      ct = (normal(params), jax.tree.map(
          lambda x: normal(x) if jnp.issubdtype(x.dtype, jnp.inexact)
          else np.zeros(x.shape, jax.dtypes.float0), out[1]))
      want = vjp(ct)
      ct_carry = mixed_mode._to_carry(InnerState(*ct), InnerState(*out))
      got = inverse.step_vjp(out[1], grads, ct_carry)
      want = mixed_mode._to_carry(want, want)  # the count's float0 cotangent -> 0.
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
      params, state = out


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_outer_learning_rate_follows_the_configured_schedule(schedule):
  """With a constant gradient Adam's step is exactly the learning rate (bias correction), so the
  steps of the outer optimizer trace its schedule: linear warm-up, then flat or a cosine to 0."""
  lr, warmup, steps = 2e-3, 10, 50
  opt = make_outer_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=lr, warmup_steps=warmup, steps=steps, schedule=schedule, clip_norm=1e6)))
  params = jnp.zeros(3)
  grads = jnp.array([0.5, -2.0, 3.0])
  state = opt.init(params)
  taken = []
  for _ in range(steps):
    updates, state = opt.update(grads, state, params)
    taken.append(-np.asarray(updates) / np.sign(np.asarray(grads)))
  t = np.arange(steps, dtype=np.float64)
  after = np.clip((t - warmup) / (steps - warmup), 0, 1)
  decay = 0.5 * (1 + np.cos(np.pi * after)) if schedule == 'cosine' else np.ones(steps)
  expected = np.where(t < warmup, lr * t / warmup, lr * decay)
  np.testing.assert_allclose(np.array(taken), np.repeat(expected[:, None], 3, 1),
                             rtol=1e-4, atol=1e-8)


def test_outer_optimizer_clips_the_global_norm_before_adam():
  """Gradients of global norm 5, 0.2 and 3 under clip_norm 0.5: the updates are Adam's (float64
  by hand, beta 0.9 / 0.999, eps 1e-8) on the gradients rescaled to norm <= 0.5; unclipped, the
  large first gradient would dominate Adam's second moment and the steps differ."""
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=4) for _ in range(3)]
  grads = [g / np.linalg.norm(g) * n for g, n in zip(grads, (5.0, 0.2, 3.0))]
  def by_hand(clip):
    m = v = np.zeros(4)
    out = []
    for t, g in enumerate(grads, 1):
      g = g * min(1.0, clip / np.linalg.norm(g))
      m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
      out.append(-0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8))
    return np.array(out)
  opt = make_outer_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=0.1, warmup_steps=0, steps=10, schedule='constant', clip_norm=0.5)))
  params = jnp.zeros(4, jnp.float32)
  state, got = opt.init(params), []
  for g in grads:
    updates, state = opt.update(jnp.asarray(g, jnp.float32), state, params)
    got.append(np.asarray(updates))
  np.testing.assert_allclose(got, by_hand(0.5), rtol=1e-4, atol=1e-7)
  assert np.abs(by_hand(0.5) - by_hand(np.inf)).max() > 1e-2  # the clip changes the steps


def test_mixed_mode_memory_is_nearly_flat_in_the_unroll_length():
  """XLA's compiled temporaries of one outer step: mixed mode at T = 16 keeps little more than at
  T = 2, while reverse mode at T = 16 keeps every inner step's activations (several times more);
  remat, which recomputes them on the way back, keeps well under reverse mode's. (Measured:
  mixed 1.22x its T = 2, reverse ~10x mixed, remat ~0.4x reverse; at T = 24, 1.23x, ~15x and
  ~0.4x, compiled more slowly.)"""
  def temp_bytes(mode, steps):
    problem = tiny_problem(optimizer='adam', lr=0.05, dim=32, hidden=(64,))
    inner, outer = tiny_batches(0, population=2, steps=steps, batch=32, dim=32)
    state = meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2)
    est = estimator(mode, 'adam', 0.05)
    step = lambda s, i, o: meta_step.outer_step(problem, est, s, i, o)
    return _jit(step).lower(state, inner, outer).compile().memory_analysis().temp_size_in_bytes
  mixed_short, mixed_long = temp_bytes('mixed', 2), temp_bytes('mixed', 16)
  reverse_long = temp_bytes('reverse', 16)
  assert mixed_long < 1.3 * mixed_short, (mixed_short, mixed_long)
  assert reverse_long > 3 * mixed_long, (reverse_long, mixed_long)
  remat_long = temp_bytes('remat', 16)
  assert remat_long < 0.6 * reverse_long, (remat_long, reverse_long)


def test_the_mixed_options_bind_mixed_mode_alone():
  """outer.mixed_recompute='invert' with plain SGD (no inverse) is refused for mixed mode, and
  ignored by reverse and remat, which never read it (they were refused too)."""
  from outer_loop import estimators  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="mixed_recompute='invert' needs an inner optimizer"):
    estimator('mixed', 'sgd', recompute='invert')
  assert estimator('reverse', 'sgd', recompute='invert') == estimators.Reverse()
  assert estimator('remat', 'sgd', recompute='invert') == estimator('remat', 'sgd')


def test_an_added_optimizer_is_never_silently_another(monkeypatch):
  """WORKSPACE's recipe: an inner optimizer listed without a StepInverse has none (reverse mode
  and replaying mixed mode use it). (An estimator is listed by its registration, which builds
  it: tests/test_own_estimator.py.)"""
  from inner_loop import optimizers  # pylint: disable=g-import-not-at-top
  from outer_loop import estimators  # pylint: disable=g-import-not-at-top
  new = 'listed_not_built'  # no real optimizer's name: adding one (rmsprop) broke this test
  monkeypatch.setattr(optimizers, 'INNER_OPTIMIZERS', optimizers.INNER_OPTIMIZERS + (new,))
  assert make_step_inverse(new, 0.1) is None
  assert estimator('reverse', new) == estimators.Reverse()
  assert estimator('mixed', new) == estimators.Mixed('replay', 0, None)
  with pytest.raises(UserError, match="unknown inner optimizer 'lion'"):
    make_step_inverse('lion', 0.1)


def test_an_inner_optimizer_whose_update_ignores_the_gradient_is_refused(monkeypatch):
  """A sign-based inner optimizer (optax.lion, added as WORKSPACE says) makes the meta-gradient
  exactly 0: build_problem refuses it in one line (a rater run went on, its warning blaming the
  outer learning rate); the shipped optimizers pass."""
  from configs.digits import get_config  # pylint: disable=g-import-not-at-top
  from inner_loop import optimizers  # pylint: disable=g-import-not-at-top
  from outer_loop import setup  # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_info  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(optimizers, 'INNER_OPTIMIZERS', optimizers.INNER_OPTIMIZERS + ('lion',))
  monkeypatch.setattr(setup, 'make_inner_optimizer', lambda name, lr: (
      optax.lion(lr) if name == 'lion' else make_inner_optimizer(name, lr)))
  config = get_config()
  for name in ('sgd', 'momentum', 'adam'):
    config.inner.optimizer = name
    setup.build_problem(config, tiny_info())
  config.inner.optimizer = 'lion'
  with pytest.raises(UserError, match="inner.optimizer='lion': its update does not change"):
    setup.build_problem(config, tiny_info())


def test_an_inner_optimizer_warming_up_from_zero_is_meta_differentiable():
  """An update that ignores the gradient at one of the three probed steps (a learning rate
  warming up from 0: the first update is 0) still carries a meta-gradient through the others;
  only an update ignoring it at every step is refused."""
  warm = optax.sgd(optax.linear_schedule(0.0, 0.1, 4))
  first = jax.jvp(lambda g: warm.update(g, warm.init(g))[0], (jnp.ones(3),), (jnp.ones(3),))[1]
  np.testing.assert_array_equal(first, 0.0)  # the first step's update ignores the gradient
  check_meta_differentiable('warm', warm)
  with pytest.raises(UserError, match="inner.optimizer='frozen'"):
    check_meta_differentiable('frozen', optax.sgd(0.0))


def test_an_inner_step_hands_the_parameters_to_an_optimizer_that_reads_them():
  """A decoupled weight decay (WORKSPACE's example of an optimizer to add) reads theta in its
  update: one weighted step is theta - lr (mean_i w_i (theta - x_i) + wd theta), by hand."""
  lr, wd = 0.1, 0.5
  opt = in_float32(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)))
  with jax.enable_x64():
    rng = np.random.default_rng(0)
    theta, x, w = rng.normal(size=3), rng.normal(size=(4, 3)), rng.uniform(0.5, 2.0, 4)
    loss_fn = lambda params, batch: 0.5 * jnp.sum((params['t'] - batch['x']) ** 2, axis=-1)
    state = InnerState({'t': jnp.asarray(theta)}, opt.init({'t': jnp.asarray(theta)}))
    new, _ = inner_step(loss_fn, opt, state, {'x': jnp.asarray(x)}, jnp.asarray(w))
    grad = np.mean(w[:, None] * (theta - x), axis=0)
    np.testing.assert_allclose(new.params['t'], theta - lr * (grad + wd * theta), rtol=1e-12)


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_outer_warmup_of_zero_steps_starts_at_the_full_rate(schedule):
  """warmup_steps = 0: the first outer update is Adam's full step (about lr per coordinate);
  with warm-up, the first update is 0 (the schedule starts at 0)."""
  grad = jnp.full((3,), 0.5)
  def first_update(warmup):
    outer = ml_collections.ConfigDict({'warmup_steps': warmup, 'learning_rate': 1e-2,
                                       'schedule': schedule, 'steps': 100, 'clip_norm': 10.0})
    opt = make_outer_optimizer(outer)
    return np.asarray(opt.update(grad, opt.init(grad))[0])
  np.testing.assert_allclose(first_update(0), -1e-2, rtol=1e-3)
  np.testing.assert_array_equal(first_update(5), 0.0)


def test_the_invert_refusal_names_the_optimizers_that_have_an_inverse(monkeypatch):
  """An optimizer given a StepInverse is named by the refusal (it named momentum, adam as text)."""
  from inner_loop import optimizers  # pylint: disable=g-import-not-at-top
  from outer_loop import estimators  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(optimizers, 'INNER_OPTIMIZERS', optimizers.INNER_OPTIMIZERS + ('lion',))
  inverse = make_step_inverse('momentum', 0.1)
  monkeypatch.setattr(estimators, 'make_step_inverse', lambda name, lr: (
      inverse if name == 'lion' else None if name == 'sgd' else make_step_inverse(name, lr)))
  with pytest.raises(UserError,
                     match=r"backwards \(momentum, adam, lion\), got inner.optimizer='sgd'"):
    estimator('mixed', 'sgd', recompute='invert')


def test_the_finite_difference_helper_takes_tiny_batches_with_mixed_mode():
  """tests/tiny.py's helper with tiny_batches' numpy arrays and a custom-VJP estimator (it raised
  JAX's internal 'AssertionError: non-canonical constant of type ndarray')."""
  from tests import tiny  # pylint: disable=g-import-not-at-top
  with jax.enable_x64():
    inner, outer = tiny_batches(0, population=2, steps=3, batch=8, dtype=np.float64)
    tiny.assert_meta_gradient_matches_finite_differences(
        tiny_problem(optimizer='momentum', lr=0.1), estimator('mixed', 'momentum', 0.1),
        inner, outer)
