"""Tasks and raters against explicit numpy forward passes (float64), and the registry."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from datarater import tasks
from datarater.errors import UserError
from datarater.tasks.lm import LanguageModel, SequenceRater, Transformer
from tests.tiny import tiny_info


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _mlp_forward(params, x, activation=np.tanh, embed=False):
  """The MLP by hand: flatten, Dense layers dense_0..dense_L, activation between them."""
  p = params['params']
  h = np.asarray(x, np.float64).reshape(len(x), -1)
  layers = sorted(p, key=lambda n: int(n.split('_')[1]))
  for i, name in enumerate(layers):
    if embed and i == len(layers) - 1:
      return h
    h = h @ np.asarray(p[name]['kernel']) + np.asarray(p[name]['bias'])
    if i < len(layers) - 1:
      h = activation(h)
  return h


def _batch(n=9, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(n, 5))),
          'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32), 'index': jnp.arange(n)}


def _f64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64), tree)


def test_mlp_classifier_loss_metrics_and_embedding_equal_a_hand_forward_pass():
  task = tasks.make_task(ml_collections.ConfigDict(
      {'name': 'mlp_classifier', 'hidden': (4, 6), 'activation': 'tanh'}), tiny_info())
  params = _f64(jax.jit(task.init)(jax.random.key(0)))  # (each call jitted: op by op was slow)
  batch = _batch()
  logits = _mlp_forward(params, batch['image'])
  labels = np.asarray(batch['label'])
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  want = -log_p[np.arange(len(labels)), labels]
  np.testing.assert_allclose(jax.jit(task.per_example_loss)(params, batch), want, rtol=1e-12)
  metrics = jax.jit(task.metrics)(params, batch)
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-12)
  np.testing.assert_array_equal(metrics['accuracy'], logits.argmax(1) == labels)
  diverged = jax.tree.map(lambda x: x * np.nan, params)  # NaN logits: no class is predicted
  assert np.isnan(jax.jit(task.metrics)(diverged, batch)['accuracy']).all()  # (argmax: class 0)
  np.testing.assert_allclose(jax.jit(task.embed)(params, batch),
                             _mlp_forward(params, batch['image'], embed=True), rtol=1e-12)
  assert task.num_classes == 3
  np.testing.assert_array_equal(task.labels(batch), labels)
  relabelled = task.with_labels(batch, jnp.full(9, 2))
  np.testing.assert_array_equal(relabelled['label'], 2)
  np.testing.assert_array_equal(relabelled['image'], batch['image'])


def test_labelled_rater_scores_its_label_output():
  rater = tasks.make_rater(ml_collections.ConfigDict(
      {'name': 'mlp_rater', 'hidden': (4,), 'activation': 'tanh'}), tiny_info())
  params = _f64(rater.init(jax.random.key(1)))
  batch = _batch(seed=1)
  per_class = _mlp_forward(params, batch['image'])
  want = per_class[np.arange(9), np.asarray(batch['label'])]
  np.testing.assert_allclose(rater.score(params, batch), want, rtol=1e-12)


def test_log_softmax_readout_scores_the_labels_log_likelihood():
  rater = tasks.make_rater(ml_collections.ConfigDict(
      {'name': 'mlp_rater', 'hidden': (4,), 'activation': 'tanh', 'readout': 'log_softmax'}),
      tiny_info())
  params = _f64(rater.init(jax.random.key(1)))
  batch = _batch(seed=1)
  per_class = _mlp_forward(params, batch['image'])
  p = np.exp(per_class) / np.exp(per_class).sum(1, keepdims=True)
  want = np.log(p[np.arange(9), np.asarray(batch['label'])])
  np.testing.assert_allclose(rater.score(params, batch), want, rtol=1e-12)
  assert (want < 0).all()
  with pytest.raises(UserError, match='readout'):
    tasks.make_rater(ml_collections.ConfigDict(
        {'name': 'mlp_rater', 'hidden': (4,), 'activation': 'tanh', 'readout': 'softmax'}),
        tiny_info())


def test_unknown_names_and_missing_features_are_user_errors():
  with pytest.raises(UserError, match="unknown task.name 'resnet'"):
    tasks.make_task(ml_collections.ConfigDict({'name': 'resnet'}), tiny_info())
  with pytest.raises(UserError, match="unknown rater.name 'x'"):
    tasks.make_rater(ml_collections.ConfigDict({'name': 'x'}), tiny_info())
  with pytest.raises(UserError, match="input 'pixels'"):
    tasks.make_task(ml_collections.ConfigDict({'name': 'mlp_classifier', 'hidden': (4,),
                                               'activation': 'relu', 'input': 'pixels'}),
                    tiny_info())
  with pytest.raises(UserError, match="unknown activation 'swishy'"):
    task = tasks.make_task(ml_collections.ConfigDict(
        {'name': 'mlp_classifier', 'hidden': (4,), 'activation': 'swishy'}), tiny_info())
    task.init(jax.random.key(0))


def test_tokens_outside_the_vocabulary_are_one_line_not_a_nan_loss():
  """Without the check, a token >= vocab makes the LM's loss NaN (take_along_axis fills NaN)."""
  spec = {'tokens': jax.ShapeDtypeStruct((6,), jnp.int32)}
  task = LanguageModel(Transformer(10, 8, 2, 1, 12, 10), spec, 'tokens')
  rater = SequenceRater(Transformer(10, 8, 2, 1, 12, 1, pool=True, causal=False), spec, 'tokens')
  good = {'tokens': np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 9]], np.int32)}
  bad = {'tokens': np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 200]], np.int32)}
  task.check_data(good)
  rater.check_data(good)
  params = jax.jit(task.init)(jax.random.key(0))  # (jitted: op by op was most of the time)
  assert np.isnan(np.asarray(jax.jit(task.per_example_loss)(params, bad))[1])  # the check's aim
  with pytest.raises(UserError, match=r"tokens in \[1, 200\], outside the vocabulary of "
                                      r"task.vocab=10 \(set it to at least 201\)"):
    task.check_data(bad)
  with pytest.raises(UserError, match='rater.vocab=10'):
    rater.check_data(bad)


