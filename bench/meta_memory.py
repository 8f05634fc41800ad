r"""Meta-gradient memory and time against the unroll length T, per mode, on two task-model sizes.

  python -m bench.meta_memory                 # T in {1,2,4,8,16,32}, every mode, both models
  python -m bench.meta_memory --quick         # T in {1,4,32}, fewer repeats, smaller large model

For each model and T, one outer step (`outer_loop.meta_step.outer_step`, inner Adam as in
configs/digits.py) is compiled per mode: reverse, remat, mixed (inner states recovered by
running Adam backwards, `outer.mixed_recompute='invert'`, the default for Adam) and
mixed:replay (recomputed from states kept every ~sqrt(T) steps). Memory is XLA's compiled
`memory_analysis()`: temporaries (what the backward pass keeps alive lives here) and
argument/output sizes. Time is the median of `--repeats` calls after a warm-up; the modes of one
(model, T) are timed round-robin in the same run, so compare ratios, not absolute numbers, on a
shared machine.

Accuracy: undoing Adam steps in float32 adds round-off, so each mode's float32 meta-gradient is
compared with float64 reverse mode on real digits batches, from fresh inner models (Adam's
worst case) and from models 200 steps into training.

Goals: mode 'mixed' temp memory at T = 32 <= 3x that at T = 1, and its step time <= 1.5x that of
mode 'reverse'. Writes bench/results/meta_memory.json and .png (meta_memory_quick.* with --quick).
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import json
import os
import platform
import time
import types

from absl import flags
import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from bench import cli as bench_cli
from bench import provenance
from datarater import files
from configs.digits import get_config
from datarater.errors import UserError
from datarater.tasks import batch_size_of
from datarater.data import pipeline
from inner_loop.unroll import unroll
from outer_loop import meta_step, setup
from outer_loop.estimators import META_GRADIENTS, MIXED_RECOMPUTE

DIGITS = pipeline.DataInfo(
    'sklearn_digits', {'image': jax.ShapeDtypeStruct((8, 8, 1), np.float32),
                       'label': jax.ShapeDtypeStruct((), np.int32)}, {'label': 10},
    ('image', 'label'))

# Benchmarked modes: outer.meta_gradient, optionally ':' outer.mixed_recompute.
BENCH_MODES = ('reverse', 'remat', 'mixed', 'mixed:replay')
MODELS = ('default', 'large')


def define_flags() -> None:
  """The flags, defined only when this file runs as a program (bench.meta_step and
  bench.cnn_patches import it and define flags of the same names)."""
  flags.DEFINE_bool('quick', False, 'T in {1,4,32}, 2 repeats, large model at K=2, B=32 (a smoke '
                    'run).')
  flags.DEFINE_list('unrolls', ['1', '2', '4', '8', '16', '32'], 'Values of T.')
  flags.DEFINE_list('modes', list(BENCH_MODES), 'Meta-gradient modes (outer.meta_gradient, '
                    "optionally ':' outer.mixed_recompute).")
  flags.DEFINE_list('models', list(MODELS), 'Task-model sizes.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls per setting (median).')
  flags.DEFINE_enum('optimizer', 'adam', ['sgd', 'momentum', 'adam'], 'Inner optimizer.')
  flags.DEFINE_list('hidden', ['128', '128'], 'Default task model hidden.')
  flags.DEFINE_integer('population', 8, 'K for the default model.')
  flags.DEFINE_integer('batch', 128, 'Inner and outer batch, default model.')
  flags.DEFINE_list('large_hidden', ['1024', '1024'], 'Large model hidden.')
  flags.DEFINE_integer('large_population', 2, 'K for the large model.')
  flags.DEFINE_integer('large_batch', 64, 'Batch for the large model.')
  flags.DEFINE_list('accuracy_unrolls', ['4', '32'],
                    'T values of the float32-vs-float64 accuracy check (empty: skip it).')
  flags.DEFINE_integer('accuracy_warm', 200,
                       'Adam steps the "trained" inner models take before the accuracy check.')
  flags.DEFINE_string('out', 'bench/results/meta_memory', 'Output prefix (.json/.png; left out '
                      'with --quick: bench/results/meta_memory_quick).')
  flags.DEFINE_list('merge', [], 'Measure nothing: combine these JSON files (e.g. one run per '
                    'model, run side by side) into --out.')


def settings() -> types.SimpleNamespace:
  """The flags' values, checked, with --quick applied."""
  fv = flags.FLAGS
  positive = lambda name: tuple(bench_cli.numbers(name, fv[name].value, int, lambda x: x > 0,
                                                  '> 0', empty_ok=name == 'accuracy_unrolls'))
  args = types.SimpleNamespace(
      **{name: fv[name].value for name in (
          'quick', 'modes', 'models', 'repeats', 'optimizer', 'population', 'batch',
          'large_population', 'large_batch', 'accuracy_warm', 'out', 'merge')},
      **{name: positive(name) for name in (
          'unrolls', 'hidden', 'large_hidden', 'accuracy_unrolls')})
  modes = [f'{g}:{r}' for g in META_GRADIENTS for r in MIXED_RECOMPUTE if g == 'mixed']
  for name, known in (('models', MODELS), ('modes', (*META_GRADIENTS, *modes))):
    bench_cli.names(name, getattr(args, name), known, empty_ok=bool(args.merge))
  for name in ('repeats', 'population', 'batch', 'large_population', 'large_batch'):
    if getattr(args, name) < 1:
      raise UserError(f'--{name} must be >= 1, got {getattr(args, name)}')
  if args.accuracy_warm < 0:
    raise UserError(f'--accuracy_warm must be >= 0, got {args.accuracy_warm}')
  bench_cli.quick_sets(args.quick, ('unrolls', 'repeats', 'large_batch') + (
      ('accuracy_unrolls',) if args.accuracy_unrolls else ()))  # (empty: none, as it says)
  if args.quick:
    args.unrolls, args.repeats, args.large_batch = (1, 4, 32), 2, 32
    args.accuracy_unrolls = (32,) if args.accuracy_unrolls else ()
  args.out = bench_cli.quick_out(args.out, args.quick)
  return args


