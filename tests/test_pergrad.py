"""The per-example gradient layer against brute force: explicit loops, matrices and flat dots (f64)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_collections

from datarater import pergrad, tasks
from datarater.errors import UserError
from datarater.valuation import mimic
from tests.tiny import tiny_info


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def tiny(num=7, seed=0, hidden=(5,)):
  """A float64 MLP 6 -> 5 -> 3 (tanh) and a batch of `num` examples."""
  task = tasks.make_task(ml_collections.ConfigDict(
      {'name': 'mlp_classifier', 'hidden': hidden, 'activation': 'tanh'}), tiny_info(6))
  rng = np.random.default_rng(seed)
  batch = {'image': jnp.asarray(rng.uniform(size=(num, 6))),
           'label': jnp.asarray(rng.integers(0, 3, num), jnp.int32)}
  params = jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64) * 2.0),  # numpy: no
                        task.init(jax.random.key(seed)))  # compile per shape as op by op
  return task.per_example_loss, params, batch


def _cross_entropy(logits, labels):
  """-log softmax(logits)[label], written out (the oracle's loss, not the task's)."""
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]


_GRADS = {}


def flat(tree) -> np.ndarray:
  """ravel_pytree's vector (its leaves' entries in order, concatenated), in numpy: op by op,
  JAX compiles a reshape and a concatenation per shape."""
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def loop_flat_grads(loss, params, batch, layer=None):
  """[B, P] by an explicit Python loop of single-example gradients of the mean-of-one loss;
  with `layer`, only that layer's parameters (read from the parameter dict by name)."""
  if loss not in _GRADS:  # one jitted gradient of a batch of one per loss function
    _GRADS[loss] = jax.jit(jax.grad(lambda p, ex: loss(p, ex)[0]))
  out, rows = [], {k: np.asarray(v) for k, v in batch.items()}  # sliced in numpy
  for i in range(batch['label'].shape[0]):
    ex = {k: v[i:i + 1] for k, v in rows.items()}
    g = _GRADS[loss](params, ex)
    out.append(flat(g['params'][layer] if layer else g))
  return np.stack(out)


def jitted(fn, *args):
  """`fn(*args)` as one compiled program (the calls under test: op by op, each of their dozens
  of operations compiled alone, the most of these tests' time)."""
  return jax.jit(fn)(*args)


@pytest.mark.parametrize('chunk', [None, 3, 64])
def test_per_example_grads_equal_loop(chunk):
  loss, params, batch = tiny()
  want = loop_flat_grads(loss, params, batch)
  got, tree = jitted(lambda p, b: (
      pergrad.per_example(loss, p, b, pergrad.flatten(), chunk_size=chunk),
      pergrad.per_example_grads(loss, p, b, chunk_size=chunk)), params, batch)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  rows = np.concatenate([np.reshape(x, (len(want), -1)) for x in jax.tree.leaves(tree)], 1)
  np.testing.assert_allclose(rows, want, rtol=1e-12, atol=1e-12)


def test_select_norm_normalize_dot_equal_flat_definitions():
  loss, params, batch = tiny()
  grads = loop_flat_grads(loss, params, batch)
  last = loop_flat_grads(loss, params, batch, layer='dense_1')
  v = jax.tree.map(lambda x: np.cos(np.arange(x.size, dtype=x.dtype)).reshape(x.shape), params)
  norms, units, dots = jitted(lambda p, b, v: (
      pergrad.per_example(loss, p, b, pergrad.chain(pergrad.select(['dense_1']),
                                                    pergrad.sq_norm()), chunk_size=2),
      pergrad.per_example(loss, p, b, pergrad.chain(pergrad.normalize(), pergrad.flatten()),
                          chunk_size=4),
      pergrad.per_example(loss, p, b, pergrad.dot(v), chunk_size=3)), params, batch, v)
  np.testing.assert_allclose(norms, np.sum(last ** 2, 1), rtol=1e-12)
  np.testing.assert_allclose(units, grads / np.linalg.norm(grads, axis=1, keepdims=True),
                             rtol=1e-12)
  np.testing.assert_allclose(dots, grads @ flat(v), rtol=1e-11)


def test_select_unknown_layer_is_user_error():
  loss, params, batch = tiny()
  with pytest.raises(UserError, match='dense_9'):
    pergrad.per_example(loss, params, batch, pergrad.select(['dense_9']))


