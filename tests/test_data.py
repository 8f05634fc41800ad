"""The TFDS pipeline, the corruption record, the batch stream, batch weights and staggered resets."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
import tensorflow_datasets as tfds

from datarater.data import corruption, pipeline
from datarater.errors import UserError
from inner_loop.weighting import softmax_weights
from outer_loop.batches import MetaBatches
from outer_loop.population import reset_diverged, reset_mask, staggered_reset
from tests.conftest import digits_data


def test_digits_is_a_tfds_dataset_read_by_feature_type(tfds_dir):
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  reloaded = tfds.builder_from_directory(builder.data_dir)
  sizes = {name: info.num_examples for name, info in reloaded.info.splits.items()}
  assert sizes == {'train': 1197, 'validation': 300, 'test': 300}
  split = pipeline.load_split(digits_data(tfds_dir), 'train')
  raw = reloaded.as_data_source(split='train')[5]
  image, label = split.features['image'], split.features['label']
  assert image.shape == (1197, 8, 8, 1) and image.dtype == np.float32
  np.testing.assert_allclose(image[5], raw['image'] / 255.0, rtol=1e-6)  # uint8 -> [0, 1]
  assert label.dtype == np.int32 and label[5] == raw['label']
  assert set(np.unique(label)) == set(range(10))
  assert split.info.num_classes == {'label': 10}
  assert split.info.supervised_keys == ('image', 'label')
  assert not split.is_corrupted.any() and split.corruption_kinds == ('clean',)


def test_digits_splits_partition_load_digits_with_grey_levels_rounded(tfds_dir):
  """The three prepared splits hold every scikit-learn digit exactly once between them
  (multisets of (pixels, label) rows), each 16-level pixel v as round(v * 255 / 16)."""
  import collections  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  want_images = np.round(digits.images.astype(np.float64) * 255 / 16)
  assert (want_images != np.floor(digits.images * 255 / 16)).mean() > 0.1  # rounding shows
  rows = lambda images, labels: collections.Counter(
      (np.asarray(x, np.uint8).tobytes(), int(y)) for x, y in zip(images, labels))
  want = rows(want_images.reshape(-1, 8, 8, 1), digits.target)
  builder = tfds.builder_from_directory(pipeline.get_builder('sklearn_digits', tfds_dir).data_dir)
  got = collections.Counter()
  for name, size in (('train', 1197), ('validation', 300), ('test', 300)):
    source = builder.as_data_source(split=name)
    assert len(source) == size
    examples = [source[i] for i in range(size)]
    split_rows = rows([e['image'] for e in examples], [e['label'] for e in examples])
    assert not split_rows & got  # disjoint from the splits before
    got += split_rows
  assert got == want


def test_label_noise_flips_exactly_the_recorded_examples(tfds_dir):
  clean = pipeline.load_split(digits_data(tfds_dir), 'train')
  noisy = pipeline.load_split(digits_data(tfds_dir, 0.2, 3), 'train', corrupt=True)
  was, now = clean.features['label'], noisy.features['label']
  assert noisy.is_corrupted.sum() == round(0.2 * len(clean))
  np.testing.assert_array_equal(now != was, noisy.is_corrupted)
  np.testing.assert_array_equal(noisy.clean['label'], was)
  np.testing.assert_array_equal(noisy.features['image'], clean.features['image'])
  assert noisy.corruption_kinds[1] == 'label_symmetric'
  shifts = (now - was)[noisy.is_corrupted] % 10  # symmetric: spread over the other classes
  assert len(np.unique(shifts)) == 9
  again = pipeline.load_split(digits_data(tfds_dir, 0.2, 3), 'train', corrupt=True)
  np.testing.assert_array_equal(now, again.features['label'])


def test_corruption_of_blocks_equals_corruption_of_the_whole_split(tfds_dir):
  """A split streamed in blocks (as the filter reads it) is corrupted exactly like a whole one."""
  whole = pipeline.load_split(digits_data(tfds_dir, 0.3, 7), 'train', corrupt=True)
  info = whole.info
  raw = {'label': pipeline.load_split(digits_data(tfds_dir), 'train').features['label']}
  c = corruption.Corruption(0.3, 7)
  blocks = [c.apply(info, {'label': raw['label'][ids]}, ids, len(whole))[0]['label']
            for ids in np.array_split(np.arange(len(whole)), 5)]
  np.testing.assert_array_equal(np.concatenate(blocks), whole.features['label'])
  changed = np.flatnonzero(whole.features['label'] != raw['label'])  # 30% flipped, recorded
  np.testing.assert_array_equal(changed, np.flatnonzero(whole.is_corrupted))
  assert len(changed) == round(0.3 * len(whole))


def test_bad_split_and_noise_rate(tfds_dir):
  with pytest.raises(UserError, match="has no split 'dev'"):
    pipeline.load_split(digits_data(tfds_dir), 'dev')
  with pytest.raises(UserError, match=r'label_noise must be in \[0, 1\), got 1.5'):
    corruption.Corruption(1.5)
  with pytest.raises(UserError, match=r"no split 'train\[:5000\]'.*incompatible with 1197"):
    pipeline.load_split(digits_data(tfds_dir), 'train[:5000]')


def test_split_expressions_read_the_same_examples_as_numpy_slices(tfds_dir):
  """TFDS slices and concatenations (cross-validation folds) are the named splits' examples."""
  data = digits_data(tfds_dir, 0.2, 1)
  train = pipeline.load_split(data, 'train')
  test = pipeline.load_split(data, 'test')
  fold = pipeline.load_split(data, 'train[:299]+train[598:]+test', corrupt=True)
  held_out = pipeline.load_split(data, 'train[299:598]')
  keep = np.r_[0:299, 598:len(train)]
  np.testing.assert_array_equal(
      fold.features['image'], np.concatenate([train.features['image'][keep],
                                              test.features['image']]))
  np.testing.assert_array_equal(fold.clean['label'],
                                np.r_[train.features['label'][keep], test.features['label']])
  np.testing.assert_array_equal(held_out.features['label'], train.features['label'][299:598])
  assert fold.is_corrupted.sum() == round(0.2 * len(fold))
  np.testing.assert_array_equal(fold.ids, np.arange(len(fold)))


