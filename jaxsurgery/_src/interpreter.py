"""The mask interpreter: walks a jaxpr eqn by eqn, applying dependency rules.

Every jaxpr variable gets a :class:`Val`:

* ``mask``  -- its forward dependency mask (packed, compressed; ``None`` = empty);
* ``pull``  -- its provenance: a callable that receives *touches* recorded on the
  value and carries them back to the parameter elements it was derived from
  (``None`` when the value does not come from parameters);
* ``const`` -- a lazily evaluated concrete value for values computed only from
  literals and closed-over constants (used for static indices).

A rule maps the input ``Val``s of an eqn to output ``Val``s and records touches
on parameter-derived operands through ``ctx.touch``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src import masks as M
from jaxsurgery._src.rules import registry

Pull = Callable[[np.ndarray], None]

# Constant folding is skipped for values larger than this (elements).
_MAX_FOLD = 1 << 22


class UnknownPrimitiveWarning(UserWarning):
  """A primitive without a dependency rule got the conservative dense rule."""


class UnknownPrimitiveError(NotImplementedError):
  """Raised in strict mode for a primitive without a dependency rule."""


class Lazy:
  """A constant-foldable value: evaluated only if a rule asks for it."""

  __slots__ = ("eqn", "args", "index", "_cache")

  def __init__(self, eqn, args, index, cache):
    self.eqn, self.args, self.index, self._cache = eqn, args, index, cache

  def _done(self) -> bool:
    return "value" in self._cache

  def _evaluate(self) -> None:
    args = [a.get() if isinstance(a, Lazy) else a for a in self.args]  # all already cached
    value = None
    if not any(a is None for a in args):
      try:
        value = [np.asarray(o) for o in compat.bind(self.eqn, args)]
      except Exception:  # folding is an optimisation; "unknown" is always sound
        value = None
    self._cache["value"] = value

  def get(self) -> np.ndarray | None:
    """The folded value (``None`` if it cannot be computed, e.g. typed PRNG keys).

    Dependencies are evaluated with an explicit stack, so long chains of
    constant operations cannot exhaust Python's recursion limit.
    """
    stack = [self]
    while stack:
      node = stack[-1]
      if node._done():
        stack.pop()
        continue
      pending = [a for a in node.args if isinstance(a, Lazy) and not a._done()]
      if pending:
        stack.extend(pending)
        continue
      node._evaluate()
      stack.pop()
    value = self._cache["value"]
    return None if value is None else value[self.index]


@dataclasses.dataclass(frozen=True, eq=False)
class Val:
  shape: tuple[int, ...]
  dtype: Any
  mask: np.ndarray | None = None
  pull: Pull | None = None
  const: Any = None  # np.ndarray | Lazy | None

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def concrete(self) -> np.ndarray | None:
    """The concrete value, if it is a known constant."""
    c = self.const
    return c.get() if isinstance(c, Lazy) else c


def join_pulls(*pulls: Pull | None) -> Pull | None:
  present = [p for p in pulls if p is not None]
  if not present:
    return None
  if len(present) == 1:
    return present[0]

  def pull(t):
    for p in present:
      p(t)
  return pull


def _frozen(t: np.ndarray) -> np.ndarray:
  """A read-only array for the table: a view of ``t``, or a copy if ``t`` views a larger array.

  Rules never write into masks, so sharing memory with the value masks is safe; the
  view is read-only so that no caller of the table can write through it either,
  and a copy keeps a large intermediate from staying alive behind a small touch.
  (Copying every touch cost one full pass over the largest masks.)
  """
  base = t
  while isinstance(base.base, np.ndarray):
    base = base.base
  t = t.copy() if base is not t and base.nbytes > t.nbytes else t.view()
  t.flags.writeable = False
  return t


class Context:
  """State of one analysis: feature count, touches on parameters, options."""

  def __init__(self, num_features: int, param_shapes: Sequence[tuple[int, ...]], strict: bool,
               rules: dict[str, Any] | None = None):
    self.num_features = num_features
    self.W = M.num_words(num_features)
    self.param_shapes = list(param_shapes)
    self.param_touch: list[np.ndarray | None] = [None] * len(param_shapes)
    self.strict = strict
    self.version = 0  # number of touches that added bits to the table (diagnostics)
    self.unknown: dict[str, int] = {}
    self.rules = rules if rules is not None else registry.active_rules()

  # -- touches -------------------------------------------------------------
  def param_pull(self, index: int) -> Pull:
    shape = self.param_shapes[index]

    def pull(t):
      t = M.unbroadcast(M.lift(t, len(shape)), shape)
      if M.is_empty(t):
        return
      if any(s not in (1, n) for s, n in zip(t.shape[:-1], shape)):
        raise AssertionError(f"touch of shape {t.shape[:-1]} on parameter {index} of shape {shape}")
      old = self.param_touch[index]
      if old is None:
        new = _frozen(M.compress(t))
      elif not np.bitwise_and(t, np.bitwise_not(old)).any():
        return  # nothing new (no broadcast OR materialised)
      else:
        new = _frozen(M.compress(np.bitwise_or(old, t)))
      self.version += 1
      self.param_touch[index] = new
    return pull

  def touch(self, val: Val, mask: np.ndarray | None) -> None:
    """Records that ``val`` takes part in an operation with values of ``mask``."""
    if val.pull is None or M.is_empty(mask):
      return
    val.pull(M.lift(mask, val.ndim))

  # -- evaluation ----------------------------------------------------------
  def run(self, jaxpr: compat.Jaxpr, consts: Sequence[Val], args: Sequence[Val]) -> list[Val]:
    env: dict[Any, Val] = {}

    def read(v) -> Val:
      if isinstance(v, compat.Literal):
        val = np.asarray(v.val)
        return Val(tuple(val.shape), val.dtype, const=val)
      return env[v]

    for var, val in zip(jaxpr.constvars, consts):
      env[var] = val
    for var, val in zip(jaxpr.invars, args):
      env[var] = val
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      outs = self.apply(eqn, invals)
      for var, val in zip(eqn.outvars, outs):
        if not isinstance(var, compat.DropVar):
          env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def apply(self, eqn, invals: list[Val]) -> list[Val]:
    if self._foldable(eqn, invals):
      cache: dict[str, Any] = {}
      args = [v.const for v in invals]
      return [Val(tuple(o.aval.shape), o.aval.dtype, const=Lazy(eqn, args, i, cache))
              for i, o in enumerate(eqn.outvars)]
    name = eqn.primitive.name
    rule = self.rules.get(name)
    if rule is None:
      if self.strict:
        raise UnknownPrimitiveError(
            f"jaxsurgery has no dependency rule for primitive {name!r} (strict=True). Register one "
            f"with jaxsurgery.register_rule({name!r}, rule) or use strict=False to fall back to the "
            f"conservative dense rule.")
      if name not in self.unknown:
        warnings.warn(
            f"jaxsurgery: no dependency rule for primitive {name!r}; using the conservative rule "
            f"(every output depends on every input, every parameter operand is touched by all of "
            f"them). Register a precise rule with jaxsurgery.register_rule({name!r}, ...).",
            UnknownPrimitiveWarning, stacklevel=4)
      self.unknown[name] = self.unknown.get(name, 0) + 1
      rule = registry.DENSE_RULE
    return rule(self, eqn, invals)

  @staticmethod
  def _foldable(eqn, invals) -> bool:
    if eqn.effects or not all(v.const is not None for v in invals):
      return False
    return all(int(np.prod(o.aval.shape, dtype=np.int64)) <= _MAX_FOLD for o in eqn.outvars)


def out_val(outvar, mask=None, pull=None) -> Val:
  return Val(tuple(outvar.aval.shape), outvar.aval.dtype, mask=mask, pull=pull)
