"""A model computing in bfloat16 or float16 (flax `dtype`), or holding such parameters
(`param_dtype`): what the library computes itself (loss weights, scores, projections, the Polyak
average, the data value embedding's K, optimizer states) is float32, and what the model rounds
stays within its rounding of the same model in float64."""
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from datarater import evaluation, pergrad
from datarater.errors import UserError
from datarater.tasks.classifier import MLP, Classifier, LabelledRater
from datarater.valuation import dvemb
from datarater.valuation.base import TrainingRun
from inner_loop.optimizers import make_inner_optimizer, make_step_inverse
from inner_loop.unroll import InnerState
from inner_loop.weighting import softmax_weights
from outer_loop import averaging, meta_step, setup
from outer_loop.estimators import Mixed, Reverse, make_estimator
from tests.tiny import NUM_CLASSES, tiny_batches, tiny_info


def mlp(features, dtype=jnp.bfloat16, param_dtype=jnp.float32):
  """The shipped MLP, tanh, computing in `dtype`, its parameters in `param_dtype`."""
  return MLP(features, 'tanh', dtype, param_dtype)


def task(dtype=jnp.bfloat16, param_dtype=jnp.float32, hidden=6):
  module = mlp((hidden, NUM_CLASSES), dtype, param_dtype)
  return Classifier(module, tiny_info().spec, 'image', 'label', NUM_CLASSES)


def problem(dtype, param_dtype, lr=0.05):
  rater = LabelledRater(mlp((4, NUM_CLASSES), dtype, param_dtype), tiny_info().spec, 'image',
                        'label')
  return meta_step.MetaProblem(task=task(dtype, param_dtype), rater=rater,
                               inner_optimizer=make_inner_optimizer('adam', lr),
                               outer_optimizer=optax.adam(1e-2), temperature=0.7, reset_every=3)