def test_a_layer_name_selects_the_same_parameters_everywhere():
  """On a transformer (nested modules), a component ('attention') or a leading path
  ('block_0/attention') names the same Dense layers to the parameter mask, the factored
  projection and the ghost products; flax's 'params/' prefix and unknown names are refused by
  all three."""
  from datarater.tasks.lm import LanguageModel, Transformer  # pylint: disable=g-import-not-at-top
  spec = {'tokens': jax.ShapeDtypeStruct((6,), jnp.int32)}
  task = LanguageModel(Transformer(10, 8, 2, 1, 12, 10), spec, 'tokens')
  params = task.init(jax.random.key(0))
  batch = {'tokens': jnp.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]], jnp.int32)}
  loss = task.per_example_loss
  masked_modules = lambda layers: {
      '/'.join(str(k.key) for k in path[1:-1])
      for path, keep in jax.tree_util.tree_flatten_with_path(pergrad.layer_mask(params, layers))[0]
      if keep}
  attention = {f'block_0/attention/{n}' for n in ('query', 'key', 'value', 'out')}
  for layers, want in ((['attention'], attention), (['block_0/attention'], attention),
                       (['head', 'block_0/mlp_in'], {'head', 'block_0/mlp_in'}),
                       (['block_0/attention/out'], {'block_0/attention/out'})):
    state = pergrad.factored_projection(2, 2, layers=layers).init(loss, params, batch)
    assert masked_modules(layers) == set(state.names) == want, layers
    # Traced, not op by op (each op of an eager transformer compiled alone: seconds): the
    # ghost products' layers are named as they are traced, so their shapes suffice.
    ghost = jax.eval_shape(lambda p, b: pergrad.dense_factors(loss, p, b, layers,
                                                              check_coverage=False),
                           params, batch)
    assert set(ghost) == set(state.names), layers
    got = jax.eval_shape(lambda p, b: pergrad.per_example_projected(loss, p, b, state), params,
                         batch)
    assert got.shape == (2, 4 * len(state.names))
  # A name is a whole module name or leading path, never a prefix of one: 'dense_1' is not
  # 'dense_10' or 'dense_11' (12 layers, a tree written out).
  twelve = {'params': {f'dense_{i}': {'kernel': np.ones((2, 2)), 'bias': np.ones(2)}
                       for i in range(12)}}
  kept = {'/'.join(str(k.key) for k in path[1:-1])
          for path, keep in jax.tree_util.tree_flatten_with_path(
              pergrad.layer_mask(twelve, ['dense_1']))[0] if keep}
  assert kept == {'dense_1'}
  for bad in (['params/block_0/attention'], ['head', 'nowhere']):
    with pytest.raises(UserError, match=bad[-1]):
      pergrad.layer_mask(params, bad)
    with pytest.raises(UserError, match=bad[-1]):
      pergrad.factored_projection(2, 2, layers=bad).init(loss, params, batch)
    with pytest.raises(UserError, match=bad[-1]):
      pergrad.ghost_sq_norms(loss, params, batch, bad)


def test_a_layer_name_is_a_modules_not_a_parameters():
  """'scale' names the top module's own parameter `scale` (a leading path), not every module's
  `scale` (a LayerNorm's); 'kernel' names no layer."""
  params = {'params': {'norm': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)},
                       'scale': jnp.ones(()), 'dense': {'kernel': jnp.ones((2, 2))}}}
  kept = lambda layers: sorted(
      '/'.join(str(k.key) for k in path[1:])
      for path, keep in jax.tree_util.tree_flatten_with_path(pergrad.layer_mask(params, layers))[0]
      if keep)
  assert kept(['scale']) == ['scale']
  assert kept(['norm']) == ['norm/bias', 'norm/scale'] and kept(['norm/scale']) == ['norm/scale']
  with pytest.raises(UserError, match="layer 'kernel' not found"):
    pergrad.layer_mask(params, ['kernel'])


def test_a_module_name_names_that_module_in_every_block():
  """README: `mlp_in` names both `block_0/mlp_in` and `block_1/mlp_in` (a two-block transformer):
  the mask holds exactly the leaves under those two modules, read off the parameter tree (the
  factored projection and ghost products take the mask's layers: the test above)."""
  from datarater.tasks.lm import LanguageModel, Transformer  # pylint: disable=g-import-not-at-top
  task = LanguageModel(Transformer(10, 8, 2, 2, 12, 10), {'tokens': jax.ShapeDtypeStruct(
      (6,), jnp.int32)}, 'tokens')
  params = jax.eval_shape(task.init, jax.random.key(0))  # shapes only: nothing is computed
  want = {id(x) for b in ('block_0', 'block_1')
          for x in jax.tree.leaves(params['params'][b]['mlp_in'])}
  leaves, mask = jax.tree.leaves(params), jax.tree.leaves(pergrad.layer_mask(params, ['mlp_in']))
  assert {id(x) for x, keep in zip(leaves, mask) if keep} == want and len(want) == 4


