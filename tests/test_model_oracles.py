"""The CNN task (convolutions as Dense layers over patches) and the token-weighted transformer LM
against independent float64 oracles: data value embedding against the true derivative of the
trajectory (jax.grad through the whole SGD loop) and against an explicit-matrix recursion, every
meta-gradient estimator against reverse mode with CNN and sequence raters, and the patch
convolution against jax.lax.conv_general_dilated. The MLP versions of these checks live in
test_valuation.py and test_meta_modes.py; these run the models whose layers are not plain
Dense-over-examples (shared patch kernels, attention over positions, token weights)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from configs import digits_cnn
from datarater import pergrad, tasks
from datarater.data.pipeline import DataInfo
from datarater.tasks.cnn import PatchConv
from datarater.valuation import dvemb
from datarater.valuation.base import TrainingRun
from outer_loop import meta_step
from tests.tiny import as_float64, estimator, tiny_problem


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cnn_info(shape=(6, 6, 2), classes=3):
  return DataInfo('images', {'image': jax.ShapeDtypeStruct(shape, np.float32),
                             'label': jax.ShapeDtypeStruct((), np.int32)}, {'label': classes},
                  ('image', 'label'))


def _lm_info(length=6):
  return DataInfo('text', {'tokens': jax.ShapeDtypeStruct((length,), np.int32),
                           'weights': jax.ShapeDtypeStruct((length,), np.float32)}, {}, None)


def _lm(name='transformer_lm', **fields):
  c = {'name': name, 'vocab': 8, 'd_model': 4, 'num_heads': 2, 'num_layers': 1, 'd_mlp': 6,
       'max_len': 16, 'activation': 'gelu'}
  c.update(fields)
  return ml_collections.ConfigDict(c)


def _examples(kind, n, seed):
  rng = np.random.default_rng(seed)
  if kind == 'cnn':
    return {'image': jnp.asarray(rng.normal(size=(n, 6, 6, 2))),
            'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32), 'index': jnp.arange(n)}
  return {'tokens': jnp.asarray(rng.integers(0, 8, (n, 6)), jnp.int32),
          'weights': jnp.asarray(rng.uniform(0, 1, (n, 6))), 'index': jnp.arange(n)}


def _task(kind):
  if kind == 'cnn':
    task = tasks.make_task(digits_cnn.cnn(channels=(2,), strides=(2,), hidden=0,
                                          activation='tanh'), _cnn_info())
  else:
    task = tasks.make_task(_lm(token_weights='weights'), _lm_info())
  return task, as_float64(task.init(jax.random.key(0)))


STEPS, BATCH, POOL = 4, 3, 8
LRS = (0.5, 0.4, 0.3, 0.6)


@functools.cache  # the CNN's run serves both of its DVEmb tests: one compile of the loop
def _recorded_sgd(kind):
  """A 4-step weighted SGD run over batches of 3 drawn from 8 examples (two never drawn), its
  recording, and the oracle: d(test loss)/d(multipliers [T, B]) at 1, where each batch entry's
  loss is multiplied by its multiplier, by jax.grad through the whole training loop."""
  task, params = _task(kind)
  loss = task.per_example_loss
  pool = _examples(kind, POOL, 7)
  rng = np.random.default_rng(1)
  pos = np.stack([rng.permutation(POOL)[:BATCH] for _ in range(STEPS)])
  batches = jax.tree.map(lambda x: jax.device_put(np.asarray(x)[pos]), pool)  # not op by op
  weights = jnp.asarray(rng.uniform(0.5, 1.5, (STEPS, BATCH)))
  test = _examples(kind, 4, 99)
  test_loss = lambda theta: jnp.mean(loss(theta, test))

  def train(mult):
    def step(theta, xs):
      b, w, m, lr = xs
      g = jax.grad(lambda q: jnp.mean(w * m * loss(q, b)))(theta)
      return jax.tree.map(lambda a, c: a - lr * c, theta, g), theta
    final, checkpoints = jax.lax.scan(step, params, (batches, weights, mult, jnp.asarray(LRS)))
    return test_loss(final), (checkpoints, final)
  dmult, (checkpoints, final) = jax.jit(jax.grad(train, has_aux=True))(jnp.ones((STEPS, BATCH)))
  run = TrainingRun(batches=batches, weights=weights, step_lrs=jnp.asarray(LRS),
                    checkpoints=checkpoints, checkpoint_steps=jnp.arange(STEPS),
                    final_params=final)
  checkpoints = [jax.tree.map(lambda x, t=t: jax.device_put(np.asarray(x)[t]), checkpoints)
                 for t in range(STEPS)]
  return task, run, pos, checkpoints, test, test_loss, np.asarray(dmult)


_GRADS = {}


def _per_example_flat_grads(loss, params, batch):
  """Each example's gradient, of a batch of one, flattened [B, P]."""
  if loss not in _GRADS:  # one jitted function per loss
    _GRADS[loss] = jax.jit(jax.grad(lambda p, one: loss(p, one)[0]))
  grad = _GRADS[loss]
  n = jax.tree.leaves(batch)[0].shape[0]
  batch = jax.tree.map(np.asarray, batch)  # rows sliced in numpy, not by a compile per shape
  return np.stack([ravel_pytree(grad(params, jax.tree.map(lambda x: x[i:i + 1], batch)))[0]
                   for i in range(n)])


