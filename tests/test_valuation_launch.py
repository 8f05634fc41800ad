"""launch.valuate end to end on the digits: one row per training example keyed by id, errors."""
import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from configs.digits import get_config
from datarater import export
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.meta_train import meta_train
from datarater.valuation.run import valuate
from tests.conftest import digits_data
from tests.run_config import small_config as small_rater_config


def small_config(tfds_dir):
  c = get_config()
  c.data = digits_data(tfds_dir, 0.2)
  v = c.valuation
  v.train_steps, v.checkpoint_every, v.reference_steps, v.dvemb_steps = 20, 10, 20, 6
  v.batch_size = 32
  return c


# The tests that read small_config's TracIn or Mimic valuation share one run of each (`exact`),
# on one pytest worker.
SHARED = pytest.mark.xdist_group('valuation_launch_exact')


@pytest.fixture(scope='module')
def exact(tfds_dir, tmp_path_factory):
  """method -> (summary, workdir) of valuate(method, small_config(tfds_dir)), run on first use.
  Its tests only read the workdir."""
  root, done = tmp_path_factory.mktemp('exact'), {}

  def get(method):
    if method not in done:
      work = root / method
      done[method] = valuate(method, small_config(tfds_dir), str(work), progress=False), work
    return done[method]
  return get


def long_config(tfds_dir, method, mode='self'):
  """small_config with a run long enough to fit the clean digits (DVEmb's on a narrower MLP)."""
  config = small_config(tfds_dir)
  v = config.valuation
  v.train_steps, v.checkpoint_every, v.reference_steps, v.dvemb_steps = 120, 30, 200, 120
  v.tracin_mode = mode
  if method == 'dvemb':
    config.task.hidden = (8,)
  return config


# The tests that read long_config's DVEmb valuation share one run (`long_runs`), on one worker.
LONG = pytest.mark.xdist_group('valuation_launch_long')


@pytest.fixture(scope='module')
def long_runs(tfds_dir, tmp_path_factory):
  """(method, mode) -> (summary, workdir) of valuate(method, long_config(...)), run on first
  use. Its tests only read the workdir."""
  root, done = tmp_path_factory.mktemp('long'), {}

  def get(method, mode):
    if (method, mode) not in done:
      work = root / f'{method}-{mode}'
      done[method, mode] = valuate(method, long_config(tfds_dir, method, mode), str(work),
                                   progress=False), work
    return done[method, mode]
  return get


@pytest.mark.parametrize('method', [pytest.param('tracin', marks=SHARED),
                                    pytest.param('mimic', marks=SHARED),
                                    pytest.param('dvemb', marks=LONG)])
