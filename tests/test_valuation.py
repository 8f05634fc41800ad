"""Valuations against their definitions on tiny float64 models: explicit loops, sums and formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr
from sklearn.mixture import GaussianMixture

import ml_collections

from datarater import evaluation, pergrad, tasks
from datarater.errors import UserError
from datarater.valuation import base, dvemb, mimic, tracin
from tests.tiny import tiny_info


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def make_task(hidden=(5,), dim=6):
  return tasks.make_task(ml_collections.ConfigDict(
      {'name': 'mlp_classifier', 'hidden': hidden, 'activation': 'tanh'}), tiny_info(dim))


def problem(n=12, hidden=(5,), seed=0):
  """A float64 MLP (3 classes) on random 6-dim inputs, its loss and a dataset with `index`."""
  rng = np.random.default_rng(seed)
  task = make_task(hidden)
  data = {'image': jnp.asarray(rng.normal(size=(n, 6))),
          'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32),
          'index': jnp.arange(n)}
  params = jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64)),
                        task.init(jax.random.key(seed)))
  return task.per_example_loss, params, data


def sub(batch, idx):
  """The rows `idx` of each array (numpy indexing: op by op JAX compiles a gather per shape)."""
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x)[np.asarray(idx)]), batch)


_GRADS = {}


def flat_grad(loss, params, batch, i, layers=None):
  """One example's gradient (a batch of one), flattened; the grad function is jitted once per loss."""
  if loss not in _GRADS:
    _GRADS[loss] = jax.jit(jax.grad(lambda p, ex: loss(p, ex)[0]))
  g = _GRADS[loss](params, sub(batch, [i]))
  return flat([g['params'][l] for l in layers] if layers else g)


def flat(tree) -> np.ndarray:
  """ravel_pytree's vector in numpy (op by op, JAX compiles a concatenation per tree)."""
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def flat_grads(loss, params, batch, layers=None):
  return np.stack([flat_grad(loss, params, batch, i, layers)
                   for i in range(batch['label'].shape[0])])


def sgd_run(loss, params, data, steps=6, batch_size=4, lr=0.3, every=2, seed=0, weights=None):
  """A recorded run made by an explicit SGD loop on random batches of `data` (the oracle);
  `weights` [T, B] multiply the examples' losses in each step's mean (default 1); `lr`: one
  learning rate, or one per step."""
  order = np.random.default_rng(seed).integers(0, data['label'].shape[0], (steps, batch_size))
  batches = sub(data, order)
  weights = jnp.ones((steps, batch_size)) if weights is None else jnp.asarray(weights)
  grad = jax.grad(lambda p, b, w: jnp.mean(w * loss(p, b)))
  update = jax.jit(lambda p, b, w, lr: jax.tree.map(lambda a, g: a - lr * g, p, grad(p, b, w)))
  lrs = np.broadcast_to(np.asarray(lr, np.float64), (steps,))
  p, ckpts = params, []
  for t in range(steps):
    if t % every == 0:
      ckpts.append(p)
    p = update(p, sub(batches, t), weights[t], lrs[t])
  run = base.TrainingRun(
      batches=batches, weights=weights, step_lrs=jnp.asarray(lrs),
      checkpoints=jax.tree.map(lambda *x: jax.device_put(np.stack(x)), *ckpts),
      checkpoint_steps=jnp.arange(len(ckpts)) * every, final_params=p)
  return run, batches, order


def test_record_run_is_the_trainers_recording_of_plain_sgd(tfds_dir):
  """record_run on a real split: checkpoints every k steps, batches at the recorded positions,
  the final parameters k SGD steps past the last checkpoint."""
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(False):
    split = pipeline.load_split(digits_data(tfds_dir), 'validation')
    task = tasks.make_task(ml_collections.ConfigDict(
        {'name': 'mlp_classifier', 'hidden': (8,), 'activation': 'tanh'}), split.info)
    run, cost = base.record_run(task, split, steps=12, batch_size=64, learning_rate=0.3,
                                checkpoint_every=4)
    np.testing.assert_array_equal(run.checkpoint_steps, [0, 4, 8])
    assert run.batches['image'].shape == (12, 64, 8, 8, 1) and run.weights.shape == (12, 64)
    pos = np.asarray(run.batches['index'])
    np.testing.assert_array_equal(run.batches['label'], split.features['label'][pos])
    assert cost == int(np.sum(np.asarray(run.weights) > 0)) == 12 * 64 - 2 * 20  # 2 padded
    p = run.checkpoint(2)
    grad = jax.jit(jax.grad(lambda q, t: jnp.mean(run.weights[t] * task.per_example_loss(
        q, jax.tree.map(lambda x: x[t], run.batches)))))
    for t in range(8, 12):
      p = jax.tree.map(lambda a, g: a - 0.3 * g, p, grad(p, t))
    for got, want in zip(jax.tree.leaves(run.final_params), jax.tree.leaves(p)):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    with pytest.raises(UserError, match='checkpoint_every=5'):
      base.record_run(task, split, steps=12, batch_size=64, learning_rate=0.3,
                      checkpoint_every=5)



