"""DataRater on scikit-learn's handwritten digits with 20% symmetric label noise (MLPs).

The default experiment: it needs no network (the digits ship inside scikit-learn and are
written once into a local TFDS dataset) and trains in a minute or two on 2 CPU cores. One config
serves every launcher: `train_rater` reads data, task, rater, inner, outer, final_eval and the
top-level fields; `train` reads data, task, train and policy, and its policy's sections
(valuation: tracin_curriculum and mimic; features, sae and sae_scores: sae); `valuate` reads data,
task and valuation. Override any field a launcher reads from the command line, e.g.
`--config.inner.steps=4` (one it does not read is refused).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # launch.train_rater only (its inits, batch order; train.seeds, valuation.seed)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'sklearn_digits'   # a TFDS dataset prepared in data_dir (bundled ones build here)
  c.data.data_dir = ''             # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.dataset_dir = ''          # a TFDS dataset folder to read instead (e.g. launch.filter's)
  c.data.train_split = 'train'     # what models train on (corrupted below); any split expression
  c.data.heldout_split = 'validation'  # clean: the outer (meta) loss, Mimic's reference
  c.data.eval_split = 'test'       # evaluation only (a rater run's report; launch.train's epochs)
  c.data.label_noise = 0.2         # label noise rate on the train split, recorded
  c.data.label_noise_kind = 'symmetric'  # 'symmetric' (any other class) | 'confusion' (a partner)
  c.data.confusions = ()           # confusion: pairs of confusable class indices, e.g. ((0, 6),)
  c.data.noise_seed = 0
  # Rates of input corruptions of the train split (disjoint from the label noise and each other,
  # all recorded; datarater/data/corruption.py): heavy blur, heavy pixel noise, a grey rectangle
  # over half the image, near-duplicates of clean examples, out-of-distribution digits.
  c.data.input_corruption = ml_collections.ConfigDict(
      {'blur': 0.0, 'pixel_noise': 0.0, 'occlusion': 0.0, 'duplicate': 0.0, 'ood': 0.0})

  c.task = ml_collections.ConfigDict()
  c.task.name = 'mlp_classifier'   # datarater.tasks.TASKS
  c.task.hidden = (128, 128)
  c.task.activation = 'relu'
  c.task.input = ''                # feature names read ('': the dataset's supervised keys)
  c.task.label = ''
  # Mixed precision: what the layers compute in and the parameters are stored in, 'float32' |
  # 'bfloat16' | 'float16' ('': flax's default, the inputs' and parameters' dtype; float32 params).
  c.task.dtype = ''
  c.task.param_dtype = ''

  c.rater = ml_collections.ConfigDict()
  c.rater.name = 'mlp_rater'       # datarater.tasks.RATERS
  c.rater.hidden = (128, 128)
  c.rater.activation = 'relu'
  c.rater.temperature = 1.0        # tau in w = B * softmax(score / tau)
  c.rater.readout = 'logit'        # score: the label's output 'logit' | its 'log_softmax'
  c.rater.input = ''
  c.rater.label = ''
  c.rater.dtype = ''               # as task.dtype and task.param_dtype
  c.rater.param_dtype = ''

  c.inner = ml_collections.ConfigDict()
  c.inner.steps = 2                # T: unrolled inner steps per outer step
  c.inner.population = 8           # K: inner models, each with its own optimizer state
  c.inner.batch_size = 128
  c.inner.optimizer = 'adam'       # 'sgd' | 'momentum' | 'adam'
  c.inner.learning_rate = 1e-3
  c.inner.reset_every = 200        # R: each member is re-initialised every R outer steps, staggered
  c.inner.advance_steps = 0        # A: weighted steps per outer step before the T, no meta-gradient

  c.outer = ml_collections.ConfigDict()
  c.outer.steps = 600
  c.outer.batch_size = 128
  c.outer.learning_rate = 1e-3
  c.outer.warmup_steps = 50
  c.outer.schedule = 'constant'    # after the warm-up: 'constant' | 'cosine' (to 0 at outer.steps)
  c.outer.clip_norm = 1.0
  c.outer.ema = 0.0                # decay of the rater's Polyak average, the one reported (0: off)
  # The meta-gradient estimator (outer_loop.estimators): 'reverse' | 'remat' (jax.checkpoint per
  # inner step) | 'mixed' (custom backward, forward-over-reverse HVPs, memory nearly flat in T).
  c.outer.meta_gradient = 'reverse'
  # mixed only: how inner states come back on the backward pass. 'invert' runs momentum/Adam
  # backwards, 'replay' recomputes from kept states, 'auto' = invert if the optimizer can.
  c.outer.mixed_recompute = 'auto'
  c.outer.mixed_segment = 0        # steps per segment (0: 16 for invert, its most; sqrt(T), replay)
  # Outer steps whose meta-gradient is not finite are skipped (counted in the log); this many in
  # a row stop the run.
  c.outer.max_skipped_steps = 20

  c.log_every = 25                 # launch.train_rater: outer steps between logged metrics
  c.checkpoint_every = 200         # launch.train_rater: outer steps between checkpoints

  # End of a rater run: num_models fresh models (0: none) trained train_steps steps with the
  # rater's weights vs uniform weights (the inner optimizer and batch size).
  c.final_eval = ml_collections.ConfigDict()
  c.final_eval.train_steps = 300
  c.final_eval.num_models = 4

  # launch.train: task models trained from scratch under a policy.
  c.train = ml_collections.ConfigDict()
  c.train.epochs = 30
  c.train.checkpoint_every = 10    # epochs between checkpoints (with --workdir; a rerun resumes)
  c.train.batch_size = 128
  c.train.optimizer = 'adam'
  c.train.learning_rate = 1e-3
  c.train.seeds = (0, 1, 2)        # one fresh model per seed (initialisation, data order), vmapped
  c.train.stream = False           # read the training split block by block (not the sae policy)

  c.policy = ml_collections.ConfigDict()
  c.policy.name = 'uniform'        # datarater.policies.POLICIES (launch.train --policy sets it)
  c.policy.temperature = 1.0       # tau of softmax weights from values (scores, tracin, mimic)
  c.policy.rho = 0.2               # online filters: the fraction of each batch filtered out
  c.policy.ratio = 0.7             # selection: the fraction of the split trained on per epoch
  c.policy.max_prune_prob = 0.8    # infobatch

  # launch.valuate: the recorded training run (plain SGD, fixed data order) each method reads.
  v = c.valuation = ml_collections.ConfigDict()
  v.train_steps = 600
  v.batch_size = 64
  v.optimizer = 'sgd'              # DVEmb needs it; TracIn weighs checkpoints by the nominal lr
  v.learning_rate = 0.1
  v.checkpoint_every = 60          # TracIn / Mimic checkpoints (DVEmb records every step)
  v.seed = 0                       # initialisation and data order of the run
  v.layers = ''                    # TracIn's layers, comma-separated ('dense_2'); '' = all
  v.projection = 'kronecker'       # 'none' | 'kronecker' | 'gaussian' (where a method projects)
  v.projection_dim = 8             # kronecker: 8 x 8 per matrix leaf, a leaf with one axis (a
                                   # bias, a norm's scale) or <= 64 entries kept whole (the size
                                   # DVEmb's curvature squares); gaussian: this many dims
  v.projection_seed = 0
  v.chunk_size = 64                # per-example gradients alive at once
  v.score_batch_size = 256         # examples per scoring call (the progress bar's step)
  v.tracin_mode = 'self'           # 'self' | 'heldout' | 'heldout_cos'
  v.tracin_project = False         # TracIn on projected gradients (exact gradients if False)
  v.tracin_ghost = True            # self-influence / heldout_cos norms from Dense inputs x output
                                   # grads, if Dense layers hold the layers read
  v.mimic_layers = 'last'          # 'last' | '' (all) | comma-separated names
  v.mimic_cosine = False
  v.mimic_keep_fraction = 0.0      # offline filter: keep this top share; 0 = 2-Gaussian threshold
  v.reference_steps = 400          # steps of the Mimic reference (this optimizer) on heldout_split
  v.dvemb_curvature = 'gauss_newton'  # | 'empirical_fisher' | 'exact' (unprojected) | 'none'
  v.dvemb_steps = 300              # DVEmb's run is shorter: it keeps a checkpoint per step
  v.rater = ''                     # method datarater: an exported rater or a train_rater workdir
  v.store = False                  # scores from a gradient store (factored projections, on disk)
  v.store_k = 8                    # the store's projection: k_in = k_out per Dense layer
  v.topk = 0                       # > 0: each `topk_split` example's top supporting/opposing ones
  v.topk_split = 'test'

  # Selection policy 'sae': plug-in feature space, a sparse autoencoder on it, the scores.
  c.features = ml_collections.ConfigDict()
  # 'penultimate' (Task.embed of a briefly trained task: the fields below, up to seed, train
  # it) | 'pixels' (the inputs as they are; those fields unused)
  c.features.extractor = 'penultimate'
  c.features.task = ml_collections.ConfigDict({'name': 'mlp_classifier', 'hidden': (64,),
                                               'activation': 'relu', 'input': '', 'label': '',
                                               'dtype': '', 'param_dtype': ''})
  c.features.train_steps = 150
  c.features.train_epochs = 0.0    # > 0: passes over the training split instead of train_steps
  c.features.batch_size = 64
  c.features.learning_rate = 3e-3
  c.features.seed = 1

  c.sae = ml_collections.ConfigDict()
  c.sae.sparsity = 'top_k'         # 'top_k' | 'l1'
  c.sae.num_factors = 128
  c.sae.k = 8                      # active factors per example (top_k)
  c.sae.l1_coef = 0.1              # L1 penalty on the codes (l1)
  c.sae.steps = 1500
  c.sae.epochs = 0.0               # > 0: passes over the features instead of steps
  c.sae.batch_size = 256
  c.sae.learning_rate = 3e-3

  c.sae_scores = ml_collections.ConfigDict()
  c.sae_scores.class_conditional = True  # representativeness within each labelled class
  c.sae_scores.high_freq_fraction = 0.5  # share of factors (most frequent first) counted as common
  c.sae_scores.gate_width = 0.15         # how gradually rare factors are let in (progress units)
  # Curriculum weights on rank(representativeness) and rank(diversity), from t = 0 to the end.
  # Negative representativeness weight: the most representative examples (whose factors the rest
  # of their class already covers, i.e. redundant) are the first left out of the budget.
  c.sae_scores.rep_weight_start = -1.0
  c.sae_scores.rep_weight_end = -1.0
  c.sae_scores.div_weight_start = 0.0    # rare factors come in over training ...
  c.sae_scores.div_weight_end = 0.5      # ... up to this weight at the end
  c.sae_scores.usage_penalty = 0.3       # lambda on the share of past epochs an example was used
  c.sae_scores.temperature = 0.3         # tau: n drawn from softmax(score / tau) (0 = top n)
  # Label guard against likely mislabels (class_conditional only): rule 'margin' = factors more
  # typical of another class than of its own by > `mislabel_margin`; 'confident' = an estimated
  # number of label errors, lowest margins first; 'knn' = an estimated number of label errors,
  # those whose label is rarest among their `mislabel_knn` nearest neighbours in code space first.
  # Guard 'penalty': suspects lose `mislabel_penalty` score; 'exclude': selected only when the
  # others cannot fill the budget; 'off': no guard.
  c.sae_scores.mislabel_guard = 'penalty'
  c.sae_scores.mislabel_rule = 'margin'
  c.sae_scores.mislabel_margin = 0.25
  c.sae_scores.mislabel_knn = 50
  c.sae_scores.mislabel_knn_reference = 10000  # 'knn' searches this many random examples (0: all)
  c.sae_scores.mislabel_penalty = 1.0
  return c