def _config(optimizer, hidden, population, batch, steps, mode):
  """configs/digits.py with the bench's model, K, B, T and mode ('mixed:replay' style)."""
  c = get_config()
  c.inner.optimizer, c.task.hidden = optimizer, tuple(hidden)
  c.inner.population, c.inner.batch_size, c.outer.batch_size = population, batch, batch
  c.inner.steps = steps
  c.outer.meta_gradient, _, recompute = mode.partition(':')
  c.outer.mixed_recompute = recompute or 'auto'
  return c


def _num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def random_batch(info, lead: tuple, seed: int = 0) -> dict:
  """Random features of `info`'s spec with leading axes `lead` (classes within range)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, s in info.spec.items():
    shape = (*lead, *s.shape)
    if np.issubdtype(s.dtype, np.floating):
      out[name] = rng.random(shape).astype(s.dtype)
    else:
      out[name] = rng.integers(0, info.num_classes.get(name, 2), shape).astype(s.dtype)
  return out


def compile_step(config, info=DIGITS):
  """One compiled outer step on random data: (compiled, args, memory figures, #task params)."""
  k, t, b = config.inner.population, config.inner.steps, config.inner.batch_size
  inner, outer = random_batch(info, (k, t, b)), random_batch(info, (k, config.outer.batch_size))
  problem, estimator = setup.build_problem(config, info)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(0), k)
  args = jax.device_put((state, inner, outer))
  t0 = time.perf_counter()
  compiled = jax.jit(lambda s, i, o: meta_step.outer_step(problem, estimator, s, i, o)).lower(
      *args).compile()
  mem = compiled.memory_analysis()
  figures = {'temp_bytes': int(mem.temp_size_in_bytes),
             'argument_bytes': int(mem.argument_size_in_bytes),
             'output_bytes': int(mem.output_size_in_bytes),
             'compile_s': time.perf_counter() - t0}
  member = jax.tree.map(lambda x: x[0], state.population.params)
  return compiled, args, figures, _num_params(member)


def measure_unroll(args, model, hidden, population, batch, steps) -> list[dict]:
  """All modes at one (model, T): memory per mode, then step times taken round-robin."""
  runs = {}
  for mode in args.modes:
    print(f'{model} model, T={steps}, {mode}: compiling ...', flush=True)
    config = _config(args.optimizer, hidden, population, batch, steps, mode)
    compiled, call_args, figures, n_params = compile_step(config)
    jax.block_until_ready(compiled(*call_args))  # warm-up
    runs[mode] = (compiled, call_args, figures, n_params)
  times = {mode: [] for mode in runs}
  for _ in range(args.repeats):
    for mode, (compiled, call_args, _, _) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*call_args))
      times[mode].append(time.perf_counter() - t0)
  rows = []
  for mode, (_, _, figures, n_params) in runs.items():
    rows.append({'model': model, 'hidden': list(hidden), 'task_params': n_params,
                 'population': population, 'batch': batch, 'mode': mode, 'T': steps,
                 **figures, 'step_ms': 1e3 * float(np.median(times[mode])),
                 'step_ms_all': [1e3 * x for x in times[mode]]})
  return rows