def test_shared_examples_of_two_split_expressions_by_brute_force(tfds_dir):
  """The examples two expressions both select, against sets of (split, index); a rater's
  held-out split sharing examples with its training split is refused."""
  from datarater.meta_train import meta_train  # pylint: disable=g-import-not-at-top
  from tests.run_config import small_config  # pylint: disable=g-import-not-at-top
  builder = pipeline.get_builder('sklearn_digits', tfds_dir)
  def chosen(expr):
    out = set()
    for part in expr.split('+'):
      name, _, sl = part.partition('[')
      lo, hi = (sl.rstrip(']').split(':') + [''])[:2] if sl else ('', '')
      n = builder.info.splits[name].num_examples
      out |= {(name, i) for i in range(int(lo or 0), int(hi or n))}
    return out
  for a, b in [('train', 'validation'), ('train[:500]', 'train[400:]'),
               ('train[:100]+train[50:200]', 'train[150:300]+test'), ('train', 'train[1000:]'),
               ('train[:299]+train[598:]+test', 'train[299:598]'),
               ('train[:100]+train[99:200]', 'train[:300]')]:  # parts sharing one example
    assert pipeline.shared_examples(builder, a, b) == len(chosen(a) & chosen(b)), (a, b)
  config = small_config(tfds_dir, steps=2)
  config.data.heldout_split = 'train[1000:]'
  with pytest.raises(UserError, match="data.heldout_split 'train\\[1000:\\]' shares 197 examples"):
    meta_train(config, 'never_written')