def test_a_loss_that_reads_the_rest_of_the_batch_is_refused_for_per_example_gradients():
  """Batch norm in training mode (here: inputs centred on the batch mean) makes an example's loss
  depend on its batch-mates; the shipped MLP's does not."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'name': 'mlp_classifier', 'hidden': (4,),
                                      'activation': 'tanh'})
  mlp = tasks.make_task(config, tiny_info())
  params, batch = jax.jit(mlp.init)(jax.random.key(0)), _batch(4)
  tasks.check_per_example(mlp, params, batch)

  @dataclasses.dataclass(frozen=True)
  class BatchCentred(type(mlp)):
    def per_example_loss(self, params, batch):
      x = batch['image'] - batch['image'].mean(0)
      return super().per_example_loss(params, {**batch, 'image': x})

  centred = BatchCentred(**{f.name: getattr(mlp, f.name) for f in dataclasses.fields(mlp)})
  with pytest.raises(UserError, match="task BatchCentred: an example's loss depends on the rest"):
    tasks.check_per_example(centred, params, batch)


def test_input_and_label_fields_choose_the_features_the_classifier_and_rater_read():
  """task.input / task.label (and rater.input / rater.label) name the features read, not the
  dataset's supervised keys: with two image-like and two label features holding different values,
  the loss and the score equal a hand forward pass on the chosen ones, and change when only the
  chosen input changes, not when the other input does."""
  from datarater.data.pipeline import DataInfo  # pylint: disable=g-import-not-at-top
  spec = {'image': jax.ShapeDtypeStruct((5,), np.float32),
          'pixels': jax.ShapeDtypeStruct((5,), np.float32),
          'label': jax.ShapeDtypeStruct((), np.int32),
          'coarse_label': jax.ShapeDtypeStruct((), np.int32)}
  info = DataInfo('two_views', spec, {'label': 3, 'coarse_label': 4}, ('image', 'label'))
  fields = {'hidden': (4,), 'activation': 'tanh', 'input': 'pixels', 'label': 'coarse_label'}
  task = tasks.make_task(ml_collections.ConfigDict({'name': 'mlp_classifier', **fields}), info)
  rater = tasks.make_rater(ml_collections.ConfigDict({'name': 'mlp_rater', **fields}), info)
  assert task.num_classes == 4
  params = _f64(jax.jit(task.init)(jax.random.key(0)))  # (each call jitted: op by op was slow)
  phi = _f64(jax.jit(rater.init)(jax.random.key(1)))
  loss, score = jax.jit(task.per_example_loss), jax.jit(rater.score)
  rng = np.random.default_rng(3)
  n = 8
  batch = {'image': jnp.asarray(rng.normal(size=(n, 5))),
           'pixels': jnp.asarray(rng.normal(size=(n, 5))),
           'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32),
           'coarse_label': jnp.asarray((np.arange(n) % 4 + 1) % 4, jnp.int32),
           'index': jnp.arange(n)}

  def want_loss(b):
    logits = _mlp_forward(params, b['pixels'])
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -log_p[np.arange(n), np.asarray(b['coarse_label'])]

  def want_score(b):
    return _mlp_forward(phi, b['pixels'])[np.arange(n), np.asarray(b['coarse_label'])]

  other = {**batch, 'image': jnp.asarray(rng.normal(size=(n, 5))),
           'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32)}
  chosen = {**batch, 'pixels': jnp.asarray(rng.normal(size=(n, 5)))}
  for b in (batch, other, chosen):
    np.testing.assert_allclose(loss(params, b), want_loss(b), rtol=1e-12)
    np.testing.assert_allclose(score(phi, b), want_score(b), rtol=1e-12)
  np.testing.assert_array_equal(task.labels(batch), batch['coarse_label'])
  # Only the chosen features matter: the other input and label leave loss and score unchanged.
  np.testing.assert_array_equal(loss(params, other), loss(params, batch))
  np.testing.assert_array_equal(score(phi, other), score(phi, batch))
  assert np.abs(np.asarray(loss(params, chosen) - loss(params, batch))).min() > 1e-6
  assert np.abs(np.asarray(score(phi, chosen) - score(phi, batch))).min() > 1e-6


def _regression_info():
  """A regression dataset: an input, a float target, a pair of floats and an integer count (no
  class labels but the corruption record)."""
  from datarater.data.pipeline import DataInfo  # pylint: disable=g-import-not-at-top
  spec = {'x': jax.ShapeDtypeStruct((2, 3), np.float32),
          'target': jax.ShapeDtypeStruct((), np.float32),
          'pair': jax.ShapeDtypeStruct((2,), np.float32),
          'count': jax.ShapeDtypeStruct((), np.int32),
          'corruption': jax.ShapeDtypeStruct((), np.int32)}
  return DataInfo('regression', spec, {'corruption': 2}, ('x', 'target'))


@pytest.mark.parametrize('label', ['', 'pair'])  # the supervised target; a label of 2 floats
def test_mlp_rater_of_a_label_that_is_no_class_scores_the_input_and_label_together(label):
  """A regression target is no class label: `mlp_rater` reads it with the input, one score per
  example equal to the hand MLP on [flattened x, y] (float64), which changes with y alone."""
  fields = {'name': 'mlp_rater', 'hidden': (4,), 'activation': 'tanh', 'label': label}
  rater = tasks.make_rater(ml_collections.ConfigDict(fields), _regression_info())
  phi = _f64(jax.jit(rater.init)(jax.random.key(1)))
  rng = np.random.default_rng(4)
  n, key = 7, label or 'target'
  batch = {'x': jnp.asarray(rng.normal(size=(n, 2, 3))),
           'target': jnp.asarray(rng.normal(size=n)), 'pair': jnp.asarray(rng.normal(size=(n, 2))),
           'count': jnp.asarray(rng.integers(-5, 9, n), jnp.int32), 'index': jnp.arange(n)}
  other = {**batch, key: batch[key] + 1}
  score = jax.jit(rater.score)
  for b in (batch, other):
    joined = np.concatenate([np.asarray(b['x']).reshape(n, -1),
                             np.asarray(b[key]).reshape(n, -1)], 1)
    want = _mlp_forward(phi, joined)
    assert want.shape == (n, 1)
    np.testing.assert_allclose(score(phi, b), want[:, 0], rtol=1e-12)
  assert np.abs(np.asarray(score(phi, other) - score(phi, batch))).min() > 1e-6
  with pytest.raises(UserError, match=r"^rater.readout='log_softmax' reads a softmax over "
                     r"classes: label 'target' of dataset 'regression' is no class label"):
    tasks.make_rater(ml_collections.ConfigDict({**fields, 'label': '',
                                                'readout': 'log_softmax'}), _regression_info())


def test_a_classifier_on_a_label_that_is_no_class_names_its_config_section():
  """A classifier task, rater or feature model read by a regression dataset: one line naming
  the section whose model needs a class label, and mlp_rater for such a label."""
  mlp = {'name': 'mlp_classifier', 'hidden': (4,), 'activation': 'tanh'}
  for section in ('task', 'features.task'):
    with pytest.raises(UserError, match=rf"^{section}.name='mlp_classifier' needs an input "
                       r"feature and a class-label feature \(a label that is no class, such as a "
                       r"regression target, is read by rater.name='mlp_rater' and by a task of "
                       r"your own\): got input 'x', label 'target'"):
      tasks.make_task(ml_collections.ConfigDict(mlp), _regression_info(), section)
  cnn = {'name': 'cnn_rater', 'channels': (2,), 'strides': (1,), 'pool': 'mean', 'hidden': 0,
         'groups': 1, 'activation': 'relu'}
  with pytest.raises(UserError, match=r"^rater.name='cnn_rater' needs an input feature and a "
                     r'class-label feature'):
    tasks.make_rater(ml_collections.ConfigDict(cnn), _regression_info())
  # A misspelt label, and integers that are no class label (classes left undeclared, more
  # likely than a regression target): refused, not read as numbers.
  for label in ('traget', 'count'):
    with pytest.raises(UserError, match=r"^rater.name='mlp_rater' needs an input feature and a "
                       rf"class-label or float label feature: got input 'x', label '{label}'"):
      tasks.make_rater(ml_collections.ConfigDict({**mlp, 'name': 'mlp_rater', 'label': label}),
                       _regression_info())


def test_a_task_dataclass_may_add_fields_after_num_classes():
  """WORKSPACE's recipe: a frozen dataclass with spec, num_classes and a field of its own, none
  with a default (a default inherited from the interface made `width` need one too); a task
  without num_classes has none."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class Wide(tasks.Task):
    spec: dict
    num_classes: int
    width: int

    def init(self, key):
      return {}

    def per_example_loss(self, params, batch):
      return batch['x'].sum(-1)

  @dataclasses.dataclass(frozen=True)
  class Unlabelled(tasks.Task):
    spec: dict

    def init(self, key):
      return {}

    def per_example_loss(self, params, batch):
      return batch['x'].sum(-1)

  assert tasks.num_classes(Wide({}, 3, 8)) == 3 and Wide({}, 3, 8).width == 8
  assert tasks.num_classes(Unlabelled({})) is None


