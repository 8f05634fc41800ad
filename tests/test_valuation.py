"""Valuations against their definitions on tiny float64 models: explicit loops, sums and formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr

from datarater import models, pergrad
from datarater.errors import UserError
from datarater.valuation import base, dvemb, mimic, tracin
from datarater.valuation.rater import RaterValuation
from inner_loop.unroll import init_inner_state


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def problem(n=12, hidden=(5,), seed=0, classes=3, act='tanh'):
  """A float64 MLP on random 6-dim inputs, its loss and a dataset with an `index` field."""
  rng = np.random.default_rng(seed)
  model = models.task_model(classes, hidden, act)
  data = {'image': jnp.asarray(rng.normal(size=(n, 3, 2, 1))),
          'label': jnp.asarray(rng.integers(0, classes, n), jnp.int32),
          'index': jnp.arange(n)}
  params = jax.tree.map(lambda x: x.astype(jnp.float64),
                        model.init(jax.random.key(seed), data['image']))
  loss = lambda p, b: models.per_example_loss(model.apply, p, b)
  return loss, params, data


def sub(batch, idx):
  return jax.tree.map(lambda x: x[np.asarray(idx)], batch)


_GRADS = {}


def flat_grad(loss, params, batch, i, layers=None):
  """One example's gradient (a batch of one), flattened; the grad function is jitted once per loss."""
  if loss not in _GRADS:
    _GRADS[loss] = jax.jit(jax.grad(lambda p, ex: loss(p, ex)[0]))
  g = _GRADS[loss](params, sub(batch, [i]))
  return ravel_pytree(pergrad.masked(g, layers))[0]


def flat_grads(loss, params, batch, layers=None):
  return np.stack([flat_grad(loss, params, batch, i, layers)
                   for i in range(batch['label'].shape[0])])


def sgd_run(loss, params, data, steps=6, batch_size=4, lr=0.3, every=2, seed=0):
  order = np.random.default_rng(seed).integers(0, data['label'].shape[0], (steps, batch_size))
  batches = sub(data, order)
  return base.record_run(loss, params, batches, lr, every), batches, order


def test_record_run_equals_explicit_sgd_loop():
  loss, params, data = problem()
  run, batches, order = sgd_run(loss, params, data)
  p, ckpts = params, []
  for t in range(order.shape[0]):
    if t % 2 == 0:
      ckpts.append(p)
    g = jax.grad(lambda q: jnp.mean(loss(q, sub(data, order[t]))))(p)
    p = jax.tree.map(lambda a, b: a - 0.3 * b, p, g)
  for c, ref in enumerate(ckpts):
    np.testing.assert_allclose(ravel_pytree(run.checkpoint(c))[0], ravel_pytree(ref)[0], rtol=1e-12)
  np.testing.assert_allclose(ravel_pytree(run.final_params)[0], ravel_pytree(p)[0], rtol=1e-12)
  np.testing.assert_array_equal(run.checkpoint_steps, [0, 2, 4])
  with pytest.raises(UserError, match='checkpoint_every=4'):
    base.record_run(loss, params, batches, 0.3, 4)


def explicit_tracin(loss, run, a, b, layers=None, cosine=False):
  total = 0.0
  for c in range(run.num_checkpoints):
    p = run.checkpoint(c)
    ga, gb = flat_grads(loss, p, a, layers), flat_grads(loss, p, b, layers)
    if cosine:
      ga = ga / np.linalg.norm(ga, axis=1, keepdims=True)
      gb = gb / np.linalg.norm(gb, axis=1, keepdims=True)
    total = total + float(run.step_lrs[c]) * ga @ gb.T
  return total


@pytest.mark.parametrize('layers,cosine,ghost', [(None, False, False), (None, True, True),
                                                 (['dense_1'], False, True),
                                                 (['dense_0'], True, False)])
def test_tracin_cp_equals_explicit_sum(layers, cosine, ghost):
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data)
  a, b = sub(data, range(5)), sub(data, range(5, 12))
  ckpts, lrs = run.checkpoints, run.step_lrs[run.checkpoint_steps]
  got = tracin.tracin_cp(loss, ckpts, lrs, a, b, layers, None, cosine, ghost, chunk_size=2)
  np.testing.assert_allclose(got, explicit_tracin(loss, run, a, b, layers, cosine), rtol=1e-10)