def _projection_matrix(transform, num_params, dtype=jnp.float64):
  """The matrix a linear transform applies, recovered row by row from unit vectors."""
  state = transform.init(jax.ShapeDtypeStruct((num_params,), dtype))
  return jitted(lambda s: jax.vmap(lambda e: transform.apply(e, s))(
      jnp.eye(num_params, dtype=dtype)), state)


@pytest.mark.parametrize('block', [5, 4096])
def test_gaussian_projection_of_per_example_gradients_is_one_linear_map(block):
  """Chunked per-example projection = each loop gradient times the projection's matrix."""
  loss, params, batch = tiny()
  grads = loop_flat_grads(loss, params, batch)
  t = pergrad.gaussian_projection(11, seed=3, block_size=block)
  got = jitted(lambda p, b: pergrad.per_example(loss, p, b, t, chunk_size=3), params, batch)
  matrix = np.asarray(_projection_matrix(t, grads.shape[1]))
  assert matrix.shape == (grads.shape[1], 11)
  np.testing.assert_allclose(got, grads @ matrix, rtol=1e-11, atol=1e-12)


def test_gaussian_projection_never_holds_its_matrix():
  """R [P, k] is drawn block by block inside a scan: projecting a 64k-entry gradient to k = 64
  keeps compiled temporaries below a quarter of R's bytes, which drawing all P rows as one block
  holds."""
  p, k = 65536, 64
  g = {'w': jnp.ones((p,), jnp.float32)}
  def temp(block):
    t = pergrad.gaussian_projection(k, seed=0, block_size=block)
    state = t.init(jax.eval_shape(lambda: g))
    return jax.jit(lambda x: t.apply(x, state)).lower(g).compile().memory_analysis(
        ).temp_size_in_bytes
  matrix = p * k * 4  # R in float32
  assert temp(1024) < matrix / 4, (temp(1024), matrix)
  assert temp(p) > matrix / 2, (temp(p), matrix)  # the measurement sees a whole R


def test_gaussian_projection_preserves_dots_in_expectation():
  """JL: entries ~ N(0, 1/k), so <Ra, Rb> averages <a, b> over seeds and blocks differ."""
  p, k = 40, 64  # the mean over 300 seeds has std ~0.18 here; the tolerance is ~5 of those
  t = pergrad.gaussian_projection(k, 0, 16)
  like = jax.ShapeDtypeStruct((p,), jnp.float64)
  states = jnp.stack([pergrad.gaussian_projection(k, s, 16).init(like) for s in range(300)])
  eye = jnp.eye(p, dtype=jnp.float64)
  m = jax.jit(jax.vmap(lambda st: jax.vmap(lambda e: t.apply(e, st))(eye)))(states)
  assert abs(float(m.mean())) < 0.005
  assert abs(float(m.var()) * k - 1.0) < 0.03
  a = jnp.sin(jnp.arange(p, dtype=jnp.float64))
  b = jnp.cos(jnp.arange(p, dtype=jnp.float64)) + 0.5 * a
  est = jnp.mean(jnp.einsum('p,spk,q,sqk->s', a, m, b, m))
  np.testing.assert_allclose(est, a @ b, rtol=0.1)
  assert not np.allclose(m[0, :16], m[0, 16:32])  # blocks are distinct draws


def test_kronecker_projection_equals_explicit_matrix():
  loss, params, batch = tiny(hidden=(6,))
  grads = loop_flat_grads(loss, params, batch)
  t = pergrad.kronecker_projection(2, 2, seed=1)
  state = t.init(params)
  got = jitted(lambda p, b, s: pergrad.per_example(loss, p, b, t, s, chunk_size=3), params, batch,
               state)
  blocks = []
  for leaf, f in zip(jax.tree.leaves(params), state):
    if f is None:
      blocks.append(np.eye(leaf.size))
    else:
      blocks.append(np.kron(f[0], f[1]))  # row-major vec(A^T G B) = vec(G) @ kron(A, B)
  rows = sum(b.shape[0] for b in blocks)
  cols = sum(b.shape[1] for b in blocks)
  dense = np.zeros((rows, cols))
  r = c = 0
  for b in blocks:
    dense[r:r + b.shape[0], c:c + b.shape[1]] = b
    r, c = r + b.shape[0], c + b.shape[1]
  assert rows == grads.shape[1] and cols < rows
  np.testing.assert_allclose(got, grads @ dense, rtol=1e-11, atol=1e-12)


