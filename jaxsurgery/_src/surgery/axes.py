"""How a parameter axis is consumed: the block structure that dataflow imposes on it.

Positional alignment is only right in the coordinates in which an axis is
consumed. A fused LSTM kernel (in, 4H) is split into four gate blocks after the
matmul; an attention projection (in, heads*hd) is reshaped to (heads, hd). This
module follows one parameter axis forward through the jaxpr (through matmuls,
elementwise ops, broadcasts, transposes, reshapes that keep it whole, into and
back out of calls and scan bodies) until it meets an op that cuts it:

* an equal ``split`` or an aligned ``slice`` along it -> ``Factors((k, n // k))``: k equal blocks;
* a ``reshape`` that factors it into (a, b) -> ``Factors((a, b))``;
* a contraction with a ``concatenate``-d partner (a dense layer reading
  ``concat([pooled, globals])``) -> ``Segments(sizes)``: each piece is aligned
  on its own, so widening ``pooled`` does not shift the ``globals`` rows.

The first cut found (in program order) is the structure used for alignment.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Literal

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core.errors import NoSubJaxprError
from jaxsurgery._src.rules import registry
from jaxsurgery._src.rules.common import reshape_groups

#: How one axis of a leaf is aligned.
AxisKind = Literal["identity", "features", "segments", "blockwise", "prefix"]


class AxisHow(str):
  """How one axis of a leaf was aligned: a ``kind``, and a ``detail`` for segments and blocks.

  It is the string ``kind`` or ``"kind detail"`` (``"features in segments 4+4 -> 6+6"``,
  ``"blockwise 4x8 -> 4x12"``), so it prints and compares as that text.

  Example:
    >>> h = AxisHow("blockwise", "4x8 -> 4x12")
    >>> h, h.kind, h == "blockwise 4x8 -> 4x12"
    ('blockwise 4x8 -> 4x12', 'blockwise', True)
  """

  kind: AxisKind
  detail: str

  def __new__(cls, kind: AxisKind, detail: str = "") -> AxisHow:
    self = super().__new__(cls, f"{kind} {detail}" if detail else kind)
    self.kind, self.detail = kind, detail
    return self

  def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]  # pickles as (kind, detail)
    return self.kind, self.detail


@dataclasses.dataclass(frozen=True)
class Factors:
  """The axis is consumed as a row-major grid ``sizes`` (e.g. (gates, H) or (heads, head_dim))."""

  sizes: tuple[int, ...]

  def describe(self) -> str:
    return "x".join(str(s) for s in self.sizes)


@dataclasses.dataclass(frozen=True)
class Segments:
  """The axis is contracted against a concatenation: consecutive pieces of these sizes."""

  sizes: tuple[int, ...]

  def describe(self) -> str:
    return "+".join(str(s) for s in self.sizes)


def _shape(v):
  return tuple(getattr(v.aval, "shape", ()))


def axis_structure(closed_jaxpr, param_index: int, axis: int, max_steps: int = 20000,
                   cache: dict | None = None) -> Factors | Segments | None:
  """The factorisation imposed on ``axis`` of parameter ``param_index`` (an invar index).

  ``cache`` holds each jaxpr's consumer index; pass one dict per plan (the jaxprs
  must stay alive while it is used, as keys are ``id``s).
  """
  cache = {} if cache is None else cache
  jaxpr = closed_jaxpr.jaxpr
  start = jaxpr.invars[param_index]
  n = _shape(start)[axis]
  # Index every eqn consuming each var, across nested jaxprs, lazily.
  queue = deque([(jaxpr, start, axis)])
  seen = set()
  steps = 0
  returns: dict[int, tuple] = {}  # id(sub-jaxpr) -> (sub, parent jaxpr, eqn, ys offset)
  while queue and steps < max_steps:
    j, var, ax = queue.popleft()
    if (id(var), ax) in seen:
      continue
    seen.add((id(var), ax))
    back = returns.get(id(j))
    if back is not None and back[0] is j:  # leaving a call or scan body: continue outside
      _, parent, eqn, ys_from = back
      for k, o in enumerate(j.outvars):
        if o is var:
          queue.append((parent, eqn.outvars[k], ax + (1 if k >= ys_from else 0)))
    for eqn in _consumers(j, var, cache):
      steps += 1
      found = _step(eqn, var, ax, n, queue, j, returns, cache)
      if found is not None:
        return found
  return None


def _consumers(jaxpr, var, cache: dict):
  entry = cache.get(id(jaxpr))
  if entry is None or entry[0] is not jaxpr:
    table: dict[int, list] = {}
    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        if not isinstance(v, compat.Literal):
          table.setdefault(id(v), []).append(eqn)
    entry = cache[id(jaxpr)] = (jaxpr, table)  # the jaxpr is kept alive: its id stays unique
  return entry[1].get(id(var), [])


def _producers(jaxpr, cache: dict) -> dict:
  entry = cache.get(("producers", id(jaxpr)))
  if entry is None or entry[0] is not jaxpr:
    table = {id(o): eqn for eqn in jaxpr.eqns for o in eqn.outvars}
    entry = cache[("producers", id(jaxpr))] = (jaxpr, table)
  return entry[1]


def _pieces(jaxpr, var, ax, cache, depth: int = 0) -> list[int]:
  """Sizes of the concatenated pieces that ``var`` is made of along ``ax``.

  Nested concatenations are flattened, through casts and elementwise ops with scalar partners.
  """
  n = _shape(var)[ax]
  eqn = _producers(jaxpr, cache).get(id(var))
  while eqn is not None and depth < 64:
    name = eqn.primitive.name
    same = [v for v in eqn.invars if not isinstance(v, compat.Literal) and _shape(v) == _shape(var)]
    if name == "concatenate" and eqn.params["dimension"] == ax:
      out = []
      for v in eqn.invars:
        out += _pieces(jaxpr, v, ax, cache, depth + 1)
      return out
    if registry.has_trait(name, "elementwise") and len(same) == 1 and all(
        isinstance(v, compat.Literal) or v is same[0] or not _shape(v) for v in eqn.invars):
      var, eqn = same[0], _producers(jaxpr, cache).get(id(same[0]))
      depth += 1
      continue
    break
  return [n]


def _step(eqn, var, ax, n, queue, jaxpr, returns, cache):
  name = eqn.primitive.name
  pos = [i for i, v in enumerate(eqn.invars) if v is var]
  p = eqn.params
  out = eqn.outvars

  def follow(o, a):
    queue.append((jaxpr, o, a))

  if name == "split" and p["axis"] == ax:
    sizes = tuple(int(s) for s in p["sizes"])
    if len(set(sizes)) == 1 and len(sizes) > 1:
      return Factors((len(sizes), sizes[0]))
    return None
  if name == "slice":
    s, l = p["start_indices"][ax], p["limit_indices"][ax]
    size = l - s
    if 0 < size < n and n % size == 0 and s % size == 0:
      return Factors((n // size, size))
    if size == n:
      follow(out[0], ax)
    return None
  if name == "reshape":
    in_shape, out_shape = _shape(var), _shape(out[0])
    for gi, gj in reshape_groups(in_shape, out_shape):
      if ax in gi:
        big_in = [a for a in gi if in_shape[a] > 1]
        big_out = [a for a in gj if out_shape[a] > 1]
        if big_in == [ax] and len(big_out) == 1:
          follow(out[0], big_out[0])
        elif big_in == [ax] and len(big_out) > 1:
          return Factors(tuple(out_shape[a] for a in big_out))
    return None
  if name == "transpose":
    follow(out[0], list(p["permutation"]).index(ax))
    return None
  if name == "broadcast_in_dim":
    follow(out[0], p["broadcast_dimensions"][ax])
    return None
  if name == "squeeze":
    dims = [d % len(_shape(var)) for d in p["dimensions"]]
    follow(out[0], ax - sum(d < ax for d in dims))
    return None
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    for i in pos:
      mine, theirs = (lc, rc) if i == 0 else (rc, lc)
      if ax in mine:
        pieces = _pieces(jaxpr, eqn.invars[1 - i], theirs[list(mine).index(ax)], cache)
        if len(pieces) > 1:
          return Segments(tuple(pieces))
    for i in pos:
      if i == 0:
        nd, c, b = len(_shape(eqn.invars[0])), lc, lb
        free = [a for a in range(nd) if a not in c and a not in b]
        if ax in free:
          follow(out[0], len(b) + free.index(ax))
      elif i == 1:
        nl = len(_shape(eqn.invars[0]))
        lfree = [a for a in range(nl) if a not in lc and a not in lb]
        nd = len(_shape(eqn.invars[1]))
        free = [a for a in range(nd) if a not in rc and a not in rb]
        if ax in free:
          follow(out[0], len(rb) + len(lfree) + free.index(ax))
    return None
  if registry.has_trait(name, "call"):
    try:
      sub, _ = compat.sub_jaxpr(p, name)
    except NoSubJaxprError:
      return None
    returns[id(sub)] = (sub, jaxpr, eqn, len(sub.outvars))
    for i in pos:
      queue.append((sub, sub.invars[i], ax))
    return None
  if name == "scan":
    nc, ncarry = compat.scan_counts(p)
    sub, _ = compat.open_jaxpr(p["jaxpr"])
    returns[id(sub)] = (sub, jaxpr, eqn, ncarry)  # ys gain the leading time axis
    for i in pos:
      if i < nc:
        queue.append((sub, sub.invars[i], ax))
    return None
  # Elementwise: same axis (operands of equal rank only).
  if registry.has_trait(name, "elementwise") or registry.has_trait(name, "passthrough"):
    for o in out:
      if len(_shape(o)) == len(_shape(var)):
        follow(o, ax)
  return None


def index_map(new_n: int, old_n: int, new_s, old_s) -> tuple[np.ndarray, AxisHow]:
  """Old index per new index (-1: fresh) along a positional axis, and how it was aligned."""
  if (isinstance(new_s, Segments) and isinstance(old_s, Segments)
      and len(new_s.sizes) == len(old_s.sizes) and sum(new_s.sizes) == new_n and sum(old_s.sizes) == old_n):
    parts = []
    old_start = np.cumsum((0,) + old_s.sizes[:-1])
    for size, old_size, start in zip(new_s.sizes, old_s.sizes, old_start):
      j = np.arange(size)
      parts.append(np.where(j < old_size, start + j, -1))
    return np.concatenate(parts), AxisHow("segments", f"{old_s.describe()} -> {new_s.describe()}")
  if (isinstance(new_s, Factors) and isinstance(old_s, Factors) and len(new_s.sizes) == len(old_s.sizes)
      and int(np.prod(new_s.sizes)) == new_n and int(np.prod(old_s.sizes)) == old_n):
    grid = np.indices(new_s.sizes).reshape(len(new_s.sizes), -1)
    ok = np.all(grid < np.asarray(old_s.sizes)[:, None], axis=0)
    old_flat = np.ravel_multi_index(tuple(np.minimum(grid, np.asarray(old_s.sizes)[:, None] - 1)), old_s.sizes)
    return np.where(ok, old_flat, -1), AxisHow("blockwise", f"{old_s.describe()} -> {new_s.describe()}")
  m = np.arange(new_n)
  return np.where(m < old_n, m, -1), AxisHow("prefix")