@pytest.mark.parametrize('loss, metrics, says', [
    (lambda l: l.mean(), None, 'per_example_loss must return one value per example, shape (B,): '
                              'on a batch of 3 it returned shape ()'),
    (lambda l: l[:, None], None, 'per_example_loss must return one value per example, shape '
                                 '(B,): on a batch of 3 it returned shape (3, 1)'),
    (lambda l: jnp.round(100 * l).astype(jnp.int32), None,
     'per_example_loss must return floats: it is differentiated, and its int32 values have zero '
     'gradient'),
    (None, lambda m: {'accuracy': m['accuracy']}, "holding the per-example 'loss'; it returned "
                                                  "['accuracy']"),
    (None, lambda m: {k: v.mean() for k, v in m.items()},
     "on a batch of 3 it returned {'accuracy': (), 'loss': ()}"),
    (None, lambda m: m['loss'], "holding the per-example 'loss'; it returned ShapeDtypeStruct"),
])
def test_a_task_returning_other_shapes_is_refused_when_it_is_built(loss, metrics, says):
  """A loss of shape [] or [B, 1] trained without a word (the weighted mean broadcasts) and the
  rater learned nothing; an integer loss (rounded) has zero gradient, so launch.train left the
  model at its init and launch.train_rater's meta-gradient was 0; metrics without per-example
  `loss` failed after the whole run."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'name': 'mlp_classifier', 'hidden': (4,),
                                      'activation': 'tanh'})
  mlp = tasks.make_task(config, tiny_info())  # the shipped task passes

  @dataclasses.dataclass(frozen=True)
  class Odd(type(mlp)):
    def per_example_loss(self, params, batch):
      out = super().per_example_loss(params, batch)
      return loss(out) if loss else out

    def metrics(self, params, batch):
      out = super().metrics(params, batch)
      return metrics(out) if metrics else out

  tasks.register_task('odd_for_test', {})(
      lambda config, info: Odd(**{f.name: getattr(mlp, f.name) for f in dataclasses.fields(mlp)}))
  try:
    with pytest.raises(UserError) as raised:
      tasks.make_task(ml_collections.ConfigDict({'name': 'odd_for_test'}), tiny_info())
    assert f'Odd.{"per_example_loss" if loss else "metrics"} must return' in str(raised.value)
    assert says in str(raised.value), str(raised.value)
  finally:
    tasks.TASKS.pop('odd_for_test')


@pytest.mark.parametrize('change, says', [
    (lambda s: s[:, None], r'must return one value per example, shape \(B,\): on a batch of 3 it '
                           r'returned shape \(3, 1\)'),
    (lambda s: s > 0, 'must return floats: it is differentiated, and its bool values have zero')])
def test_a_rater_scoring_other_shapes_is_refused_when_it_is_built(change, says):
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'name': 'mlp_rater', 'hidden': (4,), 'activation': 'tanh'})
  rater = tasks.make_rater(config, tiny_info())

  @dataclasses.dataclass(frozen=True)
  class Column(type(rater)):
    def score(self, params, batch):
      return change(super().score(params, batch))

  tasks.register_rater('column_for_test', {})(
      lambda config, info: Column(**{f.name: getattr(rater, f.name)
                                     for f in dataclasses.fields(rater)}))
  try:
    with pytest.raises(UserError, match='Column.score ' + says):
      tasks.make_rater(ml_collections.ConfigDict({'name': 'column_for_test'}), tiny_info())
  finally:
    tasks.RATERS.pop('column_for_test')


def _no_embed(e):
  raise UserError('no representation in this configuration')


@pytest.mark.parametrize('change, refused', [
    (lambda e: e, False), (lambda e: (e > 0).astype(jnp.int32), False),  # features.extract casts
    (lambda e: e.sum(-1), True), (lambda e: e[:, :, None], True),
    (lambda e: {'h': e}, True), (_no_embed, False)])  # (a capability the task says it lacks)
def test_a_task_embedding_other_shapes_is_refused_when_it_is_built(change, refused):
  """An `embed` whose vectors are not [B, D] was refused by `features.extract` only after
  selection's feature model had trained; now building the task refuses what extract refuses."""
  from datarater import features  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'name': 'mlp_classifier', 'hidden': (4,),
                                      'activation': 'tanh'})
  mlp = tasks.make_task(config, tiny_info())

  @dataclasses.dataclass(frozen=True)
  class Odd(type(mlp)):
    def embed(self, params, batch):
      return change(super().embed(params, batch))

  odd = Odd(**{f.name: getattr(mlp, f.name) for f in dataclasses.fields(mlp)})
  split = pipeline.Split({k: np.asarray(v) for k, v in _batch(5).items() if k != 'index'},
                         np.arange(5), np.zeros(5, np.int8), ('clean',), tiny_info())
  params = odd.init(jax.random.key(0))
  try:  # the oracle: what selection's features make of it (the task's own UserError says it
    features.extract(lambda b: odd.embed(params, b), split)  # has none: it is built, as before)
    extract_refuses = False
  except (UserError, IndexError) as e:
    extract_refuses = 'no representation' not in str(e)
  assert extract_refuses == refused
  tasks.register_task('odd_embed_for_test', {})(lambda config, info: odd)
  try:
    if not refused:
      tasks.make_task(ml_collections.ConfigDict({'name': 'odd_embed_for_test'}), tiny_info())
      return
    with pytest.raises(UserError, match=r'Odd.embed must return one vector per example, shape '
                                        r'\(B, D\): on a batch of 3 it returned shape '):
      tasks.make_task(ml_collections.ConfigDict({'name': 'odd_embed_for_test'}), tiny_info())
  finally:
    tasks.TASKS.pop('odd_embed_for_test')


