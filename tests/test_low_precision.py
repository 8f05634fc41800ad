"""A model computing in bfloat16 (flax `dtype`), or holding bfloat16 parameters (`param_dtype`):
what the library computes itself (loss weights, scores, projections, the Polyak average, the
data value embedding's K) is float32, and what the model rounds stays within its rounding of
the same model in float64."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from datarater import evaluation, pergrad
from datarater.errors import UserError
from datarater.tasks.classifier import Classifier, LabelledRater
from datarater.valuation import dvemb
from datarater.valuation.base import TrainingRun
from inner_loop.optimizers import make_inner_optimizer, make_step_inverse
from inner_loop.weighting import softmax_weights
from outer_loop import averaging, meta_step
from outer_loop.estimators import Mixed, Reverse, make_estimator
from tests.tiny import NUM_CLASSES, tiny_batches, tiny_info


class Mlp(nn.Module):
  """A tanh MLP computing in `dtype`, its parameters in `param_dtype` (flax's mixed precision)."""
  features: tuple
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, embed=False):
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.features):
      x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f'dense_{i}')(x)
      x = jnp.tanh(x) if i < len(self.features) - 1 else x
    return x


def task(dtype=jnp.bfloat16, param_dtype=jnp.float32, hidden=6):
  module = Mlp((hidden, NUM_CLASSES), dtype, param_dtype)
  return Classifier(module, tiny_info().spec, 'image', 'label', NUM_CLASSES)


def problem(dtype, param_dtype, lr=0.05):
  rater = LabelledRater(Mlp((4, NUM_CLASSES), dtype, param_dtype), tiny_info().spec, 'image',
                        'label')
  return meta_step.MetaProblem(task=task(dtype, param_dtype), rater=rater,
                               inner_optimizer=make_inner_optimizer('adam', lr),
                               outer_optimizer=optax.adam(1e-2), temperature=0.7, reset_every=3)


def cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def rel(a, b) -> float:
  a, b = (np.asarray(ravel_pytree(cast(x, jnp.float32))[0], np.float64) for x in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_mixed_mode_through_bfloat16_parameters_follows_reverse_mode():
  """bfloat16 parameters (task and rater), inner Adam, T = 6: mixed mode (replayed, Adam's
  closed-form backward step) gives reverse mode's meta-gradient, both within bfloat16 rounding
  of the float64 one; 'auto' replays for them and 'invert' is refused."""
  bf16 = problem(jnp.bfloat16, jnp.bfloat16)
  lr = 0.05
  outer = ml_collections.ConfigDict({'meta_gradient': 'mixed', 'mixed_recompute': 'auto',
                                     'mixed_segment': 0})
  inner_cfg = ml_collections.ConfigDict({'optimizer': 'adam', 'learning_rate': lr})
  params = jax.eval_shape(bf16.task.init, jax.random.key(0))
  assert make_estimator(outer, inner_cfg, params).recompute == 'replay'
  wide = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  assert make_estimator(outer, inner_cfg, wide).recompute == 'invert'
  outer.mixed_recompute = 'invert'
  with pytest.raises(UserError, match="'invert' undoes inner steps in the task's bfloat16"):
    make_estimator(outer, inner_cfg, params)
  state = meta_step.init_outer_state(bf16, jax.random.key(1), 2)
  inner, held_out = jax.tree.map(jnp.asarray, tiny_batches(0, population=2, steps=6, batch=8))
  grads = {}
  for name, est in (('reverse', Reverse()),
                    ('mixed', Mixed('replay', 0, make_step_inverse('adam', lr)))):
    (loss, _), g = jax.jit(lambda p, pop, est=est: meta_step.meta_gradient(
        bf16, est, p, pop, inner, held_out))(state.rater_params, state.population)
    assert loss.dtype == jnp.float32  # the held-out mean is the library's: float32
    assert {x.dtype for x in jax.tree.leaves(g)} == {jnp.dtype(jnp.bfloat16)}
    grads[name] = g
  with jax.enable_x64():
    f64 = problem(jnp.float64, jnp.float64)
    (_, _), want = jax.jit(lambda p, pop: meta_step.meta_gradient(
        f64, Reverse(), p, pop, cast(inner, jnp.float64), cast(held_out, jnp.float64)))(
            cast(state.rater_params, jnp.float64), cast(state.population, jnp.float64))
    want = jax.tree.map(np.asarray, want)
  assert np.linalg.norm(ravel_pytree(want)[0]) > 1e-4
  # (3.0e-2 and 2.3e-2 here; bfloat16's eps is 7.8e-3, fresh Adam moments amplify it)
  assert rel(grads['reverse'], want) < 0.1, rel(grads['reverse'], want)
  assert rel(grads['mixed'], want) < 0.1, rel(grads['mixed'], want)  # (NaN: b2 -> 1 in bf16)


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
