"""The docstring examples of every jaxsurgery module run as doctests.

Each object's examples run in the module that defines it, so a public name
re-exported by ``jaxsurgery`` is tested once. Examples marked
``# doctest: +SKIP`` are skipped (only where they need files or trained models).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jaxsurgery
import jaxsurgery.display
import jaxsurgery.flax
import jaxsurgery.optim
import jaxsurgery.orbax
import jaxsurgery.rules
from jaxsurgery._src.rules import registry

MODULES = sorted(["jaxsurgery"] + [m.name for m in pkgutil.walk_packages(jaxsurgery.__path__, "jaxsurgery.")
                                   if m.name != "jaxsurgery.demo"])
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests(name):
  module = importlib.import_module(name)
  return [t for t in doctest.DocTestFinder().find(module) if t.examples]


CASES = [(name, t.name) for name in MODULES for t in _tests(name)]


@pytest.fixture
def restore_registry():
  """Examples may register rules: leave the registry as it was."""
  rules, traits = dict(registry._RULES), dict(registry._TRAITS)
  yield
  registry._RULES.clear()
  registry._RULES.update(rules)
  registry._TRAITS.clear()
  registry._TRAITS.update(traits)
  registry._BY_TRAIT.clear()


# Public names without an example of their own: exceptions (a docstring says when they are raised),
# typing protocols and constants (documented in jaxsurgery.rules' module docstring, which has one).
NO_EXAMPLE = {"__version__", "rules", "optim", "masks", "TRAITS", "Rule", "Context", "Eqn",
              # optimizer states (NamedTuples; their transforms' examples build them)
              "ScaleByAdamState", "FreezeFreshState"}


def test_the_public_names_have_examples():
  names = {t for _, t in CASES}
  missing = []
  for module in (jaxsurgery, jaxsurgery.display, jaxsurgery.flax, jaxsurgery.orbax, jaxsurgery.rules, jaxsurgery.optim):
    for n in module.__all__:
      obj = getattr(module, n)
      if not callable(obj) and not isinstance(obj, type) and not hasattr(obj, "__path__"):
        continue  # constants (SOURCES, COPIED...): documented in their module's docstring
      if n in NO_EXAMPLE or (isinstance(obj, type) and issubclass(obj, Warning | Exception)):
        assert obj.__doc__, f"{module.__name__}.{n} has no docstring"
        continue
      if f"{obj.__module__}.{obj.__qualname__}" not in names:
        missing.append(f"{module.__name__}.{n}")
  assert not missing, f"public names without a docstring example: {missing}"


@pytest.mark.parametrize("module,test", CASES, ids=[t for _, t in CASES])
def test_docstring_examples(module, test, restore_registry):
  (case,) = [t for t in _tests(module) if t.name == test]
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  runner.run(case)
  result = runner.summarize(verbose=False)
  assert not result.failed, f"{result.failed} of {result.attempted} examples of {test} failed (output above)"
