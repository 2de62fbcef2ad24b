"""Pull-back of demands: a value that must be zero becomes zeroed fresh parameter elements.

A demand says "this value must be zero here" (the output of an inserted block
that is added to the residual stream, novel values summed into old ones). It is
carried back through the program to the fresh parameter elements that make it
zero: through sums (every summand), products (one factor, preferably a
parameter: "zero out"), ops with ``f(0) = 0`` and data movement. The parameter
closest to the demand wins, so an inserted block's output projection is zeroed
and its inner layers keep their init (they get gradient one step later).
"""

from __future__ import annotations

from jaxsurgery._src import compat

from .elementwise import SUMS
from .engine import Pass, Scope
from .values import CONST, MEAN, ZERO, Rel, Site

_UNARY_ZERO = frozenset({
    "neg", "sin", "tan", "tanh", "asin", "atan", "sinh", "asinh", "atanh", "erf", "cbrt", "sign",
    "floor", "ceil", "round", "expm1", "log1p", "convert_element_type", "copy", "copy_p",
    "stop_gradient", "reduce_precision", "real", "imag", "conj", "optimization_barrier", "erf_inv",
    "square", "integer_pow", "abs", "sqrt"})
_VIEWS = frozenset({"transpose", "broadcast_in_dim", "reshape", "squeeze", "slice", "rev", "pad",
                    "dynamic_slice", "reduce_sum", "copy_p", "gather", "cumsum", "reduce_max",
                    "reduce_min"})
_MAX_DEPTH = 400


def pull_back(P: Pass) -> None:
  P.pull_seen = set()
  for S, var, region, site in list(P.demands):
    _pull(P, S, var, region, site, 0)


class DryRun:
  """Stands in for the pass during a trial pull-back: records decisions, applies none."""

  def __init__(self, P: Pass):
    self.P = P
    self.zeros: list[tuple] = []
    self.failures: list[str] = []
    self.param_fresh = P.param_fresh
    self.new_decisions = P.new_decisions
    self.pull_seen: set | None = None  # set by trial()
    self.multiplicative = False

  def decide_zero(self, origin, axis) -> bool:
    param, axes = origin
    if axis is not None and axes[axis] is None:
      return False
    if axis is not None and axes[axis] in self.P.new_decisions.mean_axes.get(param, ()):
      return False
    self.zeros.append((param, None if axis is None or self.param_fresh[param] else axes[axis]))
    return True

  def site(self, s):
    return s


def trial(P: Pass, S: Scope, var, region):
  """The zero decisions that would make ``var`` zero on ``region``, or None.

  ``(zero decisions, whether a product was zeroed)`` that would make ``var`` zero on ``region`` (none taken), or None
  if that cannot be done.
  """
  dry = DryRun(P)
  dry.pull_seen = set()
  dry.multiplicative = False
  _pull(dry, S, var, region, Site("trial", ""), 0)
  return None if dry.failures else (sorted(set(dry.zeros), key=str), dry.multiplicative)


def _is_zero(r: Rel, region) -> bool:
  if r.is_const:
    v = r.value()
    return v is not None and not v.any()
  if not r.related:
    return r.whole == ZERO
  if region[0] == "whole":
    return False
  return r.slab[region[1]] == ZERO


def _fail(P: Pass | DryRun, S: Scope, eqn, site: Site, why: str) -> None:
  if isinstance(P, DryRun):
    P.failures.append(why)
    return
  where = compat.source_line(eqn) if eqn is not None else ""
  P.failures.append(P.site(Site(eqn.primitive.name if eqn is not None else "input",
                                f"{why} (needed because {site.describe()})", where)))