def test_valuate_writes_one_score_per_example(tfds_dir, exact, long_runs, method):
  if method == 'dvemb':  # long_config's, shared with the planted-noise test
    config = long_config(tfds_dir, method)
    summary, work = long_runs(method, 'self')
  else:  # small_config's TracIn or Mimic, shared
    config = small_config(tfds_dir)
    summary, work = exact(method)
  table = pq.read_table(os.path.join(work, f'scores_{method}.parquet')).to_pydict()
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  np.testing.assert_array_equal(table['id'], train.ids)
  np.testing.assert_array_equal(table['corruption'], train.corruption)
  sign = 1 if summary['higher_is_better'] else -1
  np.testing.assert_allclose(table['value'], sign * np.asarray(table['score']))
  assert np.isfinite(table['score']).all() and np.std(table['score']) > 0
  value, noisy = np.asarray(table['value'], np.float64), np.asarray(table['corruption']) != 0
  clean, bad = value[~noisy], value[noisy]  # the reported AUROC, by counting pairs
  pairs = (clean[:, None] > bad[None, :]).mean() + 0.5 * (clean[:, None] == bad[None, :]).mean()
  assert summary['noise_auroc'] == pytest.approx(pairs, abs=1e-9)
  assert summary['auroc_by_kind'] == {'label_symmetric': pytest.approx(pairs, abs=1e-9)}
  # Counted by hand: the recorded run's 20 steps x batch 32, then per example one gradient (or
  # JVP) at each of its 2 checkpoints (steps 10, 20); Mimic's reference run of 20 steps on the
  # 300 held-out examples is 2 passes of 10 batches, the last of 12; DVEmb's run (long_config)
  # of 120 steps, 3 passes of 38 batches over the 1197 (the last of 13) and 6 of 32, with one
  # gradient per example and step plus one per class (Gauss-Newton, 10 classes).
  assert summary['example_gradients'] == {'tracin': 20 * 32 + 2 * len(train),
                                          'mimic': 20 * 32 + 2 * 300 + 2 * len(train),
                                          'dvemb': (3 * len(train) + 6 * 32) * (2 + 10)}[method]
  assert not [f for f in os.listdir(work) if 'tmp' in f]
  if method == 'tracin':  # the file's scores are each example's self-influence, by hand:
    # sum over the recorded run's checkpoints c of lr_c |grad loss(theta_c; x_i, y_i)|^2, with
    # the planted (corrupted) label, a batch of one at a time, for examples in the first, a
    # middle and the last, short block (1197 = 4 x 256 + 173).
    import glob  # pylint: disable=g-import-not-at-top
    import pickle  # pylint: disable=g-import-not-at-top
    from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top
    from datarater import tasks  # pylint: disable=g-import-not-at-top
    (fit,) = glob.glob(os.path.join(work, 'fit', 'run-*.pkl'))
    with open(fit, 'rb') as f:
      run, _ = pickle.load(f)
    task = tasks.make_task(config.task, train.info)
    grad = jax.jit(jax.grad(lambda p, ex: task.per_example_loss(p, ex)[0]))
    positions = [0, 255, 600, 1024, 1100, len(train) - 1]
    want = [sum(float(run.step_lrs[int(run.checkpoint_steps[c])]) * float(
        np.sum(ravel_pytree(grad(run.checkpoint(c), train.take([i])))[0] ** 2))
                for c in range(run.num_checkpoints)) for i in positions]
    np.testing.assert_allclose(np.asarray(table['score'])[positions], want, rtol=1e-4)
    # launch.train's scores policy counts what made the scores it reads
    from datarater import policies  # pylint: disable=g-import-not-at-top
    made = policies.make_policy('scores', policies.PolicyContext(
        train, None, None, config, scores=summary['scores_file']))
    assert made.setup_example_gradients == summary['example_gradients']
  if method == 'mimic':  # the filter keeps exactly the examples valued at or above its threshold
    from datarater import tasks  # pylint: disable=g-import-not-at-top
    params = jax.eval_shape(tasks.make_task(config.task, train.info).init, jax.random.key(0))
    assert summary['layers'] == [n for n, p in params['params'].items()  # the 10-class head
                                 if p['kernel'].shape[-1] == 10]
    np.testing.assert_array_equal(table['keep'],
                                  np.asarray(table['value']) >= summary['keep_threshold'])
    assert 0 < summary['kept'] < len(table['id'])


@pytest.mark.parametrize('method,mode,floor', [('tracin', 'self', 0.9), ('tracin', 'heldout', 0.6),
                                               ('mimic', 'self', 0.9),
                                               pytest.param('dvemb', 'self', 0.75, marks=LONG)])
def test_values_point_the_right_way_on_planted_label_noise(long_runs, method, mode, floor):
  """Higher value = more useful: after a run long enough to fit the clean digits
  (long_config), the mislabelled 20% get lower values (AUROC by pairwise counts on the written
  file), for each method and TracIn mode. A flipped `higher_is_better` gives 1 - AUROC, under
  0.4 here."""
  summary, work = long_runs(method, mode)
  table = pq.read_table(os.path.join(work, f'scores_{method}.parquet')).to_pydict()
  value, noisy = np.asarray(table['value']), np.asarray(table['corruption']) != 0
  clean, bad = value[~noisy], value[noisy]
  pairs = (clean[:, None] > bad[None, :]).mean() + 0.5 * (clean[:, None] == bad[None, :]).mean()
  assert pairs > floor, (method, mode, pairs)
  assert summary['noise_auroc'] == pytest.approx(pairs, abs=1e-9)  # as reported


def test_valuate_errors_are_one_line_and_write_nothing(tfds_dir, tmp_path):
  config = small_config(tfds_dir)
  with pytest.raises(UserError, match="'shapley'"):
    valuate('shapley', config, str(tmp_path / 'a'))
  config.valuation.projection = 'sparse'
  with pytest.raises(UserError, match="'sparse'"):
    valuate('dvemb', config, str(tmp_path / 'b'))
  with pytest.raises(UserError, match='needs valuation.rater'):
    valuate('datarater', small_config(tfds_dir), str(tmp_path / 'c'))
  config = small_config(tfds_dir)
  config.valuation.layers = 'dense_9'
  with pytest.raises(UserError, match="'dense_9'"):
    valuate('tracin', config, str(tmp_path / 'e'))
  config = small_config(tfds_dir)
  config.valuation.checkpoint_every = 7
  with pytest.raises(UserError, match='checkpoint_every=7'):
    valuate('tracin', config, str(tmp_path / 'd'))
  config = small_config(tfds_dir)
  config.valuation.optimizer = 'adam'
  with pytest.raises(UserError, match="method dvemb needs valuation.optimizer='sgd', got 'adam'"):
    valuate('dvemb', config, str(tmp_path / 'g'))
  config = small_config(tfds_dir)
  config.valuation.dvemb_curvature = 'exact'
  with pytest.raises(UserError, match="dvemb_curvature='exact' works on unprojected gradients"):
    valuate('dvemb', config, str(tmp_path / 'h'))
  config = small_config(tfds_dir)
  config.valuation.store, config.valuation.topk = True, 3
  with pytest.raises(UserError, match='valuation.topk attributes with TracIn'):
    valuate('mimic', config, str(tmp_path / 'i'))
  config.valuation.topk = 0
  with pytest.raises(UserError, match="work with tracin, mimic and dvemb, not 'datarater'"):
    valuate('datarater', config, str(tmp_path / 'j'))
  config = small_config(tfds_dir)
  config.valuation.store, config.valuation.topk, config.valuation.topk_split = True, 3, 'tset'
  with pytest.raises(UserError, match="no split 'tset'"):
    valuate('tracin', config, str(tmp_path / 'f'))
  assert not os.listdir(tmp_path)