def test_take_and_subset_keep_ids_and_records(tfds_dir):
  split = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  idx = np.array([[3, 1], [7, 1190]])
  batch = split.take(idx)
  assert batch['image'].shape == (2, 2, 8, 8, 1)
  np.testing.assert_array_equal(batch['index'], idx)
  # Positions in any order (a ranked selection): every record follows its example.
  idx = np.r_[np.flatnonzero(split.is_corrupted)[:3], 5, 9, 11][::-1]
  sub = split.subset(idx)
  np.testing.assert_array_equal(sub.ids, idx)
  for name, whole, part in (('corruption', split.corruption, sub.corruption),
                            ('label', split.features['label'], sub.features['label']),
                            ('clean label', split.clean['label'], sub.clean['label'])):
    np.testing.assert_array_equal(part, [whole[i] for i in idx], err_msg=name)
  assert 0 < sub.is_corrupted.sum() < len(idx)


def test_data_info_round_trips_through_json(tfds_dir):
  info = pipeline.load_split(digits_data(tfds_dir), 'test').info
  assert pipeline.DataInfo.from_json(info.to_json()) == info


def test_stream_visits_each_example_once_per_epoch_and_resumes_by_position():
  n = 37
  stream = pipeline.stream_indices(n, 0, 3 * n, seed=5)
  for epoch in range(3):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # reshuffled each epoch
  np.testing.assert_array_equal(pipeline.stream_indices(n, 50, 30, seed=5), stream[50:80])


def test_epochs_of_the_stream_are_the_documented_independent_permutations():
  """Epoch e of seed s is numpy's permutation seeded [STREAM_TAG, s, e] (the docstring), so
  neighbouring (seed, epoch) pairs never share an epoch: seed s's epoch 1 is not seed s+1's
  epoch 0, as it would be were the epoch added to the seed."""
  n = 50
  stream = {s: pipeline.stream_indices(n, 0, 3 * n, s) for s in range(4)}
  for s in range(4):
    for e in range(3):
      want = np.random.default_rng([pipeline.STREAM_TAG, s, e]).permutation(n)
      np.testing.assert_array_equal(stream[s][e * n:(e + 1) * n], want)
  epochs = [stream[s][e * n:(e + 1) * n].tobytes() for s in range(4) for e in range(3)]
  assert len(set(epochs)) == len(epochs)


def test_data_infos_differing_only_in_class_count_do_not_match(tfds_dir):
  """A rater made for 10 classes reads a 9- or 11-class label as out of its range: the infos
  must not match on the label, while the image alone still does."""
  info = pipeline.load_split(digits_data(tfds_dir), 'test').info
  assert info.matches(info, ('image', 'label'))
  for classes in (9, 11):
    other = dataclasses.replace(info, num_classes={'label': classes})
    assert other.spec == info.spec and other.stored == info.stored
    assert not info.matches(other, ('image', 'label'))
    assert not other.matches(info, ('label',))
    assert info.matches(other, ('image',))
    # What the filter, valuation and the datarater policy call before scoring: a one-line refusal.
    import types  # pylint: disable=g-import-not-at-top
    from datarater import export  # pylint: disable=g-import-not-at-top
    rater = types.SimpleNamespace(info=info, reads=('image', 'label'), rater=None)
    with pytest.raises(UserError, match=f"classes {{'label': {classes}}}"):
      export.LoadedRater.check_matches(rater, other, 'the training data')


def test_an_info_saved_without_stored_dtypes_still_scales_uint8_pixels():
  """Exports written before `stored` existed have no such key: their uint8 pixels are still
  decoded as value / 255 (float64 oracle), and an int label keeps its value."""
  saved = {'name': 'sklearn_digits', 'num_classes': {'label': 10}, 'supervised_keys':
           ['image', 'label'], 'spec': {'image': {'shape': [8, 8, 1], 'dtype': 'float32'},
                                        'label': {'shape': [], 'dtype': 'int32'}}}
  info = pipeline.DataInfo.from_json(saved)
  assert info.stored == {}
  raw = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
  labels = np.arange(5, dtype=np.int64)
  out = pipeline.decode(info, {'image': raw, 'label': labels})
  assert out['image'].dtype == np.float32
  np.testing.assert_allclose(out['image'], raw.astype(np.float64) / 255.0, rtol=1e-6, atol=0)
  assert out['image'].max() <= 1.0
  np.testing.assert_array_equal(out['label'], labels)


