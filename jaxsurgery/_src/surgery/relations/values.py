"""Relation values: what each value of the new program is, in terms of the old program's values.

Every variable of the new program gets a :class:`Rel`:

* ``ref``: the old program's variable it corresponds to (``None``: a value with
  no old counterpart, e.g. the output of an inserted block);
* ``maps``: per axis, an :mod:`axismaps` map from new positions to the old
  value's positions (``-1``: a position the old value does not have);
* ``coef``: at the old positions, ``new = coef * old[maps]`` (``1.0``: exact);
* ``broken``: a :class:`Site` if the old positions are *not* related (the first
  operation where the relation was lost);
* ``slab``: per axis, what the new positions along that axis hold: ``ZERO``,
  ``CONST`` (a finite value that does not depend on new features or fresh
  parameters), ``NOVEL`` (depends on them) or ``NONFIN`` (may be inf/NaN);
* ``whole``: for ``ref is None``, what every element holds;
* ``const``: the concrete value of a constant (folded lazily);
* ``origin``: for views of a parameter, ``(param index, param axis per axis)``, so
  a decision taken where the value is used lands on the parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, overload

import numpy as np

ZERO, CONST, NOVEL, NONFIN = 0, 1, 2, 3
MEAN, MEAN2, BCAST = 4, 5, 6
KIND_NAMES = {ZERO: "zero", CONST: "constant", NOVEL: "novel", NONFIN: "non-finite",
              MEAN: "the mean of the old positions", MEAN2: "the square of that mean",
              BCAST: "the old values (broadcast)"}


@overload
def join(*kinds: int) -> int: ...
@overload
def join(*kinds: int | None) -> int | None: ...
def join(*kinds: int | None) -> int | None:
  """What new positions hold if they hold any one of ``kinds`` (loop iterations, branches)."""
  ks = set(kinds)
  if NONFIN in ks:
    return NONFIN
  if NOVEL in ks:
    return NOVEL
  if len(ks) == 1:
    return ks.pop()
  return CONST


def finite(kind: int) -> bool:
  return kind != NONFIN


class Site:
  """An operation where the new program stops computing what the old one did.

  The source line and name stack are read from the eqn only when asked for (most sites are
  conditions that later rounds satisfy and nobody reads).
  """

  __slots__ = ("primitive", "reason", "_where", "_scope", "_eqn")

  def __init__(self, primitive: str, reason: str, where: str = "", scope: str = "", eqn=None):
    self.primitive, self.reason, self._where, self._scope, self._eqn = primitive, reason, where, scope, eqn

  @property
  def where(self) -> str:
    if self._eqn is not None and not self._where:
      from jaxsurgery._src import compat
      self._where = compat.source_line(self._eqn)
    return self._where

  @property
  def scope(self) -> str:
    if self._eqn is not None and not self._scope:
      try:
        self._scope = str(self._eqn.source_info.name_stack)
      except Exception:
        self._scope = ""
    return self._scope

  def __repr__(self) -> str:
    return f"Site({self.describe()!r})"

  def describe(self) -> str:
    at = " ".join(x for x in (f"in {self.scope}" if self.scope else "",
                              f"at {self.where}" if self.where else "") if x)
    return f"`{self.primitive}`{' ' + at if at else ''}: {self.reason}"


@dataclasses.dataclass(frozen=True, eq=False)
class Rel:
  shape: tuple[int, ...]
  dtype: Any
  ref: Any = None
  maps: tuple = ()
  coef: float = 1.0
  broken: Site | None = None
  slab: tuple = ()
  whole: int | None = None
  const: Any = None
  origin: tuple | None = None
  scaled_at: str = ""  # where ``coef`` first left 1 (e.g. the division of a mean by the new size)
  pending: tuple = ()  # conditions for the relation: zeros still to be decided (issued at outputs)
  approx: tuple = ()   # notes: related only up to these (an epsilon that did not scale)
  # Means along an axis (LayerNorm statistics), for average expansion: the old part is the
  # mean over axis ``a`` of old value ``x`` raised to ``p``: ``("mean", x, a, p)``; a sum over it
  # is ``("sum", x, a)``. ``extras``: additive terms ``((key, coef), ...)`` beside ``coef * old``.
  term: tuple | None = None
  extras: tuple = ()
  mean_base: tuple = ()  # ((axis, old ref), ...): MEAN2 new positions hold mean_axis(ref)^2
  # Removed features declared constant: ``missing`` = ((axis, ((old index, expr), ...)),): old
  # positions the new value lacks, with their value as an expression; ``deficit`` = ((axis,
  # (term, ...)),): what a contraction lost, to be folded into a bias (see fold.py).
  missing: tuple = ()
  deficit: tuple = ()
  zeroed_by: frozenset = frozenset()  # for whole zeros: the zeroed fresh parameters behind them

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def related(self) -> bool:
    return self.ref is not None

  @property
  def is_const(self) -> bool:
    return self.const is not None

  def value(self):
    c = self.const
    return c.get() if isinstance(c, Lazy) else c


def none(shape, dtype, kind: int | None, origin=None) -> Rel:
  """A value with no old counterpart."""
  return Rel(tuple(shape), dtype, whole=kind, origin=origin)


class Lazy:
  """A constant evaluated only when a rule asks for it."""

  __slots__ = ("fn", "_value", "_done")

  def __init__(self, fn):
    self.fn, self._value, self._done = fn, None, False

  def get(self):
    if not self._done:
      try:
        v = self.fn()
        self._value = None if v is None else np.asarray(v)
      except Exception:  # folding is an optimisation; unknown is always safe
        self._value = None
      self._done = True
    return self._value


def same_coef(a: float, b: float, rtol: float = 1e-6) -> bool:
  return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30)
