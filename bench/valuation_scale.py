r"""Valuation at dataset scale: projected per-example gradients, launcher memory, the gradient store.

  python -m bench.valuation_scale            # everything (about 13 minutes on 2 CPU cores)
  python -m bench.valuation_scale --quick    # tiny sizes (a smoke run): valuation_scale_quick.*

Three sections (`--sections`), each measured in fresh subprocesses (peak resident memory is the
child's own high-water mark, VmHWM, which it writes at exit), written to bench/results/valuation_scale.{json,png,md}:

- `methods`: examples/s and peak RSS against N examples processed (blocks of `--block` real
  training examples, read once and cycled) of each example's projected gradient at equal
  projected dimension D (the factored projection's, k x k per Dense layer): dense per-example
  gradients then a dense Gaussian projection (`pergrad.per_example`, a materialised [P, D]
  matrix), dense per-example gradients then the same Kronecker factors
  (`pergrad.factored_transform`: the reference the factored projection must equal), the factored
  projection (`pergrad.per_example_projected`: no per-example gradient formed), exact ghost
  squared norms (`pergrad.ghost_sq_norms`: self-influence, no projection) and `batched_grad`, the
  mean gradient of each chunk (the floor: one backward pass). All run `valuation.chunk_size`
  examples at a time. On the Fashion-MNIST CNN
  (configs/fashion_mnist.py) and the byte transformer (configs/text.py, every parameter in a
  Dense layer), the transformer also at k = 4 and 16.
- `launchers`: peak RSS and wall time of `launch.valuate` and `launch.filter` run as
  subprocesses on N = 10k ... 60k real Fashion-MNIST training examples and, by repetition, up to
  1M: the first N training images (cycled past 60k) are written as idx files and prepared as an
  `idx_mnist/fashion` dataset of their own (not measured). valuate scores its `train` split with
  the cheapest method that streams: TracIn self-influence (exact ghost squared norms) of an MLP
  (configs/digits.py's) on a 20-step recorded run with one checkpoint; its time is the whole
  subprocess's wall clock (start-up, the recorded run and compilation included).
  The filter then filters that split with valuate's scores file (keep 0.8, exact threshold),
  writing the kept examples as a TFDS dataset.
- `store`: TracIn train x test from a gradient store (`valuation/store.py`) of the 60k
  Fashion-MNIST training examples (the CNN, 3 checkpoints): the first query (build the store,
  score test[:1000]) against a second one on a new test set (test[1000:2000]) read from the store,
  with the compiled test-gradient function and with a freshly opened store (compiling again); a
  second store built from scratch for the new test set checks the scores are identical.

Timings on the shared 2-core machine move with its load: compare ratios within one run.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

from absl import flags
import numpy as np

from bench import cli as bench_cli
from bench import provenance
from datarater import files
from datarater.errors import UserError

SECTIONS = ('methods', 'launchers', 'store')
METHODS = ('dense_gaussian', 'dense_kronecker', 'factored', 'ghost_sq_norms', 'batched_grad')
TASKS = {'cnn': 'fashion_mnist', 'transformer': 'text'}  # configs/<name>.py
REAL = 60_000  # Fashion-MNIST training examples
IDX_DIR = '/usr/share/datasets/fashion-mnist'
LAUNCHER_NOISE = 0.2  # launchers: symmetric label noise planted in the split scored and filtered


def define_flags() -> None:
  """Defined when run as a script, not on import (tests import it beside other benches)."""
  global _OUT, _QUICK, _SECTIONS, _SCRATCH, _BLOCK, _LAUNCHER_NS
  global _WORKER, _TASK, _METHOD, _K, _NS, _SAVE, _TRAIN
  _OUT = flags.DEFINE_string('out', 'bench/results/valuation_scale', 'Output prefix (left out '
                             'with --quick: bench/results/valuation_scale_quick).')
  _QUICK = flags.DEFINE_bool('quick', False, 'Tiny sizes: a smoke run of every section.')
  _SECTIONS = flags.DEFINE_list('sections', list(SECTIONS), 'Sections to run.')
  _SCRATCH = flags.DEFINE_string('scratch', '/tmp/datarater_valuation_scale',
                                 'Folder for workdirs, datasets and logs (emptied per size).')
  _BLOCK = flags.DEFINE_integer('block', 256, 'methods: examples per call.')
  _LAUNCHER_NS = flags.DEFINE_list('launcher_ns', [], 'launchers: the sizes N (default: 10k..1M).')
  # One measurement in a subprocess (internal).
  _WORKER = flags.DEFINE_enum('worker', None, ['method', 'store'], 'internal: one measurement.')
  _TASK = flags.DEFINE_enum('task', 'cnn', list(TASKS), 'internal (method): the task.')
  _METHOD = flags.DEFINE_enum('method', 'factored', list(METHODS), 'internal (method): the method.')
  _K = flags.DEFINE_integer('k', 8, 'internal (method): k_in = k_out per Dense layer.')
  _NS = flags.DEFINE_list('ns', ['1024'], 'internal (method): N milestones.')
  _SAVE = flags.DEFINE_string('save', '', 'internal (method): .npy of the first block\'s output.')
  _TRAIN = flags.DEFINE_string('train_split', 'train', 'internal (store): the training split.')


def _status_mib(field: str) -> float:
  """A /proc/self/status memory field (VmRSS: now, VmHWM: peak) in MiB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return float(line.split()[1]) / 1024
  return float('nan')