@pytest.mark.parametrize('register, make, kind', [
    (tasks.register_task, tasks.make_task, 'Task'),
    (tasks.register_rater, tasks.make_rater, 'Rater')])
def test_a_factory_that_makes_no_task_or_rater_is_refused_in_one_line(register, make, kind):
  """A factory that forgot its `return` was an AttributeError traceback ('NoneType' object has
  no attribute 'spec')."""
  register('none_for_test', {})(lambda config, info: None)
  try:
    with pytest.raises(UserError, match=f"factory registered as 'none_for_test' returned a "
                                        f'NoneType, not a datarater.tasks.{kind}'):
      make(ml_collections.ConfigDict({'name': 'none_for_test'}), tiny_info())
  finally:
    (tasks.TASKS if kind == 'Task' else tasks.RATERS).pop('none_for_test')


def test_what_needs_class_labels_names_its_setting_for_a_task_without_them(tmp_path):
  """A classifier without labels/with_labels (the README's example) under the default
  Gauss-Newton curvature of dvemb, or class-conditional SAE selection: one line naming the setting
  and what to set instead, before any fitting; a task with them passes."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from configs.digits import get_config  # pylint: disable=g-import-not-at-top
  from datarater import policies  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  mlp = tasks.make_task(ml_collections.ConfigDict(
      {'name': 'mlp_classifier', 'hidden': (4,), 'activation': 'tanh'}), tiny_info())

  @dataclasses.dataclass(frozen=True)
  class NoLabels(tasks.Task):
    spec: dict
    num_classes: int

    def init(self, key):
      return mlp.init(key)

    def per_example_loss(self, params, batch):
      return mlp.per_example_loss(params, batch)

  bare = NoLabels(mlp.spec, mlp.num_classes)

  class Rows:  # the training split, as much of it as `check` reads
    def __len__(self):
      return 4

    def take(self, indices):
      return jax.tree.map(lambda x: x[np.asarray(indices)], _batch(4))
  train = Rows()
  config = get_config()
  config.valuation.optimizer = 'sgd'
  assert config.valuation.dvemb_curvature == 'gauss_newton'
  factory.check('dvemb', config, mlp, train)
  with pytest.raises(UserError, match=r"^valuation.dvemb_curvature='gauss_newton' needs class "
                     r'labels: task NoLabels defines no labels\(batch\) / with_labels\(batch, '
                     r'labels\); define them, or set '
                     r'--config.valuation.dvemb_curvature=empirical_fisher$'):
    factory.check('dvemb', config, bare, train)
  config.valuation.dvemb_curvature = 'empirical_fisher'
  factory.check('dvemb', config, bare, train)
  assert config.sae_scores.class_conditional
  with pytest.raises(UserError, match=r'^sae_scores.class_conditional=True needs class labels: '
                     r'task NoLabels .* or set --config.sae_scores.class_conditional=false$'):
    policies.make_policy('sae', policies.PolicyContext(None, None, bare, config))


def test_a_raters_module_is_recorded_only_where_another_process_can_import_it(monkeypatch):
  """A rater registered in a script (`__main__`) or a --config file (a module name ml_collections
  makes up) records no module: importing it elsewhere would load the launcher, or fail."""
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  import importlib.util, sys, types  # pylint: disable=g-import-not-at-top,multiple-imports
  loaded = types.ModuleType('config_config')  # as ml_collections loads a --config file
  loaded.__spec__ = importlib.util.spec_from_loader('config_config', loader=None)
  monkeypatch.setitem(sys.modules, 'config_config', loaded)
  for module, recorded in (('datarater.tasks.classifier', 'datarater.tasks.classifier'),
                           ('__main__', None), ('config_config', None)):
    monkeypatch.setitem(registry.RATER_MODULES, 'mine', module)
    assert registry.module_of('mine') == recorded


# ---- a researcher's flax model with batch norm and dropout (the Task contract)


class _Published(nn.Module):
  """As published flax CNNs are written: a norm layer and dropout, switched by `train`."""
  norm: str  # 'batch' | 'layer'
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(4)(x)
    x = (nn.BatchNorm(use_running_average=not train)(x) if self.norm == 'batch' else
         nn.LayerNorm()(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


@dataclasses.dataclass(frozen=True)
class _FlaxTask(tasks.Task):
  """`apply`: 'eval' (frozen statistics, no dropout), 'train' (no key, immutable collections:
  as a tutorial's training step without its rngs / mutable arguments), 'batch_key' (one dropout
  key for the batch) or 'example_key' (the README's: a key per example from `index`)."""
  spec: tasks.FeatureSpec
  num_classes: int
  norm: str
  dropout: float
  apply: str
  params_only: bool = False

  @property
  def module(self):
    return _Published(self.norm, self.dropout)

  def init(self, key):
    variables = self.module.init(key, tasks.example_batch(self.spec, 2)['image'], train=False)
    return {'params': variables['params']} if self.params_only else variables

  def per_example_loss(self, params, batch):
    x, m = batch['image'], self.module
    if self.apply == 'eval':
      logits = m.apply(params, x, train=False)
    elif self.apply == 'train':
      logits = m.apply(params, x, train=True)
    elif self.apply == 'batch_key':
      logits = m.apply(params, x, train=True, rngs={'dropout': jax.random.key(7)})
    else:
      def one(xi, i):
        key = jax.random.fold_in(jax.random.key(7), i)
        return m.apply(params, xi[None], train=True, rngs={'dropout': key})[0]
      logits = jax.vmap(one)(x, batch['index'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])


def _made(task):
  tasks.register_task('flax_for_test', {})(lambda config, info: task)
  try:
    return tasks.make_task(ml_collections.ConfigDict({'name': 'flax_for_test'}), tiny_info())
  finally:
    tasks.TASKS.pop('flax_for_test')


def test_a_flax_init_returning_batch_stats_is_refused_when_built():
  """nn.BatchNorm with use_running_average=True ('frozen' statistics) is per example, but what
  init returns is all trained: one inner step moves the statistics (they were trained as
  parameters, e.g. by valuation SGD and the inner Adam). Refused at build time, naming them."""
  from inner_loop.unroll import inner_step, init_inner_state  # pylint: disable=g-import-not-at-top
  frozen = _FlaxTask(tiny_info().spec, 3, 'batch', 0.0, 'eval')
  params, batch, sgd = jax.jit(frozen.init)(jax.random.key(0)), _batch(6), optax.sgd(0.1)
  stepped, _ = jax.jit(lambda params, batch: inner_step(  # one program, not op by op
      frozen.per_example_loss, sgd, init_inner_state(params, sgd), batch, jnp.ones(6)))(
          params, batch)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params['batch_stats'],
                       stepped.params['batch_stats'])
  assert max(jax.tree.leaves(moved)) > 1e-3  # what the refusal prevents
  with pytest.raises(UserError, match=r"_FlaxTask.init returned flax collections "
                                      r"\['batch_stats'\] beside 'params'.*nn.GroupNorm"):
    _made(frozen)
  with pytest.raises(UserError, match=r"init returned flax collections \['batch_stats'\]"):
    _made(_FlaxTask(tiny_info().spec, 3, 'batch', 0.0, 'train'))  # batch statistics too


