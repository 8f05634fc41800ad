"""Export -> load -> filter -> tfds.builder_from_directory -> train, and the filter's guarantees.

One small rater is meta-learned (a few outer steps) and exported once for the module.
"""
import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

import datarater
from configs.digits import get_config
from datarater import checkpointing, export, files, policies, tasks
from datarater.curation import scores_file, select
from datarater.curation.filter import filter_dataset
from datarater.data import pipeline
from datarater.data import source as source_lib
from datarater.data.corruption import Corruption
from datarater.data.pipeline import DataInfo
from datarater.errors import UserError
from datarater.meta_train import meta_train
from datarater.train import train
from launch import cli, filter as filter_launcher
from tests import forked
from tests.conftest import digits_data, otsu_keep, subprocess_env
from tests.run_config import small_config

N_TRAIN = 1197


def _rater_config(tfds_dir):
  """The module's rater run: small_config, 4 outer steps (on one device)."""
  config = small_config(tfds_dir, steps=4)
  config.rater.temperature = 0.37  # not the default: the export must carry it
  return config


# The tests that read the module's rater run (`rater_dir`, `filtered`) share one of each, on one
# pytest worker (each worker would make its own).
RATER_RUN = pytest.mark.xdist_group('export_filter_rater')


@pytest.fixture(scope='module')
def rater_dir(tfds_dir, tmp_path_factory):
  base = tmp_path_factory.mktemp('rater')
  meta_train(_rater_config(tfds_dir), str(base / 'run'), devices=jax.devices()[:1])
  out = str(base / 'exported')
  export.export_rater(str(base / 'run'), out)
  return out


@RATER_RUN
def test_a_rater_stopped_early_counts_the_steps_it_took(rater_dir, tmp_path):
  """Exported after 2 of its 4 outer steps, a rater's compute is that of 2 steps, counted by
  hand: K=2 inner models, T=2 steps of B=16, one held-out batch of 16 each. (The module's rater
  run as a run stopped or killed after step 2 leaves it: its checkpoint at step 4 removed.)"""
  run = str(tmp_path / 'run')
  shutil.copytree(os.path.join(os.path.dirname(rater_dir), 'run'), run,
                  ignore=shutil.ignore_patterns('.lock'))
  shutil.rmtree(os.path.join(run, 'checkpoints', '4'))
  meta = export.export_rater(run, str(tmp_path / 'exported'))
  assert meta['outer_steps'] == 2
  assert meta['training_example_gradients'] == 2 * 2 * (2 * 16 + 16)
  assert datarater.load_rater(run).training_example_gradients == 2 * 2 * (2 * 16 + 16)


@RATER_RUN
def test_an_output_that_cannot_be_created_is_refused_before_any_scoring(tfds_dir, rater_dir,
                                                                         tmp_path, monkeypatch):
  """--out under a file, or under a folder it may not write (a read-only file system), stops
  before the split is scored, not after the whole scoring pass."""
  from datarater.curation import filter as filter_lib  # pylint: disable=g-import-not-at-top

  def scored(*args, **kwargs):
    raise AssertionError('the split was scored before --out was checked')
  monkeypatch.setattr(filter_lib, '_score_split', scored)
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(UserError, match="/a_file' is a file, not a folder"):
    _filter(tfds_dir, rater_dir, tmp_path / 'a_file' / 'deeper' / 'out')
  sealed = tmp_path / 'sealed'
  sealed.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: (os.path.realpath(p) != str(sealed)
                                                     and real_access(p, mode)))
  with pytest.raises(UserError, match=r"/sealed' is not writable"):
    _filter(tfds_dir, rater_dir, sealed / 'out')
  assert not os.listdir(sealed)


def _filter(tfds_dir, rater_dir, out, **kw):
  args = dict(rater=rater_dir, keep=0.8, data_dir=tfds_dir, corruption=Corruption(0.2, 0),
              batch_size=256)
  args.update(kw)
  return filter_dataset('sklearn_digits', str(out), ['train'], **args)


def _files(folder):
  return {os.path.relpath(p, folder): open(p, 'rb').read()
          for p in sorted(glob.glob(os.path.join(folder, '**'), recursive=True)) if os.path.isfile(p)}


@pytest.fixture(scope='module')
def filtered(tfds_dir, rater_dir, tmp_path_factory):
  """The module rater's filter of the noisy train split with _filter's defaults (keep 0.8, 4
  devices, blocks of 256): its folder (read, never written, by the tests that share it) and its
  report."""
  out = tmp_path_factory.mktemp('filtered') / 'out'
  return out, _filter(tfds_dir, rater_dir, out)


