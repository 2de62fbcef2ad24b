"""The old program, indexed for the relation pass: who consumes each variable, and constants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxsurgery._src import compat

_MAX_FOLD = 1 << 22


class OldSide:
  """One old (sub-)jaxpr: consumers of each variable and a lazy constant folder.

  Args:
    jaxpr: an open jaxpr.
    consts: concrete values of variables known to be constant (constvars, and
      invars bound to constant operands of the enclosing eqn).
  """

  def __init__(self, jaxpr, consts: Mapping[int, Any]):
    self.jaxpr = jaxpr
    self.consumers: dict[int, list[tuple[int, int]]] = {}
    self.producer: dict[int, int] = {}
    # Old eqns that compute the same thing from the same operands (``x - mu`` twice in a
    # LayerNorm) are one value: their outputs share a canonical variable, and consumers are
    # indexed by it, so pairing can take either.
    self._canon: dict[int, Any] = {}
    seen: dict[tuple, Any] = {}
    for i, eqn in enumerate(jaxpr.eqns):
      key = self._cse_key(eqn)
      first = seen.get(key) if key is not None else None
      if first is None and key is not None:
        seen[key] = eqn
      for j, o in enumerate(eqn.outvars):
        self.producer[id(o)] = i
        if first is not None:
          self._canon[id(o)] = self.canonical(first.outvars[j])
      for k, v in enumerate(eqn.invars):
        if not isinstance(v, compat.Literal):
          self.consumers.setdefault(id(self.canonical(v)), []).append((i, k))
    self._values: dict[int, Any] = dict(consts)
    self._unknown: set[int] = set()
    self.paired: set[int] = set()   # old eqn indices paired with a new eqn (diagnostics)

  def canonical(self, var):
    """The representative of the old values equal to ``var`` (itself, unless computed twice)."""
    return self._canon.get(id(var), var)

  def same(self, a, b) -> bool:
    return a is b or (a is not None and b is not None and self.canonical(a) is self.canonical(b))

  def _cse_key(self, eqn):
    if eqn.effects or any(isinstance(v, (compat.Jaxpr, compat.ClosedJaxpr)) for v in eqn.params.values()):
      return None
    try:
      params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))
      args = tuple(("lit", repr(a.val)) if isinstance(a, compat.Literal) else id(self.canonical(a))
                   for a in eqn.invars)
    except Exception:
      return None
    return (eqn.primitive.name, params, args)

  def candidates(self, prim: str, refs: list[tuple[int, Any]]) -> list[int]:
    """Old eqns of primitive ``prim`` whose operand ``k`` is ``ref`` for every ``(k, ref)``."""
    pools = []
    for k, ref in refs:
      pools.append({i for i, pos in self.consumers.get(id(self.canonical(ref)), ()) if pos == k
                    and self.jaxpr.eqns[i].primitive.name == prim})
    if not pools:
      return []
    found = set.intersection(*pools)
    return sorted(found)

  def value(self, atom) -> np.ndarray | None:
    """The concrete value of an old variable or literal, if it is a constant."""
    if isinstance(atom, compat.Literal):
      return np.asarray(atom.val)
    key = id(atom)
    if key in self._values:
      return self._values[key]
    if key in self._unknown:
      return None
    # Explicit stack: constant chains can be long.
    stack = [atom]
    while stack:
      v = stack[-1]
      k = id(v)
      if k in self._values or k in self._unknown:
        stack.pop()
        continue
      i = self.producer.get(k)
      if i is None:
        self._unknown.add(k)
        stack.pop()
        continue
      eqn = self.jaxpr.eqns[i]
      pending = [a for a in eqn.invars if not isinstance(a, compat.Literal)
                 and id(a) not in self._values and id(a) not in self._unknown]
      if pending:
        stack.extend(pending)
        continue
      stack.pop()
      self._fold(eqn)
    return self._values.get(key)

  def _fold(self, eqn) -> None:
    args = []
    ok = not eqn.effects and all(
        int(np.prod(o.aval.shape, dtype=np.int64)) <= _MAX_FOLD for o in eqn.outvars)
    for a in eqn.invars:
      if not ok:
        break
      val = np.asarray(a.val) if isinstance(a, compat.Literal) else self._values.get(id(a))
      if val is None:
        ok = False
      args.append(val)
    outs = None
    if ok:
      try:
        outs = [np.asarray(o) for o in compat.bind(eqn, args)]
      except Exception:
        outs = None
    for j, o in enumerate(eqn.outvars):
      if outs is None:
        self._unknown.add(id(o))
      else:
        self._values[id(o)] = outs[j]
