"""Benchmarks fail on a bad command line as the launchers do: one `error:` line naming the bad
value, exit 2, before any run and without writing anything."""
import os
import subprocess
import sys

import pytest

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
    ('noise_ceiling', ['--seeds='], '--seeds is empty'),  # it wrote results of no runs
    ('pergrad', ['--batch=0'], '--batch must be >= 1, got 0'),
    ('cnn_patches', ['--repeats=0'], '--repeats must be >= 1, got 0'),
    ('curation', ['--rater_steps=-1'], '--rater_steps must be >= 1, got -1'),
])
def test_a_bad_value_is_one_line_and_exit_2(tmp_path, bench, args, says):
  out = tmp_path / 'out' / 'result'
  proc = subprocess.run([sys.executable, '-m', f'bench.{bench}', f'--out={out}', *args],
                        cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
  assert not proc.stdout.strip()  # nothing ran
  assert not any(f.is_file() for f in tmp_path.rglob('*'))  # nothing written


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
  proc = subprocess.run([sys.executable, '-m', f'bench.{bench}', f'--out={out}', *args],
                        cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and f"'{path}' is not readable JSON" in lines[0], lines
  assert says in lines[0], lines
  assert [f for f in tmp_path.rglob('*') if f.is_file()] == [path]  # nothing written