def test_recorded_run_of_a_config_uses_its_valuation_optimizer(tfds_dir):
  """factory.record with valuation.optimizer='momentum': from the first checkpoint (the init), the
  heavy-ball recursion m = mu m + g, theta -= lr m written out on the recorded batches reproduces
  every later checkpoint and the final parameters (plain SGD from the same start does not)."""
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  from inner_loop.optimizers import MOMENTUM  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(False):
    split = pipeline.load_split(digits_data(tfds_dir), 'validation')
    task = tasks.make_task(ml_collections.ConfigDict(
        {'name': 'mlp_classifier', 'hidden': (8,), 'activation': 'tanh'}), split.info)
    config = ml_collections.ConfigDict({'valuation': {
        'batch_size': 64, 'learning_rate': 0.2, 'optimizer': 'momentum', 'seed': 0}})
    run, _ = factory.record(config, task, split, steps=8, every=4)
    grad = jax.jit(jax.grad(lambda q, t: jnp.mean(run.weights[t] * task.per_example_loss(
        q, jax.tree.map(lambda x: x[t], run.batches)))))
    p = sgd = run.checkpoint(0)
    m = jax.tree.map(jnp.zeros_like, p)
    for t in range(8):
      if t == 4:
        for got, want in zip(jax.tree.leaves(run.checkpoint(1)), jax.tree.leaves(p)):
          np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
      g = grad(p, t)
      m = jax.tree.map(lambda a, b: MOMENTUM * a + b, m, g)
      p = jax.tree.map(lambda a, b: a - 0.2 * b, p, m)
      sgd = jax.tree.map(lambda a, b: a - 0.2 * b, sgd, grad(sgd, t))
    for got, want in zip(jax.tree.leaves(run.final_params), jax.tree.leaves(p)):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p),
                                                             jax.tree.leaves(sgd)))
    assert gap > 1e-3  # momentum and SGD part ways within these steps

def explicit_tracin(loss, run, a, b, layers=None):
  total = 0.0
  for c in range(run.num_checkpoints):
    p = run.checkpoint(c)
    ga, gb = flat_grads(loss, p, a, layers), flat_grads(loss, p, b, layers)
    total = total + float(np.asarray(run.step_lrs)[np.asarray(run.checkpoint_steps)[c]]) * ga @ gb.T
  return total


def explicit_heldout_cos(loss, run, a, held, layers=None):
  """sum_c lr_c cos(g_i, v_c), v_c the mean held-out gradient at checkpoint c, over `layers`."""
  total = 0.0
  for c in range(run.num_checkpoints):
    p = run.checkpoint(c)
    g = flat_grads(loss, p, a, layers)
    v = flat_grads(loss, p, held, layers).mean(0)
    lr = float(np.asarray(run.step_lrs)[np.asarray(run.checkpoint_steps)[c]])
    total = total + lr * g @ v / (np.linalg.norm(g, axis=1) * np.linalg.norm(v))
  return total


@pytest.mark.parametrize('layers,ghost', [pytest.param(None, True, marks=pytest.mark.slow),
                                          (['dense_1'], True), (['dense_0'], False)])
def test_self_influence_and_heldout_cos_of_some_layers_equal_explicit_sums(layers, ghost):
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data, lr=0.3 * 0.7 ** np.arange(6))  # each checkpoint its own
  a, b = sub(data, range(5)), sub(data, range(5, 12))
  ckpts, lrs = run.checkpoints, np.asarray(run.step_lrs)[np.asarray(run.checkpoint_steps)]
  if ghost:  # self-influence from ghost norms of the same layers: TracInCP's diagonal of a, a
    got = jax.jit(lambda c, l, a: tracin.self_influence(loss, c, l, a, layers, ghost=True))(
        ckpts, lrs, a)  # one program (op by op, each operation compiled alone)
    np.testing.assert_allclose(got, np.diag(explicit_tracin(loss, run, a, a, layers)), rtol=1e-10)
  if layers:  # held-out Grad-Cos of the same layers: v_c and its norm over them only
    got = jax.jit(lambda c, l, a, b: tracin.heldout_influence(
        loss, c, l, a, b, layers, cosine=True, chunk_size=2, ghost=ghost))(ckpts, lrs, a, b)
    np.testing.assert_allclose(got, explicit_heldout_cos(loss, run, a, b, layers), rtol=1e-10)


class _RecordedRun:
  """A `factory.record` cache that holds one run (made by the explicit SGD loop): factory.build
  values it as it would the trainer's recording of the config's run."""

  def __init__(self, run):
    self.run = run

  def get(self, name, make):
    del name, make
    return self.run, 0


@pytest.mark.parametrize('kind,layers', [('kronecker', ''), pytest.param(
    'gaussian', 'dense_1', marks=pytest.mark.slow)])
