"""Axis maps: how the positions of one axis of a new value correspond to the old value's.

An axis map sends every new index to an old index, or to ``-1`` (a position the
old value does not have). Maps are unified as the relation pass meets values
that must line up (the operands of an elementwise op, the contracted axes of a
matmul), so a parameter axis takes the map of whatever it first meets:

* ``Fixed``: a concrete ``int64`` array (input features by name, output names);
* ``Free``: not known yet (a parameter axis). Unified with another map it becomes
  that map; never constrained, it falls back to its default (same size: the
  identity; grown: the old prefix; or the table's touch signatures);
* ``Cat``: consecutive pieces (a ``split`` or ``concatenate`` along the axis);
* ``Kron``: a row-major grid of factors (a ``reshape`` into ``(heads, head_dim)``
  or a flatten of ``(H, W, C)``).

Structured maps make a fused LSTM kernel's ``4H`` axis come out as four blocks
and a Haiku GRU's ``[2H | H]``-then-halves as three, without special cases.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np

_ids = itertools.count()


class MapConflict(Exception):
  """Two maps that must agree do not."""


class AxisMap:
  n_new: int
  n_old: int


class Fixed(AxisMap):
  """A concrete map from new positions to old ones.

  A concrete map. For an input's feature axis, ``leaf`` is the old input leaf it indexes and ``foreign`` holds
  features that sit in another old leaf: ``{new index: (old leaf, position)}`` (resolved where the leaves are
  concatenated).
  """

  __slots__ = ("src", "n_new", "n_old", "label", "leaf", "foreign", "free")

  def __init__(self, src: np.ndarray, n_old: int, label: str = "", leaf=None, foreign=None):
    self.src = np.asarray(src, np.int64)
    self.n_new, self.n_old, self.label = len(self.src), int(n_old), label
    self.leaf, self.foreign = leaf, foreign or {}
    self.free: Free | None = None  # the Free variable this map was the default of (to revisit that default)

  def __repr__(self):
    return f"Fixed({self.src.tolist() if self.n_new <= 12 else '...'}, old={self.n_old})"


class Free(AxisMap):
  """A union-find variable. ``default(free) -> np.ndarray`` resolves it when nothing binds it."""

  __slots__ = ("n_new", "n_old", "parent", "bound", "default", "members", "id")

  def __init__(self, n_new: int, n_old: int, default: Callable | None = None, member=None):
    self.n_new, self.n_old = int(n_new), int(n_old)
    self.parent: Free | None = None
    self.bound: AxisMap | None = None
    self.default = default
    self.members = [member] if member is not None else []
    self.id = next(_ids)

  def __repr__(self):
    return f"Free#{self.id}({self.n_new}<-{self.n_old})"


class Bcast(AxisMap):
  """A broadcast axis: the value is the same at every position, so any map fits it."""

  __slots__ = ("n_new", "n_old")

  def __init__(self, n_new: int, n_old: int):
    self.n_new, self.n_old = int(n_new), int(n_old)

  def __repr__(self):
    return f"Bcast({self.n_new}<-{self.n_old})"


class Cat(AxisMap):
  """Consecutive pieces: ``kind`` is "split" (the axis is cut, e.g. fused gates) or "concat"."""

  __slots__ = ("parts", "n_new", "n_old", "kind")

  def __init__(self, parts: Sequence[AxisMap], kind: str = "split"):
    self.parts = tuple(parts)
    self.kind = kind
    self.n_new = sum(p.n_new for p in self.parts)
    self.n_old = sum(p.n_old for p in self.parts)

  def __repr__(self):
    return f"Cat{self.parts}"


class Kron(AxisMap):
  __slots__ = ("parts", "n_new", "n_old")

  def __init__(self, parts: Sequence[AxisMap]):
    self.parts = tuple(parts)
    self.n_new = int(np.prod([p.n_new for p in self.parts], dtype=np.int64))
    self.n_old = int(np.prod([p.n_old for p in self.parts], dtype=np.int64))

  def __repr__(self):
    return f"Kron{self.parts}"


def identity(n: int) -> Fixed:
  return Fixed(np.arange(n), n)


def prefix(n_new: int, n_old: int) -> np.ndarray:
  m = np.arange(n_new)
  return np.where(m < n_old, m, -1)


def find(m: AxisMap) -> AxisMap:
  """The representative of ``m``: a bound Free resolves to what it is bound to."""
  while isinstance(m, Free):
    root = m
    while root.parent is not None:
      root = root.parent
    if m is not root:
      m.parent = root  # path compression
    if root.bound is None:
      return root
    m = root.bound
  return m


def unify(a: AxisMap, b: AxisMap) -> AxisMap:
  """Makes ``a`` and ``b`` the same map; raises :class:`MapConflict` if they cannot be."""
  a, b = find(a), find(b)
  if a is b:
    return a
  if isinstance(a, Bcast) and a.n_new == b.n_new:
    return b
  if isinstance(b, Bcast) and a.n_new == b.n_new:
    return a
  if a.n_new != b.n_new or a.n_old != b.n_old:
    raise MapConflict(f"sizes differ: {a.n_new}<-{a.n_old} vs {b.n_new}<-{b.n_old}")
  if isinstance(a, Free) and isinstance(b, Free):
    b.parent = a
    a.members += b.members
    a.default = a.default or b.default
    return a
  if isinstance(a, Free) or isinstance(b, Free):
    free, other = cast("tuple[Free, AxisMap]", (a, b) if isinstance(a, Free) else (b, a))
    free.bound = other
    _attach_members(other, free.members)
    return other
  if type(a) is type(b) and not isinstance(a, Fixed) and _same_grid(a, b):
    for x, y in zip(cast("Cat | Kron", a).parts, cast("Cat | Kron", b).parts):
      unify(x, y)
    return a
  if isinstance(a, Fixed) and not isinstance(b, Fixed):
    a, b = b, a
  if isinstance(b, Fixed):
    _bind_to_array(a, b.src)
    return b
  sa, sb = resolve(a), resolve(b)
  if not np.array_equal(sa, sb):
    raise MapConflict("structured maps disagree")
  return a


def _attach_members(m: AxisMap, members) -> None:
  if isinstance(m, Free):
    m.members += members


def _same_grid(a, b) -> bool:
  return len(a.parts) == len(b.parts) and all(
      x.n_new == y.n_new and x.n_old == y.n_old for x, y in zip(a.parts, b.parts))


def _bind_to_array(m: AxisMap, src: np.ndarray) -> None:
  """Unifies a (possibly structured) map with a concrete array."""
  m = find(m)
  if isinstance(m, Free):
    m.bound = Fixed(src, m.n_old)
    return
  if isinstance(m, Fixed):
    if not np.array_equal(m.src, src):
      raise MapConflict("fixed maps disagree")
    return
  if isinstance(m, Cat):
    new_start, old_start = 0, 0
    for p in m.parts:
      piece = src[new_start:new_start + p.n_new]
      inside = (piece >= old_start) & (piece < old_start + p.n_old)
      if not np.all(inside | (piece < 0)):
        raise MapConflict("a fixed map crosses the pieces of a concatenation")
      _bind_to_array(p, np.where(piece < 0, -1, piece - old_start))
      new_start, old_start = new_start + p.n_new, old_start + p.n_old
    return
  m = cast(Kron, m)
  parts = factor_array(src, [p.n_new for p in m.parts], [p.n_old for p in m.parts])
  if parts is None:
    raise MapConflict("a fixed map is not a grid of the reshape's factors")
  for p, s in zip(m.parts, parts):
    _bind_to_array(p, s)


def resolve(m: AxisMap) -> np.ndarray:
  """The concrete map (Free variables take their defaults, which binds them)."""
  m = find(m)
  if isinstance(m, Fixed):
    return m.src
  if isinstance(m, Free):
    got = m.default(m) if m.default is not None else POLICY[0](m)
    src, label = got if isinstance(got, tuple) else (got, "")
    m.bound = Fixed(src, m.n_old, label)
    m.bound.free = m
    return m.bound.src
  if isinstance(m, Bcast):
    return prefix(m.n_new, m.n_old)
  if isinstance(m, Cat):
    out, old_start = [], 0
    for p in m.parts:
      s = resolve(p)
      out.append(np.where(s < 0, -1, s + old_start))
      old_start += p.n_old
    return np.concatenate(out) if out else np.zeros(0, np.int64)
  m = cast(Kron, m)
  return kron_array([resolve(p) for p in m.parts], [p.n_old for p in m.parts])


def kron_array(srcs: Sequence[np.ndarray], old_sizes: Sequence[int]) -> np.ndarray:
  """Row-major combination: new (i, j) -> old (src_i, src_j), -1 if either is -1."""
  out = np.zeros(1, np.int64)
  bad = np.zeros(1, bool)
  for s, n_old in zip(srcs, old_sizes):
    out = (out[:, None] * n_old + np.maximum(s, 0)[None, :]).reshape(-1)
    bad = (bad[:, None] | (s < 0)[None, :]).reshape(-1)
  return np.where(bad, -1, out)


def factor_array(src: np.ndarray, new_sizes, old_sizes) -> list[np.ndarray] | None:
  """Per-factor maps whose row-major combination is ``src``, or None if there are none."""
  grid = src.reshape(new_sizes)
  parts = []
  for k, (n, o) in enumerate(zip(new_sizes, old_sizes)):
    strides = int(np.prod(old_sizes[k + 1:], dtype=np.int64))
    axis_vals = np.moveaxis(grid, k, 0).reshape(n, -1)
    valid = axis_vals >= 0
    f = np.full(n, -1, np.int64)
    for i in range(n):  # n is an axis size: small loops over factors, not elements
      v = axis_vals[i][valid[i]]
      if v.size:
        f[i] = (v[0] // strides) % o
    parts.append(f)
  return parts if np.array_equal(kron_array(parts, old_sizes), src) else None


def split(m: AxisMap, new_sizes: Sequence[int], old_sizes: Sequence[int]) -> list[AxisMap]:
  """The maps of consecutive pieces of an axis (a ``split``)."""
  m = find(m)
  if isinstance(m, Free):
    parts: list[AxisMap] = [Free(n, o) for n, o in zip(new_sizes, old_sizes)]
    unify(m, Cat(parts))
    return parts
  if isinstance(m, Cat) and [p.n_new for p in m.parts] == list(new_sizes) and [
      p.n_old for p in m.parts] == list(old_sizes):
    return list(m.parts)
  src = resolve(m)
  out: list[AxisMap] = []
  ns, os_ = 0, 0
  for n, o in zip(new_sizes, old_sizes):
    piece = src[ns:ns + n]
    inside = (piece >= os_) & (piece < os_ + o)
    out.append(Fixed(np.where(inside, piece - os_, -1), o))
    ns, os_ = ns + n, os_ + o
  return out


def factor(m: AxisMap, new_sizes: Sequence[int], old_sizes: Sequence[int]) -> list[AxisMap] | None:
  """The maps of the factors of an axis reshaped into a grid, or None if it is not a grid."""
  m = find(m)
  if isinstance(m, Free):
    parts: list[AxisMap] = [Free(n, o) for n, o in zip(new_sizes, old_sizes)]
    unify(m, Kron(parts))
    return parts
  if isinstance(m, Kron) and [p.n_new for p in m.parts] == list(new_sizes) and [
      p.n_old for p in m.parts] == list(old_sizes):
    return list(m.parts)
  got = factor_array(resolve(m), list(new_sizes), list(old_sizes))
  return None if got is None else [Fixed(s, o) for s, o in zip(got, old_sizes)]


def is_identity(m: AxisMap) -> bool:
  m = find(m)
  if isinstance(m, Bcast):
    return m.n_new == m.n_old
  if isinstance(m, Free):
    return False
  if m.n_new != m.n_old:
    return False
  if isinstance(m, (Cat, Kron)):
    return all(is_identity(p) for p in m.parts)
  return bool(np.array_equal(cast(Fixed, m).src, np.arange(m.n_new)))


def maybe_new(m: AxisMap) -> bool:
  """Whether the axis may have positions the old value lacks (without resolving Free maps)."""
  m = find(m)
  if isinstance(m, (Free, Bcast)):
    return m.n_new > m.n_old
  if isinstance(m, (Cat, Kron)):
    return any(maybe_new(p) for p in m.parts)
  return bool((cast(Fixed, m).src < 0).any())


class NotAMultiple(ValueError):
  """``widen="clone"`` on an axis that does not grow by an integer factor."""

  def __init__(self, free: Free):
    self.free = free
    super().__init__(f"{free.n_old} -> {free.n_new}")


def prefix_policy(m: Free) -> np.ndarray:
  return prefix(m.n_new, m.n_old)


def tile_policy(m: Free) -> np.ndarray | tuple[np.ndarray, str]:
  """``widen="clone"``: the old positions repeated (HyperCloning's ``W.repeat``)."""
  if m.n_new == m.n_old:
    return np.arange(m.n_new)
  if m.n_new % m.n_old or m.n_new < m.n_old:
    raise NotAMultiple(m)
  return np.arange(m.n_new) % m.n_old, "clone"


# how a grown axis that nothing constrains is aligned (set per plan)
POLICY: list[Callable[[Free], np.ndarray | tuple[np.ndarray, str]]] = [prefix_policy]


def multiplicity(src: np.ndarray, n_old: int) -> int | None:
  """How many times each old index is taken (the same for all), or None if that differs."""
  s = src[src >= 0]
  if n_old == 0:
    return 1 if s.size == 0 else None
  counts = np.bincount(s, minlength=n_old)
  if len(counts) != n_old or counts[0] == 0 or not (counts == counts[0]).all():
    return None
  return int(counts[0])


def covers(src: np.ndarray, n_old: int) -> bool:
  """Whether the new positions that map to old ones take every old index exactly once."""
  s = src[src >= 0]
  return s.size == n_old and np.array_equal(np.sort(s), np.arange(n_old))


def pin_identity(m: AxisMap) -> bool:
  """Binds ``m`` to the identity if it can be (equal sizes, nothing against it)."""
  f = find(m)
  if f.n_new != f.n_old:
    return False
  if isinstance(f, Bcast):
    return True
  try:
    unify(f, identity(f.n_new))
  except MapConflict:
    return False
  return True