@RATER_RUN
def test_export_load_scores_match_the_trained_rater(tfds_dir, rater_dir, tmp_path):
  """The exported rater (and the run itself, loaded directly) score like the rater rebuilt by
  hand from the run's config and latest checkpoint; 1 device and 4 give the same bits."""
  run = os.path.join(os.path.dirname(rater_dir), 'run')
  saved = json.load(open(os.path.join(run, 'config.json')))
  rater = tasks.make_rater(ml_collections.ConfigDict(saved['config']['rater']),
                           DataInfo.from_json(saved['data_info']))
  state, _ = checkpointing.restore_latest_on_host(os.path.join(run, 'checkpoints'))
  params = state['rater_params']
  split = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  batch = {k: split.features[k] for k in ('image', 'label')}
  want = np.asarray(jax.jit(rater.score)(params, batch))
  one = datarater.load_rater(rater_dir, devices=jax.devices()[:1])
  four = datarater.load_rater(rater_dir)
  direct = datarater.load_rater(run)
  assert len(four.devices) == 4
  np.testing.assert_allclose(one(batch), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(one(batch), four(batch))  # bitwise: same program per device
  np.testing.assert_array_equal(direct(batch), four(batch))
  # Raw TFDS examples (uint8 pixels, as a data source reads them) score as the decoded ones.
  source = pipeline.get_builder('sklearn_digits', tfds_dir).as_data_source(split='train')
  raw = pipeline.stack_examples(split.info, [source[i] for i in range(20)])
  assert raw['image'].dtype == np.uint8
  clean = {'image': batch['image'][:20], 'label': split.clean['label'][:20]}  # not the flips
  np.testing.assert_array_equal(one(raw), one(clean))
  assert one.info == split.info and one.temperature == direct.temperature == 0.37
  # launch.train's datarater policy weighs a batch of B real examples (and 4 of padding) by
  # B * softmax(score / 0.37), in float64 here.
  ctx = policies.PolicyContext(split, None, None, small_config(tfds_dir), rater=rater_dir)
  policy = policies.make_policy('datarater', ctx)
  mask = np.r_[np.ones(12), np.zeros(4)].astype(np.float32)
  sixteen = {k: v[:16] for k, v in batch.items()}
  got = policy.weigh(policy.aux, (), None, sixteen, jnp.asarray(mask))
  z = np.exp(np.asarray(want[:12], np.float64) / 0.37)
  np.testing.assert_allclose(got, np.r_[12 * z / z.sum(), np.zeros(4)], rtol=1e-4, atol=1e-7)
  assert one.training_example_gradients == 4 * 2 * (2 * 16 + 16)  # 4 steps, K=2, T=2, B=16
  with pytest.raises(UserError, match='already exists'):
    export.export_rater(run, rater_dir)
  # Classes outside the rater's 10 would read past its outputs (label -1 scored as class 9).
  for bad in (10, -1):
    with pytest.raises(UserError, match=r"'label' feature holds classes in .* outside the 10 "):
      one({'image': batch['image'][:2], 'label': np.array([0, bad])})
  # Pixels neither raw (uint8) nor decoded (floats in [0, 1]), e.g. the raw pixels as int64 or
  # as floats of 0-255, are refused (they passed through unscaled: scores some 250x off).
  for bad in (raw['image'].astype(np.int64), raw['image'].astype(np.float32)):
    with pytest.raises(UserError, match=rf"feature 'image' holds pixels: .* not {bad.dtype} in "
                       rf"\[0, {raw['image'].max()}\]"):
      one({'image': bad, 'label': raw['label']})


@RATER_RUN
def test_a_loaded_raters_weights_in_ones_own_loop_are_the_policys(tfds_dir, rater_dir):
  """`loaded.weights(batch)`, traced in one's own jit, vmap or on a batch sharded over 4
  devices, from raw uint8 pixels: B * softmax(score / 0.37) of `loaded(batch)`'s scores in
  float64, and launch.train's datarater policy's weights with padding. `rater.score` reads
  decoded pixels (raw ones scored ~300x off, silently). Bad batches: one UserError line each (a
  KeyError, flax's shape error, an IndexError or StopIteration traceback)."""
  loaded = datarater.load_rater(rater_dir)
  source = pipeline.get_builder('sklearn_digits', tfds_dir).as_data_source(split='train')
  raw = pipeline.stack_examples(loaded.info, [source[i] for i in range(96)])  # uint8, int64

  def softmax64(scores, real):
    z = np.where(real, np.asarray(scores, np.float64) / 0.37, -np.inf)
    return np.where(real, real.sum() * np.exp(z - z.max()) / np.exp(z - z.max()).sum(), 0.0)

  host, real = loaded(raw), np.ones(96, bool)
  for n in (96, 17):  # batches of other sizes compile again; same weights
    got = jax.jit(loaded.weights)({k: v[:n] for k, v in raw.items()})
    np.testing.assert_allclose(got, softmax64(host[:n], real[:n]), rtol=1e-5, atol=1e-6)
  stacked = jax.jit(jax.vmap(loaded.weights))({k: v.reshape(3, 32, *v.shape[1:])
                                               for k, v in raw.items()})
  np.testing.assert_allclose(stacked, np.stack([softmax64(s, real[:32]) for s in
                                                host.reshape(3, 32)]), rtol=1e-5, atol=1e-6)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('batch',))
  sharded = jax.device_put(raw, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      'batch')))
  np.testing.assert_allclose(jax.jit(loaded.weights)(sharded), softmax64(host, real),
                             rtol=1e-5, atol=1e-6)
  mask = np.r_[np.ones(80), np.zeros(16)].astype(np.float32)
  policy = policies.make_policy('datarater', policies.PolicyContext(
      pipeline.load_split(digits_data(tfds_dir), 'validation'), None, None,
      small_config(tfds_dir), rater=rater_dir))
  decoded = pipeline.decode(loaded.info, raw)
  np.testing.assert_allclose(loaded.weights(raw, mask), softmax64(host, mask > 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loaded.weights(raw, mask), policy.weigh(
      policy.aux, (), None, decoded, jnp.asarray(mask)), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(loaded.rater.score(loaded.params, raw)) - host).max() > 1
  image, label = raw['image'], raw['label']
  for bad, msg in [({'image': image}, "the batch has no feature 'label' (the rater reads "
                    'image, label; it holds image)'),
                   ({}, "the batch has no feature 'image' (the rater reads image, label; it "
                    'holds nothing)'),
                   ({'image': image[:, :4], 'label': label},
                    "feature 'image' of the batch has shape (96, 4, 8, 1); the rater reads "
                    '[n, 8, 8, 1]'),
                   ({'image': image[0], 'label': label[0]}, "shape (8, 8, 1); the rater reads"),
                   ({'image': image, 'label': label[:10]}, 'different numbers of examples'),
                   ({'image': image, 'label': label, 'index': np.arange(3)},
                    "{'image': 96, 'label': 96, 'index': 3}"),
                   ({'image': image.astype(np.int64), 'label': label}, 'holds pixels')]:
    for fn in (loaded, loaded.weights, jax.jit(loaded.weights)):
      with pytest.raises(UserError) as e:
        fn(bad)
      assert msg in str(e.value) and '\n' not in str(e.value), (fn, str(e.value))


@RATER_RUN
def test_a_run_whose_config_json_was_edited_is_not_exported(rater_dir, tmp_path):
  """config.json that no longer matches the run's checkpoint (here hand-edited) exported a
  rater of another activation or of an undone average, scoring wrongly: refused in one line,
  nothing written; so is a feature dtype JAX cannot take (a traceback)."""
  run = os.path.join(os.path.dirname(rater_dir), 'run')
  for edit, says in (
      (lambda d: d['config']['rater'].update(activation='tanh'),
       "is not the config of its latest checkpoint (rater.activation='relu' there, 'tanh' here)"),
      (lambda d: d['config']['rater'].update(hidden=[3]), 'rater.hidden=[16] there, [3] here'),
      (lambda d: d['data_info']['spec']['image'].update(dtype='object'),
       "has data_info.spec.image.dtype 'object'; it must be a number or bool type")):
    edited = tmp_path / 'run'
    shutil.rmtree(edited, ignore_errors=True)
    shutil.copytree(run, edited)
    saved = json.load(open(edited / 'config.json'))
    edit(saved)
    json.dump(saved, open(edited / 'config.json', 'w'))
    with pytest.raises(UserError, match=re.escape(says)):
      export.export_rater(str(edited), str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def _as_main_with_file_size_limit(limit: int, module: str, args: list) -> None:
  """`python -m module *args` where a file written past `limit` bytes fails (EFBIG, as a full
  disk fails a write: ENOSPC)."""
  import resource  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the signal kills the process)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  jax.config.update('jax_enable_compilation_cache', False)  # (its entries: larger files)
  forked.as_main(module, args)


@pytest.mark.slow  # a forked launcher process, then an export: seconds
@RATER_RUN
def test_an_export_whose_write_fails_is_one_line_and_leaves_nothing(rater_dir, tmp_path):
  """A write that fails in orbax's background threads while launch.export_rater writes (a full
  disk; here a file-size limit, which fails the same way) ends in one line naming the OS error,
  without orbax's logged tracebacks of it (three, ~40 lines); no --out, no temporary folder.
  Given room, the export holds the parameters of one written without a failure."""
  run = os.path.join(os.path.dirname(rater_dir), 'run')
  args = [f'--workdir={run}', f'--out={tmp_path / "out"}']
  failed = forked.call(_as_main_with_file_size_limit, 2048, 'launch.export_rater', args,
                       env=subprocess_env(1))  # 2 KiB: less than a kernel's data file
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert failed.stderr.startswith('error: File too large (') and \
      len(failed.stderr.strip().splitlines()) == 1, failed.stderr[-3000:]
  assert not os.listdir(tmp_path)
  export.export_rater(run, str(tmp_path / 'out'))
  got, want = export.load_rater(str(tmp_path / 'out')), export.load_rater(rater_dir)
  assert got.meta == want.meta
  jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


@RATER_RUN
def test_chain_filter_builder_from_directory_train(tfds_dir, rater_dir, filtered, tmp_path,
                                                   monkeypatch):
  out, report = filtered
  before = _files(out)
  want = select.keep_count(N_TRAIN, 0.8)
  assert report['splits']['train']['kept'] == want == 958
  builder = tfds.builder_from_directory(str(out))
  source = pipeline.get_builder('sklearn_digits', tfds_dir)
  # The source's features, and the planted corruption recorded per example (as a dataset with its
  # own record has it: class 0 clean).
  features = builder.info.features.to_json()['content']['features']
  assert {k: v for k, v in features.items() if k != 'corruption'} == (
      source.info.features.to_json()['content']['features'])
  assert builder.info.features['corruption'].names == ['clean', 'label_symmetric']
  assert builder.info.splits['train'].num_examples == want
  assert builder.info.splits['test'].num_examples == 300
  assert builder.info.splits['validation'].num_examples == 300
  # The kept examples are the best-scored ones, and the dataset holds exactly them (noisy labels).
  table = pq.read_table(out / 'scores_train.parquet').to_pydict()
  scores, kept = np.asarray(table['score']), np.asarray(table['kept'])
  assert kept.sum() == want and scores[kept].min() >= scores[~kept].max()
  noisy = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  # The scores are the rater's own, called on the whole noisy split (not through the loader's
  # blocks), and the kept ones its top `want` by (score, lower id).
  np.testing.assert_array_equal(table['id'], np.arange(N_TRAIN))
  loaded = datarater.load_rater(rater_dir)
  direct = np.asarray(loaded.rater.score(loaded.params, {
      k: jnp.asarray(v) for k, v in noisy.features.items() if k in ('image', 'label')}))
  np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(kept, np.isin(np.arange(N_TRAIN),
                                              np.lexsort((np.arange(N_TRAIN), -scores))[:want]))
  written = builder.as_data_source()['train']
  ids = np.flatnonzero(kept)
  np.testing.assert_array_equal(table['corruption'], noisy.corruption)
  for j in (0, 1, want // 2, want - 1):
    np.testing.assert_array_equal(written[j]['image'],
                                  source.as_data_source()['train'][ids[j]]['image'])
    assert written[j]['label'] == noisy.features['label'][ids[j]]
  recorded = pipeline.load_split(ml_collections.ConfigDict(
      {'name': 'x', 'data_dir': '', 'dataset_dir': str(out)}), 'train')
  np.testing.assert_array_equal(recorded.corruption, noisy.corruption[ids])
  # Streamed, the record is read a block at a time (blocks of 100 here), for positions in any
  # order and shape.
  monkeypatch.setattr(source_lib, 'RECORD_BLOCK', 100)
  streamed = source_lib.Source(builder, 'train')
  order = np.random.default_rng(0).permutation(want).reshape(2, -1)
  np.testing.assert_array_equal(streamed.corruption_of(order), noisy.corruption[ids][order])
  assert recorded.is_corrupted.sum() == report['splits']['train']['kept_corrupted'] > 0
  assert not any(e['corruption'] for e in builder.as_data_source()['test'])  # copied, clean
  assert os.path.exists(out / 'scores.png') and os.path.exists(out / 'filter_report.json')
  config = get_config()
  config.data = digits_data(tfds_dir)  # no noise added: the written labels are already noisy
  config.data.dataset_dir = str(out)
  config.train.epochs, config.train.seeds = 2, (0,)
  result = train(config, 'uniform', log=lambda *_: None)
  assert result['num_train'] == want and result['example_gradients'] == 2 * want
  assert result['final']['eval']['accuracy']['mean'] > 0.3  # it learns (10 classes: chance 0.1)
  config.data = digits_data(tfds_dir, 0.2)  # online: the source data, noisy labels
  config.train.epochs = 1
  online = train(config, 'datarater_batch_filter', rater=rater_dir, log=lambda *_: None)
  # Each batch of 128 keeps floor(0.8 * 128) = 102; the last (45 examples) keeps 36.
  assert online['scoring_forwards'] == N_TRAIN and online['example_gradients'] == 9 * 102 + 36
  assert online['setup_example_gradients'] == 4 * 2 * (2 * 16 + 16)  # small_config: 4 steps, K=2
  # The filtered folder is itself a dataset the filter takes (--dataset=FOLDER): filtered again
  # by the same rater it keeps the best-scored 0.5 of its 958, exactly the rater's order.
  again = filter_dataset(str(out), str(tmp_path / 'again'), ['train'], rater=rater_dir, keep=0.5,
                         batch_size=256)
  assert again['splits']['train']['kept'] == select.keep_count(want, 0.5)
  table2 = pq.read_table(tmp_path / 'again' / 'scores_train.parquet').to_pydict()
  np.testing.assert_allclose(table2['score'], scores[kept], rtol=1e-5, atol=1e-6)
  assert _files(out) == before  # read only: the module's other tests compare its bytes


@RATER_RUN
def test_balance_keeps_every_class_its_share(tfds_dir, rater_dir, tmp_path):
  report = _filter(tfds_dir, rater_dir, tmp_path / 'b', keep=0.5, balance=True)
  info = report['splits']['train']
  k = select.keep_count(N_TRAIN, 0.5)
  assert info['kept'] == k
  # Oracle: each class's quota is its exact share rounded down or up, summing to k ...
  table = pq.read_table(tmp_path / 'b' / 'scores_train.parquet').to_pydict()
  labels, scores = np.asarray(table['label']), np.asarray(table['score'])
  kept, ids = np.asarray(table['kept']), np.asarray(table['id'])
  counts = np.bincount(labels, minlength=10)
  quota = np.bincount(labels[kept], minlength=10)
  exact = counts * k / N_TRAIN
  assert quota.sum() == k and np.all(np.abs(quota - exact) < 1) and quota.min() > 0
  assert info['num_per_class'] == counts.tolist() and info['kept_per_class'] == quota.tolist()
  # ... and a class keeps its best-scored examples, ties to the lower id (sorted by hand).
  for c in range(10):
    members = sorted(np.flatnonzero(labels == c), key=lambda i: (-scores[i], ids[i]))
    assert set(np.flatnonzero(kept & (labels == c))) == set(members[:quota[c]])
  # The written split holds exactly that label histogram.
  written = tfds.builder_from_directory(str(tmp_path / 'b')).as_data_source()['train']
  np.testing.assert_array_equal(
      np.bincount([written[j]['label'] for j in range(len(written))], minlength=10), quota)


# A consumer of a filtered dataset, in a fresh process that has no datarater: plain TFDS, the
# array_record files and the scores file. Prints what it read as JSON.
_CONSUMER = r"""
import glob, json, sys
import numpy as np, pyarrow.parquet as pq, tensorflow_datasets as tfds
from array_record.python import array_record_module
out, source_dir = sys.argv[1:]
built, source = tfds.builder_from_directory(out), tfds.builder_from_directory(source_dir)
kept = np.flatnonzero(pq.read_table(out + '/scores_train.parquet').column('kept').to_numpy())
splits = {}
for s, split in built.info.splits.items():
  files = sorted(glob.glob(f'{out}/{built.info.name}-{s}.array_record-*'))
  records = sum(array_record_module.ArrayRecordReader(f).num_records() for f in files)
  ids = kept if s == 'train' else np.arange(source.info.splits[s].num_examples)
  got, want = built.as_data_source(split=s), source.as_data_source(split=s)
  rows = [(got[j], want[int(i)]) for j, i in enumerate(ids)]
  splits[s] = {'num_examples': split.num_examples, 'records': records, 'rows': len(got),
               'source_rows': len(ids), 'shard_lengths': list(split.shard_lengths),
               'same_image': all(g['image'].dtype == w['image'].dtype and g['image'].shape ==
                                 w['image'].shape and np.array_equal(g['image'], w['image'])
                                 for g, w in rows),
               'label': [int(g['label']) for g, _ in rows],
               'corruption': [int(g['corruption']) for g, _ in rows],
               'keys': sorted(rows[0][0])}
info = built.info
print(json.dumps({'datarater': 'datarater' in sys.modules, 'splits': splits,
                  'description': info.description, 'homepage': info.homepage,
                  'source_homepage': source.info.homepage,
                  'source_description': source.info.description,
                  'metadata': dict(info.metadata or {})}))
"""


@RATER_RUN
def test_a_consumer_without_datarater_reads_the_filtered_dataset_and_how_it_was_made(
    tfds_dir, rater_dir, filtered, tmp_path):
  """Read in a fresh process with plain TFDS (no datarater), every split holds the source's
  examples by id (images equal, the noisy labels of the planted noise, the corruption record),
  as many as dataset_info and its array_record files say; its info keeps the source's homepage
  and says how it was made: the rater's path, the keep fraction and threshold, the noise planted,
  the report itself in its metadata (the homepage was TFDS's catalogue page of a dataset that
  does not exist, the description named the rater's folder alone)."""
  out, report = filtered
  source_dir = pipeline.get_builder('sklearn_digits', tfds_dir).data_dir
  done = subprocess.run([sys.executable, '-c', _CONSUMER, str(out), str(source_dir)],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  read = json.loads(done.stdout.strip().splitlines()[-1])
  assert not read['datarater']
  noisy = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  kept = np.flatnonzero(pq.read_table(out / 'scores_train.parquet').column('kept').to_numpy())
  assert len(kept) == report['splits']['train']['kept'] == select.keep_count(N_TRAIN, 0.8)
  clean = {s: pipeline.load_split(digits_data(tfds_dir), s) for s in ('validation', 'test')}
  assert set(read['splits']) == {'train', 'validation', 'test'}
  for s, got in read['splits'].items():
    n = len(kept) if s == 'train' else 300
    assert got['num_examples'] == got['records'] == got['rows'] == got['source_rows'] == n
    assert sum(got['shard_lengths']) == n and got['same_image'], s
    assert got['keys'] == ['corruption', 'image', 'label']
    labels, record = ((noisy.features['label'][kept], noisy.corruption[kept]) if s == 'train'
                      else (clean[s].features['label'], np.zeros(n)))
    np.testing.assert_array_equal(got['label'], labels)
    np.testing.assert_array_equal(got['corruption'], record)
  assert read['homepage'] == read['source_homepage'] and 'scikit-learn' in read['homepage']
  description = read['description']
  assert os.path.realpath(rater_dir) in description and 'keep 0.8' in description
  assert f"threshold {report['splits']['train']['threshold']['all']:.9g}" in description
  assert 'planted before scoring: label_symmetric 0.2 (seed 0)' in description
  assert description.endswith(read['source_description'])
  assert read['metadata']['datarater_filter'] == [json.loads(
      (out / 'filter_report.json').read_text())]


@RATER_RUN
def test_deterministic_bytes_on_1_and_4_devices(tfds_dir, rater_dir, filtered, tmp_path):
  _filter(tfds_dir, rater_dir, tmp_path / 'b', devices=jax.devices()[:1])
  _filter(tfds_dir, rater_dir, tmp_path / 'c', batch_size=100)
  a, b, c = _files(filtered[0]), _files(tmp_path / 'b'), _files(tmp_path / 'c')
  assert len(a) >= 8 and a == b == c


def _cli(args) -> subprocess.CompletedProcess:
  """`python -m launch.filter *args`, run to its end."""
  return forked.run('launch.filter', args, subprocess_env(1))


def _filter_then(signum: int, args: list) -> None:
  """launch.filter whose process sends itself `signum` once the dataset is written in its
  temporary folder, before the rename: the latest point a kill can leave a partial output."""
  from datarater.curation import tfds_writer  # pylint: disable=g-import-not-at-top
  write = tfds_writer.write_subset

  def signalled(*a, **k):
    out = write(*a, **k)
    os.kill(os.getpid(), signum)
    return out
  tfds_writer.write_subset = signalled
  forked.as_main('launch.filter', args)


@RATER_RUN
def test_sigkill_leaves_no_partial_output_and_rerun_finishes(tfds_dir, rater_dir, filtered,
                                                            tmp_path):
  out = tmp_path / 'killed'
  args = ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', f'--rater={rater_dir}',
          '--keep=0.8', '--label_noise=0.2', '--batch_size=256', f'--out={out}']
  # SIGKILL: no clean-up runs.
  proc = forked.call(_filter_then, signal.SIGKILL, args, env=subprocess_env(1))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert glob.glob(str(tmp_path / '.killed.tmp-*'))  # killed mid-write ...
  assert not os.path.exists(out)  # ... the output is absent, never partial
  rerun = _cli(args)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert not glob.glob(str(tmp_path / '.killed.tmp-*'))  # the dead run's temp folder is gone
  assert _files(out) == _files(filtered[0])  # the same filter, in this process
  # Its summary line counts the planted noise it kept: the written dataset's record against the
  # source split's.
  noisy = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  written = pipeline.load_split(ml_collections.ConfigDict(
      {'name': 'x', 'data_dir': '', 'dataset_dir': str(out)}), 'train')
  assert (f'train: kept {len(written)} of {N_TRAIN} examples, {written.is_corrupted.sum()} of '
          f'its {noisy.is_corrupted.sum()} corrupted\n') in rerun.stdout, rerun.stdout
  # The CLI's one-line errors: an existing OUT_DIR without --overwrite, and a bad keep.
  for bad, msg in ((args, 'already exists (pass --overwrite to replace it)'),
                   (args[:-1] + [f'--out={tmp_path}/x', '--keep=1.5'],
                    'keep fraction must be in (0, 1], got 1.5')):
    p = _cli(bad)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), p.stderr
    assert msg in lines[0]
  assert not os.path.exists(f'{tmp_path}/x')


def _ctrl_c_as_orbax_works(method: str, module: str, args: list) -> None:
  """`python -m module args` sent Ctrl-C as orbax's StandardCheckpointer `method` begins (save:
  as it returns, its threads still writing)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  original = getattr(ocp.StandardCheckpointer, method)

  def interrupted(self, *a, **k):
    if method == 'save':
      out = original(self, *a, **k)
      os.kill(os.getpid(), signal.SIGINT)
      return out
    os.kill(os.getpid(), signal.SIGINT)
    return original(self, *a, **k)
  setattr(ocp.StandardCheckpointer, method, interrupted)
  forked.as_main(module, args)


@RATER_RUN
@pytest.mark.parametrize('method', ['save', pytest.param('restore', marks=pytest.mark.slow)])
def test_ctrl_c_as_orbax_writes_or_reads_a_rater_stops_once_it_is_done(tfds_dir, rater_dir,
                                                                       tmp_path, method):
  """Interrupted mid-write, orbax's threads printed tracebacks and wrote on into the removed
  temporary folder (or hung at exit); interrupted mid-read, an intact rater was 'unreadable'
  (exit 2): now Ctrl-C's one line, nothing left beside the output, and the export reruns. (Those
  were races of orbax's threads, 2 of 3 and 2 of 120 tries in a review; this checks the outcome.)"""
  out = tmp_path / 'out'
  if method == 'save':
    args = [f'--workdir={os.path.dirname(rater_dir)}/run', f'--out={out}']
    module = 'launch.export_rater'
  else:
    args = ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', f'--rater={rater_dir}',
            '--keep=0.8', '--batch_size=256', f'--out={out}']
    module = 'launch.filter'
  done = forked.call(_ctrl_c_as_orbax_works, method, module, args, env=subprocess_env(1))
  assert done.returncode == -signal.SIGINT, done.stderr[-3000:]
  assert done.stderr.count('interrupted (Ctrl-C) at ') == 1, done.stderr[-3000:]
  assert 'Traceback' not in done.stderr + done.stdout, done.stderr[-3000:]
  assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
  if method == 'save':
    again = forked.run(module, args, subprocess_env(1))
    assert again.returncode == 0, again.stderr[-2000:]
    leaves = [jax.tree.leaves(export.load_rater(p).params) for p in (str(out), rater_dir)]
    for a, b in zip(*leaves):
      np.testing.assert_array_equal(a, b)