def test_meta_batches_of_consecutive_steps_are_consecutive_disjoint_slices_of_the_stream(
    tfds_dir):
  """MetaBatches' steps 0..3 read the train stream (`stream_indices` of the train split, config
  seed) in consecutive, disjoint slices of K * (A + T) * B positions, each laid out [K, A + T, B]
  in C order, and the held-out stream (seed + 1) in slices of K * B_out, laid out [K, B_out];
  `position(s)` is what steps 0..s-1 consumed. Four steps pass the end of each split's first
  epoch (4 * 2 * 3 * 64 > 1197, 4 * 2 * 48 > 300): each whole epoch is a permutation of the
  split, and the epoch begun after it repeats no example."""
  from configs.digits import get_config  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.data = digits_data(tfds_dir)
  config.seed, config.inner.population, config.inner.advance_steps = 3, 2, 1
  config.inner.steps, config.inner.batch_size, config.outer.batch_size = 2, 64, 48
  data = MetaBatches(config)
  n_train, n_heldout = len(data.train), len(data.heldout)
  steps = [data.indices_at(s) for s in range(4)]
  for inner, outer in steps:
    assert inner.shape == (2, 3, 64) and outer.shape == (2, 48)
  for name, got, n, per_step, seed in (
      ('train', [inner.reshape(-1) for inner, _ in steps], n_train, 2 * 3 * 64, 3),
      ('heldout', [outer.reshape(-1) for _, outer in steps], n_heldout, 2 * 48, 4)):
    stream = np.concatenate(got)
    assert len(stream) == 4 * per_step > n
    np.testing.assert_array_equal(stream, pipeline.stream_indices(n, 0, 4 * per_step, seed))
    assert sorted(stream[:n]) == list(range(n))  # epoch 0: every example once
    assert len(set(stream[n:])) == len(stream) - n  # epoch 1 so far: no example twice
    for s in range(5):
      assert data.position(s)[name] == s * per_step
  # The device batches (each device gathering its own members' rows) are the host batches.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('k',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('k'))
  for s in range(4):
    host = data.host_batches_at(s)
    shardings = [{k: rows for k in part} for part in host]
    for want, got in zip(host, data.device_batches_at(s, *shardings)):
      assert set(got) == set(want)
      for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=f'{k} at step {s}')


def test_the_stream_does_not_follow_the_corruption_record_of_the_same_seed():
  """The benches set seed = noise_seed. Were the stream's epoch 0 the record's permutation, its
  first rate * N positions would all be corrupted; independent, the share is binomial around the
  rate (here 200 of 1,000 at 20%: at most 0.3 by any seed, a 3.5 sigma bound)."""
  n, rate = 1000, 0.2
  for seed in range(5):
    corrupted = corruption.Corruption(rate, seed).record(n) != 0
    first = pipeline.stream_indices(n, 0, int(rate * n), seed)
    assert corrupted[first].mean() < 0.3, (seed, corrupted[first].mean())


def test_softmax_weights_average_one_keep_the_order_and_sharpen_with_lower_temperature():
  scores = jnp.array([[0.0, 1.0, 2.0, -1.0]])
  for tau in (0.5, 1.0, 4.0):
    w = np.asarray(softmax_weights(scores, tau), np.float64)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
    assert list(np.argsort(w[0])) == [3, 0, 1, 2]  # higher score, higher weight
    # The ratio of two weights is exp(score difference / tau), whatever the other scores.
    np.testing.assert_allclose(w[0, 2] / w[0, 1], np.exp(1.0 / tau), rtol=1e-5)
  np.testing.assert_allclose(softmax_weights(scores + 5.0, 1.0), softmax_weights(scores, 1.0),
                             rtol=1e-6)
  assert softmax_weights(scores, 0.5).max() > softmax_weights(scores, 4.0).max()


