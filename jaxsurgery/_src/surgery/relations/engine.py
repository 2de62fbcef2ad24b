"""The relation pass: interprets the new program against the old one.

Each eqn of the new program is paired with the eqn of the old program that
computes the same thing (same primitive, operands that correspond), and a rule
per primitive family says how the relation of its operands carries to its
outputs (see :mod:`values`). Where the old positions stop being related, the
rule records a :class:`Site`; where a fresh element must be zero for them to
stay related, it records a decision (``zero``) that the next round applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxsurgery._src import compat

from . import maps as A
from .oldside import OldSide
from .values import BCAST, CONST, MEAN, MEAN2, NONFIN, NOVEL, ZERO, Lazy, Rel, Site, join, none, same_coef

Rule = Callable[["Scope", Any, list[Rel]], list[Rel]]
RULES: dict[str, Rule] = {}


def rule(*names: str):
  def register(fn):
    for n in names:
      RULES[n] = fn
    return fn
  return register


@dataclasses.dataclass
class Decisions:
  """What the planner does to fresh elements: zeroed slabs and whole leaves, scaled leaves."""

  zero_axes: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # param -> axes
  zero_whole: set[int] = dataclasses.field(default_factory=set)
  scale: dict[int, float] = dataclasses.field(default_factory=dict)
  mean_axes: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # new positions := mean
  no_scale: set[int] = dataclasses.field(default_factory=set)  # rescaling these did not cancel
  noise: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # zero-sum noise between clones
  fold: dict[int, tuple] = dataclasses.field(default_factory=dict)  # bias -> folded constant terms

  def copy(self) -> Decisions:
    return Decisions({k: set(v) for k, v in self.zero_axes.items()}, set(self.zero_whole), dict(self.scale),
                     {k: set(v) for k, v in self.mean_axes.items()}, set(self.no_scale),
                     {k: set(v) for k, v in self.noise.items()}, dict(self.fold))

  def add_zero(self, param: int, axis: int | None) -> bool:
    if axis is None:
      if param in self.zero_whole:
        return False
      self.zero_whole.add(param)
      return True
    axes = self.zero_axes.setdefault(param, set())
    if axis in axes:
      return False
    axes.add(axis)
    return True

  def __eq__(self, other):
    return (self.zero_axes == other.zero_axes and self.zero_whole == other.zero_whole
            and self.scale == other.scale and self.mean_axes == other.mean_axes
            and self.no_scale == other.no_scale and self.noise == other.noise and self.fold == other.fold)


class Pass:
  """One round over the new program with fixed decisions."""

  def __init__(self, decisions: Decisions, param_fresh: Sequence[bool], allow_mean: bool = True):
    self.allow_mean = allow_mean
    self.mean_demands: list[tuple] = []
    self.decisions = decisions
    self.new_decisions = decisions.copy()
    self.param_fresh = list(param_fresh)  # whole leaf fresh (no old counterpart)
    self.param_shapes: list = []
    self.param_uses: dict[int, int] = {}
    self.forcing: set = set()  # (param, axis) zeros that some contraction needs as they are
    self.forcing_whole: set = set()  # fresh leaves whose zeros keep a sum with old values exact
    self.pairs: dict[int, int] = {}  # new param index -> old param index
    self.sites: dict[tuple, Site] = {}
    self.failures: list[Site] = []  # demands that could not be met
    self.demands: list[tuple[Scope, Any, tuple, Site]] = []
    self.scale_demands: list[tuple] = []
    self.assumptions: set[str] = set()
    self.frees: dict[tuple[int, int], A.Free] = {}
    self.pull_seen: set | None = None  # (scope, var, region) keys visited by a pull-back
    self.presets: dict = {}  # (param, axis) -> map an output name decided (for the next run)

  def site(self, s: Site) -> Site:
    key = (s.primitive, id(s._eqn) if s._eqn is not None else s.where, s.reason)
    return self.sites.setdefault(key, s)

  def issue(self, item) -> None:
    """Turns a pending condition of an output's relation into a demand or a decision."""
    kind = item[0]
    if kind == "demand":
      self.demands.append(item[1:])
    elif kind == "sdemand":
      self.scale_demands.append(item[1:])
    elif kind == "mdemand":
      self.mean_demands.append(item[1:])
    elif kind == "scale":
      self.decide_scale(item[1][0], item[2], item[3])
    elif kind == "fold":
      self.new_decisions.fold[item[1]] = item[2]
    elif kind == "noise":
      self.new_decisions.noise.setdefault(item[1][0], set()).update(a for a in item[2] if a is not None)
    else:
      self.decide_zero(item[1], item[2])

  def single_use(self, param: int) -> bool:
    return self.param_uses.get(param, 0) <= 1

  def can_scale(self, param: int) -> bool:
    return not self.param_fresh[param] and param not in self.decisions.no_scale

  def decide_scale(self, param: int, factor: float, site: Site, pulled: bool = False) -> None:
    """Rescale a trained parameter.

    Rescale a trained parameter. A rescaling pulled back from a later op is tried once: if the demand comes back, it
    did not cancel (a normalisation in between) and is withdrawn.
    """
    if param in self.decisions.no_scale:
      return
    if pulled and param in self.decisions.scale:
      self.new_decisions.scale.pop(param, None)
      self.new_decisions.no_scale.add(param)
      self.failures.append(self.site(Site(site.primitive, "rescaling a parameter upstream does not "
                                                          "cancel this scale (a normalisation lies between)",
                                          site.where)))
      return
    have = self.new_decisions.scale.get(param)
    base = self.decisions.scale.get(param, 1.0)
    want = base * factor
    if have is not None and have != base and abs(have - want) > 1e-6 * abs(want):
      self.failures.append(self.site(Site(site.primitive, f"a parameter would need two different "
                                                          f"scales ({have:.6g} and {want:.6g})", site.where)))
      return
    self.new_decisions.scale[param] = want

  def decide_zero(self, origin, value_axis: int | None) -> bool:
    """Zero the new positions of the parameter behind ``origin`` along ``value_axis``."""
    if origin is None:
      return False
    param, axes = origin
    if value_axis is None or self.param_fresh[param]:
      self.new_decisions.add_zero(param, None)
      return True
    axis = axes[value_axis]
    if axis is None:
      return False
    if axis in self.new_decisions.mean_axes.get(param, ()):
      return True  # average expansion: the mean is what these positions hold
    self.new_decisions.add_zero(param, axis)
    return True

  def decide_mean(self, origin, value_axis: int) -> bool:
    """Fill the new positions of the parameter behind ``origin`` with its mean along the axis."""
    if origin is None or self.param_fresh[origin[0]]:
      return False
    param, axes = origin
    axis = axes[value_axis]
    if axis is None:
      return False
    self.new_decisions.mean_axes.setdefault(param, set()).add(axis)
    zeroed = self.new_decisions.zero_axes.get(param)
    if zeroed:
      zeroed.discard(axis)
      if not zeroed:
        del self.new_decisions.zero_axes[param]
    return True


