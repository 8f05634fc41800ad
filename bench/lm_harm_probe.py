r"""Is each corruption kind harmful to the text bench's language models, and does its per-example
held-out influence show it?

  python -m bench.lm_harm_probe                       # seeds 0 1, both model sizes
  python -m bench.lm_harm_probe --seeds=5 --sizes=inner

For each model size (`inner`: the rater's inner LM of configs/text_bench.py; `transfer`: the larger
fresh LM of its bench part) and seed, a model is trained with the inner optimizer on uniform
batches of the whole training corpus (`--train_on=clean`: of its clean prose only, a model that
knows what clean prose looks like); at each age (steps taken) it reports
- the held-out loss change after `--group_steps` more steps on one group only (clean prose or one
  corruption kind), from the same state: is the kind harmful to a model of that age;
- the first-order influence of each of `--examples` sampled training sequences on the held-out
  loss, g_i . g_heldout (what one SGD step on it changes, to first order; `pergrad.jvp_dots`), and
  the same through the optimizer's current Adam preconditioner, g_i . g_heldout / (sqrt(nu) +
  eps); and the AUROC
  of each corruption kind against clean prose when sequences are ranked by it;
- the same AUROC with sequences ranked by the model's own loss on them (lower loss ranks
  higher): whether a model of that age tells the kind apart by likelihood at all.
A DataRater meta-learned through T-step unrolls from such models sees, per example, about this
first-order signal. Writes <out>.json (`rows`: one per size, seed and age) and <out>.md
(bench/results/lm_harm_probe*.jsonl hold earlier runs' rows, one a line).
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import functools
import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import cli as bench_cli
from bench import provenance
from configs import text_bench
from datarater import evaluation, pergrad, tasks
from datarater.data import pipeline
from datarater.errors import UserError
from inner_loop.optimizers import ADAM_B2, ADAM_EPS, make_inner_optimizer

FLAGS = flags.FLAGS


def adam_nu(state):
  """(second-moment estimate, step count) of an optax Adam state, possibly chained; (None, 0)
  for another optimizer."""
  for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
    if isinstance(s, optax.ScaleByAdamState):
      return s.nu, int(s.count)
  return None, 0


def adam_precondition(grad, state):
  """grad / (sqrt(nu / (1 - b2^count)) + eps) with the second moment of an Adam `state`; `grad`
  itself for another optimizer, or before Adam's first step (no statistics yet)."""
  nu, count = adam_nu(state)
  if nu is None or count == 0:
    return grad
  return jax.tree.map(lambda g, v: g / (jnp.sqrt(v / (1 - ADAM_B2 ** count)) + ADAM_EPS),
                      grad, nu)


