"""Tasks (model + loss + metrics over a feature spec) and raters; see `base` for the interfaces."""
from datarater.tasks import classifier, cnn, lm  # pylint: disable=unused-import  (registers them)
from datarater.tasks.base import (Batch, FeatureSpec, Params, PerExampleLoss, Rater, Task,
                                  batch_size_of, example_batch, init_module)
from datarater.tasks.registry import (RATERS, TASKS, make_rater, make_task, register_rater,
                                      register_task)