@RATER_RUN
def test_sigterm_removes_the_temporary_output(tfds_dir, rater_dir, tmp_path):
  """SIGTERM (a scheduler's kill) mid-write ends the run as Ctrl-C does: exit 143, no output and
  no temporary folder left beside it."""
  proc = forked.call(_filter_then, signal.SIGTERM, [
      '--dataset=sklearn_digits', f'--data_dir={tfds_dir}', f'--rater={rater_dir}', '--keep=0.8',
      '--batch_size=256', f'--out={tmp_path / "out"}'], env=subprocess_env(1))
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
  assert os.listdir(tmp_path) == []


@RATER_RUN
def test_bad_inputs_one_line_errors(tfds_dir, rater_dir, tmp_path):
  cases = [({'keep': 0.0}, 'keep fraction must be in (0, 1], got 0.0'),
           ({'keep': 1.01}, 'got 1.01')]
  # A rater whose input spec does not match the dataset.
  other = tmp_path / 'other_rater'
  import shutil  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  shutil.copytree(rater_dir, other)
  meta = json.load(open(other / 'rater.json'))
  meta['data_info']['spec']['image']['shape'] = [28, 28, 1]
  json.dump(meta, open(other / 'rater.json', 'w'))
  cases.append(({'rater': str(other)}, 'its parameters do not fit the architecture it names'))
  loaded = datarater.load_rater(rater_dir)
  info = pipeline.load_split(digits_data(tfds_dir), 'test').info
  wide = dataclasses.replace(info, spec={**info.spec,
                                         'image': jax.ShapeDtypeStruct((28, 28, 1), np.float32)})
  with pytest.raises(UserError, match=r"the rater reads features \{'image': \(\(8, 8, 1\)"):
    loaded.check_matches(wide, 'that data')
  # A feature of the rater's training data that it does not read may be missing elsewhere.
  extra = dataclasses.replace(loaded, info=dataclasses.replace(
      loaded.info, spec={**loaded.info.spec, 'weight': jax.ShapeDtypeStruct((), np.float32)}))
  assert set(extra.reads) == {'image', 'label'}  # the labelled MLP rater: pixels and the label
  extra.check_matches(info, 'data without weight')
  batch = pipeline.load_split(digits_data(tfds_dir), 'test').take(np.arange(20))
  np.testing.assert_array_equal(extra(batch), loaded(batch))
  # The same pixels stored as float64 decode to 0-255, not [0, 1]: refused (older exports
  # that record no stored dtypes are still read).
  stored = info.stored['image']
  floats = dataclasses.replace(info, stored={**info.stored, 'image': 'float64'})
  with pytest.raises(UserError, match=rf"reads features \{{'image': \(\(8, 8, 1\), '{stored}'\)"):
    loaded.check_matches(floats, 'that data')
  old = tmp_path / 'old_rater'
  shutil.copytree(rater_dir, old)
  meta = json.load(open(old / 'rater.json'))
  del meta['data_info']['stored']
  json.dump(meta, open(old / 'rater.json', 'w'))
  datarater.load_rater(str(old)).check_matches(floats, 'that data')
  # A scores file that does not cover the split.
  partial = tmp_path / 'partial.parquet'
  pq.write_table(pa.table({'id': np.arange(N_TRAIN - 1), 'value': np.zeros(N_TRAIN - 1)}), partial)
  cases.append(({'rater': None, 'scores': str(partial)},
                f'covers {N_TRAIN - 1} of the {N_TRAIN} examples of split \'train\' (missing id {N_TRAIN - 1}'))
  dup = tmp_path / 'dup.parquet'
  pq.write_table(pa.table({'id': np.r_[np.arange(N_TRAIN), 0], 'value': np.zeros(N_TRAIN + 1)}), dup)
  cases.append(({'rater': None, 'scores': str(dup)}, 'duplicate ids'))
  existing = tmp_path / 'existing'
  existing.mkdir()
  (existing / 'keep.txt').write_text('mine')
  for kw, msg in cases:
    with pytest.raises(UserError) as e:
      _filter(tfds_dir, rater_dir, tmp_path / 'never', **kw)
    assert msg in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(UserError, match='already exists'):
    _filter(tfds_dir, rater_dir, existing)
  assert os.listdir(existing) == ['keep.txt']
  assert not os.path.exists(tmp_path / 'never')