class Scope:
  """A (new jaxpr, old jaxpr) pair being related: one body, with its environment."""

  def __init__(self, pass_: Pass, jaxpr, old: OldSide, parent: tuple | None = None):
    self.P = pass_
    self.jaxpr = jaxpr
    self.old = old
    self.env: dict[Any, Rel] = {}
    self.producer: dict[int, Any] = {}
    self.parent = parent  # (outer scope, outer eqn, kind) for pull-back across bodies
    self.bodies: dict[int, list[Scope]] = {}  # id(eqn) -> the scopes of its bodies

  def call_operand(self, var) -> tuple[Scope, Any] | None:
    """``(enclosing scope, operand)`` if ``var`` is an input of this call body, else None."""
    if self.parent is None or self.parent[2] != "call":
      return None
    k = next((i for i, v in enumerate(self.jaxpr.invars) if v is var), None)
    return None if k is None else (self.parent[0], self.parent[1].invars[k])

  # -- reading ------------------------------------------------------------
  def read(self, atom) -> Rel:
    if isinstance(atom, compat.Literal):
      v = np.asarray(atom.val)
      return Rel(tuple(v.shape), v.dtype, const=v)
    return self.env[atom]

  def run(self, args: Sequence[Rel]) -> list[Rel]:
    for v, r in zip(self.jaxpr.invars, args):
      self.env[v] = r
    for eqn in self.jaxpr.eqns:
      ins = [self.read(v) for v in eqn.invars]
      outs = self.apply(eqn, ins)
      for v, r in zip(eqn.outvars, outs):
        if not isinstance(v, compat.DropVar):
          self.env[v] = r
          self.producer[id(v)] = eqn
    return [self.read(v) for v in self.jaxpr.outvars]

  def apply(self, eqn, ins: list[Rel]) -> list[Rel]:
    if all(r.is_const for r in ins) and not eqn.effects and eqn.primitive.name not in _NO_FOLD:
      return _fold(eqn, ins)
    fn = RULES.get(eqn.primitive.name, congruence)
    self.pending_now: list[tuple] = []
    outs = fn(self, eqn, ins)
    if any(r.missing or r.deficit for r in ins if r.related) and eqn.primitive.name not in _FOLD_OK:
      s = self.site(eqn, "a removed feature declared constant reaches an op whose contribution "
                         "cannot be folded into a bias")
      outs = [dataclasses.replace(o, broken=o.broken or s, missing=(), deficit=()) if o.related else o
              for o in outs]
    if any(r.extras for r in ins if r.related) and eqn.primitive.name not in _EXTRAS_OK:
      s = self.site(eqn, "an additive term from average expansion does not pass through this op")
      outs = [dataclasses.replace(o, broken=o.broken or s, extras=()) if o.related else o for o in outs]
    if any(o.whole == ZERO for o in outs):
      by = frozenset().union(*(r.zeroed_by for r in ins if r.whole == ZERO))
      if by:
        outs = [dataclasses.replace(o, zeroed_by=o.zeroed_by | by) if o.whole == ZERO else o for o in outs]
    items = tuple(self.pending_now) + tuple(x for r in ins for x in r.pending)
    approx = tuple(dict.fromkeys(x for r in ins for x in r.approx))
    if not items and not approx:
      return outs
    return [dataclasses.replace(o, pending=_dedupe(o.pending + items),
                                approx=tuple(dict.fromkeys(o.approx + approx))) if o.related else o
            for o in outs]

  # -- pairing --------------------------------------------------------------
  def pair(self, eqn, ins: Sequence[Rel]):
    """The old eqn computing what ``eqn`` computes from the corresponding operands, or None."""
    refs = [(k, r.ref) for k, r in enumerate(ins) if r.related]
    if not refs:
      return None
    name = eqn.primitive.name
    cands = self.old.candidates(name, refs)
    cands = [i for i in cands if len(self.old.jaxpr.eqns[i].invars) == len(eqn.invars)]
    if not cands:
      return None
    free = [i for i in cands if i not in self.old.paired]
    i = (free or cands)[0]
    self.old.paired.add(i)
    return self.old.jaxpr.eqns[i]

  def site(self, eqn, reason: str) -> Site:
    return self.P.site(Site(eqn.primitive.name, reason, eqn=eqn))

  def demand(self, eqn, k: int, region: tuple, s: Site) -> None:
    """The outputs' relation needs operand ``k`` of ``eqn`` to be zero on ``region``.

    It stays a condition of the outputs' relation; only if that relation is needed at a
    model output is it pulled back to fresh parameters (so a new branch that is zeroed
    where it is written back does not also get zeroed where it starts).
    """
    self.pending_now.append(("demand", self, eqn.invars[k], region, s))

  def require_zero(self, origin, axis: int | None, s: Site) -> None:
    """The outputs' relation needs the new positions of a parameter along ``axis`` to be zero."""
    self.pending_now.append(("decide", origin, axis, s))

  def old_const(self, atom):
    return self.old.value(atom)