def test_tracin_cp_with_projection_equals_explicit_matrix():
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data)
  a, b = sub(data, range(5)), sub(data, range(5, 12))
  proj = pergrad.gaussian_projection(7, seed=2, block_size=10)
  got = tracin.tracin_cp(loss, run.checkpoints, run.step_lrs[run.checkpoint_steps], a, b,
                         projection=proj)
  num = ravel_pytree(params)[0].size
  r = np.asarray(pergrad.gaussian_projection_matrix(num, 7, 2, 10, jnp.float64))
  want = 0.0
  for c in range(run.num_checkpoints):
    p = run.checkpoint(c)
    want = want + 0.3 * (flat_grads(loss, p, a) @ r) @ (flat_grads(loss, p, b) @ r).T
  np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize('layers', [None, ['dense_1']])
def test_tracin_modes_equal_explicit(layers):
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data)
  train, held = sub(data, range(8)), sub(data, range(8, 12))
  self_inf = tracin.TracIn(loss, 'self', layers=layers, chunk_size=3).fit(run)
  np.testing.assert_allclose(self_inf.score(train),
                             np.diag(explicit_tracin(loss, run, train, train, layers)), rtol=1e-10)
  np.testing.assert_allclose(self_inf.value(train), -self_inf.score(train))
  ghost = tracin.TracIn(loss, 'self', layers=layers, ghost=True).fit(run)
  np.testing.assert_allclose(ghost.score(train), self_inf.score(train), rtol=1e-10)
  want = explicit_tracin(loss, run, train, held, layers).mean(1)  # dot with the mean gradient
  got = tracin.TracIn(loss, 'heldout', held, layers=layers).fit(run).score(train)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  want = 0.0
  for c in range(run.num_checkpoints):
    p = run.checkpoint(c)
    g = flat_grads(loss, p, train, layers)
    v = flat_grads(loss, p, held, layers).mean(0)
    want = want + 0.3 * g @ v / (np.linalg.norm(g, axis=1) * np.linalg.norm(v))
  got = tracin.TracIn(loss, 'heldout_cos', held, layers=layers, chunk_size=5).fit(run).score(train)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  with pytest.raises(UserError, match='needs a held-out'):
    tracin.TracIn(loss, 'heldout')


def test_curriculum_weights():
  values = np.array([3., -1., 0.5, 2., 7., -4., 0., 1., 1.5, 2.5])
  w = tracin.curriculum_weights(values, 'weight', temperature=0.5)
  np.testing.assert_allclose(w.mean(), 1.0)
  assert (np.diff(w[np.argsort(values)]) > 0).all()  # strictly increasing in the value
  s = tracin.curriculum_weights(values, 'select', fraction=0.2)
  np.testing.assert_allclose(s.mean(), 1.0)
  assert set(np.flatnonzero(s)) == {4, 0}
  order = tracin.sample_order(s, 50, 4, seed=0)
  assert set(np.unique(order)) <= {0, 4}
  with pytest.raises(UserError, match="'hard'"):
    tracin.curriculum_weights(values, 'hard')


def explicit_mimic(loss, params, ref, batch, layers, cosine=False):
  v = ravel_pytree(pergrad.masked(jax.tree.map(jnp.subtract, ref, params), layers))[0]
  g = flat_grads(loss, params, batch, layers)
  s = -g @ v / np.linalg.norm(v)
  return s / np.linalg.norm(g, axis=1) if cosine else s


@pytest.mark.parametrize('layers,cosine', [('last', False), ('last', True), (None, False),
                                           (['dense_0'], True)])
def test_mimic_score_equals_formula(layers, cosine):
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data)
  ref = jax.tree.map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
  resolved = mimic.resolve_layers(loss, params, data, layers)
  assert resolved == (['dense_1'] if layers == 'last' else layers)
  val = mimic.Mimic(loss, ref, layers, cosine, chunk_size=5).fit(run)
  want = np.mean([explicit_mimic(loss, run.checkpoint(c), ref, data, resolved, cosine)
                  for c in range(run.num_checkpoints)], 0)
  np.testing.assert_allclose(val.score(data), want, rtol=1e-10)


