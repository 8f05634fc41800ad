"""Every training policy's weights against their definitions (numpy, brute force), and every
registered policy run end to end through `datarater.train`."""
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from configs.digits import get_config
from datarater import checkpointing, config_checks, export, policies, tasks
from datarater.curation import scores_file
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.meta_train import meta_train
from datarater.policies import filtering, weighting
from datarater.valuation import base
from datarater.train import train
from tests.conftest import digits_data
from tests.run_config import small_config
from tests.tiny import tiny_info


def _softmax_weights(scores, tau):
  z = np.asarray(scores, np.float64) / tau
  e = np.exp(z - z.max())
  return len(z) * e / e.sum()


def _rater_and_batch(n=16):
  rater = tasks.make_rater(ml_collections.ConfigDict(
      {'name': 'mlp_rater', 'hidden': (4,), 'activation': 'tanh'}), tiny_info())
  params = rater.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32), 'index': jnp.arange(n)}
  return rater, params, batch


def test_datarater_weights_are_the_batch_softmax_of_the_scores():
  rater, params, batch = _rater_and_batch()
  policy = weighting.rater_weights(rater, params, 0.5, 100)
  ones = jnp.ones(16)
  got = policy.weigh(policy.aux, (), None, batch, ones)
  scores = np.asarray(rater.score(params, batch))
  np.testing.assert_allclose(got, _softmax_weights(scores, 0.5), rtol=1e-5)
  assert policy.forwards_per_example == 1.0
  # An epoch's last batch, padded: the softmax runs over its real examples only.
  padded = policy.weigh(policy.aux, (), None, batch, ones.at[10:].set(0.0))
  np.testing.assert_allclose(padded[:10], _softmax_weights(scores[:10], 0.5), rtol=1e-5)
  np.testing.assert_array_equal(padded[10:], 0.0)


def test_batch_filter_keeps_exactly_the_best_scored_fraction():
  rater, params, batch = _rater_and_batch(64)
  policy = filtering.batch_filter(rater.score, params, 0.25, 100)
  w = np.asarray(policy.weigh(policy.aux, (), None, batch, jnp.ones(64)))
  scores = np.asarray(rater.score(params, batch))
  top = np.argsort(-scores)[:48]
  assert (w > 0).sum() == 48 and np.allclose(w[top], 64 / 48) and np.isclose(w.mean(), 1.0)
  # Padded: the best floor(0.75 * 40) = 30 of the 40 real examples, weight 40 / 30.
  w = np.asarray(policy.weigh(policy.aux, (), None, batch, jnp.ones(64).at[40:].set(0.0)))
  top = np.argsort(-scores[:40])[:30]
  assert (w > 0).sum() == 30 and np.allclose(w[top], 40 / 30) and not w[40:].any()
  with pytest.raises(UserError, match='got 1.0'):
    filtering.batch_filter(rater.score, params, 1.0, 100)