def test_kronecker_factors_are_seeded_scaled_gaussians_per_leaf():
  """The factors A [d_in, k_in], B [d_out, k_out] have entries ~ N(0, 1/k) (so the projection
  keeps dot products in expectation, and a projected kernel is on the scale of the biases kept
  exactly beside it), drawn per leaf (two equal-shaped kernels get different factors) and per
  seed; a leaf of one axis, or of at most k_in * k_out entries, is kept (no factors)."""
  like = {'a': jax.ShapeDtypeStruct((64, 48), jnp.float64),
          'b': jax.ShapeDtypeStruct((64, 48), jnp.float64),
          'bias': jax.ShapeDtypeStruct((48,), jnp.float64),
          'small': jax.ShapeDtypeStruct((6, 5), jnp.float64)}
  state = pergrad.kronecker_projection(40, 30, seed=3).init(like)  # leaves in key order
  (a0, b0), (a1, b1), bias, small = state
  assert bias is None and small is None  # 30 entries <= 40 * 30: kept exactly
  for x, shape in ((a0, (64, 40)), (a1, (64, 40)), (b0, (48, 30)), (b1, (48, 30))):
    k = shape[1]  # entries ~ N(0, 1/k): the variance has a relative std of ~3-4% here
    assert x.shape == shape and abs(float(x.mean())) < 0.1 / np.sqrt(k)
    assert abs(float(x.var()) * k - 1) < 0.2
  assert not np.allclose(a0, a1) and not np.allclose(b0, b1)  # each leaf its own draw
  assert not np.allclose(a0[:48, :30], b0)  # the in and out factors are distinct draws
  other = pergrad.kronecker_projection(40, 30, seed=4).init(like)
  assert not np.allclose(other[0][0], a0)
  np.testing.assert_array_equal(pergrad.kronecker_projection(40, 30, seed=3).init(like)[1][0], a1)
  # A leaf of exactly k_in * k_out entries is kept: the projection returns it as it is.
  edge = pergrad.kronecker_projection(6, 5)
  leaf = {'w': jnp.arange(30.).reshape(6, 5)}
  assert edge.init(leaf) == [None]
  np.testing.assert_array_equal(edge.apply(leaf, edge.init(leaf)), np.arange(30.))


@pytest.mark.parametrize('chunk', [None, 3])
def test_jvp_dots_equal_flat_dots(chunk):
  loss, params, batch = tiny()
  v = jax.tree.map(lambda x: np.sin(np.arange(x.size, dtype=x.dtype) + 1.).reshape(x.shape),
                   params)
  last = sorted(params['params'])[-1]
  every, got = jitted(lambda p, b, v: (
      pergrad.jvp_dots(loss, p, b, v, chunk_size=chunk),
      pergrad.jvp_dots(loss, p, b, v, chunk_size=chunk, layers=[last])), params, batch, v)
  full = loop_flat_grads(loss, params, batch) @ flat(v)
  np.testing.assert_allclose(every, full, rtol=1e-11)
  # With `layers`, the tangent runs through those layers only: the loop's gradients of that layer
  # alone dotted with v's entries in it (v elsewhere changes the dots: the full ones differ).
  want = loop_flat_grads(loss, params, batch, layer=last) @ flat(v['params'][last])
  np.testing.assert_allclose(got, want, rtol=1e-11)
  assert np.abs(full - want).min() > 1e-3


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


def test_jvp_dots_over_the_last_layer_cost_about_one_forward_pass():
  """jvp_dots with `layers` starts the tangent at those layers: over the last (small) layer of a
  4-layer MLP its compiled program counts about the forward pass's flops, where the tangent
  through every layer costs twice as many more (XLA's cost analysis). The dots are equal either
  way for a vector that is zero outside the layer: only the cost tells them apart."""
  loss, params, batch = tiny(num=16, hidden=(64, 64, 64))
  last = sorted(params['params'])[-1]
  forward = _flops(loss, params, batch)
  last_only = _flops(lambda p, v, b: pergrad.jvp_dots(loss, p, b, v, layers=[last]),
                     params, params, batch)
  every = _flops(lambda p, v, b: pergrad.jvp_dots(loss, p, b, v), params, params, batch)
  assert last_only < 1.2 * forward, (last_only, forward)
  assert every > 2 * forward, (every, forward)


