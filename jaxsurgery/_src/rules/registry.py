"""The registry of dependency rules, keyed by primitive name.

A rule is ``rule(ctx, eqn, invals) -> list[Val]``. Families of primitives
share one rule, so registering most primitives is a one-liner::

    register(("exp", "log", "tanh"), unary)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Rule = Callable[..., list]

_RULES: dict[str, Rule] = {}
_OVERRIDES: list[dict[str, Rule]] = []
DENSE_RULE: Rule  # set by rules.opaque


def register(names: str | Iterable[str], rule: Rule) -> Rule:
  """Registers ``rule`` for one primitive name or several."""
  for name in ([names] if isinstance(names, str) else names):
    _RULES[name] = rule
  return rule


def registered() -> frozenset[str]:
  return frozenset(_RULES)


def active_rules() -> dict[str, Rule]:
  rules = dict(_RULES)
  for layer in _OVERRIDES:
    rules.update(layer)
  return rules


@contextlib.contextmanager
def override_rule(name: str, rule: Rule) -> Iterator[None]:
  """Temporarily replaces the rule of one primitive (for experiments and tests).

  Args:
    name: the primitive name (``eqn.primitive.name``), e.g. ``"dot_general"``.
    rule: ``rule(ctx, eqn, invals) -> list[Val]``.

  Example:
    >>> import jaxsurgery as js
    >>> with js.override_rule("tanh", js.rules.dense):
    ...   pass  # tables built here use the dense rule for tanh
  """
  layer = {name: rule}
  _OVERRIDES.append(layer)
  try:
    yield
  finally:
    _OVERRIDES.remove(layer)


def set_dense(rule: Rule) -> None:
  global DENSE_RULE
  DENSE_RULE = rule


def lookup(name: str) -> Any:
  return active_rules().get(name)