def cast(tree, dtype):
  """The tree's floating leaves as numpy arrays of `dtype` (op by op, JAX compiles a conversion
  per shape)."""
  return jax.tree.map(
      lambda x: np.asarray(x).astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def flat64(tree) -> np.ndarray:
  """Every leaf's entries in order (ravel_pytree's vector) in float64 numpy."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def rel(a, b) -> float:
  a, b = (flat64(cast(x, jnp.float32)) for x in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize('dtype, tol', [  # float16's closed-form step: the test below
    (jnp.bfloat16, 0.1), pytest.param(jnp.float16, 1e-2, marks=pytest.mark.slow)])
def test_mixed_mode_through_low_precision_parameters_follows_reverse_mode(dtype, tol):
  """bfloat16 or float16 parameters (task and rater), inner Adam, T = 6: mixed mode (replayed,
  Adam's closed-form backward step) gives reverse mode's meta-gradient, both within the dtype's
  rounding of the float64 one; 'auto' replays for them and 'invert' is refused. (float16: NaN
  when Adam's moments were float16; 0.13 off when its backward step rounded 2 (1 - b2) g to
  float16.)"""
  bf16 = problem(dtype, dtype)
  lr = 0.05
  outer = ml_collections.ConfigDict({'meta_gradient': 'mixed', 'mixed_recompute': 'auto',
                                     'mixed_segment': 0})
  inner_cfg = ml_collections.ConfigDict({'optimizer': 'adam', 'learning_rate': lr})
  params = jax.eval_shape(bf16.task.init, jax.random.key(0))
  assert make_estimator(outer, inner_cfg, params).recompute == 'replay'
  wide = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  assert make_estimator(outer, inner_cfg, wide).recompute == 'invert'
  outer.mixed_recompute = 'invert'
  with pytest.raises(UserError, match=f"'invert' undoes inner steps in the task's "
                                     f"{jnp.dtype(dtype).name}"):
    make_estimator(outer, inner_cfg, params)
  state = meta_step.init_outer_state(bf16, jax.random.key(1), 2)
  inner, held_out = jax.tree.map(jnp.asarray, tiny_batches(0, population=2, steps=6, batch=8))
  grads = {}
  for name, est in (('reverse', Reverse()),
                    ('mixed', Mixed('replay', 0, make_step_inverse('adam', lr)))):
    (loss, _), g = jax.jit(lambda p, pop, est=est: meta_step.meta_gradient(
        bf16, est, p, pop, inner, held_out))(state.rater_params, state.population)
    assert loss.dtype == jnp.float32  # the held-out mean is the library's: float32
    assert {x.dtype for x in jax.tree.leaves(g)} == {jnp.dtype(dtype)}
    grads[name] = g
  with jax.enable_x64():
    f64 = problem(jnp.float64, jnp.float64)
    (_, _), want = jax.jit(lambda p, pop: meta_step.meta_gradient(
        f64, Reverse(), p, pop, cast(inner, jnp.float64), cast(held_out, jnp.float64)))(
            cast(state.rater_params, jnp.float64), cast(state.population, jnp.float64))
    want = jax.tree.map(np.asarray, want)
  assert np.linalg.norm(flat64(want)) > 1e-4
  # (bfloat16: 2.3e-2 and 2.0e-2 here, its eps is 7.8e-3 and fresh Adam moments amplify it;
  # float16: 1.2e-3 both)
  assert rel(grads['reverse'], want) < tol, rel(grads['reverse'], want)
  assert rel(grads['mixed'], want) < tol, rel(grads['mixed'], want)  # (NaN: b2 -> 1 in bf16)


def test_polyak_average_of_bfloat16_parameters_is_the_weighted_mean_of_the_iterates():
  """Decay 0.999 (1 in bfloat16): the average is kept in float32, the debiased mean is that of
  the iterates in float64, given back in their dtype."""
  rng = np.random.default_rng(0)
  iterates = [{'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)} for _ in range(5)]
  average = averaging.init(iterates[0], 0.999)
  assert average['w'].dtype == jnp.float32
  for phi in iterates:
    average = averaging.update(average, phi, 0.999)
  got = averaging.debiased(average, iterates[-1], 0.999, 5)['w']
  weights = 0.999 ** np.arange(4, -1, -1)
  want = sum(w * np.asarray(p['w'], np.float64) for w, p in zip(weights, iterates)) / weights.sum()
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)


class _Split:
  """n examples whose only feature is a value; the first `bad` are corrupted."""

  def __init__(self, values, bad):
    self.values, self.is_corrupted = values, np.arange(len(values)) < bad

  def __len__(self):
    return len(self.values)

  def take(self, positions):
    positions = np.asarray(positions)
    return {'value': self.values[positions], 'index': positions.astype(np.int32)}


def test_a_bfloat16_raters_weights_and_scores_are_float32():
  """Its weights are the float64 softmax of its (bfloat16) scores; scored over a split, its
  scores come out float32 and its noise AUROC is the share of (clean, corrupted) pairs it
  orders (ties half), as for any scores."""
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.normal(size=128) * 3, jnp.bfloat16)
  s = np.asarray(scores, np.float64) / 0.7
  want = 128 * np.exp(s - s.max()) / np.exp(s - s.max()).sum()
  for mask in (None, jnp.ones(128)):
    w = softmax_weights(scores, 0.7, mask)
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w, np.float64), want, rtol=1e-5)
  split = _Split(rng.normal(size=40).astype(np.float32) + np.arange(40) / 20, 10)
  got = evaluation.score_split(lambda b: b['value'].astype(jnp.bfloat16), split, batch_size=16)
  assert got.dtype == np.float32
  rounded = np.asarray(jnp.asarray(split.values, jnp.bfloat16), np.float64)
  np.testing.assert_array_equal(got, rounded)
  clean, bad = rounded[10:], rounded[:10]
  pairs = np.mean((clean[:, None] > bad[None]) + 0.5 * (clean[:, None] == bad[None]))
  assert evaluation.noise_auroc(got, split.is_corrupted) == pytest.approx(pairs, abs=1e-12)


def test_projections_of_a_bfloat16_models_gradients_are_float32():
  """The factored projection of a bfloat16-computing model draws the float32 factors of its
  float32 twin, the store's check that its Dense layers make the whole gradient passes, and
  its projected gradients are the twin's up to bfloat16 rounding; gradients of bfloat16
  parameters are projected in float32."""
  low, full = task(jnp.bfloat16), task(jnp.float32)
  params = full.init(jax.random.key(0))
  x, y = tiny_batches(1, population=1, steps=1, batch=8)[0].values()
  batch = {'image': jnp.asarray(x[0, 0]), 'label': jnp.asarray(y[0, 0]),
           'index': jnp.arange(8, dtype=jnp.int32)}
  projection = pergrad.factored_projection(2, 3, seed=0)
  state = projection.init(low.per_example_loss, params, batch)
  twin = projection.init(full.per_example_loss, params, batch)
  for got, want in zip(jax.tree.leaves(state.factors), jax.tree.leaves(twin.factors)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
  assert pergrad.ghost_covers(low.per_example_loss, params, batch)
  projected = jax.jit(lambda p, b: (
      pergrad.per_example_projected(low.per_example_loss, p, b, state),
      pergrad.per_example_projected(full.per_example_loss, p, b, twin)))
  got, want = projected(params, batch)
  assert got.dtype == jnp.float32
  assert rel(got, want) < 2e-2, rel(got, want)
  kron = pergrad.kronecker_projection(2, 2)
  out = jax.jit(lambda p, b: pergrad.per_example(low.per_example_loss, p, b, kron))(
      cast(params, jnp.bfloat16), batch)
  assert out.dtype == jnp.float32


def test_ghost_products_of_a_bfloat16_model_are_float32_sums_of_its_dense_gradients():
  """Ghost squared norms and dot products of a bfloat16-computing model are summed in float32:
  they equal, to float32 rounding, the float64 sums over its per-example Dense gradients
  [x_i^T g_i; g_i] formed from the layers' own (bfloat16) inputs x and output gradients g."""
  low = task(jnp.bfloat16)
  loss, params = low.per_example_loss, low.init(jax.random.key(0))
  x, y = tiny_batches(1, population=1, steps=1, batch=8)[0].values()
  batch = {'image': jnp.asarray(x[0, 0]), 'label': jnp.asarray(y[0, 0]),
           'index': jnp.arange(8, dtype=jnp.int32)}
  factors, norms, dots = jax.jit(lambda p, b: (pergrad.dense_factors(loss, p, b),
                                               pergrad.ghost_sq_norms(loss, p, b),
                                               pergrad.ghost_dots(loss, p, b)))(params, batch)
  assert norms.dtype == dots.dtype == jnp.float32
  assert {g.dtype for _, g, _ in factors.values()} == {jnp.dtype(jnp.bfloat16)}
  grads = []
  for a, g, has_bias in factors.values():
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    kernel = np.einsum('bi,bo->bio', a, g).reshape(len(a), -1)
    grads.append(np.concatenate([kernel, g], 1) if has_bias else kernel)
  flat = np.concatenate(grads, 1)
  np.testing.assert_allclose(norms, np.sum(flat ** 2, 1), rtol=1e-5)
  np.testing.assert_allclose(dots, flat @ flat.T, rtol=1e-5, atol=1e-6 * np.abs(dots).max())


def test_data_value_embedding_of_bfloat16_parameters_is_the_float32_ones():
  """K, a product of the steps' maps, is kept in float32: the embeddings of a run whose
  parameters are bfloat16 are those of the same run in float32, up to bfloat16 rounding."""
  model = task(jnp.float32, jnp.float32, hidden=4)
  params = model.init(jax.random.key(0))
  steps, b = 4, 6
  x, y = tiny_batches(2, population=1, steps=steps, batch=b)[0].values()
  batches = {'image': jnp.asarray(x[0]), 'label': jnp.asarray(y[0]),
             'index': jnp.arange(steps * b, dtype=jnp.int32).reshape(steps, b)}
  stacked = jax.tree.map(lambda p: jnp.stack([p] * steps), params)
  run = TrainingRun(batches=batches, weights=jnp.ones((steps, b)),
                    step_lrs=jnp.full((steps,), 0.3), checkpoints=stacked,
                    checkpoint_steps=jnp.arange(steps), final_params=params)
  low = run.replace(checkpoints=cast(stacked, jnp.bfloat16),
                    final_params=cast(params, jnp.bfloat16))
  embed = jax.jit(lambda r: dvemb.embed(model, r, steps * b, None, 'gauss_newton',
                                        chunk_size=3).step)
  got, want = embed(low), embed(run)
  assert got.dtype == jnp.float32
  assert rel(got, want) < 3e-2, rel(got, want)


def test_float16_parameters_take_the_float64_optimizers_steps():
  """Float16 parameters: Adam's eps (1e-8) and squared gradients below 2.4e-4 round to 0 in
  float16, and a rater's meta-gradient norm above 256 overflows, so the inner and outer
  optimizers keep their state in float32: each update is the float64 one rounded to float16
  (Adam defined by its moments; the outer one's first step after clipping is lr * g / |g|)."""
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=6) * 10.0 ** rng.integers(-7, -2, 6) for _ in range(3)]
  params = {'w': jnp.asarray(rng.normal(size=6), jnp.float16)}
  opt = make_inner_optimizer('adam', 1e-3)
  state, m, v = opt.init(params), np.zeros(6), np.zeros(6)
  for t, g in enumerate(grads, 1):
    g16 = jnp.asarray(g, jnp.float16)
    g = np.asarray(g16, np.float64)
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    want = -1e-3 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t) + 1e-12) + 1e-8)
    updates, state = opt.update({'w': g16}, state, params)
    assert updates['w'].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(updates['w'], np.float64), want, rtol=1e-3)
  outer = ml_collections.ConfigDict({'warmup_steps': 0, 'learning_rate': 1e-2,
                                     'schedule': 'constant', 'steps': 10, 'clip_norm': 1.0})
  g = rng.normal(size=6) * 300  # |g| ~ 700: its square overflows float16 (65504)
  updates, _ = setup.make_outer_optimizer(outer).update(
      {'w': jnp.asarray(g, jnp.float16)}, setup.make_outer_optimizer(outer).init(params), params)
  g = np.asarray(jnp.asarray(g, jnp.float16), np.float64)
  clipped = g / np.linalg.norm(g)
  want = -1e-2 * clipped / (np.abs(clipped) + 1e-8)  # Adam's first step: lr * g / |g|
  np.testing.assert_allclose(np.asarray(updates['w'], np.float64), want, rtol=1e-3)