# Rules that carry (or refuse) the constants of removed features themselves.
_FOLD_OK = frozenset({"add", "sub", "mul", "div", "max", "min", "neg", "abs", "sqrt", "rsqrt", "exp",
                      "log", "tanh", "logistic", "square", "integer_pow", "convert_element_type",
                      "broadcast_in_dim", "dot_general", "copy", "copy_p", "pow", "transpose",
                      "squeeze"})
# Rules that carry (or refuse) the additive terms of average expansion themselves.
_EXTRAS_OK = frozenset({"add", "sub", "add_any", "mul", "div", "neg", "convert_element_type",
                        "reshape", "broadcast_in_dim", "squeeze", "copy", "copy_p", "stop_gradient",
                        "abs", "exp", "log", "tanh", "logistic", "sqrt", "rsqrt", "square",
                        "integer_pow", "max", "min", "select_n"})
_NO_FOLD = frozenset({"rng_bit_generator", "random_bits", "random_seed", "random_split",
                      "random_fold_in", "random_wrap", "random_unwrap", "iota_2x32_shape"})


def _dedupe(items: tuple) -> tuple:
  seen, out = set(), []
  for it in items:
    key = (it[0],) + tuple(id(x) if not isinstance(x, (int, str, tuple, type(None))) else x for x in it[1:-1])
    if key not in seen:
      seen.add(key)
      out.append(it)
  return tuple(out)