def probe(task, section, train, heldout, seed: int, ages, group_steps: int, examples: int,
          batch_size: int, clean_only: bool = False) -> list:
  opt = make_inner_optimizer(section.optimizer, section.learning_rate)
  loss = lambda p, batch: jnp.mean(task.per_example_loss(p, batch))

  @jax.jit
  def step(params, state, batch):
    updates, state = opt.update(jax.grad(loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  first_order = jax.jit(functools.partial(pergrad.jvp_dots, task.per_example_loss))
  own_loss = jax.jit(task.per_example_loss)
  heldout_loss = jax.jit(loss)
  rng = np.random.default_rng(seed)
  take = lambda split, idx: {task.input_key: jnp.asarray(split.features[task.input_key][idx])}
  kinds = train.corruption_kinds
  prose = train.features['domain'] == train.info.class_names['domain'].index('prose')
  group_rows = {kind: np.flatnonzero(prose & (train.corruption == k)) for k, kind in
                enumerate(kinds)}
  held = take(heldout, np.arange(len(heldout)))
  fit_rows = group_rows['clean'] if clean_only else np.arange(len(train))
  params = task.init(jax.random.PRNGKey(seed))
  state, age, out = opt.init(params), 0, []
  for target in ages:
    while age < target:
      params, state = step(params, state, take(train, rng.choice(fit_rows, batch_size, False)))
      age += 1
    base = float(heldout_loss(params, held))
    effect = {}
    for kind, rows in group_rows.items():
      p, s = params, state
      for _ in range(group_steps):
        p, s = step(p, s, take(train, rng.choice(rows, batch_size, False)))
      effect[kind] = float(heldout_loss(p, held)) - base
    g_held = pergrad.mean_grad(task.per_example_loss, params, held)
    pre = adam_precondition(g_held, state)
    sample = np.sort(rng.choice(np.flatnonzero(prose), examples, False))
    sgd, adam, likelihood = [], [], []
    for c in range(0, examples, 64):
      batch = take(train, sample[c:c + 64])
      sgd.append(np.asarray(first_order(params, batch, g_held)))
      adam.append(np.asarray(first_order(params, batch, pre)))
      likelihood.append(-np.asarray(own_loss(params, batch)))
    auroc = lambda v: evaluation.auroc_by_kind(np.concatenate(v), train.corruption[sample], kinds)
    out.append({'seed': seed, 'age': age, 'heldout_loss': base, 'group_effect': effect,
                'auroc_sgd': auroc(sgd), 'auroc_adam': auroc(adam),
                'auroc_loss': auroc(likelihood)})
    print(json.dumps(out[-1]), flush=True)
  return out


def markdown(rows: list, flags_used: dict) -> str:
  # Every kind any row measured (a row's AUROCs cover only the kinds its sample drew): '-' where
  # a row has none.
  kinds = list(dict.fromkeys(k for r in rows for k in [*r['group_effect'], *r['auroc_sgd']]
                             if k != 'clean'))
  fmt = lambda d, k, spec: format(d[k], spec) if k in d else '-'
  lines = [f"`python -m bench.lm_harm_probe` ({flags_used}); configs/text_bench.py's corpus "
           "(train[:8192], held-out loss on heldout[:1024]).", '',
           'Held-out loss change (nats/byte) after the group-only steps, from the same state '
           '(negative = the group helps); then the AUROC of each kind against clean prose when '
           'sequences are ranked by first-order held-out influence (SGD / Adam-preconditioned; '
           '0.5 = not separated, < 0.5 = the kind looks more useful than clean prose).', '',
           '| size | seed | age | held-out loss | ' + ' | '.join(f'{k} change' for k in
                                                            ['clean'] + kinds) + ' | ' +
           ' | '.join(f'{k} AUROC' for k in kinds) + ' |',
           '|' + '---|' * (4 + 2 * len(kinds) + 1)]
  for r in rows:
    lines.append(f"| {r['size']} | {r['seed']} | {r['age']} | {r['heldout_loss']:.3f} | " +
                 ' | '.join(fmt(r['group_effect'], k, '+.3f') for k in ['clean'] + kinds) +
                 ' | ' + ' | '.join(f"{fmt(r['auroc_sgd'], k, '.2f')} / "
                                    f"{fmt(r['auroc_adam'], k, '.2f')}" for k in kinds) + ' |')
  lines += ['', 'AUROC of each kind against clean prose when sequences are ranked by the '
            "model's own loss on them (lower loss ranks higher):", '',
            '| size | seed | age | ' + ' | '.join(kinds) + ' |', '|' + '---|' * (3 + len(kinds))]
  for r in rows:
    lines.append(f"| {r['size']} | {r['seed']} | {r['age']} | " +
                 ' | '.join(fmt(r['auroc_loss'], k, '.2f') for k in kinds) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  config, bench = text_bench.get_config(), text_bench.get_config('bench')
  sizes = {'inner': config.task, 'transfer': bench.transfer.task}
  bench_cli.names('sizes', FLAGS.sizes, sizes)
  seeds = bench_cli.seeds(FLAGS.seeds)
  ages = bench_cli.numbers('ages', FLAGS.ages, int, lambda x: x >= 0, '>= 0')
  down = [(a, b) for a, b in zip(ages, ages[1:]) if b <= a]
  if down:  # a model only trains on: its row would say the earlier age
    raise UserError(f'--ages must increase (each is reached by training on from the one '
                    f'before), got {down[0][1]} after {down[0][0]}')
  bench_cli.at_least('group_steps', FLAGS.group_steps, 1)  # 0: every group effect would be 0
  bench_cli.at_least('examples', FLAGS.examples, 1)
  train = pipeline.load_split(config.data, config.data.train_split)
  heldout = pipeline.load_split(config.data, config.data.heldout_split)
  prose = int(np.sum(train.features['domain'] == train.info.class_names['domain'].index('prose')))
  if FLAGS.examples > prose:  # sampled without replacement
    raise UserError(f'--examples must be <= {prose} (the prose training sequences), got '
                    f'{FLAGS.examples}')
  bench_cli.out_folder(FLAGS.out)
  rows = []
  for size in FLAGS.sizes:
    task = tasks.make_task(sizes[size], train.info)
    for seed in seeds:
      for r in probe(task, config.inner, train, heldout, seed, ages,
                     FLAGS.group_steps, FLAGS.examples, config.inner.batch_size,
                     FLAGS.train_on == 'clean'):
        rows.append({'size': size, **r})
  used = {k: getattr(FLAGS, k) for k in ('sizes', 'seeds', 'ages', 'group_steps', 'examples',
                                         'train_on')}
  provenance.write_results(FLAGS.out, {  # the settings: made_by's flags
      'rows': rows, 'batch_size': config.inner.batch_size,
      'device': jax.devices()[0].device_kind}, markdown(rows, used))
  print(f'wrote {FLAGS.out}.json and .md')
  print(markdown(rows, used))


if __name__ == '__main__':
  flags.DEFINE_list('sizes', ['inner', 'transfer'], 'model sizes: inner, transfer')
  flags.DEFINE_list('seeds', ['0', '1'], 'seeds (initialisation and batches)')
  flags.DEFINE_list('ages', ['100', '400', '1600'], 'ages (steps on all data) probed')
  flags.DEFINE_integer('group_steps', 20, 'steps on one group only, per group')
  flags.DEFINE_enum('train_on', 'all', ['all', 'clean'],
                    'what the models train on up to each age: the whole corpus or its clean prose')
  flags.DEFINE_integer('examples', 1024, 'prose training sequences ranked by influence')
  flags.DEFINE_string('out', os.path.join('bench', 'results', 'lm_harm_probe'), 'output prefix')
  bench_cli.run(main, __doc__)