RATER = pytest.mark.xdist_group('valuation_launch_rater')  # the tests of `rater_run`: one worker


@pytest.fixture(scope='module')
def rater_run(tfds_dir, tmp_path_factory):
  """A 2-step rater run of tests/run_config.py on one device, made once; its tests only read
  it."""
  run = str(tmp_path_factory.mktemp('rater') / 'run')
  meta_train(small_rater_config(tfds_dir, steps=2), run, devices=jax.devices()[:1])
  return run


@RATER
def test_valuate_datarater_scores_are_the_exported_raters(tfds_dir, tmp_path, rater_run):
  """A 2-step rater run, exported; valuate's scores are the exported scorer's (sharded path)."""
  export.export_rater(rater_run, str(tmp_path / 'rater'))
  config = small_config(tfds_dir)
  config.valuation.rater = str(tmp_path / 'rater')
  summary = valuate('datarater', config, str(tmp_path / 'val'), progress=False)
  table = pq.read_table(os.path.join(tmp_path, 'val', 'scores_datarater.parquet')).to_pydict()
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  want = export.load_rater(str(tmp_path / 'rater'), devices=jax.devices()[:1])(train.features)
  np.testing.assert_allclose(table['score'], want, rtol=1e-5, atol=1e-6)
  assert summary['higher_is_better']
  assert summary['example_gradients'] == 2 * 2 * (2 * 16 + 16)


@RATER
def test_valuate_datarater_resumed_after_its_rater_run_trained_on_scores_with_the_new_rater(
    tfds_dir, tmp_path, rater_run, monkeypatch):
  """valuation.rater names a train_rater run; valuate stops after one block, the run trains two
  more outer steps, and the resumed valuation is entirely the newer rater's (no stale block)."""
  import shutil  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from datarater import files  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / 'run')  # a copy of the 2-step `rater_run`, extended to 4 steps below
  shutil.copytree(rater_run, run, ignore=shutil.ignore_patterns('.lock'))
  config = small_config(tfds_dir)
  config.valuation.rater, config.valuation.score_batch_size = run, 256
  write_json = files.write_json

  class Stop(Exception):
    pass

  def stop_after_one_block(path, obj):
    write_json(path, obj)
    if path.endswith('.npy.json'):
      raise Stop
  with monkeypatch.context() as m:
    m.setattr(files, 'write_json', stop_after_one_block)
    with pytest.raises(Stop):
      valuate('datarater', config, str(tmp_path / 'val'), progress=False)
  meta_train(small_rater_config(tfds_dir, steps=4), run, devices=jax.devices()[:1])
  valuate('datarater', config, str(tmp_path / 'val'), progress=False)
  table = pq.read_table(os.path.join(tmp_path, 'val', 'scores_datarater.parquet')).to_pydict()
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  new = export.load_rater(run, devices=jax.devices()[:1])
  assert new.training_example_gradients == 4 * 2 * (2 * 16 + 16)  # it did train on
  np.testing.assert_allclose(table['score'], new(train.features), rtol=1e-5, atol=1e-6)


