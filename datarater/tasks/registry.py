"""Tasks and raters by name, built from a config section and the dataset's `DataInfo`.

`@register_task('name', schema)` / `@register_rater('name', schema)` on a factory
`(config, info) -> Task | Rater` adds one; `config.task.name` / `config.rater.name` picks it.
`schema` maps the section's other fields to their checks (`datarater.config_checks`), so a bad
or unknown field is refused before a run starts; what the model returns is checked when it is
built (`base.check_outputs`).
"""
from typing import Callable

from datarater.errors import UserError
from datarater.tasks.base import Rater, Task, check_outputs

TASKS: dict[str, Callable[..., Task]] = {}
RATERS: dict[str, Callable[..., Rater]] = {}
SCHEMAS: dict[tuple[str, str], dict] = {}


def register_task(name: str, schema: dict):
  def add(factory):
    TASKS[name] = factory
    SCHEMAS['task', name] = schema
    return factory
  return add


def register_rater(name: str, schema: dict):
  def add(factory):
    RATERS[name] = factory
    SCHEMAS['rater', name] = schema
    return factory
  return add


def schema_of(kind: str, name: str) -> dict:
  """The fields (besides `name`) a registered task or rater reads, with their checks."""
  return SCHEMAS[kind, name]


def make_task(config, info) -> Task:
  """The task `config.name` for data described by `info` (`pipeline.DataInfo`)."""
  if config.name not in TASKS:
    raise UserError(f'unknown task.name {config.name!r} (choose from {", ".join(sorted(TASKS))})')
  task = TASKS[config.name](config, info)
  _check_kind(task, Task, 'task', config.name)
  check_outputs(task)
  return task


def make_rater(config, info) -> Rater:
  """The rater `config.name` for data described by `info`."""
  if config.name not in RATERS:
    raise UserError(f'unknown rater.name {config.name!r} (choose from {", ".join(sorted(RATERS))}; '
                    'a rater of your own loads everywhere once datarater/tasks/__init__.py '
                    'imports its module)')
  rater = RATERS[config.name](config, info)
  _check_kind(rater, Rater, 'rater', config.name)
  check_outputs(rater)
  return rater


def _check_kind(made, kind: type, what: str, name: str) -> None:
  """UserError unless the factory registered as `name` made a `kind` (a factory that forgot its
  `return` made None)."""
  if not isinstance(made, kind):
    raise UserError(f'the {what} factory registered as {name!r} returned a '
                    f'{type(made).__name__}, not a datarater.tasks.{kind.__name__}')