def _pull(P: Pass | DryRun, S: Scope, var, region, site: Site, depth: int) -> None:
  if isinstance(var, compat.Literal) or depth > _MAX_DEPTH:
    return
  seen = getattr(P, "pull_seen", None)
  if seen is None:
    seen = P.pull_seen = set()
  key = (id(S), id(var), region)
  if key in seen:
    return  # loops reach the same carry again; once is enough
  seen.add(key)
  r = S.env.get(var)
  if r is None:
    if isinstance(P, DryRun):
      P.failures.append("not computed yet")  # a loop carry's next value: unknown during the pass
    return
  if _is_zero(r, region):
    return
  if r.origin is not None:
    axis = None if region[0] == "whole" else region[1]
    if axis is None and not P.param_fresh[r.origin[0]]:
      if r.related:
        _fail(P, S, S.producer.get(id(var)), site, "a trained parameter would have to be zeroed")
        return
    if P.decide_zero(r.origin, axis):
      return
  eqn = S.producer.get(id(var))
  if eqn is None:
    _pull_invar(P, S, var, region, site, depth)
    return
  prim = eqn.primitive.name
  ins = [S.read(v) for v in eqn.invars]
  if prim in SUMS or prim == "select_n" or prim == "add_any":
    start = 1 if prim == "select_n" else 0
    for k in range(start, len(ins)):
      _pull(P, S, eqn.invars[k], _operand_region(region, ins[k], r), site, depth + 1)
    return
  if prim in ("mul", "div", "dot_general", "conv_general_dilated"):
    if isinstance(P, DryRun):
      P.multiplicative = True
    k, reg = _factor(eqn, ins, region, r)
    if k is None:
      _fail(P, S, eqn, site, "no factor of this product can be zeroed")
      return
    _pull(P, S, eqn.invars[k], reg, site, depth + 1)
    return
  if prim in _UNARY_ZERO or prim in _VIEWS or prim == "concatenate":
    for k, reg in _view_regions(eqn, ins, region, r):
      _pull(P, S, eqn.invars[k], reg, site, depth + 1)
    return
  bodies = getattr(S, "bodies", {}).get(id(eqn))
  if bodies:
    k = list(eqn.outvars).index(var)
    for B in bodies:
      if prim == "scan":
        nc, ncarry = compat.scan_counts(eqn.params)
        reg = region if k < ncarry or region[0] == "whole" else ("slab", region[1] - 1)
        if reg[0] == "slab" and reg[1] < 0:
          reg = ("whole",)
        _pull(P, B, B.jaxpr.outvars[k], reg, site, depth + 1)
      else:
        _pull(P, B, B.jaxpr.outvars[k], region, site, depth + 1)
    return
  _fail(P, S, eqn, site, f"`{prim}` cannot be made zero by zeroing fresh parameters")


def _pull_invar(P, S: Scope, var, region, site, depth) -> None:
  if S.parent is None and isinstance(P, DryRun):
    P.failures.append("input")
    return
  if S.parent is None:
    P.failures.append(P.site(Site("input", f"a model input would have to be zero (needed because "
                                           f"{site.describe()})")))
    return
  outer, eqn, kind = S.parent
  k = list(S.jaxpr.invars).index(var)
  if kind == "call":
    _pull(P, outer, eqn.invars[k], region, site, depth + 1)
  elif kind == "cond":
    _pull(P, outer, eqn.invars[k + 1], region, site, depth + 1)
  elif kind == "scan":
    nc, ncarry = compat.scan_counts(eqn.params)
    if k < nc:
      _pull(P, outer, eqn.invars[k], region, site, depth + 1)
    elif k < nc + ncarry:
      _pull(P, outer, eqn.invars[k], region, site, depth + 1)
      _pull(P, S, S.jaxpr.outvars[k - nc], region, site, depth + 1)
    else:
      reg = ("whole",) if region[0] == "whole" else ("slab", region[1] + 1)
      _pull(P, outer, eqn.invars[k], reg, site, depth + 1)
  elif kind == "while":
    bn = eqn.params["body_nconsts"]
    cn = eqn.params["cond_nconsts"]
    if k < bn:
      _pull(P, outer, eqn.invars[cn + k], region, site, depth + 1)
    else:
      _pull(P, outer, eqn.invars[cn + k], region, site, depth + 1)
      _pull(P, S, S.jaxpr.outvars[k - bn], region, site, depth + 1)


def _operand_region(region, x: Rel, out: Rel):
  if region[0] == "whole" or x.is_const:
    return ("whole",)
  off = len(out.shape) - len(x.shape)
  a = region[1] - off
  if a < 0 or x.shape[a] == 1 and out.shape[region[1]] != 1:
    return ("whole",)
  return ("slab", a)


def _factor(eqn, ins, region, out: Rel):
  """Which operand of a product to zero (and where): a parameter if one can, else a novel one."""
  prim = eqn.primitive.name
  cands = [0] if prim == "div" else list(range(len(ins)))
  regions = {k: _product_region(eqn, k, region, ins, out) for k in cands}
  cands = [k for k in cands if regions[k] is not None and not ins[k].is_const]
  params = [k for k in cands if ins[k].origin is not None and not _is_zero(ins[k], regions[k])]
  pick = params[-1:] or [k for k in cands if not ins[k].related and ins[k].whole != CONST][-1:] or cands[-1:]
  if not pick:
    return None, None
  return pick[0], regions[pick[0]]