@pytest.mark.parametrize('scores,tau', [([1e33, 0.0, -1e33, 5e32], 1e-6),  # s / tau overflowed
                                          ([3e38, -3e38, 1e30, 2.0], 1e-6),
                                          ([1e30, -1e30, 0.5, 0.0], 1e6),
                                          ([2.0, 2.0, 2.0], 1e-6), ([-7.0], 1e-6)])
def test_softmax_weights_of_any_finite_scores_are_the_float64_softmax(scores, tau):
  """Against scipy's softmax in float64 (where s / tau does not overflow), also as the real rows
  of a batch whose padding holds the largest float32 score; finite gradients."""
  want = len(scores) * scipy.special.softmax(np.asarray(scores, np.float64) / tau)
  s = jnp.asarray(scores, jnp.float32)
  np.testing.assert_allclose(softmax_weights(s, tau), want, rtol=1e-5, atol=1e-6)
  padded = jnp.concatenate([s, jnp.full(2, 3e38, jnp.float32)])
  mask = jnp.arange(len(scores) + 2) < len(scores)
  np.testing.assert_allclose(softmax_weights(padded, tau, mask), np.r_[want, 0.0, 0.0],
                             rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(softmax_weights(x, tau, mask) * jnp.arange(x.shape[0])))(
      padded)
  assert np.isfinite(grad).all()


def test_softmax_weights_gradient_is_the_finite_difference_of_its_float64_definition():
  """The largest real score is subtracted under stop_gradient: the gradient is still that of
  n * softmax(s / tau) over the real examples (central differences of a numpy definition, in
  float64), padding gets none, and a row of padding alone has weights 0 and gradient 0."""
  rng = np.random.default_rng(0)
  s, c = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float64)
  tau = 0.7

  def defined(s):
    out = np.zeros_like(s)
    for row, real in zip(range(len(s)), mask > 0):
      if real.any():
        out[row, real] = real.sum() * scipy.special.softmax(s[row, real] / tau)
    return out
  with jax.enable_x64(True):
    w = softmax_weights(jnp.asarray(s), tau, jnp.asarray(mask))
    grad = jax.grad(lambda x: jnp.sum(c * softmax_weights(x, tau, jnp.asarray(mask))))(
        jnp.asarray(s))
  np.testing.assert_allclose(w, defined(s), rtol=1e-12, atol=1e-15)
  eps, numeric = 1e-6, np.zeros_like(s)
  for i, j in np.ndindex(*s.shape):
    d = np.zeros_like(s)
    d[i, j] = eps
    numeric[i, j] = np.sum(c * (defined(s + d) - defined(s - d))) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, atol=1e-8)
  assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_each_member_resets_every_r_steps_at_staggered_offsets():
  k, r = 4, 8
  masks = np.stack([np.asarray(reset_mask(jnp.int32(s), k, r)) for s in range(1, 4 * r + 1)])
  for member in range(k):
    resets = np.flatnonzero(masks[:, member]) + 1
    assert np.all(np.diff(resets) == r)
  first = [np.flatnonzero(masks[:, m])[0] for m in range(k)]
  assert len(set(first)) == k  # no two members reset at the same step


