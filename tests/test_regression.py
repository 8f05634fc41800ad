"""A regression task on one's own arrays: scikit-learn's diabetes (442 patients, 10 features),
targets standardised, 15% of the training targets replaced by outliers and recorded in a
`corruption` feature. The task is the researcher's (a test-local module a config file imports, as
the README's own model is); the shipped `mlp_rater` reads the target with the input. What needs
class labels refuses in one line naming the setting; the slow test runs every launcher on it."""
import importlib
import json
import os
import sys

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_diabetes
from sklearn.metrics import roc_auc_score

from configs.digits import get_config
from datarater import tasks
from datarater.data import corruption as corruption_lib
from datarater.data import pipeline
from datarater.data.arrays import write_arrays
from datarater.errors import UserError

MODULE = 'regression_task_for_test'
_TASK = '''
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from datarater import tasks


@dataclasses.dataclass(frozen=True)
class Regressor(tasks.Task):
  """Squared error of an MLP's one output against the target."""
  spec: tasks.FeatureSpec

  def _module(self):
    return nn.Sequential((nn.Dense(16), nn.relu, nn.Dense(1)))

  def init(self, key):
    return self._module().init(key, tasks.example_batch(self.spec)['x'])

  def metrics(self, params, batch):
    error = self._module().apply(params, batch['x'])[:, 0] - batch['target']
    return {'loss': error ** 2, 'abs_error': jnp.abs(error)}

  def per_example_loss(self, params, batch):
    return self.metrics(params, batch)['loss']

  def embed(self, params, batch):
    return nn.relu(nn.Dense(16).apply({'params': params['params']['layers_0']}, batch['x']))


@tasks.register_task('regressor_for_test', schema={})
def regressor(config, info):
  return Regressor(info.spec)
'''
OUTLIERS = 0.15


def diabetes_splits(seed: int = 0) -> dict:
  """300 / 70 / 72 rows; inputs and target standardised on train; OUTLIERS of the training
  targets replaced by +-4..8 (recorded: corruption 1)."""
  d = load_diabetes()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(d.target))
  x, y = d.data[order], d.target[order]
  x = ((x - x[:300].mean(0)) / x[:300].std(0)).astype(np.float32)
  y = ((y - y[:300].mean()) / y[:300].std()).astype(np.float32)
  bad = np.zeros(len(y), int)
  bad[:300] = rng.random(300) < OUTLIERS
  y[bad == 1] = rng.choice([-1, 1], bad.sum()) * rng.uniform(4, 8, bad.sum())
  cut = {'train': slice(0, 300), 'validation': slice(300, 370), 'test': slice(370, None)}
  return {k: {'x': x[s], 'target': y[s], 'corruption': bad[s]} for k, s in cut.items()}


@pytest.fixture(scope='module')
def diabetes(tmp_path_factory):
  """(the splits, their dataset folder, a config file reading it with the test-local task)."""
  root = tmp_path_factory.mktemp('regression')
  splits = diabetes_splits()
  folder = write_arrays(str(root / 'diabetes'), splits, supervised_keys=('x', 'target'),
                        classes={'corruption': ('clean', 'outlier')})
  (root / f'{MODULE}.py').write_text(_TASK)
  (root / 'regression_config.py').write_text(f'''
import ml_collections

import {MODULE}  # registers the task
from configs.digits import get_config as digits


def get_config():
  c = digits()
  c.task = ml_collections.ConfigDict({{'name': 'regressor_for_test'}})
  c.data.dataset_dir, c.data.label_noise = {folder!r}, 0.0
  c.rater.hidden = (64, 64)
  c.inner.batch_size = c.outer.batch_size = c.train.batch_size = 64
  c.outer.steps, c.log_every, c.checkpoint_every = 300, 100, 300
  c.final_eval.num_models, c.final_eval.train_steps = 2, 20
  c.train.epochs, c.train.seeds = 2, (0,)
  v = c.valuation
  v.train_steps, v.checkpoint_every, v.reference_steps, v.dvemb_steps = 60, 20, 40, 20
  c.features.task = ml_collections.ConfigDict({{'name': 'regressor_for_test'}})
  c.features.train_steps, c.sae.steps, c.sae.num_factors = 20, 50, 32
  return c
''')
  sys.path.insert(0, str(root))
  importlib.import_module(MODULE)
  yield splits, folder, str(root / 'regression_config.py')
  sys.path.remove(str(root))
  sys.modules.pop(MODULE, None)
  tasks.registry.TASKS.pop('regressor_for_test', None)