def _product_region(eqn, k, region, ins, out: Rel):
  prim = eqn.primitive.name
  if region[0] == "whole":
    return ("whole",)
  if prim in ("mul", "div"):
    return _operand_region(region, ins[k], out)
  if prim == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    o = region[1]
    if o < len(lb):
      return ("slab", (lb if k == 0 else rb)[o])
    lfree = [a for a in range(ins[0].ndim) if a not in lc and a not in lb]
    rfree = [a for a in range(ins[1].ndim) if a not in rc and a not in rb]
    o -= len(lb)
    if o < len(lfree):
      return ("slab", lfree[o]) if k == 0 else None
    return ("slab", rfree[o - len(lfree)]) if k == 1 else None
  dn = eqn.params["dimension_numbers"]
  o = region[1]
  if o == dn.out_spec[1]:
    return ("slab", dn.rhs_spec[0]) if k == 1 else None
  if o == dn.out_spec[0]:
    return ("slab", dn.lhs_spec[0]) if k == 0 else None
  return ("whole",)


def _view_regions(eqn, ins, region, out: Rel):
  prim = eqn.primitive.name
  if region[0] == "whole":
    return [(k, ("whole",)) for k, r in enumerate(ins) if not r.is_const][:1 if prim != "concatenate" else None]
  a = region[1]
  if prim == "transpose":
    return [(0, ("slab", eqn.params["permutation"][a]))]
  if prim == "broadcast_in_dim":
    bd = list(eqn.params["broadcast_dimensions"])
    if a in bd and ins[0].shape[bd.index(a)] == out.shape[a]:
      return [(0, ("slab", bd.index(a)))]
    return [(0, ("whole",))]
  if prim == "squeeze":
    dims = sorted(d % ins[0].ndim for d in eqn.params["dimensions"])
    keep = [i for i in range(ins[0].ndim) if i not in dims]
    return [(0, ("slab", keep[a]))]
  if prim in ("reduce_sum", "reduce_max", "reduce_min"):
    axes = sorted(x % ins[0].ndim for x in eqn.params["axes"])
    keep = [i for i in range(ins[0].ndim) if i not in axes]
    return [(0, ("slab", keep[a]))]
  if prim == "reshape":
    from jaxsurgery._src.rules.common import reshape_groups
    for gi, gj in reshape_groups(ins[0].shape, out.shape):
      if a in gj:
        big = [i for i in gi if ins[0].shape[i] > 1]
        return [(0, ("slab", big[0]) if len(big) == 1 else ("whole",))]
    return [(0, ("whole",))]
  if prim == "gather":
    dn = eqn.params["dimension_numbers"]
    if a in dn.offset_dims:
      src = [i for i in range(ins[0].ndim) if i not in dn.collapsed_slice_dims]
      return [(0, ("slab", src[list(dn.offset_dims).index(a)]))]
    return [(0, ("whole",))]
  if prim == "concatenate":
    return [(k, ("slab", a) if r.related else ("whole",)) for k, r in enumerate(ins) if not r.is_const]
  return [(0, ("slab", a))]


_SCALE_LINEAR = frozenset({"add", "sub", "add_any", "neg", "max", "min", "reduce_max", "reduce_min",
                           "reduce_sum", "convert_element_type", "copy", "copy_p", "stop_gradient",
                           "transpose", "broadcast_in_dim", "reshape", "squeeze", "slice", "rev",
                           "concatenate", "select_n", "cumsum", "cummax", "cummin", "pad",
                           "optimization_barrier", "reduce_precision", "dynamic_slice", "gather"})
_SCALE_DEGREE = {"square": 2.0, "sqrt": 0.5, "rsqrt": -0.5, "cbrt": 1 / 3}


def pull_scale(P: Pass) -> None:
  """Scale demands: the nearest parameter factor takes the rescaling.

  Scale demands: a value must be rescaled by ``factor``; the nearest parameter factor takes it (softmax scores after a
  changed ``1/sqrt(head_dim)``: the key projection, ``K * sqrt(new/old)``).
  """
  for S, var, _region, site, factor in list(P.scale_demands):
    _scale(P, S, var, factor, site, set(), 0)