@pytest.mark.parametrize('norm, dropout, params_only, says', [
    ('layer', 0.5, False, 'InvalidRngError: Dropout_0 needs PRNG for "dropout"'),
    ('batch', 0.0, True, 'ScopeCollectionNotFound: Tried to access "mean" from collection '
                         '"batch_stats"')])
def test_a_loss_asking_flax_for_a_key_or_a_collection_is_one_line(norm, dropout, params_only,
                                                                   says):
  """A training-mode apply without rngs (dropout), or batch norm once init returns params alone:
  flax's error while the shapes are traced was a traceback; one line says what to use."""
  with pytest.raises(UserError) as raised:
    _made(_FlaxTask(tiny_info().spec, 3, norm, dropout, 'train', params_only))
  line = str(raised.value)
  assert '\n' not in line and says in line and "a key per example from batch['index']" in line
  assert line.startswith('_FlaxTask.per_example_loss asks flax for what the interface does not')


def test_dropout_keyed_per_example_reads_each_example_alone_and_one_key_does_not():
  """The README's dropout (a key per example from `index`): an example's loss is the same alone,
  in a batch and at another place in it (a permuted batch), so it builds and passes the
  per-example check; one key for the whole batch draws masks by place and is refused."""
  keyed = _made(_FlaxTask(tiny_info().spec, 3, 'layer', 0.5, 'example_key'))
  # Each call one compiled program, the batches sliced in numpy (op by op, flax's apply and
  # each slice compiled one primitive at a time: most of this test's time).
  params, batch = jax.jit(keyed.init)(jax.random.key(0)), jax.tree.map(np.asarray, _batch(6))
  loss = jax.jit(keyed.per_example_loss)
  together = np.asarray(loss(params, batch))
  perm = np.array([3, 5, 0, 1, 4, 2])
  permuted = np.asarray(loss(params, jax.tree.map(lambda x: x[perm], batch)))
  alone = [float(loss(params, jax.tree.map(lambda x: x[i:i + 1], batch))[0]) for i in range(6)]
  np.testing.assert_allclose(permuted, together[perm], rtol=1e-12)
  np.testing.assert_allclose(alone, together, rtol=1e-12)
  no_dropout = _FlaxTask(tiny_info().spec, 3, 'layer', 0.0, 'example_key')
  assert not np.allclose(together, jax.jit(no_dropout.per_example_loss)(params, batch))  # masks
  tasks.check_per_example(keyed, params, batch)
  one_key = _made(_FlaxTask(tiny_info().spec, 3, 'layer', 0.5, 'batch_key'))
  with pytest.raises(UserError, match="task _FlaxTask: an example's loss depends on the rest of "
                                      'its batch or its place in it'):
    tasks.check_per_example(one_key, params, batch)


