"""Factored per-example projections and the gradient store against brute force (float64):
explicit loops of single-example gradients, explicit np.kron matrices, full score matrices."""
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.digits_cnn import cnn
from datarater import pergrad, tasks
from datarater.data.pipeline import DataInfo, Split
from datarater.errors import UserError
from datarater.valuation import base, store
from tests.tiny import tiny_info


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def as64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64), tree)


def mlp(hidden=(5,), dim=6):
  return tasks.make_task(ml_collections.ConfigDict(
      {'name': 'mlp_classifier', 'hidden': hidden, 'activation': 'tanh'}), tiny_info(dim))


def image_info(size=6):
  spec = {'image': jax.ShapeDtypeStruct((size, size, 1), np.float32),
          'label': jax.ShapeDtypeStruct((), np.int32)}
  return DataInfo('tiny_images', spec, {'label': 3}, ('image', 'label'))


class SeqModel(nn.Module):
  """A Dense layer shared by 3 positions of each example, a mean, then a bias-free head."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4, name='embed')(x.reshape(x.shape[0], 3, 2))).mean(1)
    return nn.Dense(3, use_bias=False, name='head')(h)


def projected(loss, params, batch, projection, then=None, chunk=3):
  """per_example_projected under jit (eagerly, every op of the tail chunk compiles alone)."""
  return jax.jit(lambda p, b: pergrad.per_example_projected(loss, p, b, projection, then, chunk))(
      params, batch)


def cross_entropy(logits, labels):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]


def model(kind, num=7, seed=0):
  """(loss, params, batch, the Dense layers as (name, path in params['params'])) of a tiny model:
  'mlp' (6 -> 5 -> 3), 'cnn' (two patch convolutions over 6x6 images, then a head) or 'seq'
  (a Dense over 3 positions, a head without bias)."""
  rng = np.random.default_rng(seed)
  labels = jnp.asarray(rng.integers(0, 3, num), jnp.int32)
  if kind == 'mlp':
    task = mlp()
    batch = {'image': jnp.asarray(rng.normal(size=(num, 6))), 'label': labels}
    layers = [('dense_0', ('dense_0',)), ('dense_1', ('dense_1',))]
  elif kind == 'cnn':
    task = tasks.make_task(cnn(channels=(2, 3), strides=(1, 2), groups=1, activation='tanh'),
                           image_info())
    batch = {'image': jnp.asarray(rng.normal(size=(num, 6, 6, 1))), 'label': labels}
    layers = [('conv_0/kernel', ('conv_0', 'kernel')), ('conv_1/kernel', ('conv_1', 'kernel')),
              ('head', ('head',))]
  else:
    m = SeqModel()
    batch = {'image': jnp.asarray(rng.normal(size=(num, 6))), 'label': labels}
    loss = lambda p, b: cross_entropy(m.apply(p, b['image']), b['label'])
    return loss, as64(jax.jit(m.init)(jax.random.key(seed), batch['image'])), batch, [
        ('embed', ('embed',)), ('head', ('head',))]
  return task.per_example_loss, as64(jax.jit(task.init)(jax.random.key(seed))), batch, layers


def augmented(tree, path):
  """A layer's kernel with its bias appended as one more input row, row-major flattened."""
  node = tree['params']
  for k in path:
    node = node[k]
  m = np.asarray(node['kernel'])
  if 'bias' in node:
    m = np.concatenate([m, np.asarray(node['bias'])[None]])
  return m.reshape(-1)


_GRADS = {}


def loop_grads(loss, params, batch):
  """Each example's gradient pytree, by a Python loop of jax.grad on batches of one."""
  if loss not in _GRADS:
    _GRADS[loss] = jax.jit(jax.grad(lambda p, ex: loss(p, ex)[0]))
  n = batch['label'].shape[0]
  rows = jax.tree.map(np.asarray, batch)  # sliced in numpy (op by op: a compile per shape)
  return [_GRADS[loss](params, jax.tree.map(lambda x: x[i:i + 1], rows)) for i in range(n)]


def kron_project(trees, layers, state):
  """[len(trees), D]: each layer's flattened [kernel; bias] times the explicit np.kron(P_in,
  P_out) of the state's factors, layers side by side."""
  mats = [np.kron(np.asarray(a), np.asarray(b)) for a, b in state.factors]
  return np.stack([np.concatenate([augmented(t, path) @ k for (_, path), k in zip(layers, mats)])
                   for t in trees])


def projected_oracle(loss, params, batch, layers, state):
  return kron_project(loop_grads(loss, params, batch), layers, state)