def test_scores_file_filter_and_min_score(tfds_dir, tmp_path):
  values = np.random.default_rng(0).normal(size=N_TRAIN)
  path = tmp_path / 's.parquet'
  order = np.random.default_rng(1).permutation(N_TRAIN)  # rows in any order
  pq.write_table(pa.table({'id': order, 'value': values[order]}), path)
  run = lambda out, **kw: filter_dataset('sklearn_digits', str(tmp_path / out), ['train'],
                                         scores=str(path), data_dir=tfds_dir, **kw)
  rep = run('o1', keep=0.6, copy_other_splits=False)
  assert rep['splits']['train']['kept'] == select.keep_count(N_TRAIN, 0.6)
  assert list(tfds.builder_from_directory(str(tmp_path / 'o1')).info.splits) == ['train']
  halves = np.round(2 * values) / 2  # ~190 scores exactly at the threshold: --min_score keeps them
  pq.write_table(pa.table({'id': order, 'value': halves[order]}), tmp_path / 'h.parquet')
  rep = filter_dataset('sklearn_digits', str(tmp_path / 'o2'), ['train'], min_score=0.5,
                       scores=str(tmp_path / 'h.parquet'), data_dir=tfds_dir)
  assert (halves == 0.5).sum() > 100
  assert rep['splits']['train']['kept'] == int((halves >= 0.5).sum())
  rep = run('o3', keep=0.6, threshold='streaming')
  assert abs(rep['splits']['train']['kept'] - select.keep_count(N_TRAIN, 0.6)) <= 1
  # Per class (--balance), streamed: each class keeps its best ~60% (the reservoir holds them all).
  rep = run('o5', keep=0.6, threshold='streaming', balance=True)
  table = pq.read_table(tmp_path / 'o5' / 'scores_train.parquet').to_pydict()
  ids, kept = np.asarray(table['id']), np.asarray(table['kept'])
  labels = pipeline.load_split(digits_data(tfds_dir), 'train').features['label'][ids]
  for c in range(10):
    mine, ours = values[ids][labels == c], kept[labels == c]
    assert abs(ours.sum() - 0.6 * len(mine)) <= 1 and mine[ours].min() > mine[~ours].max()
  assert rep['splits']['train']['kept'] == kept.sum()
  # Two groups of scores, 70% high: the suggested keep is the brute-force Otsu split's share.
  values = np.where(np.random.default_rng(2).random(N_TRAIN) < 0.7, 1.0, -2.0) + values / 2
  pq.write_table(pa.table({'id': order, 'value': values[order]}), path)
  out = io.StringIO()  # through the launcher, which prints each split's suggested keep
  with contextlib.redirect_stdout(out):
    assert cli.invoke(filter_launcher, [
        'filter', '--dataset=sklearn_digits', f'--scores={path}', '--suggest_keep', '--balance',
        f'--data_dir={tfds_dir}', f'--out={tmp_path / "o4"}']) == 0
  rep = json.loads((tmp_path / 'o4' / 'filter_report.json').read_text())
  want = otsu_keep(values)
  assert rep['splits']['train']['keep'] == pytest.approx(want, abs=1e-9)
  assert rep['splits']['train']['kept'] == select.keep_count(N_TRAIN, want)
  assert abs(want - 0.7) < 0.03
  assert (f"train: kept {rep['splits']['train']['kept']} of {N_TRAIN} examples "
          f'(suggested keep {want:.3f})') in out.getvalue()
  # The same scores times 2^1021, near float64's largest: the same split (their squares and their
  # range overflowed: it suggested keeping all but one; the histogram raised ValueError).
  pq.write_table(pa.table({'id': order, 'value': np.ldexp(values[order], 1021)}), path)
  assert np.isfinite(np.ldexp(values, 1021)).all() and np.abs(np.ldexp(values, 1021)).max() > 1e307
  assert cli.invoke(filter_launcher, [
      'filter', '--dataset=sklearn_digits', f'--scores={path}', '--suggest_keep', '--balance',
      f'--data_dir={tfds_dir}', f'--out={tmp_path / "o6"}']) == 0
  huge = json.loads((tmp_path / 'o6' / 'filter_report.json').read_text())['splits']['train']
  assert (huge['keep'], huge['kept']) == (rep['splits']['train']['keep'],
                                          rep['splits']['train']['kept'])
  assert (tmp_path / 'o6' / 'scores.png').stat().st_size > 0


