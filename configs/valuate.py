"""Data valuation on the default digits experiment (20% symmetric label noise).

`python -m launch.valuate --method=tracin --config=configs/valuate.py --workdir=DIR`. The data
and task-model fields are those of configs/digits.py; `valuation` says how the valued training run
is made (plain SGD, fixed data order) and how each method reads it. Override from the command
line, e.g. `--config.valuation.tracin_mode=heldout_cos --config.valuation.layers=dense_2`.
"""
import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  c = digits.get_config()
  v = c.valuation = ml_collections.ConfigDict()
  # The recorded training run of the task model that TracIn, Mimic and DVEmb value.
  v.train_steps = 600
  v.batch_size = 64
  v.optimizer = 'sgd'           # TracIn and data value embedding assume plain SGD
  v.learning_rate = 0.1
  v.checkpoint_every = 60       # TracIn / Mimic checkpoints (DVEmb records every step)
  v.order_seed = 0              # data order of the run
  v.init_seed = 0               # task-model initialisation (shared by the Mimic reference)
  # The per-example gradient layer.
  v.layers = ''                 # comma-separated layer names ('dense_2'); '' = all parameters
  v.projection = 'kronecker'    # 'none' | 'kronecker' | 'gaussian' (where a method projects)
  v.projection_dim = 8          # kronecker: 8 x 8 per matrix leaf; gaussian: this many dims
  v.projection_seed = 0
  v.chunk_size = 64             # per-example gradients alive at once
  v.score_batch_size = 256      # examples per scoring call (the progress bar's step)
  # Methods.
  v.tracin_mode = 'self'        # 'self' | 'heldout' | 'heldout_cos'
  v.tracin_project = False      # TracIn on projected gradients (exact gradients if False)
  v.tracin_ghost = True         # self-influence from Dense activations x output grads (exact)
  v.mimic_layers = 'last'       # 'last' | '' (all) | comma-separated names
  v.mimic_cosine = False
  v.mimic_keep_fraction = 0.0   # offline filter: keep this top fraction; 0 = 2-Gaussian threshold
  v.reference_steps = 400       # SGD steps of the Mimic reference on the trusted (held-out) split
  v.dvemb_curvature = 'gauss_newton'  # 'gauss_newton' | 'empirical_fisher' | 'none'
  v.dvemb_steps = 300           # DVEmb's run is shorter: it keeps a checkpoint per step
  v.rater_workdir = ''          # datarater: a launch.train_rater workdir ('' = --workdir)
  return c