def test_valuate_refits_when_its_dataset_folder_is_written_again(tfds_dir, tmp_path):
  """data.dataset_dir names a folder launch.filter writes; written again (--overwrite, another
  keep), the resumed workdir must not reuse the run fitted on the old examples."""
  from datarater import files  # pylint: disable=g-import-not-at-top
  from datarater.curation.filter import filter_dataset  # pylint: disable=g-import-not-at-top
  n = len(pipeline.load_split(small_config(tfds_dir).data, 'train'))
  scores = str(tmp_path / 'scores.parquet')
  files.write_parquet(scores, {'id': np.arange(n),
                               'value': np.random.default_rng(0).normal(size=n)})
  folder = str(tmp_path / 'filtered')
  config = small_config(tfds_dir)
  config.data.dataset_dir, config.data.label_noise = folder, 0.0
  for keep in (0.5, 0.9):
    filter_dataset('sklearn_digits', folder, ['train'], scores=scores, keep=keep,
                   data_dir=tfds_dir, batch_size=256, overwrite=True)
    summary = valuate('tracin', config, str(tmp_path / 'val'), progress=False)
  fresh = valuate('tracin', config, str(tmp_path / 'fresh'), progress=False)
  assert summary['num_examples'] == fresh['num_examples'] == round(0.9 * n)
  read = lambda d: pq.read_table(tmp_path / d / 'scores_tracin.parquet').to_pydict()
  assert read('val') == read('fresh')


@SHARED
def test_valuate_refits_when_the_models_code_changes(tfds_dir, tmp_path, exact, monkeypatch):
  """A task's code changed under the same config (its own model, edited between runs): the
  workdir's runs, fitted with the old code, must not be reused (the new loss on the old model's
  checkpoints gave other scores, silently; a changed shape gave a flax traceback)."""
  import shutil  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  mlp = registry.TASKS['mlp_classifier']
  config = small_config(tfds_dir)
  shutil.copytree(exact('tracin')[1], tmp_path / 'val')  # fitted with the registered code

  def edited(task_config, info):  # the code, not the config: tanh whatever it says
    task_config = task_config.copy_and_resolve_references()
    task_config.activation = 'tanh' if task_config.activation != 'tanh' else 'relu'
    return mlp(task_config, info)
  monkeypatch.setitem(registry.TASKS, 'mlp_classifier', edited)
  read = lambda d: pq.read_table(tmp_path / d / 'scores_tracin.parquet').to_pydict()['score']
  valuate('tracin', config, str(tmp_path / 'val'), progress=False)
  valuate('tracin', config, str(tmp_path / 'fresh'), progress=False)
  assert read('val') == read('fresh')


# The loss of a model of one's own, rematerialised saving named values (a frozenset parameter),
# traced and printed (jax alone imported: the process starts fast).
_JAXPR = """
import jax, jax.numpy as jnp, numpy as np
def loss(params, batch):
  policy = jax.checkpoint_policies.save_only_these_names('h1', 'h2', 'h3', 'h4')
  return jax.checkpoint(lambda x: jnp.tanh(x) ** 2, policy=policy)(batch['x'] @ params).sum(-1)
print(jax.make_jaxpr(loss)(jax.ShapeDtypeStruct((4, 3), np.float32),
                           {'x': jax.ShapeDtypeStruct((8, 4), np.float32)}))
"""


@SHARED
def test_a_rerun_with_another_config_says_it_replaces_the_scores_and_never_mixes_them(
    tfds_dir, tmp_path, exact, monkeypatch, caplog, capsys):
  """A workdir holding TracIn self-influence scores, valued again with Grad-Cos: the run says
  first that it replaces them, naming the field; killed as it writes its summary, it leaves no
  summary of the earlier config (its noise AUROC, its config) beside its own scores file, and
  run again it writes the summary of those scores."""
  import shutil  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from datarater import files  # pylint: disable=g-import-not-at-top
  work = tmp_path / 'val'
  shutil.copytree(exact('tracin')[1], work)
  config = small_config(tfds_dir)
  config.valuation.tracin_mode = 'heldout_cos'
  write_json = files.write_json

  class Killed(Exception):
    pass

  def killed_at_the_summary(path, obj):
    if path.endswith('scores_tracin.json'):
      raise Killed
    write_json(path, obj)
  with monkeypatch.context() as m:
    m.setattr(files, 'write_json', killed_at_the_summary)
    with pytest.raises(Killed):
      valuate('tracin', config, str(work), progress=False)
  said = caplog.text + capsys.readouterr().out  # (stdout once a run set the log's handler up)
  assert "valuation.tracin_mode='self' there, 'heldout_cos' here" in said
  summary = work / 'scores_tracin.json'
  assert not summary.exists() or json.loads(summary.read_text())['config']['valuation'][
      'tracin_mode'] == 'heldout_cos'
  scores = pq.read_table(work / 'scores_tracin.parquet').to_pydict()
  again = valuate('tracin', config, str(work), progress=False)
  assert json.loads(summary.read_text()) == again
  assert again['config']['valuation']['tracin_mode'] == 'heldout_cos'
  assert pq.read_table(work / 'scores_tracin.parquet').to_pydict() == scores


