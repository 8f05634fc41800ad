"""The sparse autoencoder keeps its configured sparsity and reconstructs far better than the mean;
the default feature extractor is the trained model's penultimate layer."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from datarater import features, models, sae
from datarater.data import pipeline
from datarater.errors import UserError


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


@pytest.mark.parametrize('bad', [dict(sparsity='dense'), dict(k=0), dict(k=49), dict(num_factors=0)])
def test_bad_sae_config_is_a_user_error(bad):
  with pytest.raises(UserError, match='sae'):
    sae.make_sae(sae_config(**bad))


def test_bad_features_shape_is_a_user_error():
  with pytest.raises(UserError, match='shape'):
    sae.train_sae(np.zeros((5,)), sae_config(), jax.random.PRNGKey(0))


def test_penultimate_is_the_last_hidden_activation():
  task = models.task_model(10, (12, 7))
  x = jax.random.uniform(jax.random.PRNGKey(1), (5, 8, 8, 1))
  params = task.init(jax.random.PRNGKey(0), x)
  p = params['params']
  h = jax.nn.relu(x.reshape(5, -1) @ p['dense_0']['kernel'] + p['dense_0']['bias'])
  h = jax.nn.relu(h @ p['dense_1']['kernel'] + p['dense_1']['bias'])
  got = features.extract(features.penultimate_fn((12, 7), 'relu', params), np.asarray(x), chunk=2)
  np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)


def test_default_extractor_is_trained_and_any_function_plugs_in(tfds_dir):
  train = pipeline.load_split('sklearn_digits', 'train', tfds_dir)
  val = pipeline.load_split('sklearn_digits', 'validation', tfds_dir)
  params, cost = features.train_feature_model(train, hidden=(32,), steps=100, learning_rate=3e-3,
                                             seed=0)
  assert cost == 100 * 64
  task = models.task_model(10, (32,))
  acc = float(models.accuracy(task.apply, params, {'image': val.image, 'label': val.label}))
  assert acc > 0.85  # a trained model, not a random projection
  # The SAE on these real features: exactly-k codes, far below the mean-reconstruction error.
  real = features.extract(features.penultimate_fn((32,), 'relu', params), train.image)
  trained, metrics = sae.train_sae(real, sae_config(num_factors=64, k=6), jax.random.PRNGKey(0))
  active = (sae.encode_all(trained, real) > 0).sum(-1)
  assert active.max() <= 6 and np.mean(active == 6) > 0.95
  assert metrics['mse'] < 0.2 * metrics['mse_mean_baseline'], metrics
  feats = features.extract(lambda im: im.reshape(im.shape[0], -1)[:, :5], train.image)
  assert feats.shape == (len(train), 5)
  with pytest.raises(UserError, match='shape'):
    features.extract(lambda im: im[:, 0, 0, 0], train.image)