# Runs `python ARGS` and writes the process's own peak resident set (VmHWM, kB) to a file at exit.
# A child's ru_maxrss from wait4 is no measure of it: Linux carries the parent's high-water mark
# across fork and exec into the child's, and this bench's own process holds up to N images.
_PEAK_WRAPPER = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)
def _write_peak():
  with open('/proc/self/status') as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
  with open(peak_file, 'w') as f:
    f.write(str(kb))
atexit.register(_write_peak)
if sys.argv[1] == '-m':
  sys.argv = [sys.argv[2], *sys.argv[3:]]
  runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
  code, sys.argv = sys.argv[2], ['-c', *sys.argv[3:]]
  exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})
"""


def run_child(args: list[str], log: str, env: dict = None) -> dict:
  """Runs `python args` (args start with -m or -c); its wall time, peak RSS (the child's own
  VmHWM) and the JSON of the last stdout line (if any). stderr goes to `log`."""
  peak_file = log + '.peak_kb'
  if os.path.exists(peak_file):
    os.remove(peak_file)
  t0 = time.perf_counter()
  with open(log, 'w') as err:
    proc = subprocess.run([sys.executable, '-c', _PEAK_WRAPPER, peak_file, *args],
                          stdout=subprocess.PIPE, stderr=err, env=dict(os.environ, **(env or {})),
                          text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode:
    with open(log) as f:
      raise RuntimeError(f'{" ".join(args)} exited with {proc.returncode}:\n{f.read()[-3000:]}')
  with open(peak_file) as f:
    peak_kb = int(f.read())
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1]) if lines and lines[-1].startswith('{') else {}
  return {**result, 'wall_s': wall, 'peak_rss_mib': peak_kb / 1024}


def _config(task: str):
  return importlib.import_module(f'configs.{TASKS[task]}').get_config()


# ----------------------------------------------------------------------------- methods (worker)


def method_fn(method: str, loss, params, state, chunk: int):
  """(fn(params, batch, arg) -> per-example outputs, arg) of `method`, all from the pergrad
  layer, `chunk` examples at a time (one big batch is several times slower on CPU); the
  projections map into D = state.dim dimensions."""
  import jax  # pylint: disable=g-import-not-at-top
  from datarater import pergrad  # pylint: disable=g-import-not-at-top
  if method == 'dense_gaussian':  # R [P, D] ~ N(0, 1/D), drawn once: the fastest dense projection
    num_params = sum(x.size for x in jax.tree.leaves(params))
    # Held once: drawn into a 64-byte-aligned buffer, which the CPU device takes without a copy
    # (device_put copies an unaligned array, and a draw on the device makes P x D temporaries).
    size = num_params * state.dim * 4
    buf = np.empty(size + 64, np.uint8)
    start = -buf.ctypes.data % 64
    r = buf[start:start + size].view(np.float32).reshape(num_params, state.dim)
    np.random.default_rng(1).standard_normal(out=r, dtype=np.float32)
    r *= 1 / math.sqrt(state.dim)
    r = jax.block_until_ready(jax.device_put(r, may_alias=True))
    dense = pergrad.chain(pergrad.flatten(), pergrad.GradTransform(lambda g: r, lambda g, m: g @ m))
    return (lambda p, b, s: pergrad.per_example(loss, p, b, dense, s, chunk)), dense.init(params)
  if method == 'dense_kronecker':
    return (lambda p, b, s: pergrad.per_example(loss, p, b, pergrad.factored_transform(s), s,
                                                chunk)), state
  if method == 'factored':
    return (lambda p, b, s: pergrad.per_example_projected(loss, p, b, s, chunk_size=chunk)), state
  if method == 'ghost_sq_norms':
    return (lambda p, b, s: pergrad.chunked_batches(
        lambda c: pergrad.ghost_sq_norms(loss, p, c), b, chunk)), ()
  # The floor: one backward pass (the mean gradient) per chunk.
  return (lambda p, b, s: jax.lax.map(lambda c: pergrad.mean_grad(loss, p, c), jax.tree.map(
      lambda x: x.reshape(-1, chunk, *x.shape[1:]), b))), ()


def method_worker(task_name: str, method: str, k: int, ns: list[int], block: int,
                  save: str) -> dict:
  """Examples/s and peak RSS of `method` after each N in `ns` (a warm-up block, compiling, first)."""
  import jax  # pylint: disable=g-import-not-at-top
  from datarater import pergrad, tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import source  # pylint: disable=g-import-not-at-top
  config = _config(task_name)
  train = source.open_source(config.data, config.data.train_split, corrupt=True)
  task = tasks.make_task(config.task, train.info)
  params = task.init(jax.random.key(0))
  pool = [jax.device_put(train.take(np.arange(i * block, (i + 1) * block))) for i in range(4)]
  chunk = min(config.valuation.chunk_size, block)  # block is a multiple of it
  state = pergrad.factored_projection(k, k, seed=0).init(task.per_example_loss, params, pool[0])
  rss_setup = _status_mib('VmRSS')
  fn, arg = method_fn(method, task.per_example_loss, params, state, chunk)
  fn = jax.jit(fn)
  t0 = time.perf_counter()
  first = np.asarray(jax.tree.leaves(fn(params, pool[0], arg))[0])
  compile_s = time.perf_counter() - t0
  if save:
    np.save(save, first)
  series, done, t0 = [], 0, time.perf_counter()
  for n in sorted(ns):
    while done < n:
      jax.block_until_ready(fn(params, pool[(done // block) % len(pool)], arg))
      done += block
    secs = time.perf_counter() - t0
    series.append({'n': done, 'seconds': secs, 'examples_per_s': done / secs,
                   'peak_rss_mib': _status_mib('VmHWM'), 'rss_mib': _status_mib('VmRSS')})
  return {'task': task_name, 'method': method, 'k': k, 'dim': state.dim, 'chunk': chunk,
          'block': block, 'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
          'dense_layers': len(state.names), 'compile_and_first_block_s': compile_s,
          'rss_after_setup_mib': rss_setup, 'series': series,
          'examples_per_s': series[-1]['examples_per_s'],
          'peak_rss_mib_worker': series[-1]['peak_rss_mib']}


def run_methods(quick: bool, scratch: str, block: int) -> dict:
  """Every (task, method) at k = 8, and the transformer's projections at k = 4 and 16."""
  if quick:
    plan = {('cnn', 8): [64, 128], ('transformer', 8): [32, 64], ('transformer', 16): [32]}
  else:
    plan = {('cnn', 8): [1024, 4096, 16384], ('transformer', 8): [256, 512, 1024, 2048],
            ('transformer', 4): [1024], ('transformer', 16): [1024]}
  if quick:
    block = 32
  runs, checks = [], {}
  for (task, k), ns in plan.items():
    methods = METHODS if k == 8 else ('dense_gaussian', 'dense_kronecker', 'factored')
    for method in methods:
      save = os.path.join(scratch, f'{task}_{k}_{method}.npy')
      r = run_child(['-m', 'bench.valuation_scale', '--worker=method', f'--task={task}',
                     f'--method={method}', f'--k={k}', f'--ns={",".join(map(str, ns))}',
                     f'--block={block}', f'--save={save}'],
                    os.path.join(scratch, f'method_{task}_{k}_{method}.log'))
      runs.append(r)
      print(f'{task:12s} k={k:2d} D={r["dim"]:5d} {method:16s} {r["examples_per_s"]:9.1f} ex/s  '
            f'peak RSS {r["peak_rss_mib"]:7.0f} MiB', flush=True)
    ref, fac = (np.load(os.path.join(scratch, f'{task}_{k}_{m}.npy'))
                for m in ('dense_kronecker', 'factored'))
    checks[f'{task}_k{k}'] = float(np.abs(fac - ref).max() / np.abs(ref).max())
  speedups = {}
  for task, k in plan:
    eps = {r['method']: r['examples_per_s'] for r in runs if r['task'] == task and r['k'] == k}
    speedups[f'{task}_k{k}'] = {
        'factored_over_dense_gaussian': eps['factored'] / eps['dense_gaussian'],
        'factored_over_dense_kronecker': eps['factored'] / eps['dense_kronecker']}
  return {'runs': runs, 'factored_vs_dense_kronecker_max_rel_err_float32': checks,
          'speedups': speedups}