def test_scores_file_read_in_row_batches(tmp_path, monkeypatch):
  """A scores file of many small row groups, two splits interleaved and ids shuffled, reads back
  as the values placed by id (numpy fancy indexing as the oracle); a duplicate in another row
  group and an id out of range (above, or negative) are refused."""
  from datarater import files  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  monkeypatch.setattr(scores_file, '_READ_ROWS', 5)
  rng = np.random.default_rng(0)
  n = 37
  order = rng.permutation(2 * n)
  split = np.where(order % 2 == 0, 'train', 'test')
  ids, values = order // 2, rng.normal(size=2 * n)
  path = str(tmp_path / 'scores.parquet')
  files.write_parquet(path, {'id': ids, 'value': values, 'split': split}, row_group=6)
  assert pq.ParquetFile(path).num_row_groups == 13
  for s in ('train', 'test'):
    expected = np.empty(n)
    expected[ids[split == s]] = values[split == s]
    np.testing.assert_array_equal(scores_file.read_values(path, n, s), expected)
  negative = rf'covers {n - 1} of .* \(missing id {n - 1}'  # id -1 is not id n - 1
  for bad_ids, msg in ((np.r_[np.arange(n), 3], 'duplicate ids'),
                       (np.r_[np.arange(n), n], f'id {n} out of range'),
                       (np.r_[np.arange(n - 1), -1], negative)):
    files.write_parquet(path, {'id': bad_ids, 'value': np.zeros(len(bad_ids))}, row_group=6)
    with pytest.raises(UserError, match=msg):
      scores_file.read_values(path, n)
  with_null = pa.array([*range(8), None, *range(9, n)], pa.int64())  # row 8, in the second batch
  pq.write_table(pa.table({'id': with_null, 'value': np.zeros(n)}), path)
  with pytest.raises(UserError, match=r'column `id` holds a null \(row 8\)'):
    scores_file.read_values(path, n)
  for value in (None, np.inf):  # id 11's value missing (null), or not finite
    column = pa.array([*np.zeros(11), value, *np.zeros(n - 12)], pa.float64())
    pq.write_table(pa.table({'id': np.arange(n), 'value': column}), path)
    with pytest.raises(UserError, match=r'has a missing \(null\) or non-finite score \(id 11\)'):
      scores_file.read_values(path, n)


def test_suggested_keep_is_the_otsu_split_and_ignores_a_spike_of_good_scores():
  rng = np.random.default_rng(0)
  # Good examples: a spike of confident scores near 0 and a tail of hard ones; bad: a broad mode.
  good = np.concatenate([-np.abs(rng.normal(0, 0.1, 450)), -np.abs(rng.normal(0, 1.2, 300))])
  bad = rng.normal(-4.5, 1.0, 250)
  scores = rng.permutation(np.concatenate([good, bad]))
  keep = select.suggest_keep(scores)
  assert keep == pytest.approx(otsu_keep(scores), abs=1e-9)
  assert abs(keep - 0.75) < 0.05  # the good share (a Gaussian mixture splits off the spike)
  assert select.suggest_keep(3 * scores + 7) == keep  # unchanged by a positive affine map
  assert select.suggest_keep(np.full(10, 2.0)) == 1.0
  # Overlapping groups, where 2-means stopped by a tolerance lands examples away from the optimum.
  for seed in range(5):
    rng = np.random.default_rng(seed)
    mixed = np.where(rng.random(1500) < 0.2, rng.normal(0, 1, 1500), rng.normal(2.5, 1, 1500))
    assert select.suggest_keep(mixed) == pytest.approx(otsu_keep(mixed), abs=1e-9)
  assert select.suggest_keep(np.array([0.0, 0, 0, 1, 1])) == pytest.approx(0.4)  # ties stay whole
  with pytest.raises(UserError, match='finite'):
    select.suggest_keep(np.array([0.0, np.nan]))


def test_class_quotas_are_the_closest_integer_shares_by_brute_force():
  """Largest remainder = the integer vector with sum `total` nearest the exact shares in squared
  distance (ties to the lower class), found here by enumerating every vector."""
  import itertools  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for _ in range(30):
    counts = rng.integers(0, 7, size=int(rng.integers(1, 5)))
    for total in range(counts.sum() + 1):
      exact = counts * total / max(1, counts.sum())
      best = min((q for q in itertools.product(*(range(c + 1) for c in counts))
                  if sum(q) == total),
                 key=lambda q: (round(float(np.sum((np.array(q) - exact) ** 2)), 9),
                                [-x for x in q]))
      np.testing.assert_array_equal(select.class_quotas(counts, total), best)
  # Equal remainders that floats would tell apart (51/170 * 31 = 9.3, * 21 = 6.3): lower class.
  np.testing.assert_array_equal(select.class_quotas(np.array([31, 24, 19, 21, 27, 21, 27]), 51),
                                [10, 7, 6, 6, 8, 6, 8])