def _scope(eqn) -> str:
  try:
    return str(eqn.source_info.name_stack)
  except Exception:
    return ""


def _fold(eqn, ins: list[Rel]) -> list[Rel]:
  cache: dict = {}

  def evaluate():
    if "v" not in cache:
      args = [r.value() for r in ins]
      if any(a is None for a in args) or any(
          int(np.prod(o.aval.shape, dtype=np.int64)) > (1 << 22) for o in eqn.outvars):
        cache["v"] = None
      else:
        try:
          cache["v"] = [np.asarray(o) for o in compat.bind(eqn, args)]
        except Exception:
          cache["v"] = None
    return cache["v"]

  outs = []
  for j, o in enumerate(eqn.outvars):
    outs.append(Rel(tuple(o.aval.shape), o.aval.dtype,
                    const=Lazy(lambda j=j: None if evaluate() is None else evaluate()[j])))
  return outs


def out_shape(eqn, j: int = 0) -> tuple[int, ...]:
  return tuple(eqn.outvars[j].aval.shape)


def broken_out(eqn, ins: Sequence[Rel], s: Site, j: int = 0, ref=None, maps=None) -> Rel:
  """An output whose old positions are not related (kept related by ``ref`` for the report)."""
  shape = out_shape(eqn, j)
  kind = join(*[r.whole if r.whole is not None else NOVEL for r in ins] or [NOVEL])
  if ref is None:
    return none(shape, eqn.outvars[j].aval.dtype, join(kind, NOVEL))
  return Rel(shape, eqn.outvars[j].aval.dtype, ref=ref, maps=maps, broken=s,
             slab=tuple(NOVEL for _ in shape))


def first_broken(ins: Sequence[Rel]) -> Site | None:
  for r in ins:
    if r.broken is not None:
      return r.broken
  return None


# -- the fallback: congruence -----------------------------------------------------