@pytest.mark.parametrize('kind', ['cnn', pytest.param('lm', marks=pytest.mark.slow)])
def test_dvemb_exact_is_the_trajectory_leave_one_out_derivative(kind):
  """DVEmb 'exact' = -d(test loss)/d(eps) where every occurrence of example i has its loss
  multiplied by (1 - eps): jax.grad through the whole 4-step SGD loop w.r.t. per-occurrence
  multipliers, summed per example (CNN; LM with token weights); per phase, summed over that
  phase's steps."""
  task, run, pos, checkpoints, test, test_loss, dmult = _recorded_sgd(kind)
  loo = np.zeros(POOL)
  np.add.at(loo, pos.reshape(-1), -np.asarray(dmult).reshape(-1))
  assert np.count_nonzero(loo) == len(np.unique(pos)) < POOL  # some examples never trained on
  exact = dvemb.DataValueEmbedding(task, POOL, test, None, 'exact', phases=2,
                                   chunk_size=2).fit(run)
  got = np.asarray(exact.score({'index': jnp.arange(POOL)}))
  assert _rel(got, loo) < 1e-10, (got, loo)
  # Per phase (steps 0-1, 2-3): the same derivative w.r.t. the occurrences in those steps only.
  phases = np.zeros((2, POOL))
  for t in range(STEPS):
    np.add.at(phases[t * 2 // STEPS], pos[t], -dmult[t])
  assert _rel(exact.phase_values(), phases) < 1e-10


def test_dvemb_gauss_newton_and_fisher_equal_the_explicit_recursion_on_the_cnn():
  """DVEmb 'gauss_newton' / 'empirical_fisher' on the CNN = sum over occurrences of
  (lr_s/B) w g_i(theta_s)^T (prod_{t>s} (I - lr_t H_t))^T grad test(theta_T), with explicit
  P x P matrices: H = (1/B) sum_j w_j J_j^T (diag p_j - p_j p_j^T) J_j (jax.jacobian of the
  logits) or (1/B) sum_j w_j g_j g_j^T (per-example jax.grad), lr_t times each eigenvalue of H
  clipped to [0, 2] (never amplifying; it acts at these learning rates)."""
  task, run, pos, checkpoints, test, test_loss, _ = _recorded_sgd('cnn')
  loss = task.per_example_loss
  flat0, unravel = ravel_pytree(checkpoints[0])
  w = np.asarray(run.weights)
  batch = lambda t: jax.tree.map(lambda x: jax.device_put(np.asarray(x)[t]), run.batches)
  grads = [_per_example_flat_grads(loss, checkpoints[t], batch(t)) for t in range(STEPS)]

  logits = lambda f, b: task.logits(unravel(f), b)
  jac_and_probs = jax.jit(lambda f, b: (jax.jacobian(logits)(f, b),
                                        jax.nn.softmax(logits(f, b), -1)))

  def gauss_newton(t):
    jac, p = map(np.asarray, jac_and_probs(ravel_pytree(checkpoints[t])[0], batch(t)))
    return sum(w[t, j] * jac[j].T @ (np.diag(p[j]) - np.outer(p[j], p[j])) @ jac[j]
               for j in range(BATCH)) / BATCH

  def fisher(t):
    return (grads[t].T * w[t]) @ grads[t] / BATCH

  direction = np.asarray(ravel_pytree(jax.jit(jax.grad(test_loss))(run.final_params))[0])
  clipped = 0
  for curvature, hessian in (('gauss_newton', gauss_newton), ('empirical_fisher', fisher)):
    k, want = np.eye(flat0.size), np.zeros(POOL)
    for t in reversed(range(STEPS)):
      np.add.at(want, pos[t], LRS[t] / BATCH * w[t] * (grads[t] @ k.T @ direction))
      lam, u = np.linalg.eigh(hessian(t))
      clipped += np.sum(LRS[t] * lam > 2)
      k = k @ (np.eye(flat0.size) - (u * np.clip(LRS[t] * lam, 0, 2)) @ u.T)
    val = dvemb.DataValueEmbedding(task, POOL, test, None, curvature, phases=2).fit(run)
    got = np.asarray(val.score({'index': jnp.arange(POOL)}))
    assert _rel(got, want) < 1e-10, (curvature, got, want)
  assert clipped > 0  # the large steps here are unstable along some direction: the clip acts


def test_token_weighted_lm_per_example_gradients_equal_a_loop():
  """The token-weighted LM (loss = weighted mean over positions): chunked per-example gradients,
  ghost dot products (within the batch and against another batch) and ghost squared norms =
  those of jax.grad of each example alone (test_text_lm.py checks the unweighted LM)."""
  task, params = _task('lm')
  loss = task.per_example_loss
  batch = _examples('lm', 5, 3)
  flat = _per_example_flat_grads(loss, params, batch)
  got, dots, cross, sq = jax.jit(lambda p, b: (
      pergrad.per_example(loss, p, b, pergrad.flatten(), chunk_size=2),
      pergrad.ghost_dots(loss, p, b), pergrad.ghost_dots(loss, p, b, jax.tree.map(
          lambda x: x[:3], b)), pergrad.ghost_sq_norms(loss, p, b)))(params, batch)
  assert pergrad.ghost_covers(loss, params, batch)
  np.testing.assert_allclose(got, flat, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(dots, flat @ flat.T, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(cross, flat @ flat[:3].T, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(sq, (flat ** 2).sum(1), rtol=1e-9)


def _meta_setup(kind, steps, population=3):
  if kind == 'cnn':
    info = _cnn_info((5, 5, 1))
    task = tasks.make_task(digits_cnn.cnn(channels=(3,), strides=(2,), activation='tanh',
                                          hidden=3), info)
    rater = tasks.make_rater(digits_cnn.cnn(name='cnn_rater', channels=(2,), strides=(2,),
                                            activation='tanh', pool='mean'), info)
    rng, b = np.random.default_rng(0), 6
    inner = {'image': rng.normal(size=(population, steps, b, 5, 5, 1)),
             'label': rng.integers(0, 3, (population, steps, b)).astype(np.int32)}
    outer = {'image': rng.normal(size=(population, b, 5, 5, 1)),
             'label': rng.integers(0, 3, (population, b)).astype(np.int32)}
  else:
    info = _lm_info(6)
    task = tasks.make_task(_lm(token_weights='weights'), info)
    rater = tasks.make_rater(_lm('sequence_rater', num_heads=1, d_mlp=4), info)
    rng, b = np.random.default_rng(0), 5
    inner = {'tokens': rng.integers(0, 8, (population, steps, b, 6)).astype(np.int32),
             'weights': rng.uniform(size=(population, steps, b, 6))}
    outer = {'tokens': rng.integers(0, 8, (population, b, 6)).astype(np.int32),
             'weights': rng.uniform(size=(population, b, 6))}
  return task, rater, jax.tree.map(jnp.asarray, inner), jax.tree.map(jnp.asarray, outer)


META_LRS = {'sgd': 0.3, 'momentum': 0.1, 'adam': 0.05}


@pytest.mark.parametrize('kind,optimizer,steps,variants', [
    ('cnn', 'adam', 5, [('mixed', 'invert', 0)]),
    # Remat is jax.checkpoint around the same step: the fast suite checks it against reverse mode
    # on the MLP (test_meta_modes.py::test_estimators_agree).
    pytest.param('cnn', 'adam', 5, [('remat', 'auto', 0)], marks=pytest.mark.slow),
    pytest.param('cnn', 'momentum', 4, [('mixed', 'replay', 0)], marks=pytest.mark.slow),
    pytest.param('lm', 'momentum', 3, [('mixed', 'invert', 0)], marks=pytest.mark.slow),
])
def test_mixed_and_remat_meta_gradients_equal_reverse(kind, optimizer, steps, variants):
  """d(outer loss)/d(rater params), population 3: Mixed (optimizer run backwards: Adam T = 5,
  4 steps replayed and 1 undone, momentum every step undone; or every step replayed) and Remat
  = plain Reverse mode (jax.grad through the stored unroll; Reverse itself = finite differences:
  test_cnn.py, test_text_lm.py), on the CNN task + CNN rater and on the token-weighted LM +
  sequence rater."""
  task, rater, inner, outer = _meta_setup(kind, steps)
  lr = META_LRS[optimizer]
  base = tiny_problem(optimizer=optimizer, lr=lr)
  problem = meta_step.MetaProblem(task=task, rater=rater, inner_optimizer=base.inner_optimizer,
                                  outer_optimizer=base.outer_optimizer, temperature=0.4,
                                  reset_every=3)
  state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 3))

  def grad_of(est):
    g = jax.jit(lambda phi: meta_step.meta_gradient(
        problem, est, phi, state.population, inner, outer)[1])(state.rater_params)
    return np.asarray(ravel_pytree(g)[0])
  reverse = estimator('reverse', optimizer, lr)
  want = grad_of(reverse)
  assert np.linalg.norm(want) > 1e-3
  for name, recompute, segment in variants:
    est = estimator(name, optimizer, lr, recompute=recompute, segment=segment)
    if name == 'mixed':
      assert est.recompute == recompute
    got = grad_of(est)
    assert _rel(got, want) < 1e-10, (name, recompute, segment, _rel(got, want))



@pytest.mark.parametrize('height,width,channels,stride', [
    (7, 5, 3, 2), (9, 9, 2, 4), (4, 4, 1, 5)])
def test_patch_convolution_equals_lax_conv_including_strides_beyond_the_kernel(
    height, width, channels, stride):
  """PatchConv = jax.lax.conv_general_dilated (3x3 'SAME', float64, highest precision) + bias,
  for a non-square input with 3 channels, and strides of 4 and 5 (larger than the 3x3 kernel:
  some input pixels are read by no output; 4x4 with stride 5: one output pixel)."""
  x = jax.random.normal(jax.random.key(0), (2, height, width, channels), jnp.float64)
  conv = PatchConv(5, stride)
  # Each side as one program (op by op, the patches' slices compile one by one per shape).
  params = as_float64(jax.jit(conv.init)(jax.random.key(1), x))
  dense = params['params']['kernel']
  # Patches are ordered (input channel, row, column); the HWIO kernel is (row, column, in, out).
  kernel = np.transpose(np.reshape(dense['kernel'], (channels, 3, 3, 5)), (1, 2, 0, 3))
  want = jax.jit(lambda x, k, b: jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest') + b)(x, kernel, dense['bias'])
  got = jax.jit(conv.apply)(params, x)
  assert got.shape == want.shape == (2, -(-height // stride), -(-width // stride), 5)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