def test_adams_closed_form_backward_step_is_its_vjp_for_float16_gradients():
  """Mixed mode's closed-form VJP of an Adam step (`StepInverse.step_vjp`) equals jax.vjp of
  the step for float16 parameters and gradients down to 1e-7 (2 (1 - b2) g was rounded to
  float16: 0 below 3e-5, d/dg 0.13 off in a float16 meta-gradient)."""
  rng = np.random.default_rng(0)
  opt, inverse = make_inner_optimizer('adam', 0.05), make_step_inverse('adam', 0.05)
  params = {'w': jnp.asarray(rng.normal(size=8), jnp.float16)}
  grads = {'w': jnp.asarray(rng.normal(size=8) * 10.0 ** rng.integers(-7, -1, 8), jnp.float16)}
  state = opt.init(params)
  after = opt.update(grads, state, params)[1]
  ct = InnerState({'w': jnp.asarray(rng.normal(size=8), jnp.float16)}, jax.tree.map(
      lambda x: (jnp.asarray(rng.normal(size=x.shape), x.dtype) if
                 jnp.issubdtype(x.dtype, jnp.floating) else np.zeros(x.shape, jax.dtypes.float0)),
      after))
  def step(g, s, p):
    updates, s = opt.update(g, s, p)
    return InnerState(optax.apply_updates(p, updates), s)
  want, got = jax.jit(lambda: (jax.vjp(step, grads, state, params)[1](ct)[0]['w'],
                               inverse.step_vjp(after, grads, ct)[0]['w']))()
  assert got.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             rtol=2e-3, atol=1e-3 * float(jnp.abs(want).max()))


