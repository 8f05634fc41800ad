"""flax.nnx models through `tasks.NnxModel`: the same values and gradients as the linen model of
the same weights (flax's linen MLP is the oracle), and one-line refusals of what the interface
cannot pass."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from datarater import pergrad, tasks
from datarater.errors import UserError
from datarater.data.pipeline import Split
from datarater.tasks import classifier
from datarater.valuation import base, mimic, store
from inner_loop.unroll import init_inner_state, inner_step
from tests.tiny import tiny_info

SPEC = {'x': jax.ShapeDtypeStruct((6,), jnp.float32), 'label': jax.ShapeDtypeStruct((), jnp.int32)}
CLASSES = 3


class Mlp(nnx.Module):
  """classifier.MLP((5, CLASSES)) in nnx, its layers named as linen names them."""

  def __init__(self, rngs):
    self.dense_0 = nnx.Linear(6, 5, rngs=rngs)
    self.dense_1 = nnx.Linear(5, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.dense_1(nnx.relu(self.dense_0(x)))


@dataclasses.dataclass(frozen=True)
class NnxClassifier(tasks.Task):
  spec: tasks.FeatureSpec
  num_classes: int
  model: tasks.NnxModel

  def init(self, key):
    return self.model.init(key)

  def per_example_loss(self, params, batch):
    logits = self.model.bind(params)(batch['x'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])


@pytest.fixture(scope='module')
def pair():
  """(nnx task, linen task, linen's initial parameters, a batch of 5)."""
  nnx_task = NnxClassifier(SPEC, CLASSES, tasks.NnxModel.of(Mlp))
  linen = classifier.Classifier(classifier.MLP((5, CLASSES)), SPEC, 'x', 'label',
                                 CLASSES)
  params = linen.init(jax.random.key(1))
  keys = jax.random.split(jax.random.key(2))
  batch = {'x': jax.random.normal(keys[0], (5, 6)),
           'label': jax.random.randint(keys[1], (5,), 0, CLASSES), 'index': jnp.arange(5)}
  return nnx_task, linen, params, batch


def test_nnx_params_have_linen_layout_and_pass_the_task_checks(pair):
  nnx_task, _, params, batch = pair
  own = jax.eval_shape(nnx_task.init, jax.random.key(0))
  assert jax.tree.structure(own) == jax.tree.structure(params)  # {'params': {'dense_0': ...}}
  assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, params)
  assert pergrad.param_owners(own) == {'dense_0', 'dense_1'}
  tasks.base.check_outputs(nnx_task)
  tasks.check_per_example(nnx_task, params, batch)


def test_nnx_equals_linen_losses_gradients_and_meta_gradient(pair):
  nnx_task, linen, params, batch = pair
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  def everything(task):  # one compiled program per model
    def outer(w):  # the held-out loss after one weighted SGD step, of the per-example weights
      state = init_inner_state(params, optax.sgd(0.5))
      state, _ = inner_step(task.per_example_loss, optax.sgd(0.5), state, batch, w)
      return jnp.mean(task.per_example_loss(state.params, batch))
    loss = task.per_example_loss
    # Layer selection reads nnx's paths as linen's.
    picked = pergrad.chain(pergrad.select(['dense_1']), pergrad.sq_norm())
    return jax.jit(lambda: (loss(params, batch), pergrad.per_example_grads(loss, params, batch),
                            jax.grad(outer)(jnp.ones(5)),
                            pergrad.per_example(loss, params, batch, picked)))()
  got, want = everything(nnx_task), everything(linen)
  assert np.abs(want[2]).max() > 1e-4  # the meta-gradient: not a degenerate comparison
  jax.tree.map(close, got, want)
  # nnx.Linear calls are tapped as nn.Dense calls are: ghost products cover the model.
  assert pergrad.ghost_covers(nnx_task.per_example_loss, params, batch)