# ----------------------------------------------------------------------------- launchers


def split_expression(n: int) -> str:
  """The first n examples of Fashion-MNIST's training split, cycled, as a split expression of
  the real dataset: 'train[:n]' or 'train+...+train[:r]'."""
  if n <= REAL:
    return f'train[:{n}]'
  reps, rest = divmod(n, REAL)
  return '+'.join(['train'] * reps + ([f'train[:{rest}]'] if rest else []))


def write_idx_dataset(folder: str, n: int) -> None:
  """idx files of the examples of `split_expression(n)` in order (and the real test files)."""
  from datarater.data import idx_mnist  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  for kind in ('images-idx3', 'labels-idx1'):
    real = idx_mnist.read_idx(os.path.join(IDX_DIR, f'train-{kind}-ubyte.gz'))
    idx_mnist.write_idx(os.path.join(folder, f'train-{kind}-ubyte'),
                        real[np.arange(n) % len(real)])
    shutil.copy(os.path.join(IDX_DIR, f't10k-{kind}-ubyte.gz'), folder)


def run_launchers(quick: bool, scratch: str, ns: list[int]) -> dict:
  ns = sorted(ns or ([1000, 2000] if quick else [10_000, 30_000, 60_000, 250_000, 1_000_000]))
  rows = []
  for n in ns:
    base = os.path.join(scratch, f'n{n}')
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    # The input of both: the N examples as a dataset of their own (prepared, not measured).
    idx, data_dir = os.path.join(base, 'idx'), os.path.join(base, 'tfds')
    write_idx_dataset(idx, n)
    env = {'DATARATER_IDX_DIR': idx}
    prepare = run_child(['-c', 'import sys; from datarater.data import pipeline; '
                         'pipeline.get_builder("idx_mnist/fashion", sys.argv[1])', data_dir],
                        os.path.join(scratch, f'prepare_{n}.log'), env)
    workdir = os.path.join(base, 'valuate')
    valuate = run_child([
        '-m', 'launch.valuate', '--method=tracin', '--config=configs/digits.py',
        f'--workdir={workdir}', '--config.data.name=idx_mnist/fashion',
        f'--config.data.data_dir={data_dir}', '--config.data.train_split=train',
        '--config.data.heldout_split=test[:1000]', '--config.valuation.train_steps=20',
        f'--config.data.label_noise={LAUNCHER_NOISE}', '--config.data.noise_seed=0',
        '--config.valuation.checkpoint_every=20', '--config.valuation.score_batch_size=1024'],
                        os.path.join(scratch, f'valuate_{n}.log'), env)
    with open(os.path.join(workdir, 'scores_tracin.json')) as f:
      summary = json.load(f)
    assert summary['num_examples'] == n, summary['num_examples']
    out = os.path.join(base, 'filtered')
    filt = run_child([
        '-m', 'launch.filter', '--dataset=idx_mnist/fashion', f'--data_dir={data_dir}',
        '--split=train', f'--scores={os.path.join(workdir, "scores_tracin.parquet")}',
        '--keep=0.8', '--copy_other_splits=false', '--batch_size=1024', f'--out={out}',
        f'--label_noise={LAUNCHER_NOISE}', '--noise_seed=0'],  # the data the scores were made on
                     os.path.join(scratch, f'filter_{n}.log'), env)
    with open(os.path.join(out, 'filter_report.json')) as f:
      kept = json.load(f)['splits']['train']['kept']
    rows.append({'n': n, 'examples': split_expression(n),
                 'valuate': {'wall_s': valuate['wall_s'], 'peak_rss_mib': valuate['peak_rss_mib'],
                             'noise_auroc': summary['noise_auroc']},
                 'filter': {'wall_s': filt['wall_s'], 'peak_rss_mib': filt['peak_rss_mib'],
                            'kept': kept},
                 'prepare_dataset_s': prepare['wall_s']})
    print(f'N={n:8d}  valuate {valuate["wall_s"]:6.1f} s {valuate["peak_rss_mib"]:6.0f} MiB   '
          f'filter {filt["wall_s"]:6.1f} s {filt["peak_rss_mib"]:6.0f} MiB  (kept {kept})',
          flush=True)
    shutil.rmtree(base, ignore_errors=True)
  first, last = rows[0], rows[-1]
  return {'method': 'tracin self-influence (ghost), MLP 784-128-128-10, 20-step run, '
                    '1 checkpoint; filter: --scores, keep 0.8 exact',
          'rows': rows,
          'rss_ratio_largest_over_smallest': {
              k: last[k]['peak_rss_mib'] / first[k]['peak_rss_mib'] for k in ('valuate', 'filter')}}


