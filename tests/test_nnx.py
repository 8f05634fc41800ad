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
from datarater.tasks import classifier
from datarater.valuation import mimic
from inner_loop.unroll import init_inner_state, inner_step

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
  # nnx's Linear is not nn.Dense: no ghost products, exact per-example gradients instead.
  assert not pergrad.ghost_covers(nnx_task.per_example_loss, params, batch)


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


def test_mimic_last_of_nnx_names_the_layers(pair):
  nnx_task, _, params, batch = pair
  with pytest.raises(UserError, match='mimic_layers.*dense_0, dense_1'):
    mimic.resolve_layers(nnx_task.per_example_loss, params, batch, 'last')


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