def test_the_model_digest_is_the_same_in_every_process():
  """Processes with other string hashes (PYTHONHASHSEED, random per process) print the loss's
  jaxpr differently (a set's order): the text the digest hashes must not differ, or a
  two-process valuation's processes took other cache keys (process 0 found no part file of
  process 1's) and every run of one process fitted again."""
  import subprocess  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import sys  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from datarater.valuation.run import printed  # pylint: disable=g-import-not-at-top
  procs = [subprocess.Popen([sys.executable, '-c', _JAXPR], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONHASHSEED=str(seed)))
           for seed in (1, 2)]
  texts = [p.communicate(timeout=120)[0] for p in procs]
  assert texts[0] != texts[1]  # the jaxprs as printed differ
  assert printed([texts[0]]) == printed([texts[1]])


def test_the_model_digest_holds_the_models_constant_arrays():
  """Code that changed only an array the model makes (a fixed encoding, here its frequency)
  traces to the same printed program: the digest must still differ, as the losses do (it did
  not, and the old code's fitted runs were valued again, silently)."""
  import types  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from datarater.valuation.run import model_digest  # pylint: disable=g-import-not-at-top

  def task(k):
    def loss(params, batch):
      return ((batch['x'] + np.sin(np.arange(4, dtype=np.float32) / k)) @ params).sum(-1)
    return types.SimpleNamespace(init=lambda key: jax.random.normal(key, (4, 3)),
                                 per_example_loss=loss,
                                 spec={'x': jax.ShapeDtypeStruct((4,), np.float32)})
  params, batch = np.ones((4, 3), np.float32), {'x': np.zeros((2, 4), np.float32)}
  assert not np.allclose(task(1.0).per_example_loss(params, batch),
                         task(2.0).per_example_loss(params, batch))
  programs = [str(jax.make_jaxpr(task(k).per_example_loss)(params, batch)) for k in (1.0, 2.0)]
  assert programs[0] == programs[1]  # the arrays are not printed
  assert model_digest(task(1.0)) != model_digest(task(2.0))


@SHARED
def test_valuate_from_a_gradient_store_with_top_k(tfds_dir, tmp_path, exact):
  """valuation.store: self-influence from factored projections finds the noise as the exact one;
  valuation.topk: each test example's supporters/opposers are the brute-force argsort of the
  full train x test TracIn matrix (float64, from the stored train gradients and the test
  examples' projected gradients); a second query reuses the store."""
  from datarater import tasks
  from datarater.data import source
  from datarater.valuation import factory, store as store_lib
  from datarater.valuation.run import RunCache, fingerprint, model_digest
  want, _ = exact('tracin')
  config = small_config(tfds_dir)
  config.valuation.store, config.valuation.store_k, config.valuation.topk = True, 16, 3
  work = str(tmp_path / 'store')
  summary = valuate('tracin', config, work, progress=False)
  table = pq.read_table(os.path.join(work, 'scores_tracin.parquet')).to_pydict()
  assert abs(summary['noise_auroc'] - want['noise_auroc']) < 0.03, (summary, want)
  test = pipeline.load_split(config.data, 'test')
  m, k = len(test), 3
  assert summary['topk'] == {'split': 'test', 'k': k, 'num_test': m,
                            'file': os.path.join(work, 'topk_tracin.parquet')}

  train = source.open_source(config.data, config.data.train_split, corrupt=True)
  task = tasks.make_task(config.task, train.info)
  run, _ = factory.record(config, task, train, config.valuation.train_steps,
                          config.valuation.checkpoint_every,
                          RunCache(os.path.join(work, 'fit'), fingerprint(
                              'tracin', config, pipeline.files_digest(pipeline.builder_of(config.data)),
                              model_digest(task))))
  (path,) = [os.path.join(work, d) for d in os.listdir(work) if d.startswith('store_tracin')]
  store = store_lib.GradientStore(path)
  assert sorted(table['id']) == sorted(int(i) for i in store.ids)  # a score per stored example
  test_grads = np.asarray(store._test_grads(task.per_example_loss, run, test.take(np.arange(m)),
                                            None), np.float64)  # [C, M, D]
  full = sum(lr * np.asarray(store.grads(c), np.float64) @ test_grads[c].T
             for c, lr in enumerate(store.lrs))  # [N, M]
  top = pq.read_table(os.path.join(work, 'topk_tracin.parquet')).to_pydict()
  np.testing.assert_array_equal(np.asarray(top['test_id']).reshape(m, k)[:, 0], test.ids)
  support = np.asarray(top['support_id']).reshape(m, k)
  oppose = np.asarray(top['oppose_id']).reshape(m, k)
  position = {int(i): j for j, i in enumerate(store.ids)}
  for j in range(m):
    got_s = full[[position[int(i)] for i in support[j]], j]
    got_o = full[[position[int(i)] for i in oppose[j]], j]
    ranked = np.sort(full[:, j])
    np.testing.assert_allclose(got_s, ranked[::-1][:k], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_o, ranked[:k], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(top['support_score']).reshape(m, k)[:, 0], full.max(0),
                             rtol=1e-4, atol=1e-7)
  mtime = os.path.getmtime(os.path.join(path, store_lib.META))
  config.valuation.topk = 0
  valuate('tracin', config, work, progress=False)
  assert os.path.getmtime(os.path.join(path, store_lib.META)) == mtime
  # The earlier run's top-k went with its summary (it stayed beside scores it did not match).
  assert not os.path.exists(os.path.join(work, 'topk_tracin.parquet'))