def test_ghost_dots_equal_flat_dots():
  loss, params, batch = tiny(hidden=(5, 4))
  _, _, other = tiny(num=4, seed=1, hidden=(5, 4))
  ga, gb = loop_flat_grads(loss, params, batch), loop_flat_grads(loss, params, other)
  dots = jax.jit(lambda p, a, b: (pergrad.ghost_dots(loss, p, a, b), pergrad.ghost_dots(loss, p, a),
                                  pergrad.ghost_sq_norms(loss, p, a),
                                  pergrad.ghost_sq_norms(loss, p, a, layers=['dense_2'])))
  ab, aa, norms, last_norms = dots(params, batch, other)
  np.testing.assert_allclose(ab, ga @ gb.T, rtol=1e-11)
  np.testing.assert_allclose(aa, ga @ ga.T, rtol=1e-11)
  np.testing.assert_allclose(norms, np.sum(ga ** 2, 1), rtol=1e-11)
  last = loop_flat_grads(loss, params, batch, layer='dense_2')
  np.testing.assert_allclose(last_norms, np.sum(last ** 2, 1), rtol=1e-11)
  assert pergrad.param_layers(loss, params, batch) == ['dense_0', 'dense_1', 'dense_2']
  assert pergrad.ghost_covers(loss, params, batch)
  # A loss that reads a Dense kernel outside its call (a weight penalty): ghost products miss
  # that part of the gradient, so they are not taken where it lies; elsewhere they still are.
  penalised = lambda p, b: loss(p, b) + 0.05 * jnp.sum(p['params']['dense_2']['kernel'] ** 2)
  assert not pergrad.ghost_covers(penalised, params, batch)
  assert not pergrad.ghost_covers(penalised, params, batch, ['dense_2'])
  assert pergrad.ghost_covers(penalised, params, batch, ['dense_0'])


def test_ghost_covers_compares_in_one_compiled_program(monkeypatch):
  """Its ghost and exact norms are computed traced, as one program: op by op, the dozens of
  primitives of a loss and its gradient were each compiled alone (seconds at every valuation's
  start)."""
  loss, params, batch = tiny()
  traced = []
  for name in ('ghost_sq_norms', 'per_example'):
    real = getattr(pergrad, name)
    def spy(loss_fn, p, *rest, real=real, **kw):
      traced.append(isinstance(jax.tree.leaves(p)[0], jax.core.Tracer))
      return real(loss_fn, p, *rest, **kw)
    monkeypatch.setattr(pergrad, name, spy)
  assert pergrad.ghost_covers(loss, params, batch)
  assert traced == [True, True]


def _module_problem(model: nn.Module, float64: bool = False):
  """(loss, params, batch): `model`'s cross-entropy on tiny()'s batch (its parameters in
  float64 if asked; tiny()'s batch is float64 already)."""
  _, _, batch = tiny()
  params = model.init(jax.random.key(0), batch['image'])
  if float64:
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64)), params)
  return lambda p, b: _cross_entropy(model.apply(p, b['image']), b['label']), params, batch