def test_mimic_online_step_is_weighted_sgd_step():
  loss, params, data = problem()
  ref = jax.tree.map(lambda x: x + 0.3 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
  batches = sub(data, np.arange(12).reshape(3, 4))
  opt = optax.sgd(0.2)
  state, scores = mimic.train_online(loss, opt, init_inner_state(params, opt), batches, ref,
                                     temperature=0.5, layers=['dense_1'])
  p = params
  for t in range(3):
    b = sub(batches, t)
    s = explicit_mimic(loss, p, ref, b, ['dense_1'])
    np.testing.assert_allclose(scores[t], s, rtol=1e-10)
    w = 4 * np.exp(s / 0.5) / np.exp(s / 0.5).sum()
    g = jax.grad(lambda q: jnp.mean(jnp.asarray(w) * loss(q, b)))(p)
    p = jax.tree.map(lambda a, c: a - 0.2 * c, p, g)
  np.testing.assert_allclose(ravel_pytree(state.params)[0], ravel_pytree(p)[0], rtol=1e-10)


def test_mimic_filter_threshold():
  rng = np.random.default_rng(0)
  scores = np.concatenate([rng.normal(2, 0.3, 80), rng.normal(-1, 0.3, 20)])
  keep, thr = mimic.mimic_filter(scores)
  assert keep[:80].all() and not keep[80:].any() and -1 < thr < 2
  keep, thr = mimic.mimic_filter(scores, keep_fraction=0.5)
  assert keep.sum() == 50 and (scores[keep] >= scores[~keep].max()).all()


def explicit_dvemb_none_or_ef(loss, run, batches, curvature):
  """e_{t,j} = (lr/B) prod_{s>t}(I - lr H_s) g_{t,j} with H_s = explicit (1/B) G_s^T G_s."""
  steps, b = batches['label'].shape
  grads = [flat_grads(loss, run.checkpoint(t), sub(batches, t)) for t in range(steps)]
  out = []
  for t in range(steps):
    k = np.eye(grads[0].shape[1])
    for s in range(steps - 1, t, -1):
      h = grads[s].T @ grads[s] / b if curvature == 'empirical_fisher' else 0 * k
      k = k @ (np.eye(len(k)) - 0.3 * h)
    out.append(0.3 / b * grads[t] @ k.T)
  return np.stack(out)


def explicit_ggn(loss, model_apply, params, batch, exact):
  """(1/B) sum_j J_j^T (diag p_j - p_j p_j^T) J_j, or the exact Hessian of the mean loss."""
  flat, unravel = ravel_pytree(params)
  if exact:
    return jax.hessian(lambda v: jnp.mean(loss(unravel(v), batch)))(flat)
  logits = lambda v: model_apply(unravel(v), batch['image'])
  jac = jax.jacobian(logits)(flat)  # [B, C, P]
  p = jax.nn.softmax(logits(flat))
  h = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
  return jnp.einsum('bcp,bcd,bdq->pq', jac, h, jac) / p.shape[0]


@pytest.mark.parametrize('curvature', ['none', 'empirical_fisher', 'gauss_newton', 'exact'])
def test_dvemb_equals_explicit_backward_product(curvature):
  loss, params, data = problem(hidden=(3,))
  run, batches, _ = sgd_run(loss, params, data, steps=5, every=1)
  emb = dvemb.embed(loss, run, 12, None, curvature, num_classes=3, chunk_size=3)
  if curvature in ('none', 'empirical_fisher'):
    want = explicit_dvemb_none_or_ef(loss, run, batches, curvature)
  else:
    model = models.task_model(3, (3,), 'tanh')
    steps, b = batches['label'].shape
    grads = [flat_grads(loss, run.checkpoint(t), sub(batches, t)) for t in range(steps)]
    hs = [explicit_ggn(loss, model.apply, run.checkpoint(t), sub(batches, t), curvature == 'exact')
          for t in range(steps)]
    want = []
    for t in range(steps):
      k = np.eye(grads[0].shape[1])
      for s in range(steps - 1, t, -1):
        k = k @ (np.eye(len(k)) - 0.3 * hs[s])
      want.append(0.3 / b * grads[t] @ k.T)
    want = np.stack(want)
  np.testing.assert_allclose(emb.step, want, rtol=1e-9, atol=1e-13)
  # Per-example and per-phase sums of the step embeddings.
  idx = np.asarray(batches['index'])
  ex = np.zeros_like(emb.example)
  ph = np.zeros_like(emb.phase)
  for t in range(5):
    for j in range(4):
      ex[idx[t, j]] += want[t, j]
      ph[t * 3 // 5, idx[t, j]] += want[t, j]
  np.testing.assert_allclose(emb.example, ex, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(emb.phase, ph, rtol=1e-9, atol=1e-13)


def test_dvemb_refuses_sparse_checkpoints_and_projected_exact():
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data)
  with pytest.raises(UserError, match='checkpoint_every=1'):
    dvemb.embed(loss, run, 12, curvature='none')
  run, _, _ = sgd_run(loss, params, data, every=1)
  with pytest.raises(UserError, match='exact'):
    dvemb.embed(loss, run, 12, pergrad.gaussian_projection(4), 'exact')


def loo_experiment(curvatures, removals=40, steps=300, lr=0.05, seed=0):
  """Predicted vs real change of the test loss when one example is dropped from one step.

  Tiny tanh MLP 6-16-3, plain SGD, batch 8 from 40 examples in a fixed order. Each removal is
  a real retraining (vmapped `record_run` with that example's weight set to 0 at that step).
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(70, 3, 2, 1))
  y = np.argmax(x.reshape(-1, 6) @ rng.normal(size=(6, 3)) + rng.normal(size=(70, 3)), 1)
  data = {'image': jnp.asarray(x), 'label': jnp.asarray(y, jnp.int32), 'index': jnp.arange(70)}
  train, test = sub(data, range(40)), sub(data, range(40, 70))
  model = models.task_model(3, (16,), 'tanh')
  params = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(seed), x[:1]))
  loss = lambda p, b: models.per_example_loss(model.apply, p, b)
  batches = sub(train, np.stack([rng.permutation(40)[:8] for _ in range(steps)]))
  run = jax.jit(lambda b: base.record_run(loss, params, b, lr, 1))(batches)
  test_loss = lambda p: jnp.mean(loss(p, test))
  at_t, at_j = rng.choice(steps, removals, replace=False), rng.integers(0, 8, removals)
  weights = np.ones((removals, steps, 8))
  weights[np.arange(removals), at_t, at_j] = 0.0
  retrain = jax.vmap(lambda w: base.record_run(loss, params, batches, lr, steps, weights=w))
  finals = jax.jit(retrain)(jnp.asarray(weights)).final_params
  real = np.asarray(jax.vmap(test_loss)(finals) - test_loss(run.final_params))
  direction = dvemb.test_direction(loss, run.final_params, test)
  out = {}
  for curvature in curvatures:
    emb = jax.jit(lambda r, c=curvature: dvemb.embed(loss, r, 40, None, c, 3))(run)
    out[curvature] = spearmanr(np.asarray(emb.step[at_t, at_j] @ direction), real)[0]
  return out


def test_dvemb_predicts_real_leave_one_out_retraining():
  rho = loo_experiment(['gauss_newton', 'exact'])
  print(f'data value embedding vs real LOO retraining (40 removals): Spearman {rho}')
  assert rho['gauss_newton'] >= 0.8, rho
  assert rho['exact'] >= 0.95, rho


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2])
def test_dvemb_predicts_real_leave_one_out_retraining_other_seeds(seed):
  rho = loo_experiment(['gauss_newton', 'empirical_fisher', 'exact', 'none'], seed=seed)
  print(f'seed {seed}: data value embedding vs real LOO retraining: Spearman {rho}')
  assert rho['gauss_newton'] >= 0.8 and rho['exact'] >= 0.95, rho


class _Index(base.Valuation):
  def score(self, batch):
    return batch['index'].astype(jnp.float64) * 2.0 + batch['label']


def test_score_split_pads_and_keeps_order(tfds_dir):
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  split = pipeline.load_split('sklearn_digits', 'validation', tfds_dir, 0.2, 0)
  got = base.score_split(_Index().score, split, batch_size=128, progress=False)
  np.testing.assert_allclose(got, split.ids * 2.0 + split.label)


def test_rater_valuation_scores_are_rater_outputs():
  _, _, data = problem()
  rater = models.Rater(3, (4,))
  params = rater.init(jax.random.key(0), data)
  val = RaterValuation(rater, params).fit()
  np.testing.assert_allclose(val.value(data), rater.apply(params, data))