@pytest.mark.slow
def test_dvembs_store_keeps_no_training_gradients(tfds_dir, tmp_path):
  """launch.valuate's data value embedding store holds its embeddings, not a [N, D] file of
  training gradients for each of valuation.dvemb_steps steps (its scores never read them)."""
  config = small_config(tfds_dir)
  config.valuation.store, config.valuation.store_k = True, 8
  work = str(tmp_path / 'dvemb')
  valuate('dvemb', config, work, progress=False)
  (path,) = [os.path.join(work, d) for d in os.listdir(work) if d.startswith('store_dvemb')]
  assert sorted(os.listdir(path)) == ['dvemb.npy', 'ids.npy', 'meta.json']


@SHARED
def test_a_gradient_store_projects_the_layers_of_its_method(tfds_dir, tmp_path, exact, capsys):
  """Mimic (valuation.mimic_layers='last') from a store projects only the model's last Dense
  layer, as in-memory Mimic scores it; its scores approach the exact ones as the projection grows
  (at k = 16 per factor the rank correlation was 0.29, at 64 0.75, at 256 0.97). A store of other
  layers is rebuilt, saying so on stdout (the library's log, as a rater run shows it)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from datarater.valuation import store as store_lib  # pylint: disable=g-import-not-at-top
  _, exact_work = exact('mimic')
  config = small_config(tfds_dir)
  config.valuation.store, config.valuation.store_k = True, 64
  work = str(tmp_path / 'store')
  valuate('mimic', config, work, progress=False)
  (path,) = [os.path.join(work, d) for d in os.listdir(work) if d.startswith('store_mimic')]
  projection = store_lib.GradientStore(path).meta['projection']
  assert projection['names'] == ['dense_2'] and projection['dim'] == 64 * 64, projection
  # A store that projects other layers than the config's is rebuilt, not read.
  meta_path = os.path.join(path, store_lib.META)
  meta = json.load(open(meta_path))
  meta['projection']['layers'] = None
  json.dump(meta, open(meta_path, 'w'))
  capsys.readouterr()
  valuate('mimic', config, work, progress=False)
  assert f'rebuilding {path}: it projects layers None' in capsys.readouterr().out
  assert store_lib.GradientStore(path).meta['projection']['layers'] == ['dense_2']
  read = lambda w: pq.read_table(os.path.join(w, 'scores_mimic.parquet')).to_pydict()
  want, got = read(str(exact_work)), read(work)
  assert want['id'] == got['id']
  assert stats.spearmanr(want['score'], got['score']).statistic > 0.6


def test_ghost_self_influence_only_where_dense_layers_hold_every_parameter(tfds_dir, tmp_path,
                                                                          monkeypatch):
  """A model with a parameter outside Dense layers (ghost_covers False) keeps the exact
  per-example path; ghost products would raise on it."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import source  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  from datarater.valuation.run import RunCache  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir)
  train = source.open_source(config.data, config.data.train_split, corrupt=True)
  heldout = pipeline.load_split(config.data, config.data.heldout_split)
  task = tasks.make_task(config.task, train.info)
  # Every build below records the same run (the settings it reads are the same): one fit, read
  # back from a cache by the others, as launch.valuate reads its workdir's.
  cache = RunCache(str(tmp_path / 'fit'), 'tag')
  build = lambda: factory.build('tracin', config, task, train, heldout, cache)
  assert build().ghost  # the MLP: all Dense
  # Named Dense layers take ghost norms too, and score as the per-example gradients do.
  config.valuation.layers = 'dense_2'
  ghost = build()
  config.valuation.tracin_ghost = False
  exact = build()
  assert ghost.ghost and not exact.ghost
  batch = train.take(range(64))
  np.testing.assert_allclose(ghost.score(batch), exact.score(batch), rtol=1e-4)
  config.valuation.layers, config.valuation.tracin_ghost = '', True
  monkeypatch.setattr(factory.pergrad, 'ghost_covers', lambda *a, **k: False)
  assert not build().ghost
  assert os.listdir(tmp_path / 'fit') == ['run-tag.pkl']  # fitted once