# ----------------------------------------------------------------------------- store (worker)


def store_worker(train_split: str, scratch: str, quick: bool) -> dict:
  """First query (build + score test set A) vs second (test set B from the store)."""
  import jax  # pylint: disable=g-import-not-at-top
  from datarater import pergrad, tasks  # pylint: disable=g-import-not-at-top
  from datarater.data import source  # pylint: disable=g-import-not-at-top
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  from datarater.valuation import store as store_lib  # pylint: disable=g-import-not-at-top
  config = _config('cnn')
  v = config.valuation
  v.train_steps, v.checkpoint_every = (30, 10) if quick else (300, 100)
  train = source.open_source(config.data, train_split, corrupt=True)
  task = tasks.make_task(config.task, train.info)
  loss = task.per_example_loss
  t0 = time.perf_counter()
  run, _ = factory.record(config, task, train, v.train_steps, v.checkpoint_every)
  record_s = time.perf_counter() - t0
  num_test = 100 if quick else 1000
  test = lambda lo: jax.device_put(source.open_source(config.data, f'test[{lo}:{lo + num_test}]')
                                   .take(np.arange(num_test)))
  test_a, test_b = test(0), test(num_test)
  projection = pergrad.factored_projection(v.store_k, v.store_k, v.projection_seed)
  build = lambda name: store_lib.build(os.path.join(scratch, name), loss, run, train, projection,
                                       split_name=train_split, block_size=1024,
                                       chunk_size=v.chunk_size)
  times = {}

  def timed(name, fn):
    t = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - t
    return out

  def first_query(name, batch):  # the store built, then the test set scored
    store = build(name)
    return store, store.tracin(loss, run, batch)

  store, _ = timed('first_query_build_and_score_s', lambda: first_query('store_a', test_a))
  second = timed('second_query_s', lambda: store.tracin(loss, run, test_b))
  reopened = timed('second_query_reopened_s',
                   lambda: store_lib.GradientStore(store.path).tracin(loss, run, test_b))
  _, fresh = timed('first_query_on_new_set_s', lambda: first_query('store_b', test_b))
  return {'train_split': train_split, 'num_train': len(train), 'num_test': num_test,
          'checkpoints': int(len(run.checkpoint_steps)), 'dim': store.dim,
          'store_bytes': int(sum(os.path.getsize(os.path.join(store.path, c['file']))
                                 for c in store.meta['checkpoints'])),
          'record_run_s': record_s, **times,
          'speedup': times['first_query_build_and_score_s'] / times['second_query_s'],
          'speedup_reopened': times['first_query_build_and_score_s']
                              / times['second_query_reopened_s'],
          'identical_to_fresh_build': bool(np.array_equal(second, fresh)
                                           and np.array_equal(reopened, fresh)),
          'max_abs_diff_to_fresh_build': float(np.abs(second - fresh).max())}


