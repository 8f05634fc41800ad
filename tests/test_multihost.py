"""Two real processes (jax.distributed on 127.0.0.1, 2 CPU devices each) = one process, 4 devices
for train_rater, valuate and filter; a SIGTERM to one process of a rater run stops both after one
step, which resumes in one process to the same rater."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import glob

import jax
import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from configs.digits import get_config
from datarater.curation.filter import filter_dataset
from datarater.data.corruption import Corruption
from datarater.export import export_rater, load_rater
from datarater import checkpointing
from datarater import meta_train as meta_train_lib
from datarater.meta_train import meta_train
from datarater.valuation import run as valuation_run
from datarater.valuation.run import valuate
from tests import forked
from tests.run_config import as_flags, small_config
from tests.conftest import subprocess_env

READ_BY = {'train_rater': meta_train_lib.SECTIONS, 'valuate': valuation_run.SECTIONS}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One worker runs these one after another: two jobs starting at once on the two CI workers could
# race for a coordinator port (_free_port releases it before process 0 binds it), and each job
# already keeps both cores busy.
pytestmark = pytest.mark.xdist_group('multihost')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(module, args, extra=((), ())):
  """`python -m module args` as two jax.distributed processes of 2 CPU devices each (process i
  also given `extra[i]`)."""
  port = _free_port()
  return [forked.start_module(module, [*args, *extra[i], f'--coordinator_address=127.0.0.1:{port}',
                                       '--num_processes=2', f'--process_id={i}'],
                              subprocess_env(2)) for i in range(2)]


def _start_driver(source: str, tfds_dir: str, tmp_path):
  """The script `source` as two jax.distributed processes of 2 CPU devices each, given
  (process index, port, tfds_dir, tmp_path) as arguments."""
  driver = tmp_path / 'driver.py'
  driver.write_text(source)
  port = _free_port()
  return [forked.start_script(str(driver), [str(i), str(port), tfds_dir, str(tmp_path)],
                              subprocess_env(2)) for i in range(2)]


def _finish(procs, timeout: int = 300):
  """Both processes' output once they exit 0; a hung job is killed and both outputs shown."""
  outs = _outputs(procs, timeout)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _outputs(procs, timeout: int = 300):
  """Both processes' output once they exit; a hung job is killed and both outputs shown."""
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      tails = outs + [q.communicate()[0] for q in procs[len(outs):]]
      pytest.fail(f'the two processes did not finish in {timeout} s; their output:\n' +
                  '\n---\n'.join(t[-2000:] for t in tails))
  return outs


def _start_two_processes(workdir, config):
  return _start('launch.train_rater', [f'--workdir={workdir}', *as_flags(config)])


def _wait_for_a_checkpoint(procs, ckpt_dir, timeout: int = 600) -> None:
  """Returns once `ckpt_dir` holds a finished checkpoint (a folder named by its step); fails
  with its output if a process ends first (e.g. the port was taken meanwhile)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if ckpt_dir.exists() and any(re.fullmatch(r'\d+', d) for d in os.listdir(ckpt_dir)):
      return
    ended = [p for p in procs if p.poll() is not None]
    assert not ended, ended[0].communicate()[0][-3000:]
    time.sleep(0.05)


def _params(workdir):
  return jax.tree.leaves(load_rater(str(workdir)).params)


@pytest.fixture(scope='module')
def rater_run(tfds_dir, tmp_path_factory) -> str:
  """A 2-step rater run (4 devices, one process) that the filter cases read and never write."""
  workdir = str(tmp_path_factory.mktemp('rater') / 'run')
  meta_train(small_config(tfds_dir, steps=2), workdir)
  return workdir


@pytest.fixture(scope='module')
def straight_12_steps(tfds_dir, tmp_path_factory) -> list:
  """The rater of an uninterrupted 12-step small_config run on 4 devices in one process: the
  oracle of every case below that stops a two-process run of that config and resumes it."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  meta_train(small_config(tfds_dir, steps=12), workdir, devices=jax.devices()[:4])
  return _params(workdir)


def _assert_same(a, b, atol=2e-6):
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=atol)


def test_two_processes_equal_one_process_with_four_devices(tfds_dir, tmp_path):
  config = small_config(tfds_dir, steps=4)
  config.final_eval.num_models = 1  # the end-of-run fresh models run in both processes too
  config.outer.ema = 0.5  # process 0 alone averages the rater it logs, reports and exports
  config.outer.warmup_steps = 0  # full outer steps: a meta-gradient off by a factor would show
  _finish(_start_two_processes(tmp_path / 'two', config))
  config.final_eval.num_models = 0  # (not compared) the one-process and resumed runs skip them
  meta_train(config, str(tmp_path / 'one'), devices=jax.devices()[:4])
  _assert_same(_params(tmp_path / 'two'), _params(tmp_path / 'one'))
  logged = {}  # every logged metric, meta-gradient norm included, but the clock's
  for name in ('two', 'one'):
    records = [json.loads(l) for l in open(tmp_path / name / 'metrics.jsonl')]
    logged[name] = [{k: v for k, v in r.items() if k != 'steps_per_sec'} for r in records]
  assert [r['step'] for r in logged['two']] == [r['step'] for r in logged['one']] == [2, 4]
  for a, b in zip(logged['two'], logged['one']):
    assert a.keys() == b.keys() and a == pytest.approx(b, rel=2e-5, abs=2e-6), (a, b)

  # Process 1's shards of checkpoint 4 are damaged: both processes must resume from step 2
  # (had process 0 taken step 4 and process 1 step 2, they would train on different steps).
  shards = glob.glob(str(tmp_path / 'two' / 'checkpoints' / '4' / 'state' / 'ocdbt.process_1' /
                         'd' / '*'))
  assert shards
  for path in shards:  # flipped bits
    data = bytearray(open(path, 'rb').read())
    data[::7] = bytes(b ^ 0xFF for b in data[::7])
    open(path, 'wb').write(bytes(data))
  config.outer.steps = 6
  outs = _finish(_start_two_processes(tmp_path / 'two', config))
  assert all('checkpoints/4 is unreadable' in out for out in outs), outs[1][-3000:]
  assert len(glob.glob(str(tmp_path / 'two' / 'checkpoints' / 'unreadable-4-*'))) == 1
  steps = [json.loads(l)['step'] for l in open(tmp_path / 'two' / 'metrics.jsonl')]
  assert steps == [2, 4, 6]
  meta_train(config, str(tmp_path / 'one'), devices=jax.devices()[:4])  # extended from step 4
  _assert_same(_params(tmp_path / 'two'), _params(tmp_path / 'one'))


def test_a_workdir_in_use_stops_both_processes_in_one_line(tfds_dir, tmp_path):
  """Process 0 finds the lock taken; process 1 must not run on into a collective alone."""
  import fcntl  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'busy'
  workdir.mkdir()
  with open(workdir / '.lock', 'a+') as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    procs = _start_two_processes(workdir, small_config(tfds_dir, steps=2))
    outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out, msg in zip(procs, outs, ('is in use by another run',
                                       'could not be locked by process 0')):
    errors = [l for l in out.splitlines() if l.startswith('error: ')]
    assert p.returncode == 2 and len(errors) == 1 and msg in errors[0], out[-2000:]
    assert 'Traceback' not in out
  assert sorted(os.listdir(workdir)) == ['.lock']