# ('mlp', 3) runs with the slow checks: test_store_files_metadata_and_queries_equal_brute_force
# compares the same chunked projection of an MLP (chunks of 3, a tail of 1) with this oracle.
@pytest.mark.parametrize('kind,chunk', [('mlp', None),
                                        pytest.param('mlp', 3, marks=pytest.mark.slow),
                                        ('cnn', 4), ('seq', 2)])
def test_factored_projection_equals_kron_of_loop_gradients(kind, chunk):
  loss, params, batch, layers = model(kind)
  proj = pergrad.factored_projection(3, 2, seed=5)
  state = proj.init(loss, params, batch)
  assert list(state.names) == [name for name, _ in layers]
  got = projected(loss, params, batch, state, chunk=chunk)
  want = projected_oracle(loss, params, batch, layers, state)
  assert got.shape == (7, len(layers) * 6) == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
  # The projection object initialises itself; the factors are drawn from the seed alone.
  np.testing.assert_allclose(projected(loss, params, batch, proj, chunk=chunk), got, rtol=1e-12,
                             atol=1e-15)
  if kind == 'cnn':  # a chosen layer: the same block as in the full projection
    one = pergrad.factored_projection(3, 2, seed=5, layers=['conv_1'])
    part = projected(loss, params, batch, one, chunk=chunk)
    np.testing.assert_allclose(part, want[:, 6:12], rtol=1e-10, atol=1e-13)


def test_projected_vectors_and_transforms_follow_the_definitions():
  loss, params, batch, layers = model('cnn')
  state = pergrad.factored_projection(4, 3, seed=1).init(loss, params, batch)
  g = projected_oracle(loss, params, batch, layers, state)
  v = jax.tree.map(lambda x: np.cos(np.arange(x.size, dtype=x.dtype) + 2.).reshape(x.shape),
                   params)
  pv = kron_project([v], layers, state)[0]

  @jax.jit
  def everything(p, b, v):  # one compile for all of them
    run = lambda then: pergrad.per_example_projected(loss, p, b, state, then, chunk_size=3)
    pv = pergrad.project_params(state, v)
    formed = pergrad.per_example(loss, p, b, pergrad.factored_transform(state), chunk_size=3)
    return (pv, run(pergrad.dot(pv)), run(pergrad.sq_norm()), run(pergrad.normalize()), formed)

  got_pv, dots, norms, units, formed = everything(params, batch, v)
  np.testing.assert_allclose(got_pv, pv, rtol=1e-11)
  np.testing.assert_allclose(dots, g @ pv, rtol=1e-10)
  np.testing.assert_allclose(norms, np.sum(g ** 2, 1), rtol=1e-10)
  np.testing.assert_allclose(units, g / np.linalg.norm(g, axis=1, keepdims=True), rtol=1e-10)
  # The same map on formed gradients, as a GradTransform.
  np.testing.assert_allclose(formed, g, rtol=1e-10, atol=1e-13)


def test_factors_are_seeded_scaled_gaussians_per_layer():
  task = mlp(hidden=(64,), dim=63)
  loss, params = task.per_example_loss, as64(jax.jit(task.init)(jax.random.key(0)))
  batch = {'image': jnp.zeros((2, 63)), 'label': jnp.zeros((2,), jnp.int32)}
  state = pergrad.factored_projection(40, 30, seed=3).init(loss, params, batch)
  (a0, b0), (a1, b1) = state.factors
  assert a0.shape == (64, 40) and b0.shape == (64, 30) and a1.shape == (65, 40)
  assert b1.shape == (3, 30)
  for x, k in [(a0, 40), (b0, 30), (a1, 40)]:  # entries ~ N(0, 1/k): the var has rel. std ~3%
    assert abs(float(x.mean())) < 0.1 / np.sqrt(k)
    assert abs(float(x.var()) * k - 1) < 0.15
  again = pergrad.factored_projection(40, 30, seed=3).init(loss, params, batch)
  np.testing.assert_array_equal(again.factors[1][0], a1)
  other = pergrad.factored_projection(40, 30, seed=4).init(loss, params, batch)
  assert not np.allclose(other.factors[0][0], a0)
  assert not np.allclose(a0[:, :30], b0[:64])  # in and out factors are distinct draws
  assert state.describe()['shapes'] == [[64, 64], [65, 3]] and state.dim == 2 * 1200