def test_build_refuses_what_a_method_cannot_compute_as_the_launcher_does(tfds_dir):
  """Benchmarks call factory.build directly: DVEmb's recursion is the SGD step's and it values
  every parameter, so another optimizer or named layers are refused there too, before any fit."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir)
  train = pipeline.load_split(config.data, config.data.train_split, corrupt=True)
  heldout = pipeline.load_split(config.data, config.data.heldout_split)
  task = tasks.make_task(config.task, train.info)
  fit = lambda *a, **k: pytest.fail('fitted before refusing')
  for field, value, line in [
      ('optimizer', 'momentum', "method dvemb needs valuation.optimizer='sgd', got 'momentum'"),
      ('layers', 'dense_0', "valuation.layers='dense_0' chooses TracIn layers")]:
    bad = small_config(tfds_dir)
    bad.valuation[field] = value
    with pytest.MonkeyPatch.context() as m:
      m.setattr(factory, 'record', fit)
      with pytest.raises(UserError, match=line):
        factory.build('dvemb', bad, task, train, heldout)


def test_what_the_store_or_curvature_cannot_follow_is_refused_before_any_fit(tfds_dir):
  """A named layer holding a Dense layer and a scale cannot be projected by the gradient store
  (it would value the Dense part only), and Gauss-Newton curvature needs labels(): both are one
  line from factory.check, before a run is recorded."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name='proj')(x) * self.param('scale', nn.initializers.ones, ())

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Block(name='block')(x)

  @dataclasses.dataclass(frozen=True)
  class Scaled(tasks.Task):
    spec: tasks.FeatureSpec
    num_classes: int = 10

    def init(self, key):
      return Model().init(key, jnp.zeros((1, 64)))

    def per_example_loss(self, params, batch):
      logits = Model().apply(params, batch['image'].reshape(-1, 64))
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])

  config = small_config(tfds_dir)
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  task = Scaled(train.info.spec)
  config.valuation.layers, config.valuation.store = 'block', True
  with pytest.raises(UserError, match='Dense layers hold 650 of the 651 parameters of layers'):
    factory.check('tracin', config, task, train)
  config.valuation.layers = 'proj'
  factory.check('tracin', config, task, train)
  config.valuation.store = False
  with pytest.raises(UserError, match='needs class labels: task Scaled defines no labels'):
    factory.check('dvemb', config, task, train)


def test_a_new_methods_run_length_is_checked_before_any_fit(tfds_dir, monkeypatch):
  """A method added to METHODS (WORKSPACE's 'A valuation') records the config's SGD run too: a
  checkpoint_every that does not divide train_steps is one line from factory.check, before the
  workdir is made, not from record_run after it."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(factory, 'METHODS', (*factory.METHODS, 'new_method'))
  config = small_config(tfds_dir)
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  task = tasks.make_task(config.task, train.info)
  config.valuation.checkpoint_every = 7
  with pytest.raises(UserError, match='valuation.checkpoint_every=7 must be >= 1 and divide '
                                      'valuation.train_steps=20'):
    factory.check('new_method', config, task, train)


def test_a_method_listed_but_not_built_is_an_error_not_mimic(tfds_dir, monkeypatch):
  """A method added to METHODS without its branch in factory.build is an error, as an estimator
  missing from make_estimator is (it was fitted and scored as Mimic, under its own name)."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(factory, 'METHODS', (*factory.METHODS, 'new_method'))
  config = small_config(tfds_dir)
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  heldout = pipeline.load_split(config.data, config.data.heldout_split)
  task = tasks.make_task(config.task, train.info)
  with pytest.raises(NotImplementedError, match="'new_method' is in METHODS but factory.build"):
    factory.build('new_method', config, task, train, heldout, checked=True)


