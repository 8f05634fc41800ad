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