@RATER_RUN
def test_an_output_that_would_replace_an_input_is_refused(tfds_dir, rater_dir, tmp_path):
  """--overwrite onto the command's own input (or a folder holding it) would delete it."""
  run = os.path.join(os.path.dirname(rater_dir), 'run')
  before = _files(run)
  for out in (run, os.path.dirname(run)):
    with pytest.raises(UserError, match='would replace --workdir'):
      export.export_rater(run, out, overwrite=True)
  source = str(pipeline.get_builder('sklearn_digits', tfds_dir).data_dir)
  for out, msg in ((source, '--data_dir'), (tfds_dir, '--data_dir'), (rater_dir, '--rater')):
    with pytest.raises(UserError, match=f'would replace {msg}'):
      _filter(tfds_dir, rater_dir, out, overwrite=True)
  assert _files(run) == before and os.path.exists(os.path.join(source, 'dataset_info.json'))


@RATER_RUN
def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(tfds_dir, rater_dir,
                                                                        tmp_path):
  """--overwrite deleted whatever --out named (a typo: a folder of notes, a file); now only an
  earlier output of the command (filter_report.json, rater.json in it) is replaced."""
  run = os.path.join(os.path.dirname(rater_dir), 'run')
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'thesis.tex').write_text('mine')
  (tmp_path / 'plain').write_text('a file')
  for out in (notes, tmp_path / 'plain'):
    with pytest.raises(UserError, match='exists but is not an earlier output of this command '
                                        r'\(it holds no filter_report.json\)'):
      _filter(tfds_dir, rater_dir, out, overwrite=True)
    with pytest.raises(UserError, match=r'it holds no rater.json'):
      export.export_rater(run, str(out), overwrite=True)
  assert (notes / 'thesis.tex').read_text() == 'mine' and os.listdir(notes) == ['thesis.tex']
  assert (tmp_path / 'plain').read_text() == 'a file'
  export.export_rater(run, str(tmp_path / 'r'))
  export.export_rater(run, str(tmp_path / 'r'), overwrite=True)  # its own earlier output
  with pytest.raises(UserError, match='it holds no filter_report.json'):  # not a filter's
    _filter(tfds_dir, rater_dir, tmp_path / 'r', overwrite=True)


def test_overwrite_help_says_it_replaces_only_an_earlier_output():
  """Every launcher's --overwrite help says what the test above shows it does: it replaces only
  an earlier output of the same command, not any existing --out."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from launch import export_rater, prepare_text  # pylint: disable=g-import-not-at-top
  for launcher in (export_rater, filter_launcher, prepare_text):
    fv = flags.FlagValues()
    launcher.define_flags(fv, [])
    assert 'an earlier output of this command' in fv['overwrite'].help, launcher.__name__


@RATER_RUN
def test_a_rater_with_non_finite_parameters_is_refused(rater_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  bad = str(tmp_path / 'bad')
  shutil.copytree(rater_dir, bad)
  params = jax.device_get(datarater.load_rater(rater_dir).params)
  leaves, tree = jax.tree.flatten(params)
  leaves[0] = np.where(np.arange(leaves[0].size).reshape(leaves[0].shape) == 0, np.nan, leaves[0])
  shutil.rmtree(os.path.join(bad, 'params'))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(bad, 'params'), jax.tree.unflatten(tree, leaves))
  with pytest.raises(UserError, match='holds 1 non-finite rater parameters'):
    datarater.load_rater(bad)


def test_a_scores_file_of_another_split_or_dataset_is_refused(tmp_path):
  """validation and test have 300 examples each: only the file's record tells them apart."""
  path = str(tmp_path / 'scores.parquet')
  values = np.arange(300, dtype=np.float64)
  scores_file.write(path, np.arange(300), values, values, dataset='sklearn_digits',
                    split='validation')
  np.testing.assert_array_equal(
      scores_file.read_values(path, 300, 'validation', 'sklearn_digits'), values)
  with pytest.raises(UserError, match="scores split 'validation', not 'test'"):
    scores_file.read_values(path, 300, 'test', 'sklearn_digits')
  with pytest.raises(UserError, match="scores dataset 'sklearn_digits', not 'fashion_mnist'"):
    scores_file.read_values(path, 300, 'validation', 'fashion_mnist')
  files.write_parquet(path, {'id': np.arange(300), 'value': values})  # by hand: ids only
  np.testing.assert_array_equal(scores_file.read_values(path, 300, 'test', 'x'), values)


def test_a_scores_file_of_other_planted_corruption_is_refused(tfds_dir, tmp_path):
  """Scores made where other examples were corrupted (another noise seed or rate, or none)
  value other data: the filter and launch.train's scores policy refuse them."""
  from configs.digits import get_config  # pylint: disable=g-import-not-at-top
  from datarater import policies  # pylint: disable=g-import-not-at-top
  from datarater.data import corruption as corruption_lib  # pylint: disable=g-import-not-at-top
  path, n = str(tmp_path / 'scores.parquet'), 1197
  values = np.random.default_rng(0).normal(size=n)
  scored = corruption_lib.Corruption(0.2, 0)
  scores_file.write(path, np.arange(n), values, values, dataset='sklearn_digits', split='train',
                    planted=scored.describe())
  for other in (corruption_lib.Corruption(0.2, 7), corruption_lib.Corruption(0.3, 0), None):
    with pytest.raises(UserError, match='scores examples under planted corruption .* but here ' +
                       ('none is planted' if other is None else 'it is')):
      filter_dataset('sklearn_digits', str(tmp_path / 'out'), ['train'], scores=path, keep=0.5,
                     data_dir=tfds_dir, corruption=other)
  config = get_config()
  config.data.data_dir, config.data.noise_seed = tfds_dir, 7
  train = pipeline.load_split(config.data, 'train', corrupt=True)
  with pytest.raises(UserError, match='scores examples under planted corruption'):
    policies.make_policy('scores', policies.PolicyContext(train, None, None, config, scores=path))
  config.data.noise_seed = 0  # the draw the scores were made under
  made = policies.make_policy('scores', policies.PolicyContext(train, None, None, config,
                                                               scores=path))
  assert made.aux.shape == (n,)
  report = filter_dataset('sklearn_digits', str(tmp_path / 'out'), ['train'], scores=path,
                          keep=0.5, data_dir=tfds_dir, corruption=scored)
  assert report['splits']['train']['kept'] == int(np.floor(0.5 * n + 0.5))  # half up


def test_streaming_quantile_is_algorithm_r_and_its_sample_is_uniform():
  """The reservoir equals Algorithm R's, draw for draw (the textbook loop over the same
  generator), whatever the chunks; each value is kept with probability capacity / N."""
  def algorithm_r(values, capacity, seed):
    rng, sample = np.random.default_rng(seed), np.empty(capacity)
    for i, v in enumerate(values):
      if i < capacity:
        sample[i] = v
      else:
        j = rng.integers(0, i + 1)
        if j < capacity:
          sample[j] = v
    return sample
  values = np.random.default_rng(7).normal(size=5000)
  for chunks in ([5000], [3, 997, 1, 3999], [50] * 100):
    sketch = select.StreamingQuantile(capacity=64, seed=3)
    for part in np.split(values, np.cumsum(chunks)[:-1]):
      sketch.update(part)
    np.testing.assert_array_equal(sketch.sample, algorithm_r(values, 64, 3))
  exact = select.StreamingQuantile(capacity=6000)
  exact.update(values)
  assert exact.quantile(0.3) == np.quantile(values, 0.3, method='higher')
  kept = np.zeros(200)
  for seed in range(2000):
    sketch = select.StreamingQuantile(capacity=20, seed=seed)
    sketch.update(np.arange(200.0))
    kept[sketch.sample.astype(int)] += 1
  # Each of 200 values kept in 2000 trials with p = 0.1: mean 200, sd 13.4.
  assert np.abs(kept - 200).max() < 6 * 13.4 and abs(kept[:20].mean() - 200) < 20
  # keep 1 keeps every score, not only those above the sample's lowest.
  assert sketch.keep_threshold(1.0) <= 0.0 and sketch.keep_threshold(0.5) > 0.0


