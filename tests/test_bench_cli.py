"""Benchmarks fail on a bad command line as the launchers do: one `error:` line naming the bad
value, exit 2, before any run and without writing anything. Each case is its command line in its
own process (`tests.forked`)."""
import json
import os
import runpy
import shutil
import signal
import sys

import numpy as np
import pytest

from launch import cli
from tests import forked
from tests.test_bad_input import _override
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('bench, args, says', [
    ('curation', ['--seeds=0,x'], "--seeds must be ints separated by commas, got '0,x'"),
    ('curation', ['--keep=0.7,1.5'], '--keep values must be in (0, 1], got 1.5'),
    ('curation', ['--methods=datarater,nope'], "unknown --methods ['nope']"),
    ('valuation_noise', ['--noise=1'], '--noise values must be in [0, 1), got 1.0'),
    ('curation', ['--config.no_such_field=1'], 'no_such_field'),
    ('selection', ['--ratios=0.3,a'], "--ratios must be floats separated by commas, got '0.3,a'"),
    ('selection', ['--config.sae_scores.mislabel_guard=bogus'], "got 'bogus'"),
    ('selection', ['--config.sae_scores.no_such_field=1'], "unknown config field 'no_such_field'"),
    ('curation', ['--config=README.md'], "cannot load --config 'README.md': SyntaxError"),
    ('lm_curation', ['--bench=configs/text_bench.py:nope'],
     "cannot load --bench 'configs/text_bench.py:nope': ValueError"),
    ('curation', ['--epochs=0'], '--epochs must be >= 1, got 0'),
    ('curation', ['--evals_per_epoch=0'], '--evals_per_epoch must be >= 1, got 0'),
    ('noise_ceiling', ['--epochs=0'], '--epochs must be >= 1, got 0'),
    ('noise_ceiling', ['--folds=0'], '--folds must be >= 2, got 0'),
    ('noise_ceiling', ['--folds=1'], '--folds must be >= 2, got 1'),
    ('meta_step', ['--repeats=0'], '--repeats must be >= 1, got 0'),
    ('multihost_stop', ['--tries=0'], '--tries must be >= 1, got 0'),
    ('multihost_stop', ['--steps=10'], '--steps must be >= 40, got 10'),  # 3 records of 10 steps
    ('noise_ceiling', ['--seeds='], '--seeds is empty'),  # it wrote results of no runs
    ('pergrad', ['--batch=0'], '--batch must be >= 1, got 0'),
    ('cnn_patches', ['--repeats=0'], '--repeats must be >= 1, got 0'),
    ('cnn_patches', ['--examples=0'], '--examples must be >= 1, got 0'),
    ('lm_advance_probe', ['--seed=-1'], '--seed values must be in [0, 2147483647], got -1'),
    ('curation', ['--rater_steps=-1'], '--rater_steps must be >= 1, got -1'),
    ('curation', ['--seeds_by_noise=0.2:0'], "a count in [1, 2147483648], got '0.2:0'"),
    ('curation', ['--seeds_by_noise=0.2:3000000000'], "got '0.2:3000000000'"),  # a 3e9 list
    # Empty: curation ran every corpus with no method, valuation_noise wrote an empty table.
    ('curation', ['--methods='], '--methods is empty: give at least one of'),
    ('valuation_noise', ['--variants='], '--variants is empty: give at least one of'),
    # Twice: the same runs stored twice, or run again and overwritten.
    ('valuation_noise', ['--noise=0.2,0.2'], '--noise repeats 0.2: give each value once'),
    ('curation', ['--keep=0.5,0.5'], '--keep repeats 0.5: give each value once'),
    ('curation', ['--methods=mimic,mimic'], '--methods repeats mimic: give each once'),
    # An empty --launcher_ns means the default sizes; it was refused before --block was read.
    ('valuation_scale', ['--block=0'], '--block must be >= 1, got 0'),
    ('valuation_scale', ['--sections='], '--sections is empty'),
    # A block not split evenly into the tasks' gradient chunks: a reshape traceback mid-run.
    ('valuation_scale', ['--block=100'],
     '--block must be at most or a multiple of cnn valuation.chunk_size 64, got 100'),
    # Noise 0 crashed writing the table after every model had trained; folds past the split
    # gave a traceback after the earlier folds had trained.
    ('noise_ceiling', ['--noise=0,0.2'], '--noise values must be in (0, 1): at 0 there is nothing'),
    ('noise_ceiling', ['--config=configs/digits.py', '--config.data.train_split=train[:10]',
                       '--folds=12', '--other_split=', '--val_split=validation'],
     "--folds must be at most the 10 examples of 'train[:10]', got 12"),
    # Models are seeded 100 * seed + fold: fold 100 of seed 0 trained as fold 0 of seed 1 (the
    # same initialisation and order; fold 99 as clean_other); 100 * seed + fold past int32 was a
    # traceback after the seeds before it had trained.
    ('noise_ceiling', ['--config=configs/digits.py', '--config.data.train_split=train[:99]',
                       '--folds=100', '--other_split=', '--val_split=validation'],
     '--folds must be <= 99 (fold f of seed s trains with seed 100 s + f'),
    ('noise_ceiling', ['--config=configs/digits.py', '--config.data.train_split=train[:20]',
                       '--seeds=0,21474837', '--noise=0.2', '--folds=2', '--epochs=1',
                       '--other_split=', '--val_split=validation'],
     '--seeds values must be <= 21474836 (models are seeded up to 100 * seed + 1)'),
    # Not checked: the models trained at that rate (gradient ascent) and were reported, exit 0.
    ('noise_ceiling', ['--config=configs/digits.py', '--config.data.train_split=train[:20]',
                       '--config.train.learning_rate=-1', '--seeds=0', '--noise=0.2',
                       '--folds=2', '--epochs=1', '--other_split=', '--val_split=validation'],
     'train.learning_rate must be > 0, got -1.0'),
    ('lm_harm_probe', ['--group_steps=0'], '--group_steps must be >= 1, got 0'),  # effects all 0
    ('lm_harm_probe', ['--examples=0'], '--examples must be >= 1, got 0'),
    ('lm_harm_probe', ['--examples=100000'], '--examples must be <= '),  # after the data loads
    ('lm_harm_probe', ['--sizes='], '--sizes is empty'),
    ('lm_harm_probe', ['--sizes=inner,inner'], '--sizes repeats inner'),  # its rows twice
    # A model only trains on: the row of age 100 was a second probe at age 400, labelled 400.
    ('lm_harm_probe', ['--ages=400,100'], '--ages must increase (each is reached by training on '
     'from the one before), got 100 after 400'),
    ('meta_step', ['--modes=nope'], "unknown --modes ['nope']"),  # the table header came first
    ('meta_memory', ['--modes=nope'], "unknown --modes ['nope']"),
    ('meta_memory', ['--models='], '--models is empty'),
    # An empty --accuracy_unrolls skips that check, as its help says (it was refused).
    ('meta_memory', ['--accuracy_unrolls=', '--modes=nope'], "unknown --modes ['nope']"),
    ('lm_curation', ['--bench.primary_keep=0.6'], '--bench.primary_keep 0.6 is not one of'),
    ('lm_curation', ['--bench.methods=("nope",)'], "unknown --bench.methods ['nope']"),
    ('lm_curation', ['--bench.seeds=()'], '--bench.seeds is empty'),
    # A seed twice ran twice and was reported once among 'N seeds'; one past int32 failed only
    # after the seeds before it had run.
    ('lm_curation', ['--bench.seeds=(5,5)'], '--bench.seeds repeats seed 5: give each seed once'),
    ('lm_curation', ['--bench.keeps=(0.7,0.7)'], '--bench.keeps repeats 0.7: give each value once'),
    ('lm_curation', ['--bench.methods=("tracin","tracin")'],
     '--bench.methods repeats tracin: give each once'),
    ('lm_curation', ['--bench.seeds=(5,3000000000)'],
     '--bench.seeds values must be in [0, 2147483647], got 3000000000'),
    # Parts swapped or forgotten were tracebacks; no methods ran the whole bench, then lost it.
    ('lm_curation', ['--bench=configs/text_bench.py'], 'unknown config field --bench.'),
    ('lm_curation', ['--bench.methods=()'], '--bench.methods is empty'),
    # Joined into (5, 6, 7) for --bench (refused for --config alone).
    ('lm_curation', ['--bench.seeds=(5,6)', '--bench.seeds=(7,)'], '--bench.seeds is given twice'),
    # Refused only after the first seed's rater and valuations had trained.
    ('lm_curation', ['--bench.transfer.steps=0'], '--bench.transfer.steps must be >= 1, got 0'),
    # A seed twice counted one model twice (a std of 0); one past int32 failed every run.
    ('valuation_noise', ['--seeds=5,5'], '--seeds repeats seed 5: give each seed once'),
    ('valuation_noise', ['--seeds=214748365'], '--seeds values must be <= 214748264 (fresh'),
    ('train_rater_seeds', ['--seeds=3000000000'], '--seeds values must be in [0, 2147483647]'),
    ('meta_memory', ['--accuracy_warm=-5'], '--accuracy_warm must be >= 0, got -5'),  # at the end
    ('selection', ['--policies='], '--policies is empty'),  # it ran full data alone
    ('selection', ['--policies=sae,sae'], '--policies repeats sae: give each once'),
    # Fold 1 of 2 held out all of train and trained on the test split alone.
    ('selection', ['--folds=2'], '--folds must be 1 or >= 3'),
    # Out of range: valuation_noise wrote a results file of failed variants, exit 0; curation
    # refused after its first valuations, naming 'batch_size'.
    ('valuation_noise', ['--config.valuation.train_steps=0'],
     'valuation.train_steps must be >= 1, got 0'),
    ('curation', ['--config.train.batch_size=0'], 'train.batch_size must be >= 1, got 0'),
    # Fields a bench sets from its own flags: the override changed nothing (the results recorded
    # it in their config); the first ran at --epochs, 40, the others at --noise and --seeds.
    ('curation', ['--config.train.epochs=4'],
     '--config.train.epochs is not read by this benchmark: --epochs sets it'),
    ('selection', ['--config.data.label_noise=0.4'],
     '--config.data.label_noise is not read by this benchmark: --noise sets it'),
    ('selection', ['--config.train.seeds=(3,)'],  # each run trained seed s (now run_seed)
     '--config.train.seeds is not read by this benchmark: --seeds sets it'),
    ('noise_ceiling', ['--config=configs/digits.py', '--config.data.train_split=train[:20]',
                       '--config.seed=3', '--seeds=0', '--noise=0.2', '--folds=2', '--epochs=1',
                       '--other_split=', '--val_split=validation'],
     '--config.seed is not read by this benchmark: --seeds sets it'),
    ('curation', ['--noise=0.2', '--seeds_by_noise=0.4:3'],  # it ran 0.2 alone
     '--seeds_by_noise names noise 0.4, which --noise does not hold'),
    # --quick sets these itself: the values given were silently replaced (ratios 0.3 and 0.7).
    ('selection', ['--quick', '--ratios=0.5'], '--ratios is not read with --quick, which sets it'),
    ('selection', ['--quick', '--config.train.epochs=3'],
     '--config.train.epochs is not read by this benchmark: --quick sets it'),
    ('selection', ['--epochs=4', '--config.train.epochs=3'],  # ran 4 epochs
     '--config.train.epochs is not read by this benchmark: --epochs sets it'),
    ('selection', ['--extractor=pixels', '--config.features.extractor=penultimate'],
     '--config.features.extractor is not read by this benchmark: --extractor sets it'),
    ('meta_memory', ['--quick', '--unrolls=2'], '--unrolls is not read with --quick, which sets'),
    # Past int32: curation ran its valuations and raters, then failed at train.epochs;
    # selection's --seeds ran out of memory listing them.
    ('curation', ['--epochs=3000000000'], '--epochs must be <= 2147483647, got 3000000000'),
    ('selection', ['--seeds=1000000000000'], '--seeds must be <= 2147483647, got 1000000000000'),
    ('valuation_noise', ['--variants=datarater', '--rater_steps=0'],  # 'log_every must be >= 1'
     '--variants datarater needs --rater_steps >= 1'),
    # A section no run of the bench reads: lm_curation trained on; a ratio twice ran it twice.
    ('lm_curation', ['--config.train.epochs=0'], '--config.train.epochs is not read by '
     'bench.lm_curation: it reads the config sections data, task, rater, inner, outer'),
    ('curation', ['--config.sae.k=3'], '--config.sae.k is not read by bench.curation'),
    ('selection', ['--ratios=0.3,0.3'], '--ratios repeats 0.3: give each value once'),
    # absl kept the last list: it ran seed 1 alone.
    ('curation', ['--seeds=0', '--seeds=1'], '--seeds is given twice (the last, 1, would'),
    # An empty prefix: the whole bench ran, then wrote .json, .md and .png into the cwd.
    ('curation', ['--out='], "--out is empty: give an output prefix (default "
     "'bench/results/curation')"),
])
def test_a_bad_value_is_one_line_and_exit_2(tmp_path, bench, args, says):
  out = tmp_path / 'out' / 'result'
  proc = forked.run(f'bench.{bench}', [f'--out={out}', *args], subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
  assert not proc.stdout.strip()  # nothing ran
  assert not any(f.is_file() for f in tmp_path.rglob('*'))  # nothing written


# Each bench with a --config: its config file, flags, a section of it those flags leave unread,
# and a flag value its main refuses just after its config check (a run given it stops there).
_CONFIG_BENCHES = [
    ('curation', 'digits', '', 'sae', '--noise=2', '--noise values must be in [0, 1)'),
    ('lm_advance_probe', 'text_bench', '', 'train', '--seed=-1', '--seed values must be in'),
    ('lm_curation', 'text_bench', '', 'train', '--bench.seeds=()', '--bench.seeds is empty'),
    ('noise_ceiling', 'fashion_mnist_bench', '', 'valuation', '--noise=0',
     '--noise values must be in (0, 1)'),
    *[pytest.param('selection', 'selection', argv, 'valuation', '--policies=',
                   '--policies is empty', marks=pytest.mark.slow)  # ~1 s a run
      for argv in ('', '--quick --extractor=pixels')],
    ('valuation_noise', 'digits', '', 'rater', '--noise=1', '--noise values must be in [0, 1)'),
    ('valuation_noise', 'digits', '--rater_steps=2 --nocurriculum', 'policy', '--noise=1',
     '--noise values must be in [0, 1)'),
]


def _bench_help(bench: str, argv: list[str]) -> tuple[str, dict[str, str]]:
  """(the --help text, {dotted field: its value's repr} of the config fields it lists)."""
  proc = forked.run(f'bench.{bench}', [*argv, '--help'], subprocess_env(1), ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout, dict(l[len('  --config.'):].split('=', 1)
                           for l in proc.stdout.splitlines() if l.startswith('  --config.'))


def _refusal(bench: str, argv: list[str], field: str, shown: str) -> str:
  """The error line of the bench given `argv` and an override of `field` to its value."""
  proc = forked.run(f'bench.{bench}', [*argv, _override(field, shown)], subprocess_env(1), ROOT)
  assert proc.returncode == 2 and not proc.stdout.strip(), (field, proc.stderr[-2000:])
  return proc.stderr.strip()


def _help_case(bench, config, argv, unread, late, says):
  """(--help's text, {field: repr} of the whole config, the first field of each section the help
  of `bench` with `argv` leaves out, the fields it leaves out of the sections it lists), after
  checking that it lists some and every one of them, overridden at once, passes the bench's own
  checks up to `late` (the run stops at that value, refused, naming no field)."""
  argv = argv.split()
  text, listed = _bench_help(bench, argv)
  every = {f: repr(v) for f, v in cli._leaves(  # pylint: disable=protected-access
      runpy.run_path(os.path.join(ROOT, 'configs', f'{config}.py'))['get_config']())}
  assert listed and set(listed) <= set(every), (set(listed) - set(every))
  proc = forked.run(f'bench.{bench}', [*argv, *map(_override, listed, listed.values()), late],
                    subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
  sections = {f.split('.')[0] for f in listed}
  left_out = {f.split('.')[0]: f for f in sorted(every, reverse=True)
              if f.split('.')[0] not in sections}
  assert unread in left_out, left_out
  within = [f for f in every if f not in listed and f.split('.')[0] in sections]
  return text, every, left_out, within


@pytest.mark.parametrize('bench, config, argv, unread, late, says', _CONFIG_BENCHES)
def test_a_benchs_help_lists_the_config_fields_it_reads_and_no_other(
    bench, config, argv, unread, late, says):
  """A bench's --help listed every field of its config, the run refusing those of the sections
  it does not read. The oracle is the bench's own refusal: every field listed, overridden, passes
  (all at once), and the first field of a section left out (`unread`) is refused as unread."""
  text, every, left_out, _ = _help_case(bench, config, argv, unread, late, says)
  assert f'--config.{left_out[unread]} is not read' in _refusal(
      bench, argv.split(), left_out[unread], every[left_out[unread]])
  assert ('which are read depends on' in text) == (bench in ('selection', 'valuation_noise'))


@pytest.mark.slow
@pytest.mark.parametrize('bench, config, argv, unread, late, says', _CONFIG_BENCHES)
def test_every_config_field_a_benchs_help_leaves_out_is_refused(
    bench, config, argv, unread, late, says):
  """Each field left out (`_help_case`), overridden alone, is refused as not read."""
  _, every, left_out, within = _help_case(bench, config, argv, unread, late, says)
  for field in [*left_out.values(), *within]:
    assert f'--config.{field} is not read' in _refusal(bench, argv.split(), field, every[field])


def test_the_top_level_fields_a_benchs_rater_runs_set_are_neither_listed_nor_accepted(
    monkeypatch):
  """`runs.train_rater` (bench.curation's and bench.valuation_noise's rater runs) starts the same
  run whatever the config's `log_every` and `checkpoint_every` (the oracle: the config it hands
  `meta_train`, captured): bench.curation's --help listed both (and took an override of either:
  `test_every_config_field_a_benchs_help_leaves_out_is_refused`)."""
  from bench import runs  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(runs, 'meta_train', lambda c, workdir: seen.append(c.to_dict()))
  config = runpy.run_path(os.path.join(ROOT, 'configs', 'digits.py'))['get_config']()
  for every in (1, 7):
    c = config.copy_and_resolve_references()
    c.log_every = c.checkpoint_every = every
    runs.train_rater(c, 3, 'unused')
  assert seen[0] == seen[1]
  _, listed = _bench_help('curation', [])
  assert not {'log_every', 'checkpoint_every'} & set(listed), listed  # refused: the slow test


def test_a_benchs_config_without_the_policies_or_estimators_own_fields_holds_their_defaults(
    tmp_path):
  """A config file may leave out a policy's own fields (`register_policy(schema=...)`) and an
  estimator's (`register_estimator(schema=...)`): it then holds their defaults, as
  configs/digits.py sets them. bench.curation's --config did not fill them in (launch.train's
  and launch.train_rater's alone did): `--config.policy.temperature` or, under
  meta_gradient='mixed', `--config.outer.mixed_segment` was refused as unknown, and the runs
  stopped in a traceback where they read `c.policy.temperature` (after the rater runs and
  valuations)."""
  config = tmp_path / 'own_fields_left_out.py'
  config.write_text(
      'import runpy\n\n'
      'def get_config():\n'
      f'  c = runpy.run_path({os.path.join(ROOT, "configs", "digits.py")!r})["get_config"]()\n'
      '  for field in [f for f in c.policy if f != "name"]:\n'
      '    del c.policy[field]\n'
      '  for field in [f for f in c.outer if f.startswith("mixed_")]:\n'
      '    del c.outer[field]\n'
      '  return c\n')
  own = lambda f: f.startswith(('policy.', 'outer.mixed_'))
  shipped = {f: repr(v) for f, v in cli._leaves(  # pylint: disable=protected-access
      runpy.run_path(os.path.join(ROOT, 'configs', 'digits.py'))['get_config']()) if own(f)}
  assert any(f.startswith('outer.') for f in shipped)
  listed = _bench_help('curation', [f'--config={config}', '--config.outer.meta_gradient=mixed'])[1]
  assert {f: v for f, v in listed.items() if own(f)} == shipped


def test_the_advance_probe_given_the_bench_part_is_one_line():
  """lm_advance_probe read text_bench.py's bench part as its config: a traceback."""
  proc = forked.run('bench.lm_advance_probe', ['--config=configs/text_bench.py:bench'],
                    subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert 'unknown config field keeps' in lines[0], lines


@pytest.mark.slow
def test_a_run_the_seeds_bench_starts_that_fails_is_its_one_line(tmp_path):
  """bench.train_rater_seeds ran launch.train_rater with check=True: a config it refused was a
  CalledProcessError traceback hiding the launcher's own line."""
  proc = forked.run('bench.train_rater_seeds', [f'--out={tmp_path}/r', '--config=README.md',
                                                '--seeds=0'], subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith('error: launch.train_rater --config=README.md (seed 0) failed: '
                             "cannot load --config 'README.md'"), lines


def _seeds_bench_without_fresh_models(out: str) -> None:
  """bench.train_rater_seeds on two seeds, each launch.train_rater run stubbed by one writing the
  report of a config that trains no fresh models (final_eval.num_models 0, as
  configs/fashion_mnist_bench.py and configs/text_bench.py do)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  run = subprocess.run
  def launcher(args, **kwargs):
    if args[1:3] != ['-m', 'launch.train_rater']:
      return run(args, **kwargs)  # git describe
    workdir = next(a for a in args if a.startswith('--workdir=')).removeprefix('--workdir=')
    seed = next(a for a in args if a.startswith('--config.seed=')).removeprefix('--config.seed=')
    with open(os.path.join(workdir, 'report.json'), 'w') as f:
      json.dump({'noise_auroc': 0.5 + int(seed) / 10, 'fresh_models': {}}, f)
    return subprocess.CompletedProcess(args, 0, 'noise AUROC\n', '')
  subprocess.run = launcher
  forked.as_main('bench.train_rater_seeds', [f'--out={out}', '--seeds=1,2',
                                             '--config=configs/fashion_mnist_bench.py'])


@pytest.mark.slow
def test_the_seeds_bench_reports_a_config_without_fresh_models(tmp_path):
  """A report without fresh models was a KeyError traceback after the first seed's rater run."""
  done = forked.call(_seeds_bench_without_fresh_models, str(tmp_path / 'r'),
                     env=subprocess_env(1))
  assert done.returncode == 0, done.stderr[-2000:]
  seeds = json.loads((tmp_path / 'r.json').read_text())['seeds']
  assert {s: r['noise_auroc'] for s, r in seeds.items()} == {'1': 0.6, '2': 0.7}
  for r in seeds.values():
    assert [r[k] for k in ('heldout_loss_rater', 'heldout_loss_uniform', 'test_accuracy_rater',
                           'test_accuracy_uniform')] == [None] * 4, r


@pytest.mark.parametrize('bench, kind, flag, says', [
    ('steps_saved', 'curation', '--results={}_curation.json', 'expected a bench.curation results'),
    ('versions', 'seeds', '--before={}', 'expected a bench.train_rater_seeds output'),
    ('versions', 'curation', '--before={}', 'expected a bench.curation output'),
    ('versions', 'valuation', '--before={}', 'expected a bench.valuation_noise output'),
    ('versions', 'selection', '--before={}', 'expected a bench.selection output'),
    ('meta_memory', 'meta_memory', '--merge={}_meta_memory.json',
     'expected a bench.meta_memory results file'),
])
def test_a_truncated_results_file_is_one_line_and_exit_2(tmp_path, bench, kind, flag, says):
  prefix = tmp_path / 'in' / 'old'
  prefix.parent.mkdir()
  path = tmp_path / 'in' / f'old_{kind}.json'
  path.write_text('{"runs": {"0.2": {"0": {"all": ')  # a copy cut short
  out = tmp_path / 'out' / 'result'
  args = [flag.format(prefix)] + ([f'--after={prefix}'] if bench == 'versions' else [])
  proc = forked.run(f'bench.{bench}', [f'--out={out}', *args], subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and f"'{path}' is not readable JSON" in lines[0], lines
  assert says in lines[0], lines
  assert [f for f in tmp_path.rglob('*') if f.is_file()] == [path]  # nothing written


def _edited(source: str, dest, edit) -> None:
  with open(os.path.join(ROOT, source)) as f:
    data = json.load(f)
  edit(data)
  dest.write_text(json.dumps(data))


def _first(d: dict):
  return next(iter(d.values()))


@pytest.mark.parametrize('edit, says', [
    # A record missing a figure was a KeyError traceback; one not a number, a TypeError.
    (lambda d: _first(d['seeds']).pop('noise_auroc'), "KeyError 'noise_auroc'"),
    (lambda d: _first(d['seeds']).update(noise_auroc='high'), "is 'high', not a number"),
    (lambda d: d['seeds'].update(a=_first(d['seeds'])), "has seed 'a', not an integer"),
])
def test_a_seeds_file_versions_cannot_read_is_one_line(tmp_path, edit, says):
  path = tmp_path / 'old_seeds.json'
  _edited(os.path.join('bench', 'results', 'stream_tag_check', 'before_seeds.json'), path, edit)
  out = tmp_path / 'out' / 'result'
  proc = forked.run('bench.versions', [f'--out={out}', f'--before={tmp_path}/old',
                                       f'--after={tmp_path}/old'], subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and says in lines[0], lines
  assert not out.parent.exists()  # nothing written


# A file where --out's folder should be is refused before the run (it ran the whole bench, then
# failed to write its results). bench_cli.run checks it for every bench: a few are run here.
OUT_BENCHES = ['lm_harm_probe', 'meta_step', 'steps_saved', 'valuation_scale', 'versions']


def test_every_bench_with_an_out_runs_through_bench_cli():
  """The --out check lives in bench_cli.run: every bench that writes an --out must use it."""
  names = [n for n in os.listdir(os.path.join(ROOT, 'bench')) if n.endswith('.py')]
  for name in sorted(set(names) - {'cli.py'}):
    with open(os.path.join(ROOT, 'bench', name)) as f:
      text = f.read()
    if "'out'" in text:
      assert 'bench_cli.run(main' in text, name


@pytest.mark.parametrize('bench, flag, path, says', [
    *[(b, '--out', '{f}/x', "--out '{f}/x': '{f}' is a file, not a folder") for b in OUT_BENCHES],
    ('meta_step', '--out', '{d}/', "--out '{d}/' ends in '/': give a file prefix"),
    ('curation', '--rater_dir', '{f}', "--rater_dir '{f}' is a file, not a folder"),
    ('valuation_noise', '--rater_dir', '{f}/r', "--rater_dir '{f}/r': '{f}' is a file, not a"),
    ('valuation_scale', '--scratch', '{f}/s', "--scratch '{f}/s': '{f}' is a file, not a folder"),
    # The runs went on, then their results could not be written (named by a temporary file).
    ('valuation_noise', '--out', '{j}/res', "--out '{j}/res': '{j}/res.json' is a folder, where"),
    ('lm_harm_probe', '--out', '{j}/res', "--out '{j}/res': '{j}/res.json' is a folder, where"),
])
def test_an_output_under_a_file_is_one_line_before_the_run(tmp_path, bench, flag, path, says):
  a_file = tmp_path / 'a_file'
  a_file.write_text('kept')
  (tmp_path / 'j' / 'res.json').mkdir(parents=True)
  (tmp_path / 'j' / 'log.jsonl').mkdir()
  where = {'f': a_file, 'd': tmp_path / 'd', 'j': tmp_path / 'j'}
  args = [f'{flag}={path.format(**where)}']
  if flag != '--out':
    args.append(f'--out={tmp_path / "out" / "result"}')
  if bench == 'versions':
    args += [f'--before={tmp_path}/b', f'--after={tmp_path}/a']
  proc = forked.run(f'bench.{bench}', [*args], subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and says.format(**where) in lines[0], lines
  assert not proc.stdout.strip()  # nothing ran
  assert [f for f in tmp_path.rglob('*') if f.is_file()] == [a_file]
  assert a_file.read_text() == 'kept'


def test_a_benchs_results_record_its_flags_defaults_included(tmp_path):
  """`made_by` holds every flag the bench defines (what its --help lists) with the value it ran
  with, given or default: the results hold the settings used, not only the command typed."""
  curation = os.path.join(ROOT, 'bench', 'results', 'curation.json')
  out = tmp_path / 'saved'
  proc = forked.run('bench.steps_saved', [f'--results={curation}', f'--out={out}'],
                    subprocess_env(1), ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  made_by = json.loads((tmp_path / 'saved.json').read_text())['made_by']
  assert made_by['flags'] == {'results': [curation], 'out': str(out)}
  helped = forked.run('bench.steps_saved', ['--help'], subprocess_env(1), ROOT)
  listed = {line.split(':')[0][4:] for line in helped.stdout.splitlines()
            if line.startswith('  --')}
  assert set(made_by['flags']) == listed
  # A config file flag: the config it read, overrides applied (here built by hand).
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bench import provenance  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  from launch import cli  # pylint: disable=g-import-not-at-top
  fv, argv = flags.FlagValues(), ['prog', '--seeds=3', '--config.inner.steps=5']
  cli.define_config_file('config', 'configs/digits.py', 'Config.', fv, argv)
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds.', flag_values=fv, module_name='prog')
  fv(argv)
  want = digits.get_config()
  want.inner.steps = 5
  assert provenance.flag_values(fv, 'prog') == {'seeds': ['3'], 'config': want.to_dict()}


def test_cnn_patches_size_flags_default_to_its_configs_sizes():
  """Its flags' defaults are the sizes it took from configs/fashion_mnist_bench.py before it had
  them (the first 5,000 images, batches of 128, inner batches of 64)."""
  done = forked.call(_cnn_patches_defaults, env=subprocess_env(1))
  assert done.returncode == 0, done.stderr[-2000:]


def _cnn_patches_defaults() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bench import cnn_patches  # pylint: disable=g-import-not-at-top
  from configs import fashion_mnist_bench  # pylint: disable=g-import-not-at-top
  c = fashion_mnist_bench.get_config()
  cnn_patches.define_flags()
  f = flags.FLAGS
  assert f'train[:{f["examples"].default}]' == c.data.train_split
  assert f['batch'].default == c.train.batch_size == c.outer.batch_size
  assert f['inner_batch'].default == c.inner.batch_size


def test_a_curation_file_without_runs_is_one_line_naming_it(tmp_path):
  """steps_saved read any JSON with runs and methods (a KeyError traceback on the first run)."""
  path = tmp_path / 'curation.json'
  path.write_text('{"runs": {"0.2": {"0": {"x": 1}}}, "methods": ["datarater"]}')
  out = tmp_path / 'out' / 'result'
  proc = forked.run('bench.steps_saved', [f'--results={path}', f'--out={out}'], subprocess_env(1),
                    ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert lines == [f"error: '{path}' is not a bench.curation results file "
                   "(runs['0.2']['0'] has no 'all')"], lines
  assert [f for f in tmp_path.rglob('*') if f.is_file()] == [path]


@pytest.mark.parametrize('change, says', [
    (lambda r: r['all'].update(accuracy=None), "['all'] has accuracy None, steps 80 and"),
    (lambda r: r['all'].update(steps=0), "['all'] has accuracy 0.8, steps 0 and"),
    (lambda r: r['all'].update(steps='80'), "['all'] has accuracy 0.8, steps '80' and"),
    (lambda r: r['all'].update(example_gradients=None), 'and example_gradients None, not'),
    (lambda r: r['setup_example_gradients'].update(datarater='lots'),
     "['setup_example_gradients']['datarater'] is 'lots', not a number"),
    (lambda r: r['all'].update(curve=[]), "['all'] has curve [], not a list of [step, accuracy]"),
    (lambda r: r['all'].update(accuracy=0.9), "['all']'s curve never reaches its final accuracy"),
    (lambda r: r['filtered']['datarater'].update(half={'curve': [[80, 0.8]]}),
     "['filtered']['datarater'] has 'half', not a keep fraction")])
def test_a_curation_file_that_steps_saved_cannot_read_is_one_line(tmp_path, change, says):
  """Files with every key but values steps_saved cannot use (each was a traceback, exit 1)."""
  run = _curation_run([[40, 0.7], [80, 0.8]], [[40, 0.8], [80, 0.82]])
  change(run)
  path = tmp_path / 'curation.json'
  path.write_text(json.dumps({'runs': {'0.2': {'0': run}}, 'methods': ['datarater']}))
  proc = forked.run('bench.steps_saved', [f'--results={path}', f'--out={tmp_path}/out/r'],
                    subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(f"error: '{path}' is not a bench.curation results file (runs['0.2']"
                             "['0']") and says in lines[0], lines


def _curation_run(all_curve, filtered_curve, keep=0.5):
  """One seed's record as bench.curation writes it, the filtered subset at `keep` being also the
  rater's suggested keep; curves are (step, accuracy) pairs."""
  whole = {'curve': all_curve, 'accuracy': all_curve[-1][1], 'steps': all_curve[-1][0],
           'example_gradients': 100}
  sub = {'curve': filtered_curve, 'accuracy': filtered_curve[-1][1], 'example_gradients': 50,
         'kept_corrupted': 0}
  return {'all': whole, 'random': {keep: sub}, 'filtered': {'datarater': {keep: sub}},
          'online': {'datarater': sub}, 'auroc': {'datarater': 0.9},
          'auroc_by_kind': {'datarater': {}}, 'setup_example_gradients': {'datarater': 10},
          'suggested_keep': keep}


def test_curation_steps_fraction_has_a_spread_only_where_every_seed_reaches():
  """Steps to all data's final accuracy, as a fraction of its steps: each seed's read off by hand;
  their mean and std only when every seed gets there, at a listed keep and at the suggested one."""
  from bench import curation  # pylint: disable=g-import-not-at-top
  all_curve = [(1, 0.5), (2, 0.8)]
  seeds = {'0': [(1, 0.9), (2, 0.9)], '1': [(1, 0.6), (2, 0.85)], '2': [(1, 0.6), (2, 0.7)]}
  runs = {'0.2': {s: _curation_run(all_curve, seeds[s]) for s in ('0', '1')}}
  for want in ([0.5, 1.0], [0.5, 1.0, None]):
    out = curation.summarize(runs, [0.2], [0.5], ['datarater'])['0.2']
    for row in (out['filtered']['datarater'][0.5], out['datarater_at_suggested']):
      assert row['steps_to_all_final'] == want
      mean, std = (np.mean(want), np.std(want)) if None not in want else (None, None)
      assert (row['steps_to_all_final_mean'], row['steps_to_all_final_std']) == (mean, std)
    runs['0.2']['2'] = _curation_run(all_curve, seeds['2'])  # never reaches 0.8


def test_versions_judges_a_figure_undefined_after_a_regression():
  """bench.versions' verdict per figure: a paired difference within 2 standard errors (scipy's
  sem of the per-seed differences) reproduces; a value defined before but null after (a diverged
  model) is a regression; a seed undefined on the before side only is left out of the pair."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from bench import versions  # pylint: disable=g-import-not-at-top
  before = {'0': 0.90, '1': 0.92, '2': 0.95, '3': 0.91}
  fig = lambda values: {'noise AUROC': {s: (v, 1.0, True) for s, v in values.items()}}
  noisy = {'0': 0.91, '1': 0.90, '2': 0.96, '3': 0.90}
  row, = versions.compare(fig(before), fig(noisy))
  diffs = np.array([noisy[s] - before[s] for s in '0123'])
  assert row['verdict'] == 'reproduces' and row['seeds'] == 4
  assert np.isclose(row['diff'], diffs.mean()) and np.isclose(row['paired_se'], stats.sem(diffs))
  row, = versions.compare(fig(before), fig({s: v - 0.05 for s, v in before.items()}))
  assert row['verdict'] == 'regression'
  row, = versions.compare(fig(before), fig({**noisy, '2': None}))
  assert (row['verdict'], row['undefined_after'], row['seeds']) == ('regression', 1, 3)
  row, = versions.compare(fig({**before, '2': None}), fig(noisy))
  assert (row['verdict'], row['undefined_after'], row['seeds']) == ('reproduces', 0, 3)


def test_harm_probe_preconditions_by_adams_bias_corrected_second_moment():
  """The probe's Adam-preconditioned gradient against nu accumulated by hand in float64 from the
  gradients the optimizer saw; before the first step (age 0) the gradient itself, not 0 / 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from bench import lm_harm_probe  # pylint: disable=g-import-not-at-top
  from inner_loop.optimizers import ADAM_B2, ADAM_EPS, make_inner_optimizer  # pylint: disable=all
  rng = np.random.default_rng(0)
  opt = make_inner_optimizer('adam', 0.01)
  params = {'w': np.zeros(3, np.float32)}
  state, nu = opt.init(params), np.zeros(3)
  held = {'w': rng.normal(size=3).astype(np.float32)}
  for count in range(4):
    got = np.asarray(lm_harm_probe.adam_precondition(held, state)['w'])
    want = held['w'] if count == 0 else held['w'] / (
        np.sqrt(nu / (1 - ADAM_B2 ** count)) + ADAM_EPS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    g = rng.normal(size=3)
    nu = ADAM_B2 * nu + (1 - ADAM_B2) * g ** 2
    _, state = opt.update({'w': jax.numpy.asarray(g, jax.numpy.float32)}, state, params)
  sgd = make_inner_optimizer('sgd', 0.01)
  assert lm_harm_probe.adam_precondition(held, sgd.init(params)) is held


def _interrupted_valuation_noise(tmp: str, out: str) -> None:
  """bench.valuation_noise run with temporary folders in `tmp`, stopped by Ctrl-C as its first
  seed begins."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from bench import runs  # pylint: disable=g-import-not-at-top
  tempfile.tempdir = tmp
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  runs.seeded = interrupted
  forked.as_main('bench.valuation_noise', [f'--out={out}', '--seeds=0', '--noise=0.2'])


def test_an_interrupted_valuation_bench_removes_its_temporary_folder(tmp_path):
  """Its recorded training runs and raters stayed behind in the temporary folder."""
  tmp = tmp_path / 'tmp'
  tmp.mkdir()
  done = forked.call(_interrupted_valuation_noise, str(tmp), str(tmp_path / 'out' / 'r'),
                     env=subprocess_env(1), timeout=120)
  assert done.returncode == -signal.SIGINT, done.stderr[-2000:]
  assert 'interrupted (Ctrl-C)' in done.stderr and 'Traceback' not in done.stderr, done.stderr
  assert not list(tmp.iterdir())


def test_meta_memory_refuses_to_merge_another_benchs_results_in_one_line(tmp_path):
  """bench.meta_step's file has `results` too, rows without a model: a KeyError traceback."""
  proc = forked.run('bench.meta_memory', [f'--out={tmp_path}/m', '--merge=' + os.path.join(
      ROOT, 'bench', 'results', 'meta_step.json')], subprocess_env(1), ROOT)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert 'is not a bench.meta_memory results file (its results are not rows of' in lines[0]
  assert not list(tmp_path.iterdir())


def test_valuation_scale_sets_the_largest_run_against_the_smallest_in_any_flag_order(
    tmp_path, monkeypatch):
  """The launchers' memory ratio is the largest N's peak over the smallest's, however the sizes
  were given (in the flags' order, --launcher_ns=2000,1000 gave smallest over largest, 0.5).
  The runs are stubbed: a peak of N / 10 MiB."""
  import re  # pylint: disable=g-import-not-at-top
  from bench import valuation_scale  # pylint: disable=g-import-not-at-top
  def child(args, log, env=None):
    del log, env
    n = int(re.search(r'/n(\d+)/', ' '.join(args)).group(1))
    for flag, name, record in (('--workdir=', 'scores_tracin.json',
                                {'num_examples': n, 'noise_auroc': 0.5}),
                               ('--out=', 'filter_report.json',
                                {'splits': {'train': {'kept': n // 2}}})):
      folder = next((a[len(flag):] for a in args if a.startswith(flag)), None)
      if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), 'w') as f:
          json.dump(record, f)
    return {'wall_s': 1.0, 'peak_rss_mib': n / 10}
  monkeypatch.setattr(valuation_scale, 'run_child', child)
  monkeypatch.setattr(valuation_scale, 'write_idx_dataset', lambda folder, n: None)
  for ns in ([1000, 2000], [2000, 1000]):
    ratio = valuation_scale.run_launchers(False, str(tmp_path), ns)[
        'rss_ratio_largest_over_smallest']
    assert ratio == {'valuate': 2.0, 'filter': 2.0}, (ns, ratio)


def test_cnn_patches_times_the_patches_on_the_feature_job(tfds_dir, monkeypatch):
  """The features job runs a CNN extractor (the selection config's MLP extractor, which it read
  once the config changed, takes no patches: both arms timed the same program)."""
  from bench import cnn_patches  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from datarater.tasks import cnn  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  calls, patches = [], cnn.patches_3x3
  monkeypatch.setattr(cnn, 'patches_3x3', lambda x, s: calls.append(s) or patches(x, s))
  cnn_patches.time_features(pipeline.load_split(digits_data(tfds_dir), 'train[:64]'))
  assert calls



def _quick_valuation_scale(folder: str) -> None:
  """`bench.valuation_scale --quick --sections=store` in `folder` at the default --out, its store
  section stubbed (what it measures takes a minute)."""
  from bench import cli as bench_cli  # pylint: disable=g-import-not-at-top
  from bench import valuation_scale  # pylint: disable=g-import-not-at-top
  os.chdir(folder)  # after the imports: `folder` holds a bench/ of its own
  times = ('first_query_build_and_score_s', 'first_query_on_new_set_s', 'second_query_s',
           'second_query_reopened_s')
  valuation_scale.run_store = lambda quick, scratch: {
      'num_train': 8, 'num_test': 2, 'checkpoints': 1, 'dim': 4, 'store_bytes': 128,
      **dict.fromkeys(times, 1.0), 'speedup': 1.0, 'speedup_reopened': 1.0,
      'identical_to_fresh_build': True}
  sys.argv = ['valuation_scale', '--quick', '--sections=store', '--scratch=scratch']
  valuation_scale.define_flags()
  bench_cli.run(valuation_scale.main, valuation_scale.__doc__)


def _in_folder(folder: str, module: str, args: list) -> None:
  os.chdir(folder)
  forked.as_main(module, args)


def test_a_quick_run_at_the_default_out_leaves_the_full_results_alone(tmp_path):
  """A --quick smoke run (`python -m bench.valuation_scale --quick`, as its docstring gives it)
  wrote over bench/results/valuation_scale.*, the full run's 13 minutes of figures, dropping its
  other sections; bench.meta_memory --quick over meta_memory.*. Each now writes <out>_quick.*, as
  bench.selection --quick does."""
  results = tmp_path / 'bench' / 'results'
  results.mkdir(parents=True)
  full = {}
  for name in ('valuation_scale.json', 'meta_memory.json'):
    shutil.copy(os.path.join(ROOT, 'bench', 'results', name), results / name)
    full[name] = (results / name).read_bytes()
  done = forked.call(_quick_valuation_scale, str(tmp_path), env=subprocess_env(1))
  assert done.returncode == 0, done.stderr[-2000:]
  done = forked.call(_in_folder, str(tmp_path), 'bench.meta_memory', [
      '--quick', '--merge=' + os.path.join(ROOT, 'bench', 'results', 'meta_memory.json')],
                     env=subprocess_env(1))
  assert done.returncode == 0, done.stderr[-2000:]
  for name, data in full.items():
    assert (results / name).read_bytes() == data, f'{name} was written over'
  quick = json.loads((results / 'valuation_scale_quick.json').read_text())
  assert quick['quick'] is True and quick['store']['num_train'] == 8
  merged = json.loads((results / 'meta_memory_quick.json').read_text())
  assert merged['merged_from'] == ['meta_memory.json']


@pytest.mark.slow
def test_the_curation_bench_runs_at_its_smallest_and_steps_saved_reads_it(tmp_path, tfds_dir):
  """CI checks only the benches' bad command lines: bench.curation end to end at tiny sizes (every
  method, one seed), its files consistent with its runs, and bench.steps_saved on its JSON."""
  out = tmp_path / 'curation'
  proc = forked.run('bench.curation', [
      f'--out={out}', '--noise=0.2', '--seeds=0', '--keep=0.8', '--rater_steps=5', '--epochs=2',
      f'--config.data.data_dir={tfds_dir}', '--config.inner.population=2',
      '--config.valuation.train_steps=40', '--config.valuation.checkpoint_every=20',
      '--config.valuation.reference_steps=40'], subprocess_env(1), ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((tmp_path / 'curation.json').read_text())
  assert results['made_by']['command'].startswith('python -m bench.curation --out=')
  run, s = results['runs']['0.2']['0'], results['summary']['0.2']
  accuracies = [run['all']['accuracy'], run['random']['0.8']['accuracy'],
                *(run['filtered'][m]['0.8']['accuracy'] for m in results['methods']),
                *(run['online'][m]['accuracy'] for m in results['methods'])]
  assert all(0 <= a <= 1 for a in accuracies), accuracies
  table = (tmp_path / 'curation.md').read_text()
  assert f'| 20% | all data | 1.0 | {100 * run["all"]["accuracy"]:.2f} ± 0.00 |' in table
  assert (tmp_path / 'curation.png').stat().st_size > 0
  done = forked.run('bench.steps_saved', [f'--results={out}.json', f'--out={tmp_path}/saved'],
                    subprocess_env(1), ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = next(iter(json.loads((tmp_path / 'saved.json').read_text())['tables'].values()))
  curve, final = run['all']['curve'], run['all']['accuracy']
  own = next(step for step, a in curve if a >= final) / run['all']['steps']  # by hand
  assert rows and all(r['all_steps_to_own_final'] == [own] for r in rows)
  assert s['filtered']['datarater']['0.8']['all_steps_to_own_final'] == [own]