def test_dvembs_run_length_is_not_checkpoint_every(tfds_dir):
  """The data value embedding records `valuation.dvemb_steps` with a checkpoint at every step:
  a checkpoint_every that does not divide train_steps (which TracIn and Mimic record) is no
  reason to refuse it, while tracin is refused."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir)
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  task = tasks.make_task(config.task, train.info)
  config.valuation.checkpoint_every = 7
  factory.check('dvemb', config, task, train)
  with pytest.raises(UserError, match='valuation.checkpoint_every=7'):
    factory.check('tracin', config, task, train)


@RATER
def test_a_rater_is_checked_against_the_planted_corruption_wherever_it_is_loaded(tfds_dir,
                                                                                 rater_run,
                                                                                 monkeypatch):
  """valuate --method=datarater and launch.train's rater policies check that the rater reads
  the features the corruption is planted in (as train_rater and filter do)."""
  from datarater.data import corruption  # pylint: disable=g-import-not-at-top
  from datarater.policies import base as policy_base  # pylint: disable=g-import-not-at-top
  from datarater.policies import weighting  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  checked = []
  monkeypatch.setattr(corruption.Corruption, 'check_targets',
                      lambda self, info, *models: checked.append(
                          (self.label_noise, [type(m).__name__ for m in models])))
  config = small_config(tfds_dir)
  config.valuation.rater = rater_run
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  factory.rater_for(config, train)
  weighting.loaded_rater(policy_base.PolicyContext(train, None, None, config,
                                                   rater=rater_run), 'datarater')
  rater = type(export.load_rater(rater_run).rater).__name__
  assert checked == [(0.2, [rater]), (0.2, [rater])]


def test_dvemb_warns_before_its_fit_when_the_projected_gradient_is_long(caplog):
  """A norm's 16384 scales stay whole under the Kronecker projection: k (the length the
  projection really returns) makes DVEmb's k x k curvature 1 GiB, said before the fit with the
  leaf and the setting that bounds k; a short k says nothing."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  v = get_config().valuation
  wide = {'a': {'kernel': jnp.zeros((64, 16384)), 'scale': jnp.zeros(16384)},
          'b': {'kernel': jnp.zeros((4, 4)), 'bias': jnp.zeros(3)}}
  projection = factory.make_projection(v)
  k = projection.apply(wide, projection.init(wide)).shape[0]
  assert factory.projected_dim(v, wide) == (k, ["['a']['scale'] (16384)"])
  with caplog.at_level('WARNING'):
    factory.warn_dvemb_dim(v, wide)
    factory.warn_dvemb_dim(v, wide['b'])
  [line] = [r.getMessage() for r in caplog.records]
  assert line.startswith(f'method dvemb: {k} projected gradient entries per example (a 1.0 GiB')
  assert "keeps leaves with one axis whole: ['a']['scale'] (16384)" in line
  assert line.endswith("valuation.projection='gaussian' bounds k by valuation.projection_dim")
  v.projection = 'gaussian'
  assert factory.projected_dim(v, wide) == (v.projection_dim, [])


def test_dvemb_says_how_many_examples_its_run_never_draws(tfds_dir, caplog):
  """The data value embedding values an example by the steps of its own run that drew it; a run
  shorter than an epoch leaves the rest at 0. The warning's count equals the examples absent
  from the recorded run's real (weight > 0) batch rows; a run of one epoch draws all, silently."""
  from datarater import tasks  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top

  class Keep:  # a run cache that keeps what it makes
    def get(self, name, make):
      self.run = make()
      return self.run

  config = small_config(tfds_dir)
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  heldout = pipeline.load_split(config.data, 'validation')
  task = tasks.make_task(config.task, train.info)
  n, b = len(train), config.valuation.batch_size
  for steps in (6, -(-n // b)):
    config.valuation.dvemb_steps = steps
    caplog.clear()
    keep = Keep()
    with caplog.at_level('WARNING'):
      factory.build('dvemb', config, task, train, heldout, keep, fit=False, checked=True)
    run = keep.run[0]
    drawn = np.unique(np.asarray(run.batches['index'])[np.asarray(run.weights) > 0])
    lines = [r.getMessage() for r in caplog.records if 'method dvemb' in r.getMessage()]
    if len(drawn) == n:
      assert steps == -(-n // b) and not lines
    else:
      assert steps == 6 and lines == [
          f'method dvemb: its valuation.dvemb_steps=6-step run (batch {b}) draws {len(drawn)} of '
          f'the {n} training examples; the other {n - len(drawn)} are in no step and score 0 '
          f'(valuation.dvemb_steps >= {-(-n // b)} draws every one)']


def test_a_loss_that_reads_its_batch_mates_is_refused_before_the_workdir_is_made(
    tfds_dir, tmp_path, monkeypatch):
  """Bad input is refused before anything is written: a loss centred on its batch's mean (batch
  norm in training mode) stopped valuate in one line, but after its workdir (with a lock file)
  was made."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  mlp = registry.TASKS['mlp_classifier']

  def centred(config, info):
    task = mlp(config, info)

    @dataclasses.dataclass(frozen=True)
    class Centred(type(task)):
      def per_example_loss(self, params, batch):
        return super().per_example_loss(
            params, {**batch, 'image': batch['image'] - batch['image'].mean(0)})
    return Centred(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)})

  monkeypatch.setitem(registry.TASKS, 'mlp_classifier', centred)
  with pytest.raises(UserError, match="task Centred: an example's loss depends on the rest"):
    valuate('tracin', small_config(tfds_dir), str(tmp_path / 'val'), progress=False)
  assert not os.path.exists(tmp_path / 'val')
