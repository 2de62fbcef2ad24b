"""The mask interpreter: walks a jaxpr eqn by eqn, applying dependency rules.

Every jaxpr variable is bound to a :class:`~jaxsurgery._src.core.values.Val`. A
rule maps the input ``Val``s of an eqn to output ``Val``s and records touches on
parameter-derived operands through ``ctx.touch``. A primitive without a rule gets
the conservative dense rule (:func:`jaxsurgery._src.rules.opaque.dense`), with a
warning, or an error in strict mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import RuleError, UnknownPrimitiveError, UnknownPrimitiveWarning
from jaxsurgery._src.core.values import Lazy, Pull, Val
from jaxsurgery._src.rules import opaque, registry

# Constant folding is skipped for values larger than this (elements).
_MAX_FOLD = 1 << 22


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
  """State of one analysis: feature count, touches on parameters, options.

  Rules receive it as ``ctx``: they read ``ctx.W`` (words per packed mask) and
  ``ctx.num_features``, record touches with :meth:`touch` and interpret
  sub-jaxprs with :meth:`run`.

  Args:
    num_features: number of named features (bits per mask).
    param_shapes: the shape of every parameter leaf, in flattening order.
    strict: raise :class:`UnknownPrimitiveError` for a primitive without a rule
      instead of warning and using the dense rule.
    rules: ``{primitive name: rule}``; default: the registry's active rules.
  """

  def __init__(self, num_features: int, param_shapes: Sequence[tuple[int, ...]], strict: bool,
               rules: Mapping[str, Any] | None = None):
    self.num_features = num_features
    self.W = M.num_words(num_features)
    self.param_shapes = list(param_shapes)
    self.param_touch: list[np.ndarray | None] = [None] * len(param_shapes)
    self.strict = strict
    self.version = 0  # number of touches that added bits to the table (diagnostics)
    self.unknown: dict[str, int] = {}
    self.rules = rules if rules is not None else registry.active_rules()
    self.eqn: Any = None  # the eqn whose rule is running (named by RuleError)
    self.dry = False  # a run whose contacts other runs record (a scan's confirming run): touches are dropped

  # -- touches -------------------------------------------------------------
  def param_pull(self, index: int) -> Pull:
    """The provenance of parameter leaf ``index``: touches are ORed into its table entry."""
    shape = self.param_shapes[index]

    def pull(t):
      t = M.unbroadcast(M.lift(t, len(shape)), shape)
      if M.is_empty(t):
        return
      if any(s not in (1, n) for s, n in zip(t.shape[:-1], shape)):
        self._bad_touch(t, index, shape)
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

  def _bad_touch(self, t: np.ndarray, index: int, shape: tuple[int, ...]) -> None:
    eqn = self.eqn
    name = "?" if eqn is None else eqn.primitive.name
    where = "" if eqn is None else compat.source_line(eqn)
    raise RuleError(
        f"The dependency rule of primitive `{name}`{f' (at {where})' if where else ''} recorded a "
        f"touch of shape {t.shape[:-1]} on parameter leaf {index} of shape {shape}: a bug in that "
        f"rule (or in a rule that produced one of its operands' provenance). If it is your rule "
        f"(register_rule / override_rule), check the shapes its pulls pass back; otherwise report "
        f"it, and use `js.override_rule({name!r}, js.rules.dense)` meanwhile.")

  def touch(self, val: Val, mask: np.ndarray | None) -> None:
    """Records that ``val`` takes part in an operation with values of ``mask`` (not in a dry run)."""
    if self.dry or val.pull is None or mask is None or M.is_empty(mask):
      return
    val.pull(M.lift(mask, val.ndim))

  # -- evaluation ----------------------------------------------------------
  def run(self, jaxpr: compat.Jaxpr, consts: Sequence[Val], args: Sequence[Val]) -> list[Val]:
    """Interprets ``jaxpr`` on the given values; returns the ``Val`` of every output."""
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

  def apply(self, eqn: Any, invals: list[Val]) -> list[Val]:
    """The output ``Val``s of one eqn: folded if constant, else by its rule."""
    if self._foldable(eqn, invals):
      cache: dict[str, Any] = {}
      args = [v.const for v in invals]
      return [Val(tuple(o.aval.shape), o.aval.dtype, const=Lazy(eqn, args, i, cache))
              for i, o in enumerate(eqn.outvars)]
    name = eqn.primitive.name
    rule = self.rules.get(name)
    if rule is None:
      rule = self._fallback(name)
    outer, self.eqn = self.eqn, eqn
    try:
      return rule(self, eqn, invals)
    finally:
      self.eqn = outer

  def _fallback(self, name: str):
    """The conservative rule for a primitive without one (an error in strict mode)."""
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
          UnknownPrimitiveWarning, stacklevel=5)
    self.unknown[name] = self.unknown.get(name, 0) + 1
    return opaque.dense

  @staticmethod
  def _foldable(eqn: Any, invals: Sequence[Val]) -> bool:
    if eqn.effects or not all(v.const is not None for v in invals):
      return False
    return all(int(np.prod(o.aval.shape, dtype=np.int64)) <= _MAX_FOLD for o in eqn.outvars)