def _one_process_of_two(tmp_path, port: int, process_id: int, *args):
  """launch.train_rater as process `process_id` of a two-process job on `port` (nothing is read
  before the job starts)."""
  return forked.start_module('launch.train_rater', [
      f'--workdir={tmp_path}/out', f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2', f'--process_id={process_id}', *args], subprocess_env(2))


def test_a_busy_coordinator_port_or_a_job_never_joined_stops_in_one_line(tmp_path):
  """Process 0 given a port another program listens on (plainly, or shared as another job's
  coordinator shares it) stops at once in one line naming it (jaxlib crashed, or bound it too and
  joined the other job); a process whose job is never joined stops after --start_timeout in one
  line, and at once on SIGTERM while it waits (JAX's wait ignored it, 300 s, then aborted)."""
  for family, host, reuse_port in ((socket.AF_INET, '127.0.0.1', False),
                                   (socket.AF_INET6, '::', True)):
    with socket.socket(family) as held:
      if reuse_port:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
      held.bind((host, 0))
      held.listen()
      port = held.getsockname()[1]
      (out,) = _outputs([p := _one_process_of_two(tmp_path, port, 0)], timeout=60)
    assert p.returncode == 2 and out.splitlines() == [
        f"error: --coordinator_address '127.0.0.1:{port}': port {port} is in use (another "
        "job's coordinator?); give every process of this job a free port"], out[-2000:]

  start = time.monotonic()
  (out,) = _outputs([p := _one_process_of_two(tmp_path, _free_port(), 1, '--start_timeout=2')],
                    timeout=60)
  assert p.returncode == 2 and out.splitlines() == [
      'error: not every process of this job joined it within --start_timeout=2 s (one that '
      'failed to start says why in its own error line)'], out[-2000:]
  assert 2 < time.monotonic() - start < 30

  port = _free_port()
  p, deadline = _one_process_of_two(tmp_path, port, 0), time.monotonic() + 60
  while p.poll() is None and time.monotonic() < deadline:  # until its coordinator listens: it
    with socket.socket() as s:  # waits in jax.distributed's start
      if s.connect_ex(('127.0.0.1', port)) == 0:
        break
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  _outputs([p], timeout=30)
  assert p.returncode == 128 + signal.SIGTERM
  assert not os.path.exists(tmp_path / 'out')


def test_processes_holding_different_numbers_of_devices_stop_in_one_line(tmp_path):
  """Process 0 with 2 devices, process 1 with 1 (CUDA_VISIBLE_DEVICES or XLA_FLAGS set apart):
  both stop at start-up in one line naming the counts (the processes' first exchange, which
  assumes as many, raised a traceback on both)."""
  port = _free_port()
  procs = [forked.start_module('launch.train_rater', [
      f'--workdir={tmp_path}/out', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
      f'--process_id={i}'], subprocess_env(2 - i)) for i in range(2)]
  for p, out in zip(procs, _outputs(procs, timeout=60)):
    assert p.returncode == 2 and out.splitlines() == [
        'error: the processes of this job hold different numbers of devices (process 0: 2, '
        'process 1: 1): give every process as many (CUDA_VISIBLE_DEVICES, XLA_FLAGS)'], out[-2000:]
  assert not os.path.exists(tmp_path / 'out')


# Two jax.distributed processes lock a workdir they share, then each its own folder (as two hosts'
# own disks at one path); then process 1 cannot make its partial scores file.
_NOT_SHARED = """
import os, sys
sys.path.insert(0, os.getcwd())
import jax
from configs.digits import get_config
from datarater import multihost
from datarater.data import source
from datarater.errors import UserError
from datarater.valuation import run
pid, port, tfds_dir, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
multihost.SHARED_WAIT_S = 1
for folder in ('shared', f'disk{pid}'):
  try:
    with multihost.workdir_lock(os.path.join(tmp, folder, 'run')):
      print(folder, 'locked')
  except UserError as e:
    print(folder, 'refused:', e)
data = get_config().data
data.data_dir = tfds_dir
split = source.open_source(data, 'train')
partial = os.path.join(tmp, ('shared', 'missing')[pid], 'part.npy')
try:
  run.score_blocks(lambda b: b['label'] * 1.0, split, 300, partial, False, 'scores')
except Exception as e:  # pylint: disable=broad-except
  print(f'scoring stopped: {type(e).__name__}: {e}')
"""


def test_a_workdir_not_shared_or_a_scores_file_one_cannot_make_stops_both(tfds_dir, tmp_path):
  """A workdir on each host's own disk is refused on every process in one line (a rater run's
  checkpoints waited for the other process's files for good, as did valuate's merged scores);
  process 1 failing to make its partial scores file (a full disk) stops process 0 too (it waited
  in the first block's vote for good)."""
  outs = _finish(_start_driver(_NOT_SHARED, tfds_dir, tmp_path), timeout=60)
  for pid, out in enumerate(outs):
    lines = [l for l in out.splitlines() if l.startswith(('shared', f'disk{pid}', 'scoring'))]
    assert lines == [
        'shared locked',
        f"disk{pid} refused: --workdir '{tmp_path}/disk{pid}/run' is not one folder shared by "
        'every process (process 1 cannot see a file process 0 made in it): give every process a '
        'folder on a shared file system, at the same path',
        ('scoring stopped: UserError: process 1 of this job stopped opening its partial scores '
         'file (its error line says why)', 'scoring stopped: FileNotFoundError: [Errno 2] No such '
         f"file or directory: '{tmp_path}/missing/part.npy'")[pid]], out[-3000:]
  for folder in ('shared', 'disk0'):  # process 0's file is gone
    assert os.listdir(tmp_path / folder / 'run') == ['.lock']


@pytest.mark.slow  # (a two-process job for a case the README does not claim)
def test_a_rater_whose_scores_overflow_stops_both_processes_in_one_line(tfds_dir, tmp_path):
  """Outer steps of 1e30 leave finite parameters whose scores overflow: process 0, which scores
  and reports, and process 1 both end with exit 2 and one line; no report is written."""
  workdir = tmp_path / 'hot'
  procs = _start('launch.train_rater', [f'--workdir={workdir}',
                                        *as_flags(small_config(tfds_dir, steps=2)),
                                        '--config.outer.learning_rate=1e30'])
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out, where in zip(procs, outs, ('on 1197 of 1197 training examples',
                                         "on process 0's training examples")):
    errors = [l for l in out.splitlines() if l.startswith('error: ')]
    assert p.returncode == 2 and len(errors) == 1, out[-3000:]
    assert f"the rater's scores are not finite {where} after outer step 2" in errors[0], errors
  assert not (workdir / 'report.json').exists()


@pytest.mark.parametrize('module,args,extra,name', [
    ('train_rater', ['--workdir=W'], ['--config.seed=1'], '--config.seed'),
    ('filter', ['--dataset=sklearn_digits', '--rater=none', '--keep=0.5', '--out=W'],
     ['--batch_size=300'], '--batch_size'),
    ('valuate', ['--method=tracin', '--workdir=W'], ['--config.valuation.train_steps=10'],
     '--config.valuation.train_steps')])
def test_processes_given_different_flags_stop_in_one_line(tfds_dir, tmp_path, module, args,
                                                          extra, name):
  """Each process would compute its own share with its own settings (a filter with another
  block size read slots no process wrote): one line on both, nothing written."""
  args = [a.replace('W', str(tmp_path / 'out')) for a in args]
  if module != 'filter':
    args += as_flags(small_config(tfds_dir, steps=2), READ_BY[module])
  else:
    args.append(f'--data_dir={tfds_dir}')
  procs = _start(f'launch.{module}', args, ((), extra))
  for i, p in enumerate(procs):
    out = p.communicate(timeout=300)[0]
    errors = [l for l in out.splitlines() if l.startswith('error: ')]
    assert p.returncode == 2 and len(errors) == 1, out[-2000:]
    assert f'were given different {name} (this process, {i}' in errors[0], errors
    assert 'Traceback' not in out
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('module,args,extra,lines', [
    ('filter', ['--dataset=sklearn_digits', '--rater=none', '--keep=0.5', '--out=W'],
     ['--keep=abc'], ['process 1 of this job could not read its flags (its error line says why)',
                      "flag --keep=abc: could not convert string to float: 'abc'"]),
    pytest.param('valuate', ['--method=tracin', '--workdir=W'], ['--config.valuation.nope=1'],
                 ['process 1 of this job could not read its flags (its error line says why)',
                  "unknown config field 'nope': --config.valuation.nope"], marks=pytest.mark.slow),
    pytest.param('train_rater', ['--workdir=W'], ['--config.train.learning_rate=0.5'], [
        f'the processes of this job were given different --config.train.learning_rate (this '
        f'process, {i}: {v!r}): give every process the same flags' for i, v in
        enumerate((get_config().train.learning_rate, 0.5))], marks=pytest.mark.slow)])
def test_a_flag_refused_on_one_process_alone_stops_both_at_once(tfds_dir, tmp_path, module, args,
                                                              extra, lines):
  """Process 1 alone given a flag that does not parse, an unknown config field, or an override
  its launcher refuses (a config section it does not read) stopped before it joined the job, and
  process 0 waited --start_timeout (300 s) for it: both stop at once, process 1 with its line."""
  args = [a.replace('W', str(tmp_path / 'out')) for a in args]
  if module != 'filter':
    args += as_flags(small_config(tfds_dir, steps=2), READ_BY[module])
  start = time.monotonic()
  procs = _start(f'launch.{module}', args, ((), extra))
  for p, out, line in zip(procs, _outputs(procs, timeout=120), lines):
    errors = [l for l in out.splitlines() if l.startswith('error: ')]
    assert p.returncode == 2 and errors == [f'error: {line}'], out[-2000:]
    assert 'Traceback' not in out
  assert time.monotonic() - start < 100
  assert not os.path.exists(tmp_path / 'out')


def _other_digits(tfds_dir: str, tmp_path) -> str:
  """A data_dir holding another copy of sklearn_digits: its train split is the test split."""
  shutil.copytree(os.path.join(tfds_dir, 'sklearn_digits'), tmp_path / 'other' / 'sklearn_digits')
  (folder,) = glob.glob(str(tmp_path / 'other' / 'sklearn_digits' / '*' / 'dataset_info.json'))
  folder = os.path.dirname(folder)
  (test,) = glob.glob(os.path.join(folder, 'sklearn_digits-test.array_record-*'))
  shutil.copy(test, test.replace('-test.', '-train.'))
  info = json.load(open(os.path.join(folder, 'dataset_info.json')))
  splits = {s['name']: s for s in info['splits']}
  for field in ('numBytes', 'shardLengths'):
    splits['train'][field] = splits['test'][field]
  json.dump(info, open(os.path.join(folder, 'dataset_info.json'), 'w'))
  return str(tmp_path / 'other')


@pytest.mark.slow  # (two two-process jobs)
@pytest.mark.parametrize('module', ['filter', 'train_rater'])
def test_processes_holding_different_copies_of_the_dataset_stop_in_one_line(
    tfds_dir, tmp_path, rater_run, module):
  """Each process may keep the prepared data where it likes (--data_dir, data.data_dir): copies
  with other splits or sizes are refused on every process in one line (the filter's exchange of
  scores aborted the job; a rater run trained on, each process on its own data, and exited 0)."""
  other = _other_digits(tfds_dir, tmp_path)
  out = str(tmp_path / 'out')
  if module == 'filter':
    args, flag = [f'--rater={rater_run}', '--keep=0.5', f'--out={out}', '--batch_size=300',
                  f'--data_dir={tfds_dir}'], '--data_dir'
  else:
    args, flag = [f'--workdir={out}', *as_flags(small_config(tfds_dir, steps=2))], \
        '--config.data.data_dir'
  procs = _start(f'launch.{module}', args, ((), (f'{flag}={other}',)))
  for i, (p, text) in enumerate(zip(procs, _outputs(procs, timeout=150))):
    sizes = {s: v.num_examples for s, v in tfds.builder_from_directory(glob.glob(os.path.join(
        (tfds_dir, other)[i], 'sklearn_digits', '*'))[0]).info.splits.items()}
    errors = [l for l in text.splitlines() if l.startswith('error: ')]
    assert p.returncode == 2 and errors == [
        "error: the processes of this job hold different copies of dataset 'sklearn_digits' "
        f'(this process, {i}: sklearn_digits 1.0.0, split sizes {sizes}): give every process '
        'the same prepared data'], text[-2000:]
  assert not os.path.exists(out)


# A launcher as one of two jax.distributed processes; process 1 is sent `signum` as it reads its
# second block of examples to score, of a streamed split or one held in memory (0: none; -1: it
# fails there with an error of its own).
_SIGNAL_AT_A_BLOCK = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
from datarater.data import pipeline, source
from datarater.errors import UserError
pid, port = int(sys.argv[1]), sys.argv[2]
module, signum, args = {module!r}, {signum}, {args!r}
def signalling(blocks):
  def signalled(self, *a, **k):
    for i, item in enumerate(blocks(self, *a, **k)):
      if pid == 1 and i == 1 and signum < 0:
        raise UserError('a planted error in its second block')
      if pid == 1 and i == 1 and signum > 0:
        os.kill(os.getpid(), signum)
      yield item
  return signalled
source.Source.blocks = signalling(source.Source.blocks)
pipeline.Split.blocks = signalling(pipeline.Split.blocks)
sys.argv = [module, *args, f'--coordinator_address=127.0.0.1:{{port}}', '--num_processes=2',
            f'--process_id={{pid}}']
runpy.run_module(module, run_name='__main__')
"""


def _signalled_at_a_block(module, args, signum, tfds_dir, tmp_path):
  """Both processes' exit codes and outputs, within 120 s (not JAX's 300 s shutdown timeout)."""
  procs = _start_driver(_SIGNAL_AT_A_BLOCK.format(module=module, signum=int(signum), args=args),
                        tfds_dir, tmp_path)
  outs = _outputs(procs, timeout=120)
  assert all('Traceback' not in out for out in outs), '\n'.join(outs)[-6000:]
  return [p.returncode for p in procs], outs


def test_two_process_valuate_scores_equal_one_process_and_stop_together(tfds_dir, tmp_path):
  """Each process scores every other block; process 0 merges them into the one-process file.
  SIGTERM to process 1 as it scores stops both after the same block (the others waited up to
  JAX's 300 s shutdown timeout), their blocks kept; run again, they resume to the same file."""
  overrides = {'data.data_dir': tfds_dir, 'data.label_noise': 0.2, 'valuation.train_steps': 20,
               'valuation.checkpoint_every': 10, 'valuation.batch_size': 32,
               'valuation.score_batch_size': 100}
  args = [f'--config={os.path.join(ROOT, "configs", "digits.py")}',
          *[f'--config.{k}={v}' for k, v in overrides.items()], '--method=tracin',
          f'--workdir={tmp_path / "two"}']
  codes, outs = _signalled_at_a_block('launch.valuate', args, signal.SIGTERM, tfds_dir, tmp_path)
  assert codes == [143, 143], '\n'.join(outs)[-6000:]
  assert re.findall(r'tracin scores: stopped after (\d+) of 6 blocks \(kept\): a process of '
                    r'this job was sent SIGTERM; run again to resume', outs[0]) == ['2'], outs[0]
  parts = sorted(glob.glob(str(tmp_path / 'two' / '.scores_tracin-*.part-*.json')))
  assert [json.load(open(f))['blocks_done'] for f in parts] == [2, 2], parts
  outs = _finish(_start('launch.valuate', args))
  assert 'noise AUROC' in outs[0] and 'noise AUROC' not in outs[1]
  config = get_config()
  for k, v in overrides.items():
    section, field = k.split('.')
    setattr(config[section], field, v)
  valuate('tracin', config, str(tmp_path / 'one'), progress=False)
  two, one = (pq.read_table(tmp_path / d / 'scores_tracin.parquet').to_pydict()
              for d in ('two', 'one'))
  np.testing.assert_array_equal(two['id'], one['id'])
  np.testing.assert_array_equal(two['corruption'], one['corruption'])
  np.testing.assert_allclose(two['score'], one['score'], rtol=1e-5)


def test_two_process_filter_writes_the_one_process_dataset(tfds_dir, tmp_path, rater_run):
  """Two processes score alternate blocks and exchange scores; process 0 writes the same bytes.
  Ctrl-C to process 1 as it scores stops both after the same block, with one line each and
  nothing written; so does an error in a block of process 1, with its line and one naming it."""
  args = ['--dataset=sklearn_digits', f'--rater={rater_run}', '--keep=0.7',
          f'--data_dir={tfds_dir}', '--label_noise=0.2', '--batch_size=100', '--threshold=exact']
  codes, outs = _signalled_at_a_block('launch.filter', [*args, f'--out={tmp_path / "two"}'],
                                      signal.SIGINT, tfds_dir, tmp_path)
  assert codes == [-signal.SIGINT] * 2, '\n'.join(outs)[-6000:]
  assert all(out.count('interrupted (Ctrl-C) at ') == 1 for out in outs), outs
  assert not os.path.exists(tmp_path / 'two')
  # An error in one process's block stops the other at its next vote (it waited there for good).
  codes, outs = _signalled_at_a_block('launch.filter', [*args, f'--out={tmp_path / "two"}'], -1,
                                      tfds_dir, tmp_path)
  assert codes == [2, 2], '\n'.join(outs)[-6000:]
  assert 'error: process 1 of this job stopped (its error line says why)' in outs[0], outs[0]
  assert 'error: a planted error in its second block' in outs[1], outs[1]
  assert not os.path.exists(tmp_path / 'two')
  outs = _finish(_start('launch.filter', [*args, f'--out={tmp_path / "two"}']))
  # One progress bar, process 0's, saying it counts that process's batches (each process showed
  # its own, each counting only its share of the split).
  assert "scoring train (process 0's batches)" in outs[0] and 'scoring' not in outs[1], outs
  filter_dataset('sklearn_digits', str(tmp_path / 'one'), ['train'], rater=rater_run,
                 keep=0.7, data_dir=tfds_dir, corruption=Corruption(0.2, 0), batch_size=100,
                 threshold='exact')
  read = lambda d: {os.path.relpath(p, d): open(p, 'rb').read() for p in sorted(glob.glob(
      os.path.join(d, '**'), recursive=True)) if os.path.isfile(p)}
  two, one = read(tmp_path / 'two'), read(tmp_path / 'one')
  assert len(one) >= 8 and two == one
  # A scores file's float64 values travel between the processes bit for bit (here they differ
  # only past float32's precision: rounded, the keep threshold would fall elsewhere).
  n = len(pq.read_table(tmp_path / 'one' / 'scores_train.parquet'))
  scores = tmp_path / 'fine.parquet'
  pq.write_table(pa.table({'id': np.arange(n), 'value': 1 + np.arange(n) * 1e-10}), scores)
  args = ['--dataset=sklearn_digits', f'--scores={scores}', '--keep=0.5', f'--data_dir={tfds_dir}',
          '--batch_size=100', '--threshold=exact']
  _finish(_start('launch.filter', [*args, f'--out={tmp_path / "two_scores"}']))
  filter_dataset('sklearn_digits', str(tmp_path / 'one_scores'), ['train'], scores=str(scores),
                 keep=0.5, data_dir=tfds_dir, batch_size=100, threshold='exact')
  two, one = read(tmp_path / 'two_scores'), read(tmp_path / 'one_scores')
  assert len(one) >= 8 and two == one


_DIFFERENT_RATERS = """
import os, sys
sys.path.insert(0, os.getcwd())
import jax
from configs.digits import get_config
from datarater.curation.filter import filter_dataset
from datarater.errors import UserError
from datarater.valuation.run import valuate
pid, port, tfds_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
rater = os.path.join(out, f'run{pid}')  # each process is handed its own rater
try:
  filter_dataset('sklearn_digits', os.path.join(out, 'filtered'), ['train'], rater=rater,
                 keep=0.7, data_dir=tfds_dir, batch_size=100)
except UserError as e:
  print('filter: ' + str(e))
config = get_config()
config.data.data_dir, config.valuation.rater = tfds_dir, rater
try:
  valuate('datarater', config, os.path.join(out, 'val'), progress=False)
except UserError as e:
  print('valuate: ' + str(e))
"""


@pytest.mark.slow  # (a two-process job for a case the README does not claim)
def test_processes_that_loaded_different_raters_stop_in_one_line(tfds_dir, tmp_path):
  """A rater run still training can hand the processes different checkpoints: filter and valuate
  must refuse on every process rather than mix two raters' blocks (nothing is written)."""
  for seed in (0, 1):
    config = small_config(tfds_dir, steps=2)
    config.seed = seed
    meta_train(config, str(tmp_path / f'run{seed}'))
  for out in _finish(_start_driver(_DIFFERENT_RATERS, tfds_dir, tmp_path)):
    assert re.search(r'^filter: --rater .*run\d.* changed while the processes loaded it',
                     out, re.M), out[-3000:]
    assert re.search(r'^valuate: valuation.rater .*run\d.* changed while the processes loaded',
                     out, re.M), out[-3000:]
  assert not (tmp_path / 'filtered').exists()
  assert not glob.glob(str(tmp_path / 'val' / 'scores_*'))


@pytest.mark.parametrize('signum,processes', [  # the vote of Ctrl-C in two: test_every_process_...
    (signal.SIGTERM, 2), pytest.param(signal.SIGINT, 2, marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, 1, marks=pytest.mark.slow)],  # (Ctrl-C: test_interrupts.py)
    ids=['SIGTERM', 'SIGINT', 'SIGINT-one-process'])
def test_a_signal_to_one_process_stops_both_after_one_step_that_resumes(tfds_dir, tmp_path,
                                                                         request, signum,
                                                                         processes):
  """SIGTERM (a preempted host) or Ctrl-C to process 1 alone: both processes stop after the same
  outer step, checkpointed there, at once (not after JAX's 300 s shutdown barrier), with exit code
  143 or as killed by SIGINT with one line; resumed in one process on one device, the rater
  equals an uninterrupted run's (after SIGTERM). A job of one process stops so too."""
  config = small_config(tfds_dir, steps=12)
  config.checkpoint_every = 2
  workdir = tmp_path / 'stopped'
  procs = _start_two_processes(workdir, config) if processes == 2 else [forked.start_module(
      'launch.train_rater', [f'--workdir={workdir}', *as_flags(config)], subprocess_env(2))]
  ckpt_dir = workdir / 'checkpoints'
  _wait_for_a_checkpoint(procs, ckpt_dir)
  procs[-1].send_signal(signum)
  outs = _outputs(procs, timeout=60)
  code, why = {signal.SIGTERM: (143, 'sent SIGTERM'),
               signal.SIGINT: (-signal.SIGINT, 'interrupted \\(Ctrl-C\\)')}[signum]
  assert [p.returncode for p in procs] == [code] * processes, '\n'.join(outs)[-6000:]
  who = 'a process of this job' if processes == 2 else 'the run'
  stopped = re.findall(r'stopped after outer step (\d+) \(checkpointed\): ' + who +
                       f' was {why}', outs[0])
  assert len(stopped) == 1, outs[0][-3000:]
  assert all('Traceback' not in out for out in outs), '\n'.join(outs)[-6000:]
  if signum == signal.SIGINT:  # one line each, saying where
    assert all(out.count('interrupted (Ctrl-C) at ') == 1 for out in outs), outs
  steps = [int(d) for d in os.listdir(ckpt_dir) if re.fullmatch(r'\d+', d)]
  assert max(steps) == int(stopped[0]) < 12, (steps, stopped)  # checkpointed where it stopped

  if signum == signal.SIGINT:  # the same checkpoint as SIGTERM's: resumed as below
    return
  meta_train(config, str(workdir), devices=jax.devices()[:1])  # 1 process, 1 device
  # Over 12 Adam steps the device layouts' float32 summation orders drift apart by ~1e-6; the
  # outer learning rate is 1e-3, so 1e-5 is 1% of a single update.
  _assert_same(_params(workdir), request.getfixturevalue('straight_12_steps'), atol=1e-5)


_ONE_SEES_ANOTHER_DATASET = """
import os, sys
sys.path.insert(0, os.getcwd())
import jax
from datarater import files
from datarater.errors import UserError
from datarater.meta_train import meta_train
from tests.run_config import small_config
pid, port, tfds_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
config = small_config(tfds_dir, steps=4)
config.data.dataset_dir, config.data.label_noise = os.path.join(out, 'filtered'), 0.0
meta_train(config, os.path.join(out, 'run'), stop_after=2)
if pid == 1:  # process 1 alone sees the folder written again (other times, other contents)
  files.stat_digest = lambda path, hidden=False: '0' * 16
  files.content_digest = lambda path: '0' * 16
try:
  meta_train(config, os.path.join(out, 'run'))
except UserError as e:
  print('refused: ' + str(e))
"""


def test_in_one_process_a_signal_stops_after_the_step_and_a_second_ctrl_c_at_once(monkeypatch):
  """The vote of one process is its own signal: asked during step 2, the loop stops after it and
  the signal is sent again once; a second Ctrl-C is let through (stops at once); no loop runs:
  a signal stops the process as usual."""
  from datarater import multihost  # pylint: disable=g-import-not-at-top
  sent = []
  monkeypatch.setattr(multihost.os, 'kill', lambda pid, signum: sent.append(('sent', signum)))
  for signum in (signal.SIGINT, signal.SIGTERM):
    sent.clear()
    with multihost.StopVote(jax.devices()[:1], 0,
                            lambda step, agreed: sent.append((step, agreed))) as vote:
      assert not vote.after(1)
      assert multihost.ask_to_stop(signum)
      assert multihost.ask_to_stop(signum) == (signum == signal.SIGTERM)  # 2nd Ctrl-C: at once
      assert vote.after(2) and vote.after(3)
    assert sent == [(2, signum), ('sent', signum)]
    assert not multihost.ask_to_stop(signum)
  with multihost.StopVote(jax.devices()[:1], 0):  # after a SIGTERM too, a second Ctrl-C stops
    assert multihost.ask_to_stop(signal.SIGTERM) and multihost.ask_to_stop(signal.SIGINT)
    assert not multihost.ask_to_stop(signal.SIGINT)


def test_a_signal_in_a_vote_nested_in_another_stops_the_outer_one(monkeypatch):
  """A vote inside another (a rater loaded, or a checkpoint written, in a stage that votes as it
  ends): the signal the inner one agrees on is sent again, and the outer vote, which the
  process's handler then asks (here, as it would), stops after its next step; the signal asked
  before the inner block is kept for the outer one too. Before, the inner block's end left no
  vote running: the signal stopped this process alone."""
  from datarater import multihost  # pylint: disable=g-import-not-at-top
  handled = []  # what the launcher's handler does with a signal sent again: ask the vote running
  monkeypatch.setattr(multihost.os, 'kill',
                      lambda pid, signum: handled.append(multihost.ask_to_stop(signum)))
  for asked_before in (False, True):
    handled.clear()
    with multihost.StopVote(jax.devices()[:1], 0) as outer:
      if asked_before:
        assert multihost.ask_to_stop(signal.SIGTERM)
      with multihost.StopVote(jax.devices()[:1], 0):
        if not asked_before:
          assert multihost.ask_to_stop(signal.SIGTERM)
      assert handled == ([] if asked_before else [True])  # the outer vote took it
      assert outer.after(1) and outer.stopped_at == 1 and outer.signum == signal.SIGTERM
    assert handled[-1] is False  # sent again after the outer block: no vote runs, it stops


@pytest.mark.slow  # (a two-process job for a case the README does not claim)
def test_a_dataset_folder_changed_for_one_process_stops_both(tfds_dir, tmp_path):
  """Each process digests data.dataset_dir itself; if one sees other contents than the checkpoint
  was made from, both refuse to resume (neither waits alone in a collective)."""
  from datarater import files  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  n = len(pipeline.load_split(small_config(tfds_dir).data, 'train'))
  scores = str(tmp_path / 'scores.parquet')
  files.write_parquet(scores, {'id': np.arange(n),
                               'value': np.random.default_rng(0).normal(size=n)})
  filter_dataset('sklearn_digits', str(tmp_path / 'filtered'), ['train'], scores=scores,
                 keep=0.5, data_dir=tfds_dir, batch_size=256)
  for out in _finish(_start_driver(_ONE_SEES_ANOTHER_DATASET, tfds_dir, tmp_path)):
    assert re.search(r"^refused: data.dataset_dir '.*filtered' changed since the checkpoint",
                     out, re.M), out[-3000:]
  steps = [json.loads(l)['step'] for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert steps == [2]  # nothing written by the refused resume


@pytest.mark.parametrize('module,args', [
    ('filter', ['--dataset=sklearn_digits', '--scores=S', '--keep=0.5', '--out=W']),
    ('train_rater', ['--workdir=W']),
    ('valuate', ['--method=tracin', '--workdir=W'])])
def test_bad_input_on_one_process_stops_both_in_one_line(tfds_dir, tmp_path, module, args):
  """Process 1 alone is given a data folder that is a file (a flag each machine may set for
  itself): it stops with its line, process 0 with one naming it, neither left waiting for the
  other in a collective; nothing is written."""
  (tmp_path / 'a_file').write_text('not a folder')
  scores = tmp_path / 'scores.parquet'
  pq.write_table(pa.table({'id': np.arange(1197), 'value': np.zeros(1197)}), scores)
  args = [a.replace('W', str(tmp_path / 'out')).replace('S', str(scores)) for a in args]
  if module == 'filter':
    args.append(f'--data_dir={tfds_dir}')
    bad = f'--data_dir={tmp_path}/a_file'
  else:
    args += as_flags(small_config(tfds_dir, steps=2), READ_BY[module])
    bad = f'--config.data.data_dir={tmp_path}/a_file'
  procs = _start(f'launch.{module}', args, ((), (bad,)))
  outs = _outputs(procs, timeout=120)
  for p, out, msg in zip(procs, outs, (
      'process 1 of this job stopped checking its settings and data',
      f"data_dir '{tmp_path}/a_file' is a file, not a folder")):
    errors = [l for l in out.splitlines() if l.startswith('error: ')]
    assert p.returncode == 2 and len(errors) == 1 and msg in errors[0], out[-2000:]
    assert 'Traceback' not in out
  assert not os.path.exists(tmp_path / 'out')


_STOP_VOTES = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from datarater import multihost
sent = []  # the signals each block sends this process again (the launcher's handler would stop)
for signum in (signal.SIGINT, signal.SIGTERM):
  signal.signal(signum, lambda signum, frame: sent.append(signal.Signals(signum).name))
def stopped(block):
  return lambda step, signum: print(block, 'stopped after', step, signal.Signals(signum).name)
with multihost.StopVote(jax.devices(), 0, stopped('A')) as vote:
  for step in range(1, 6):
    if pid == 0 and step == 2:
      assert multihost.ask_to_stop(signal.SIGINT)  # what a Ctrl-C does to this process now
      assert multihost.ask_to_stop(signal.SIGINT)  # a second too (alone it would wait at exit)
    if vote.after(step):
      break
print('A signals', *sent)
sent.clear()
with multihost.StopVote(jax.devices(), 0, stopped('B')) as vote:
  assert not any(vote.after(step) for step in (1, 2, 3))
  if pid == 1:  # after the last step's vote, e.g. while its checkpoint is written
    assert multihost.ask_to_stop(signal.SIGTERM)
print('B signals', *sent)
sent.clear()
with multihost.StopVote(jax.devices(), 0, stopped('C')) as vote:  # Ctrl-C to one, SIGTERM to one
  assert multihost.ask_to_stop([signal.SIGINT, signal.SIGTERM][pid])
  assert vote.after(1) and vote.after(2)
print('C signals', *sent)
assert not multihost.ask_to_stop(signal.SIGTERM)  # no vote runs: a signal stops this process
"""


def test_every_process_stops_after_the_step_the_vote_agrees_on(tfds_dir, tmp_path):
  """Process 0 asked to stop by Ctrl-C at step 2: both stop after it and are sent SIGINT; process
  1 asked by SIGTERM after the last step's vote: the vote as the block ends stops both after step
  3 and sends them SIGTERM; Ctrl-C to one and SIGTERM to the other: SIGTERM to both."""
  outs = _finish(_start_driver(_STOP_VOTES, tfds_dir, tmp_path), timeout=120)
  for out in outs:
    lines = [l for l in out.splitlines() if l.startswith(('A ', 'B ', 'C '))]
    assert lines == ['A stopped after 2 SIGINT', 'A signals SIGINT',
                     'B stopped after 3 SIGTERM', 'B signals SIGTERM',
                     'C stopped after 1 SIGTERM', 'C signals SIGTERM'], out


# A launcher as one of two jax.distributed processes whose shutdown barrier gives up after
# SHUTDOWN_S (JAX's default, 300 s, scaled down; SLOW_SHUTDOWN_S for 'slow'); process `who` meets
# `fault` as it calls `target` ('module:function' or 'module:Class.method', with '@n': from its
# call n + 1 on): 'error' (a full disk), 'sigterm' (sent to itself), or 'slow' (SLOW_S more
# seconds of work, past the other's shutdown barrier).
_FAULT_AT = """
import functools, importlib, os, runpy, signal, sys, time
sys.path.insert(0, os.getcwd())
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
module, target, who, fault, args = {module!r}, {target!r}, {who}, {fault!r}, {args!r}
jax.distributed.initialize = functools.partial(jax.distributed.initialize,
                                               shutdown_timeout_seconds={shutdown_s})
target, _, skip = target.partition('@')
calls = [0]
name, attribute = target.split(':')
owner = importlib.import_module(name)
*path, attribute = attribute.split('.')
for part in path:
  owner = getattr(owner, part)
original = getattr(owner, attribute)
def planted(*a, **k):
  calls[0] += 1
  if calls[0] <= int(skip or 0):
    return original(*a, **k)
  if pid == who and fault == 'error':
    raise OSError(28, 'No space left on device', 'planted')
  if pid == who and fault == 'sigterm':
    os.kill(os.getpid(), signal.SIGTERM)
  if pid == who and fault == 'slow':
    time.sleep({slow_s})
  return original(*a, **k)
setattr(owner, attribute, planted)
sys.argv = [module, *args, f'--coordinator_address=127.0.0.1:{{port}}', '--num_processes=2',
            f'--process_id={{pid}}']
runpy.run_module(module, run_name='__main__')
"""
# A slow case's processes leave the block together and end together, so its barrier may be
# shorter than the failing cases' (whose processes may end seconds apart): its slow work outlasts
# the barrier by SLOW_S - SLOW_SHUTDOWN_S = 3 s.
SHUTDOWN_S, SLOW_SHUTDOWN_S, SLOW_S = 5, 2, 5


slow = pytest.mark.slow  # (each case is a two-process job)


@pytest.mark.parametrize('module,target,who,fault,codes', [
    pytest.param('valuate', 'datarater.config_checks:validate', 1, 'sigterm', [143, 143],
                 id='valuate-startup-sigterm'),
    pytest.param('valuate', 'datarater.valuation.factory:build', 1, 'error', [2, 2],
                 id='valuate-fit-error'),
    pytest.param('valuate', 'datarater.valuation.factory:build', 1, 'sigterm', [143, 143],
                 id='valuate-fit-sigterm', marks=slow),
    pytest.param('valuate', 'datarater.curation.scores_file:write', 0, 'error', [2, 2],
                 id='valuate-write-error', marks=slow),
    pytest.param('filter', 'datarater.export:load_rater', 1, 'error', [2, 2],
                 id='filter-load-error'),
    pytest.param('filter-exported', 'datarater.export:load_rater', 1, 'error', [2, 2],
                 id='filter-exported-load-error', marks=slow),
    pytest.param('filter', 'datarater.curation.tfds_writer:write_subset', 0, 'slow', [0, 0],
                 id='filter-slow-write'),
    pytest.param('train_rater', 'datarater.files:JsonlLog.write', 0, 'error', [2, 2],
                 id='train_rater-log-error', marks=slow),  # (batches-error: a rater run's)
    pytest.param('train_rater', 'outer_loop.batches:MetaBatches.device_batches_at@2', 1, 'error',
                 [2, 2], id='train_rater-batches-error'),
    pytest.param('train_rater', 'datarater.meta_train:final_report', 0, 'slow', [0, 0],
                 id='train_rater-slow-report', marks=slow),
    pytest.param('train', 'datarater.files:JsonlLog.__init__', 0, 'error', [2, 2],
                 id='train-history-error', marks=slow),
    pytest.param('train', 'datarater.files:JsonlLog.write@1', 0, 'error', [2, 2],
                 id='train-log-error', marks=slow),
    pytest.param('train-scores', 'datarater.curation.scores_file:read_values', 1, 'error',
                 [2, 2], id='train-scores-read-error', marks=slow),
    pytest.param('train-rater', 'datarater.export:load_rater', 1, 'error', [2, 2],
                 id='train-rater-load-error', marks=slow),
    pytest.param('train', 'datarater.policies:start_policy', 1, 'error', [2, 2],
                 id='train-policy-error', marks=slow),
    pytest.param('train', 'datarater.policies:start_policy', 1, 'sigterm', [143, 143],
                 id='train-policy-sigterm', marks=slow),
    pytest.param('train-stream', 'datarater.data.source:Source.take@2', 1, 'error', [2, 2],
                 id='train-stream-read-error', marks=slow),
    pytest.param('train-stream', 'datarater.data.source:Source.take@2', 1, 'sigterm',
                 [143, 143], id='train-stream-read-sigterm', marks=slow),
    pytest.param('train', 'datarater.files:write_json', 0, 'error', [2, 2],
                 id='train-report-error', marks=slow),
    pytest.param('train', 'datarater.plots:save_train_report', 0, 'error', [0, 0],
                 id='train-figure-error', marks=slow)])
def test_one_process_failing_signalled_or_slow_where_each_works_alone_stops_or_waits_for_all(
    tfds_dir, tmp_path, request, module, target, who, fault, codes):
  """Where the processes work alone (start-up checks, a valuation's fit, the filter's rater
  loading, a rater run's gathering of its next step's batches, launch.train's reading of a rater
  or scores file, policy set-up and streamed chunks, process 0 logging a rater run's step or
  writing the output), one that fails or is signalled stops every process there, each with its
  line (a figure not drawn is a warning), and a launch.train rerun finishes the run; one that
  works on past the others' shutdown barrier (JAX's 300 s, here SLOW_SHUTDOWN_S) finishes its
  output. Before: the others waited in their next collective up to the shutdown timeout and all
  aborted with JAX's C++ trace (launch.train's rater digest), or (a rater run's log or batches,
  launch.train's streamed chunk) for good; a slow output was lost the same way."""
  out = tmp_path / 'out'
  if module == 'valuate':
    args = [f'--config={os.path.join(ROOT, "configs", "digits.py")}',
            f'--config.data.data_dir={tfds_dir}', '--config.valuation.train_steps=10',
            '--config.valuation.checkpoint_every=5', '--config.valuation.score_batch_size=300',
            '--method=tracin', f'--workdir={out}']
  elif module.startswith('filter'):  # the rater a run, or exported (read by another orbax call)
    rater = request.getfixturevalue('rater_run')
    if module == 'filter-exported':
      module, rater = 'filter', tmp_path / 'exported'
      export_rater(request.getfixturevalue('rater_run'), str(rater))
    args = ['--dataset=sklearn_digits', f'--rater={rater}', '--keep=0.7',
            f'--data_dir={tfds_dir}', '--batch_size=300', f'--out={out}']
  elif module.split('-')[0] == 'train':  # uniform (train-stream: streamed), or reading a file
    reads = {'train-rater': 'rater', 'train-scores': 'scores'}.get(module)
    config = _train_config(tfds_dir, epochs=4)
    config.train.stream = module == 'train-stream'
    inputs = {reads: request.getfixturevalue('policy_inputs')[reads]} if reads else {}
    policy = {'rater': 'datarater', 'scores': 'scores'}.get(reads, 'uniform')
    module, args = 'train', [*_train_flags(config, policy, out),
                             *(f'--{k}={v}' for k, v in inputs.items())]
  else:
    args = [f'--workdir={out}', *as_flags(small_config(tfds_dir, steps=4))]
  procs = _start_driver(_FAULT_AT.format(
      module=f'launch.{module}', target=target, who=who, fault=fault, args=args,
      shutdown_s=SLOW_SHUTDOWN_S if fault == 'slow' else SHUTDOWN_S, slow_s=SLOW_S), tfds_dir,
      tmp_path)
  outs = _outputs(procs, timeout=120)
  assert [p.returncode for p in procs] == codes, '\n---\n'.join(o[-3000:] for o in outs)
  assert all('Traceback' not in o and 'Check failure' not in o for o in outs), outs
  errors = [[l for l in o.splitlines() if l.startswith('error: ')] for o in outs]
  if codes == [2, 2]:  # the failed process's line, and one naming it on the other
    assert errors[who] == ['error: No space left on device (planted)'], errors
    assert len(errors[1 - who]) == 1 and (f'process {who} of this job stopped'
                                          in errors[1 - who][0]), errors
  else:
    assert errors == [[], []], errors
  written = {'valuate': out / 'scores_tracin.parquet', 'filter': out / 'filter_report.json',
             'train_rater': out / 'report.json', 'train': out / 'report.json'}[module]
  assert written.exists() == (codes == [0, 0])
  if module == 'train':  # nothing half-written (a figure not drawn is a warning); a rerun ends it
    assert not glob.glob(str(out / '**' / '.*.tmp-*'), recursive=True)
    if target.endswith('save_train_report'):
      assert not (out / 'train_report.png').exists()
    if codes != [0, 0]:
      from datarater.train import train  # pylint: disable=g-import-not-at-top
      train(config, policy, workdir=str(out), log=lambda _: None, **inputs)
      assert json.load(open(out / 'report.json'))['history'][-1]['epoch'] == 4


# A rater run as one of two jax.distributed processes; process 1 cannot write files over 8 KiB
# from its save of checkpoint `at` on (its shards are ~19 KiB: EFBIG, as on a full quota).
_CANNOT_WRITE_ITS_PART = """
import os, resource, runpy, signal, sys
sys.path.insert(0, os.getcwd())
from datarater import checkpointing
pid, port = int(sys.argv[1]), sys.argv[2]
at, args = {at}, {args!r}
save = checkpointing.RunCheckpointer.save
def limited(self, step, *a, **k):
  if pid == 1 and step == at:
    self._open(create=True).wait_until_finished()  # (the last save's writes are not limited)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  return save(self, step, *a, **k)
checkpointing.RunCheckpointer.save = limited
sys.argv = ['launch.train_rater', *args, f'--coordinator_address=127.0.0.1:{{port}}',
            '--num_processes=2', f'--process_id={{pid}}']
runpy.run_module('launch.train_rater', run_name='__main__')
"""


@pytest.mark.parametrize('at,kept', [(4, ['2']), pytest.param(12, ['8', '10'], marks=slow)],
                         ids=['mid-run', 'last'])
def test_one_process_that_cannot_write_its_part_of_a_checkpoint_stops_both(
    tfds_dir, tmp_path, straight_12_steps, at, kept):
  """Process 1's shards of checkpoint `at` fail to write (orbax writes them in the background):
  both processes stop within seconds (mid-run: at the next step's vote; at the last step: as the
  run closes its checkpoints), each with one line (process 0's naming process 1), and the run
  resumes from the last checkpoint kept to the uninterrupted run's rater. Before, process 0
  waited in orbax's barrier for process 1's write, and process 1 in another for process 0, each
  up to orbax's 20 minute timeout (twice), then both ended in tracebacks."""
  config = small_config(tfds_dir, steps=12)
  workdir = tmp_path / 'run'
  procs = _start_driver(_CANNOT_WRITE_ITS_PART.format(
      at=at, args=[f'--workdir={workdir}', *as_flags(config)]), tfds_dir, tmp_path)
  outs = _outputs(procs, timeout=120)
  assert [p.returncode for p in procs] == [2, 2], '\n---\n'.join(o[-3000:] for o in outs)
  assert all('Traceback' not in o for o in outs), '\n---\n'.join(o[-3000:] for o in outs)
  errors = [[l for l in o.splitlines() if l.startswith('error: ')] for o in outs]
  assert len(errors[0]) == 1 and 'error: process 1 of this job ' in errors[0][0], errors
  assert len(errors[1]) == 1 and errors[1][0].startswith('error: File too large'), errors
  steps = sorted((d for d in os.listdir(workdir / 'checkpoints') if re.fullmatch(r'\d+', d)),
                 key=int)
  assert steps == kept, os.listdir(workdir / 'checkpoints')
  assert not (workdir / 'report.json').exists()
  meta_train(config, str(workdir), devices=jax.devices()[:4])  # resumed from the last kept
  _assert_same(_params(workdir), straight_12_steps, atol=1e-5)


# A rater run as one of two jax.distributed processes that reach its workdir by two paths (as
# two hosts that mount one file system at different points; here a symlink on process 1).
_ONE_FOLDER_TWO_PATHS = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import jax
from datarater.meta_train import meta_train
from tests.run_config import small_config
pid, port, tfds_dir, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
meta_train(small_config(tfds_dir, steps=4),
           os.path.join(tmp, ('shared', 'mounted')[pid], 'run'))
print('finished')
"""


@pytest.mark.slow  # (a two-process job for a case the README does not claim)
def test_processes_that_reach_the_workdir_by_two_paths_checkpoint_it(tfds_dir, tmp_path):
  """Every checkpoint is written, and the run ends with one process's rater. Before, the save
  barriers were named by each process's own path of the folder: the processes waited for each
  other there (orbax's 20 minutes) from the first checkpoint on."""
  (tmp_path / 'shared').mkdir()
  os.symlink(tmp_path / 'shared', tmp_path / 'mounted')
  _finish(_start_driver(_ONE_FOLDER_TWO_PATHS, tfds_dir, tmp_path), timeout=120)
  assert sorted(d for d in os.listdir(tmp_path / 'shared' / 'run' / 'checkpoints')
                if re.fullmatch(r'\d+', d)) == ['2', '4']
  config = small_config(tfds_dir, steps=4)
  meta_train(config, str(tmp_path / 'straight'), devices=jax.devices()[:4])
  _assert_same(_params(tmp_path / 'shared' / 'run'), _params(tmp_path / 'straight'), atol=1e-5)


# Checksums of a tree mixing arrays that span the two processes with arrays each process holds
# whole (a host array, one on its own first device), printed by each process.
_MIXED_CHECKSUMS = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import jax
import numpy as np
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from datarater import checkpointing
values = [np.arange(24, dtype=np.float32).reshape(8, 3) * (i + 1) for i in range(4)]
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('d',))
on = lambda spec: jax.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
spanning = lambda x, spec: jax.make_array_from_callback(x.shape, on(spec), lambda i: x[i])
tree = {'sharded': spanning(values[0], ('d',)), 'replicated': spanning(values[1], ()),
        'host': values[2], 'local': jax.device_put(values[3], jax.local_devices()[0])}
print('SUMS', json.dumps(checkpointing.checksums(tree)))
"""


@pytest.mark.slow  # (a two-process job for a case the README does not claim)
def test_checksums_of_a_tree_of_spanning_and_whole_arrays_equal_one_process(tmp_path):
  """Two processes' checksums of arrays sharded or replicated over both and of arrays each holds
  whole (a host array, one on a local device) equal one process's of the same values. Before, once
  one array spanned the processes, the whole arrays' sums were added over both (counted twice)."""
  outs = _finish(_start_driver(_MIXED_CHECKSUMS, '', tmp_path), timeout=120)
  values = [np.arange(24, dtype=np.float32).reshape(8, 3) * (i + 1) for i in range(4)]
  one = checkpointing.checksums(dict(zip(('sharded', 'replicated', 'host', 'local'), values)))
  for out in outs:
    (line,) = [l for l in out.splitlines() if l.startswith('SUMS ')]
    assert json.loads(line[5:]) == one, out


# A Trainer spanning both processes (2 CPU devices each) starts 8 models (2 a device); every
# program run from the Trainer's start on is also compiled ahead, its bytes on a device recorded.
_SPANNING_INIT = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import jax
import optax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from datarater import checkpointing
from datarater.policies import weighting
from datarater.trainer import Trainer
from tests.tiny import tiny_problem
real_jit, most = jax.jit, [0]

class Measured:
  def __init__(self, jitted):
    self._jitted = jitted

  def __getattr__(self, name):
    return getattr(self._jitted, name)

  def __call__(self, *inputs, **kw):
    m = self._jitted.lower(*inputs, **kw).compile().memory_analysis()
    most[0] = max(most[0], m.argument_size_in_bytes + m.output_size_in_bytes +
                  m.temp_size_in_bytes)
    return self._jitted(*inputs, **kw)

def jit(fn=None, *args, **kwargs):
  if fn is None:
    return lambda f: jit(f, *args, **kwargs)
  return Measured(real_jit(fn, *args, **kwargs))
task = tiny_problem(dim=64, hidden=(64,)).task
trainer = Trainer(task, optax.sgd(0.1), weighting.weighting_policy('uniform', 100), 4,
                  devices=jax.devices())
jax.jit = jit
params = trainer.init(list(range(8)), 100)[0].models.params
jax.jit = real_jit
share = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
print('INIT', json.dumps({'most': most[0], 'share': share,
                          'sums': checkpointing.checksums(params)}))
"""


@pytest.mark.slow  # (a two-process job)
def test_a_trainer_spanning_processes_starts_its_models_on_their_devices_alone(tmp_path):
  """A Trainer over both processes' devices starts from one process's initial parameters, and
  no program of its start needs more on a device than a few times its share of the models (the
  parameters in and out, SGD's state, the policy's). Before, each process placed them with
  jax.device_put, which gathered both processes' copies of all 8 models onto every device to
  compare them: 2 x 8 models where the run holds 2."""
  from datarater.trainer import initial_params  # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_problem  # pylint: disable=g-import-not-at-top
  outs = _finish(_start_driver(_SPANNING_INIT, '', tmp_path), timeout=120)
  one = checkpointing.checksums(initial_params(tiny_problem(dim=64, hidden=(64,)).task,
                                               range(8), 'train', jax.devices()[:1]))
  for out in outs:
    (line,) = [l for l in out.splitlines() if l.startswith('INIT ')]
    got = json.loads(line[5:])
    assert got['sums'] == one, out
    assert 0 < got['most'] <= 3 * got['share'] + 1024, got


# launch.train's run as process i of two, every process_allgather (what jax.device_put onto
# devices of both processes runs to compare the processes' copies) spied on: prints the largest
# one's bytes and the bytes of the smallest split the trainer places.
_GATHERS_IN_TRAIN = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import jax
import numpy as np
from jax.experimental import multihost_utils
pid, port, tfds_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from datarater.data import pipeline
from datarater.train import train
from tests.test_multihost import _train_config
gather, largest = multihost_utils.process_allgather, [0]
def spied(x, *a, **k):
  got = gather(x, *a, **k)
  largest[0] = max([largest[0]] + [np.asarray(g).nbytes for g in jax.tree.leaves(got)])
  return got
multihost_utils.process_allgather = spied
config = _train_config(tfds_dir)
train(config, 'uniform', workdir=os.path.join(out, 'run'))
splits = [pipeline.load_split(config.data, s) for s in (config.data.train_split,
          config.data.heldout_split, config.data.eval_split)]
smallest = min(sum(v.nbytes for v in s.features.values()) for s in splits)
print('GATHERS', json.dumps({'largest': largest[0], 'smallest_split': smallest}))
"""


@pytest.mark.slow  # (a two-process job)
def test_two_process_launch_train_places_its_data_without_gathering_it(tfds_dir, tmp_path):
  """launch.train over two processes places the training split, the evaluation blocks and each
  chunk's host arrays with no gather as large as the smallest split it places: each process puts
  its own devices' shards. Before, jax.device_put gathered both processes' copies of each onto
  every device to compare them (2x the training features)."""
  for out in _finish(_start_driver(_GATHERS_IN_TRAIN, tfds_dir, tmp_path)):
    (line,) = [l for l in out.splitlines() if l.startswith('GATHERS ')]
    got = json.loads(line[8:])
    assert 0 < got['largest'] < got['smallest_split'], got
  assert (tmp_path / 'run' / 'report.json').exists()


# launch.train as process i of two, process 1 holding one value changed in its copy of split
# `which` (a host's copy prepared otherwise): 'heldout' in memory, or the streamed training split.
_DIFFERENT_CONTENTS = """
import dataclasses, os, sys
sys.path.insert(0, os.getcwd())
import jax
from datarater.data import pipeline, source
from datarater.errors import UserError
from datarater.train import train
from tests.test_multihost import _train_config
pid, port, tfds_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
which = {which!r}
jax.distributed.initialize(f'127.0.0.1:{{port}}', num_processes=2, process_id=pid)
config = _train_config(tfds_dir)
config.train.stream = which == 'stream'
load, take = pipeline.load_split, source.Source.take
def changed(features):
  image = features['image'].copy()
  image.flat[0] += pid
  return {{**features, 'image': image}}
def loaded(data, split, *a, **k):
  got = load(data, split, *a, **k)
  if which == 'heldout' and split == data.heldout_split:
    got = dataclasses.replace(got, features=changed(got.features))
  return got
pipeline.load_split = loaded
if which == 'stream':
  source.Source.take = lambda self, positions: changed(take(self, positions))
try:
  train(config, 'uniform', workdir=os.path.join(out, 'run'))
except UserError as e:
  print('train: ' + str(e))
"""


@pytest.mark.slow  # (two two-process jobs)
def test_processes_holding_different_contents_of_the_data_stop_in_one_line(tfds_dir, tmp_path):
  """Copies of the data that agree in layout but not in contents stop every process in one line
  naming the split: the held-out split at start-up, before any step; a streamed training split
  at the chunk that differs. Each process places its own copy on its devices: none would
  otherwise see that the other trains or evaluates on other examples. (Before, jax.device_put's
  comparison of the copies stopped both with a traceback.)"""
  expected = {'heldout': r"data\.heldout_split 'validation' of dataset 'sklearn_digits'",
              'stream': r'the training split for steps 1-'}
  for which, pattern in expected.items():
    (tmp_path / which).mkdir()
    outs = _finish(_start_driver(_DIFFERENT_CONTENTS.format(which=which), tfds_dir,
                                 tmp_path / which))
    for out in outs:
      assert re.search(r'^train: the processes of this job (hold different contents of|read '
                       r'different examples of) ' + pattern + r'.*: give every process the same '
                       r'prepared data$', out, re.M), out[-3000:]
      assert 'Traceback' not in out, out[-3000:]
    assert not (tmp_path / which / 'run' / 'report.json').exists()
  assert not (tmp_path / 'heldout' / 'run').exists()


def _train_config(tfds_dir, epochs: int = 2, seeds=(0,)):
  """A seconds-long launch.train run: one seed's batches split over every device (over both
  processes in a two-process job: their gradient sums cross processes)."""
  c = get_config()
  c.data.data_dir = tfds_dir
  c.task.hidden = (16,)
  c.train.epochs, c.train.seeds, c.train.batch_size = epochs, seeds, 64
  return c


def _train_flags(c, policy: str, workdir) -> list[str]:
  return [f'--config.data.data_dir={c.data.data_dir}', f'--config.task.hidden={c.task.hidden}',
          f'--config.train.epochs={c.train.epochs}', f'--config.train.seeds={c.train.seeds}',
          f'--config.train.batch_size={c.train.batch_size}', f'--policy={policy}',
          f'--workdir={workdir}', *(['--config.train.stream=True'] * c.train.stream)]


def _assert_same_history(two: dict, one: dict) -> None:
  """Two reports' histories: the same records and counts; every metric (the running training
  loss too) within float32 summation order. A two-process job sums a batch's gradient over its 4
  devices across the processes (gloo) in another order than one process does: ~1e-7 relative
  per step, grown by a few dozen Adam steps (lr 1e-3) to ~1e-6 in a loss; an accuracy moves by a
  whole example (1/300) only if a prediction sat within that of a tie."""
  assert len(two['history']) == len(one['history']) > 0
  for a, b in zip(two['history'], one['history']):
    assert {k: a[k] for k in ('epoch', 'step', 'example_gradients', 'scoring_forwards')} == \
           {k: b[k] for k in ('epoch', 'step', 'example_gradients', 'scoring_forwards')}
    for split in ('train', 'heldout', 'eval'):
      assert a[split].keys() == b[split].keys()
      for metric in a[split]:
        np.testing.assert_allclose(a[split][metric], b[split][metric], rtol=1e-5, atol=1e-6,
                                   err_msg=f'{split} {metric} at epoch {a["epoch"]}')


@pytest.mark.slow  # (a variant of the CI case above, and a resume across process counts)
def test_two_process_selection_run_stopped_resumes_in_one_process_to_the_one_process_run(
    tfds_dir, tmp_path):
  """InfoBatch (per-epoch selection; its state a per-model pytree) over 3 seeds (gcd(3, 4) = 1:
  every seed's batches split over both processes), stopped after epoch 2 in two processes and
  resumed in one process (4 devices): the report of a one-process run, uninterrupted."""
  from datarater.train import train  # pylint: disable=g-import-not-at-top
  config = _train_config(tfds_dir, epochs=4, seeds=(0, 1, 2))
  config.train.checkpoint_every = 1
  outs = _finish(_start('launch.train', [*_train_flags(config, 'infobatch', tmp_path / 'two'),
                                         '--stop_after=2']))
  assert 'stopped after epoch 2 (checkpointed)' in outs[0], outs[0][-3000:]
  lines = []
  resumed = train(config, 'infobatch', workdir=str(tmp_path / 'two'), log=lines.append)
  assert 'resuming from the checkpoint at epoch 2' in lines, lines
  straight = train(config, 'infobatch', workdir=str(tmp_path / 'one'), log=lambda _: None)
  _assert_same_history(resumed, straight)
  records = [json.loads(l) for l in open(tmp_path / 'two' / 'history.jsonl')]
  assert [r['epoch'] for r in records] == [1, 2, 3, 4]


@pytest.mark.slow  # (a two-process job stopped by a signal, as the rater run's CI case is)
def test_a_sigterm_to_one_process_of_launch_train_stops_both_and_the_run_resumes(tfds_dir,
                                                                                 tmp_path):
  """SIGTERM to process 1 alone, once a checkpoint is written: both processes stop after the
  same chunk of steps (the vote), at once, with exit code 143 and no traceback; the run resumes
  in one process (4 devices) to an uninterrupted one-process run's report."""
  from datarater.train import train  # pylint: disable=g-import-not-at-top
  config = _train_config(tfds_dir, epochs=150)
  config.train.checkpoint_every = 1
  workdir = tmp_path / 'stopped'
  procs = _start('launch.train', _train_flags(config, 'uniform', workdir))
  ckpt_dir = workdir / 'checkpoints'
  _wait_for_a_checkpoint(procs, ckpt_dir)
  procs[1].send_signal(signal.SIGTERM)
  outs = _outputs(procs, timeout=60)
  assert [p.returncode for p in procs] == [143, 143], '\n'.join(outs)[-6000:]
  assert all('Traceback' not in out for out in outs), '\n'.join(outs)[-6000:]
  assert not (workdir / 'report.json').exists()
  done = max(int(d) for d in os.listdir(ckpt_dir) if re.fullmatch(r'\d+', d))
  assert done < config.train.epochs
  config.train.epochs = done + 2  # (a weighting run may be extended: the oracle is shorter)
  lines = []
  resumed = train(config, 'uniform', workdir=str(workdir), log=lines.append)
  assert f'resuming from the checkpoint at epoch {done}' in lines, lines
  straight = train(config, 'uniform', workdir=str(tmp_path / 'one'), log=lambda _: None)
  _assert_same_history(resumed, straight)


# launch.train over two processes, per policy (and streaming): the --config overrides (those the
# policy reads) and the launcher inputs it reads. Every policy makes its set-up in each process
# alone (a rater or scores file read, a valuation fitted, an SAE trained).
_POLICY_CASES = {
    'uniform': ({}, ()),
    'datarater': ({}, ('rater',)),
    'datarater_batch_filter': ({'policy.rho': 0.25}, ('rater',)),
    'datarater_accept': ({'policy.rho': 0.25}, ('rater',)),
    'scores': ({}, ('scores',)),
    'tracin_curriculum': ({'valuation.train_steps': 20, 'valuation.checkpoint_every': 10}, ()),
    'mimic': ({'valuation.reference_steps': 20}, ()),
    'sae': ({'features.extractor': 'pixels', 'sae.steps': 50, 'sae.num_factors': 32}, ()),
    'stream': ({'train.stream': True}, ()),  # uniform weights, the split read as it trains
}


@pytest.fixture(scope='module')
def policy_inputs(rater_run, tmp_path_factory) -> dict:
  """The --rater (the module's rater run, which CI's filter case makes too) and --scores (random
  values of the digits' train split) that the two-process policy cases read."""
  from datarater.curation import scores_file  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('scores') / 'scores.parquet')
  values = np.random.default_rng(3).normal(size=1197)
  scores_file.write(path, np.arange(1197), values, values, dataset='sklearn_digits',
                    split='train')
  return {'rater': rater_run, 'scores': path}


# launch.train as one of two jax.distributed processes, printing the start of each block of the
# training split it scores ('SCORED 256'), whether the scores it ends with are, bit for bit, those
# of the whole split scored by this process alone ('ALONE True') and a digest of its policy's
# constant arrays ('AUX 1f0c...').
_COUNTING_BLOCKS = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import jax
import numpy as np
from datarater import evaluation, train
from datarater.data import pipeline, source
from datarater.valuation import store
pid, port, args = int(sys.argv[1]), sys.argv[2], {args!r}
def counting(blocks):
  def counted(self, *a, **k):
    for positions, batch in blocks(self, *a, **k):
      print('SCORED', positions[0], flush=True)
      yield positions, batch
  return counted
source.Source.blocks = counting(source.Source.blocks)
pipeline.Split.blocks = counting(pipeline.Split.blocks)
shared = evaluation.score_split_shared
def compared(score_fn, split, *a, **k):
  values = shared(score_fn, split, *a, **k)
  print('ALONE', np.array_equal(values, evaluation.score_split(score_fn, split)), flush=True)
  return values
evaluation.score_split_shared = compared
same_policy = train.same_policy
def digested(name, made, *a):
  print('AUX', store.digest(jax.device_get(made.aux)), flush=True)
  return same_policy(name, made, *a)
train.same_policy = digested
sys.argv = ['launch.train', *args, f'--coordinator_address=127.0.0.1:{{port}}',
            '--num_processes=2', f'--process_id={{pid}}']
runpy.run_module('launch.train', run_name='__main__')
"""


@pytest.mark.parametrize('case', [  # CI: the rater's weights (the aux a loaded rater places)
    c if c == 'datarater' else pytest.param(c, marks=pytest.mark.slow) for c in _POLICY_CASES])
def test_two_process_launch_train_equals_one_process(tfds_dir, tmp_path, policy_inputs, case,
                                                     monkeypatch):
  """launch.train (one seed, its batches split over every device of both processes) in two
  processes of 2 devices: process 0 alone prints the epochs and writes history.jsonl and
  report.json, whose figures are one process's (4 devices), for every policy (each process
  making it alone) and a streamed split (each process reading every row of each chunk). A
  policy made from scores of the split (tracin_curriculum's values, datarater_accept's
  reference) has it scored once: each process its own blocks, every process ending with the
  scores, bit for bit, that it would score alone, and the same policy: one process's, bit for
  bit, where its set-up trains no model."""
  from datarater import evaluation  # pylint: disable=g-import-not-at-top
  from datarater import train as train_lib  # pylint: disable=g-import-not-at-top
  from datarater.valuation import store  # pylint: disable=g-import-not-at-top
  overrides, reads = _POLICY_CASES[case]
  policy = 'uniform' if case == 'stream' else case
  config = _train_config(tfds_dir)
  for path, value in overrides.items():
    section, field = path.split('.')
    config[section][field] = value
  inputs = {k: policy_inputs[k] for k in reads}
  outs = _finish(_start_driver(_COUNTING_BLOCKS.format(args=[
      *_train_flags(config, policy, tmp_path / 'two'), *(f'--{k}={v}' for k, v in inputs.items()),
      *(f'--config.{k}={v}' for k, v in overrides.items())]), tfds_dir, tmp_path))
  assert outs[0].count('epoch ') >= 2 and 'epoch ' not in outs[1], outs
  two = json.load(open(tmp_path / 'two' / 'report.json'))
  assert [json.loads(l) for l in open(tmp_path / 'two' / 'history.jsonl')] == two['history']
  scored = [[int(l.split()[1]) for l in out.splitlines() if l.startswith('SCORED ')]
            for out in outs]
  if case in ('tracin_curriculum', 'datarater_accept'):
    starts = list(range(0, two['num_train'], evaluation.SCORE_BLOCK))
    assert scored == [starts[0::2], starts[1::2]] and len(starts) > 2, scored
    assert [re.findall(r'^ALONE (\w+)$', out, re.M) for out in outs] == [['True']] * 2, outs
  else:
    assert scored == [[], []], scored
  aux = [re.findall(r'^AUX (\w+)$', out, re.M) for out in outs]
  assert aux[0] == aux[1] and len(aux[0]) == 1, aux
  digests = []
  same_policy = train_lib.same_policy
  monkeypatch.setattr(train_lib, 'same_policy', lambda name, made, *a: (
      digests.append(store.digest(jax.device_get(made.aux))), same_policy(name, made, *a))[-1])
  one = train_lib.train(config, policy, workdir=str(tmp_path / 'one'), log=lambda _: None,
                        **inputs)
  assert len(jax.devices()) == 4
  _assert_same_history(two, one)
  if case not in ('tracin_curriculum', 'mimic', 'sae'):  # (their set-up trains a model on its
    assert digests == aux[0], (digests, aux)  # process's devices: 2 here, 4 in one process)


@pytest.mark.slow  # (two two-process jobs)
def test_an_error_or_sigterm_on_one_process_as_launch_train_scores_the_split_stops_both(
    tfds_dir, tmp_path, policy_inputs):
  """datarater_accept's reference scores, shared out by blocks: an error in process 1's second
  block stops both (exit 2), each with one line, process 0's naming process 1; SIGTERM to
  process 1 there stops both (143). No traceback, and nothing is written."""
  config = _train_config(tfds_dir)
  args = [*_train_flags(config, 'datarater_accept', tmp_path / 'run'),
          f'--rater={policy_inputs["rater"]}', '--config.policy.rho=0.25']
  for signum, codes in ((-1, [2, 2]), (signal.SIGTERM, [143, 143])):
    got, outs = _signalled_at_a_block('launch.train', args, signum, tfds_dir, tmp_path)
    assert got == codes, '\n---\n'.join(o[-3000:] for o in outs)
    errors = [[l for l in o.splitlines() if l.startswith('error: ')] for o in outs]
    if signum < 0:
      assert errors == [['error: process 1 of this job stopped (its error line says why)'],
                        ['error: a planted error in its second block']], errors
    assert not os.path.exists(tmp_path / 'run' / 'history.jsonl')


_DIFFERENT_SCORES = """
import os, sys
sys.path.insert(0, os.getcwd())
import jax
from datarater.errors import UserError
from datarater.train import train
from tests.test_multihost import _train_config
pid, port, tfds_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
try:  # each process is handed its own file, as a host's own copy at one path would be
  train(_train_config(tfds_dir), 'scores', scores=os.path.join(out, f'scores{pid}.parquet'),
        workdir=os.path.join(out, 'run'))