def _scale(P: Pass, S: Scope, var, factor: float, site: Site, seen: set, depth: int) -> None:
  if isinstance(var, compat.Literal) or depth > _MAX_DEPTH or (id(S), id(var)) in seen:
    return
  seen.add((id(S), id(var)))
  r = S.env.get(var)
  if r is None or r.is_const:
    return
  if r.origin is not None and r.related and not P.param_fresh[r.origin[0]]:
    P.decide_scale(r.origin[0], factor, site, pulled=True)
    return
  eqn = S.producer.get(id(var))
  if eqn is None:
    outside = S.call_operand(var)
    if outside is not None:
      _scale(P, *outside, factor, site, seen, depth + 1)
      return
    P.failures.append(P.site(Site("input", f"a model input would have to be rescaled (needed because "
                                           f"{site.describe()})")))
    return
  prim = eqn.primitive.name
  ins = [S.read(v) for v in eqn.invars]
  operands = [k for k, x in enumerate(ins) if x.related]
  if prim == "select_n":
    operands = [k for k in operands if k > 0]
  if prim in _SCALE_LINEAR:
    for k in operands:
      _scale(P, S, eqn.invars[k], factor, site, seen, depth + 1)
    return
  if prim in _SCALE_DEGREE or prim == "integer_pow":
    d = _SCALE_DEGREE.get(prim) or float(eqn.params["y"])
    for k in operands:
      _scale(P, S, eqn.invars[k], factor ** (1.0 / d), site, seen, depth + 1)
    return
  if prim in ("mul", "div", "dot_general", "conv_general_dilated"):
    cands = [k for k in operands if not (prim == "div" and k == 1)]
    params = [k for k in cands if ins[k].origin is not None]
    pick = (params or cands)[-1:]
    if not pick:
      _fail(P, S, eqn, site, "no factor of this product can be rescaled")
      return
    k = pick[0]
    _scale(P, S, eqn.invars[k], factor if not (prim == "div" and k == 1) else 1.0 / factor, site, seen, depth + 1)
    return
  bodies = getattr(S, "bodies", {}).get(id(eqn))
  if bodies and prim not in ("scan", "while"):
    k = list(eqn.outvars).index(var)
    for B in bodies:
      _scale(P, B, B.jaxpr.outvars[k], factor, site, seen, depth + 1)
    return
  _fail(P, S, eqn, site, f"`{prim}` cannot be rescaled by rescaling parameters")


_MEAN_LINEAR = frozenset({"add", "sub", "add_any", "neg", "convert_element_type", "copy", "copy_p",
                          "stop_gradient", "optimization_barrier", "transpose", "broadcast_in_dim",
                          "reshape", "squeeze", "concatenate", "gather", "slice", "reduce_sum"})


def pull_mean(P: Pass) -> None:
  """Mean demands (average expansion, LEMON).

  Mean demands (average expansion, LEMON): the new positions of a value along an axis must hold the mean of its old
  positions. Every writer into the value fills its new positions with the mean of its old ones: embedding and
  projection columns, biases.
  """
  for S, var, region, site in list(P.mean_demands):
    _mean(P, S, var, region[1], site, set(), 0)


def _mean(P: Pass, S: Scope, var, a: int, site: Site, seen: set, depth: int) -> None:
  if isinstance(var, compat.Literal) or depth > _MAX_DEPTH or (id(S), id(var), a) in seen:
    return
  seen.add((id(S), id(var), a))
  r = S.env.get(var)
  if r is None or r.is_const or not r.related:
    return
  if r.slab[a] in (MEAN,):
    return
  if r.origin is not None and P.decide_mean(r.origin, a):
    return
  eqn = S.producer.get(id(var))
  if eqn is None:
    outside = S.call_operand(var)
    if outside is not None:
      _mean(P, *outside, a, site, seen, depth + 1)
      return
    P.failures.append(P.site(Site("input", f"the new positions of a model input would have to hold "
                                           f"the mean of its old ones (needed because {site.describe()})")))
    return
  prim = eqn.primitive.name
  ins = [S.read(v) for v in eqn.invars]
  if prim in ("mul", "div"):
    varying = [k for k, x in enumerate(ins) if x.related and x.ndim == r.ndim and x.shape[a] == r.shape[a] > 1]
    if len(varying) == 1 and not (prim == "div" and varying[0] == 1):
      _mean(P, S, eqn.invars[varying[0]], a, site, seen, depth + 1)
      return
    _fail(P, S, eqn, site, "a product of two values that vary along the axis cannot hold their mean")
    return
  if prim == "dot_general":
    for k in (0, 1):
      reg = _product_region(eqn, k, ("slab", a), ins, r)
      if reg is not None and reg[0] == "slab" and ins[k].related:
        _mean(P, S, eqn.invars[k], reg[1], site, seen, depth + 1)
        return
    _fail(P, S, eqn, site, "the axis is not a free axis of this contraction")
    return
  if prim in _MEAN_LINEAR:
    if prim in ("add", "sub", "add_any"):
      regs = [(k, _operand_region(("slab", a), ins[k], r)) for k in range(len(ins)) if ins[k].related]
    else:
      regs = _view_regions(eqn, ins, ("slab", a), r)
    for k, reg in regs:
      if ins[k].related and reg[0] == "slab":
        _mean(P, S, eqn.invars[k], reg[1], site, seen, depth + 1)
    return
  bodies = getattr(S, "bodies", {}).get(id(eqn))
  if bodies and prim not in ("scan", "while", "cond"):
    k = list(eqn.outvars).index(var)
    for B in bodies:
      _mean(P, B, B.jaxpr.outvars[k], a, site, seen, depth + 1)
    return
  _fail(P, S, eqn, site, f"`{prim}` cannot put the mean of the old positions into the new ones")
