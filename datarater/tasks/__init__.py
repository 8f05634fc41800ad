"""Tasks (model + loss + metrics over a feature spec) and raters; see `base` for the interfaces.

The interfaces and the registry come first, so a model module imported below (the shipped ones,
or one of your own) may `from datarater import tasks` and use them."""
from datarater.tasks.base import (Batch, FeatureSpec, Params, PerExampleLoss, Rater, Task,
                                  at_least_float32, batch_size_of, check_initial_loss,
                                  check_per_example, example_batch, init_module, num_classes,
                                  require_labels)
from datarater.tasks.nnx import NnxModel
from datarater.tasks.registry import (RATERS, TASKS, make_rater, make_task, register_rater,
                                      register_task)
from datarater.tasks import classifier, cnn, lm  # pylint: disable=unused-import,g-bad-import-order  (registers them)