def test_keep_count_rounds_the_decimal_keep_times_n_halves_up():
  """round(keep * N) of keep as written in decimal (0.205 * 300 = 61.5 -> 62), exact
  fractions as the oracle; in binary 0.205 * 300 fell below the half and kept 61."""
  from fractions import Fraction
  for n in range(1, 400):
    for k in range(1, 1000, 7):
      keep = k / 1000
      want = max(1, math.floor(Fraction(k, 1000) * n + Fraction(1, 2)))
      assert select.keep_count(n, keep) == want, (n, keep)


def test_exchange_takes_each_block_from_its_process_a_slice_at_a_time(monkeypatch):
  """Three processes (simulated: process p's copy of a value is value + 1000 p), blocks of 4 over
  47 examples, slices of 10 gathered at a time: example i comes from process (i // 4) % 3, and
  no gather holds more than a slice."""
  from datarater import multihost  # pylint: disable=g-import-not-at-top
  sizes = []
  def allgather(a):
    sizes.append(a.size)
    return np.stack([a + 1000 * p for p in range(3)]).astype(a.dtype)
  monkeypatch.setattr(multihost.jax, 'process_count', lambda: 3)
  monkeypatch.setattr(multihost, 'allgather', allgather)
  monkeypatch.setattr(multihost, 'EXCHANGE_VALUES', 30)
  values = np.random.default_rng(0).normal(size=47)
  labels = np.arange(47, dtype=np.int32)
  got_values, got_labels = multihost.exchange_blocks(47, 4, (values, labels))
  owner = (np.arange(47) // 4) % 3
  np.testing.assert_array_equal(got_values, values + 1000 * owner)
  np.testing.assert_array_equal(got_labels, labels + 1000 * owner)
  assert got_labels.dtype == np.int32 and max(sizes) == 10 and sum(sizes) == 2 * 47


def test_exact_filter_breaks_ties_to_the_lower_id_and_reports_what_it_wrote(tfds_dir, tmp_path):
  """From the written scores file alone: the kept examples are the first keep_count of the ids
  sorted by (score descending, id ascending) (brute force over many tied scores), the reported
  threshold is the lowest kept score, and `corrupted` counts the examples the record marks
  (several kinds planted, so kind indices above 1 occur)."""
  n, keep = N_TRAIN, 0.5
  k = int(np.floor(keep * n + 0.5))  # 599
  planted = Corruption(label_noise=0.1, seed=3, blur=0.05, occlusion=0.04)

  def run(out, values):
    path = str(tmp_path / f'{out}.parquet')
    scores_file.write(path, np.arange(n), values, values, dataset='sklearn_digits',
                      split='train', planted=planted.describe())
    report = filter_dataset('sklearn_digits', str(tmp_path / out), ['train'], scores=path,
                            keep=keep, data_dir=tfds_dir, corruption=planted,
                            copy_other_splits=False)
    table = pq.read_table(tmp_path / out / 'scores_train.parquet').to_pydict()
    order = np.argsort(table['id'])
    return report['splits']['train'], {c: np.asarray(v)[order] for c, v in table.items()}

  rng = np.random.default_rng(0)
  tied = rng.integers(0, 4, n).astype(np.float64)  # ~300 examples per score: the cut splits one
  rep, table = run('tied', tied)
  want = sorted(sorted(range(n), key=lambda i: (-tied[i], i))[:k])
  assert sorted(np.flatnonzero(table['kept'])) == want
  assert rep['kept'] == k
  # The record: nonzero entries of the written corruption column, and a hand count of the rates.
  record = table['corruption']
  assert set(np.unique(record)) == {0, 1, 2, 3}
  assert rep['corrupted'] == int(np.count_nonzero(record)) == round(0.1 * n) + round(
      0.05 * n) + round(0.04 * n)
  assert rep['kept_corrupted'] == int(np.count_nonzero(record[table['kept']]))
  # The written dataset holds the kept examples in id order, each with its own kind of the
  # planted record (several kinds: one written under another kind is caught) and what that kind
  # does to it: label noise changes the label alone, blur and occlusion the image alone.
  built = tfds.builder_from_directory(str(tmp_path / 'tied'))
  for kind, rate in planted.describe()['rates'].items():  # the description names every kind
    assert f'{kind} {rate:g}' in built.info.description, kind
  written = built.as_data_source()['train']
  original = pipeline.get_builder('sklearn_digits', tfds_dir).as_data_source()['train']
  kinds = planted.record(n)
  kept_ids = np.flatnonzero(table['kept'])
  assert len(written) == len(kept_ids) and set(kinds[kept_ids]) == {0, 1, 2, 3}
  for j, i in enumerate(kept_ids):
    got, was = written[j], original[int(i)]
    assert got['corruption'] == kinds[i], (j, i)
    assert (got['label'] != was['label']) == (kinds[i] == 1), (j, i)
    assert np.array_equal(got['image'], was['image']) == (kinds[i] in (0, 1)), (j, i)

  distinct = rng.permutation(n) / n  # no ties: the lowest kept score is below the best dropped
  rep, table = run('distinct', distinct)
  scores, kept = table['score'], table['kept']
  assert rep['threshold'] == {'all': float(scores[kept].min())}
  assert scores[kept].min() > scores[~kept].max()
  assert kept.sum() == k


def test_streaming_threshold_of_process_0_of_two_sees_every_block(tfds_dir, tmp_path, monkeypatch):
  """Process 0 of two (simulated: it reads blocks 0, 2, 4, ... and the exchange hands it the
  other process's blocks of the scores file, which every process reads whole) streams every
  block into the threshold sketch, as one process does: it keeps exactly the examples one
  process keeps, here those at or above the 599th best score (the reservoir holds them all)."""
  from datarater.curation import filter as filter_lib  # pylint: disable=g-import-not-at-top
  values = np.random.default_rng(5).normal(size=N_TRAIN)
  path = str(tmp_path / 's.parquet')
  scores_file.write(path, np.arange(N_TRAIN), values, values, dataset='sklearn_digits',
                    split='train', planted=None)
  run = lambda out: filter_dataset('sklearn_digits', str(tmp_path / out), ['train'], scores=path,
                                   keep=0.5, data_dir=tfds_dir, batch_size=100,
                                   threshold='streaming', copy_other_splits=False)
  kept = lambda out: np.asarray(pq.read_table(tmp_path / out / 'scores_train.parquet',
                                              columns=['kept'])['kept'])
  one = run('one')
  want = values >= np.sort(values)[::-1][select.keep_count(N_TRAIN, 0.5) - 1]
  np.testing.assert_array_equal(kept('one'), want)
  monkeypatch.setattr(filter_lib.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(filter_lib.jax, 'process_index', lambda: 0)
  monkeypatch.setattr(filter_lib.multihost, 'allgather', lambda a: np.stack([a, a]))
  two = run('two')
  np.testing.assert_array_equal(kept('two'), want)
  assert two['splits']['train']['threshold'] == one['splits']['train']['threshold']


OUTSIDE_RATER = '''
from datarater import tasks
from datarater.tasks import registry


@tasks.register_rater('outside_mlp_rater', schema=registry.schema_of('rater', 'mlp_rater'))
def outside_mlp_rater(config, info):
  return registry.RATERS['mlp_rater'](config, info)
'''


def test_a_rater_of_ones_own_exports_and_loads_where_its_module_imports(tfds_dir, tmp_path,
                                                                        monkeypatch):
  """A rater registered outside the package: its run and its export record the module, which
  export_rater and load_rater (launch.filter's, which take no config) import in a process that
  has not (export_rater refused it); where it does not import, one line says so."""
  import sys  # pylint: disable=g-import-not-at-top
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'mine'
  folder.mkdir()
  (folder / 'my_outside_rater.py').write_text(OUTSIDE_RATER)
  monkeypatch.syspath_prepend(str(folder))
  __import__('my_outside_rater')
  config = _rater_config(tfds_dir)  # the module run's programs
  config.outer.steps = 2
  config.rater.name = 'outside_mlp_rater'
  meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])

  def fresh_process():  # as a process that never imported the module
    monkeypatch.delitem(registry.RATERS, 'outside_mlp_rater')
    monkeypatch.delitem(sys.modules, 'my_outside_rater')
  fresh_process()
  meta = export.export_rater(str(tmp_path / 'run'), str(tmp_path / 'exported'))
  assert meta['rater_module'] == 'my_outside_rater'
  fresh_process()
  features = pipeline.load_split(digits_data(tfds_dir), 'train').features
  batch = {k: v[:8] for k, v in features.items()}
  got = datarater.load_rater(str(tmp_path / 'exported'))(batch)
  np.testing.assert_array_equal(got, datarater.load_rater(str(tmp_path / 'run'))(batch))
  fresh_process()
  monkeypatch.setattr(sys, 'path', [p for p in sys.path if p != str(folder)])
  with pytest.raises(UserError, match=r"rater 'outside_mlp_rater' is registered by module "
                     r"'my_outside_rater', which does not import here \(ModuleNotFoundError.*"
                     'put its folder on PYTHONPATH'):
    datarater.load_rater(str(tmp_path / 'exported'))
  # A run of a rater registered in a script or a --config file records no module: one line
  # says where to register it (it said that the name must be a registered rater).
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  (tmp_path / 'run' / 'config.json').write_text(json.dumps({**saved, 'rater_module': None}))
  with pytest.raises(UserError, match=r"rater 'outside_mlp_rater' was registered in a script or a "
                     '--config file, which nothing else imports: register it in a module on '
                     'PYTHONPATH'):
    export.export_rater(str(tmp_path / 'run'), str(tmp_path / 'exported_again'))