def test_what_needs_class_labels_refuses_a_regression_target_naming_what_to_set(diabetes):
  """Label noise, DVEmb's Gauss-Newton curvature and a classifier in the sae policy's feature
  model each need a class label: one line each, naming the field that turns them off."""
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  _, folder, _ = diabetes
  config = get_config()
  config.data.dataset_dir = folder
  info = pipeline.data_info(pipeline.builder_of(config.data))
  with pytest.raises(UserError, match=r"^label noise needs a class-label target: dataset 'arrays' "
                     r'.* \(plant none: data.label_noise = 0; launch.filter: --label_noise=0\)$'):
    corruption_lib.label_feature(info)
  task = tasks.make_task(ml_collections.ConfigDict({'name': 'regressor_for_test'}), info)
  assert tasks.num_classes(task) is None
  with pytest.raises(UserError, match=r"^valuation.dvemb_curvature='gauss_newton' needs a "
                     r'classification task: task Regressor has no classes; set '
                     r'--config.valuation.dvemb_curvature to exact \(a small model, with '
                     r'valuation.projection=none\) or empirical_fisher$'):
    factory.check_settings('dvemb', config, task)
  with pytest.raises(UserError, match=r"^features.task.name='mlp_classifier' needs an input "
                     r'feature and a class-label feature'):
    tasks.make_task(config.features.task, info, 'features.task')
  rater = tasks.make_rater(config.rater, info)  # digits' rater section, as it is
  assert type(rater).__name__ == 'TargetRater' and rater.label_key == 'target'


@pytest.mark.slow  # a rater run, an export, a filter, 4 valuations, 11 policies: about 1 min
def test_a_regression_task_on_ones_own_arrays_runs_through_every_launcher(diabetes, tmp_path,
                                                                          capsys, monkeypatch):
  """The shipped mlp_rater learns to weigh the outliers down (noise AUROC against sklearn's on the
  record the arrays carry); the rater run's figure and export name the dataset folder it read;
  the filter keeps under half the outliers' share; the valuations and every policy run, reporting
  the task's own metrics (no accuracy)."""
  # pylint: disable=g-import-not-at-top
  from datarater import load_rater, plots, policies
  from launch import cli, export_rater, filter as filter_launcher, train, train_rater, valuate
  splits, folder, config_file = diabetes
  outlier = splits['train']['corruption'] == 1
  titles = []
  draw = plots.save_rater_report
  monkeypatch.setattr(plots, 'save_rater_report',
                      lambda path, *a: titles.append(a[4]) or draw(path, *a))

  def run(module, *argv):
    name = module.__name__.split('.')[-1]
    code = cli.invoke(module, [name, *argv])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return out.out

  run(train_rater, f'--config={config_file}', f'--workdir={tmp_path / "rater"}')
  report = json.loads((tmp_path / 'rater' / 'report.json').read_text())
  assert report['noise_auroc'] > 0.85, report['noise_auroc']
  assert set(report['fresh_models']['rater']['eval']) == {'loss', 'abs_error'}
  assert titles == [f'Rater run on {os.path.realpath(folder)} train, 300 outer steps']
  run(export_rater, f'--workdir={tmp_path / "rater"}', f'--out={tmp_path / "exported"}')
  meta = json.loads((tmp_path / 'exported' / 'rater.json').read_text())
  assert meta['trained_on']['dataset'] == os.path.realpath(folder)
  scores = load_rater(str(tmp_path / 'exported'))(splits['train'])
  assert report['noise_auroc'] == pytest.approx(roc_auc_score(~outlier, scores), abs=1e-6)

  run(filter_launcher, f'--dataset={folder}', f'--rater={tmp_path / "exported"}', '--keep=0.8',
      f'--out={tmp_path / "kept"}')
  kept = json.loads((tmp_path / 'kept' / 'filter_report.json').read_text())['splits']['train']
  assert kept['kept'] == 240 and kept['corrupted'] == outlier.sum()
  assert kept['kept_corrupted'] / kept['kept'] < outlier.mean() / 2  # 3 of 34 kept here

  for method in ('tracin', 'mimic', 'dvemb', 'datarater'):
    flags = {'dvemb': ['--config.valuation.dvemb_curvature=empirical_fisher'],
             'datarater': [f'--config.valuation.rater={tmp_path / "exported"}']}.get(method, [])
    run(valuate, f'--config={config_file}', f'--method={method}',
        f'--workdir={tmp_path / "val"}', *flags)
    table = pq.read_table(tmp_path / 'val' / f'scores_{method}.parquet').to_pydict()
    summary = json.loads((tmp_path / 'val' / f'scores_{method}.json').read_text())
    np.testing.assert_array_equal(table['id'], np.arange(300))
    assert summary['noise_auroc'] == pytest.approx(
        roc_auc_score(~outlier, table['value']), abs=1e-9), method
  inputs = {'rater': f'--rater={tmp_path / "exported"}',
            'scores': f'--scores={tmp_path / "val" / "scores_tracin.parquet"}'}
  for name in sorted(policies.POLICIES):
    flags = [inputs[k] for k in policies.READS[name]]
    if name == 'sae':
      flags.append('--config.sae_scores.class_conditional=false')
    run(train, f'--config={config_file}', f'--policy={name}', f'--workdir={tmp_path / name}',
        *flags)
    final = json.loads((tmp_path / name / 'report.json').read_text())['final']
    assert set(final['eval']) == {'loss', 'abs_error'}, name
    assert np.isfinite(final['eval']['loss']['mean']), name
  # The class-conditional SAE score needs class labels: one line naming the field.
  assert cli.invoke(train, ['train', f'--config={config_file}', '--policy=sae']) == 2
  assert capsys.readouterr().err.strip().endswith(
      'or set --config.sae_scores.class_conditional=false')
