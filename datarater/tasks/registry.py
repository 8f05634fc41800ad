"""Tasks and raters by name, built from a config section and the dataset's `DataInfo`.

`@register_task('name')` / `@register_rater('name')` on a factory `(config, info) -> Task | Rater`
adds one; `config.task.name` / `config.rater.name` picks it.
"""
from typing import Callable

from datarater.errors import UserError
from datarater.tasks.base import Rater, Task

TASKS: dict[str, Callable[..., Task]] = {}
RATERS: dict[str, Callable[..., Rater]] = {}


def register_task(name: str):
  def add(factory):
    TASKS[name] = factory
    return factory
  return add


def register_rater(name: str):
  def add(factory):
    RATERS[name] = factory
    return factory
  return add


def make_task(config, info) -> Task:
  """The task `config.name` for data described by `info` (`pipeline.DataInfo`)."""
  if config.name not in TASKS:
    raise UserError(f'unknown task.name {config.name!r} (choose from {", ".join(sorted(TASKS))})')
  return TASKS[config.name](config, info)


def make_rater(config, info) -> Rater:
  """The rater `config.name` for data described by `info`."""
  if config.name not in RATERS:
    raise UserError(f'unknown rater.name {config.name!r} (choose from {", ".join(sorted(RATERS))})')
  return RATERS[config.name](config, info)
