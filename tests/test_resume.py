"""Training N steps straight equals N/2 steps, a stopped process, and a resumed one."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from datarater.export import load_rater
from datarater.meta_train import meta_train
from tests.run_config import as_flags, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(workdir, config, *extra):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', 'launch.train_rater', f'--workdir={workdir}',
                         *as_flags(config), *extra], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_resumed_run_equals_uninterrupted_run(tfds_dir, tmp_path):
  config = small_config(tfds_dir, steps=6)
  straight = tmp_path / 'straight'
  meta_train(config, str(straight))

  resumed = tmp_path / 'resumed'
  first = _launch(resumed, config, '--stop_after=3')
  assert first.returncode == 0, first.stderr[-2000:]
  assert not (resumed / 'report.json').exists()  # really stopped half-way
  second = _launch(resumed, config)
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'resumed from the checkpoint at outer step 3' in second.stdout

  params_straight = load_rater(str(straight)).params
  params_resumed = load_rater(str(resumed)).params
  for a, b in zip(jax.tree.leaves(params_straight), jax.tree.leaves(params_resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Metrics are one record per logged step, none repeated by the resume.
  steps = [json.loads(l)['step'] for l in open(resumed / 'metrics.jsonl')]
  assert steps == sorted(set(steps)) and steps[-1] == 6