def test_projected_self_influence_equals_explicit_sum(kind, layers):
  """TracIn self-influence of projected gradients, as a config asks for it
  (`valuation.tracin_project`, `projection`, `projection_dim`, `projection_seed`, `layers`):
  sum_c lr_c ||g_i(theta_c) R||^2 over the chosen layers, one matrix R (read off the projection,
  row by row) at every checkpoint, lr_c the rate of the step checkpoint c was taken before."""
  from configs.digits import get_config  # pylint: disable=g-import-not-at-top
  from datarater.data.pipeline import Split  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data, lr=0.3 * 0.7 ** np.arange(6))
  config = get_config()
  v = config.valuation
  v.train_steps, v.checkpoint_every, v.chunk_size = 6, 2, 5
  v.tracin_mode, v.tracin_project, v.layers = 'self', True, layers
  v.projection, v.projection_dim, v.projection_seed = kind, 2 if kind == 'kronecker' else 5, 3
  n = data['label'].shape[0]
  split = Split({k: np.asarray(data[k]) for k in ('image', 'label')}, np.arange(n),
                np.zeros(n, np.int8), ('clean',), tiny_info(6))
  got = factory.build('tracin', config, make_task(), split, split, _RecordedRun(run))
  proj = (pergrad.kronecker_projection(2, 2, seed=3) if kind == 'kronecker' else
          pergrad.gaussian_projection(5, seed=3))
  chosen = params if not layers else {'params': {layers: params['params'][layers]}}
  vector, unravel = ravel_pytree(chosen)
  state = proj.init(chosen)
  r = np.asarray(jax.jit(lambda s: jax.vmap(lambda e: proj.apply(unravel(e), s))(
      jnp.eye(vector.size)))(state))
  assert r.shape[1] < r.shape[0]  # a projection to fewer dimensions, not the identity
  chosen = [layers] if layers else None
  want = sum(0.3 * 0.7 ** (2 * c) * np.sum((flat_grads(loss, run.checkpoint(c), data, chosen)
                                             @ r) ** 2, 1) for c in range(run.num_checkpoints))
  np.testing.assert_allclose(got.score(data), want, rtol=1e-10)
  assert not got.higher_is_better  # its value is -score: high self-influence is suspicious


@pytest.mark.parametrize('layers', [None, pytest.param(['dense_1'], marks=pytest.mark.slow)])
def test_tracin_modes_equal_explicit(layers):
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data, lr=0.3 * 0.7 ** np.arange(6))  # each step its own rate
  train, held = sub(data, range(8)), sub(data, range(8, 12))
  self_inf = tracin.TracIn(loss, 'self', layers=layers, chunk_size=3).fit(run)
  np.testing.assert_allclose(self_inf.score(train),
                             np.diag(explicit_tracin(loss, run, train, train, layers)), rtol=1e-10)
  ghost = tracin.TracIn(loss, 'self', layers=layers, ghost=True).fit(run)
  np.testing.assert_allclose(ghost.score(train), self_inf.score(train), rtol=1e-10)
  want = explicit_tracin(loss, run, train, held, layers).mean(1)  # dot with the mean gradient
  got = tracin.TracIn(loss, 'heldout', held, layers=layers).fit(run).score(train)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  want = explicit_heldout_cos(loss, run, train, held, layers)
  got = tracin.TracIn(loss, 'heldout_cos', held, layers=layers, chunk_size=5).fit(run).score(train)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert pergrad.ghost_covers(loss, params, train, layers)
  got = tracin.TracIn(loss, 'heldout_cos', held, layers=layers, ghost=True).fit(run).score(train)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  with pytest.raises(UserError, match='needs a held-out'):
    tracin.TracIn(loss, 'heldout')


def explicit_mimic(loss, params, ref, batch, layers, cosine=False):
  diff = jax.tree.map(jnp.subtract, ref, params)
  v = ravel_pytree([diff['params'][l] for l in layers] if layers else diff)[0]
  g = flat_grads(loss, params, batch, layers)
  s = -g @ v / np.linalg.norm(v)
  return s / np.linalg.norm(g, axis=1) if cosine else s


# ('last', False): 'last' is resolved in ('last', True), the plain score read in (None, False).
@pytest.mark.parametrize('layers,cosine', [pytest.param('last', False, marks=pytest.mark.slow),
                                           ('last', True), (None, False), (['dense_0'], True)])
def test_mimic_score_equals_formula(layers, cosine):
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data)
  ref = jax.jit(lambda q: jax.tree.map(
      lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), q))(params)
  resolved = mimic.resolve_layers(loss, params, data, layers)
  assert resolved == (['dense_1'] if layers == 'last' else layers)
  val = mimic.Mimic(loss, ref, layers, cosine, chunk_size=5).fit(run)
  want = np.mean([explicit_mimic(loss, run.checkpoint(c), ref, data, resolved, cosine)
                  for c in range(run.num_checkpoints)], 0)
  np.testing.assert_allclose(val.score(data), want, rtol=1e-10)
  ghost = mimic.Mimic(loss, ref, layers, cosine, ghost=True).fit(run)  # norms without gradients
  np.testing.assert_allclose(ghost.score(data), want, rtol=1e-10)