def congruence(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  """Same primitive, same parameters, operands equal to the old ones -> outputs equal.

  Sound for any primitive: it claims nothing where shapes, maps or scales differ.
  """
  name = eqn.primitive.name
  if any(not r.related and not r.is_const for r in ins):
    kind: int | None = NOVEL
    if name in _ZERO_PRESERVING_UNARY and len(ins) == 1:
      kind = ins[0].whole
    return [none(out_shape(eqn, j), o.aval.dtype, kind) for j, o in enumerate(eqn.outvars)]
  old = S.pair(eqn, ins)
  why = None
  if old is None:
    why = "no matching operation in the old program"
  elif not _same_params(eqn, old):
    why = f"its parameters differ from the old program's ({_param_diff(eqn, old)})"
  else:
    for k, r in enumerate(ins):
      if r.is_const:
        if not _equal_const(r, S.old_const(old.invars[k])):
          why = "a constant operand differs from the old program's"
          break
      elif not all(A.pin_identity(m) for m in r.maps) or not same_coef(r.coef, 1.0):
        why = "its operands moved, grew or were rescaled, and jaxsurgery has no finer rule for it"
        break
  b = first_broken(ins)
  outs = []
  for j, o in enumerate(eqn.outvars):
    shape = tuple(o.aval.shape)
    ref = None if old is None else old.outvars[j]
    if why is not None:
      s = S.site(eqn, why)
      outs.append(broken_out(eqn, ins, s, j, ref=ref, maps=tuple(A.identity(n) for n in shape)))
    else:
      outs.append(Rel(shape, o.aval.dtype, ref=ref, maps=tuple(A.identity(n) for n in shape),
                      broken=b, slab=tuple(ZERO for _ in shape)))
  return outs


def _same_params(a, b) -> bool:
  pa, pb = a.params, b.params
  if set(pa) != set(pb):
    return False
  for k in pa:
    x, y = pa[k], pb[k]
    if isinstance(x, (compat.Jaxpr, compat.ClosedJaxpr)):
      continue
    try:
      if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        if not np.array_equal(x, y):
          return False
      elif x != y:
        return False
    except Exception:
      return False
  return True


def _param_diff(a, b) -> str:
  keys = [k for k in a.params if k in b.params and not isinstance(a.params[k], (compat.Jaxpr, compat.ClosedJaxpr))]
  for k in keys:
    try:
      if a.params[k] != b.params[k]:
        return f"{k}: {b.params[k]} -> {a.params[k]}"
    except Exception:
      pass
  return "parameters"


def _equal_const(r: Rel, old) -> bool:
  v = r.value()
  if v is None or old is None:
    return False
  try:
    return v.shape == np.shape(old) and bool(np.array_equal(v, old, equal_nan=True))
  except TypeError:
    return bool(np.array_equal(v, old))


_ZERO_PRESERVING_UNARY = frozenset({
    "neg", "abs", "sin", "tan", "tanh", "asin", "atan", "sinh", "asinh", "atanh", "erf", "sqrt",
    "cbrt", "sign", "floor", "ceil", "round", "expm1", "log1p", "convert_element_type", "copy",
    "copy_p", "stop_gradient", "reduce_precision", "real", "imag", "square", "conj",
    "optimization_barrier", "erf_inv"})


_LINEAR_UNARY = frozenset({"neg", "convert_element_type", "copy", "copy_p", "stop_gradient",
                           "optimization_barrier", "real", "reduce_precision"})


def map_kind(kind: int | None, prim: str, params) -> int | None:
  """What ``prim`` makes of new positions holding ``kind`` (unary ops)."""
  if kind is None or kind in (NOVEL, NONFIN, BCAST):
    return kind
  if kind in (MEAN, MEAN2):
    if prim in _LINEAR_UNARY:
      return kind
    if kind == MEAN and (prim == "square" or prim == "integer_pow" and params["y"] == 2):
      return MEAN2
    return CONST
  if kind == ZERO:
    if prim in _ZERO_PRESERVING_UNARY:
      return ZERO
    if prim == "integer_pow":
      return ZERO if params["y"] > 0 else NONFIN
    if prim in ("log", "rsqrt", "reciprocal", "digamma", "lgamma"):
      return NONFIN
    return CONST
  return CONST


def as_related(S: Scope, r: Rel, old_atom) -> Rel | None:
  """A constant operand seen as a related value, or None.

  A constant operand seen as a related value: uniform constants (zeros, ones) fit any map; others must equal the old
  constant. None if neither holds.
  """
  if r.related or not r.is_const:
    return r
  vn, vo = r.value(), S.old_const(old_atom) if old_atom is not None else None
  if vn is None or vo is None:
    return None
  un, uo = _uniform_value(vn), _uniform_value(vo)
  kind = ZERO if not np.any(vn) else CONST
  if un is not None and uo is not None:
    if uo == 0:
      if un != 0:
        return None
      coef = 1.0
    else:
      coef = float(un / uo)
    maps = tuple(A.Bcast(n, o) for n, o in zip(r.shape, np.shape(vo)))
    return Rel(r.shape, r.dtype, ref=old_atom, maps=maps, coef=coef, slab=tuple(kind for _ in r.shape))
  if np.shape(vn) == np.shape(vo) and np.array_equal(vn, vo):
    return Rel(r.shape, r.dtype, ref=old_atom, maps=tuple(A.identity(n) for n in r.shape),
               slab=tuple(ZERO for _ in r.shape))
  return None


def _uniform_value(v):
  flat = np.asarray(v).reshape(-1)
  if flat.size and (flat == flat[0]).all():
    return flat[0]
  return None