def test_batch_filter_keeps_floor_of_the_exact_product_under_jit():
  """N = floor((1 - rho) b) in exact decimal arithmetic for every real count b, under jit (in
  float32 the product fell below an integer: 246 of 380 at rho 0.35 instead of 247)."""
  from fractions import Fraction
  # One batch of 700 rows (one compilation per rho), its real count b set by the padding mask:
  # b, b - 1 and 3b/4 for b = 100, 200, 380, 700, and 2 and 1 (a short last batch keeps one).
  batch = {'score': jnp.asarray(np.random.default_rng(0).normal(size=700), jnp.float32)}
  reals = [r for b in (100, 200, 380, 700) for r in (b, b - 1, 3 * b // 4)] + [2, 1]
  for rho in ('0.35', '0.41', '0.47', '0.87'):
    policy = filtering.batch_filter(lambda aux, batch: batch['score'], None, float(rho), 1)
    weigh = jax.jit(lambda b, w, p=policy: p.weigh(None, (), None, b, w))
    for real in reals:
      w = np.asarray(weigh(batch, jnp.asarray(np.arange(700) < real, jnp.float32)))
      kept = max(1, math.floor((1 - Fraction(rho)) * real))
      assert (w > 0).sum() == kept, (rho, real)
      np.testing.assert_allclose(w[w > 0], real / kept, rtol=1e-6)


@pytest.mark.parametrize('batch_size, rho, kept', [
    (4, 0.75, 1), (4, 0.99, 0), (1, 0.2, 0), (1, 0, 1), (128, 0.2, 102), (10, 0.9, 1),
    (10, 0.91, 0), (100, 0.99, 1)])
def test_a_rho_that_would_keep_none_of_a_batch_is_refused(batch_size, rho, kept):
  """The filter keeps at least one per batch, so a rho with floor((1 - rho) B) = 0 would filter
  less than asked: refused; every other rho keeps exactly floor((1 - rho) B)."""
  if kept:
    assert filtering.kept_per_batch(batch_size, rho) == kept
  else:
    with pytest.raises(UserError, match=f'policy.rho={rho} keeps .* = 0 of each batch of '
                                        f'train.batch_size={batch_size}'):
      filtering.kept_per_batch(batch_size, rho)


def test_source_batch_size_is_the_ceiling_of_the_exact_quotient():
  """M = ceil(B / (1 - rho)) in exact decimal arithmetic: in floats 21 / (1 - 0.3) is
  30.000000000000004, whose ceiling (31) would model batches one example too large."""
  from fractions import Fraction
  for rho in ('0.1', '0.25', '0.3', '0.35', '0.6', '0.7', '0.9'):
    for b in range(1, 200):
      want = math.ceil(Fraction(b) / (1 - Fraction(rho)))
      assert filtering.source_batch_size(b, float(rho)) == want, (rho, b)


def _survival_brute_force(u, m, n):
  """P(fewer than n of m - 1 i.i.d. others score higher), each higher with probability 1 - u."""
  return sum(math.comb(m - 1, k) * (1 - u) ** k * u ** (m - 1 - k) for k in range(n))


def test_acceptance_probability_is_the_batch_filter_survival_probability():
  rho, n = 0.25, 48
  m = filtering.source_batch_size(n, rho)
  assert m == 64
  u = np.array([0.05, 0.2, 0.25, 0.3, 0.5, 0.9])
  np.testing.assert_allclose(filtering.survival_probability(jnp.asarray(u), rho, n),
                             [_survival_brute_force(x, m, n) for x in u], rtol=1e-4, atol=1e-6)
  # Inside training: each example is kept at that rate, re-drawn every epoch.
  scores = np.linspace(0.0, 1.0, 400)
  score_fn = lambda params, batch: batch['x']
  policy = filtering.acceptance_filter(score_fn, None, scores, rho, n)
  batch = {'x': jnp.asarray(scores, jnp.float32), 'index': jnp.arange(400)}
  state = policy.init(400, jax.random.key(0))
  weigh = jax.jit(lambda state: policy.weigh(policy.aux, state, None, batch, jnp.ones(400)))
  kept = []
  for _ in range(200):  # (under jit, as training calls it)
    kept.append(np.asarray(weigh(state)) > 0)
    state = policy.update(policy.aux, state, None, None, None)
  rate = np.mean(kept, 0)
  want = np.array([_survival_brute_force(i / 400, m, n) for i in range(400)])
  assert np.abs(rate - want).max() < 5 * np.sqrt(0.25 / 200)
  assert np.isclose(rate.mean(), n / m, atol=0.02)
  # Kept examples share the batch's weight equally; padding (weight 0) is never kept.
  real = jnp.asarray(np.arange(400) < 390, jnp.float32)
  w = np.asarray(policy.weigh(policy.aux, state, None, batch, real), np.float64)
  assert not w[390:].any() and 0 < np.sum(w > 0) < 390
  np.testing.assert_allclose(w[w > 0], 390 / np.sum(w > 0), rtol=1e-6)


def test_table_weights_are_the_softmax_of_standardised_values_or_a_hard_top_fraction():
  values = np.random.default_rng(1).normal(size=50) * 3 + 1
  z = (values - values.mean()) / values.std()
  np.testing.assert_allclose(weighting.curriculum_weights(values, temperature=0.5),
                             _softmax_weights(z, 0.5), rtol=1e-6)
  for power in (530, 1020, -560):  # standardised alike at any scale (overflowed: NaN or all 1)
    scaled = np.ldexp(values, power)
    np.testing.assert_allclose(weighting.curriculum_weights(scaled, temperature=0.5),
                               _softmax_weights(z, 0.5), rtol=1e-6)
  hard = weighting.curriculum_weights(values, 'select', fraction=0.2)
  assert set(np.flatnonzero(hard)) == set(np.argsort(-values)[:10]) and np.isclose(hard.mean(), 1)
  # A half rounds up, as `launch.filter --keep` keeps: 0.25 of 10 is 3 examples of weight 10 / 3.
  hard = weighting.curriculum_weights(values[:10], 'select', fraction=0.25)
  assert set(np.flatnonzero(hard)) == set(np.argsort(-values[:10])[:3])
  np.testing.assert_allclose(hard[hard > 0], 10 / 3)
  policy = weighting.table('t', values)
  got = policy.weigh(policy.aux, (), None, {'index': jnp.array([3, 7, 3])}, jnp.ones(3))
  np.testing.assert_allclose(got, values[[3, 7, 3]], rtol=1e-6)


def test_mimic_weights_follow_the_explicit_per_example_gradients(tfds_dir):
  config = get_config()
  config.data = digits_data(tfds_dir, 0.2)
  config.task.hidden = (8,)
  config.valuation.reference_steps, config.policy.temperature = 20, 0.7
  tr = pipeline.load_split(config.data, 'train', corrupt=True)
  held = pipeline.load_split(config.data, 'validation')
  task = tasks.make_task(config.task, tr.info)
  policy = policies.make_policy('mimic', policies.PolicyContext(tr, held, task, config))
  params = task.init(jax.random.key(5))
  batch = jax.tree.map(jnp.asarray, tr.take(np.arange(12)))
  got = jax.jit(policy.weigh)(policy.aux, (), params, batch, jnp.ones(12))  # as in training
  # Grad-Mimic by hand: u = last layer of (reference - params), normalised; score = <-g_i, u>.
  last = 'dense_1'
  diff = jax.tree.map(jnp.subtract, policy.aux, params)['params'][last]
  u = ravel_pytree(diff)[0]
  u = u / jnp.linalg.norm(u)
  grad = jax.jit(jax.grad(lambda p, one: task.per_example_loss(p, one)[0]))
  g = [ravel_pytree(grad(params, jax.tree.map(lambda x: x[i:i + 1], batch))['params'][last])[0]
       for i in range(12)]
  scores = [-float(gi @ u) for gi in g]
  np.testing.assert_allclose(got, _softmax_weights(scores, 0.7), rtol=1e-4)
  # The reference: valuation.reference_steps of the valuation's SGD on the held-out split (not
  # on the noisy training split); its cost: 300 held-out examples make 5 batches of 64 (the last
  # one of 44), so its 20 steps are 4 passes, 1,200 example-gradients.
  v = config.valuation
  on = lambda split: base.record_run(task, split, steps=20, batch_size=v.batch_size,
                                     learning_rate=v.learning_rate, checkpoint_every=20,
                                     optimizer=v.optimizer, seed=v.seed)[0].final_params
  leaves = lambda tree: ravel_pytree(tree)[0]
  np.testing.assert_allclose(leaves(policy.aux), leaves(on(held)), rtol=1e-5, atol=1e-6)
  assert np.abs(leaves(on(tr)) - leaves(policy.aux)).max() > 1e-3
  assert len(held) == 300 and policy.setup_example_gradients == 4 * 300 and policy.forwards_per_example == 2.0
  config.valuation.mimic_cosine = True  # the cosine variant: <-g_i, u> / ||g_i||
  cos = policies.make_policy('mimic', policies.PolicyContext(tr, held, task, config))
  got = jax.jit(cos.weigh)(cos.aux, (), params, batch, jnp.ones(12))
  np.testing.assert_allclose(
      got, _softmax_weights([s / float(jnp.linalg.norm(gi)) for s, gi in zip(scores, g)], 0.7),
      rtol=1e-4)


def test_online_mimic_refuses_a_loss_that_reads_the_rest_of_the_batch(tfds_dir):
  """As every valuation does: centring inputs on the batch mean (batch norm in training mode)
  makes one example's gradient another model's; refused before the reference is trained."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.data = digits_data(tfds_dir, 0.2)
  tr = pipeline.load_split(config.data, 'train', corrupt=True)
  held = pipeline.load_split(config.data, 'validation')
  mlp = tasks.make_task(config.task, tr.info)

  @dataclasses.dataclass(frozen=True)
  class BatchCentred(type(mlp)):
    def per_example_loss(self, params, batch):
      return super().per_example_loss(
          params, {**batch, 'image': batch['image'] - batch['image'].mean(0)})

  centred = BatchCentred(**{f.name: getattr(mlp, f.name) for f in dataclasses.fields(mlp)})
  with pytest.raises(UserError, match="an example's loss depends on the rest of its batch"):
    policies.make_policy('mimic', policies.PolicyContext(tr, held, centred, config))


# The tests that read `trained` stay on one pytest-xdist worker, which runs it once.
TRAINED = pytest.mark.xdist_group('policies_trained')


@pytest.fixture(scope='module')
def trained(tfds_dir, tmp_path_factory):
  """A 4-step rater run (on 1 device), its export, and a scores file for the training split."""
  base = tmp_path_factory.mktemp('policies')
  meta_train(small_config(tfds_dir, steps=4), str(base / 'run'), devices=jax.devices()[:1])
  export.export_rater(str(base / 'run'), str(base / 'rater'))
  values = np.random.default_rng(2).normal(size=1197)
  scores_file.write(str(base / 'scores.parquet'), np.arange(1197), -values, values,
                    dataset='sklearn_digits', split='train', example_gradients=777)
  return base, values


@TRAINED
def test_every_registered_policy_trains_through_the_launcher_path(tfds_dir, trained):
  base, values = trained
  config = get_config()
  config.data = digits_data(tfds_dir, 0.2)
  config.task.hidden = (16,)
  config.train.epochs, config.train.seeds = 1, (0,)
  config.valuation.train_steps, config.valuation.checkpoint_every = 20, 10
  config.valuation.reference_steps = 20
  config.features.extractor = 'pixels'  # the trained extractor is tested in test_sae
  config.sae.steps, config.sae.num_factors = 50, 32
  names = sorted(policies.POLICIES)
  assert {'uniform', 'datarater', 'datarater_batch_filter', 'datarater_accept', 'scores',
          'tracin_curriculum', 'mimic', 'full', 'random', 'infobatch', 'sae'} <= set(names)
  grads = {}
  inputs = {'rater': str(base / 'rater'), 'scores': str(base / 'scores.parquet')}
  # What making each policy cost: the rater's training (as its export records it), the scores
  # file's writer (777); and its forward passes per example drawn (1197 drawn in the one epoch).
  rater_cost = export.load_rater(str(base / 'rater')).training_example_gradients
  assert rater_cost > 0
  setup = {'datarater': rater_cost, 'datarater_batch_filter': rater_cost,
           'datarater_accept': rater_cost, 'scores': 777}
  forwards = {'datarater': 1, 'datarater_batch_filter': 1, 'datarater_accept': 1, 'mimic': 2}
  for name in names:
    report = train(config, name, **{k: v for k, v in inputs.items() if k in policies.READS[name]},
                   log=lambda line: None)
    assert 0.0 <= report['final']['eval']['accuracy']['mean'] <= 1.0, name
    grads[name] = report['example_gradients']
    assert report['setup_forwards'] == (1197 if name == 'datarater_accept' else 0), name
    assert report['scoring_forwards'] == forwards.get(name, 0) * 1197, name
    if name in setup:
      assert report['setup_example_gradients'] == setup[name], name
    assert report['total_example_gradients'] == (report['example_gradients']
                                                 + report['setup_example_gradients']), name
  assert grads['uniform'] == grads['full'] == 1197
  assert grads['datarater_batch_filter'] < 1197 and grads['random'] == round(0.7 * 1197)
  # The scores policy's weights: n softmax(z / temperature) of the file's standardised values.
  config.policy.temperature = 0.37
  made = policies.make_policy('scores', policies.PolicyContext(
      pipeline.load_split(config.data, 'train', corrupt=True), None, None, config,
      scores=str(base / 'scores.parquet')))
  np.testing.assert_allclose(made.aux, _softmax_weights((values - values.mean()) / values.std(),
                                                        0.37), rtol=1e-5)


def test_tracin_curriculum_weighs_mislabelled_examples_down(tfds_dir):
  """Weights of mean 1 that rank the clean digits above the 20% mislabelled (AUROC counted by
  pairs); a curriculum of reversed values would rank them below."""
  config = get_config()
  config.data = digits_data(tfds_dir, 0.2)
  config.task.hidden = (16,)
  config.valuation.train_steps, config.valuation.checkpoint_every = 200, 50
  tr = pipeline.load_split(config.data, 'train', corrupt=True)
  task = tasks.make_task(config.task, tr.info)
  made = policies.make_policy('tracin_curriculum', policies.PolicyContext(
      tr, pipeline.load_split(config.data, 'validation'), task, config))
  w = np.asarray(made.aux, np.float64)
  clean, bad = w[~tr.is_corrupted], w[tr.is_corrupted]
  pairs = (clean[:, None] > bad[None, :]).mean() + 0.5 * (clean[:, None] == bad[None, :]).mean()
  assert pairs > 0.75 and np.isclose(w.mean(), 1.0), (pairs, w.mean())
  assert made.setup_example_gradients > 0


@pytest.mark.parametrize('name', ['tracin_curriculum', 'mimic'])
@pytest.mark.parametrize('field, value', [('store', True), ('topk', 5)])
def test_a_policy_that_values_the_split_itself_refuses_launch_valuates_outputs(
    monkeypatch, name, field, value):
  """`valuation.store` and `valuation.topk` are launch.valuate's (a gradient store, a top-k
  table): these policies value the split without them, so a run given them trained on values
  computed otherwise, silently. Refused in one line before any fit."""
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  def fitted(*args, **kwargs):
    raise AssertionError('the policy began to value the split')
  for fn in ('build', 'check_per_example', 'mimic_reference'):
    monkeypatch.setattr(factory, fn, fitted)
  config = get_config()
  config.valuation[field] = value
  with pytest.raises(UserError, match=rf'policy {name} computes its values without '
                     rf'valuation.{field} .*launch.valuate --method='):
    policies.make_policy(name, policies.PolicyContext(None, None, None, config))


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['self', 'heldout_cos'])
def test_tracin_curriculum_is_launch_valuate_then_the_scores_policy(tfds_dir, tmp_path, mode):
  """The README's claim: with one config, `tracin_curriculum`'s weights (and cost) equal those of
  `--policy=scores` reading `launch.valuate --method=tracin`'s scores file (its streamed blocks,
  its own held-out split)."""
  from datarater.valuation.run import valuate  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.data = digits_data(tfds_dir, 0.2)
  config.task.hidden = (16,)
  config.valuation.train_steps, config.valuation.checkpoint_every = 20, 10
  config.valuation.tracin_mode, config.policy.temperature = mode, 0.7
  summary = valuate('tracin', config, str(tmp_path), progress=False)
  tr = pipeline.load_split(config.data, 'train', corrupt=True)
  heldout = pipeline.load_split(config.data, config.data.heldout_split)
  task = tasks.make_task(config.task, tr.info)
  made = {name: policies.make_policy(name, policies.PolicyContext(
      tr, heldout, task, config, scores=summary['scores_file'] if name == 'scores' else ''))
          for name in ('tracin_curriculum', 'scores')}
  np.testing.assert_allclose(made['tracin_curriculum'].aux, made['scores'].aux, rtol=1e-5)
  assert (made['tracin_curriculum'].setup_example_gradients ==
          made['scores'].setup_example_gradients == summary['example_gradients'])


@TRAINED
def test_a_rater_checks_the_data_it_scores_wherever_it_is_used(tfds_dir, trained, tmp_path,
                                                                monkeypatch):
  """The rater's own check_data (e.g. an LM rater's vocabulary) runs on the examples it scores in
  launch.train's rater policies (in memory and streamed), valuate --method=datarater and the
  filter, not only in train_rater; here it refuses every example."""
  from datarater.curation.filter import filter_dataset  # pylint: disable=g-import-not-at-top
  from datarater.valuation.run import valuate  # pylint: disable=g-import-not-at-top
  base, _ = trained
  seen = []
  def refuse(self, features):
    seen.append(len(next(iter(features.values()))))
    raise UserError('refused by the rater')
  monkeypatch.setattr(type(export.load_rater(str(base / 'rater')).rater), 'check_data', refuse)
  config = get_config()
  config.data = digits_data(tfds_dir, 0.2)
  config.task.hidden = (16,)
  config.train.epochs, config.train.seeds = 1, (0,)
  for name in ('datarater', 'datarater_batch_filter', 'datarater_accept'):
    for stream in (False, True):
      config.train.stream = stream
      with pytest.raises(UserError, match='refused by the rater'):
        train(config, name, rater=str(base / 'rater'), log=lambda line: None)
  config.train.stream = False
  config.valuation.rater = str(base / 'rater')
  with pytest.raises(UserError, match='refused by the rater'):
    valuate('datarater', config, str(tmp_path / 'valuate'), progress=False)
  with pytest.raises(UserError, match='refused by the rater'):
    filter_dataset('sklearn_digits', str(tmp_path / 'filtered'), ['train'],
                   rater=str(base / 'rater'), keep=0.5, data_dir=tfds_dir)
  assert len(seen) == 8 and not (tmp_path / 'filtered').exists()


def test_unknown_policy_and_missing_inputs_are_user_errors(tfds_dir):
  config = get_config()
  config.data = digits_data(tfds_dir)
  tr = pipeline.load_split(config.data, 'train')
  ctx = policies.PolicyContext(tr, tr, None, config)
  with pytest.raises(UserError, match="unknown policy 'nope'"):
    policies.make_policy('nope', ctx)
  with pytest.raises(UserError, match='needs --rater'):
    policies.make_policy('datarater', ctx)
  with pytest.raises(UserError, match='needs --scores'):
    policies.make_policy('scores', ctx)
  del config.policy  # another launcher's config (bench sizings): launch.train raised AttributeError
  with pytest.raises(UserError, match='the config has no policy section: give --policy'):
    train(config)


def test_an_input_is_given_only_to_the_policies_that_read_it():
  readers = lambda field: {p for p, reads in policies.READS.items() if field in reads}
  assert readers('rater') == {'datarater', 'datarater_batch_filter', 'datarater_accept'}
  assert readers('scores') == {'scores'}
  assert set(policies.READS) == set(policies.POLICIES)
  policies.check_inputs('datarater', rater='r', scores='')
  policies.check_inputs('uniform', rater='', scores='')
  with pytest.raises(UserError, match=r"--rater is read only by policies datarater, "
                     r"datarater_batch_filter, datarater_accept \(policy is 'sae'\)"):
    policies.check_inputs('sae', rater='r')
  with pytest.raises(UserError, match=r"--scores is read only by policy scores \(policy is "
                     r"'datarater_accept'\)"):
    policies.check_inputs('datarater_accept', rater='r', scores='s')


def test_a_policy_field_set_for_a_policy_that_ignores_it_is_refused():
  """`--config.policy.rho=0.3` with infobatch, or `policy.temperature` with the datarater
  policy (which keeps the rater's own), trained on silently without them (launch.train's
  `check_flags` refuses them before any work: test_bad_input, test_commands)."""
  read = {'rho': {'datarater_batch_filter', 'datarater_accept'},
          'temperature': {'scores', 'tracin_curriculum', 'mimic'},
          'ratio': {'random', 'infobatch', 'sae'}, 'max_prune_prob': {'infobatch'}}
  for name in policies.POLICIES:
    for field, readers in read.items():
      if name in readers:
        policies.check_fields(name, ('policy.name', f'policy.{field}', 'train.epochs'))
      else:
        with pytest.raises(UserError, match=rf'--config.policy.{field} is not read by policy '
                                            rf'{name} \(.*{field} is read by '):
          policies.check_fields(name, ('train.epochs', f'policy.{field}'))


@pytest.mark.parametrize('name, method', [('tracin_curriculum', 'tracin'), ('mimic', 'mimic')])
def test_a_valuation_field_a_policy_that_values_the_split_ignores_is_refused(name, method):
  """tracin_curriculum and mimic read `valuation` as their method does, in part: a field that
  `factory.reads` gives to other methods alone, or one launch.valuate alone reads (how it
  scores in blocks, its store's size, Mimic's offline keep decision; online Mimic records no run
  but its reference's), trained on silently without it; refused (launch.train's `check_flags`)."""
  from datarater.config_checks import SECTIONS  # pylint: disable=g-import-not-at-top
  from datarater.valuation.factory import reads  # pylint: disable=g-import-not-at-top
  others = [f for f in SECTIONS['valuation'] if not reads(method, f)]
  valuate_only = {'tracin': ['score_batch_size', 'store_k'],
                  'mimic': ['score_batch_size', 'store_k', 'mimic_keep_fraction', 'train_steps',
                            'checkpoint_every', 'chunk_size']}[method]
  assert others and not set(valuate_only) & set(others)
  for field in others + valuate_only:
    with pytest.raises(UserError, match=rf'--config.valuation.{field} is not read by policy '
                                        rf'{name} \(it reads valuation.batch_size'):
      policies.check_fields(name, ('policy.temperature', f'valuation.{field}'))
  read = {'tracin': ['tracin_mode', 'train_steps', 'layers'],
          'mimic': ['mimic_layers', 'mimic_cosine', 'reference_steps']}[method]
  policies.check_fields(name, ('policy.temperature', 'valuation.seed',
                               *[f'valuation.{f}' for f in read]))


def test_online_filters_by_hand():
  """Batch filter, B = 10 real examples (and 2 of padding), rho = 0.25: the best floor(7.5) = 7
  kept, each weighted 10 / 7 (the batch's total weight stays B). Acceptance: the survival
  probability at the fraction of reference scores below an example's, a score the reference
  holds twice taking either rank (reference [0, 1, 1, 2], score 1 -> the mean at 1/4 and 2/4),
  and draws that follow the example's id: the same examples in another order are accepted
  alike."""
  scores_of = lambda aux, batch: batch['s']
  s = np.random.default_rng(0).permutation(10).astype(np.float32)
  batch = {'s': jnp.asarray(np.r_[s, 99.0, 99.0]), 'index': jnp.arange(12)}
  weights = jnp.asarray(np.r_[np.ones(10), 0.0, 0.0], jnp.float32)
  kept = filtering.batch_filter(scores_of, None, 0.25, 100)
  got = np.asarray(kept.weigh(kept.aux, (), None, batch, weights))
  np.testing.assert_allclose(got, np.r_[np.where(s >= 3, 10 / 7, 0.0), 0.0, 0.0], rtol=1e-6)

  real_survival = filtering.survival_probability
  ties = filtering.acceptance_filter(scores_of, None, np.array([0.0, 1.0, 1.0, 2.0]), 0.25, 10)
  got = filtering.acceptance_probability(ties.aux, jnp.asarray([0.0, 1.0, 2.0, 3.0]), 0.25, 10)
  m = filtering.source_batch_size(10, 0.25)
  want = [_survival_brute_force(u, m, 10) for u in (0.0, 0.25, 0.5, 0.75, 1.0)]
  np.testing.assert_allclose(got, [want[0], (want[1] + want[2]) / 2, want[3], want[4]],
                             rtol=1e-4, atol=1e-6)

  accept = filtering.acceptance_filter(scores_of, None, np.arange(100.0), 0.25, 10)
  assert 0.2 < float(real_survival(jnp.float32(0.3), 0.25, 10)) < 0.8  # mixed decisions
  state = accept.init(100, jax.random.key(1))
  ids = np.arange(40, 80)
  order = np.random.default_rng(1).permutation(40)
  weigh = lambda idx: np.asarray(jax.jit(accept.weigh)(accept.aux, state, None, {
      's': jnp.full(40, 30.0), 'index': jnp.asarray(idx)}, jnp.ones(40)))
  straight, shuffled = weigh(ids), weigh(ids[order])
  assert 0 < (straight > 0).sum() < 40
  np.testing.assert_array_equal(shuffled, straight[order])  # example ids[order[j]] at position j


def test_acceptance_of_tied_scores_is_the_mean_survival_over_their_ranks():
  """Batch-level filtering orders equal scores at random, so an example tied with others survives
  with the mean of the survival probabilities at their ranks (float64, by the binomial sum), and
  the expected number kept does not depend on ties. A rater scoring every example alike (a
  collapsed one) kept none (every example at rank 0); now ~B/M of each batch, as the batch filter
  keeps."""
  rho, b, n = 0.2, 16, 100
  m = filtering.source_batch_size(b, rho)
  by_rank = np.array([_survival_brute_force(r / n, m, b) for r in range(n)])
  same = np.zeros(n, np.float32)
  policy = filtering.acceptance_filter(lambda aux, batch: batch['s'], None, same, rho, b)
  batch = {'s': jnp.asarray(same), 'index': jnp.arange(n)}
  weigh = jax.jit(lambda state: policy.weigh(policy.aux, state, None, batch, jnp.ones(n)) > 0)
  state = policy.init(n, jax.random.key(0))
  kept = []
  for _ in range(50):
    kept.append(np.asarray(weigh(state)))
    state = policy.update(policy.aux, state, None, None, None)
  assert abs(by_rank.mean() - b / m) < 0.01
  assert abs(np.mean(kept) - by_rank.mean()) < 0.02, np.mean(kept)

  rng = np.random.default_rng(0)
  scores = rng.permutation(np.r_[np.full(40, 3.0), 1.0, np.full(25, 2.0), np.full(14, 5.0),
                                 rng.normal(size=20)]).astype(np.float32)
  order = np.sort(scores)
  want = [by_rank[np.searchsorted(order, s, 'left'):np.searchsorted(order, s, 'right')].mean()
          for s in scores]
  policy = filtering.acceptance_filter(lambda aux, batch: batch['s'], None, scores, rho, b)
  got = np.asarray(filtering.acceptance_probability(policy.aux, jnp.asarray(scores), rho, b))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.sum(), by_rank.sum(), rtol=1e-4)


def test_the_config_sections_a_policy_registers_are_checked_before_any_work(tfds_dir):
  """A policy of one's own that reads `valuation` (as tracin_curriculum does) had that section
  unchecked: a misspelt field was ignored and the run went on with the default."""
  made = []
  policies.register_policy('reads_valuation_for_test', sections=('valuation',))(
      lambda ctx: made.append(1) or policies.POLICIES['uniform'](ctx))
  try:
    config = get_config()
    config.data = digits_data(tfds_dir)
    with config.valuation.unlocked():
      config.valuation.train_step = 20  # train_steps misspelt
    with pytest.raises(UserError, match='unknown config field valuation.train_step'):
      train(config, 'reads_valuation_for_test', log=lambda line: None)
    assert not made
  finally:
    for table in (policies.POLICIES, policies.READS, policies.SECTIONS, policies.FIELDS,
                  policies.SCHEMAS):
      table.pop('reads_valuation_for_test')


_OWN_POLICY = '''
import jax
from datarater import policies
from datarater.config_checks import default, number

SEEN = []  # the temperature each factory call read


@policies.register_policy('loss_tempered_for_test',
                          schema={'loss_temperature': default(number(0, lo_open=True), 2.0)})
def make(ctx):
  tau = ctx.config.policy.loss_temperature
  SEEN.append(tau)

  def weigh(aux, state, params, batch, weights):
    losses = jax.lax.stop_gradient(ctx.task.per_example_loss(params, batch))
    return weights * jax.nn.softmax(losses / tau, where=weights > 0) * (weights > 0).sum()
  return policies.base.weighting_policy('loss_tempered_for_test', len(ctx.train), weigh)
'''


@pytest.fixture
def own_policy(tmp_path, tfds_dir, monkeypatch):
  """A policy with a setting of its own, registered by a module outside the package that a
  config file imports (as the README's own model is): (that module, the config file)."""
  import importlib  # pylint: disable=g-import-not-at-top
  (tmp_path / 'own_policy_for_test.py').write_text(_OWN_POLICY)
  (tmp_path / 'own_policy_config.py').write_text(
      'import own_policy_for_test\nfrom configs.digits import get_config as digits\n\n'
      'def get_config():\n  c = digits()\n'
      f'  c.data.data_dir = {tfds_dir!r}\n  c.task.hidden = (8,)\n'
      '  c.train.epochs, c.train.seeds, c.train.batch_size = 1, (0,), 600\n  return c\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  module = importlib.import_module('own_policy_for_test')
  yield module, str(tmp_path / 'own_policy_config.py')
  for table in (policies.POLICIES, policies.READS, policies.SECTIONS, policies.FIELDS,
                policies.SCHEMAS):
    table.pop('loss_tempered_for_test')
  sys.modules.pop('own_policy_for_test')


def test_a_policy_of_ones_own_declares_its_fields_in_one_module(own_policy, capsys, tmp_path):
  """A policy with a setting of its own is one module: its field's check and default come with
  its registration (no edit of config_checks, configs/digits.py or checkpointing.ADDED_FIELDS):
  set on the command line, bad or misspelt values refused in one line, refused for another
  policy naming its reader, listed by --help for it alone, and a checkpoint recorded before the
  field existed still matches a config that holds it at its default."""
  from launch import cli, train as train_launcher  # pylint: disable=g-import-not-at-top
  module, config_file = own_policy
  run = lambda *flags: cli.invoke(train_launcher, [
      'train', f'--config={config_file}', '--policy=loss_tempered_for_test', *flags])
  assert run('--config.policy.loss_temperature=0.5') == 0  # one epoch of 2 steps
  assert module.SEEN == [0.5]
  for clash in (3.0, 2.0):  # another default; the same default with a check of its own
    with pytest.raises(ValueError, match='one field, one entry'):  # one name, one concept
      policies.register_policy('clash_for_test', schema={
          'loss_temperature': config_checks.default(config_checks.number(0), clash)})(module.make)
  assert 'clash_for_test' not in policies.POLICIES
  capsys.readouterr()
  for flag, line in (('--config.policy.loss_temperature=-1.0',
                      'error: policy.loss_temperature must be > 0, got -1.0\n'),
                     ('--config.policy.loss_temprature=1.0',
                      "error: unknown config field 'loss_temprature' (did you mean "
                      "'loss_temperature'?): --config.policy.loss_temprature\n")):
    assert run(flag) == 2
    assert capsys.readouterr().err == line
  assert module.SEEN == [0.5]  # refused before the policy was made
  assert cli.invoke(train_launcher, ['train', f'--config={config_file}', '--policy=uniform',
                                     '--config.policy.loss_temperature=1.0']) == 2
  assert capsys.readouterr().err == (
      'error: --config.policy.loss_temperature is not read by policy uniform (it reads no other '
      'policy field; loss_temperature is read by loss_tempered_for_test)\n')
  for name, listed in (('loss_tempered_for_test', True), ('uniform', False)):
    assert run(f'--policy={name}', '--help') == 0
    assert ('--config.policy.loss_temperature=2.0' in capsys.readouterr().out) == listed, name
  # A config without the field (a script's): its default; a checkpoint's record without it too.
  config = get_config()
  assert 'loss_temperature' not in config.policy
  filled = policies.with_defaults(config)
  assert filled.policy.loss_temperature == 2.0 and 'loss_temperature' not in config.policy
  policies.start_policy('loss_tempered_for_test', policies.PolicyContext(  # from Python
      train=range(4), heldout=None, task=None, config=config))
  assert module.SEEN[-1] == 2.0
  older = checkpointing.trajectory_fields(config)
  ours = checkpointing.trajectory_fields(filled)
  added = policies.defaults('loss_tempered_for_test')
  assert checkpointing.config_differences(older, ours, added=added) == []
  assert checkpointing.config_differences(older, ours) == [
      'policy.loss_temperature=(not recorded) there, 2.0 here']
  filled.policy.loss_temperature = 3.0
  assert checkpointing.config_differences(older, checkpointing.trajectory_fields(filled),
                                          added=added)