def test_equal_shaped_layers_get_their_own_factors():
  """Each Dense layer draws its own factors: in an MLP 7 -> 8 -> 8 -> 3 the output factors of
  layers 0 and 1 ([8, k_out] both) and the input factors of layers 1 and 2 ([9, k_in] both) have
  equal shapes but must be different draws (one key for all layers would make them equal)."""
  task = mlp(hidden=(8, 8), dim=7)
  loss, params = task.per_example_loss, as64(jax.jit(task.init)(jax.random.key(0)))
  batch = {'image': jnp.zeros((2, 7)), 'label': jnp.zeros((2,), jnp.int32)}
  state = pergrad.factored_projection(4, 3, seed=2).init(loss, params, batch)
  (a0, b0), (a1, b1), (a2, b2) = state.factors
  assert b0.shape == b1.shape == (8, 3) and a1.shape == a2.shape == (9, 4)
  assert not np.allclose(b0, b1)
  assert not np.allclose(a1, a2)
  # A layer's factors do not depend on which others are selected.
  name = state.names[1]
  alone = pergrad.factored_projection(4, 3, seed=2, layers=[name]).init(loss, params, batch)
  np.testing.assert_array_equal(alone.factors[0][0], a1)
  np.testing.assert_array_equal(alone.factors[0][1], b1)

class WithScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x) * self.param('scale', nn.initializers.ones, ())


class Twice(nn.Module):
  @nn.compact
  def __call__(self, x):
    d = nn.Dense(6)
    return nn.Dense(3, name='head')(d(jnp.tanh(d(x))))


def test_refuses_uncovered_parameters_and_bad_layers():
  _, _, batch, _ = model('mlp')
  for module in (WithScale(), Twice()):
    params = module.init(jax.random.key(0), batch['image'])
    loss = lambda p, b, m=module: cross_entropy(m.apply(p, b['image']), b['label'])
    with pytest.raises(UserError, match='Dense layers hold|called twice'):
      projected(loss, params, batch, pergrad.factored_projection(2, 2))
  # Naming the covered layer projects only it.
  module = WithScale()
  params = module.init(jax.random.key(0), batch['image'])
  loss = lambda p, b: cross_entropy(module.apply(p, b['image']), b['label'])
  got = projected(loss, params, batch, pergrad.factored_projection(2, 2, layers='Dense_0'))
  assert got.shape == (7, 4)
  loss, params, batch, _ = model('mlp')
  with pytest.raises(UserError, match="no Dense layer 'dense_7'"):
    pergrad.factored_projection(2, 2, layers=['dense_1', 'dense_7']).init(loss, params, batch)
  with pytest.raises(UserError, match='>= 1'):
    pergrad.factored_projection(0, 2)


# ----------------------------------------------------------------------------- the store


def dataset(n=13, seed=0):
  """A split of n random 6-dim examples with TFDS ids distinct from their positions."""
  rng = np.random.default_rng(seed)
  features = {'image': rng.normal(size=(n, 6)), 'label': rng.integers(0, 3, n).astype(np.int32)}
  return Split(features, 100 + 3 * np.arange(n), np.zeros(n, np.int8), ('clean',), tiny_info(6))


def sgd_run(loss, params, split, steps=6, batch_size=4, every=2, seed=0, weights=None):
  """A recorded run from an explicit SGD loop on random batches (learning rate 0.3 / (1 + t/4))."""
  order = np.random.default_rng(seed).integers(0, len(split), (steps, batch_size))
  rows = split.take(order)  # numpy: each step's batch sliced without a compile
  batches = jax.tree.map(jnp.asarray, rows)
  lrs = 0.3 / (1 + np.arange(steps) / 4)
  weights = np.ones((steps, batch_size)) if weights is None else weights
  grad = jax.jit(jax.grad(lambda p, b, w: jnp.mean(w * loss(p, b))))
  p, ckpts = params, []
  for t in range(steps):
    if t % every == 0:
      ckpts.append(p)
    p = jax.tree.map(lambda a, g, t=t: a - lrs[t] * g, p,
                     grad(p, jax.tree.map(lambda x, t=t: x[t], rows), weights[t]))
  return base.TrainingRun(
      batches=batches, weights=jnp.asarray(weights), step_lrs=jnp.asarray(lrs),
      checkpoints=jax.tree.map(lambda *x: jnp.stack(x), *ckpts),
      checkpoint_steps=jnp.arange(len(ckpts)) * every, final_params=p)


LAYERS = [('dense_0', ('dense_0',)), ('dense_1', ('dense_1',))]


@pytest.fixture(scope='module')
def setup():
  with jax.enable_x64(True):
    task = mlp()
    loss, params = task.per_example_loss, as64(jax.jit(task.init)(jax.random.key(0)))
    split = dataset()
    run = sgd_run(loss, params, split)
    test = jax.tree.map(jnp.asarray, dataset(5, seed=1).take(np.arange(5)))
    train = jax.tree.map(jnp.asarray, split.take(np.arange(len(split))))
    state = pergrad.factored_projection(3, 2, seed=7).init(loss, params, train)
    ckpts = [run.checkpoint(c) for c in range(run.num_checkpoints)]
    oracle = {'train': [projected_oracle(loss, p, train, LAYERS, state) for p in ckpts],
              'test': [projected_oracle(loss, p, test, LAYERS, state) for p in ckpts],
              'lrs': [0.3, 0.3 / 1.5, 0.3 / 2]}
    yield task, split, run, test, state, oracle


