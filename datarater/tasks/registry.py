"""Tasks and raters by name, built from a config section and the dataset's `DataInfo`.

`@register_task('name', schema)` / `@register_rater('name', schema)` on a factory
`(config, info) -> Task | Rater` adds one; `config.task.name` / `config.rater.name` picks it.
`schema` maps the section's other fields to their checks (`datarater.config_checks`), so a bad
or unknown field is refused before a run starts; what the model returns is checked when it is
built (`base.check_outputs`). A rater's registering module is recorded with a rater run and an
exported rater (`module_of`), so what loads one without a config imports it (`import_module_of`).
"""
import contextvars
import importlib
import importlib.machinery
from typing import Callable, Optional

from datarater.errors import UserError
from datarater.tasks.base import Rater, Task, check_outputs

TASKS: dict[str, Callable[..., Task]] = {}
RATERS: dict[str, Callable[..., Rater]] = {}
SCHEMAS: dict[tuple[str, str], dict] = {}
RATER_MODULES: dict[str, str] = {}  # rater name -> the module its factory is defined in
_SECTION = contextvars.ContextVar('section', default='task')


def building_section() -> str:
  """The config section of the task or rater a factory is building ('task', 'rater',
  'features.task'), for its error lines."""
  return _SECTION.get()


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
    RATER_MODULES[name] = factory.__module__
    return factory
  return add


def schema_of(kind: str, name: str) -> dict:
  """The fields (besides `name`) a registered task or rater reads, with their checks."""
  return SCHEMAS[kind, name]


def module_of(name: str) -> Optional[str]:
  """The module whose factory registered rater `name`, if another process can import it by that
  name (None for one registered in a script, `__main__`, or in a --config file)."""
  module = RATER_MODULES.get(name)
  if module in (None, '__main__'):
    return None
  parent, _, leaf = module.rpartition('.')  # searched for on the path, not in sys.modules
  try:
    path = importlib.import_module(parent).__path__ if parent else None
    found = importlib.machinery.PathFinder.find_spec(leaf, path)
  except (ImportError, AttributeError, ValueError):
    return None
  return module if found is not None else None


def import_module_of(name: str, module: Optional[str], where: str) -> None:
  """Imports `module`, recorded in `where` as the one that registered rater `name`, when no
  module imported so far did: a rater of one's own loads where its module imports."""
  if name in RATERS or not module:
    return
  try:
    importlib.import_module(module)
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's module)
    raise UserError(f'{where!r}: rater {name!r} is registered by module {module!r}, which does '
                    f'not import here ({type(e).__name__}: {e}): put its folder on PYTHONPATH') \
        from None


def make_task(config, info, section: str = 'task') -> Task:
  """The task `config.name` for data described by `info` (`pipeline.DataInfo`); `section`: the
  config section `config` is (`building_section()` while the factory runs)."""
  return _make(TASKS, Task, config, info, section)


def make_rater(config, info) -> Rater:
  """The rater `config.name` for data described by `info`."""
  return _make(RATERS, Rater, config, info, 'rater',
               '; a rater of your own loads where its module is imported')


def _make(factories: dict, kind: type, config, info, section: str, hint: str = ''):
  """`factories[config.name](config, info)`, refused in one line where the name is unknown
  (`hint` ends the line), or what it makes is no `kind` or has outputs of the wrong shapes."""
  if config.name not in factories:
    raise UserError(f'unknown {section}.name {config.name!r} (choose from '
                    f'{", ".join(sorted(factories))}{hint})')
  token = _SECTION.set(section)
  try:
    made = factories[config.name](config, info)
  finally:
    _SECTION.reset(token)
  if not isinstance(made, kind):  # (a factory that forgot its `return` made None)
    raise UserError(f'the {kind.__name__.lower()} factory registered as {config.name!r} '
                    f'returned a {type(made).__name__}, not a datarater.tasks.{kind.__name__}')
  check_outputs(made, info)
  return made