except UserError as e:
  print('train: ' + str(e))
"""


@pytest.mark.slow  # (a two-process job for a case the README does not claim)
def test_processes_that_made_different_policies_stop_in_one_line(tfds_dir, tmp_path):
  """Scores files that differ between the processes (another copy on one host, a file rewritten
  while they read it) stop every process in one line before any step: they would train on
  different weights."""
  from datarater.curation import scores_file  # pylint: disable=g-import-not-at-top
  for pid in (0, 1):
    values = np.random.default_rng(pid).normal(size=1197)
    scores_file.write(str(tmp_path / f'scores{pid}.parquet'), np.arange(1197), values, values,
                      dataset='sklearn_digits', split='train')
  for out in _finish(_start_driver(_DIFFERENT_SCORES, tfds_dir, tmp_path)):
    assert re.search(r'^train: the processes of this job made policy scores differently: '
                     r'--scores .*scores\d.parquet.* read differently', out, re.M), out[-3000:]
  assert not (tmp_path / 'run').exists()


ALONE = '''
import sys
from absl import flags
import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from launch import distributed
distributed.define_flags()
flags.FLAGS([sys.argv[0], f'--coordinator_address=127.0.0.1:{sys.argv[1]}', '--num_processes=1',
             '--process_id=0'])
distributed.initialize_from_flags()
mesh = jax.make_mesh((2,), ('d',))
psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, 'd'), mesh=mesh, in_specs=P('d'),
                             out_specs=P()))
x = jax.device_put(np.arange(8.0).reshape(2, 4), jax.NamedSharding(mesh, P('d')))
print('sum', psum(x).tolist(), flush=True)
'''


def test_a_one_process_job_sums_its_devices_in_process(tmp_path):
  """In a job of one process, a collective between its 2 devices is right and does not go
  through gloo (which logs its connections; it made such a collective ~20x slower)."""
  driver = tmp_path / 'driver.py'
  driver.write_text(ALONE)
  out, = _finish([forked.start_script(str(driver), [str(_free_port())], subprocess_env(2))], 120)
  assert f'sum {np.arange(8.0).reshape(2, 4).sum(0, keepdims=True).tolist()}' in out, out
  assert '[Gloo]' not in out, out