def test_store_files_metadata_and_queries_equal_brute_force(setup, tmp_path):
  task, split, run, test, state, o = setup
  loss = task.per_example_loss
  proj = pergrad.factored_projection(3, 2, seed=7)
  s = store.build(str(tmp_path / 'g'), loss, run, split, proj, split_name='train[:13]',
                  block_size=4, chunk_size=3, dtype='float64')
  meta = json.load(open(tmp_path / 'g' / 'meta.json'))
  assert meta['projection']['kind'] == 'factored_gaussian'
  assert (meta['projection']['seed'], meta['projection']['k_in'], meta['projection']['k_out'],
          meta['projection']['names']) == (7, 3, 2, ['dense_0', 'dense_1'])
  assert meta['num_examples'] == 13 and meta['dim'] == 12 and meta['dataset'] == 'tiny'
  assert meta['split'] == 'train[:13]' and meta['ids']['file'] == 'ids.npy'
  ids = np.load(tmp_path / 'g' / 'ids.npy')
  assert ids.dtype == np.int64
  np.testing.assert_array_equal(ids, 100 + 3 * np.arange(13))
  np.testing.assert_array_equal(s.ids, ids)
  assert [c['step'] for c in meta['checkpoints']] == [0, 2, 4]
  np.testing.assert_allclose([c['learning_rate'] for c in meta['checkpoints']], o['lrs'])
  assert sorted(os.listdir(tmp_path)) == ['g']  # nothing partial left beside it
  for c in range(3):
    g = np.load(tmp_path / 'g' / f'grads_{c}.npy', mmap_mode='r')
    assert g.dtype == np.float64 and g.shape == (13, 12)
    np.testing.assert_allclose(g, o['train'][c], rtol=1e-10, atol=1e-13)
  lrs, tr, te = o['lrs'], o['train'], o['test']
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)

  np.testing.assert_allclose(s.self_influence(block_size=5),
                             sum(lr * np.sum(g ** 2, 1) for lr, g in zip(lrs, tr)), rtol=1e-10)
  full = sum(lr * g @ t.T for lr, g, t in zip(lrs, tr, te))
  np.testing.assert_allclose(s.tracin(loss, run, test, block_size=5, chunk_size=2), full,
                             rtol=1e-10)
  np.testing.assert_allclose(s.tracin(loss, run, test, cosine=True, block_size=5),
                             sum(lr * unit(g) @ unit(t).T for lr, g, t in zip(lrs, tr, te)),
                             rtol=1e-10)
  # Held-out influence: the dot with the mean projected held-out gradient (or cosines).
  np.testing.assert_allclose(s.heldout_influence(loss, run, test, block_size=5),
                             sum(lr * g @ t.mean(0) for lr, g, t in zip(lrs, tr, te)), rtol=1e-10)
  np.testing.assert_allclose(s.heldout_influence(loss, run, test, cosine=True),
                             sum(lr * unit(g) @ unit(t.mean(0)) for lr, g, t in zip(lrs, tr, te)),
                             rtol=1e-10)
  # Mimic: -<g, P(ref - theta_c)> / ||ref - theta_c||, averaged over checkpoints.
  ref = jax.tree.map(lambda x: np.asarray(x) + 0.1 * np.sin(np.arange(x.size).reshape(x.shape)),
                     run.final_params)
  for cosine in (False, True):
    want = 0.0
    for c in range(3):
      diff = jax.tree.map(lambda r, x: r - np.asarray(x), ref, run.checkpoint(c))
      norm = np.linalg.norm(np.concatenate([augmented(diff, p) for _, p in LAYERS]))
      g = unit(tr[c]) if cosine else tr[c]
      want = want - g @ kron_project([diff], LAYERS, state)[0] / norm / 3
    np.testing.assert_allclose(s.mimic(loss, run, ref, cosine, block_size=4), want, rtol=1e-10)
  # Top-k by a running merge over blocks = argsort of the full [M, N] matrix.
  top = s.top_k(loss, run, test, 3, block_size=4, test_block_size=2)
  order = np.argsort(-full.T, axis=1, kind='stable')[:, :3]
  np.testing.assert_array_equal(top.support_ids, s.ids[order])
  np.testing.assert_allclose(top.support_scores, np.take_along_axis(full.T, order, 1), rtol=1e-10)
  order = np.argsort(full.T, axis=1, kind='stable')[:, :3]
  np.testing.assert_array_equal(top.oppose_ids, s.ids[order])
  np.testing.assert_allclose(top.oppose_scores, np.take_along_axis(full.T, order, 1), rtol=1e-10)
  cos_full = sum(lr * unit(g) @ unit(t).T for lr, g, t in zip(lrs, tr, te)).T
  top = s.top_k(loss, run, test, 20, cosine=True, block_size=5)
  assert top.support_ids.shape == (5, 13)  # k > N: all of them, in order
  np.testing.assert_array_equal(top.support_ids,
                                s.ids[np.argsort(-cos_full, axis=1, kind='stable')])
  # The store answers only for its own run, and is not overwritten by accident.
  other = sgd_run(loss, run.final_params, split)
  with pytest.raises(UserError, match='not the one'):
    s.tracin(loss, other, test)
  with pytest.raises(UserError, match='already exists'):
    store.build(str(tmp_path / 'g'), loss, run, split, proj)


