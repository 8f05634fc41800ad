"""Test setup: 4 fake CPU devices (sharding tests compare 4 devices with 1), quick compiles, quiet
logs. The tests' programs are small and compiled once or twice each, and compiling is most of the
suite's time: XLA's cheaper backend passes and its older elemental emitter for fusions
(`FAST_COMPILE`) cut their compile time several-fold; `subprocess_env` gives
subprocesses the same.
Many tests compile the same programs (the small rater run, the trainer's steps): one on-disk
compilation cache, made by the first process that imports this file and inherited by the pytest
workers and the tests' subprocesses, compiles each once per session."""
import gc
import os
import shutil
import sys
import tempfile

FAST_COMPILE = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
                '--xla_cpu_use_fusion_emitters=false')
# Two pytest workers share two cores: each runs XLA's CPU kernels on one thread.
ONE_THREAD = '--xla_cpu_multi_thread_eigen=false'
os.environ.setdefault('XLA_FLAGS',
                      f'--xla_force_host_platform_device_count=4 {FAST_COMPILE} {ONE_THREAD}')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='datarater_tests_jax_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A worker holds ~1M objects (JAX's caches); Python's default thresholds ran a full collection
# every few seconds of tracing (~6% of a worker's time), these ~1/4 of that.
gc.set_threshold(10000, 10, 100)

import pytest  # pylint: disable=g-import-not-at-top


def pytest_sessionfinish(session):
  if _OWN_CACHE:  # the process that made the cache (pytest itself, not a worker) removes it
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def pytest_collection_modifyitems(items):
  """The modules kept on one worker (`xdist_group`, a minute or more each) are handed out first,
  so that the single tests fill in around them and the two workers end together."""
  items.sort(key=lambda item: item.get_closest_marker('xdist_group') is None)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir shared by the session's tests, with the bundled digits prepared once."""
  path = os.environ.get('DATARATER_TEST_TFDS_DIR') or str(tmp_path_factory.mktemp('tfds'))
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.get_builder('sklearn_digits', path)
  return path


@pytest.fixture
def tmpfs(tmp_path):
  """`tmpfs(size)` mounts a tmpfs of `size` ('64k') at a new folder under tmp_path and returns
  its path: a small disk to fill (`mount -o remount,size=...` frees space). Unmounted after the
  test; the test is skipped where this process cannot mount (not root, no permission)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  mounted = []

  def mount(size: str) -> str:
    if os.geteuid() != 0:
      pytest.skip('needs root to mount a small tmpfs (a full disk)')
    path = tmp_path / f'disk{len(mounted)}'
    path.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True)
    if done.returncode:
      pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
    mounted.append(path)
    return str(path)
  yield mount
  for path in mounted:
    subprocess.run(['umount', '-l', str(path)], check=True)


def subprocess_env(devices: int) -> dict:
  """The environment of a subprocess with `devices` fake CPU devices and quick compiles."""
  return dict(os.environ,
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE} '
                        f'{ONE_THREAD}')


def otsu_keep(scores) -> float:
  """Brute force: over every split of the sorted scores, the upper share of the split with the
  least within-group sum of squares (float64)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  s = np.sort(np.asarray(scores, np.float64))
  best = min(range(1, len(s)), key=lambda k: s[:k].var() * k + s[k:].var() * (len(s) - k))
  return 1 - best / len(s)


def digits_data(tfds_dir, label_noise=0.0, noise_seed=0):
  """The `data` config section of configs/digits.py, reading from `tfds_dir`."""
  from configs.digits import get_config  # pylint: disable=g-import-not-at-top
  data = get_config().data
  data.data_dir, data.label_noise, data.noise_seed = tfds_dir, label_noise, noise_seed
  return data