def test_ghost_cosine_norms_equal_materialised_in_float32():
  """heldout_cos and Mimic's cosine with ghost norms over all layers equal the
  per-example-gradient path in float32 (a 6 -> 16 -> 8 -> 3 MLP, 64 examples) to ~1e-6 (a
  chosen layer's ghost norms: the float64 checks above)."""
  with jax.enable_x64(False):
    rng = np.random.default_rng(3)
    task = make_task((16, 8))
    loss = task.per_example_loss
    data = {'image': jnp.asarray(rng.normal(size=(64, 6)), jnp.float32),
            'label': jnp.asarray(rng.integers(0, 3, 64), jnp.int32), 'index': jnp.arange(64)}
    params = task.init(jax.random.key(3))
    run, _, _ = sgd_run(loss, params, data, steps=4, batch_size=16, every=2)
    run = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, run)
    held = sub(data, range(48, 64))
    ref = jax.jit(lambda q: jax.tree.map(
        lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), q))(params)
    assert pergrad.ghost_covers(loss, params, data)
    got = [tracin.TracIn(loss, 'heldout_cos', held, ghost=g).fit(run).score(data)
           for g in (False, True)]
    assert got[0].dtype == jnp.float32
    np.testing.assert_allclose(got[1], got[0], rtol=2e-6, atol=1e-6 * np.abs(got[0]).max())
    got = [mimic.Mimic(loss, ref, None, True, ghost=g).fit(run).score(data)
           for g in (False, True)]
    np.testing.assert_allclose(got[1], got[0], rtol=2e-6, atol=1e-6 * np.abs(got[0]).max())


def test_mimic_filter_threshold():
  rng = np.random.default_rng(0)
  scores = np.concatenate([rng.normal(2, 0.3, 80), rng.normal(-1, 0.3, 20)])
  keep, thr = mimic.mimic_filter(scores)
  assert keep[:80].all() and not keep[80:].any() and -1 < thr < 2
  keep, thr = mimic.mimic_filter(scores, keep_fraction=0.5)
  assert keep.sum() == 50 and (scores[keep] >= scores[~keep].max()).all()
  # Mimic's keep column keeps what `launch.filter --keep` keeps: round(keep * N), also with ties
  # (brute force: sort by (score descending, id ascending), take the first round(keep * N)).
  for scores, ids, fraction in [(np.array([0., 1, 1, 1, 1, 2]), np.arange(6)[::-1], 0.5),
                                (np.arange(101.), np.arange(101), 0.05),
                                (rng.integers(0, 4, 999).astype(float), rng.permutation(999), 0.3)]:
    keep, thr = mimic.mimic_filter(scores, keep_fraction=fraction, ids=ids)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], ids[i]))
    want = np.zeros(len(scores), bool)
    want[order[:int(fraction * len(scores) + 0.5)]] = True
    np.testing.assert_array_equal(keep, want)
    assert thr == scores[want].min()
  # Components of unequal widths: the kept scores are those above where the posteriors cross
  # between the two means (found on a grid), whatever the wider component claims far out: a
  # harmful outlier below the narrow low mode (posterior crossing twice), a very good one above
  # the narrow high mode.
  for good, bad, outlier in [((2, 1.5, 200), (-1, 0.05, 50), -3.0),
                             ((2, 0.1, 200), (0, 1.5, 100), 8.0)]:
    scores = np.concatenate([rng.normal(*good), rng.normal(*bad), [outlier]])
    gm = GaussianMixture(2, random_state=0).fit(scores[:, None])
    grid = np.linspace(gm.means_.min(), gm.means_.max(), 200001)
    upper = gm.predict_proba(grid[:, None])[:, np.argmax(gm.means_[:, 0])] >= 0.5
    assert upper[-1] and np.sum(upper[1:] != upper[:-1]) == 1  # one crossing between the means
    keep, thr = mimic.mimic_filter(scores)
    np.testing.assert_array_equal(keep, scores >= grid[np.argmax(upper)])
    assert keep[-1] == (outlier > 0) and thr == scores[keep].min()


def explicit_dvemb_none_or_ef(loss, run, batches, curvature):
  """e_{t,j} = (lr/B) w_tj prod_{s>t}(I - lr H_s) g_{t,j}, H_s = explicit (1/B) G_s^T W_s G_s."""
  steps, b = batches['label'].shape
  w = np.asarray(run.weights)
  grads = [flat_grads(loss, run.checkpoint(t), sub(batches, t)) for t in range(steps)]
  out = []
  for t in range(steps):
    k = np.eye(grads[0].shape[1])
    for s in range(steps - 1, t, -1):
      h = (grads[s].T * w[s]) @ grads[s] / b if curvature == 'empirical_fisher' else 0 * k
      k = k @ (np.eye(len(k)) - 0.3 * h)
    out.append(0.3 / b * w[t][:, None] * grads[t] @ k.T)
  return np.stack(out)


def explicit_ggn(task, params, batch, weights, exact):
  """(1/B) sum_j w_j J_j^T (diag p_j - p_j p_j^T) J_j, or the exact Hessian of the weighted
  mean loss."""
  flat, unravel = ravel_pytree(params)
  if exact:
    return jax.hessian(lambda v: jnp.mean(weights * task.per_example_loss(unravel(v), batch)))(
        flat)
  logits = lambda v: task.logits(unravel(v), batch)
  jac = jax.jacobian(logits)(flat)  # [B, C, P]
  p = jax.nn.softmax(logits(flat))
  h = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
  return jnp.einsum('b,bcp,bcd,bdq->pq', weights, jac, h, jac) / p.shape[0]