def test_a_store_of_a_layer_whose_weights_the_loss_also_reads_elsewhere_is_refused(setup,
                                                                                   tmp_path):
  """A loss that also reads dense_0's kernel outside its call (a tied decoder) has per-example
  gradients the projected Dense gradients miss: the store refuses it, not writes them; a store
  of dense_1 alone is exact (test above) and still built."""
  task, split, run, *_ = setup
  kernel = lambda p: p['params']['dense_0']['kernel']
  tied = lambda p, b: task.per_example_loss(p, b) + 0.1 * jnp.sum(
      (b['image'] @ kernel(p)) ** 2, -1)
  with pytest.raises(UserError, match=r"gradient store: the Dense layers \['dense_0', 'dense_1'\] "
                     'called on each example do not make its whole gradient'):
    store.build(str(tmp_path / 'g'), tied, run, split, pergrad.factored_projection(3, 2))
  assert not os.listdir(tmp_path)
  store.build(str(tmp_path / 'g1'), tied, run, split,
              pergrad.factored_projection(3, 2, layers=['dense_1']))


def test_mimic_of_a_store_of_some_layers_normalises_by_those_layers_only(setup, tmp_path):
  """A store projecting only 'dense_1' of the MLP: Mimic = mean over checkpoints of
  -<g_ic, P(ref - theta_c)> / ||ref - theta_c|| with the norm over dense_1's [kernel; bias] alone
  (float64 brute force: loop gradients, explicit np.kron); dense_0's difference counts nowhere."""
  task, split, run, _, _, _ = setup
  loss = task.per_example_loss
  one = [('dense_1', ('dense_1',))]
  proj = pergrad.factored_projection(3, 2, seed=7, layers=['dense_1'])
  s = store.build(str(tmp_path / 'g1'), loss, run, split, proj, block_size=4, chunk_size=3,
                  dtype='float64')
  train = jax.tree.map(jnp.asarray, split.take(np.arange(len(split))))
  state = proj.init(loss, run.final_params, train)
  assert state.names == ('dense_1',)
  ref = jax.tree.map(lambda x: np.asarray(x) + 0.1 * np.cos(np.arange(x.size).reshape(x.shape)),
                     run.final_params)
  want, ratio = 0.0, []
  for c in range(run.num_checkpoints):
    diff = jax.tree.map(lambda r, x: r - np.asarray(x), ref, run.checkpoint(c))
    norm = np.linalg.norm(augmented(diff, ('dense_1',)))
    ratio.append(np.linalg.norm(np.concatenate([augmented(diff, ('dense_0',)),
                                                augmented(diff, ('dense_1',))])) / norm)
    g = projected_oracle(loss, run.checkpoint(c), train, one, state)
    want = want - g @ kron_project([diff], one, state)[0] / norm / run.num_checkpoints
  assert min(ratio) > 1.05  # the unprojected layer's share of the difference is not negligible
  np.testing.assert_allclose(s.mimic(loss, run, ref, block_size=4), want, rtol=1e-10)

def test_a_model_of_other_layer_sizes_is_refused_though_the_dimension_matches(setup, tmp_path):
  """A store built with a 6-5-3 MLP (factors [6+1 bias, 5] and [5+1, 3]) refuses a 6-7-3 MLP
  (factors [7, 7] and [8, 3]): same 2 layers, k_in=3 and k_out=2, so both give dim 2*3*2 = 12,
  yet its gradients are projected by different factors. One UserError names both layouts; the
  store's own model still passes."""
  task, split, run, test, _, _ = setup
  s = store.build(str(tmp_path / 'g'), task.per_example_loss, run, split,
                  pergrad.factored_projection(3, 2, seed=7), block_size=13, dtype='float64')
  assert s.dim == 12
  s.projection_state(task.per_example_loss, run.final_params, test)  # its own model: accepted
  wide = mlp(hidden=(7,))
  params = as64(jax.jit(wide.init)(jax.random.key(0)))
  assert pergrad.factored_projection(3, 2, seed=7).init(
      wide.per_example_loss, params, test).dim == 12  # the dimension alone cannot tell
  with pytest.raises(UserError, match='does not match the gradient store') as e:
    s.projection_state(wide.per_example_loss, params, test)
  message = str(e.value)
  assert '\n' not in message
  assert '[[7, 5], [6, 3]]' in message and '[[7, 7], [8, 3]]' in message


