"""The DataRater's per-kind AUROC on the text bench's corpus, with config overrides.

  python -m bench.lm_advance_probe SEED inner.advance_steps=10 inner.reset_every=100

Meta-trains the rater of configs/text_bench.py with the overrides, exports it, scores the training
corpus and prints one JSON line (AUROC of each corruption kind and of code against clean prose).
Results: bench/results/lm_advance_probe.md.
"""
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from configs import text_bench
from bench.lm_curation import seeded, learned
from datarater import export, tasks
from datarater.data import pipeline
from datarater.meta_train import meta_train
from datarater.valuation import factory
from datarater.valuation.run import RunCache

seed = int(sys.argv[1])
c = seeded(text_bench.get_config(), seed)
over = {}
for kv in sys.argv[2:]:
  k, v = kv.split('=')
  sec, f = k.split('.')
  c[sec][f] = type(c[sec][f])(v)
  over[k] = v
c.log_every = c.checkpoint_every = c.outer.steps
tmp = tempfile.mkdtemp()
t0 = time.time()
meta_train(c, os.path.join(tmp, 'run'))
c.valuation.rater = os.path.join(tmp, 'rater')
export.export_rater(os.path.join(tmp, 'run'), c.valuation.rater)
secs = time.time() - t0
train = pipeline.load_split(c.data, c.data.train_split, corrupt=True)
heldout = pipeline.load_split(c.data, c.data.heldout_split)
small = tasks.make_task(c.task, train.info)
v = factory.build('datarater', c, small, train, heldout, RunCache(os.path.join(tmp, 'runs'), 'x'))
vals = np.asarray(v.values(train, c.valuation.score_batch_size), np.float64)
out = learned(vals, train, c.rater.temperature)
shutil.rmtree(tmp)
print(json.dumps({'seed': seed, **over, 'seconds': secs,
                  'auroc': {k: round(x, 3) for k, x in out['auroc'].items()}}))