@pytest.mark.parametrize('curvature', ['none', 'empirical_fisher', 'gauss_newton',
                                       pytest.param('exact', marks=pytest.mark.slow)])
def test_dvemb_equals_explicit_backward_product(curvature):
  loss, params, data = problem(hidden=(3,))
  task = make_task((3,))
  weights = np.ones((5, 4))
  weights[[1, 3, 4], [2, 0, 3]] = 0.0  # padding, as the last batch of an epoch has
  run, batches, _ = sgd_run(loss, params, data, steps=5, every=1, weights=weights)
  emb = jax.jit(lambda r: dvemb.embed(task, r, 12, None, curvature, chunk_size=3))(run)
  if curvature in ('none', 'empirical_fisher'):
    want = explicit_dvemb_none_or_ef(loss, run, batches, curvature)
  else:
    steps, b = batches['label'].shape
    grads = [flat_grads(loss, run.checkpoint(t), sub(batches, t)) for t in range(steps)]
    ggn = jax.jit(lambda p, b, w: explicit_ggn(task, p, b, w, curvature == 'exact'))
    hs = [ggn(run.checkpoint(t), sub(batches, t), weights[t]) for t in range(steps)]
    want = []
    for t in range(steps):
      k = np.eye(grads[0].shape[1])
      for s in range(steps - 1, t, -1):
        k = k @ (np.eye(len(k)) - 0.3 * hs[s])
      want.append(0.3 / b * weights[t][:, None] * grads[t] @ k.T)
    want = np.stack(want)
  np.testing.assert_allclose(emb.step, want, rtol=1e-9, atol=1e-13)
  # Per-example and per-phase sums of the step embeddings, over all 12 examples (0 for those
  # the run never trained on), against the rows the embeddings keep.
  idx = np.asarray(batches['index'])
  ex = np.zeros((12, want.shape[-1]))
  ph = np.zeros((3, 12, want.shape[-1]))
  for t in range(5):
    for j in range(4):
      ex[idx[t, j]] += want[t, j]
      ph[t * 3 // 5, idx[t, j]] += want[t, j]
  assert emb.example.shape[0] == 12  # rows: min(5 x 4 batch entries, the split's 12 examples)
  row, found = emb.rows(jnp.arange(12))
  assert np.array_equal(found, np.isin(np.arange(12), idx))
  got = np.where(np.asarray(found)[:, None], np.asarray(emb.example)[np.asarray(row)], 0.0)
  np.testing.assert_allclose(got, ex, rtol=1e-9, atol=1e-13)
  got = np.where(np.asarray(found)[None, :, None], np.asarray(emb.phase)[:, np.asarray(row)], 0.0)
  np.testing.assert_allclose(got, ph, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize('hidden,curvature', [
    ((), 'gauss_newton'), pytest.param((3,), 'exact', marks=pytest.mark.slow)])
def test_dvemb_is_the_first_order_leave_one_out_with_the_exact_hessian(hidden, curvature):
  """With the exact Hessian (softmax regression's Gauss-Newton matrix, the default, is exact;
  or curvature 'exact' on a tanh MLP) the embedding is exact to first order: <e_{t,j}, grad of
  the test loss at theta_T> equals -w_tj dL/dw_tj, the first-order rise of the test loss when
  example j leaves step t (its weight to 0), by autodiff through a plain SGD loop with a
  learning rate per step and uneven weights (padding 0, a short batch's B/real); an example's
  score sums its occurrences."""
  loss, params, data = problem(hidden=hidden)
  task = make_task(hidden)
  lrs = jnp.array([0.3, 0.1, 0.5, 0.2, 0.4])  # one per step: an lr read at the wrong step shows
  weights = np.ones((5, 4))
  weights[1, 2], weights[4] = 0.5, [4 / 3, 4 / 3, 4 / 3, 0.0]
  order = np.random.default_rng(0).integers(0, 12, (5, 4))
  batches, test = sub(data, order), sub(data, [0, 3, 5, 8, 11])

  def sgd(w):  # (final params, params before each step) of plain SGD on mean(w_t * l)
    def step(p, xs):
      batch, w_t, lr = xs
      g = jax.grad(lambda q: jnp.mean(w_t * loss(q, batch)))(p)
      return jax.tree.map(lambda a, b: a - lr * b, p, g), p
    return jax.lax.scan(step, params, (batches, w, lrs))

  @jax.jit
  def run_and_rise(w):  # the article's definition: retrain with weights w, differentiate
    test_loss = lambda w: jnp.mean(loss(sgd(w)[0], test))
    return sgd(w), -w * jax.grad(test_loss)(w)
  (final, checkpoints), want = run_and_rise(jnp.asarray(weights))
  want = np.asarray(want)
  run = base.TrainingRun(batches=batches, weights=jnp.asarray(weights), step_lrs=lrs,
                         checkpoints=checkpoints, checkpoint_steps=jnp.arange(5),
                         final_params=final)
  val = dvemb.DataValueEmbedding(task, 12, test, curvature=curvature).fit(run)
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(val.embeddings.step @ val.direction, want, rtol=1e-9, atol=1e-14)
  per_example = np.zeros(12)
  np.add.at(per_example, order.reshape(-1), want.reshape(-1))
  np.testing.assert_allclose(val.score({'index': jnp.arange(12)}), per_example, rtol=1e-9,
                             atol=1e-14)


def test_dvemb_memory_follows_the_run_not_the_split():
  """A split of 10^9 examples: embeddings hold rows for the run's 5 x 4 batch entries only (a
  dense [N, k] would need terabytes); examples outside the run score 0, inside as the rows."""
  loss, params, data = problem(hidden=(3,))
  run, batches, _ = sgd_run(loss, params, data, steps=5, every=1)
  n = 10 ** 9
  val = dvemb.DataValueEmbedding(make_task((3,)), n, data, curvature='none').fit(run)
  assert val.embeddings.example.shape[0] == 5 * 4
  idx = np.asarray(batches['index'])
  inside = int(idx[2, 1])
  scores = val.score({'index': jnp.asarray([inside, n - 1, 12])})
  direction = jax.jit(lambda p: dvemb.test_direction(loss, p, data))(run.final_params)
  want = sum(np.asarray(val.embeddings.step)[t, j] for t in range(5) for j in range(4)
             if idx[t, j] == inside) @ np.asarray(direction)
  np.testing.assert_allclose(scores, [want, 0.0, 0.0], rtol=1e-9, atol=1e-15)


def test_dvemb_refuses_sparse_checkpoints_and_projected_exact():
  loss, params, data = problem()
  run, _, _ = sgd_run(loss, params, data)
  with pytest.raises(UserError, match='checkpoint_every=1'):
    dvemb.embed(make_task(), run, 12, curvature='none')
  run, _, _ = sgd_run(loss, params, data, every=1)
  with pytest.raises(UserError, match='exact'):
    dvemb.embed(make_task(), run, 12, pergrad.gaussian_projection(4), 'exact')


def loo_experiment(curvatures, removals=40, steps=300, lr=0.05, seed=0):
  """Predicted vs real change of the test loss when one example is dropped from one step.

  Tiny tanh MLP 6-16-3, plain SGD, batch 8 from 40 examples in a fixed order. Each removal is
  a real retraining (a vmapped SGD scan with that example's weight set to 0 at that step).
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(70, 6))
  y = np.argmax(x @ rng.normal(size=(6, 3)) + rng.normal(size=(70, 3)), 1)
  data = {'image': jnp.asarray(x), 'label': jnp.asarray(y, jnp.int32), 'index': jnp.arange(70)}
  train, test = sub(data, range(40)), sub(data, range(40, 70))
  task = make_task((16,))
  params = jax.tree.map(lambda v: v.astype(jnp.float64), task.init(jax.random.key(seed)))
  loss = task.per_example_loss
  batches = sub(train, np.stack([rng.permutation(40)[:8] for _ in range(steps)]))

  def sgd(weights):
    """Plain SGD over the batches with per-example weights [T, B]: (params before each step,
    final params)."""
    def step(p, xs):
      batch, w = xs
      g = jax.grad(lambda q: jnp.mean(w * loss(q, batch)))(p)
      return jax.tree.map(lambda a, b: a - lr * b, p, g), p
    return jax.lax.scan(step, params, (batches, weights))[::-1]
  ones = jnp.ones((steps, 8))
  checkpoints, final = jax.jit(sgd)(ones)
  run = base.TrainingRun(batches=batches, weights=ones, step_lrs=jnp.full((steps,), lr),
                         checkpoints=checkpoints, checkpoint_steps=jnp.arange(steps),
                         final_params=final)
  test_loss = lambda p: jnp.mean(loss(p, test))
  at_t, at_j = rng.choice(steps, removals, replace=False), rng.integers(0, 8, removals)
  weights = np.ones((removals, steps, 8))
  weights[np.arange(removals), at_t, at_j] = 0.0
  finals = jax.jit(jax.vmap(lambda w: sgd(w)[1]))(jnp.asarray(weights))
  real = np.asarray(jax.jit(jax.vmap(test_loss))(finals) - jax.jit(test_loss)(run.final_params))
  direction = jax.jit(lambda p: dvemb.test_direction(loss, p, test))(run.final_params)
  out = {}
  for curvature in curvatures:
    emb = jax.jit(lambda r, c=curvature: dvemb.embed(task, r, 40, None, c))(run)
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


def test_values_of_a_split_pad_and_keep_the_order(tfds_dir):
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  split = pipeline.load_split(digits_data(tfds_dir, 0.2), 'validation', corrupt=True)
  got = _Index().values(split, batch_size=128)
  np.testing.assert_allclose(got, np.arange(len(split)) * 2.0 + split.features['label'])


def test_noise_auroc_counts_clean_over_corrupted_pairs(tfds_dir):
  """AUROC = P(a clean example scores above a corrupted one), ties half, by counting pairs;
  per kind, each kind of corruption against the clean examples."""
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  split = pipeline.load_split(digits_data(tfds_dir, 0.3, 2), 'validation', corrupt=True)
  scores = np.random.default_rng(0).integers(0, 6, len(split)) + 2.0 * ~split.is_corrupted
  clean, bad = scores[~split.is_corrupted], scores[split.is_corrupted]
  pairs = (clean[:, None] > bad[None, :]).mean() + 0.5 * (clean[:, None] == bad[None, :]).mean()
  assert evaluation.noise_auroc(scores, split.is_corrupted) == pytest.approx(pairs)
  by_kind = evaluation.auroc_by_kind(scores, split.corruption, split.corruption_kinds)
  assert by_kind == {'label_symmetric': pytest.approx(pairs)}
  assert np.isnan(evaluation.noise_auroc(scores, np.zeros(len(split), bool)))
  # Three kinds, each separated from the clean examples by its own amount (one not present): each
  # kind's pairs with the clean examples alone, not with the other kinds.
  rng = np.random.default_rng(1)
  record = rng.integers(0, 4, 400)
  record[record == 3] = 2
  scores = rng.integers(0, 6, 400) + np.array([2.0, 0.0, 3.0, 0.0])[record]
  kinds = ('clean', 'blur', 'flip', 'absent')
  by_kind = evaluation.auroc_by_kind(scores, record, kinds)
  assert sorted(by_kind) == ['blur', 'flip']
  clean = scores[record == 0]
  for k, kind in ((1, 'blur'), (2, 'flip')):
    bad = scores[record == k]
    pairs = ((clean[:, None] > bad[None, :]).mean()
             + 0.5 * (clean[:, None] == bad[None, :]).mean())
    assert by_kind[kind] == pytest.approx(pairs)


def test_dvemb_step_map_is_the_linearised_step_where_stable_and_never_amplifies():
  """I - lr H exactly when lr * lambda_max <= 2; otherwise no direction grows (float64)."""
  from datarater.valuation.dvemb import _step_map
  _step_map = jax.jit(_step_map)  # traced lr and psd, as in embed's scan: one compile for all
  rng = np.random.default_rng(0)
  g = rng.normal(size=(40, 12))
  h = g.T @ g / 40
  lam_max = np.linalg.eigvalsh(h).max()
  with jax.enable_x64():
    stable_lr = 1.9 / lam_max
    for psd in (True, False):
      np.testing.assert_allclose(_step_map(jnp.asarray(h), stable_lr, psd),
                                 np.eye(12) - stable_lr * h, atol=1e-12)
    for lr in (3.0 / lam_max, 50.0 / lam_max):
      m = np.asarray(_step_map(jnp.asarray(h), lr, True))
      assert np.linalg.norm(np.eye(12) - lr * h, 2) > 1.0
      assert np.linalg.norm(m, 2) <= 1.0 + 1e-12


def test_dvemb_step_map_skips_the_eigendecomposition_only_where_no_clip_acts():
  """On PSD matrices (full rank and rank-deficient, whose computed eigenvalues go ~-eps; rank 1,
  where ||H||_F is the top eigenvalue), of small and large norms, the map without an
  eigendecomposition (lr ||H||_F <= 2, psd) equals the clipped eigendecomposition's (psd=False
  always takes it), float64; a matrix that needs the clip takes it either way."""
  from datarater.valuation.dvemb import _step_map
  # Traced lr and psd, as in embed's scan: eagerly, each lr closed over by the lax.cond's branch
  # compiled a program of its own (dozens here).
  _step_map = jax.jit(_step_map)
  rng = np.random.default_rng(1)
  eigh_map = lambda h, lr: np.eye(len(h)) - (lambda lam, u: (u * np.clip(lr * lam, 0, 2)) @ u.T)(
      *np.linalg.eigh(h))
  with jax.enable_x64():
    # rank 1 (one row): ||H||_F = lambda_max, so lr ||H||_F is as small as the bound allows
    for rows, scale in ((40, 1e-3), (40, 1.0), (5, 1.0), (5, 1e3), (40, 1e4), (1, 1.0)):
      g = scale * rng.normal(size=(rows, 16))
      h = g.T @ g / rows
      fro = np.linalg.norm(h)
      for lr in (0.5 / fro, 2.0 / fro, 0.1, 1.9 / np.linalg.eigvalsh(h).max()):
        cheap = np.asarray(_step_map(jnp.asarray(h), lr, True))
        clipped = np.asarray(_step_map(jnp.asarray(h), lr, False))
        np.testing.assert_allclose(cheap, clipped, atol=1e-12)
        np.testing.assert_allclose(cheap, eigh_map(h, lr), atol=1e-12)
      big = 3.0 / np.linalg.eigvalsh(h).max()  # needs the clip at 2: taken with psd=True too
      np.testing.assert_allclose(_step_map(jnp.asarray(h), big, True), eigh_map(h, big),
                                 atol=1e-12)
      assert np.abs(eigh_map(h, big) - (np.eye(16) - big * h)).max() > 0.1
    # An indefinite H: psd=False clips its negative eigenvalues at 0 (nothing grows); psd=True
    # is a promise the caller keeps (embed passes weights >= 0), not checked here.
    s = rng.normal(size=(16, 16))
    h = (s + s.T) / 2 * 1e-2
    lr = 1.0 / np.linalg.norm(h)
    np.testing.assert_allclose(_step_map(jnp.asarray(h), lr, False), eigh_map(h, lr), atol=1e-12)
    assert np.linalg.eigvalsh(eigh_map(h, lr)).max() <= 1 + 1e-12
    np.testing.assert_allclose(_step_map(jnp.asarray(h), lr, True), np.eye(16) - lr * h,
                               atol=1e-12)


def test_launch_valuate_refuses_the_projection_and_layers_fields_for_mimic_and_datarater():
  """Mimic reads valuation.mimic_layers and projects nothing; the datarater method fits
  nothing: `--config.valuation.layers` / `projection` / `projection_dim` given to them were
  accepted and changed no score. TracIn and dvemb read them (dvemb refuses layers itself)."""
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  for field in ('layers', 'projection', 'projection_dim'):
    for method in ('mimic', 'datarater'):
      with pytest.raises(UserError, match=rf'--config.valuation.{field} is not read by method '
                                          rf'{method} \(it is read by tracin, dvemb alone\)'):
        factory.check_fields(method, [f'valuation.{field}'])
    for method in ('tracin', 'dvemb'):
      factory.check_fields(method, [f'valuation.{field}'])


def test_a_new_method_reads_the_recorded_runs_fields_without_being_listed(monkeypatch):
  """WORKSPACE.md's recipe: a method added to METHODS that values `record_for`'s run reads its
  fields (train_steps, batch_size, ...) as mimic does; they were refused for it, one by one,
  until listed under each in READ_BY. Another method's own field stays refused."""
  from datarater.config_checks import SECTIONS  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(factory, 'METHODS', factory.METHODS + ('gradnorm',))
  run_fields = ('train_steps', 'checkpoint_every', 'batch_size', 'optimizer', 'learning_rate',
                'seed', 'chunk_size')
  factory.check_fields('gradnorm', [f'valuation.{f}' for f in run_fields])
  for field in ('tracin_mode', 'mimic_layers', 'dvemb_steps', 'rater', 'layers'):
    with pytest.raises(UserError, match=rf'valuation.{field} is not read by method gradnorm'):
      factory.check_fields('gradnorm', [f'valuation.{field}'])
  with pytest.raises(UserError, match=r'it is read by tracin, mimic, gradnorm alone'):
    factory.check_fields('dvemb', ['valuation.train_steps'])
  assert {f for f in SECTIONS['valuation'] if factory.reads('gradnorm', f)} >= set(run_fields)


@pytest.fixture(scope='module')
def wide_mlp():
  """A float32 MLP 32 -> 128 -> 128 -> 3 (P = 21k), its recorded run (the explicit SGD loop), a
  split of 48 examples (with `index`) and the config reading them: big enough that one chunk of
  formed per-example gradients dwarfs the ghost path's activations."""
  from configs.digits import get_config  # pylint: disable=g-import-not-at-top
  from datarater.data.pipeline import Split  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(False):
    rng = np.random.default_rng(0)
    task = tasks.make_task(ml_collections.ConfigDict(
        {'name': 'mlp_classifier', 'hidden': (128, 128), 'activation': 'tanh'}), tiny_info(32))
    n = 48
    data = {'image': jnp.asarray(rng.normal(size=(n, 32)), jnp.float32),
            'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32), 'index': jnp.arange(n)}
    params = task.init(jax.random.key(0))
    run, _, _ = sgd_run(task.per_example_loss, params, data, steps=4, batch_size=8, every=2)
    split = Split({k: np.asarray(data[k]) for k in ('image', 'label')}, np.arange(n),
                  np.zeros(n, np.int8), ('clean',), tiny_info(32))
    config = get_config()
    v = config.valuation
    v.train_steps, v.checkpoint_every, v.chunk_size = 4, 2, n  # one chunk: all n examples
    return task, run, split, data, config


@pytest.mark.parametrize('method,mode', [('tracin', 'self'), ('tracin', 'heldout_cos'),
                                         ('mimic', None)])
def test_factory_takes_ghost_norms_on_an_mlp_and_forms_no_per_example_gradient(wide_mlp, method,
                                                                               mode):
  """Where factory.build says ghost norms pay (an MLP: every parameter in a Dense layer seen at
  one position per example), its valuation's scoring program never holds the chunk's [B, P]
  per-example gradients: XLA's compiled temporaries stay below a quarter of B * P floats, which
  the same valuation scoring with formed gradients does hold. (Equal scores either way: only
  memory and time can tell the paths apart.)"""
  import copy  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  task, run, split, data, config = wide_mlp
  with jax.enable_x64(False):
    config = copy.deepcopy(config)
    config.valuation.tracin_mode = mode or 'self'
    config.valuation.mimic_cosine = True
    config.valuation.mimic_layers = ''  # all layers: the gradients are [B, P]
    val = factory.build(method, config, task, split, split, _RecordedRun(run), checked=True)
    batch = {k: data[k] for k in ('image', 'label')}
    temp = lambda v: jax.jit(v.score).lower(batch).compile().memory_analysis().temp_size_in_bytes
    formed = 48 * sum(x.size for x in jax.tree.leaves(run.final_params)) * 4  # [B, P] float32
    assert temp(val) < formed / 4, (temp(val), formed)
    exact = copy.copy(val)  # the measurement sees formed gradients when they are formed
    exact.ghost = False
    assert temp(exact) > formed / 2, (temp(exact), formed)
