"""Slow: each benchmark script end to end at its smallest settings, into a temporary folder (CI
runs only their bad command lines, `tests/test_bench_cli.py`). Each test checks the files the
script's docstring names, the `made_by` stamp (the flags it records against the command line),
and properties of the numbers against a count the
settings fix, a recorded value or another script's run of the same thing."""
import ast
import json
import os
import pathlib
import shlex
import subprocess

import numpy as np
import pytest

from tests import forked
from tests.conftest import FAST_COMPILE, ONE_THREAD, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = '/usr/share/datasets/fashion-mnist'
pytestmark = pytest.mark.slow


def _run(module: str, args: list, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python -m module *args` (as forked.run, with a longer time limit), checked to exit 0."""
  done = forked.call(forked.as_main, module, list(args), env=env, timeout=timeout)
  assert done.returncode == 0, f'{module}: {done.stderr[-3000:]}'
  done.args = ['python', '-m', module, *args]
  return done


def _as_given(value: str):
  """A flag's value as typed, as JSON would hold it: a Python literal (a tuple as a list), else
  the string itself."""
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value
  return list(value) if isinstance(value, tuple) else value


def _holds_flags(recorded: dict, args: list) -> None:
  """`made_by`'s flags hold each --name=value of `args` (a config override in the config file
  flag's dict, a comma-list flag as its items); a config file flag names a config."""
  for arg in args:
    name, given, value = arg[2:].partition('=')
    flag, _, field = name.partition('.')
    got = recorded[flag]
    for key in field.split('.') if field else ():
      got = got[key]
    if isinstance(got, dict) and not field:  # --config=FILE: the config it read
      assert got, arg
    elif not field and isinstance(got, list):  # a comma-list flag
      assert ','.join(got) == value, (arg, got)
    else:
      assert got == (_as_given(value) if given else True), (arg, got)


def _stamped(path, proc) -> dict:
  """The JSON at `path`, its `made_by` checked: the command as run, the checkout's commit, the
  flags it was given."""
  with open(path) as f:
    result = json.load(f)
  assert shlex.split(result['made_by']['command']) == proc.args, result['made_by']
  _holds_flags(result['made_by']['flags'], proc.args[3:])
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True, check=False)
  if head.returncode == 0:  # a git checkout: the version names its commit
    assert head.stdout.strip()[:7] in result['made_by']['code_version']
  return result


def _files(prefix, *suffixes) -> None:
  """Each <prefix><suffix> written, and no temporary file of an atomic write left beside them."""
  for suffix in suffixes:
    assert os.path.getsize(f'{prefix}{suffix}') > 0, f'{prefix}{suffix}'
  leftovers = [n for n in os.listdir(os.path.dirname(prefix)) if '.tmp' in n]
  assert not leftovers, leftovers


def _train_split(tfds_dir, split: str, noise: float, seed: int):
  """configs/digits.py's `split` as the benches corrupt it for (noise, seed)."""
  from bench import runs  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.data.data_dir = tfds_dir
  return pipeline.load_split(runs.seeded(config, noise, seed).data, split, corrupt=True)


def test_the_measuring_benches_and_versions_run_at_their_smallest(tmp_path, tfds_dir):
  """bench.meta_step, bench.pergrad, bench.noise_ceiling and bench.versions (on the stored
  stream_tag_check runs)."""
  env = subprocess_env(1)
  out = tmp_path / 'meta_step'
  proc = _run('bench.meta_step', ['--unrolls=1,2', '--modes=reverse', '--repeats=1',
                                  '--hidden=8', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.png')
  assert [(x['mode'], x['T']) for x in r['results']] == [('reverse', 1), ('reverse', 2)]
  for x in r['results']:
    assert x['peak_bytes'] == x['temp_bytes'] + x['argument_bytes'] + x['output_bytes'] > 0
  # Reverse mode keeps every unrolled step's activations for the backward pass.
  assert r['results'][1]['temp_bytes'] > r['results'][0]['temp_bytes']

  out = tmp_path / 'pergrad'
  proc = _run('bench.pergrad', ['--batch=4', '--repeats=1', '--loop_examples=2', '--chunk=2',
                                f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.png')
  for name, inputs in (('digits_mlp', 64), ('mnist_size_mlp', 784)):  # two hidden layers of 128
    m = r['models'][name]
    assert m['num_params'] == inputs * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert len(m['examples_per_s']) == 8 and all(v > 0 for v in m['examples_per_s'].values())
    small, big = m['memory_temp_bytes']['4'], m['memory_temp_bytes']['40']
    # As the docstring says: chunked stays flat, the whole-batch vmap grows with the batch.
    assert big['chunked_sq_norm'] < 1.1 * small['chunked_sq_norm']
    assert big['vmap_full_sq_norm'] > 4 * small['vmap_full_sq_norm']

  out = tmp_path / 'noise_ceiling'
  proc = _run('bench.noise_ceiling', [
      '--config=configs/digits.py', f'--config.data.data_dir={tfds_dir}',
      '--config.data.train_split=train[:40]', '--seeds=0', '--noise=0.2', '--folds=2',
      '--epochs=1', '--other_split=train[40:80]', '--val_split=validation', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.md')
  assert [x['detector'] for x in r['runs']] == ['crossfit_noisy', 'crossfit_clean', 'clean_other']
  table = (tmp_path / 'noise_ceiling.md').read_text()
  bad = int(_train_split(tfds_dir, 'train[:40]', 0.2, 0).is_corrupted.sum())
  for x in r['runs']:
    # An AUROC of clean against corrupted examples: a share of their pairs (ties count half).
    pairs = 2 * x['auroc'] * (40 - bad) * bad
    assert 0 <= x['auroc'] <= 1 and pairs == pytest.approx(round(pairs), abs=1e-6)
    assert f'| 20% | {x["detector"]} | {x["auroc"]:.3f} ± 0.000 |' in table

  before, after = (os.path.join(ROOT, 'bench', 'results', 'stream_tag_check', side)
                   for side in ('before', 'after'))
  out = tmp_path / 'versions'
  proc = _run('bench.versions', [f'--before={before}', f'--after={after}', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.md')
  seeds = {side: json.loads(pathlib.Path(f'{p}_seeds.json').read_text())['seeds']
           for side, p in (('before', before), ('after', after))}
  row = next(x for x in r['rows'] if x['figure'] == 'noise AUROC')
  diffs = [seeds['after'][s]['noise_auroc'] - seeds['before'][s]['noise_auroc']
           for s in seeds['before']]
  assert row['seeds'] == len(diffs)
  assert row['diff'] == pytest.approx(np.mean(diffs), abs=1e-12)
  assert row['paired_se'] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
  assert row['verdict'] == ('reproduces' if row['diff'] >= -2 * row['paired_se'] else
                            'regression')
  table = (tmp_path / 'versions.md').read_text()
  assert len(r['rows']) > 5 and all(f'| {x["figure"]} | {x["seeds"]} |' in table for x in r['rows'])


def test_selection_training_and_valuation_noise_run_at_their_smallest(tmp_path, tfds_dir):
  """bench.selection's training runs (every bench entry but the SAE ablations) and
  bench.valuation_noise (every method kind, a DataRater and the curricula), on digits."""
  env = subprocess_env(1)
  out = tmp_path / 'selection'
  # usage_penalty 0: its Gini ablation's two rows are one setting (its Markdown raised KeyError).
  proc = _run('bench.selection', [
      '--folds=1', '--seeds=1', '--epochs=2', '--ratios=0.5', '--policies=random,infobatch,sae',
      f'--config.data.data_dir={tfds_dir}', '--config.features.train_steps=5',
      '--config.sae.steps=5', '--config.sae_scores.usage_penalty=0', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.md', '.png')
  assert sorted((x['noise'], x['policy']) for x in r['runs']) == sorted(
      (z, p) for z in (0.0, 0.2) for p in ('full', 'random', 'infobatch', 'sae'))
  for x in r['runs']:
    train = _train_split(tfds_dir, 'train', x['noise'], 0)
    assert x['example_grads_full'] == 2 * len(train)  # epochs x the split
    if x['policy'] == 'full':  # every example once an epoch
      assert x['example_grads'] == x['example_grads_full'] and x['count_gini'] == 0
      assert x['noisy_share_of_grads'] == pytest.approx(train.is_corrupted.mean())
    else:  # exactly max(1, round(ratio N)) an epoch, as datarater/policies/selection.py says
      assert x['example_grads'] == 2 * max(1, round(0.5 * len(train))), x
  ginis = r['gini_usage_penalty']
  assert sorted(ginis) == ['noise 0%, ratio 0.5', 'noise 20%, ratio 0.5']
  assert all(g['without_penalty'] == g['with_penalty'] for g in ginis.values())
  assert len(r['table']) == 8 and all(row['runs'] == 1 for row in r['table'])

  out = tmp_path / 'valuation_noise'
  proc = _run('bench.valuation_noise', [
      '--seeds=0', '--variants=tracin_self,mimic,dvemb', '--rater_steps=2',
      f'--config.data.data_dir={tfds_dir}', '--config.data.train_split=train[:64]',
      '--config.valuation.train_steps=4', '--config.valuation.checkpoint_every=2',
      '--config.valuation.reference_steps=2', '--config.valuation.dvemb_steps=4',
      '--config.inner.population=2', '--config.inner.batch_size=16',
      '--config.outer.batch_size=16', '--config.valuation.batch_size=16', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.md', '.png')
  assert not r['failed'], r['failed']
  assert [x['variant'] for x in r['runs']] == ['tracin_self', 'mimic', 'dvemb', 'datarater']
  cost = {x['variant']: x['example_gradients'] for x in r['runs']}
  # The recorded run (4 steps of 16) and every example's gradient at its 2 checkpoints; Mimic's
  # reference run adds 2 steps of 16.
  assert cost['tracin_self'] == 4 * 16 + 64 * 2 and cost['mimic'] == 4 * 16 + 2 * 16 + 64 * 2
  assert all(0 <= x['auroc'] <= 1 for x in r['runs'])
  (curriculum,), (online,) = r['curriculum'], r['mimic_online']
  assert curriculum['source'] == 'tracin_self'
  assert all(0 <= curriculum[k] <= 1 for k in ('uniform', 'loss_weights', 'select_top20'))
  assert all(0 <= online[k] <= 1 for k in ('mimic_online_tau1', 'mimic_online_tau0.1'))
  assert len(r['rater_seconds']) == 1
  table = (tmp_path / 'valuation_noise.md').read_text()
  for x in r['runs']:
    assert f'| 20% | {x["variant"]} | {x["auroc"]:.3f} ± 0.000 |' in table


def _needs_text():
  from datarater.data import python_text  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(python_text.DOC_DIR):
    pytest.skip('needs Debian package python3.11-doc (apt-get install python3.11-doc)')


def _text_train_split(tfds_dir):
  from configs import text_bench  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  data = text_bench.get_config().data
  data.data_dir = tfds_dir
  return pipeline.load_split(data, 'train[:256]', corrupt=True)


# One small rater run of configs/text_bench.py: lm_curation's (seed 0) and lm_advance_probe's.
TEXT_RATER = ['--config.outer.steps=2', '--config.outer.warmup_steps=1',
              '--config.data.train_split=train[:256]', '--config.data.heldout_split=heldout[:64]']


def test_the_text_benches_run_at_their_smallest(tmp_path, tfds_dir):
  """bench.lm_curation (one seed, one keep, a transfer run of one evaluation),
  bench.lm_advance_probe on the same rater run, and bench.lm_harm_probe."""
  _needs_text()
  env = dict(subprocess_env(1), TFDS_DATA_DIR=tfds_dir)  # lm_harm_probe takes no data_dir
  out = tmp_path / 'lm_curation'
  proc = _run('bench.lm_curation', [
      '--bench.seeds=(0,)', '--bench.methods=("datarater","tracin")', '--bench.keeps=(0.7,)',
      '--bench.transfer.steps=2', '--bench.transfer.evals=1', '--bench.transfer.batch_size=8',
      *TEXT_RATER, '--config.log_every=2', '--config.checkpoint_every=2',
      '--config.data.eval_split=test[:32]', '--config.valuation.train_steps=2',
      '--config.valuation.checkpoint_every=2', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.md', '.png')
  seed = r['seeds']['0']
  assert seed['num_train'] == 256
  runs = seed['runs']
  assert {(name, k) for name, by_keep in runs.items() for k in by_keep} == {
      ('all', '-'), ('oracle', '-'), ('random', '0.7'), ('datarater', '0.7'), ('tracin', '0.7')}
  corrupted = int(_text_train_split(tfds_dir).is_corrupted.sum())
  for name, by_keep in runs.items():
    for x in by_keep.values():
      # Its groups (clean prose, code, each corruption kind of prose) partition each corpus.
      assert sum(x['kept'].values()) == {'all': 256, 'oracle': 256 - corrupted}.get(
          name, round(0.7 * 256)), (name, x['kept'])
      assert len(x['curve']) == 1  # one evaluation: the plot drew it (a traceback before)
  oracle = runs['oracle']['-']['kept']  # the recorded bad data removed
  assert all(n == 0 for group, n in oracle.items() if group not in ('clean prose', 'code'))
  for name in ('oracle', 'random', 'datarater', 'tracin'):
    row = r['summary']['corpora'][name]['-' if name == 'oracle' else '0.7']
    loss = runs[name]['-' if name == 'oracle' else '0.7']['loss']
    assert row['vs_all']['diff'] == pytest.approx(loss - runs['all']['-']['loss'], abs=1e-12)
  for m in ('datarater', 'tracin'):
    assert all(0 <= a <= 1 for a in seed['learned'][m]['auroc'].values())
  # TracIn's cost: its recorded run (2 steps of text_bench's 32) and each sequence's gradient at
  # its one checkpoint; tokens: 127 predicted of each 128-byte sequence.
  assert seed['setup_example_gradients']['tracin'] == 2 * 32 + 256
  assert r['summary']['cost']['tracin']['tokens'] == (2 * 32 + 256) * 127
  assert r['summary']['budget_tokens'] == 2 * 8 * 127  # the transfer runs: 2 steps of 8
  # lm_advance_probe meta-trains the same rater (seed 0, the same config): the same AUROCs.
  out = tmp_path / 'lm_advance_probe'
  proc = _run('bench.lm_advance_probe', ['--seed=0', *TEXT_RATER, f'--out={out}'], env)
  probe = json.loads(proc.stdout.strip().splitlines()[-2])  # the line before 'wrote ...'
  assert probe['seed'] == 0 and probe['outer.steps'] == 2
  want = seed['learned']['datarater']['auroc']
  assert probe['auroc'] == {k: round(v, 3) for k, v in want.items()}
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.md')
  assert r['seed'] == 0 and r['overrides']['outer.steps'] == 2
  assert r['auroc'] == pytest.approx(want, abs=1e-12)
  header, _, row = [line.strip('|').split(' | ') for line in
                     (tmp_path / 'lm_advance_probe.md').read_text().splitlines()[2:5]]
  cells = dict(zip([h.strip() for h in header], [c.strip() for c in row]))
  assert cells['seed'] == '0' and cells['overrides'] == ', '.join(a[9:] for a in TEXT_RATER)
  assert {k: cells[k.replace('_', ' ')] for k in want} == {k: f'{v:.3f}' for k, v in want.items()}

  out = tmp_path / 'lm_harm_probe'
  proc = _run('bench.lm_harm_probe', ['--sizes=inner', '--seeds=0', '--ages=0,1',
                                      '--group_steps=1', '--examples=8', f'--out={out}'], env)
  _files(out, '.json', '.md')
  rows = _stamped(f'{out}.json', proc)['rows']
  assert [(x['size'], x['seed'], x['age']) for x in rows] == [('inner', 0, 0), ('inner', 0, 1)]
  # Before Adam's first step there is no preconditioner: both rankings are one.
  assert rows[0]['auroc_adam'] == rows[0]['auroc_sgd']
  assert all(0 <= a <= 1 for x in rows for a in x['auroc_sgd'].values())
  assert 'python -m bench.lm_harm_probe' in (tmp_path / 'lm_harm_probe.md').read_text()


def _multihost_stop_compiling_quickly(args: list) -> None:
  """bench.multihost_stop with its processes compiling as the tests' subprocesses do."""
  popen = subprocess.Popen

  def quick(command, *a, env=None, **kwargs):
    if env and 'XLA_FLAGS' in env:  # the bench's processes: it sets their device count
      env = dict(env, XLA_FLAGS=f'{env["XLA_FLAGS"]} {FAST_COMPILE} {ONE_THREAD}')
    return popen(command, *a, env=env, **kwargs)
  subprocess.Popen = quick
  forked.as_main('bench.multihost_stop', args)


def test_multihost_stop_runs_at_its_smallest(tmp_path):
  """One try of each stop and one timed pair of 40-step two-process runs."""
  out = tmp_path / 'multihost_stop'
  args = ['--tries=1', '--steps=40', f'--out={out}']
  done = forked.call(_multihost_stop_compiling_quickly, args, env=subprocess_env(1), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  done.args = ['python', '-m', 'bench.multihost_stop', *args]
  r = _stamped(f'{out}.json', done)
  _files(out, '.json', '.png')
  assert [s['mode'] for s in r['stops']] == ['one', 'both']
  for s in r['stops']:  # both processes stopped by SIGTERM, checkpointed where they stopped
    assert s['exit_codes'] == [143, 143] and s['tail'] is None, s
    assert 30 <= s['stopped_after'] == s['newest_checkpoint'] < 40, s
  assert r['stopped_together'] == '2 of 2'
  (pair,) = r['timed']
  ms = [1e3 / pair['steps_per_sec_vote'], 1e3 / pair['steps_per_sec_no_vote']]
  assert r['vote_ms_per_step']['diff'] == pytest.approx(ms[0] - ms[1])


def _needs_fashion():
  if not os.path.isdir(FASHION_DIR):
    pytest.skip('needs Debian package dataset-fashion-mnist '
                '(apt-get install dataset-fashion-mnist)')


def test_cnn_patches_runs_at_its_smallest(tmp_path, tfds_dir):
  """One round of each job, on 64 images in batches of 8, K = 2, T = 2, from its flags."""
  _needs_fashion()
  env = dict(subprocess_env(1), TFDS_DATA_DIR=tfds_dir)  # it takes no data_dir
  out = tmp_path / 'cnn_patches'
  proc = _run('bench.cnn_patches', [
      '--repeats=1', '--examples=64', '--batch=8', '--inner_batch=8', '--population=2',
      '--unrolls=2', '--epochs=1', '--calls=1', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.png')
  assert len(r['times']) == 3 and r['repeats'] == 1 and r['train_split'] == 'train[:64]'
  assert 'meta (ms/outer step, K=2, T=2)' in r['times']
  for job, t in r['times'].items():
    assert sorted(t) == ['lax', 'slices'] and all(len(v) == 1 and v[0] > 0 for v in t.values())
    ratio = t['lax'][0] / t['slices'][0]
    assert r['ratio'][job]['per_round'] == [ratio] and r['ratio'][job]['mean'] == ratio
    assert r['ratio'][job]['sem'] is None  # one round: no spread (NaN, written as null)


def test_valuation_scale_methods_and_launchers_run_at_their_smallest(tmp_path, tfds_dir):
  """bench.valuation_scale --quick's methods and launchers sections (one size)."""
  _needs_fashion()
  env = dict(subprocess_env(1), TFDS_DATA_DIR=tfds_dir)  # its methods take no data_dir
  out = tmp_path / 'valuation_scale'
  proc = _run('bench.valuation_scale', [
      '--quick', '--sections=methods,launchers', '--launcher_ns=1000',
      f'--scratch={tmp_path / "scratch"}', f'--out={out}'], env)
  r = _stamped(f'{out}.json', proc)
  _files(out, '.json', '.md', '.png')
  assert r['quick'] and 'store' not in r
  for section in ('methods', 'launchers'):  # each section stamped too (kept by a later run)
    assert shlex.split(r[section]['made_by']['command']) == proc.args
  runs = r['methods']['runs']
  assert [(x['task'], x['k']) for x in runs] == [('cnn', 8)] * 5 + [('transformer', 8)] * 5 + [
      ('transformer', 16)] * 3
  for x in runs:
    assert x['dim'] == x['k'] ** 2 * x['dense_layers']  # k x k per Dense layer
    assert [p['n'] for p in x['series']] == ([64, 128] if x['task'] == 'cnn' else
                                             [32, 64] if x['k'] == 8 else [32])
  # The factored projection against the dense per-example gradients times the same factors.
  errors = r['methods']['factored_vs_dense_kronecker_max_rel_err_float32']
  assert sorted(errors) == ['cnn_k8', 'transformer_k16', 'transformer_k8']
  assert all(e < 1e-4 for e in errors.values()), errors
  (row,) = r['launchers']['rows']
  assert row['n'] == 1000 and row['filter']['kept'] == 800  # keep 0.8, exact
  assert 0 <= row['valuate']['noise_auroc'] <= 1