def goals(results: list[dict]) -> dict:
  """Per model: mixed temp(T_max) / temp(T=1) and mixed / reverse step time at each T."""
  out = {}
  for model in sorted({r['model'] for r in results}):
    by = {(r['mode'], r['T']): r for r in results if r['model'] == model}
    ts = sorted({t for (_, t) in by})
    g = {}
    if ('mixed', 1) in by and ('mixed', ts[-1]) in by:
      g['mixed_temp_ratio_Tmax_vs_T1'] = by['mixed', ts[-1]]['temp_bytes'] / by['mixed', 1]['temp_bytes']
      g['T_max'] = ts[-1]
      g['memory_goal_met'] = g['mixed_temp_ratio_Tmax_vs_T1'] <= 3.0
    if ('mixed:replay', 1) in by and ('mixed:replay', ts[-1]) in by:
      g['mixed:replay_temp_ratio_Tmax_vs_T1'] = (by['mixed:replay', ts[-1]]['temp_bytes']
                                                 / by['mixed:replay', 1]['temp_bytes'])
    for mixed in ('mixed', 'mixed:replay'):
      for base in ('reverse', 'remat'):
        if all((mixed, t) in by and (base, t) in by for t in ts):
          g[f'{mixed}_over_{base}_time'] = {t: by[mixed, t]['step_ms'] / by[base, t]['step_ms']
                                            for t in ts}
          g[f'{mixed}_over_{base}_temp'] = {
              t: by[mixed, t]['temp_bytes'] / by[base, t]['temp_bytes'] for t in ts}
    if 'mixed_over_reverse_time' in g:
      g['time_goal_met'] = max(g['mixed_over_reverse_time'].values()) <= 1.5
    out[model] = g
  return out


def accuracy(args) -> list[dict]:
  """Per mode: float32 meta-gradient vs float64 reverse mode, fresh and trained inner models.

  Default model, K = 4 members, B = 128, real digits (train split) batches.
  """
  k, b = 4, 128
  data_config = get_config().data
  split = pipeline.load_split(data_config, 'train')
  rng = np.random.default_rng(0)

  def draw(*shape):
    return split.take(rng.integers(0, len(split), shape))
  rows = []
  for steps in args.accuracy_unrolls:
    config = _config(args.optimizer, args.hidden, k, b, steps, 'reverse')
    inner, outer = draw(k, steps, b), draw(k, b)
    problem, _ = setup.build_problem(config, split.info)
    state = meta_step.init_outer_state(problem, jax.random.PRNGKey(0), k)
    warm_batches = draw(k, args.accuracy_warm, b)
    uniform = lambda batch: jax.numpy.ones(batch_size_of(batch))
    trained = jax.jit(jax.vmap(lambda s, bt: unroll(
        problem.task.per_example_loss, problem.inner_optimizer, uniform, s, bt)[0]))(
            state.population, warm_batches)
    for start, population in (('fresh', state.population), ('trained', trained)):
      data = (state.rater_params, population, inner, outer)
      def grad(mode, x64=False):
        est = setup.make_estimator(_config(args.optimizer, args.hidden, k, b, steps, mode).outer,
                                   config.inner)
        args_ = data if not x64 else jax.tree.map(
            lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, data)
        g = jax.jit(lambda *a: meta_step.meta_gradient(problem, est, *a)[1])(*args_)
        return np.asarray(ravel_pytree(g)[0], np.float64)
      with jax.enable_x64():
        ref = grad('reverse', x64=True)
      for mode in args.modes:
        g = grad(mode)
        rows.append({'T': steps, 'start': start, 'mode': mode,
                     'rel_err_vs_f64': float(np.linalg.norm(g - ref) / np.linalg.norm(ref)),
                     'cosine_vs_f64': float(g @ ref / np.linalg.norm(g) / np.linalg.norm(ref))})
        print(f'accuracy T={steps:>2} {start:>7} {mode:>12}: rel err vs float64 reverse '
              f'{rows[-1]["rel_err_vs_f64"]:.2e}', flush=True)
  return rows


MODE_COLORS = {'reverse': 'C3', 'remat': 'C2', 'mixed': 'C0', 'mixed:replay': 'C1'}


