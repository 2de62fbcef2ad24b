"""Primitive classes for the probe's walks: how an operation's local derivative depends on its operands.

The classes come from the traits registered with each rule
(:mod:`jaxsurgery._src.rules.registry`); a few primitives whose operands play
different roles (divisor, predicate, index) are special-cased here by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core.errors import NoSubJaxprError
from jaxsurgery._src.rules import registry

#: How a first contact meets its feature-dependent partner (for the cross-check's notes).
ContactKind = Literal["multiplicative", "additive", "selection", "zero-gradient", "other"]


def calls() -> frozenset[str]:
  """Primitives whose sub-jaxpr both walks evaluate in place."""
  return registry.with_trait("call")


def compound() -> frozenset[str]:
  """Primitives the contact-local evaluation treats as one unit (loops, conditionals, shard_map)."""
  return registry.with_trait("control")


def placing() -> frozenset[str]:
  """Contacts that place a parameter-derived value into a feature-dependent one.

  A live element of such a contact gives the feature-dependent value a nonzero base
  (zeroed when annihilating).
  """
  return registry.with_trait("additive", "places")


def _union(fs: Iterable[int]) -> int:
  out = 0
  for f in fs:
    out |= f
  return out


def derivative_features(name: str, params: Mapping[str, Any], i: int, fs: Sequence[int]) -> tuple[int, str]:
  """Features the local derivative w.r.t. operand ``i`` depends on, and how (a phrase).

  ``fs`` holds the features (a bitmask) of every operand.
  """
  others = _union(f for j, f in enumerate(fs) if j != i)
  if registry.has_trait(name, "zero_grad") or registry.has_trait(name, "linear"):
    return 0, ""
  if registry.has_trait(name, "product"):
    return others, "multiplies it by a value that depends on"
  if name == "div":
    if i == 0:
      return fs[1], "divides it by a value that depends on"
    return _union(fs), "divides by it (nonlinear in its denominator) with values that depend on"
  if name == "select_n":
    return (0, "") if i == 0 else (fs[0], "selects it by a predicate that depends on")
  if name in ("gather", "dynamic_slice"):
    return (_union(fs[1:]), "indexes it by an index that depends on") if i == 0 else (0, "")
  if name == "dynamic_update_slice":
    return (_union(fs[2:]), "places it at an index that depends on") if i in (0, 1) else (0, "")
  if name in ("scatter-add", "scatter_add", "scatter"):
    return (fs[1] if len(fs) > 1 else 0, "scatters it at indices that depend on") if i != 1 else (0, "")
  if name == "integer_pow" and params.get("y") in (0, 1):
    return 0, ""
  if registry.has_trait(name, "selection"):
    return _union(fs), "selects between values that depend on"
  return _union(fs), "is nonlinear in"


def contact_kind(prim: str) -> ContactKind:
  """How a first contact through primitive ``prim`` meets its feature-dependent partner."""
  if registry.has_trait(prim, "product") or prim == "div":
    return "multiplicative"
  if registry.has_trait(prim, "additive"):
    return "additive"
  if registry.has_trait(prim, "selection") or registry.has_trait(prim, "indexed"):
    return "selection"
  if registry.has_trait(prim, "zero_grad"):
    return "zero-gradient"
  return "other"


def work(jaxpr: Any) -> int:
  """Array elements one evaluation produces (a proxy for activations and compute)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    for o in eqn.outvars:
      total += int(np.prod(getattr(o.aval, "shape", ()), dtype=np.int64))
    p = eqn.params
    try:
      if name == "scan":
        total += int(p.get("length", 1)) * work(compat.open_jaxpr(p["jaxpr"])[0])
      elif name == "while":
        total += work(compat.open_jaxpr(p["body_jaxpr"])[0]) + work(compat.open_jaxpr(p["cond_jaxpr"])[0])
      elif name == "cond":
        total += max((work(b.jaxpr) for b in p["branches"]), default=0)
      elif name in calls():
        total += work(compat.sub_jaxpr(p, name)[0])
    except (KeyError, AttributeError, TypeError, NoSubJaxprError):  # pragma: no cover - odd params
      pass
  return total