@pytest.mark.parametrize('k, r', [(8, 2 ** 31 - 1), (3, 10 ** 9 + 7), (5, 7), (8, 3)])
def test_the_reset_mask_is_its_definition_in_python_ints(k, r):
  """(step + k * R // K) % R == 0, step > 0, in exact integers: with R near int32's largest,
  k * R overflowed in int32 and members 2, 4, 6 of 8 were reset at step 1."""
  steps = [1, 2, 3, r - 1, r, r + 1, 2 ** 31 - 2] + [r - k_ * r // k for k_ in range(k)]
  for step in sorted({s for s in steps if 0 < s < 2 ** 31}):
    want = [(step + m * r // k) % r == 0 for m in range(k)]
    assert np.asarray(reset_mask(jnp.int32(step), k, r)).tolist() == want, step


def test_every_reset_draws_a_fresh_member_never_a_repeated_one():
  """Each re-initialisation is a new draw: a member reset on schedule at two steps, and a member
  reset on schedule and then for divergence at the same step, start from different models (a
  member that diverged right after its reset must not restart where it just diverged from)."""
  k, r, key = 2, 4, jax.random.key(0)
  init = lambda key: {'w': jax.random.normal(key, (5,))}
  old = {'w': jnp.zeros((k, 5))}
  due = [s for s in range(1, 2 * r + 1) if reset_mask(jnp.int32(s), k, r)[0]]  # member 0's steps
  first, second = (staggered_reset(old, init, key, jnp.int32(s), r)['w'][0] for s in due[:2])
  assert not np.allclose(first, 0) and not np.allclose(first, second)
  diverged = {'w': old['w'].at[0].set(jnp.nan)}
  redrawn, count = reset_diverged(diverged, init, key, jnp.int32(due[0]))
  assert int(count) == 1 and np.isfinite(redrawn['w'][0]).all()
  assert not np.allclose(redrawn['w'][0], first)
  np.testing.assert_array_equal(redrawn['w'][1], 0.0)  # the finite member is kept


def test_fresh_members_are_drawn_only_at_steps_that_replace_one():
  """An outer step draws K fresh members (for the schedule, then for divergence) only where some
  member is replaced: drawing them every step cost about a tenth of the digits step, mostly
  thrown away. The members replaced are those drawn from fold_in(key, step) (the schedule) and
  fold_in(fold_in(key, 2^31 - 1), step) (divergence); the others are kept bit for bit."""
  k, r, key = 2, 4, jax.random.key(0)
  draws = []

  def init(key):
    jax.debug.callback(lambda: draws.append(1))  # (vmapped: once per K members drawn)
    return {'w': jax.random.normal(key, (3,))}

  @jax.jit
  def resets(population, step):
    population = staggered_reset(population, init, key, step, r)
    return reset_diverged(population, init, key, step)

  def fresh(draw_key, m):
    return init(jax.random.split(draw_key, k)[m])['w']
  old = {'w': jnp.arange(k * 3, dtype=jnp.float32).reshape(k, 3)}
  for step in range(2 * r + 1):
    for diverged in (None, 1):
      population = old if diverged is None else {'w': old['w'].at[diverged, 0].set(jnp.nan)}
      draws.clear()
      new, count = jax.block_until_ready(resets(population, jnp.int32(step)))
      jax.effects_barrier()
      due = [step > 0 and (step + m * r // k) % r == 0 for m in range(k)]
      still_diverged = diverged is not None and not due[diverged]  # (a due one is replaced)
      assert len(draws) == any(due) + still_diverged, (step, diverged, len(draws))
      assert int(count) == still_diverged
      for m in range(k):
        if due[m]:
          want = fresh(jax.random.fold_in(key, step), m)
        elif m == diverged:
          want = fresh(jax.random.fold_in(jax.random.fold_in(key, 0x7fffffff), step), m)
        else:
          want = old['w'][m]
        np.testing.assert_array_equal(new['w'][m], want)


def _data_info_of(features) -> pipeline.DataInfo:
  """`pipeline.data_info` of a builder whose features are `features` (image, label supervised)."""
  import types  # pylint: disable=g-import-not-at-top
  return pipeline.data_info(types.SimpleNamespace(info=types.SimpleNamespace(
      features=features, supervised_keys=('image', 'label'), full_name='mine/1.0.0')))


def test_data_info_leaves_out_what_is_not_a_fixed_shape_array_and_records_stored_dtypes():
  """A variable-length feature no model reads (e.g. tokens of any length) is left out like text
  (the examples could not be stacked). Stored dtypes tell uint8
  pixels (decoded to [0, 1]) from float ones (kept as they are)."""
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(4, 4), dtype=np.uint8),
      'depth': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
      'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int64),
      'caption': tfds.features.Text(),
      'label': tfds.features.ClassLabel(names=['a', 'b'])})
  info = _data_info_of(features)
  assert set(info.spec) == {'image', 'depth', 'label'}
  assert info.stored == {'image': 'uint8', 'depth': 'float64', 'label': 'int64'}
  assert info.spec['image'].dtype == info.spec['depth'].dtype == np.float32
  assert pipeline.DataInfo.from_json(info.to_json()) == info


def test_a_recorded_corruption_whose_class_0_is_not_clean_is_refused():
  """Every reader takes class 0 of a dataset's own `corruption` record as clean; a record whose
  classes come in another order would count the clean examples as corrupted."""
  info = pipeline.DataInfo('mine', {'corruption': jax.ShapeDtypeStruct((), np.int32)},
                           {'corruption': 3}, None,
                           {'corruption': ('random_bytes', 'clean', 'shuffled')})
  with pytest.raises(UserError, match="class 0 of feature 'corruption' must be 'clean'"):
    pipeline.corruption_kinds(info, corruption.Corruption())
  ok = dataclasses.replace(info, class_names={'corruption': ('clean', 'random_bytes', 'x')})
  assert pipeline.corruption_kinds(ok, corruption.Corruption()) == ('clean', 'random_bytes', 'x')


def test_a_split_read_again_is_the_folders_current_contents_and_its_own_copy(tfds_dir, tmp_path):
  """Splits read before are kept in memory: a dataset written again into the same folder
  (launch.filter --overwrite) is read again, and changing a returned split's arrays changes
  no later read. Oracle: the folder's examples read by TFDS directly."""
  from datarater import files  # pylint: disable=g-import-not-at-top
  from datarater.curation.filter import filter_dataset  # pylint: disable=g-import-not-at-top
  n = len(pipeline.load_split(digits_data(tfds_dir), 'train'))
  scores, folder = str(tmp_path / 'scores.parquet'), str(tmp_path / 'filtered')
  files.write_parquet(scores, {'id': np.arange(n),
                               'value': np.random.default_rng(0).normal(size=n)})
  data = digits_data(tfds_dir)
  data.dataset_dir = folder
  for keep in (0.5, 0.9):
    filter_dataset('sklearn_digits', folder, ['train'], scores=scores, keep=keep,
                   data_dir=tfds_dir, batch_size=256, overwrite=keep > 0.5)
    direct = tfds.builder_from_directory(folder).as_data_source(split='train')
    for _ in range(2):
      split = pipeline.load_split(data, 'train')
      assert len(split) == len(direct)
      np.testing.assert_array_equal(split.features['label'], [e['label'] for e in direct])
      np.testing.assert_allclose(split.features['image'][:, :, :, 0] * 255,
                                 [e['image'][:, :, 0] for e in direct], rtol=1e-6)
      split.features['image'][:] = -1  # the caller's own arrays
      split.features['label'][:] = -1
  assert len(direct) == round(0.9 * n) != round(0.5 * n)


def test_splits_kept_in_memory_stay_within_their_byte_budget(tfds_dir, monkeypatch):
  """Oldest first out; a split larger than the whole budget is not kept, and evicts nothing."""
  data = digits_data(tfds_dir)
  monkeypatch.setattr(pipeline, '_RAW_CACHE', type(pipeline._RAW_CACHE)())
  size = lambda split: sum(x.nbytes for x in pipeline._read_raw(
      pipeline.builder_of(data), pipeline.data_info(pipeline.builder_of(data)), split).values())
  train, test = size('train'), size('test')
  kept = lambda: sorted(key[-1] for key in pipeline._RAW_CACHE)
  assert kept() == ['test', 'train']
  monkeypatch.setattr(pipeline, 'RAW_CACHE_BYTES', train + test - 1)
  pipeline.load_split(data, 'validation')
  assert kept() == ['test', 'validation']  # train, the oldest, went first
  monkeypatch.setattr(pipeline, 'RAW_CACHE_BYTES', train - 1)
  pipeline.load_split(data, 'train')
  assert kept() == ['test', 'validation']


def test_a_dataset_prepared_as_tfrecord_says_how_to_prepare_it(tfds_dir, tmp_path):
  """TFDS prepares tfrecord files unless told otherwise; by name it was called no TFDS dataset
  name, by folder its record files damaged."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  (version,) = glob.glob(os.path.join(tfds_dir, 'sklearn_digits', '*', 'dataset_info.json'))
  folder = tmp_path / 'sklearn_digits' / os.path.basename(os.path.dirname(version))
  shutil.copytree(os.path.dirname(version), folder)
  info = folder / 'dataset_info.json'
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  for path in folder.glob('*array_record*'):
    path.rename(str(path).replace('array_record', 'tfrecord'))
  says = "prepare it with builder.download_and_prepare\\(file_format='array_record'\\)"
  with pytest.raises(UserError, match=f'holds tfrecord files: .*{says}'):
    pipeline.builder_of(ml_collections.ConfigDict({'dataset_dir': str(folder)}))
  with pytest.raises(UserError, match=f"'sklearn_digits' in data.data_dir .* is prepared in "
                                      f'another file format .*{says}'):
    pipeline.get_builder('sklearn_digits', str(tmp_path))


class ManyFeaturesForTest(tfds.core.GeneratorBasedBuilder):
  """A dataset with eight features, built on first use as a bundled one is."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {f'f{i}': tfds.features.Tensor(shape=(2,), dtype=np.int32) for i in range(8)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {f'f{j}': np.array([i, j], np.int32) for j in range(8)}


def test_bundled_datasets_are_built_to_the_same_bytes_in_every_process(tmp_path, monkeypatch):
  """A record's feature map was serialised in the order of protobuf's hash map, seeded anew in
  each process, so building a bundled dataset (or any, through `pipeline.prepare`) twice gave
  files of other bytes: each record must be the canonical (key-ordered) encoding of itself."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pipeline, 'BUNDLED', {*pipeline.BUNDLED, 'many_features_for_test'})
  builder = pipeline.get_builder('many_features_for_test', str(tmp_path))
  (path,) = tmp_path.glob('many_features_for_test/1.0.0/*.array_record*')
  records = array_record_module.ArrayRecordReader(str(path)).read_all()
  assert len(records) == 5
  for record in records:
    canonical = tf_example_pb2.Example.FromString(record).SerializeToString(deterministic=True)
    assert record == canonical
  read = builder.as_data_source()['train']
  assert sorted(tuple(read[i]['f3']) for i in range(5)) == [(i, 3) for i in range(5)]


def test_a_model_reading_a_feature_left_out_is_told_why():
  """WORKSPACE.md: text, variable-length tensors, uint16 or float32 images and images of no
  fixed shape are left out, and a model that reads one is refused saying so (a uint16 image was
  refused only as a feature the dataset lacks, leaving one to guess the name was misspelt)."""
  from datarater.tasks.classifier import mlp_classifier  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(4, 4), dtype=np.uint8),
      'depth': tfds.features.Image(shape=(4, 4, 1), dtype=np.uint16),
      'heat': tfds.features.Image(shape=(4, 4, 1), dtype=np.float32),
      'photo': tfds.features.Image(shape=(None, None, 3)),
      'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int64),
      'caption': tfds.features.Text(),
      'label': tfds.features.ClassLabel(names=['a', 'b'])})
  info = _data_info_of(features)
  assert set(info.spec) == {'image', 'label'}
  for name, why in [('depth', 'is a uint16 image: only uint8 images are read'),
                    ('heat', 'is a float32 image: only uint8 images are read'),
                    ('photo', 'is an image of no fixed shape (None, None, 3): resize'),
                    ('tokens', 'has no fixed shape (None,)'),
                    ('caption', 'is a Text feature, not an array of numbers')]:
    config = ml_collections.ConfigDict({'hidden': (4,), 'activation': 'relu', 'input': name})
    with pytest.raises(UserError) as e:
      mlp_classifier(config, info)
    assert f'({name!r} {why}' in str(e.value) and '\n' not in str(e.value), str(e.value)