def plot_modes(ax_mem, ax_time, results: list[dict], log_y: bool = False,
               titles=('Peak temporary memory', 'Step time')) -> None:
  """Compiled temp memory and step time against T, one line per mode (also bench.meta_step)."""
  for mode in sorted({r['mode'] for r in results}):
    rows = sorted((r for r in results if r['mode'] == mode), key=lambda r: r['T'])
    ts = [r['T'] for r in rows]
    color = MODE_COLORS.get(mode)  # one colour per mode in every figure, whichever modes ran
    ax_mem.plot(ts, [r['temp_bytes'] / 2**20 for r in rows], 'o-', label=mode, color=color)
    ms = [r['step_ms'] for r in rows]
    spread = [[m - min(r.get('step_ms_all', [m])) for m, r in zip(ms, rows)],
              [max(r.get('step_ms_all', [m])) - m for m, r in zip(ms, rows)]]
    ax_time.errorbar(ts, ms, yerr=spread, fmt='o-', capsize=2, label=mode, color=color)
  y = {'yscale': 'log'} if log_y else {}
  ax_mem.set(xscale='log', xlabel='inner steps T', ylabel='compiled temp memory (MiB)',
             title=titles[0], **y)
  ax_time.set(xscale='log', xlabel='inner steps T', ylabel='outer step (ms)', title=titles[1], **y)
  unrolls = sorted({r['T'] for r in results})
  for ax in (ax_mem, ax_time):
    ax.set_xticks(unrolls, [str(t) for t in unrolls])  # the measured T, not 10^0, 10^1
    ax.minorticks_off()
    ax.legend()


def plot(results: list[dict], path: str, device: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = sorted({r['model'] for r in results})
  fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
  for (ax_mem, ax_time), model in zip(axes, models):
    rows_m = [r for r in results if r['model'] == model]
    r0 = rows_m[0]
    desc = (f'{model}: hidden {tuple(r0["hidden"])}, {r0["task_params"]:,} params, '
            f'K={r0["population"]}, B={r0["batch"]}')
    plot_modes(ax_mem, ax_time, rows_m, log_y=True,
               titles=(desc, 'step time (median, bars: min-max of repeats)'))
  fig.suptitle(f'Meta-gradient modes on {device}')
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def write(record: dict, out: str) -> None:
  provenance.write_results(out, record,
                           plot=lambda path: plot(record['results'], path, record['device']))
  print(f'wrote {out}.json and {out}.png')


def merge(paths, out: str) -> None:
  records, fields = [], ('model', 'mode', 'T', 'temp_bytes', 'step_ms')  # what `goals` reads
  for path in paths:
    record = bench_cli.read_json(path, 'bench.meta_memory results file', 'results')
    rows = record['results']
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and all(f in r for f in fields) for r in rows):
      raise UserError(f'{path!r} is not a bench.meta_memory results file (its results are not '
                      f'rows of {", ".join(fields)})')
    records.append(record)
  results = [r for rec in records for r in rec['results']]
  record = {**records[0], 'results': results, 'goals': goals(results),
            'merged_from': [os.path.basename(p) for p in paths]}
  for model, g in record['goals'].items():
    print(model, json.dumps(g, default=float))
  write(record, out)


def main(argv):
  del argv
  args = settings()
  bench_cli.out_folder(args.out)
  if args.merge:
    merge(args.merge, args.out)
    return
  models = {'default': (args.hidden, args.population, args.batch),
            'large': (args.large_hidden, args.large_population, args.large_batch)}
  results = []
  print(f'{"model":>8} {"mode":>8} {"T":>3} {"temp MiB":>10} {"arg MiB":>8} {"out MiB":>8} '
        f'{"step ms":>9} {"compile s":>9}')
  for model in args.models:
    hidden, population, batch = models[model]
    for steps in args.unrolls:
      for r in measure_unroll(args, model, hidden, population, batch, steps):
        results.append(r)
        print(f'{model:>8} {r["mode"]:>8} {steps:>3} {r["temp_bytes"] / 2**20:>10.2f} '
              f'{r["argument_bytes"] / 2**20:>8.2f} {r["output_bytes"] / 2**20:>8.2f} '
              f'{r["step_ms"]:>9.1f} {r["compile_s"]:>9.1f}', flush=True)
  summary = goals(results)
  for model, g in summary.items():
    print(model, json.dumps(g, default=float))
  record = {'device': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
            'host': platform.node(), 'cpu_count': os.cpu_count(), 'jax': jax.__version__,
            'optimizer': args.optimizer, 'repeats': args.repeats, 'quick': args.quick,
            'segment': "default per recompute: invert 16 (Adam's first 4 steps replayed), replay sqrt(T)",
            'goals': summary, 'results': results,
            'accuracy': accuracy(args) if args.accuracy_unrolls else []}
  write(record, args.out)


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