class SeqModel(nn.Module):
  """A Dense layer shared by 3 positions of each example, then a mean and a bias-free head."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], 3, 2)
    h = jnp.tanh(nn.Dense(4, name='embed')(x)).mean(1)
    return nn.Dense(3, use_bias=False, name='head')(h)


def test_ghost_dots_with_positions_and_no_bias():
  loss, params, batch = _module_problem(SeqModel(), float64=True)
  grads = loop_flat_grads(loss, params, batch)
  dots, norms = jitted(lambda p, b: (pergrad.ghost_dots(loss, p, b),
                                     pergrad.ghost_sq_norms(loss, p, b)), params, batch)
  np.testing.assert_allclose(dots, grads @ grads.T, rtol=1e-10)
  np.testing.assert_allclose(norms, np.sum(grads ** 2, 1), rtol=1e-10)
  assert pergrad.dense_positions(loss, params, batch) == 3
  assert pergrad.dense_positions(loss, params, batch, ['head']) == 1
  assert pergrad.dense_positions(*tiny()) == 1


class ManyPositions(nn.Module):
  """A narrow Dense layer over 49 positions (a convolution's shape: CNN patches), mean, head."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(32, name='conv')(x.reshape(x.shape[0], 49, 144))).mean(1)
    return nn.Dense(3, use_bias=False, name='head')(h)


def test_ghost_products_over_many_positions_cost_no_more_than_exact_gradients():
  """Over a layer with many positions and few weights (a CNN's convolution), ghost dots and
  squared norms take no more XLA flops than the exact definition (per-example gradients, then
  their dots): their T x T position products cost more than forming the layer's per-example
  gradients, so that layer is contracted through them. Same values as the definition."""
  model, rng = ManyPositions(), np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.uniform(size=(8, 49 * 144)), jnp.float32),
           'label': jnp.arange(8) % 3}
  params = model.init(jax.random.key(0), batch['image'])
  loss = lambda p, b: _cross_entropy(model.apply(p, b['image']), b['label'])
  grads = lambda p, b: pergrad.per_example(loss, p, b, pergrad.flatten(), chunk_size=None)
  programs = {'dots': (lambda p, b: pergrad.ghost_dots(loss, p, b),
                       lambda p, b: (lambda g: g @ g.T)(grads(p, b))),
              'norms': (lambda p, b: pergrad.ghost_sq_norms(loss, p, b),
                        lambda p, b: jnp.sum(grads(p, b) ** 2, 1))}
  for name, (ghost, exact) in programs.items():
    ghost, exact = (jax.jit(f).lower(params, batch).compile() for f in (ghost, exact))
    flops = [c.cost_analysis()['flops'] for c in (ghost, exact)]
    assert flops[0] <= flops[1], (name, flops)
    np.testing.assert_allclose(ghost(params, batch), exact(params, batch), rtol=1e-4, atol=1e-9)


def _assert_ghost_norms_equal_loop(loss, params, batch, layer):
  """Ghost squared norms over `layer` against the explicit loop's, in float64."""
  params = jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64)), params)
  grads = loop_flat_grads(loss, params, batch, layer=layer)
  np.testing.assert_allclose(
      jitted(lambda p, b: pergrad.ghost_sq_norms(loss, p, b, [layer]), params, batch),
      np.sum(grads ** 2, 1), rtol=1e-10)


class WithScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    s = self.param('scale', nn.initializers.ones, ())
    return nn.Dense(3)(x.reshape(x.shape[0], -1)) * s


def test_ghost_refuses_non_dense_parameters():
  loss, params, batch = _module_problem(WithScale())
  with pytest.raises(ValueError, match=r'Dense layers hold .* the model \(not scale\)'):
    pergrad.ghost_sq_norms(loss, params, batch)
  assert not pergrad.ghost_covers(loss, params, batch)
  # The Dense layer alone is covered (its gradient flows through the scale); the scale is not.
  assert pergrad.ghost_covers(loss, params, batch, ['Dense_0'])
  assert not pergrad.ghost_covers(loss, params, batch, ['scale'])
  _assert_ghost_norms_equal_loop(loss, params, batch, 'Dense_0')


class Block(nn.Module):
  """A Dense layer and a scale in one named module."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='proj')(x) * self.param('scale', nn.initializers.ones, ())


class TwoBlocks(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='head')(Block(name='block')(x.reshape(x.shape[0], -1)))


def test_ghost_covers_named_layers_only_when_dense_holds_all_their_parameters():
  loss, params, batch = _module_problem(TwoBlocks())
  assert pergrad.ghost_covers(loss, params, batch, ['head'])
  assert pergrad.ghost_covers(loss, params, batch, ['proj'])
  assert pergrad.ghost_covers(loss, params, batch, ['head', 'proj'])
  assert not pergrad.ghost_covers(loss, params, batch, ['block'])  # its scale is not Dense
  assert not pergrad.ghost_covers(loss, params, batch, ['head', 'block'])
  assert not pergrad.ghost_covers(loss, params, batch)
  assert not pergrad.ghost_covers(loss, params, batch, ['nowhere'])


def test_named_layers_with_non_dense_parameters_are_refused_by_ghost_and_factored_products():
  """`block` holds a Dense layer (6 x 3 + 3) and a scale: ghost norms over it would miss the
  scale's gradient, and a factored projection of it would silently value the Dense part only."""
  loss, params, batch = _module_problem(TwoBlocks())
  with pytest.raises(ValueError, match=r'parameters of layers block \(not block\)'):
    pergrad.ghost_sq_norms(loss, params, batch, ['block'])
  with pytest.raises(UserError, match='factored projection: Dense layers hold 21 of the 22'):
    pergrad.factored_projection(2, 2, layers=['block']).init(loss, params, batch)
  assert pergrad.factored_projection(2, 2, layers=['proj']).init(loss, params, batch).names == (
      'block/proj',)


