"""The CNN task and rater: convolutions equal flax's nn.Conv, examples stay independent (group
norm), every parameter is reachable by ghost products, meta-gradients match finite differences,
and every launcher runs end to end with configs/digits_cnn.py."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from configs import digits_cnn
from datarater import evaluation, export, pergrad, tasks
from datarater.curation.filter import filter_dataset
from datarater.data.corruption import Corruption
from datarater.data import pipeline
from datarater.data.pipeline import DataInfo
from datarater.errors import UserError
from datarater.meta_train import meta_train
from datarater.tasks.cnn import PatchConv, patches_3x3
from datarater.train import train
from datarater.valuation.run import valuate
from outer_loop import meta_step
from tests.conftest import digits_data
from tests.tiny import assert_meta_gradient_matches_finite_differences, estimator, tiny_problem


def _info(shape=(6, 6, 2)):
  return DataInfo('images', {'image': jax.ShapeDtypeStruct(shape, np.float32),
                             'label': jax.ShapeDtypeStruct((), np.int32)}, {'label': 3},
                  ('image', 'label'))


def _batch(n=5, shape=(6, 6, 2), seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(n, *shape))),
          'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32)}


@pytest.mark.parametrize('stride', [1, 2, 3])
@pytest.mark.parametrize('height,width', [(6, 6), (7, 5), (28, 28), (1, 4)])
def test_patches_equal_lax_conv_patches(stride, height, width):
  x = jax.random.normal(jax.random.key(0), (2, height, width, 3))
  # Each side as one program (op by op, the patches' slices compile one by one per shape).
  want = jax.jit(lambda v: jax.lax.conv_general_dilated_patches(
      v, (3, 3), (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x)
  np.testing.assert_array_equal(jax.jit(lambda v: patches_3x3(v, stride))(x), want)


@pytest.mark.parametrize('stride,size', [(1, 6), (2, 6), (2, 7)])
def test_patch_convolution_equals_flax_conv(stride, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  conv = PatchConv(5, stride)
  # Each side as one program (op by op, the patches' slices compile one by one per shape).
  params = jax.jit(conv.init)(jax.random.key(1), x)
  dense = params['params']['kernel']
  # Patches are ordered (input channel, row, column); nn.Conv's kernel is (row, column, in, out).
  kernel = np.transpose(np.reshape(dense['kernel'], (3, 3, 3, 5)), (1, 2, 0, 3))
  want = jax.jit(nn.Conv(5, (3, 3), strides=stride, padding='SAME').apply)(
      {'params': {'kernel': kernel, 'bias': dense['bias']}}, x)
  np.testing.assert_allclose(jax.jit(conv.apply)(params, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('pool', ['flatten', pytest.param('mean', marks=pytest.mark.slow)])
def test_examples_are_independent_and_ghost_products_cover_the_cnn(pool):
  with jax.enable_x64():
    config = digits_cnn.cnn(channels=(4, 6), strides=(1, 2), pool=pool, hidden=5)
    task = tasks.make_task(config, _info())
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64)),
                          task.init(jax.random.key(0)))
    batch = _batch()
    rows = jax.tree.map(np.asarray, batch)  # sliced in numpy, not a compile per slice
    loss_fn = jax.jit(task.per_example_loss)
    losses, embedded = jax.jit(lambda p, b: (task.per_example_loss(p, b), task.embed(p, b)))(
        params, batch)  # one program for both
    alone = [loss_fn(params, jax.tree.map(lambda x: x[i:i + 1], rows))[0] for i in range(5)]
    np.testing.assert_allclose(losses, alone, rtol=1e-12)  # nothing mixes the examples
    assert embedded.shape == (5, 5)
    loss = task.per_example_loss
    grad = jax.jit(jax.grad(lambda p, one: loss(p, one)[0]))
    flat = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        grad(params, jax.tree.map(lambda x: x[i:i + 1], rows)))]) for i in range(5)])
    assert pergrad.ghost_covers(loss, params, batch)
    dots, got = jax.jit(lambda p, b: (
        pergrad.ghost_dots(loss, p, b),
        pergrad.per_example(loss, p, b, pergrad.flatten(), chunk_size=2)))(params, batch)
    np.testing.assert_allclose(dots, flat @ flat.T, rtol=1e-9)
    np.testing.assert_allclose(got, flat, rtol=1e-10, atol=1e-12)


STRIDES = (1, 2)  # the reference CNN's layers' strides


def _reference_cnn(params, images, groups, pool, embed=False):
  """The CNN in float64 numpy from its definition: each layer a 3x3 'SAME' convolution (output
  [y, x] reads input rows y*s + r - top, columns x*s + q - left, zero outside; the Dense kernel's
  row c*9 + r*3 + q holds tap (c, r, q)), group norm over (rows, columns, the channels of each of
  gcd(groups, width) contiguous groups) with no scale or offset (epsilon 1e-6), ReLU; then flatten
  or the mean over positions, the hidden Dense layer and ReLU, and the head."""
  p = jax.tree.map(np.asarray, params['params'])
  x = np.asarray(images, np.float64)
  convs = sorted((k for k in p if k.startswith('conv_')), key=lambda k: int(k[5:]))
  for name, stride in zip(convs, STRIDES):
    kernel, bias = p[name]['kernel']['kernel'], p[name]['kernel']['bias']
    b, h, w, c = x.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    top = max((out_h - 1) * stride + 3 - h, 0) // 2
    left = max((out_w - 1) * stride + 3 - w, 0) // 2
    y = np.tile(bias, (b, out_h, out_w, 1))
    for oy in range(out_h):
      for ox in range(out_w):
        for r in range(3):
          for q in range(3):
            iy, ix = oy * stride + r - top, ox * stride + q - left
            if 0 <= iy < h and 0 <= ix < w:
              for ch in range(c):
                y[:, oy, ox] += np.outer(x[:, iy, ix, ch], kernel[ch * 9 + r * 3 + q])
    width = y.shape[-1]
    g = math.gcd(groups, width)
    for j in range(g):
      part = y[..., j * width // g:(j + 1) * width // g]
      mean = part.mean(axis=(1, 2, 3), keepdims=True)
      var = ((part - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
      y[..., j * width // g:(j + 1) * width // g] = (part - mean) / np.sqrt(var + 1e-6)
    x = np.maximum(y, 0.0)
  x = x.reshape(len(x), -1) if pool == 'flatten' else x.mean(axis=(1, 2))
  x = np.maximum(x @ p['dense']['kernel'] + p['dense']['bias'], 0.0)
  return x if embed else x @ p['head']['kernel'] + p['head']['bias']


@pytest.mark.parametrize('pool', ['flatten', 'mean'])
@pytest.mark.parametrize('groups', [1, 2, 4])
def test_cnn_loss_and_embedding_equal_a_float64_reference_with_gcd_groups(groups, pool):
  """The CNN classifier's per-example loss (softmax cross-entropy) and embedding equal the float64
  numpy reference `_reference_cnn` on the module's own parameters, with `groups` normalising
  gcd(groups, width) channel groups (layers of 4 and 6 channels: 4 groups normalise 2 of the 6),
  for both pools."""
  with jax.enable_x64():
    task = tasks.make_task(digits_cnn.cnn(channels=(4, 6), strides=STRIDES, pool=pool, hidden=5,
                                          groups=groups), _info())
    params = jax.tree.map(lambda x: x.astype(jnp.float64), task.init(jax.random.key(groups)))
    batch = _batch(seed=groups)
    logits = _reference_cnn(params, batch['image'], groups, pool)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    want = -log_p[np.arange(len(logits)), np.asarray(batch['label'])]
    np.testing.assert_allclose(jax.jit(task.per_example_loss)(params, batch), want, rtol=1e-10)
    np.testing.assert_allclose(jax.jit(task.embed)(params, batch),
                               _reference_cnn(params, batch['image'], groups, pool, embed=True),
                               rtol=1e-10, atol=1e-12)


def test_cnn_meta_gradient_matches_finite_differences():
  """The bi-level problem with a CNN task and a CNN rater, float64, T = 2 SGD steps."""
  with jax.enable_x64():
    info = _info((5, 5, 1))
    base = tiny_problem(optimizer='sgd', lr=0.3)
    problem = meta_step.MetaProblem(
        task=tasks.make_task(digits_cnn.cnn(channels=(3,), strides=(2,), activation='tanh'),
                             info),
        rater=tasks.make_rater(digits_cnn.cnn(name='cnn_rater', channels=(2,), strides=(2,),
                                              activation='tanh'), info),
        inner_optimizer=base.inner_optimizer, outer_optimizer=base.outer_optimizer,
        temperature=0.7, reset_every=3)
    est = estimator('reverse', 'sgd', 0.3)
    rng = np.random.default_rng(0)
    inner = {'image': jnp.asarray(rng.normal(size=(2, 2, 6, 5, 5, 1))),
             'label': jnp.asarray(rng.integers(0, 3, (2, 2, 6)), jnp.int32)}
    outer = {'image': jnp.asarray(rng.normal(size=(2, 6, 5, 5, 1))),
             'label': jnp.asarray(rng.integers(0, 3, (2, 6)), jnp.int32)}
    assert_meta_gradient_matches_finite_differences(problem, est, inner, outer)


@pytest.mark.slow  # ~70 s; the CNN's own pieces are checked above, each launcher in CI with the MLP
def test_every_launcher_runs_with_the_cnn_on_digits(tfds_dir, tmp_path):
  c = digits_cnn.get_config()
  c.data = digits_data(tfds_dir, 0.2)
  c.outer.steps, c.inner.population, c.inner.batch_size, c.outer.batch_size = 4, 2, 16, 16
  c.log_every = c.checkpoint_every = 2
  c.final_eval.num_models = 0
  v = c.valuation
  v.train_steps, v.checkpoint_every, v.reference_steps, v.dvemb_steps = 10, 5, 10, 4
  v.dvemb_curvature = 'empirical_fisher'  # (Gauss-Newton: test_valuation)
  c.train.epochs, c.train.seeds = 1, (0,)
  c.features.extractor, c.sae.steps, c.sae.num_factors = 'pixels', 50, 32
  report = meta_train(c, str(tmp_path / 'run'))
  assert 0.0 <= report['noise_auroc'] <= 1.0
  export.export_rater(str(tmp_path / 'run'), str(tmp_path / 'rater'))
  v.rater = str(tmp_path / 'rater')
  for method in ('tracin', 'mimic', 'dvemb', 'datarater'):
    summary = valuate(method, c, str(tmp_path / 'val'), progress=False)
    assert summary['num_examples'] == 1197, method
  filtered = filter_dataset('sklearn_digits', str(tmp_path / 'kept'), rater=str(tmp_path / 'rater'),
                            keep=0.8, data_dir=tfds_dir, corruption=Corruption(0.2, 0))
  assert filtered['splits']['train']['kept'] == 958
  for policy in ('uniform', 'datarater_batch_filter', 'sae'):
    rater = str(tmp_path / 'rater') if policy.startswith('datarater') else ''
    out = train(c, policy, rater=rater, log=lambda line: None)
    assert 0.0 <= out['final']['eval']['accuracy']['mean'] <= 1.0, policy
  c.data.dataset_dir, c.data.label_noise = str(tmp_path / 'kept'), 0.0
  assert train(c, 'uniform', log=lambda line: None)['num_train'] == 958



@pytest.mark.slow  # a CNN rater run (~20 s of compiling)
def test_an_exported_cnn_rater_scores_the_bits_its_run_scored(tfds_dir, tmp_path, monkeypatch):
  """The scores a CNN rater run reports from (caught as its final report reads them) are the
  exported rater's, in a fresh load on 4 devices or 1, and the filter's scores file's, bit for
  bit (the run scored in blocks of 1024, the exported rater in 256 per device: XLA's CPU
  convolutions rounded some scores differently in the last bit)."""
  c = digits_cnn.get_config()
  c.data = digits_data(tfds_dir, 0.2)
  c.task.channels = c.rater.channels = (4, 4)
  c.outer.steps, c.inner.population, c.inner.batch_size, c.outer.batch_size = 1, 1, 16, 16
  c.log_every = c.checkpoint_every = 1
  c.final_eval.num_models = 0
  seen = []
  real = evaluation.noise_auroc
  monkeypatch.setattr(evaluation, 'noise_auroc', lambda s, bad: seen.append(s) or real(s, bad))
  report = meta_train(c, str(tmp_path / 'run'))
  run_scores = seen[-1]
  split = pipeline.load_split(c.data, 'train', corrupt=True)
  assert report['noise_auroc'] == real(run_scores, split.is_corrupted)
  export.export_rater(str(tmp_path / 'run'), str(tmp_path / 'rater'))
  batch = {k: split.features[k] for k in ('image', 'label')}
  for devices in (jax.devices(), jax.devices()[:1]):
    loaded = export.load_rater(str(tmp_path / 'rater'), devices=devices)
    np.testing.assert_array_equal(loaded(batch), run_scores)
  filter_dataset('sklearn_digits', str(tmp_path / 'kept'), rater=str(tmp_path / 'rater'),
                 keep=0.8, data_dir=tfds_dir, corruption=Corruption(0.2, 0))
  written = pq.read_table(tmp_path / 'kept' / 'scores_train.parquet').column('score').to_numpy()
  np.testing.assert_array_equal(written, run_scores.astype(np.float64))


@pytest.mark.parametrize('shape', [(20,), (2, 8, 8, 3)])
def test_a_cnn_on_a_feature_that_is_not_an_image_is_one_line(shape):
  """A CNN task or rater on a vector (or a video) failed with a traceback inside the model."""
  says = r"a CNN reads images \[H, W\] or \[H, W, C\]: feature 'image'"
  with pytest.raises(UserError, match=says):
    tasks.make_task(digits_cnn.cnn(), _info(shape))
  with pytest.raises(UserError, match=says):
    tasks.make_rater(digits_cnn.cnn(name='cnn_rater', temperature=1.0, readout='logit'),
                     _info(shape))