def _stable_merge(best_s, best_i, s, i, k, sign):
  """The host merge by stable sort the device merge replaced (the oracle for ties)."""
  s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
  order = np.argsort(-sign * s, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


@pytest.mark.parametrize('dtype', [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)])
def test_running_top_k_breaks_ties_as_a_stable_sort(dtype):
  """Scores with many ties, +-0.0, +-inf and NaN, merged block by block on the device: the
  same rows (and scores, bit for bit) as the stable host sort and as argsort of all of them."""
  rng = np.random.default_rng(0)
  full = rng.integers(-3, 4, (6, 37)).astype(dtype)
  full[rng.random(full.shape) < 0.1] = -0.0
  full[0, [3, 9]], full[1, [5, 20]], full[2, [1, 30]] = np.inf, -np.inf, np.nan
  full[2, [2, 25]], full[2, 7] = -np.inf, np.inf  # NaN goes after -inf, for either sign
  full[3, :] = 0.0
  full[3, ::3] = -0.0
  for k, block in ((1, 5), (3, 4), (7, 7), (10, 3), (37, 8)):
    empty = (jnp.zeros((6, 0), dtype), jnp.zeros((6, 0), jnp.int32))
    dev, host_sup = (empty, empty), (full[:, :0], np.zeros((6, 0), np.int64))
    host_opp = host_sup
    for start in range(0, 37, block):
      s = full[:, start:start + block]
      i = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
      dev = store._merge_block(*dev, jnp.asarray(s), np.int32(start), k)
      host_sup = _stable_merge(*host_sup, s, i, k, 1)
      host_opp = _stable_merge(*host_opp, s, i, k, -1)
    (sup_s, sup_i), (opp_s, opp_i) = jax.device_get(dev)
    for (got_s, got_i), (want_s, want_i), sign in (((sup_s, sup_i), host_sup, 1),
                                                   ((opp_s, opp_i), host_opp, -1)):
      np.testing.assert_array_equal(got_i, want_i)
      np.testing.assert_array_equal(got_i, np.argsort(-sign * full, 1, kind='stable')[:, :k])
      assert got_s.dtype == dtype
      np.testing.assert_array_equal(got_s.view(f'u{got_s.itemsize}'),
                                    want_s.view(f'u{want_s.itemsize}'))


def _build_tiny_store(path: str, n: int) -> None:
  """The tiny MLP's store of `dataset(n)` at `path`, its errors as a launcher reports them."""
  from datarater.errors import exit_on_user_error  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True), exit_on_user_error():
    task = mlp()
    split = dataset(n)
    run = sgd_run(task.per_example_loss, as64(jax.jit(task.init)(jax.random.key(0))), split)
    store.build(path, task.per_example_loss, run, split, pergrad.factored_projection(3, 2, seed=7),
                block_size=1024)