def test_the_per_example_check_allows_a_low_precision_losss_rounding_not_its_batch_mates():
  """A float16 (bfloat16) loss that rounds apart by an ulp alone and in a batch (its matmul
  split in two for a batch, as GPU kernels chosen by shape do; on CPU the shipped models agree
  exactly) reads each example alone and passes `check_per_example` (it was refused, blamed on
  batch-mates); one that centres the inputs on the batch mean is still refused."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from datarater import tasks  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class SplitMatmul(tasks.Task):
    spec: Any
    dtype: Any
    centred: bool = False

    def init(self, key):
      return {'w': jax.random.normal(key, (64, NUM_CLASSES), self.dtype)}

    def per_example_loss(self, params, batch):
      x = batch['image'].reshape(len(batch['image']), -1).astype(self.dtype)
      x = x - x.mean(0) if self.centred else x
      w = params['w']
      logits = (x @ w if len(x) == 1 else x[:, :32] @ w[:32] + x[:, 32:] @ w[32:])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])

    def metrics(self, params, batch):
      return {'loss': self.per_example_loss(params, batch)}

  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.uniform(size=(4, 8, 8)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, NUM_CLASSES, 4), jnp.int32),
           'index': jnp.arange(4, dtype=jnp.int32)}
  for dtype in (jnp.float16, jnp.bfloat16):
    task = SplitMatmul(tiny_info().spec, dtype)
    params = task.init(jax.random.key(1))
    tasks.check_per_example(task, params, batch)
    together, alone = jax.jit(lambda p, b, task=task: (task.per_example_loss(p, b), jax.vmap(
        lambda x: task.per_example_loss(p, jax.tree.map(lambda v: v[None], x))[0])(b)))(
            params, batch)  # they do round apart (else the check had nothing to allow)
    assert not np.array_equal(np.asarray(together, np.float32), np.asarray(alone, np.float32))
  with pytest.raises(UserError, match="an example's loss depends on the rest of its batch"):
    tasks.check_per_example(dataclasses.replace(task, centred=True), params, batch)


@pytest.mark.slow  # ~40 s: three dtype pairs through every launcher's library call
def test_every_launcher_runs_with_a_float16_mlp_close_to_float32(tfds_dir, tmp_path):
  """The digits MLP task and rater computing in float16 (float32 parameters), and with float16
  parameters: a rater run, export, each valuation, the filter and `launch.train` run and give
  finite numbers; computing in float16, each valuation's scores are those of the float32 run
  up to float16 rounding."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from datarater import export  # pylint: disable=g-import-not-at-top
  from datarater.curation.filter import filter_dataset  # pylint: disable=g-import-not-at-top
  from datarater.data.corruption import Corruption  # pylint: disable=g-import-not-at-top
  from datarater.meta_train import meta_train  # pylint: disable=g-import-not-at-top
  from datarater.train import train  # pylint: disable=g-import-not-at-top
  from datarater.valuation.run import valuate  # pylint: disable=g-import-not-at-top
  from scipy.stats import spearmanr  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  scores = {}
  for dtype, param_dtype in (('float32', 'float32'), ('float16', 'float32'),
                             ('float16', 'float16')):
    c, out = digits.get_config(), tmp_path / f'{dtype}_{param_dtype}'
    c.data = digits_data(tfds_dir, 0.2)
    for section, name in ((c.task, 'mlp_classifier'), (c.rater, 'mlp_rater')):
      section.name, section.dtype, section.param_dtype = name, dtype, param_dtype
    c.task.hidden, c.rater.hidden = (32,), (16,)
    c.outer.steps, c.inner.population, c.inner.batch_size, c.outer.batch_size = 6, 2, 16, 16
    c.log_every = c.checkpoint_every = 3
    c.final_eval.num_models = 0
    v = c.valuation
    v.train_steps, v.checkpoint_every, v.reference_steps, v.dvemb_steps = 20, 5, 20, 6
    c.train.epochs, c.train.seeds = 1, (0,)
    meta_train(c, str(out / 'run'))
    last = [json.loads(line) for line in open(out / 'run' / 'metrics.jsonl')][-1]
    assert last['skipped_steps'] == 0 and np.isfinite(last['outer_loss']), last
    export.export_rater(str(out / 'run'), str(out / 'rater'))
    v.rater = str(out / 'rater')
    for method in ('tracin', 'mimic', 'dvemb', 'datarater'):
      valuate(method, c, str(out / method), progress=False)
      table = pq.read_table(out / method / f'scores_{method}.parquet')
      got = table.column('score').to_numpy()[np.argsort(table.column('id').to_numpy())]
      assert np.isfinite(got).all(), (dtype, param_dtype, method)
      scores[dtype, param_dtype, method] = got
    kept = filter_dataset('sklearn_digits', str(out / 'kept'), rater=str(out / 'rater'),
                          keep=0.8, data_dir=tfds_dir, corruption=Corruption(0.2, 0))
    assert kept['splits']['train']['kept'] == 958
    for policy in ('uniform', 'datarater'):
      report = train(c, policy, rater=str(out / 'rater') if policy == 'datarater' else '',
                     log=lambda line: None)
      assert np.isfinite(report['final']['eval']['loss']['mean']), (dtype, param_dtype, policy)
  for method in ('tracin', 'mimic', 'dvemb', 'datarater'):
    got, want = scores['float16', 'float32', method], scores['float32', 'float32', method]
    # (measured: 0.07% (rater) to 1.4% (DVEmb), rank correlation >= 0.9999)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2, method
    assert spearmanr(got[want != 0], want[want != 0])[0] > 0.999, method