def test_a_rater_score_that_reads_the_rest_of_the_batch_is_refused():
  """As for a task's loss: a rater's score must read its example alone (it scores splits in
  blocks of any size); the shipped MLP rater's does, one centred on the batch mean does not."""
  config = ml_collections.ConfigDict({'name': 'mlp_rater', 'hidden': (4,), 'activation': 'tanh'})
  rater = tasks.make_rater(config, tiny_info())
  params, batch = rater.init(jax.random.key(0)), _batch(4)
  tasks.check_per_example(rater, params, batch)

  @dataclasses.dataclass(frozen=True)
  class Centred(type(rater)):
    def score(self, params, batch):
      return super().score(params, {**batch, 'image': batch['image'] - batch['image'].mean(0)})

  centred = Centred(**{f.name: getattr(rater, f.name) for f in dataclasses.fields(rater)})
  with pytest.raises(UserError, match="rater Centred: an example's score depends on the rest of "
                                      'its batch'):
    tasks.check_per_example(centred, params, batch)


def test_a_batch_reading_loss_hidden_at_init_by_a_zero_last_layer_is_refused():
  """Hidden units normalised over the batch (batch norm in training mode, by hand) before a
  zero-initialised last layer: at init every logit is 0 alone and in a batch, so the loss values
  agree, but the gradient of the last layer is the normalised units, which read the batch-mates
  (alone an example's are all 0). The float64 gradient of one row of the batch loss differs from
  the same example's gradient alone; the check compares derivatives too and refuses it."""

  class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(4)(x.reshape(x.shape[0], -1)))
      h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
      return nn.Dense(3, kernel_init=nn.initializers.zeros)(h)

  @dataclasses.dataclass(frozen=True)
  class ZeroHead(tasks.Task):
    spec: tasks.FeatureSpec

    def init(self, key):
      return Head().init(key, tasks.example_batch(self.spec)['image'])

    def per_example_loss(self, params, batch):
      return optax.softmax_cross_entropy_with_integer_labels(Head().apply(params, batch['image']),
                                                             batch['label'])

  task, batch = ZeroHead(tiny_info().spec), _batch(4)
  params = jax.jit(task.init)(jax.random.key(0))  # (jitted: op by op was most of the time)
  with jax.enable_x64():
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    b64 = {**jax.tree.map(np.asarray, batch), 'image': np.asarray(batch['image'], np.float64)}
    first = jax.tree.map(lambda x: x[:1], b64)
    loss = jax.jit(task.per_example_loss)
    grad_first = jax.jit(jax.grad(lambda p, b: task.per_example_loss(p, b)[0]))
    in_batch, alone = grad_first(p64, b64), grad_first(p64, first)
    np.testing.assert_allclose(loss(p64, b64)[:1], loss(p64, first))
    assert max(float(jnp.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(in_batch), jax.tree.leaves(alone))) > 1e-2  # what is prevented
  with pytest.raises(UserError, match="task ZeroHead: an example's loss depends on the rest"):
    tasks.check_per_example(task, params, batch)