@pytest.mark.slow  # ~4 s: a forked child compiles its own build
def test_a_store_on_a_full_disk_is_one_line_and_builds_whole_once_there_is_room(tmp_path, tmpfs):
  """The store's files are memory-mapped: on a disk too small for them, writing through the map
  killed the process with SIGBUS (the files were created sparse). Their space is now reserved
  first: one line and exit 2; given room, the build starts again and its files are those of a
  build on a roomy disk."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from tests import forked, conftest  # pylint: disable=g-import-not-at-top
  n = 4096  # [n, 12] float32 per checkpoint: 192 KiB a file, 3 files
  disk = tmpfs('128k')  # room for the files' headers and ids, not for their rows
  failed = forked.call(_build_tiny_store, os.path.join(disk, 'g'), n,
                       env=conftest.subprocess_env(1))
  assert failed.returncode == 2, (failed.returncode, failed.stderr[-2000:])
  assert failed.stderr.startswith('error: cannot write gradient store') and \
      'No space left on device' in failed.stderr and \
      len(failed.stderr.strip().splitlines()) == 1, failed.stderr
  assert not os.path.exists(os.path.join(disk, 'g'))
  subprocess.run(['mount', '-o', 'remount,size=4m', disk], check=True)
  _build_tiny_store(os.path.join(disk, 'g'), n)
  _build_tiny_store(str(tmp_path / 'roomy'), n)
  names = sorted(os.listdir(tmp_path / 'roomy'))
  assert sorted(os.listdir(os.path.join(disk, 'g'))) == names and 'grads_2.npy' in names
  for name in names:
    assert open(os.path.join(disk, 'g', name), 'rb').read() == \
        (tmp_path / 'roomy' / name).read_bytes(), name
  assert not [f for f in os.listdir(disk) if f.startswith('.')]  # no partial build left


def test_killed_build_resumes_to_identical_files(setup, tmp_path, monkeypatch):
  task, split, run, _, _, o = setup
  loss, proj = task.per_example_loss, pergrad.factored_projection(3, 2, seed=7)
  build = lambda name, **kw: store.build(str(tmp_path / name), loss, run, split, proj,
                                         block_size=4, chunk_size=3, **kw)
  build('whole')
  saved, real = [], store._save_progress

  def killed(partial, done):
    if len(saved) == 2:  # after block 2's rows are written, before its count is saved
      raise KeyboardInterrupt
    saved.append(done)
    real(partial, done)

  monkeypatch.setattr(store, '_save_progress', killed)
  with pytest.raises(KeyboardInterrupt):
    build('resumed')
  assert saved == [0, 4] and not (tmp_path / 'resumed').exists()
  with pytest.raises(UserError, match='unfinished'):
    store.GradientStore(str(tmp_path / 'resumed'))
  saved.clear()
  monkeypatch.setattr(store, '_save_progress', lambda p, d: (saved.append(d), real(p, d)))
  s = build('resumed')
  assert saved == [8, 12, 13]  # blocks 2..4 only
  names = sorted(os.listdir(tmp_path / 'whole'))
  assert names == sorted(os.listdir(tmp_path / 'resumed')) == [
      'grads_0.npy', 'grads_1.npy', 'grads_2.npy', 'ids.npy', 'meta.json']
  for name in names:
    assert (tmp_path / 'whole' / name).read_bytes() == (tmp_path / 'resumed' / name).read_bytes()
  assert s.grads(0).dtype == np.float32  # the default store: float32 of the float64 gradients
  np.testing.assert_allclose(s.grads(2), o['train'][2], rtol=1e-5, atol=1e-7)
  # A partial build made with other settings is started over, not mixed in.
  monkeypatch.setattr(store, '_save_progress', killed)
  saved.clear()
  with pytest.raises(KeyboardInterrupt):
    build('changed')
  monkeypatch.setattr(store, '_save_progress', lambda p, d: (saved.append(d), real(p, d)))
  saved.clear()
  store.build(str(tmp_path / 'changed'), loss, run, split, pergrad.factored_projection(3, 2, 8),
              block_size=4, chunk_size=3)
  assert saved == [0, 4, 8, 12, 13]
  assert json.load(open(tmp_path / 'changed' / 'meta.json'))['projection']['seed'] == 8
  # A store written before ids.npy holds its ids in meta.json, and reads as it did.
  meta = json.load(open(tmp_path / 'whole' / 'meta.json'))
  meta['ids'] = [int(i) for i in split.ids]
  (tmp_path / 'whole' / 'meta.json').write_text(json.dumps(meta))
  os.remove(tmp_path / 'whole' / 'ids.npy')
  old = store.GradientStore(str(tmp_path / 'whole'))
  np.testing.assert_array_equal(old.ids, split.ids)
  np.testing.assert_array_equal(old.self_influence(), s.self_influence())


def test_stored_data_value_embeddings_equal_explicit_backward_product(setup, tmp_path, monkeypatch):
  """Empirical-Fisher embeddings in the projected space, written out: e_{t,j} = (lr_t/B) w_tj
  K_{t+1} g_tj, K_t = K_{t+1} (I - lr_t (1/B) G_t^T W_t G_t), summed per example; value =
  <e_i, projected mean test gradient at the final params>. The store keeps no training
  gradients (`gradients=False`: the embeddings are all it needs)."""
  task, split, _, test, state, _ = setup
  loss = task.per_example_loss
  params = as64(task.init(jax.random.key(1)))
  weights = np.ones((5, 4))
  weights[[1, 4], [2, 0]] = 0.0
  run = sgd_run(loss, params, split, steps=5, every=1, weights=weights)
  s = store.build(str(tmp_path / 'g'), loss, run, split, pergrad.factored_projection(3, 2, 7),
                  dtype='float64', gradients=False)
  assert not [f for f in os.listdir(s.path) if f.startswith('grads_')]
  with pytest.raises(UserError, match='built without training gradients'):
    s.tracin(loss, run, test)
  s.add_dvemb(task, run, 'empirical_fisher', chunk_size=3)
  lrs = np.asarray(run.step_lrs)
  batches = jax.tree.map(np.asarray, run.batches)
  grads = [projected_oracle(loss, run.checkpoint(t), jax.tree.map(lambda x, t=t: x[t], batches),
                            LAYERS, state) for t in range(5)]
  example = np.zeros((13, state.dim))
  for t in range(5):
    k = np.eye(state.dim)
    for u in range(4, t, -1):
      k = k @ (np.eye(state.dim) - lrs[u] * (grads[u].T * weights[u]) @ grads[u] / 4)
    e = lrs[t] / 4 * weights[t][:, None] * grads[t] @ k.T
    for j, i in enumerate(batches['index'][t]):
      example[i] += e[j]
  direction = projected_oracle(loss, run.final_params, test, LAYERS, state).mean(0)
  reopened = store.GradientStore(str(tmp_path / 'g'))
  assert reopened.meta['dvemb']['curvature'] == 'empirical_fisher'
  np.testing.assert_allclose(np.load(tmp_path / 'g' / 'dvemb.npy'), example, rtol=1e-9,
                             atol=1e-14)
  np.testing.assert_allclose(reopened.dvemb_values(loss, run.final_params, test, block_size=5),
                             example @ direction, rtol=1e-9, atol=1e-14)
  with pytest.raises(UserError, match='not the final parameters'):
    reopened.dvemb_values(loss, params, test)
  # A damaged embeddings file (cut short, or of other rows) is one line naming it, no traceback.
  path = tmp_path / 'g' / 'dvemb.npy'
  whole = path.read_bytes()
  for damaged in (whole[:len(whole) // 2], b"garbage"):
    path.write_bytes(damaged)
    with pytest.raises(UserError, match=f'{re.escape(repr(str(path)))}: '):
      reopened.dvemb_values(loss, run.final_params, test)
  np.save(path, example[:-1])
  with pytest.raises(UserError, match='holds an array of shape'):
    reopened.dvemb_values(loss, run.final_params, test)
  # Embeddings of another run that stop (a kill) after their file replaced this run's, before
  # meta.json said so, leave no meta.json naming this run beside that file.
  other = sgd_run(loss, params, split, steps=5, every=1)
  real_write = store.files.write_json
  def write_json(where, obj):
    if 'dvemb' in obj:
      raise KeyboardInterrupt
    real_write(where, obj)
  monkeypatch.setattr(store.files, 'write_json', write_json)
  with pytest.raises(KeyboardInterrupt):
    store.GradientStore(str(tmp_path / 'g')).add_dvemb(task, other, 'empirical_fisher', 3)
  with pytest.raises(UserError, match='has no data value embeddings'):
    store.GradientStore(str(tmp_path / 'g')).dvemb_values(loss, run.final_params, test)


def test_projection_memory_does_not_grow_with_examples():
  """10x more examples keep the compiled temporary memory (peak minus in/out) flat: chunks."""
  with jax.enable_x64(False):
    task = mlp(hidden=(64, 64), dim=64)
    params, loss = task.init(jax.random.key(0)), task.per_example_loss
    batch = lambda n: {'image': jnp.zeros((n, 64)), 'label': jnp.zeros((n,), jnp.int32)}
    state = pergrad.factored_projection(8, 8).init(loss, params, batch(1))
    temp = lambda n: jax.jit(lambda b: pergrad.per_example_projected(
        loss, params, b, state, pergrad.sq_norm(), chunk_size=32)).lower(
            batch(n)).compile().memory_analysis().temp_size_in_bytes
    small, large = temp(256), temp(2560)
    assert large <= 1.05 * small + 4096, (small, large)


def test_factored_projection_forms_no_per_example_gradient():
  """per_example_projected takes its projections from the Dense layers' inputs and output
  gradients: one chunk of 48 examples keeps compiled temporaries below a quarter of its [B, P]
  gradients, which the same projection of formed gradients (`factored_transform`, equal values)
  holds. Only memory and time tell the two apart."""
  with jax.enable_x64(False):
    task = mlp(hidden=(128, 128), dim=32)
    params, loss = task.init(jax.random.key(0)), task.per_example_loss
    n = 48
    batch = {'image': jnp.zeros((n, 32)), 'label': jnp.zeros((n,), jnp.int32)}
    state = pergrad.factored_projection(8, 8).init(loss, params, batch)
    temp = lambda fn: jax.jit(fn).lower(batch).compile().memory_analysis().temp_size_in_bytes
    factored = temp(lambda b: pergrad.per_example_projected(loss, params, b, state, chunk_size=n))
    formed = temp(lambda b: pergrad.per_example(loss, params, b, pergrad.factored_transform(state),
                                                chunk_size=n))
    gradients = n * sum(x.size for x in jax.tree.leaves(params)) * 4  # [B, P] float32
    assert factored < gradients / 4, (factored, gradients)
    assert formed > gradients / 2, (formed, gradients)  # the measurement sees formed gradients