def run_store(quick: bool, scratch: str) -> dict:
  folder = os.path.join(scratch, 'store')
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  r = run_child(['-m', 'bench.valuation_scale', '--worker=store', f'--scratch={folder}',
                 f'--train_split={"train[:2000]" if quick else "train"}'] +
                (['--quick'] if quick else []), os.path.join(scratch, 'store.log'))
  shutil.rmtree(folder, ignore_errors=True)
  print(f'store: first query {r["first_query_build_and_score_s"]:.1f} s, second '
        f'{r["second_query_s"]:.2f} s ({r["speedup"]:.1f}x; reopened {r["speedup_reopened"]:.1f}x),'
        f' identical scores: {r["identical_to_fresh_build"]}', flush=True)
  return r


# ----------------------------------------------------------------------------- report


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
  axes = axes.reshape(-1)
  m = results.get('methods')
  if m:
    keys = [(r['task'], r['k']) for r in m['runs']]
    groups = list(dict.fromkeys(keys))
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
      xs, ys = [], []
      for i, g in enumerate(groups):
        for r in m['runs']:
          if (r['task'], r['k']) == g and r['method'] == method:
            xs.append(i + j * width)
            ys.append(r['examples_per_s'])
      axes[0].bar(xs, ys, width, label=method)
    axes[0].set_xticks(np.arange(len(groups)) + 0.4 - width / 2,
                       [f'{t}\nk={k}' for t, k in groups])
    axes[0].set(yscale='log', ylabel='examples / s', title='Projected per-example gradients')
    axes[0].legend(fontsize=7)
    for j, method in enumerate(METHODS):
      for r in m['runs']:
        if r['method'] == method and r['k'] == 8:
          s = r['series']
          axes[1].plot([p['n'] for p in s], [p['peak_rss_mib'] for p in s], marker='o',
                       color=f'C{j}', linestyle='-' if r['task'] == 'cnn' else '--')
    axes[1].set(xscale='log', xlabel='examples processed (N)', ylabel='peak RSS (MiB)',
                title='Memory vs N (k=8; solid CNN, dashed transformer)')
    # One entry per method (its colour, as in the bars) and per task (its line style).
    axes[1].legend(handles=[Line2D([], [], color=f'C{j}', marker='o', label=method)
                            for j, method in enumerate(METHODS)] +
                   [Line2D([], [], color='gray', linestyle=ls, label=task)
                    for ls, task in (('-', 'cnn'), ('--', 'transformer'))],
                   fontsize=8, ncol=2, loc='best')
  lr = results.get('launchers')
  if lr:
    ns = [r['n'] for r in lr['rows']]
    for kind, c in (('valuate', 'C0'), ('filter', 'C1')):
      axes[2].plot(ns, [r[kind]['peak_rss_mib'] for r in lr['rows']], marker='o', color=c,
                   label=f'launch.{kind}')
    base = lr['rows'][0]
    for kind, c in (('valuate', 'C0'), ('filter', 'C1')):
      axes[2].axhline(1.5 * base[kind]['peak_rss_mib'], color=c, linestyle=':', linewidth=1)
    axes[2].set(xscale='log', xlabel='training examples (N)', ylabel='peak RSS (MiB)',
                title='Launchers: peak RSS vs N (dotted: 1.5x the smallest N)')
    axes[2].legend(fontsize=8)
  s = results.get('store')
  if s:
    names = ['first_query_build_and_score_s', 'first_query_on_new_set_s', 'second_query_s',
             'second_query_reopened_s']
    axes[3].bar(range(len(names)), [s[k] for k in names], color=['C3', 'C3', 'C2', 'C2'])
    axes[3].set_xticks(range(len(names)), ['first (A)', 'first (B,\nfresh store)',
                                           'second (B)', 'second (B,\nreopened)'])
    axes[3].set(yscale='log', ylabel='seconds',
                title=f'Store: TracIn train x test, N={s["num_train"]}, M={s["num_test"]}')
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)


