"""Task-model training under policies, and the online filtering steps of an input pipeline."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datarater import filtering, models, training
from datarater.data import pipeline
from datarater.errors import UserError
from inner_loop.optimizers import make_inner_optimizer


@pytest.fixture(scope='module')
def splits(tfds_dir):
  train = pipeline.load_split('sklearn_digits', 'train', tfds_dir, 0.2, 0)
  test = pipeline.load_split('sklearn_digits', 'test', tfds_dir)
  return train, test


def _trainer(weight_fn=training.uniform_weight_fn):
  task = models.task_model(10, (32,))
  return training.Trainer(task, make_inner_optimizer('adam', 1e-2), weight_fn)


def _subset(split, idx):
  return pipeline.Split(split.image[idx], split.label[idx], split.clean_label[idx],
                        split.is_corrupted[idx], np.arange(len(idx)), split.num_classes)


def test_compute_accounting_and_vmapped_seeds_match_single_runs(splits):
  train, test = splits
  trainer = _trainer()
  both = trainer.fit(train, {'eval': test}, epochs=2, batch_size=100, seeds=[0, 1],
                     policy=training.Policy('uniform'))
  one = trainer.fit(train, {'eval': test}, epochs=2, batch_size=100, seeds=[1],
                    policy=training.Policy('uniform'))
  assert both['example_gradients'] == 2 * len(train)
  assert both['steps'] == 2 * 12  # ceil(1197 / 100) per epoch
  assert [r['examples'] for r in both['history']] == [len(train), 2 * len(train)]
  np.testing.assert_allclose(both['final']['eval_accuracy_per_seed'][1],
                             one['final']['eval_accuracy_per_seed'][0], atol=1e-6)
  assert both['final']['eval_accuracy'] > 0.5  # it learns


def test_epoch_selection_equals_training_on_the_subset(splits):
  """A per-epoch selection policy visits only its examples, in the order a subset would have."""
  train, test = splits
  keep = np.flatnonzero(~train.is_corrupted)
  trainer = _trainer()
  selected = trainer.fit(train, {'eval': test}, epochs=2, batch_size=64, seeds=[0],
                         policy=training.Policy('clean_only', select_epoch=lambda e, ids: ids[keep]))
  subset = trainer.fit(_subset(train, keep), {'eval': test}, epochs=2, batch_size=64, seeds=[0],
                       policy=training.Policy('uniform'))
  assert selected['example_gradients'] == subset['example_gradients'] == 2 * len(keep)
  np.testing.assert_allclose(selected['final']['eval_loss'], subset['final']['eval_loss'], rtol=1e-5)


def test_zero_weights_do_not_train_and_weights_follow_the_table(splits):
  train, test = splits
  trainer = _trainer(lambda table, params, batch: table[batch['index']])
  zero = trainer.fit(train, {'eval': test}, epochs=1, batch_size=128, seeds=[0],
                     policy=training.table_policy('zero', np.zeros(len(train))))
  untrained = trainer.fit(train, {'eval': test}, epochs=1, batch_size=128, seeds=[0],
                          policy=training.table_policy('zero', np.zeros(len(train))))
  ones = trainer.fit(train, {'eval': test}, epochs=1, batch_size=128, seeds=[0],
                     policy=training.table_policy('one', np.ones(len(train))))
  task = models.task_model(10, (32,))
  params0 = task.init(jax.random.PRNGKey(0), jnp.asarray(train.image[:1]))
  loss0 = float(jnp.mean(models.per_example_loss(task.apply, params0,
                                                 {'image': test.image, 'label': test.label})))
  np.testing.assert_allclose(zero['final']['eval_loss'], loss0, rtol=1e-5)
  assert zero['final'] == untrained['final']
  assert ones['final']['eval_loss'] < loss0 - 0.3


def test_clean_oracle_weights_beat_uniform_under_noise(splits):
  """Weights that zero the corrupted examples must do better than uniform at 20% noise."""
  train, test = splits
  trainer = _trainer(lambda table, params, batch: table[batch['index']])
  kw = dict(epochs=15, batch_size=128, seeds=[0, 1])
  clean = trainer.fit(train, {'eval': test}, **kw,
                      policy=training.table_policy('oracle', (~train.is_corrupted) * 1.25))
  uniform = trainer.fit(train, {'eval': test}, **kw,
                        policy=training.table_policy('u', np.ones(len(train))))
  assert clean['final']['eval_loss'] < uniform['final']['eval_loss']


def test_unknown_policy_is_a_user_error(splits):
  train, test = splits
  ctx = training.PolicyContext(train, test, None, None)
  with pytest.raises(UserError, match="unknown weighting 'nope'"):
    training.make_policy('nope', ctx)
  with pytest.raises(UserError, match='needs --rater'):
    training.make_policy('datarater', ctx)


# ---------------------------------------------------------------------------- filtering steps


def test_select_top_exact_count_ties_and_balance():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, size=1000).astype(float)  # many ties
  labels = rng.integers(0, 7, size=1000)
  for keep in (0.001, 0.33, 0.5, 0.8, 1.0):
    mask = filtering.select_top(scores, keep)
    assert mask.sum() == filtering.keep_count(1000, keep)
    assert scores[mask].min() >= scores[~mask].max(initial=-np.inf)
    perm = rng.permutation(1000)  # ties go to the lower id whatever the row order
    np.testing.assert_array_equal(filtering.select_top(scores[perm], keep, ids=perm), mask[perm])
  scores[labels == 3] = -100.0  # a class that scores worst everywhere
  plain = filtering.select_top(scores, 0.5)
  balanced = filtering.select_top(scores, 0.5, labels=labels, num_classes=7, balance=True)
  assert not (plain & (labels == 3)).any() and balanced.sum() == 500
  counts = np.bincount(labels, minlength=7)
  np.testing.assert_array_equal(np.bincount(labels[balanced], minlength=7),
                                filtering.class_quotas(counts, 500))
  assert np.all(np.abs(np.bincount(labels[balanced], minlength=7) - 0.5 * counts) <= 1)
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(UserError, match=f'got {bad}'):
      filtering.select_top(scores, bad)


def test_streaming_quantile_is_within_its_documented_error():
  rng = np.random.default_rng(1)
  values = rng.normal(size=200_000)
  q = filtering.StreamingQuantile(capacity=4096, seed=0)
  for chunk in np.array_split(values, 37):
    q.update(chunk)
  kept = (values >= q.keep_threshold(0.7)).mean()
  assert abs(kept - 0.7) < 5 * np.sqrt(0.7 * 0.3 / 4096)


def test_batch_filter_keeps_the_best_and_acceptance_matches_batch_filtering():
  rng = np.random.default_rng(2)
  rho, n = 0.25, 48
  score_fn = lambda b: b['x']
  bf = filtering.BatchFilter(score_fn, rho, n)
  assert bf.source_batch_size == 64
  batches = [{'x': rng.random(64), 'label': np.zeros(64, int)} for _ in range(20)]
  for src, out in zip(batches, bf(iter(batches))):
    assert len(out['x']) == n and out['x'].min() >= np.sort(src['x'])[-n]
  # Survival probability vs a Monte Carlo of batch-level filtering with i.i.d. scores.
  u = np.array([0.1, 0.2, 0.25, 0.3, 0.5])
  others = rng.random((20000, 63))
  empirical = [((others > ui).sum(1) < n).mean() for ui in u]
  np.testing.assert_allclose(filtering.survival_probability(jnp.asarray(u), rho, n), empirical,
                             atol=0.015)
  # Acceptance: about N/M of a stationary stream gets through, and mostly the high scores.
  acc = filtering.AcceptanceFilter(score_fn, rho, n, window=512, seed=0)
  stream = [{'x': rng.random(64), 'label': np.zeros(64, int)} for _ in range(200)]
  out = list(filtering.compose(acc)(iter(stream)))
  assert all(len(b['x']) == n for b in out)
  assert abs(acc.accepted / acc.scored - n / 64) < 0.03
  assert np.mean(np.concatenate([b['x'] for b in out]) > 0.25) > 0.9


def test_batch_filter_policy_trains_on_the_top_scored_fraction():
  class Module:
    def apply(self, params, batch):
      return batch['image'].reshape(batch['image'].shape[0], -1).mean(1) * params
  rater = type('R', (), {'module': Module(), 'params': jnp.float32(1.0),
                         'training_example_gradients': 123})()
  policy = training.batch_filter_policy(rater, rho=0.25)
  image = jnp.asarray(np.random.default_rng(0).random((64, 8, 8, 1)), jnp.float32)
  w = np.asarray(policy.weight_fn(policy.state, None, {'image': image, 'label': jnp.zeros(64, int)}))
  top = np.argsort(-np.asarray(image).mean((1, 2, 3)))[:48]
  assert (w > 0).sum() == 48 and np.all(w[top] == 64 / 48) and np.isclose(w.mean(), 1.0)
  assert policy.gradient_fraction == 0.75 and policy.setup_example_gradients == 123
  with pytest.raises(UserError, match='got 1.0'):
    training.batch_filter_policy(rater, rho=1.0)