class RowsNotExamples(nn.Module):
  """A Dense layer applied to every pixel as a row of its own: its first axis is not the batch."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(2, name='pixel')(x.reshape(-1, 1))).reshape(x.shape[0], -1)
    return nn.Dense(3, name='head')(h)


def test_dense_over_rows_that_are_not_examples_takes_no_ghost_products():
  loss, params, batch = _module_problem(RowsNotExamples(), float64=True)
  assert not pergrad.ghost_covers(loss, params, batch)
  assert pergrad.ghost_covers(loss, params, batch, ['head'])  # its rows are the examples
  with pytest.raises(UserError, match="Dense layer 'pixel' takes inputs of shape"):
    pergrad.factored_projection(2, 2).init(loss, params, batch)
  _assert_ghost_norms_equal_loop(loss, params, batch, 'head')


class RematBlocks(nn.Module):
  """A Dense layer inside nn.remat (rematerialised to save memory), then a plain Dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.remat(Block)(name='block')(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name='head')(jnp.tanh(h))


def test_dense_inside_a_transformation_takes_no_ghost_products():
  """Under nn.remat the Dense call runs in a trace of its own: its inputs could not be taken out
  (ghost_covers raised UnexpectedTracerError, a traceback from launch.valuate's default
  TracIn); now refused like any layer the fast paths cannot follow, and still exact elsewhere."""
  loss, params, batch = _module_problem(RematBlocks(), float64=True)
  assert not pergrad.ghost_covers(loss, params, batch)
  assert not pergrad.ghost_covers(loss, params, batch, ['proj'])
  assert pergrad.ghost_covers(loss, params, batch, ['head'])
  with pytest.raises(UserError, match="'block/proj' is called inside a transformation"):
    pergrad.factored_projection(2, 2, layers=['proj']).init(loss, params, batch)
  _assert_ghost_norms_equal_loop(loss, params, batch, 'head')


class ConvHead(nn.Module):
  """Dense, then a shared Dense cell called twice, then a 1x1 convolution as the last layer."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name='proj')(x.reshape(x.shape[0], 1, -1))
    cell = nn.Dense(4, name='cell')
    h = cell(jnp.tanh(cell(h)))
    return nn.Conv(3, (1,), name='classifier')(h)[:, 0]


class _ScaledDense(nn.Dense):
  """A Dense subclass computing another function of its kernel (3 x W + b, as an equalised
  learning rate layer does), its parameters named as nn.Dense's."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param('kernel', self.kernel_init, (inputs.shape[-1], self.features))
    return 3.0 * inputs @ kernel + self.param('bias', self.bias_init, (self.features,))


class _NamedDense(nn.Dense):
  """A Dense subclass that only renames it: nn.Dense's own call."""