def markdown(results: dict) -> str:
  made = lambda s: results[s].get('made_by') or {}  # sections of older files lack it
  out = ['# Valuation at dataset scale', '',
         'Each section as run (peak RSS is each subprocess\'s own maximum resident set):', '']
  out += [f'- {s}: {results[s]["section_wall_s"]:.0f} s, `{made(s).get("command", "?")}` '
          f'(code {made(s).get("code_version", "?")}, {made(s).get("platform", "?")})'
          for s in SECTIONS if s in results]
  out.append('')
  m = results.get('methods')
  if m:
    out += ['## Projected per-example gradients at equal dimension D', '',
            '| task | k | D | params | method | examples/s | peak RSS (MiB) |',
            '|---|---|---|---|---|---|---|']
    for r in m['runs']:
      out.append(f'| {r["task"]} | {r["k"]} | {r["dim"]} | {r["num_params"]} | {r["method"]} | '
                 f'{r["examples_per_s"]:.1f} | {r["peak_rss_mib"]:.0f} |')
    out += ['', 'Factored over dense: ' + ', '.join(
        f'{g}: {s["factored_over_dense_gaussian"]:.1f}x (dense Gaussian), '
        f'{s["factored_over_dense_kronecker"]:.1f}x (dense + Kronecker)'
        for g, s in m['speedups'].items()) + '.', '',
            'Factored vs dense + Kronecker, max relative difference (float32): ' + ', '.join(
                f'{g} {e:.1e}' for g, e in
                m['factored_vs_dense_kronecker_max_rel_err_float32'].items()) + '.', '']
  lr = results.get('launchers')
  if lr:
    out += ['## launch.valuate and launch.filter: peak RSS vs N', '', lr['method'], '',
            '| N | valuate s | valuate MiB | filter s | filter MiB |', '|---|---|---|---|---|']
    for r in lr['rows']:
      out.append(f'| {r["n"]} | {r["valuate"]["wall_s"]:.0f} | {r["valuate"]["peak_rss_mib"]:.0f}'
                 f' | {r["filter"]["wall_s"]:.0f} | {r["filter"]["peak_rss_mib"]:.0f} |')
    ratio = lr['rss_ratio_largest_over_smallest']
    out += ['', f'Largest N over smallest: valuate {ratio["valuate"]:.2f}x, filter '
            f'{ratio["filter"]:.2f}x (acceptance: <= 1.5x).', '']
  s = results.get('store')
  if s:
    out += ['## Gradient store: second query vs first', '',
            f'N = {s["num_train"]} training examples, {s["checkpoints"]} checkpoints, D = '
            f'{s["dim"]} per checkpoint ({s["store_bytes"] / 2**20:.0f} MiB on disk), '
            f'{s["num_test"]} test examples per query.', '',
            '| query | seconds |', '|---|---|']
    for k in ('first_query_build_and_score_s', 'first_query_on_new_set_s', 'second_query_s',
              'second_query_reopened_s'):
      out.append(f'| {k[:-2].replace("_", " ")} | {s[k]:.2f} |')
    out += ['', f'Speed-up {s["speedup"]:.1f}x ({s["speedup_reopened"]:.1f}x reopened); scores '
            f'identical to a fresh build: {s["identical_to_fresh_build"]}.', '']
  return '\n'.join(out)