@dataclasses.dataclass(frozen=True)
class _WordModel(tasks.Task):
  """A researcher's own model over word ids (nn.Embed, as flax tutorials write it), reading its
  token feature and a per-token mask by the names it was given (`init_key` in init)."""
  spec: tasks.FeatureSpec
  mask_key: str = 'mask'
  init_key: str = 'tokens'
  vocab: int = 10

  def _module(self):
    return nn.Sequential([nn.Embed(self.vocab, 4), nn.Dense(1)])

  def init(self, key):
    return self._module().init(key, tasks.example_batch(self.spec)[self.init_key])

  def per_example_loss(self, params, batch):
    per_token = self._module().apply(params, batch['tokens'])[..., 0] ** 2
    w = batch[self.mask_key]
    return (w * per_token).sum(-1) / jnp.maximum(w.sum(-1), 1e-6)


def _word_info():
  from datarater.data.pipeline import DataInfo  # pylint: disable=g-import-not-at-top
  spec = {'tokens': jax.ShapeDtypeStruct((6,), jnp.int32),
          'mask': jax.ShapeDtypeStruct((6,), jnp.float32)}
  return DataInfo('words', spec, {}, None)


def test_a_model_reading_a_feature_the_data_lacks_is_one_line():
  """An own task whose loss or init looks up a feature the dataset does not have (a mask named
  'maks' in its config) was a KeyError traceback from the shape check: one line naming it and
  the data's features. A KeyError of the model's own (a parameter it misnames) stays one."""
  info = _word_info()
  tasks.register_task('word_for_test', {})(
      lambda config, info: _WordModel(info.spec, config.mask, config.init))
  make = lambda mask='mask', init='tokens': tasks.make_task(
      ml_collections.ConfigDict({'name': 'word_for_test', 'mask': mask, 'init': init}), info)
  try:
    assert make().mask_key == 'mask'
    for mask, init, method, key in (('maks', 'tokens', 'per_example_loss', 'maks'),
                                    ('mask', 'text', 'init', 'text')):
      with pytest.raises(UserError) as raised:
        make(mask, init)
      line = str(raised.value)
      assert '\n' not in line and line.startswith(
          f"_WordModel.{method} reads feature '{key}', which dataset 'words' does not have "
          '(features, decoded: mask, tokens; and index)'), line
  finally:
    tasks.TASKS.pop('word_for_test')

  @dataclasses.dataclass(frozen=True)
  class MisnamedParameter(_WordModel):
    def per_example_loss(self, params, batch):
      return params['params']['head']['kernel'].sum() + batch['mask'].sum(-1)

  with pytest.raises(KeyError, match='head'):
    tasks.base.check_outputs(MisnamedParameter(info.spec), info)


