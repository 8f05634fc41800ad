r"""Per-example gradient throughput and memory of the pergrad layer against plain baselines.

  python -m bench.pergrad                   # digits MLP (64-128-128-10) and 784-128-128-10
  python -m bench.pergrad --batch=512 --repeats=5

For each model, examples/s of: the plain batched gradient of the mean loss (one gradient per batch:
the floor cost), per-example gradients vmapped whole or chunked (64 alive at a time: also
faster on CPU, the chunk stays in cache; `--chunk`), chunked and reduced to squared norms or Kronecker-projected, ghost squared norms (Dense layers, no per-example gradient),
all B dot products from one JVP, and a Python loop of jitted single-example gradients (the speed-up
of the vmapped layer over it is reported). Memory: XLA's compiled temporary bytes for B and 10 B
examples (chunked stays flat; whole-batch vmap grows). Times are medians over `--repeats` calls
after a warm-up (on the shared 2-core CPU machine: compare ratios). Writes
bench/results/pergrad.{json,png}; bench/results/pergrad.h100.* came from
`--batch=4096 --chunk=512 --out=bench/results/pergrad.h100` on one H100.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import platform
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import ml_collections

from bench import cli as bench_cli
from bench import provenance
from datarater import files, pergrad, tasks
from datarater.data.pipeline import DataInfo

_BATCH = flags.DEFINE_integer('batch', 256, 'Examples per call.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per setting (median).')
_CHUNK = flags.DEFINE_integer('chunk', 64, 'Per-example gradients alive at once (chunked rows).')
_LOOP = flags.DEFINE_integer('loop_examples', 64, 'Examples timed in the Python-loop baseline.')
_OUT = flags.DEFINE_string('out', 'bench/results/pergrad', 'Output prefix (.json, .png).')

MODELS = {'digits_mlp': ((8, 8, 1), (128, 128)), 'mnist_size_mlp': ((28, 28, 1), (128, 128))}


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _temp(fn, *args) -> int:
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def measure(shape, hidden, batch: int, repeats: int, loop_examples: int, chunk: int) -> dict:
  info = DataInfo('random', {'image': jax.ShapeDtypeStruct(shape, np.float32),
                             'label': jax.ShapeDtypeStruct((), np.int32)}, {'label': 10},
                  ('image', 'label'))
  task = tasks.make_task(ml_collections.ConfigDict(
      {'name': 'mlp_classifier', 'hidden': hidden, 'activation': 'relu'}), info)
  params = task.init(jax.random.key(0))
  loss = task.per_example_loss
  rng = np.random.default_rng(0)

  def make(n):
    return {'image': jnp.asarray(rng.random((n, *shape), np.float32)),
            'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32)}

  data = make(batch)
  proj = pergrad.kronecker_projection(8, 8)
  pstate = proj.init(params)
  v = jax.tree.map(jnp.ones_like, params)
  fns = {
      'batched_mean_grad': lambda b: pergrad.mean_grad(loss, params, b),
      'per_example_vmap_full': lambda b: pergrad.per_example_grads(loss, params, b, None),
      'per_example_chunked_grads': lambda b: pergrad.per_example_grads(loss, params, b, chunk),
      'per_example_chunked_sq_norm': lambda b: pergrad.per_example(loss, params, b,
                                                                   pergrad.sq_norm(), (), chunk),
      'per_example_chunked_kron_proj': lambda b: pergrad.per_example(loss, params, b, proj,
                                                                     pstate, chunk),
      'ghost_sq_norms': lambda b: pergrad.ghost_sq_norms(loss, params, b),
      'jvp_dots': lambda b: pergrad.jvp_dots(loss, params, b, v),
  }
  out = {'num_params': int(sum(x.size for x in jax.tree.leaves(params))), 'batch': batch,
         'examples_per_s': {}, 'memory_temp_bytes': {}}
  for name, fn in fns.items():
    secs = _time(jax.jit(fn), data, repeats=repeats)
    out['examples_per_s'][name] = batch / secs
  single = jax.jit(jax.grad(pergrad.single_example_loss(loss)))
  examples = [jax.tree.map(lambda x: x[i], data) for i in range(loop_examples)]

  def loop(_):
    return [single(params, ex) for ex in examples]

  secs = _time(loop, None, repeats=repeats)
  out['examples_per_s']['python_loop_single_grads'] = loop_examples / secs
  eps = out['examples_per_s']
  out['speedup_vs_python_loop'] = {k: eps[k] / eps['python_loop_single_grads'] for k in eps
                                   if k.startswith('per_example') or k in ('ghost_sq_norms',
                                                                           'jvp_dots')}
  out['per_example_cost_vs_batched_grad'] = {k: eps['batched_mean_grad'] / eps[k] for k in eps}
  for n in (batch, 10 * batch):
    big = make(n)
    out['memory_temp_bytes'][str(n)] = {
        'chunked_kron_proj': _temp(fns['per_example_chunked_kron_proj'], big),
        'chunked_sq_norm': _temp(fns['per_example_chunked_sq_norm'], big),
        'vmap_full_sq_norm': _temp(lambda b: pergrad.per_example(loss, params, b,
                                                                 pergrad.sq_norm(), (), None), big),
    }
  return out


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  names = list(results['models'])
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  keys = list(results['models'][names[0]]['examples_per_s'])
  width = 0.8 / len(names)
  for i, m in enumerate(names):
    eps = results['models'][m]['examples_per_s']
    axes[0].bar(np.arange(len(keys)) + i * width, [eps[k] for k in keys], width, label=m)
  axes[0].set_xticks(np.arange(len(keys)) + width / 2, keys, rotation=30, ha='right', fontsize=8)
  axes[0].set(yscale='log', ylabel='examples / s',
              title=f'Throughput on {results["device"]} (batch {results["batch"]})')
  axes[0].set_ylim(top=axes[0].get_ylim()[1] * 8)  # headroom: the legend sits above the bars
  axes[0].legend(ncol=len(names), loc='upper center')
  for i, m in enumerate(names):
    mem = results['models'][m]['memory_temp_bytes']
    ns = sorted(mem, key=int)
    for j, kind in enumerate(mem[ns[0]]):
      axes[1].plot([int(n) for n in ns], [mem[n][kind] / 2**20 for n in ns], marker='o',
                   color=f'C{j}', linestyle='-' if i == 0 else '--', label=f'{m}: {kind}')
  sizes = sorted({int(n) for m in names for n in results['models'][m]['memory_temp_bytes']})
  axes[1].set(xscale='log', yscale='log', xlabel='examples scored in one call',
              ylabel='compiled temp memory (MiB)',
              title=f'Memory vs examples on {results["device"]}')
  axes[1].set_xticks(sizes, [f'{n:,}' for n in sizes])  # those measured; no crowded minor labels
  axes[1].xaxis.set_minor_formatter(ticker.NullFormatter())
  axes[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))  # off the lines
  fig.tight_layout()
  files.save_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  for flag in (_BATCH, _REPEATS, _CHUNK, _LOOP):
    bench_cli.at_least(flag.name, flag.value, 1)
  bench_cli.out_folder(_OUT.value)
  results = {'platform': platform.platform(), 'device': jax.devices()[0].device_kind,
             'batch': _BATCH.value, 'chunk': _CHUNK.value, 'models': {}}
  for name, (shape, hidden) in MODELS.items():
    r = measure(shape, hidden, _BATCH.value, _REPEATS.value, _LOOP.value, _CHUNK.value)
    results['models'][name] = r
    print(name, f'{r["num_params"]} params')
    for k, val in r['examples_per_s'].items():
      print(f'  {k:32s} {val:12.0f} ex/s')
    print('  speed-up over the Python loop:',
          {k: round(x, 1) for k, x in r['speedup_vs_python_loop'].items()})
    print('  temp memory (bytes) by examples:', r['memory_temp_bytes'], flush=True)
  provenance.write_results(_OUT.value, results, plot=lambda path: plot(results, path))
  print(f'wrote {_OUT.value}.json and .png')


if __name__ == '__main__':
  bench_cli.run(main, __doc__)