def operand_dtypes(fn, *args, primitives=('dot_general',)) -> set:
  """The dtypes of the floating operands of every operation of `primitives` that `fn` computes
  (matrix products by default; nested jaxprs too)."""
  def eqns(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
          if hasattr(sub, 'eqns'):
            yield from eqns(sub)
  return {v.aval.dtype for e in eqns(jax.make_jaxpr(fn)(*args).jaxpr)
          if e.primitive.name in primitives for v in e.invars
          if jnp.issubdtype(v.aval.dtype, jnp.floating)}


@pytest.mark.parametrize('config_file', [
    'configs/digits.py', 'configs/text.py',
    pytest.param('configs/digits_cnn.py', marks=pytest.mark.slow)])
def test_the_command_line_sets_the_shipped_models_precision(config_file):
  """`--config.task.dtype=bfloat16` (and `rater.dtype`, `features.task.param_dtype`) on a shipped
  config, as a launcher parses it: the models built from it (the MLP, the CNN, the transformer
  LM and sequence rater) multiply in bfloat16 (every matrix product of the loss, the score, the
  embedding) and store parameters in `param_dtype`; without the overrides, in float32."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from launch import cli, train_rater  # pylint: disable=g-import-not-at-top
  info = tiny_info(dim=16)
  info.spec['image'] = jax.ShapeDtypeStruct((4, 4), np.float32)  # an image, for the CNN
  info.spec['tokens'] = jax.ShapeDtypeStruct((6,), np.int32)  # bytes, for the transformers
  batch = {'image': jnp.ones((2, 4, 4)), 'label': jnp.zeros(2, jnp.int32),
           'tokens': jnp.arange(12, dtype=jnp.int32).reshape(2, 6) * 20,
           'index': jnp.arange(2, dtype=jnp.int32)}

  def models(*overrides):
    argv = ['train_rater', f'--config={config_file}', *overrides]
    fv = flags.FlagValues()
    train_rater.define_flags(fv, argv)
    config = cli.parse_flags(argv, '', fv) and fv.config
    return (tasks.make_task(config.task, info), tasks.make_rater(config.rater, info),
            tasks.make_task(config.features.task, info, 'features.task'))

  bf16 = models('--config.task.dtype=bfloat16', '--config.rater.dtype=bfloat16',
                '--config.rater.param_dtype=bfloat16', '--config.features.task.dtype=bfloat16',
                '--config.features.task.param_dtype=bfloat16')
  for (task, rater, features), dtype, stored in (
      (models(), jnp.float32, (jnp.float32,) * 3),
      (bf16, jnp.bfloat16, (jnp.float32, jnp.bfloat16, jnp.bfloat16))):
    params = [jax.eval_shape(m.init, jax.random.key(0)) for m in (task, rater, features)]
    assert [{x.dtype for x in jax.tree.leaves(p)} for p in params] == [{jnp.dtype(s)}
                                                                      for s in stored]
    assert operand_dtypes(task.per_example_loss, params[0], batch) == {jnp.dtype(dtype)}
    assert operand_dtypes(rater.score, params[1], batch) == {jnp.dtype(dtype)}
    assert operand_dtypes(features.embed, params[2], batch) == {jnp.dtype(dtype)}


@pytest.mark.slow  # ~20 s: a rater run and a training run
def test_launchers_given_bfloat16_on_the_command_line_compute_and_store_in_it(tfds_dir, tmp_path,
                                                                             monkeypatch):
  """`launch.train_rater` and `launch.train` on configs/digits.py with `--config.task.dtype`,
  `rater.dtype` and `param_dtype` set to bfloat16: the models they build multiply in bfloat16
  and the parameters they checkpoint are bfloat16 (the inner models' stay float32 where only
  their `dtype` is set)."""
  from datarater import checkpointing, tasks  # pylint: disable=g-import-not-at-top
  from launch import cli, train_rater  # pylint: disable=g-import-not-at-top
  from launch import train as train_launcher  # pylint: disable=g-import-not-at-top
  from tests.run_config import as_flags, small_config  # pylint: disable=g-import-not-at-top
  built = []
  for name in ('make_task', 'make_rater'):
    make = getattr(tasks, name)
    monkeypatch.setattr(tasks, name, lambda *a, make=make, **k: built.append(make(*a, **k)) or
                        built[-1])
  bf16 = ['--config.task.dtype=bfloat16', '--config.rater.dtype=bfloat16',
          '--config.rater.param_dtype=bfloat16']
  assert cli.invoke(train_rater, ['train_rater', *as_flags(small_config(tfds_dir, steps=2)),
                                  *bf16, f'--workdir={tmp_path / "rater"}']) == 0
  train_flags = [*as_flags(small_config(tfds_dir), ('data', 'task')), '--config.train.epochs=1',
                 '--config.train.seeds=(0,)', '--config.task.dtype=bfloat16',
                 '--config.task.param_dtype=bfloat16', f'--workdir={tmp_path / "train"}']
  assert cli.invoke(train_launcher, ['train', *train_flags]) == 0
  batch = {'image': jnp.ones((2, 8, 8)), 'label': jnp.zeros(2, jnp.int32),
           'index': jnp.arange(2, dtype=jnp.int32)}
  assert {type(m) for m in built} == {Classifier, LabelledRater}
  for model in built:
    params = jax.eval_shape(model.init, jax.random.key(0))
    read = model.score if isinstance(model, LabelledRater) else model.per_example_loss
    assert operand_dtypes(read, params, batch) == {jnp.dtype(jnp.bfloat16)}, model
  rater_run, _ = checkpointing.restore_latest_on_host(str(tmp_path / 'rater' / 'checkpoints'))
  leaves = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}
  assert leaves(rater_run['rater_params']) == {jnp.dtype(jnp.bfloat16)}
  assert leaves(rater_run['population']['params']) == {jnp.dtype(jnp.float32)}
  train_run, _ = checkpointing.restore_latest_on_host(str(tmp_path / 'train' / 'checkpoints'))
  assert leaves(train_run['models']['params']) == {jnp.dtype(jnp.bfloat16)}
