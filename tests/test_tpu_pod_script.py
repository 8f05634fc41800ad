"""The TPU pod launcher builds the standard `--worker=all` commands (dry run: no gcloud here)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'tpu_pod.sh')


def _dry(*args):
  return subprocess.run(['bash', SCRIPT, *args], env=dict(os.environ, DRY_RUN='1'),
                        capture_output=True, text=True, timeout=30)


def test_train_runs_the_same_command_on_every_worker():
  out = _dry('train', 'my-pod', 'us-central2-b', '/mnt/shared/run1', '--config=configs/digits.py',
             '--config.inner.population=16')
  assert out.returncode == 0, out.stderr
  (line,) = out.stdout.strip().splitlines()
  for part in ('gcloud compute tpus tpu-vm ssh my-pod', '--zone=us-central2-b', '--worker=all',
               'python3 -m launch.train_rater --distributed --workdir=/mnt/shared/run1',
               '--config.inner.population=16'):
    assert part in line.replace('\\', ''), (part, line)


def test_the_worker_runs_the_workdir_and_arguments_as_given():
  """The workdir went unquoted into the worker's shell: a space split it (the run trained into
  '/mnt/my') and a ';' ran a command; with no extra arguments an empty one was passed."""
  import shlex  # pylint: disable=g-import-not-at-top
  for workdir, extra in (('/mnt/my run', ["--config.data.train_split=train[:50%]"]),
                         ('/mnt/a;echo INJECTED', [])):
    out = _dry('train', 'my-pod', 'z', workdir, *extra)
    assert out.returncode == 0, out.stderr
    gcloud = shlex.split(out.stdout)
    remote = shlex.split(gcloud[gcloud.index('--command') + 1])
    assert remote == ['cd', '~/datarater', '&&', 'python3', '-m', 'launch.train_rater',
                      '--distributed', f'--workdir={workdir}', *extra], remote


def test_setup_copies_and_installs_on_all_workers():
  out = _dry('setup', 'my-pod', 'europe-west4-a')
  assert out.returncode == 0, out.stderr
  scp, ssh = out.stdout.strip().splitlines()
  assert 'tpu-vm scp --recurse' in scp and '--worker=all' in scp
  assert 'pip install -q -r requirements.txt' in ssh.replace('\\', '') and '--worker=all' in ssh


def test_missing_arguments_print_usage_and_fail():
  out = _dry('train', 'my-pod')
  assert out.returncode == 2 and 'tpu_pod.sh train' in out.stderr