class DenseSubclasses(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _ScaledDense(3, name='head')(jnp.tanh(_NamedDense(4, name='hidden')(x)))


def test_a_dense_subclass_with_its_own_call_is_not_taken_for_a_dense_layer():
  """Ghost products took any nn.Dense instance for x W + b: a subclass overriding `__call__`
  got (x . g) products that are not its gradients (here 1/3 of them). It is now differentiated
  exactly as any other layer (the ghost refuses it); a subclass keeping Dense's call is kept."""
  loss, params, batch = _module_problem(DenseSubclasses())
  assert pergrad.ghost_covers(loss, params, batch, ['hidden'])  # ghost == exact norms
  with pytest.raises(ValueError, match=r'Dense layers hold 28 of the 43 parameters of the '
                                       r'model \(not head\)'):
    pergrad.ghost_sq_norms(loss, params, batch)
  with pytest.raises(UserError, match=r"no Dense layer 'head' \(Dense layers: hidden\)"):
    pergrad.factored_projection(2, 2, layers=['head']).init(loss, params, batch)
  assert not pergrad.ghost_covers(loss, params, batch)

class TopTemperature(nn.Module):
  """A parameter of the top module itself (a learned temperature) after the head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name='hidden')(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name='head')(h) * self.param('temp', nn.initializers.ones, ())


def test_the_top_modules_own_parameters_are_not_a_layer():
  loss, params, batch = _module_problem(TopTemperature())
  assert pergrad.param_layers(loss, params, batch) == ['hidden', 'head']
  assert mimic.resolve_layers(loss, params, batch, 'last') == ['head']


def test_the_last_layer_of_a_one_layer_model_is_all_of_it():
  """The README's bring-your-own example is a bare nn.Dense: its top module holds every
  parameter, so Mimic's 'last' layer is the whole model (scores as with all parameters)."""
  loss, params, batch = _module_problem(nn.Dense(3), float64=True)
  assert pergrad.param_layers(loss, params, batch) == []
  assert mimic.resolve_layers(loss, params, batch, 'last') is None
  # A two-layer model in plain JAX (no flax calls to see) still has to name its layers.
  two = {'hidden': {'w': jnp.ones((batch['image'][0].size, 8))}, 'out': {'w': jnp.ones((8, 3))}}
  plain = lambda p, b: -jax.nn.log_softmax(jnp.tanh(b['image'].reshape(len(b['image']), -1)
                                                    @ p['hidden']['w']) @ p['out']['w'])[:, 0]
  with pytest.raises(UserError, match="layers='last' found no layer called with parameters"):
    mimic.resolve_layers(plain, two, batch, 'last')
  ref = jax.tree.map(lambda x: x + 0.1 * np.cos(np.arange(x.size).reshape(x.shape)), params)
  u = flat(ref) - flat(params)
  want = -loop_flat_grads(loss, params, batch) @ (u / np.linalg.norm(u))  # every parameter
  layers = mimic.resolve_layers(loss, params, batch, 'last')
  got = jitted(lambda p, r, b: mimic.mimic_scores(loss, p, r, b, layers), params, ref, batch)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_the_last_layer_is_the_last_called_module_with_parameters_of_any_kind():
  loss, params, batch = _module_problem(ConvHead())
  assert pergrad.param_layers(loss, params, batch) == ['proj', 'cell', 'classifier']
  assert mimic.resolve_layers(loss, params, batch, 'last') == ['classifier']
  assert not pergrad.ghost_covers(loss, params, batch)  # 'cell' is called twice
  assert not pergrad.ghost_covers(loss, params, batch, ['cell'])
  assert pergrad.ghost_covers(loss, params, batch, ['proj'])  # called once: ghost products hold
  _assert_ghost_norms_equal_loop(loss, params, batch, 'proj')


class TiedOutput(nn.Module):
  """An embedding table read first by the input (its call), last by the output (`attend`)."""

  @nn.compact
  def __call__(self, x):
    table = nn.Embed(3, 4, name='classes')
    start = table(jnp.zeros(x.shape[0], jnp.int32))
    return table.attend(jnp.tanh(nn.Dense(4, name='hidden')(x.reshape(x.shape[0], -1)) + start))


def test_the_last_layer_is_the_one_whose_method_returns_last():
  """The output here is the embedding's `attend`, after `hidden`: Mimic's 'last' is the table
  (it was `hidden`, the last module whose `__call__` returned)."""
  loss, params, batch = _module_problem(TiedOutput())
  assert pergrad.param_layers(loss, params, batch) == ['hidden', 'classes']
  assert mimic.resolve_layers(loss, params, batch, 'last') == ['classes']


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_projection_memory_does_not_grow_with_examples():
  """Scoring 10x more examples keeps the compiled temporary memory (peak minus in/out) flat."""
  with jax.enable_x64(False):
    info = tiny_info(64)
    task = tasks.make_task(ml_collections.ConfigDict(
        {'name': 'mlp_classifier', 'hidden': (64, 64), 'activation': 'relu'}), info)
    params = task.init(jax.random.key(0))
    loss = task.per_example_loss
    proj = pergrad.kronecker_projection(8, 8)
    state = proj.init(params)

    def batch(n):
      return {'image': jnp.zeros((n, 64)), 'label': jnp.zeros((n,), jnp.int32)}

    def chunked(b):
      return pergrad.per_example(loss, params, b, proj, state, chunk_size=32)

    def unchunked(b):
      return pergrad.per_example(loss, params, b, pergrad.flatten(), (), chunk_size=None).sum(1)

    small, large = _temp_bytes(chunked, batch(256)), _temp_bytes(chunked, batch(2560))
    assert large <= 1.05 * small + 4096, (small, large)
    # The measurement can see growth: unchunked per-example gradients scale with the batch.
    assert _temp_bytes(unchunked, batch(2560)) > 5 * _temp_bytes(unchunked, batch(256))
