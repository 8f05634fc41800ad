"""The sparse autoencoder keeps its configured sparsity and reconstructs far better than the mean;
the default feature extractor is the trained model's penultimate layer."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from datarater import features, sae
from datarater.data import pipeline
from datarater.errors import UserError
from tests.conftest import digits_data


def sparse_data(n=600, dim=16, atoms=32, active=3, seed=0):
  """Vectors made of `active` random atoms of a fixed dictionary, non-negative coefficients."""
  rng = np.random.default_rng(seed)
  dictionary = rng.normal(size=(atoms, dim))
  coef = np.zeros((n, atoms))
  for i in range(n):
    coef[i, rng.choice(atoms, active, replace=False)] = rng.uniform(0.5, 2.0, active)
  return (coef @ dictionary).astype(np.float32)


def sae_config(**kw):
  c = ml_collections.ConfigDict(dict(sparsity='top_k', num_factors=48, k=4, l1_coef=0.1,
                                     steps=400, batch_size=128, learning_rate=3e-3))
  c.update(kw)
  return c


def test_top_k_has_k_active_and_reconstructs():
  x = sparse_data()
  trained, metrics = sae.train_sae(x, sae_config(), jax.random.PRNGKey(0))
  codes = sae.encode_all(trained, x)
  active = (codes > 0).sum(-1)
  assert active.max() <= 4
  assert np.mean(active == 4) > 0.95, np.bincount(active)
  # The trivial baseline (reconstruct every vector as the mean) has normalised MSE 1.
  assert metrics['mse_mean_baseline'] == pytest.approx(1.0, rel=1e-4)
  assert metrics['mse'] < 0.15 * metrics['mse_mean_baseline'], metrics
  recon = np.asarray(trained.reconstruct(jnp.asarray(x)))
  target = np.asarray(trained.normaliser(jnp.asarray(x)))
  assert np.mean(np.sum((recon - target) ** 2, -1)) == pytest.approx(metrics['mse'], rel=1e-3)


def test_l1_is_sparse_and_the_coefficient_controls_it():
  x = sparse_data()
  _, weak = sae.train_sae(x, sae_config(sparsity='l1', l1_coef=0.01), jax.random.PRNGKey(0))
  _, strong = sae.train_sae(x, sae_config(sparsity='l1', l1_coef=0.1), jax.random.PRNGKey(0))
  assert strong['active_mean'] < weak['active_mean']
  assert strong['active_mean'] < 48 / 3, strong
  assert strong['mse'] < 0.3, strong


@pytest.mark.parametrize('sparsity', ['top_k', 'l1'])
def test_decoder_rows_are_unit_normed_so_their_scale_does_not_matter(sparsity):
  """The SAE equals a float64 numpy forward pass with W_dec's rows explicitly divided by their
  norms (x_hat = sparsify(W_enc (x - b_pre) + b_enc) W_dec_unit + b_pre), with a nonzero b_pre and
  decoder rows of very different norms; and multiplying each decoder row by its own positive
  factor changes neither the reconstruction nor the codes."""
  rng = np.random.default_rng(0)
  factors, dim, k = 7, 5, 3
  module = sae.make_sae(sae_config(sparsity=sparsity, num_factors=factors, k=k))
  x = rng.normal(size=(6, dim))
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                          jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(x)))
    apply = jax.jit(module.apply)  # one program (op by op, each operation compiled alone)
    p = params['params']
    p['b_pre'] = rng.normal(size=dim)
    p['w_dec'] = p['w_dec'] * rng.uniform(0.2, 5.0, (factors, 1))
    pre = (x - p['b_pre']) @ p['encoder']['kernel'] + p['encoder']['bias']
    codes = np.maximum(pre, 0.0)
    if sparsity == 'top_k':
      kept = np.zeros_like(codes, bool)  # each example's k largest pre-activations
      np.put_along_axis(kept, np.argsort(-pre, axis=1)[:, :k], True, axis=1)
      codes = np.where(kept, codes, 0.0)
    unit = p['w_dec'] / np.linalg.norm(p['w_dec'], axis=1, keepdims=True)
    want = codes @ unit + p['b_pre']
    recon, got_codes = apply(params, jnp.asarray(x))
    np.testing.assert_allclose(got_codes, codes, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(recon, want, rtol=1e-6, atol=1e-8)  # the norm's 1e-8 guard
    rescaled = jax.tree.map(lambda a: a, params)  # a new tree, the same leaves
    rescaled['params']['w_dec'] = p['w_dec'] * rng.uniform(0.1, 10.0, (factors, 1))
    recon2, codes2 = apply(rescaled, jnp.asarray(x))
    np.testing.assert_allclose(recon2, recon, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(codes2, got_codes)


def test_top_k_keeps_exactly_k_on_ties_lowest_index_first_and_its_gradient_only():
  """Pre-activations tied at the k-th value (duplicated encoder columns with equal biases; a zero
  input, whose pre-activations are the biases) keep exactly k factors: the lowest-indexed of the
  tied, as a stable float64 numpy sort orders them. The gradient of sum(g * codes) flows through
  the kept positive entries alone: (x - b_pre)^T (g * kept * (pre > 0)), in float64. Integer
  inputs and weights, dyadic biases: every tie is exact whatever the summation order."""
  rng = np.random.default_rng(0)
  factors, dim, k = 8, 4, 3
  module = sae.make_sae(sae_config(num_factors=factors, k=k))
  x = rng.integers(-2, 3, size=(16, dim)).astype(np.float64)
  x[0] = 0.0
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                          jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(x)))
    p = params['params']
    kernel = rng.integers(-2, 3, size=(dim, factors)).astype(np.float64)
    kernel[:, 1] = kernel[:, 2] = kernel[:, 0]
    kernel[:, 5] = kernel[:, 4]
    p['encoder']['kernel'] = kernel
    p['encoder']['bias'] = np.array([1.0, 1.0, 1.0, 2.0, 0.5, 0.5, 0.25, 1.5])
    pre = x @ kernel + p['encoder']['bias']  # b_pre is 0
    kept = np.zeros_like(pre, bool)
    np.put_along_axis(kept, np.argsort(-pre, axis=1, kind='stable')[:, :k], True, axis=1)
    kth = np.sort(pre, axis=1)[:, -k:-k + 1]
    straddles = ((pre >= kth) & (pre > 0)).sum(1) > k  # a ">= k-th value" mask keeps more
    assert straddles[0] and straddles.sum() >= 3, straddles
    codes = np.where(kept, np.maximum(pre, 0.0), 0.0)
    _, got = jax.jit(module.apply)(params, jnp.asarray(x))  # one program, not op by op
    np.testing.assert_array_equal(got, codes)
    assert (np.asarray(got) > 0).sum(1).max() == k
    g = rng.normal(size=codes.shape)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(g * module.apply(q, jnp.asarray(x))[1])))(params)
    upstream = g * kept * (pre > 0)
    np.testing.assert_allclose(grads['params']['encoder']['kernel'], x.T @ upstream, rtol=1e-12)
    np.testing.assert_allclose(grads['params']['encoder']['bias'], upstream.sum(0), rtol=1e-12)
    np.testing.assert_allclose(grads['params']['b_pre'], -(upstream @ kernel.T).sum(0),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('bad', [dict(sparsity='dense'), dict(k=0), dict(k=49), dict(num_factors=0)])
def test_bad_sae_config_is_a_user_error(bad):
  with pytest.raises(UserError, match='sae'):
    sae.make_sae(sae_config(**bad))


def test_bad_features_shape_is_a_user_error():
  with pytest.raises(UserError, match='shape'):
    sae.train_sae(np.zeros((5,)), sae_config(), jax.random.PRNGKey(0))


def test_features_that_cannot_be_encoded_are_refused_not_coded_zero():
  """Constant features (an extractor whose units all died) or a NaN gave all-zero codes, and the
  SAE policy then selected by its noise alone."""
  x = np.random.default_rng(0).normal(size=(40, 6))
  with pytest.raises(UserError, match='SAE features of all 40 examples are the same vector'):
    sae.train_sae(np.zeros((40, 6)), sae_config(), jax.random.PRNGKey(0))
  with pytest.raises(UserError, match='are the same vector'):
    sae.train_sae(np.tile(x[:1] * 1e3, (40, 1)), sae_config(), jax.random.PRNGKey(0))
  pixels = np.random.default_rng(1).integers(0, 256, 784) / 255  # where rounding of the mean
  with pytest.raises(UserError, match='SAE features of all 5000 examples are the same vector'):
    sae.train_sae(np.tile(pixels, (5000, 1)), sae_config(), jax.random.PRNGKey(0))  # passed
  tiny = sae.train_sae(x * 1e-7, sae_config(), jax.random.PRNGKey(0))[1]  # a scale, not equal
  assert tiny['active_mean'] > 0 and tiny['mse'] < tiny['mse_mean_baseline']
  with pytest.raises(UserError, match=r'SAE features hold 1 non-finite values \(NaN or inf\)'):
    sae.train_sae(np.where(np.arange(240).reshape(40, 6) == 7, np.nan, x), sae_config(),
                  jax.random.PRNGKey(0))


@pytest.mark.parametrize('size', [1e-30, 1e-7, 1.0, 1e30])
def test_features_of_any_float32_size_are_normalised_to_unit_mean_squared_norm(size):
  """The normalised features equal the float64 definition (centred, divided by the root mean
  squared norm) at any size; squared as they were, features of 1e30 overflowed (the scale inf,
  every row 0) and those of 1e-30 underflowed (rows of norm ~1e-22, kept there by an absolute
  epsilon on the scale)."""
  x = (sparse_data(n=50).astype(np.float64) * size).astype(np.float32)
  centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
  want = centred / np.sqrt(np.mean(np.sum(centred ** 2, -1)))
  normaliser = sae._feature_stats(jnp.asarray(x))[1]
  got = np.asarray(sae._normalise(normaliser, jnp.asarray(x))[0], np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pixels_reads_every_float_feature_bfloat16_too():
  """`input_features` is every float feature flattened, in name order (bfloat16 ones were left
  out: numpy does not count ml_dtypes' bfloat16 as floating)."""
  rng = np.random.default_rng(0)
  batch = {'b': rng.normal(size=(3, 2, 2)).astype(jnp.bfloat16),
           'a': rng.normal(size=(3, 3)).astype(np.float32),
           'c': rng.normal(size=(3, 2)).astype(np.float16),
           'label': np.arange(3, dtype=np.int32), 'index': np.arange(3, dtype=np.int32)}
  want = np.concatenate([batch[k].astype(np.float64).reshape(3, -1) for k in 'abc'], 1)
  np.testing.assert_array_equal(np.asarray(features.input_features(batch), np.float64), want)


@pytest.mark.parametrize('bad, named', [
    (dict(learning_rate=10.0), r'lower sae.learning_rate \(10\)$'),
    (dict(sparsity='l1', l1_coef=100.0), r'sae.learning_rate \(0.003\) or sae.l1_coef \(100\)$')])
def test_an_sae_that_codes_most_examples_as_zeros_is_refused(bad, named, monkeypatch):
  """A diverged (learning rate) or over-penalised (L1) fit coded nearly every example as all
  zeros, and the SAE policy then selected by its noise alone. The line counts the examples the
  fit's codes leave at zero (counted here from the codes of the same fit, unchecked); the
  default fit codes every example."""
  x = sparse_data()
  trained, _ = sae.train_sae(x, sae_config(), jax.random.PRNGKey(0))
  assert np.all(np.any(sae.encode_all(trained, x) > 0, -1))
  with pytest.raises(UserError, match=rf'the trained SAE codes (\d+) of 600 examples as all '
                                      rf'zeros.*{named}') as refused:
    sae.train_sae(x, sae_config(**bad), jax.random.PRNGKey(0))
  monkeypatch.setattr(sae, '_check_codes', lambda *args: None)
  unchecked, _ = sae.train_sae(x, sae_config(**bad), jax.random.PRNGKey(0))
  silent = int(np.sum(~np.any(sae.encode_all(unchecked, x) > 0, -1)))
  assert silent > 300 and f'codes {silent} of 600' in str(refused.value)


def _features_config(**kw):
  c = ml_collections.ConfigDict(dict(
      extractor='penultimate', task={'name': 'mlp_classifier', 'hidden': (32,), 'activation': 'relu'},
      train_steps=100, batch_size=64, learning_rate=3e-3, seed=0))
  c.update(kw)
  return c


def test_default_extractor_is_a_trained_model_and_any_function_plugs_in(tfds_dir):
  train = pipeline.load_split(digits_data(tfds_dir), 'train')
  val = pipeline.load_split(digits_data(tfds_dir), 'validation')
  task, params, cost = features.train_feature_model(train, _features_config())
  # 100 steps of 64 over 1197 examples: 5 epochs of 19 batches (the last of 45) and 5 more steps.
  assert cost == 5 * 1197 + 5 * 64
  metrics = jax.jit(task.metrics)(params, val.take(np.arange(len(val))))
  assert float(jnp.mean(metrics['accuracy'])) > 0.85  # a trained model, not a random projection
  real, cost_again = features.default_features(train, _features_config())
  assert cost_again == cost and real.shape == (len(train), 32)
  # Its features are the last hidden activation, relu(x W0 + b0), by hand.
  p = params['params']['dense_0']
  x = train.features['image'].reshape(len(train), -1)
  np.testing.assert_allclose(real, np.maximum(x @ p['kernel'] + p['bias'], 0), rtol=1e-4,
                             atol=1e-5)
  # The SAE on these real features: exactly-k codes, far below the mean-reconstruction error.
  trained, metrics = sae.train_sae(real, sae_config(num_factors=64, k=6), jax.random.PRNGKey(0))
  active = (sae.encode_all(trained, real) > 0).sum(-1)
  assert active.max() <= 6 and np.mean(active == 6) > 0.95
  assert metrics['mse'] < 0.2 * metrics['mse_mean_baseline'], metrics
  pixels, zero = features.default_features(train, _features_config(extractor='pixels'))
  np.testing.assert_array_equal(pixels, x)
  assert zero == 0
  feats = features.extract(lambda b: b['image'].reshape(b['image'].shape[0], -1)[:, :5], train)
  assert feats.shape == (len(train), 5)
  with pytest.raises(UserError, match='shape'):
    features.extract(lambda b: b['image'][:, 0, 0, 0], train)
  with pytest.raises(UserError, match='extractor'):
    features.default_features(train, _features_config(extractor='clip'))


@pytest.mark.parametrize('n, batch, epochs', [(5000, 64, 3.84), (50000, 128, 6.4), (300, 128, 1.0),
                                              (1000, 64, 0.01), (100, 256, 2.5)])
def test_offline_steps_cover_the_asked_passes(n, batch, epochs):
  """Counted batch by batch: the fewest steps whose examples reach `epochs` passes over n."""
  batch_now, seen, steps = min(batch, n), 0, 0
  while seen < epochs * n - 1e-6:
    seen, steps = seen + batch_now, steps + 1
  assert sae.offline_steps(123, epochs, n, batch) == max(steps, 1)
  assert sae.offline_steps(123, 0.0, n, batch) == 123  # no passes: the step count


@pytest.mark.parametrize('name', ['fashion_mnist', 'fashion_mnist_bench'])
def test_fashion_offline_stage_keeps_its_5k_steps_and_scales(name):
  """The Fashion-MNIST configs size the stage in passes: 300 / 250 steps on 5,000 images (the
  steps the bench's 5,000-image results were measured with), 10x that on 50,000."""
  import importlib  # pylint: disable=g-import-not-at-top
  c = importlib.import_module(f'configs.{name}').get_config()
  steps = lambda n: (sae.offline_steps(c.features.train_steps, c.features.train_epochs, n,
                                       c.features.batch_size),
                     sae.offline_steps(c.sae.steps, c.sae.epochs, n, c.sae.batch_size))
  assert steps(5000) == (300, 250) and steps(50000) == (3000, 2500)


def test_dead_factors_counts_factors_inactive_on_every_example():
  """'dead_factors' = the factors that no example activates. With k=1 and 5 examples at most 5 of
  16 factors are ever active: the count equals 16 minus the number of distinct active factors
  (counted from the codes), so it lies in [11, 16) whenever one factor fires somewhere."""
  x = sparse_data(n=5, dim=8, atoms=6, active=2, seed=3)
  trained, metrics = sae.train_sae(x, sae_config(num_factors=16, k=1, steps=3, batch_size=5),
                                   jax.random.PRNGKey(0))
  codes = sae.encode_all(trained, x)
  rows, cols = np.nonzero(codes > 0)
  assert len(rows) > 0  # some factor fires, so not every factor is dead
  assert metrics['dead_factors'] == 16 - len(set(cols.tolist()))
  assert 11 <= metrics['dead_factors'] < 16


def test_training_an_sae_lowers_a_few_programs_not_one_per_operation():
  """train_sae on features of a shape nothing else uses lowers (traces to XLA) at most its six
  programs (checks and normaliser, normalisation, key split, init, fit, summary): op by op, its
  checks and metrics lowered ~30 programs, each compiled alone (~3 s of a `--policy=sae` run's
  setup on 2 cores). Counted by JAX's own event, which fires even where the persistent
  compilation cache then skips XLA's compile."""
  lowered = []

  def on_duration(event, seconds, **kwargs):
    del seconds, kwargs
    if event == '/jax/core/compile/jaxpr_to_mlir_module_duration':
      lowered.append(event)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    x = sparse_data(n=131, dim=7, atoms=9, active=2)  # shapes of this test alone
    _, metrics = sae.train_sae(x, sae_config(num_factors=11, k=2, steps=3, batch_size=17),
                               jax.random.PRNGKey(0))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  assert metrics['mse_mean_baseline'] == pytest.approx(1.0, rel=1e-4)
  assert len(lowered) <= 6, len(lowered)