def main(argv):
  del argv
  if _WORKER.value == 'method':
    print(json.dumps(method_worker(_TASK.value, _METHOD.value, _K.value,
                                   [int(n) for n in _NS.value], _BLOCK.value, _SAVE.value)))
    return
  if _WORKER.value == 'store':
    print(json.dumps(store_worker(_TRAIN.value, _SCRATCH.value, _QUICK.value)))
    return
  bench_cli.names('sections', _SECTIONS.value, SECTIONS)
  launcher_ns = bench_cli.numbers('launcher_ns', _LAUNCHER_NS.value, int, lambda x: x >= 1,
                                  '>= 1', empty_ok=True)  # empty: run_launchers' default sizes
  bench_cli.at_least('block', _BLOCK.value, 1)
  for task in TASKS:  # each call is split into chunks of the task's valuation.chunk_size
    chunk = _config(task).valuation.chunk_size
    if _BLOCK.value > chunk and _BLOCK.value % chunk:
      raise UserError(f'--block must be at most or a multiple of {task} valuation.chunk_size '
                      f'{chunk}, got {_BLOCK.value}')
  bench_cli.writable('scratch', _SCRATCH.value, folder=True)
  out = bench_cli.quick_out(_OUT.value, _QUICK.value)
  results = {}
  if os.path.exists(out + '.json'):  # sections run before (e.g. one rerun alone) stay
    results = bench_cli.read_json(out + '.json', 'bench.valuation_scale results file')
    if results.get('quick') != _QUICK.value:
      results = {}
  scratch = os.path.abspath(_SCRATCH.value)
  os.makedirs(scratch, exist_ok=True)
  bench_cli.out_folder(out)
  results.update(platform=platform.platform(), cpus=os.cpu_count(), quick=_QUICK.value)
  runners = {'methods': lambda: run_methods(_QUICK.value, scratch, _BLOCK.value),
             'launchers': lambda: run_launchers(_QUICK.value, scratch,
                                                launcher_ns),
             'store': lambda: run_store(_QUICK.value, scratch)}
  for section in SECTIONS:
    if section in _SECTIONS.value:
      t0 = time.perf_counter()
      results[section] = runners[section]()
      results[section]['section_wall_s'] = time.perf_counter() - t0
      # Sections kept from an earlier run keep their own command, code and machine.
      results[section]['made_by'] = {**provenance.made_by(), 'platform': platform.platform()}
      results['wall_s'] = sum(results[s]['section_wall_s'] for s in SECTIONS if s in results)
      provenance.write_results(out, results)  # after each section
  provenance.write_results(out, results, markdown(results), lambda path: plot(results, path))
  print(f'wrote {out}.{{json,png,md}}: {results["wall_s"]:.0f} s of sections')

if __name__ == '__main__':
  define_flags()
  bench_cli.run(main, __doc__)
