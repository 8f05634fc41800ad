"""pytest.ini's warning filters: a library's DeprecationWarning or FutureWarning for a deprecated
API that our code calls (attributed to our module by the warning's stacklevel, as JAX and NumPy
raise theirs) fails the test; one raised where a library calls such an API itself is ignored."""
import os
import types
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = (DeprecationWarning, FutureWarning)


@pytest.fixture(autouse=True)
def suite_filters(request):
  if request.config.known_args_namespace.pythonwarnings:
    pytest.skip("the command line's -W filters go before the suite's")


def deprecated_api(category):
  """A library function deprecated as JAX's are: the warning names its caller's module."""
  warnings.warn('deprecated_api is deprecated', category, stacklevel=2)


def _module(name: str):
  """A module called `name` whose `call(f, *args)` calls `f`: the caller a warning names."""
  module = types.ModuleType(name)
  exec('def call(f, *args):\n  return f(*args)\n', module.__dict__)  # pylint: disable=exec-used
  return module


def _packages() -> list[str]:
  """The repository's top-level folders of Python files: its packages, configs and tests."""
  return sorted(d for d in os.listdir(ROOT) if not d.startswith('.')
                and os.path.isdir(os.path.join(ROOT, d))
                and any(n.endswith('.py') for n in os.listdir(os.path.join(ROOT, d))))


@pytest.mark.parametrize('category', CATEGORIES)
def test_a_deprecated_api_called_from_our_code_fails_the_test(category):
  assert {'datarater', 'inner_loop', 'outer_loop', 'launch', 'tests'} <= set(_packages())
  for package in _packages():
    with pytest.raises(category, match='deprecated_api'):
      _module(f'{package}.module').call(deprecated_api, category)
  with pytest.raises(category):  # a test module itself (pytest imports it as `test_...`)
    deprecated_api(category)


def test_a_deprecated_api_called_inside_a_library_is_not_ours_to_fix():
  with warnings.catch_warnings(record=True) as seen:
    for category in CATEGORIES:
      for name in ('somelib.internal', 'datarater_plugin', 'testing_utils'):
        _module(name).call(deprecated_api, category)
  assert [w.category for w in seen if w.category is DeprecationWarning] == []
