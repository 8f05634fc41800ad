"""The TFDS pipeline, recorded label noise, the batch stream, batch weights and staggered resets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from datarater.data import pipeline
from datarater.errors import UserError
from inner_loop.weighting import softmax_weights
from outer_loop.population import reset_mask


def test_digits_is_a_tfds_dataset(tfds_dir):
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  reloaded = tfds.builder_from_directory(builder.data_dir)
  sizes = {name: info.num_examples for name, info in reloaded.info.splits.items()}
  assert sizes == {'train': 1197, 'validation': 300, 'test': 300}
  split = pipeline.load_split('sklearn_digits', 'train', tfds_dir)
  assert split.image.shape == (1197, 8, 8, 1) and split.image.dtype == np.float32
  assert 0.0 <= split.image.min() and split.image.max() <= 1.0
  assert set(np.unique(split.label)) == set(range(10))


def test_label_noise_flips_exactly_the_recorded_examples(tfds_dir):
  clean = pipeline.load_split('sklearn_digits', 'train', tfds_dir)
  noisy = pipeline.load_split('sklearn_digits', 'train', tfds_dir, label_noise=0.2, noise_seed=3)
  assert noisy.is_corrupted.sum() == round(0.2 * len(clean))
  np.testing.assert_array_equal(noisy.label != clean.label, noisy.is_corrupted)
  np.testing.assert_array_equal(noisy.clean_label, clean.label)
  # Symmetric: the wrong labels are spread over the other classes.
  shifts = (noisy.label - clean.label)[noisy.is_corrupted] % 10
  assert len(np.unique(shifts)) == 9
  again = pipeline.load_split('sklearn_digits', 'train', tfds_dir, label_noise=0.2, noise_seed=3)
  np.testing.assert_array_equal(noisy.label, again.label)


def test_bad_split_and_noise_rate(tfds_dir):
  with pytest.raises(UserError, match="has no split 'dev'"):
    pipeline.load_split('sklearn_digits', 'dev', tfds_dir)
  with pytest.raises(UserError, match=r'label_noise must be in \[0, 1\), got 1.5'):
    pipeline.symmetric_label_noise(np.zeros(4, np.int32), 10, 1.5, 0)
  with pytest.raises(UserError, match=r"no split 'train\[:5000\]'.*incompatible with 1197"):
    pipeline.load_split('sklearn_digits', 'train[:5000]', tfds_dir)


def test_split_expressions_read_the_same_examples_as_numpy_slices(tfds_dir):
  """TFDS slices and concatenations (cross-validation folds) are the named splits' examples."""
  train = pipeline.load_split('sklearn_digits', 'train', tfds_dir)
  test = pipeline.load_split('sklearn_digits', 'test', tfds_dir)
  fold = pipeline.load_split('sklearn_digits', 'train[:299]+train[598:]+test', tfds_dir,
                             label_noise=0.2, noise_seed=1)
  held_out = pipeline.load_split('sklearn_digits', 'train[299:598]', tfds_dir)
  keep = np.r_[0:299, 598:len(train)]
  np.testing.assert_array_equal(fold.image, np.concatenate([train.image[keep], test.image]))
  np.testing.assert_array_equal(fold.clean_label, np.r_[train.label[keep], test.label])
  np.testing.assert_array_equal(held_out.label, train.label[299:598])
  assert fold.is_corrupted.sum() == round(0.2 * len(fold))
  np.testing.assert_array_equal(fold.ids, np.arange(len(fold)))


def test_stream_visits_each_example_once_per_epoch_and_resumes_by_position():
  n = 37
  stream = pipeline.stream_indices(n, 0, 3 * n, seed=5)
  for epoch in range(3):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # reshuffled each epoch
  np.testing.assert_array_equal(pipeline.stream_indices(n, 50, 30, seed=5), stream[50:80])


def test_softmax_weights_average_one_and_sharpen_with_temperature():
  scores = jnp.array([[0.0, 1.0, 2.0, -1.0]])
  for tau in (0.5, 1.0, 4.0):
    w = softmax_weights(scores, tau)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w, 4 * jax.nn.softmax(scores / tau), rtol=1e-6)
  assert softmax_weights(scores, 0.5).max() > softmax_weights(scores, 4.0).max()


def test_each_member_resets_every_r_steps_at_staggered_offsets():
  k, r = 4, 8
  masks = np.stack([np.asarray(reset_mask(jnp.int32(s), k, r)) for s in range(1, 4 * r + 1)])
  for member in range(k):
    resets = np.flatnonzero(masks[:, member]) + 1
    assert np.all(np.diff(resets) == r)
  first = [np.flatnonzero(masks[:, m])[0] for m in range(k)]
  assert len(set(first)) == k  # no two members reset at the same step