def test_a_nan_loss_from_tokens_outside_the_embedding_is_not_called_batch_mixing():
  """Without a check_data, tokens past an own model's nn.Embed read NaN: the per-example probe
  (NaN != NaN) blamed batch norm or dropout keys; it now says the loss is NaN and why it may be."""
  task = _WordModel(_word_info().spec)
  params = jax.jit(task.init)(jax.random.key(0))
  batch = {'tokens': jnp.asarray(np.arange(24).reshape(4, 6) % 10, jnp.int32),
           'mask': jnp.ones((4, 6)), 'index': jnp.arange(4)}
  tasks.check_per_example(task, params, batch)
  batch['tokens'] = batch['tokens'].at[2, 3].set(12)  # outside the vocabulary of 10
  with pytest.raises(UserError) as raised:
    tasks.check_per_example(task, params, batch)
  line = str(raised.value)
  assert '\n' not in line and 'depends on the rest' not in line, line
  assert line.startswith('task _WordModel: its per_example_loss or its derivative is NaN on 1 '
                         "of 4 examples at its initial parameters: data it cannot read, such as "
                         "tokens outside an embedding's vocabulary"), line


@pytest.mark.parametrize('dtype,param_dtype', [('bfloat16', ''), ('float16', 'float16')])
def test_the_shipped_models_precision_fields_set_what_they_compute_in_and_store(dtype,
                                                                               param_dtype):
  """`dtype` / `param_dtype` config fields (float32 when left out) of the MLP task and rater and
  the CNN: parameters stored in `param_dtype`, outputs in `dtype`, equal to the float64 forward
  pass of the same parameters up to `dtype`'s rounding."""
  with jax.enable_x64(False):
    fields = {'dtype': dtype, **({'param_dtype': param_dtype} if param_dtype else {})}
    stored = jnp.dtype(param_dtype or 'float32')
    batch = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x,
                         _batch())
    for make, name in ((tasks.make_task, 'mlp_classifier'), (tasks.make_rater, 'mlp_rater')):
      model = make(ml_collections.ConfigDict(
          {'name': name, 'hidden': (4, 6), 'activation': 'tanh', **fields}), tiny_info())
      params = jax.jit(model.init)(jax.random.key(0))
      assert {x.dtype for x in jax.tree.leaves(params)} == {stored}, name
      out = jax.jit(model.module.apply)(params, batch['image'])
      assert out.dtype == jnp.dtype(dtype), name
      np.testing.assert_allclose(np.asarray(out, np.float64),
                                 _mlp_forward(params, batch['image']), rtol=0.05, atol=0.05)
    from datarater.tasks import cnn  # pylint: disable=g-import-not-at-top
    net = cnn.CNN((4,), (2,), 3, **tasks.classifier.dtypes(ml_collections.ConfigDict(fields)))
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 6, 6, 1)), jnp.float32)
    params = jax.jit(net.init)(jax.random.key(0), images)
    assert {x.dtype for x in jax.tree.leaves(params)} == {stored}
    assert jax.jit(net.apply)(params, images).dtype == jnp.dtype(dtype)
    default = cnn.CNN((4,), (2,), 3, **tasks.classifier.dtypes(ml_collections.ConfigDict()))
    assert (default.dtype, default.param_dtype) == (None, jnp.float32)


def test_a_model_name_switched_alone_names_the_models_fields_and_the_config_file_fix():
  """--config.rater.name set to a rater reading other fields than the section holds (both ways)
  names what that rater reads and that a config file sets the section; a plain misspelt field
  keeps the one-line refusal of any unknown field."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from datarater import config_checks  # pylint: disable=g-import-not-at-top
  tasks.register_rater('bias_for_test', {})(lambda config, info: None)
  try:
    mlp = digits.get_config().rater  # mlp_rater's fields
    mlp.name = 'bias_for_test'
    bias = ml_collections.ConfigDict({'name': 'bias_for_test', 'temperature': 1.0})
    fixed = 'a config file sets its rater section to those'
    with pytest.raises(UserError, match=r"field rater\.\w+: rater 'bias_for_test' reads name, "
                                        rf'temperature; {fixed}'):
      config_checks.check_model('rater', mlp)
    bias.name = 'mlp_rater'
    with pytest.raises(UserError, match=r"no field rater\.\w+: rater 'mlp_rater' reads "
                                        rf'activation, .*hidden.*; {fixed}'):
      config_checks.check_model('rater', bias)
    bias.name, bias.hiden = 'bias_for_test', 3
    with pytest.raises(UserError, match=r'^unknown config field rater\.hiden \(the fields of '
                                        r'rater: name, temperature\)$'):
      config_checks.check_model('rater', bias)
  finally:
    tasks.RATERS.pop('bias_for_test')
    tasks.registry.SCHEMAS.pop(('rater', 'bias_for_test'))
    tasks.registry.RATER_MODULES.pop('bias_for_test')