class WithBatchNorm(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(6, CLASSES, rngs=rngs)
    self.norm = nnx.BatchNorm(CLASSES, rngs=rngs)


class WithDropout(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(6, CLASSES, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)


@pytest.mark.parametrize('module, says', [(WithBatchNorm, 'BatchStat'), (WithDropout, 'Rng')])
def test_nnx_state_besides_params_refused_in_one_line(module, says):
  with pytest.raises(UserError) as e:
    tasks.NnxModel.of(module)
  assert says in str(e.value) and 'nnx.LayerNorm' in str(e.value)
  assert "batch['index']" in str(e.value) and '\n' not in str(e.value)


def sequential(rngs):
  return nnx.Sequential(nnx.Linear(6, 5, rngs=rngs), nnx.tanh, nnx.Linear(5, CLASSES, rngs=rngs))


class NormLast(nnx.Module):
  """A Linear, then a LayerNorm: a last layer whose calls are not seen."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(6, CLASSES, rngs=rngs)
    self.norm = nnx.LayerNorm(CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.dense(x))


def exact_grads(loss, params, batch):
  """Each example's gradient alone (jax.grad of a batch of one), leaves [B, ...]."""
  one = lambda ex: jax.grad(lambda p: loss(p, jax.tree.map(lambda x: x[None], ex))[0])(params)
  return jax.vmap(one)(batch)


def kron_projected(grads, state):
  """[B, D]: each projected layer's [dW; db], row-major, times kron(P_in, P_out), in order."""
  out = []
  for name, (p_in, p_out) in zip(state.names, state.factors):
    layer = grads['params']
    for key in name.split('/'):
      layer = layer[key]
    m = np.concatenate([layer['kernel'], layer['bias'][:, None]], 1)
    out.append(m.reshape(len(m), -1) @ np.kron(np.asarray(p_in), np.asarray(p_out)))
  return np.concatenate(out, 1)


def test_nnx_ghost_dots_and_factored_projection_equal_exact_gradients(pair):
  """nnx.Linear layers inside nnx.Sequential (the MLP's: the store test below)."""
  batch = pair[3]
  with jax.enable_x64(True):
    task = NnxClassifier(SPEC, CLASSES, tasks.NnxModel.of(sequential))
    params = jax.tree.map(lambda x: x.astype(jnp.float64), task.init(jax.random.key(3)))
    batch = dict(batch, x=batch['x'].astype(jnp.float64))
    loss = task.per_example_loss
    state = pergrad.factored_projection(2, 3, seed=4).init(loss, params, batch)
    dots, projected, grads = jax.jit(lambda p, b: (
        pergrad.ghost_dots(loss, p, b),
        pergrad.per_example_projected(loss, p, b, state, chunk_size=2),
        exact_grads(loss, p, b)))(params, batch)
  grads = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
  flat = np.concatenate([g.reshape(5, -1) for g in jax.tree.leaves(grads)], 1)
  np.testing.assert_allclose(dots, flat @ flat.T, rtol=1e-10, atol=1e-12)
  assert list(state.names) == ['layers/0', 'layers/2']
  np.testing.assert_allclose(projected, kron_projected(grads, state), rtol=1e-10, atol=1e-12)


def test_gradient_store_of_nnx_equals_its_linen_twins_exact_gradients(pair, tmp_path):
  """TracIn and self-influence from the store of the nnx MLP; the oracle: the linen MLP of the
  same weights, its exact per-example gradients projected by kron(P_in, P_out)."""
  nnx_task, linen, params, _ = pair
  rng = np.random.default_rng(0)
  features = {'x': rng.normal(size=(7, 6)), 'label': rng.integers(0, CLASSES, 7).astype(np.int32)}
  split = Split(features, np.arange(7), np.zeros(7, np.int8), ('clean',), tiny_info(6))
  with jax.enable_x64(True):
    everything = jax.tree.map(jnp.asarray, split.take(np.arange(7)))
    p64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    later = jax.tree.map(lambda x: 0.9 * x + 0.05, p64)
    ckpts = jax.tree.map(lambda *x: jnp.stack(x), p64, later)
    lrs = np.asarray([0.3, 0.1])
    run = base.TrainingRun(batches={}, weights=jnp.ones((2, 1)), step_lrs=jnp.asarray(lrs),
                           checkpoints=ckpts, checkpoint_steps=jnp.arange(2), final_params=later)
    proj = pergrad.factored_projection(2, 2, seed=1)
    s = store.build(str(tmp_path / 'g'), nnx_task.per_example_loss, run, split, proj,
                    dtype='float64')
    test = jax.tree.map(lambda x: x[:3], everything)
    got = s.self_influence(), s.tracin(nnx_task.per_example_loss, run, test)
    state = proj.init(linen.per_example_loss, p64, everything)
    grads = jax.jit(jax.vmap(lambda p: exact_grads(linen.per_example_loss, p, everything)))(ckpts)
  grads = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
  g = [kron_projected(jax.tree.map(lambda x, c=c: x[c], grads), state) for c in range(2)]
  want = (sum(lr * np.sum(x * x, 1) for lr, x in zip(lrs, g)),
          sum(lr * x @ x[:3].T for lr, x in zip(lrs, g)))
  assert want[0].min() > 1e-6  # not a degenerate comparison
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('make, last', [(Mlp, 'dense_1'), (sequential, 'layers/2')])
def test_mimic_last_of_nnx_is_its_last_linear(pair, make, last):
  _, _, _, batch = pair
  task = NnxClassifier(SPEC, CLASSES, tasks.NnxModel.of(make))
  params = jax.eval_shape(task.init, jax.random.key(0))
  assert mimic.resolve_layers(task.per_example_loss, params, batch, 'last') == [last]


def test_mimic_last_of_nnx_ending_in_another_layer_is_refused_in_one_line(pair):
  task = NnxClassifier(SPEC, CLASSES, tasks.NnxModel.of(NormLast))
  params = jax.eval_shape(task.init, jax.random.key(0))
  with pytest.raises(UserError, match='not those of norm.*mimic_layers.*dense, norm') as e:
    mimic.resolve_layers(task.per_example_loss, params, pair[3], 'last')
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_nnx_task_trains_a_rater_from_the_command_line(tfds_dir, tmp_path):
  """The README's nnx snippet as a user's module, through launch.train_rater for 2 outer steps."""
  (tmp_path / 'my_nnx.py').write_text(textwrap.dedent('''
      import dataclasses, math
      import ml_collections, optax
      from flax import nnx
      from datarater import tasks
      from tests.run_config import small_config

      class Mlp(nnx.Module):
        def __init__(self, din, classes, rngs):
          self.l1 = nnx.Linear(din, 16, rngs=rngs)
          self.norm = nnx.LayerNorm(16, rngs=rngs)
          self.l2 = nnx.Linear(16, classes, rngs=rngs)
        def __call__(self, x):
          return self.l2(nnx.relu(self.norm(self.l1(x.reshape(len(x), -1)))))

      @dataclasses.dataclass(frozen=True)
      class NnxMlp(tasks.Task):
        spec: tasks.FeatureSpec
        num_classes: int
        model: tasks.NnxModel
        def init(self, key):
          return self.model.init(key)
        def per_example_loss(self, params, batch):
          logits = self.model.bind(params)(batch['image'])
          return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])

      @tasks.register_task('nnx_mlp', schema={})
      def nnx_mlp(config, info):
        din, classes = math.prod(info.spec['image'].shape), info.num_classes['label']
        return NnxMlp(info.spec, classes, tasks.NnxModel.of(lambda r: Mlp(din, classes, r)))

      def get_config():
        c = small_config(%r, steps=2)
        c.task = ml_collections.ConfigDict({'name': 'nnx_mlp'})
        return c
      ''' % tfds_dir))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=f'{root}:{tmp_path}')
  done = subprocess.run([sys.executable, '-m', 'launch.train_rater',
                         f'--config={tmp_path}/my_nnx.py', f'--workdir={tmp_path}/w'],
                        cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / 'w' / 'report.json').exists()