def _as(cls, made):
  return cls(**{f.name: getattr(made, f.name) for f in dataclasses.fields(made)})


@RATER_RUN
def test_a_rater_keyed_on_index_scores_each_example_alike_in_any_batch(tfds_dir, rater_dir,
                                                                      tmp_path, monkeypatch):
  """Every batch a rater sees holds `index` (a rater may key its dropout on it, as the README's
  dropout does): `loaded(batch)` and the filter pass it (both were a KeyError traceback); the
  scores equal the rater's own on the split's positions, whatever the filter's batch size."""
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  mlp_rater = registry.RATERS['mlp_rater']

  @dataclasses.dataclass(frozen=True)
  class Keyed(type(mlp_rater(small_config(tfds_dir).rater, pipeline.load_split(
      digits_data(tfds_dir), 'validation').info))):
    def score(self, params, batch):
      draw = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(jax.random.key(7), i)))
      return super().score(params, batch) + draw(batch['index'])

  monkeypatch.setitem(registry.RATERS, 'mlp_rater',
                      lambda config, info: _as(Keyed, mlp_rater(config, info)))
  loaded = datarater.load_rater(rater_dir, block=6)  # per device: not a multiple of 4 devices
  assert isinstance(loaded.rater, Keyed) and len(loaded.devices) == 4
  split = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  batch = split.take(np.arange(len(split)))
  want = np.asarray(jax.jit(loaded.rater.score)(loaded.params, batch))
  np.testing.assert_allclose(loaded(batch), want, rtol=1e-5, atol=1e-6)
  # Without `index`, the traceable `scores` keys each example on its position in the batch too.
  unkeyed = {k: v for k, v in batch.items() if k != 'index'}
  np.testing.assert_allclose(loaded.scores(unkeyed), want, rtol=1e-5, atol=1e-6)
  shifted = split.take(np.arange(5, 25))  # positions 5..24, scored from their own keys
  np.testing.assert_allclose(loaded(shifted), want[5:25], rtol=1e-5, atol=1e-6)
  for size in (256, 7):
    _filter(tfds_dir, rater_dir, tmp_path / f'out_{size}', batch_size=size)
    table = pq.read_table(str(tmp_path / f'out_{size}' / 'scores_train.parquet')).to_pydict()
    order = np.argsort(table['id'])
    np.testing.assert_allclose(np.asarray(table['score'])[order], want, rtol=1e-5, atol=1e-6)


def test_a_rater_whose_score_reads_its_batch_mates_is_refused_before_its_run(tfds_dir, tmp_path,
                                                                           monkeypatch):
  """A rater scores splits in blocks of any size once trained: one centred on its batch's mean
  (batch norm in training mode) would filter by the batch size. Refused before the workdir is
  made (it trained, exported and filtered before)."""
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  mlp_rater = registry.RATERS['mlp_rater']
  config = small_config(tfds_dir, steps=2)

  @dataclasses.dataclass(frozen=True)
  class Centred(type(mlp_rater(config.rater, pipeline.load_split(
      digits_data(tfds_dir), 'validation').info))):
    def score(self, params, batch):
      return super().score(params, {**batch, 'image': batch['image'] - batch['image'].mean(0)})

  monkeypatch.setitem(registry.RATERS, 'mlp_rater',
                      lambda config, info: _as(Centred, mlp_rater(config, info)))
  with pytest.raises(UserError, match="rater Centred: an example's score depends on the rest of "
                                      'its batch or its place in it'):
    meta_train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('kwargs, named', [
    ({'splits': ['train', 'test'], 'keep': 0.5}, '--scores filters one split at a time'),
    ({'min_score': float('inf')}, '--min_score must be a finite number, got inf'),
    ({'min_score': -float('inf')}, '--min_score must be a finite number, got -inf')])
def test_a_scores_file_filter_refuses_settings_it_cannot_follow(tfds_dir, tmp_path, kwargs, named):
  """A scores file holds one split's scores (a second split would be filtered by the first's);
  an infinite --min_score keeps all or nothing: refused in one line, nothing written."""
  path = str(tmp_path / 's.parquet')
  values = np.zeros(N_TRAIN)
  scores_file.write(path, np.arange(N_TRAIN), values, values, dataset='sklearn_digits',
                    split='train', planted=None)
  with pytest.raises(UserError, match=re.escape(named)):
    filter_dataset('sklearn_digits', str(tmp_path / 'out'), scores=path, data_dir=tfds_dir,
                   **{'splits': ['train'], **kwargs})
  assert not os.path.exists(tmp_path / 'out')


def test_an_output_moved_aside_by_a_killed_run_is_refused_before_scoring(tfds_dir, tmp_path,
                                                                          monkeypatch):
  """A run killed between moving OUT aside and renaming its own into place leaves OUT only as
  `.OUT.old-PID`; a rerun without --overwrite must refuse at once, not after scoring the split
  (atomic_dir puts the old folder back at the end, then refuses)."""
  path = str(tmp_path / 's.parquet')
  scores_file.write(path, np.arange(N_TRAIN), np.arange(N_TRAIN, dtype=float),
                    np.arange(N_TRAIN, dtype=float), dataset='sklearn_digits', split='train')
  out = tmp_path / 'out'
  filter_dataset('sklearn_digits', str(out), ['train'], scores=path, keep=0.5, data_dir=tfds_dir)
  dead = subprocess.Popen(['true'])
  dead.wait()
  os.rename(out, tmp_path / f'.out.old-{dead.pid}')
  from datarater.curation import filter as filter_lib
  monkeypatch.setattr(filter_lib, '_score_split', lambda *a, **k: pytest.fail('scored first'))
  with pytest.raises(UserError, match='already exists'):
    filter_dataset('sklearn_digits', str(out), ['train'], scores=path, keep=0.5,
                   data_dir=tfds_dir)


def test_the_filter_report_names_its_sources_by_their_real_paths(tfds_dir, tmp_path,
                                                                 monkeypatch):
  """Two runs on the same scores file given by a relative path and through a link write equal
  reports (the source was recorded as typed)."""
  path = tmp_path / 's.parquet'
  scores_file.write(str(path), np.arange(N_TRAIN), np.arange(N_TRAIN, dtype=float),
                    np.arange(N_TRAIN, dtype=float), dataset='sklearn_digits', split='train')
  os.symlink(path, tmp_path / 'link.parquet')
  monkeypatch.chdir(tmp_path)
  reports = [filter_dataset('sklearn_digits', str(tmp_path / out), ['train'], scores=scores,
                            keep=0.5, data_dir=tfds_dir)
             for out, scores in (('a', 's.parquet'), ('b', str(tmp_path / 'link.parquet')))]
  assert reports[0]['source'] == reports[1]['source'] == {'rater': None,
                                                            'scores': os.path.realpath(path)}


def test_a_histogram_that_cannot_be_drawn_loses_no_output(tfds_dir, tmp_path, monkeypatch):
  """The figure is drawn last, inside the temporary output: an error drawing it removed the whole
  filtered dataset. Now it warns, and the dataset, scores and report are written."""
  from datarater.curation import filter as filter_lib  # pylint: disable=g-import-not-at-top
  path = tmp_path / 's.parquet'
  values = np.random.default_rng(0).normal(size=N_TRAIN)
  pq.write_table(pa.table({'id': np.arange(N_TRAIN), 'value': values}), path)
  run = lambda out: filter_dataset('sklearn_digits', str(tmp_path / out), ['train'],
                                   scores=str(path), keep=0.5, data_dir=tfds_dir,
                                   copy_other_splits=False)
  drawn = run('o1')
  assert (tmp_path / 'o1' / 'scores.png').stat().st_size > 0
  def broken(*args):
    raise ValueError('a plotting bug')
  monkeypatch.setattr(filter_lib, '_save_histogram', broken)
  assert run('o2')['splits'] == drawn['splits']
  assert not (tmp_path / 'o2' / 'scores.png').exists()
  assert _files(tmp_path / 'o2').keys() == set(_files(tmp_path / 'o1')) - {'scores.png'}
