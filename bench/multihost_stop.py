r"""A SIGTERM to a two-process rater run, and what the stop vote after each step costs.

  python -m bench.multihost_stop                  # 4 tries each, 300 outer steps
  python -m bench.multihost_stop --tries=2 --steps=200

Two `launch.train_rater` processes on this machine (jax.distributed on 127.0.0.1, 2 CPU devices
each; configs/digits.py made small: population 2, batches of 16, widths 16). Stops: once 3 metric
records are logged, SIGTERM goes to process 1 alone (`one`) or to both, 0.3 s apart (`both`); each
try records both exit codes, the seconds from the first signal until both have exited, the step
process 0 says it stopped after and the newest checkpoint's step. Cost: unsignalled runs with the
vote and with `StopVote.after` replaced by one that never votes (as before the vote existed),
alternating, paired by try; steps/s is the mean of the logged records' after the first (compile
and start-up left out). Writes OUT.json and OUT.png.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from bench import cli as bench_cli
from bench import provenance
from bench.compare import paired
from datarater import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRIES = flags.DEFINE_integer('tries', 4, 'Tries of each stop and pairs of timed runs.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Outer steps of each run.')
_OUT = flags.DEFINE_string('out', 'bench/results/multihost_stop', 'Output path prefix.')

# One process of the job: launch.train_rater as a program, with the vote left out if asked.
PROCESS = """
import runpy, sys
if sys.argv.pop(1) == 'no_vote':
  from datarater import multihost
  multihost.StopVote.after = lambda self, done: False
sys.argv[0] = 'train_rater'
runpy.run_module('launch.train_rater', run_name='__main__', alter_sys=True)
"""
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _flags(data_dir: str, steps: int) -> list[str]:
  overrides = {'data.data_dir': data_dir, 'outer.steps': steps, 'inner.population': 2,
               'inner.batch_size': 16, 'outer.batch_size': 16, 'task.hidden': '(16,)',
               'rater.hidden': '(16,)', 'log_every': 10, 'checkpoint_every': 50,
               'final_eval.num_models': 0}
  return [f'--config={os.path.join(ROOT, "configs", "digits.py")}',
          *(f'--config.{k}={v}' for k, v in overrides.items())]


def _start(workdir: str, args: list[str], vote: bool) -> list[subprocess.Popen]:
  port, env = _free_port(), dict(os.environ, PYTHONPATH=ROOT,
                                 XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return [subprocess.Popen(
      [sys.executable, '-c', PROCESS, 'vote' if vote else 'no_vote', f'--workdir={workdir}',
       *args, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def _wait(procs, deadline: float) -> list[str]:
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
    except subprocess.TimeoutExpired:
      p.kill()
      outs.append(p.communicate()[0])
  return outs


def stop_try(workdir: str, args: list[str], mode: str) -> dict:
  """One two-process run signalled after its third metric record."""
  procs = _start(workdir, args, vote=True)
  deadline = time.time() + TIMEOUT_S
  while len(_records(workdir)) < 3 and time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      break  # ended early: its output says why
    time.sleep(0.05)
  signalled = time.time()
  targets = procs if mode == 'both' else procs[1:]
  for i, p in enumerate(targets):
    if i:
      time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
  outs = _wait(procs, signalled + TIMEOUT_S)
  ended = time.time()
  stopped = re.findall(r'stopped after outer step (\d+)', outs[0])
  ckpts = os.path.join(workdir, 'checkpoints')
  steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  return {'mode': mode, 'exit_codes': [p.returncode for p in procs],
          'seconds_to_stop': round(ended - signalled, 2),
          'stopped_after': int(stopped[0]) if stopped else None,
          'newest_checkpoint': max(steps, default=None),
          'tail': None if [p.returncode for p in procs] == [143, 143] else outs[0][-2000:]}


def timed_run(workdir: str, args: list[str], vote: bool) -> float:
  """Steps per second of an unsignalled run (mean over the records after the first)."""
  outs = _wait(_start(workdir, args, vote), time.time() + TIMEOUT_S)
  records = _records(workdir)
  if len(records) < 2:
    raise RuntimeError(f'a timed run logged {len(records)} record(s):\n{outs[0][-2000:]}')
  return float(np.mean([r['steps_per_sec'] for r in records[1:]]))


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_cost, ax_stop) = plt.subplots(1, 2, figsize=(11, 4))
  pairs = results['timed']
  x = np.arange(len(pairs))
  ax_cost.bar(x - 0.2, [p['steps_per_sec_no_vote'] for p in pairs], 0.4, label='no vote')
  ax_cost.bar(x + 0.2, [p['steps_per_sec_vote'] for p in pairs], 0.4, label='vote')
  ax_cost.set(xlabel='pair', ylabel='outer steps / s', title='Two CPU processes, no signal',
              xticks=x)
  ax_cost.legend()
  for mode, marker in (('one', 'o'), ('both', 's')):
    tries = [t for t in results['stops'] if t['mode'] == mode]
    ax_stop.plot(range(len(tries)), [t['seconds_to_stop'] for t in tries], marker, label=mode)
  ax_stop.set(xlabel='try', ylabel='seconds from SIGTERM until both exited',
              title='SIGTERM to one / both processes',
              ylim=(0, 1.1 * max(t['seconds_to_stop'] for t in results['stops'])),  # top dot whole
              xticks=range(max(len([t for t in results['stops'] if t['mode'] == m])
                               for m in ('one', 'both'))))
  ax_stop.legend()
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  bench_cli.at_least('tries', _TRIES.value, 1)
  bench_cli.at_least('steps', _STEPS.value, 40)
  bench_cli.out_folder(_OUT.value)
  with tempfile.TemporaryDirectory(prefix='multihost_stop_') as scratch:
    from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
    data_dir = os.path.join(scratch, 'tfds')
    pipeline.get_builder('sklearn_digits', data_dir)
    args = _flags(data_dir, _STEPS.value)
    stops, timed = [], []
    for t in range(_TRIES.value):
      for mode in ('one', 'both'):
        stops.append(stop_try(os.path.join(scratch, f'stop_{mode}_{t}'), args, mode))
        print(json.dumps({k: v for k, v in stops[-1].items() if k != 'tail'}), flush=True)
      pair = {f'steps_per_sec_{name}': timed_run(os.path.join(scratch, f'{name}_{t}'), args,
                                                 vote=name == 'vote')
              for name in ('vote', 'no_vote')}
      timed.append(pair)
      print(json.dumps(pair), flush=True)
  ms = lambda key: [1e3 / p[key] for p in timed]
  cost = paired(ms('steps_per_sec_vote'), ms('steps_per_sec_no_vote'), scale=1.0)
  clean = [s for s in stops if s['exit_codes'] == [143, 143]
           and s['stopped_after'] is not None and s['stopped_after'] == s['newest_checkpoint']]
  results = {'steps': _STEPS.value, 'tries': _TRIES.value, 'stops': stops, 'timed': timed,
             'vote_ms_per_step': cost,
             'stopped_together': f'{len(clean)} of {len(stops)}',
             'max_seconds_to_stop': max(s['seconds_to_stop'] for s in stops)}
  provenance.write_results(_OUT.value, results, plot=lambda path: plot(results, path))
  print(f'the vote: {cost["diff"]:+.1f} +- {cost["se"]:.1f} ms a step (paired s.e.); stopped '
        f'together, checkpointed where they stopped: {results["stopped_together"]}, within '
        f'{results["max_seconds_to_stop"]:.1f} s')
  print(f'wrote {_OUT.value}.json and {_OUT.value}.png')


if __name__ == '__main__':
  bench_cli.run(main, __doc__)
