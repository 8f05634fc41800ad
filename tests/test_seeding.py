"""Components given the same seed draw from different keys: a rater run's initial rater, the
trainer's model of that seed, a valuation's recorded run and the selection feature extractor start
from different parameters, and the SAE's initialisation and minibatches are not the extractor's
initialisation and data order. Read off the real call paths (meta_train's fresh state, the
Trainer each component builds, the key sae_codes hands the SAE), before any step is compiled."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits import get_config
from datarater import features, meta_train, sae, tasks, trainer
from datarater.data import pipeline
from datarater.policies import selection
from datarater.policies.base import PolicyContext, weighting_policy
from datarater.valuation import base as valuation_base
from inner_loop import make_inner_optimizer
from outer_loop import setup
from tests.conftest import digits_data

SEED = 1


class _Started(Exception):
  """Raised by the spies: what a component was about to start from."""

  def __init__(self, what):
    super().__init__()
    self.what = what


def _first_model(monkeypatch, make_run):
  """(initial parameters, data-order key) of the first model of the Trainer `make_run` runs
  (its init, not compiled: the trainers of the tests share its op-by-op programs)."""
  def run(self, train, evals, seeds, **kwargs):
    params = trainer.initial_params(self.task, seeds, self.purpose, self.devices)
    state, order_keys = self._init_all(params, jnp.asarray(seeds, jnp.int32), len(train))
    raise _Started((jax.tree.map(lambda x: x[0], state.models.params), order_keys[0]))
  with monkeypatch.context() as m:
    m.setattr(trainer.Trainer, 'run', run)
    with pytest.raises(_Started) as started:
      make_run()
  return started.value.what


def _named(params) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(x).ravel()
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _shared_draws(a, b) -> list[str]:
  """Parameters of the same name whose leading values are equal and not all zero (one key drawn
  at two shapes gives the same leading values): draws of one key."""
  a, b = _named(a), _named(b)
  return [name for name in sorted(a.keys() & b.keys())
          if np.any(a[name][:b[name].size] != 0)
          and np.array_equal(a[name][:b[name].size], b[name][:a[name].size])]


@pytest.fixture(scope='module')
def setting(tfds_dir):
  c = get_config()
  c.data = digits_data(tfds_dir)
  c.seed = c.valuation.seed = c.features.seed = SEED
  c.task.hidden = c.rater.hidden = (16,)  # the rater's shapes are the task's, as in digits.py
  c.features.task.hidden = (8,)
  c.inner.population = 2
  train = pipeline.load_split(c.data, 'train')
  task = tasks.make_task(c.task, train.info)
  with pytest.MonkeyPatch.context() as monkeypatch:
    trained, _ = _first_model(monkeypatch, lambda: trainer.Trainer(
        task, make_inner_optimizer('adam', 1e-3), weighting_policy('uniform', len(train)), 32).run(
            train, {}, [SEED], steps=1))
  return c, train, task, trained


def test_rater_trainer_and_valuation_models_of_one_seed_start_apart(setting, monkeypatch):
  c, train, task, trained = setting
  valued, _ = _first_model(monkeypatch, lambda: valuation_base.record_run(
      task, train, steps=1, batch_size=32, learning_rate=0.1, checkpoint_every=1, seed=SEED))
  assert not _shared_draws(trained, valued)
  problem, _ = setup.build_problem(c, train.info)
  rater = jax.jit(lambda: meta_train.fresh_state(c, problem).rater_params)()
  assert _named(rater).keys() == _named(trained).keys()  # the same shapes
  assert not _shared_draws(rater, trained)
  assert not _shared_draws(rater, valued)


def test_the_sae_and_its_feature_extractor_draw_apart(setting, monkeypatch):
  c, train, task, trained = setting
  extractor, order_key = _first_model(
      monkeypatch, lambda: features.train_feature_model(train, c.features))
  assert not _shared_draws(trained, extractor)  # bench.selection: features.seed = model seed

  def train_sae(feats, config, key):
    raise _Started(key)
  monkeypatch.setattr(features, 'default_features', lambda split, config: (np.ones((4, 3)), 0))
  monkeypatch.setattr(sae, 'train_sae', train_sae)
  with pytest.raises(_Started) as started:
    selection.sae_codes(PolicyContext(train, None, task, c), c.features.seed)
  init_key, data_key = sae._split(started.value.what)  # as train_sae splits it
  assert not np.array_equal(jax.random.key_data(data_key), jax.random.key_data(order_key))
  # The SAE's initialisation key, given to the extractor, would give the extractor's parameters.
  feature_task = tasks.make_task(c.features.task, train.info, 'features.task')
  assert not _shared_draws(feature_task.init(init_key), extractor)
