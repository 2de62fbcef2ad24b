"""Elementwise relation rules: ``out[e] = f(x_1[e], ..., x_n[e])`` (size-1 axes broadcast).

* Maps: every operand's axis must line up (``unify``); a parameter axis takes the
  map of what it meets (a LayerNorm gain takes the feature order of its input).
* Scale: homogeneous ops carry a coefficient (``sqrt(c x) = sqrt(c) sqrt(x)``),
  sums need equal coefficients, any other op needs 1.
* New positions: zero stays zero under ops with ``f(0) = 0`` and as a factor.
* A summand with no old counterpart that is not zero (an inserted block's output)
  is a demand: it must be zero, which the pull-back turns into zeroed parameters.
"""

from __future__ import annotations

import numpy as np

from . import maps as A
from .engine import Scope, map_kind, out_shape, rule
from .values import BCAST, CONST, MEAN, MEAN2, NONFIN, NOVEL, ZERO, Rel, join, none, same_coef

SUMS = ("add", "sub", "add_any")
ORDERED = ("max", "min", "clamp")
COMPARE = ("eq", "ne", "lt", "le", "gt", "ge")
EXACT_ONLY = ("and", "or", "xor", "not", "rem", "shift_left", "shift_right_arithmetic",
              "shift_right_logical", "nextafter", "population_count", "clz", "is_finite")
UNARY_DEGREE = {"neg": 1.0, "abs": 1.0, "sqrt": 0.5, "rsqrt": -0.5, "cbrt": 1 / 3, "square": 2.0,
                "real": 1.0, "imag": 1.0, "conj": 1.0, "convert_element_type": 1.0, "copy": 1.0,
                "copy_p": 1.0, "stop_gradient": 1.0, "optimization_barrier": 1.0, "sign": 0.0,
                "reciprocal": -1.0}
UNARY = ("abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "bessel_i0e", "bessel_i1e",
         "cbrt", "ceil", "clz", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh",
         "digamma", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "imag",
         "integer_pow", "is_finite", "lgamma", "log", "log1p", "logistic", "neg", "not",
         "population_count", "real", "reduce_precision", "round", "rsqrt", "sign", "sin", "sinh",
         "sqrt", "square", "stop_gradient", "tan", "tanh", "reciprocal", "optimization_barrier")
NARY = ("add", "add_any", "and", "atan2", "clamp", "div", "eq", "ge", "gt", "le", "lt", "max",
        "min", "mul", "ne", "nextafter", "or", "pow", "rem", "select_n", "shift_left",
        "shift_right_arithmetic", "shift_right_logical", "sub", "xor")


def _positive(c: float) -> bool:
  return c > 0


def unary_coef(prim: str, params, c: float) -> float | None:
  """The coefficient of ``prim(c * x)`` relative to ``prim(x)``, or None if there is none."""
  if same_coef(c, 1.0):
    return 1.0
  if prim == "integer_pow":
    return c ** params["y"]
  deg = UNARY_DEGREE.get(prim)
  if deg is None:
    return None
  if prim in ("sqrt", "rsqrt", "cbrt") and not _positive(c):
    return None if prim != "cbrt" else -((-c) ** deg)
  if prim == "abs":
    return abs(c)
  if prim == "sign":
    return 1.0 if c > 0 else -1.0
  if prim == "convert_element_type" and not np.issubdtype(np.dtype(params["new_dtype"]), np.floating):
    return None
  return c ** deg


# -- constants seen through the partner's maps -------------------------------------

def _uniform(v: np.ndarray):
  flat = v.reshape(-1)
  if flat.size and (flat == flat[0]).all():
    return flat[0]
  return None


def const_ratio(vn: np.ndarray, vo: np.ndarray, maps, shape) -> float | None:
  """``r`` with ``vn[old positions] == r * vo[maps]`` (one ratio for every element), or None."""
  if vn is None or vo is None:
    return None
  un, uo = _uniform(vn), _uniform(vo)
  if un is not None and uo is not None:
    return _ratio(np.asarray([un]), np.asarray([uo]))
  vn = vn.reshape((1,) * (len(shape) - vn.ndim) + vn.shape)
  vo = vo.reshape((1,) * (len(shape) - vo.ndim) + vo.shape)
  for a, m in enumerate(maps):
    if vn.shape[a] == 1 and vo.shape[a] == 1:
      continue
    src = A.resolve(m)
    keep = np.nonzero(src >= 0)[0]
    vn = np.take(vn, keep, axis=a) if vn.shape[a] > 1 else vn
    vo = np.take(vo, src[keep], axis=a) if vo.shape[a] > 1 else vo
  return _ratio(*np.broadcast_arrays(vn, vo))


ANY = float("nan")  # a constant that fits every scale (zeros, infinities): marked, then skipped


def _ratio(vn, vo) -> float | None:
  vn, vo = np.asarray(vn, np.float64), np.asarray(vo, np.float64)
  if np.array_equal(vn, vo) and np.all((vn == 0) | np.isinf(vn)):
    return ANY
  zero = vo == 0
  if np.any(vn[zero] != 0):
    return None
  if zero.all():
    return 1.0
  r = vn[~zero] / vo[~zero]
  if not np.all(np.abs(r - r[0]) <= 1e-6 * np.abs(r[0])):
    return None
  return float(r[0])


def const_kind(v: np.ndarray, maps, shape, axis: int) -> int:
  """What a constant holds at the new positions along ``axis``."""
  if v is None:
    return NOVEL
  v = v.reshape((1,) * (len(shape) - v.ndim) + v.shape)
  if v.shape[axis] > 1:
    src = A.resolve(maps[axis])
    v = np.take(v, np.nonzero(src < 0)[0], axis=axis)
  return _kind_of(v)


def _kind_of(v) -> int:
  v = np.asarray(v)
  if v.size == 0 or not v.any():
    return ZERO
  if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all():
    return NONFIN
  return CONST


# -- combining the kinds at new positions ---------------------------------------------

def combine(prim: str, kinds: list[int], same_operands: bool = False) -> int:
  """What ``prim`` makes of new positions holding ``kinds`` (one per operand).

  ``MEAN`` (the mean of the old positions along the axis) is linear: it survives sums of
  means and products with values constant along the axis (``BCAST``); its square is ``MEAN2``.
  """
  ks = list(kinds)
  if prim in ("mul", "and"):
    if ZERO in ks and NONFIN not in ks:
      return ZERO
    rest = [k for k in ks if k != BCAST]
    if NONFIN in ks or NOVEL in ks:
      return join(*ks)
    if not rest:
      return BCAST
    if rest == [MEAN]:
      return MEAN
    if same_operands and ks == [MEAN, MEAN]:
      return MEAN2
    return CONST
  if prim == "div":
    num, den = ks[0], ks[1]
    if den in (ZERO, NONFIN):
      return NONFIN
    if num == ZERO:
      return ZERO
    if NOVEL in ks or NONFIN in ks:
      return join(*ks)
    if den == BCAST and num in (MEAN, BCAST):
      return num
    return CONST
  if prim in SUMS:
    if NONFIN in ks or NOVEL in ks:
      return join(*ks)
    if all(k == ZERO for k in ks):
      return ZERO
    if all(k == BCAST for k in ks):
      return BCAST
    if MEAN in ks and all(k in (MEAN, BCAST) for k in ks):
      return MEAN
    return CONST
  if prim == "select_n":
    cases = ks[1:]
    if all(k == ZERO for k in cases):
      return ZERO
    return join(*cases, *([ks[0]] if ks[0] in (NOVEL, NONFIN) else []))
  if prim in COMPARE:
    k = join(*ks)
    return CONST if k in (ZERO, MEAN, MEAN2) else k
  if prim == "pow":
    if ks[0] == ZERO:
      return NONFIN if ks[1] != ZERO else CONST
    return join(*ks, CONST)
  return join(*ks)


# -- the rule ---------------------------------------------------------------------------

@rule(*UNARY, *NARY)
def elementwise(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  shape = out_shape(eqn)
  dtype = eqn.outvars[0].aval.dtype
  loose = [k for k, r in enumerate(ins) if not r.related and not r.is_const]
  if loose:
    return [_with_unrelated(S, eqn, ins, loose, shape, dtype)]
  return [_related(S, eqn, ins, shape, dtype)]


def _with_unrelated(S: Scope, eqn, ins, loose, shape, dtype) -> Rel:
  """Operands without an old counterpart: zeros drop out of sums and kill products."""
  prim = eqn.primitive.name
  kinds = [r.whole for r in ins if not r.related and not r.is_const]
  if prim in ("mul", "and") and ZERO in kinds and NONFIN not in kinds:
    return none(shape, dtype, ZERO)
  related = [k for k, r in enumerate(ins) if r.related]
  if prim in SUMS or prim in ("or", "xor"):
    live = [k for k in loose if ins[k].whole != ZERO]
    if not live and len(related) == 1 and not (prim == "sub" and related[0] != 0):
      only = ins[related[0]]
      if only.shape == shape:
        for k in loose:
          S.P.forcing_whole.update(ins[k].zeroed_by)
        return only  # x + 0 = x (the output of a zeroed block)
    if related and live:
      s = S.site(eqn, "a value with no counterpart in the old model is added to one that has "
                      "one; it must be zero")
      for k in live:
        S.demand(eqn, k, ("whole",), s)
      base = ins[related[0]]
      if base.shape == shape and not (prim == "sub" and related[0] != 0):
        return Rel(shape, dtype, ref=base.ref, maps=base.maps, coef=base.coef, broken=base.broken,
                   slab=base.slab, origin=None, scaled_at=base.scaled_at)
  if len(ins) == 1:
    return none(shape, dtype, map_kind(ins[0].whole, prim, eqn.params))
  kinds = [r.whole if not r.related and not r.is_const else (CONST if r.related else _kind_of(r.value()))
           for k, r in enumerate(ins) if not _is_identity_bound(prim, r)]
  k = combine(prim, kinds)
  return none(shape, dtype, max(k, NOVEL) if any(r.related for r in ins) and k != ZERO else k)


def _is_identity_bound(prim: str, r: Rel) -> bool:
  """``max(x, -inf)`` and ``min(x, +inf)`` are ``x``.

  ``max(x, -inf)`` and ``min(x, +inf)`` are ``x`` (softmax's ``initial=-inf``): the infinite constant does not reach
  the output.
  """
  if prim not in ("max", "min") or not r.is_const:
    return False
  v = r.value()
  return v is not None and bool(np.all(v == (-np.inf if prim == "max" else np.inf)))


def _unify_maps(S: Scope, eqn, ins, shape):
  maps: list[A.AxisMap | None] = [None] * len(shape)
  for r in ins:
    if not r.related:
      continue
    off = len(shape) - r.ndim
    for a, m in enumerate(r.maps):
      if r.shape[a] == 1 and shape[off + a] != 1:
        continue  # broadcast along this axis
      if maps[off + a] is None:
        maps[off + a] = m
      else:
        maps[off + a] = A.unify(maps[off + a], m)
  return tuple(m if m is not None else A.identity(n) for m, n in zip(maps, shape))


def _related(S: Scope, eqn, ins, shape, dtype) -> Rel:
  prim = eqn.primitive.name
  try:
    maps = _unify_maps(S, eqn, ins, shape)
  except A.MapConflict as e:
    s = S.site(eqn, f"the operands' positions do not line up ({e})")
    return Rel(shape, dtype, ref=None, whole=NOVEL, broken=s)
  old = S.pair(eqn, ins)
  if old is None:
    return _unpaired(S, eqn, ins, shape, dtype, maps)
  coefs, why = [], None
  for k, r in enumerate(ins):
    if r.related:
      coefs.append(r.coef)
    else:
      c = const_ratio(r.value(), S.old_const(old.invars[k]), maps, shape)
      if c is None:
        why = ("a rotary position embedding (RoPE: sin/cos tables that depend on the head dimension) "
               "rotates a widened axis; jaxsurgery does not widen it (as HyperCloning refuses): keep "
               "head_dim and add heads instead") if _from_trig(S, eqn.invars[k]) else (
            "a constant differs from the old program's (not by one common factor)")
        break
      coefs.append(c)
  approx, extras, zero_axes = (), (), ()
  missing, deficit, fold_why = _constants(S, eqn, ins, shape, old)
  if fold_why and why is None:
    why = fold_why
  coef = None
  if why is None and any(r.broken is not None for r in ins if r.related):
    why = "broken"  # the relation is already lost: no decision can repair it here
    _centering(S, eqn, ins, coefs, maps)  # but ask for what would repair it next round
  if why is None:
    coefs, zero_axes = _centering(S, eqn, ins, coefs, maps)
    coefs, extras, why = _extras(prim, ins, coefs)
  if why is None:
    coefs = _compensate(S, eqn, ins, coefs)
    coef = _coef(prim, eqn.params, coefs, ins)
    if coef is None:
      coef, approx = _epsilon(S, eqn, ins, coefs)
    if coef is None:
      coef = _scale_demand(S, eqn, ins, coefs)
    if coef is None:
      why = _coef_reason(prim, coefs, ins)
  scaled_at = next((r.scaled_at for r in ins if r.related and r.scaled_at and not same_coef(r.coef, 1.0)), "")
  if coef is not None and not same_coef(coef, 1.0) and not scaled_at:
    from jaxsurgery._src import compat
    scaled_at = f"`{prim}` at {compat.source_line(eqn)}"
  slab = tuple(ZERO if a in zero_axes else _slab(prim, eqn.params, ins, maps, shape, a)
               for a in range(len(shape)))
  mean_base = tuple((a, _squared(ins).ref) for a, k in enumerate(slab) if k == MEAN2 and _squared(ins) is not None)
  _assume_in_domain(S, eqn, ins, slab)
  broken = next((r.broken for r in ins if r.broken is not None), None)
  if why == "broken":
    coef, why = 1.0, None
  if why is not None:
    broken = broken or S.site(eqn, why)
    coef = 1.0
  assert coef is not None  # a missing coefficient always comes with a reason (above)
  return Rel(shape, dtype, ref=old.outvars[0], maps=maps, coef=coef, broken=broken, slab=slab,
             origin=_origin(ins, shape, prim), scaled_at=scaled_at if coef is not None else "",
             approx=approx, term=_term(prim, eqn.params, ins, S, old),
             extras=extras if not broken else (), mean_base=mean_base, missing=missing, deficit=deficit)


# -- average expansion: means along an axis and their algebra ---------------------------

def _squared(ins):
  """The operand that ``square(x)`` / ``x * x`` / ``x ** 2`` squares, if that is the op."""
  if len(ins) == 1:
    return ins[0] if ins[0].related else None
  if len(ins) == 2 and ins[0] is ins[1] and ins[0].related:
    return ins[0]
  return None


def _term(prim, params, ins, S, old):
  """What the old part is, symbolically: the mean of a value along an axis, or its square."""
  related = [r for r in ins if r.related]
  if len(related) != 1:
    return _square_term(prim, params, ins)
  r = related[0]
  if r.term is None:
    return None
  if r.term[0] == "sum" and prim in ("div", "mul") and len(ins) == 2 and ins[1].is_const and ins[0] is r:
    k = S.old_const(old.invars[1])
    n = r.term[3]
    if k is not None and np.ndim(k) == 0 and (
        prim == "div" and float(k) == n or prim == "mul" and abs(float(k) * n - 1) < 1e-6):
      return ("mean", r.term[1], r.term[2], 1)
  if prim in ("convert_element_type", "copy", "copy_p", "stop_gradient", "optimization_barrier"):
    return r.term
  return _square_term(prim, params, ins)


def _square_term(prim, params, ins):
  x = _squared(ins)
  if x is None or x.term is None or x.term[0] != "mean" or x.term[3] != 1:
    return None
  if prim == "square" or prim == "mul" or (prim == "integer_pow" and params["y"] == 2):
    return ("mean", x.term[1], x.term[2], 2)
  return None


def _extras(prim, ins, coefs):
  """Additive terms beside ``coef * old`` fold into the operands that are those terms.

  Additive terms beside ``coef * old`` (a mean of squares over a widened axis) fold into the operands that *are* those
  terms: ``(s E[x^2] + (1 - s) m^2) - m^2 = s (E[x^2] - m^2)``.
  """
  if not any(r.related and r.extras for r in ins):
    return coefs, (), None
  if prim in ("mul", "div") and len(ins) == 2 and ins[1].is_const and ins[0].related:
    k = ins[1].value()
    if k is None or np.ndim(k) != 0:
      return coefs, (), "an additive term meets a constant that is not a scalar"
    f = float(k) if prim == "mul" else 1.0 / float(k)
    return coefs, tuple((key, e * f) for key, e in ins[0].extras), None
  if prim not in SUMS:
    return coefs, (), f"an additive term (average expansion) does not pass through `{prim}`"
  signs = [1.0, -1.0] if prim == "sub" else [1.0] * len(ins)
  total: dict = {}
  for sg, r in zip(signs, ins):
    for key, e in (r.extras if r.related else ()):
      total[key] = total.get(key, 0.0) + sg * e
  eff = list(coefs)
  for j, r in enumerate(ins):
    if r.related and r.term in total:
      eff[j] = coefs[j] + signs[j] * total.pop(r.term)
  rest = tuple((k, e) for k, e in total.items() if abs(e) > 1e-12)
  return eff, rest, None


def _centering(S, eqn, ins, coefs, maps):
  """``x - mean(x)`` along a widened axis: the LayerNorm recipe.

  ``x - mean(x)`` along a widened axis: if the new positions hold the mean (average expansion), they become zero; if
  not, ask for them to (the LayerNorm recipe).
  """
  if eqn.primitive.name != "sub" or len(ins) != 2 or not (ins[0].related and ins[1].related):
    return coefs, ()
  x, mu = ins
  t = mu.term
  if t is None or t[0] != "mean" or t[3] != 1 or t[1] is not x.ref or mu.shape[t[2]] != 1:
    return coefs, ()
  a = t[2]
  if not A.maybe_new(x.maps[a]):
    return coefs, ()
  if x.slab[a] == MEAN:
    return coefs, (a,)
  if not S.P.allow_mean:
    return coefs, ()
  s = S.site(eqn, f"the mean over axis {a}, a widened axis, is subtracted (a normalisation): "
                  f"its new positions must hold the mean of the old ones")
  S.pending_now.append(("mdemand", S, eqn.invars[0], ("slab", a), s))
  return [coefs[0], coefs[0]], (a,)


def _compensate(S, eqn, ins, coefs):
  """``x * gain`` with ``x`` rescaled by ``c``: the gain takes ``1/c``.

  ``x * gain`` with ``x`` rescaled by ``c``: the trained gain is rescaled by ``1/c`` (the RMSNorm and LayerNorm
  recipes: ``g * sqrt(h_old / h_new)``), so the product is exact again.
  """
  if eqn.primitive.name != "mul" or len(ins) != 2:
    return coefs
  for k in (0, 1):
    p, x = ins[k], ins[1 - k]
    if (p.related and p.origin is not None and x.related and same_coef(p.coef, 1.0)
        and not same_coef(coefs[1 - k], 1.0) and coefs[1 - k] == coefs[1 - k] and coefs[1 - k] > 0
        and S.P.can_scale(p.origin[0]) and not _normalises(S, eqn.invars[1 - k], eqn.invars[k])):
      s = S.site(eqn, f"a gain multiplies a value rescaled by {coefs[1 - k]:.6g}")
      S.pending_now.append(("scale", p.origin, 1.0 / coefs[1 - k], s))
      out = list(coefs)
      out[k] = 1.0 / coefs[1 - k]
      return out
  return coefs


def _normalises(S, scale_var, value_var) -> bool:
  """Whether ``scale_var`` is computed from ``value_var`` (``x * rsqrt(mean(x * x))``).

  ``x * rsqrt(mean(x * x))``: the scale is computed from ``x``, so ``x`` is the normalised value, not a gain (an
  embedding lookup feeding an RMSNorm is a view of a parameter too).
  """
  return not hasattr(value_var, "val") and _upstream(S, scale_var, lambda e: any(v is value_var for v in e.invars))


def _epsilon(S, eqn, ins, coefs):
  """``c * v + eps`` where exactness needs ``c * eps_old``: related up to the epsilon (a bound)."""
  prim = eqn.primitive.name
  if prim not in ("add", "sub") or len(ins) != 2 or not np.issubdtype(eqn.outvars[0].aval.dtype, np.floating):
    return None, ()
  rel = [k for k, r in enumerate(ins) if r.related]
  const = [k for k, r in enumerate(ins) if r.is_const]
  if len(rel) != 1 or len(const) != 1:
    return None, ()
  c = coefs[rel[0]]
  vn = ins[const[0]].value()
  if vn is None or np.ndim(vn) != 0 or c != c:
    return None, ()
  ratio = coefs[const[0]]
  eps_old = float(vn) / ratio if ratio and ratio == ratio else float(vn)
  from jaxsurgery._src import compat
  note = (f"`{prim}` at {compat.source_line(eqn)}: exact only if the new constant is {c * eps_old:.6g} "
          f"({c:.6g} x the old {eps_old:.6g}); it is {float(vn):.6g}, so this value is off by "
          f"{abs(float(vn) - c * eps_old):.3g} (absolute; relative to the value, at most "
          f"{abs(float(vn) - c * eps_old) / max(abs(c * eps_old), 1e-30):.3g} when the rest is zero)")
  return c, (note,)


def _scale_demand(S, eqn, ins, coefs):
  """One rescaled value meeting constants in an op that does not commute with its scale.

  One rescaled value meeting constants in an op that does not commute with its scale (softmax's ``exp`` or mask after
  a ``1/sqrt(head_dim)`` that changed): ask for that value to be rescaled back, upstream (the key projection takes it:
  ``K * sqrt(new/old)``).
  """
  prim = eqn.primitive.name
  related = [k for k, r in enumerate(ins) if r.related]
  scaled = [k for k in related if not same_coef(coefs[k], 1.0)]
  if len(scaled) != 1:
    return None
  k = scaled[0]
  c = coefs[k]
  if any(not (prim == "select_n" and j == 0) for j in related if j != k):
    return None  # another computed operand: which side to rescale is not clear
  if c != c or c <= 0 or any(not (same_coef(coefs[j], 1.0) or coefs[j] != coefs[j])
                             for j in range(len(ins)) if j != k and ins[j].is_const):
    return None
  s = S.site(eqn, f"a value rescaled by {c:.6g} enters `{prim}`")
  S.pending_now.append(("sdemand", S, eqn.invars[k], ("whole",), s, 1.0 / c))
  if len(ins) == 1:
    return 1.0
  return _coef(prim, eqn.params, [1.0 if j == k else x for j, x in enumerate(coefs)], ins)


def _upstream(S, var, found, depth: int = 12) -> bool:
  """Whether an eqn within ``depth`` steps upstream of ``var`` satisfies ``found(eqn)``."""
  stack, seen = [(var, 0)], set()
  while stack:
    v, d = stack.pop()
    eqn = S.producer.get(id(v))
    if eqn is None or id(eqn) in seen or d > depth:
      continue
    seen.add(id(eqn))
    if found(eqn):
      return True
    stack.extend((x, d + 1) for x in eqn.invars if not hasattr(x, "val"))
  return False


def _from_trig(S, var) -> bool:
  """Whether a constant was computed with sin or cos (a rotary embedding's table)."""
  return _upstream(S, var, lambda e: e.primitive.name in ("sin", "cos"))


def _unpaired(S, eqn, ins, shape, dtype, maps) -> Rel:
  """No old eqn computes this: ``x op c`` with a neutral constant is still ``x``."""
  prim = eqn.primitive.name
  related = [r for r in ins if r.related]
  consts = [r for r in ins if r.is_const]
  if len(related) == 1 and related[0].shape == shape:
    vals = [r.value() for r in consts]
    neutral = {"add": 0, "sub": 0, "add_any": 0, "mul": 1, "div": 1}.get(prim)
    if neutral is not None and all(v is not None and np.all(v == neutral) for v in vals) and (
        prim not in ("sub", "div") or ins[0].related):
      return related[0]
    if prim in ("convert_element_type", "copy", "copy_p", "optimization_barrier"):
      return dataclasses_replace(related[0], shape=shape, dtype=dtype)
  s = S.site(eqn, "the old program has no such operation on these values")
  return Rel(shape, dtype, ref=related[0].ref if related and related[0].shape == shape else None,
             maps=maps, broken=s, slab=tuple(NOVEL for _ in shape),
             whole=None if related and related[0].shape == shape else NOVEL)


def dataclasses_replace(r: Rel, **kw) -> Rel:
  import dataclasses
  return dataclasses.replace(r, **kw)


def _coef(prim, params, coefs, ins) -> float | None:
  if any(c != c for c in coefs):  # ANY: zeros and infinities scale with anything
    if prim in SUMS or prim in ORDERED or prim in COMPARE or prim == "select_n":
      kept = [c for c in coefs if c == c]
      if not kept:
        return 1.0
      coefs = kept if prim != "select_n" else [1.0 if c != c else c for c in coefs]
    else:
      coefs = [1.0 if c != c else c for c in coefs]
  if len(coefs) == 1 and len(ins) == 1:
    return unary_coef(prim, params, coefs[0])
  if prim in SUMS or (len(coefs) == 1 and prim not in ORDERED and prim not in COMPARE):
    return coefs[0] if all(same_coef(c, coefs[0]) for c in coefs) else None
  if prim in ORDERED:
    return coefs[0] if coefs[0] > 0 and all(same_coef(c, coefs[0]) for c in coefs) else None
  if prim in COMPARE or prim == "atan2":
    return 1.0 if coefs[0] > 0 and all(same_coef(c, coefs[0]) for c in coefs) else None
  if prim == "mul":
    return float(np.prod(coefs))
  if prim == "div":
    return coefs[0] / coefs[1] if coefs[1] != 0 else None
  if prim == "select_n":
    cases = coefs[1:]
    return cases[0] if same_coef(coefs[0], 1.0) and all(same_coef(c, cases[0]) for c in cases) else None
  if prim == "pow":
    e = ins[1].value() if ins[1].is_const else None
    if same_coef(coefs[1], 1.0) and e is not None and np.ndim(e) == 0:
      return coefs[0] ** float(e) if coefs[0] > 0 else None
  return 1.0 if all(same_coef(c, 1.0) for c in coefs) else None


def _coef_reason(prim, coefs, ins) -> str:
  at = "; ".join(dict.fromkeys(r.scaled_at for r in ins if r.related and r.scaled_at))
  since = f" (the scale comes from {at}: a mean or a constant that depends on a changed size)" if at else (
      ": a mean or a constant that depends on a changed size")
  if prim in SUMS or prim in ORDERED:
    return f"its operands are rescaled differently ({', '.join(f'{c:.4g}' for c in coefs)}){since}"
  return (f"a value rescaled by {', '.join(f'{c:.4g}' for c in coefs if not same_coef(c, 1.0))} "
          f"enters `{prim}`, which does not commute with scaling{since}")


def _neutral(prim, r: Rel) -> bool:
  """``-inf`` in a ``max`` (``+inf`` in a ``min``) changes nothing."""
  if prim not in ("max", "min") or not r.is_const:
    return False
  v = r.value()
  return v is not None and v.size > 0 and bool(np.all(v == (-np.inf if prim == "max" else np.inf)))


def _slab(prim, params, ins, maps, shape, a) -> int | None:
  kinds = []
  ins = [r for r in ins if not _neutral(prim, r)] or ins
  for r in ins:
    off = len(shape) - r.ndim
    if a < off or (r.shape[a - off] == 1 and shape[a] != 1):
      kinds.append(BCAST if r.related else _bcast_kind(r.value()))
    elif r.related:
      kinds.append(r.slab[a - off])
    else:
      kinds.append(const_kind(r.value(), maps[off:], r.shape, a - off))
  if len(kinds) == 1:
    return map_kind(kinds[0], prim, params)
  return combine(prim, kinds, same_operands=len(set(id(r) for r in ins)) == 1)


# Ops that are not finite everywhere, and which operand's novel values may leave the domain.
_PARTIAL = {"div": 1, "rem": 1, "pow": 0, "sqrt": 0, "rsqrt": 0, "log": 0, "log1p": 0, "reciprocal": 0,
            "acos": 0, "asin": 0, "atanh": 0, "acosh": 0, "lgamma": 0, "digamma": 0, "erf_inv": 0, "tan": 0}


def _assume_in_domain(S: Scope, eqn, ins: list[Rel], slab) -> None:
  """States the assumption that a partial op's fresh inputs stay inside its domain.

  Fresh values at new positions are novel, not known to be finite: ``rsqrt`` of a new running
  variance or ``1 / w`` of a new unit is finite only for the right init (0 * inf would be NaN).
  """
  prim = eqn.primitive.name
  k = _PARTIAL.get(prim, 0 if prim == "integer_pow" and eqn.params["y"] < 0 else None)
  if k is None or k >= len(ins) or not ins[k].related or NOVEL not in ins[k].slab:
    return
  if all(kind not in (NOVEL, NONFIN) for kind in slab):
    return
  from jaxsurgery._src import compat
  S.P.assumptions.add(f"`{prim}` at {compat.source_line(eqn)}: the fresh values at its new positions are "
                      f"assumed inside its domain (finite results)")


def _bcast_kind(v) -> int:
  """A constant that is the same along the axis: zero, or the same value at old and new positions."""
  k = _kind_of(v)
  return BCAST if k == CONST else k


def _origin(ins, shape, prim):
  if prim not in ("convert_element_type", "copy", "copy_p", "optimization_barrier", "stop_gradient",
                  "reduce_precision"):
    return None
  return ins[0].origin


# -- removed features declared constant (fold.py) -------------------------------------------

def _constants(S, eqn, ins, shape, old):
  """Removed constant features through an elementwise op, and a contraction's deficit.

  Carries the expressions of removed constant features through an elementwise op, and folds a contraction's deficit
  into the bias added to it. Returns (missing, deficit, reason or None).
  """
  prim = eqn.primitive.name
  if not any(r.related and (r.missing or r.deficit) for r in ins):
    return (), (), None
  if any(r.related and r.deficit for r in ins):
    return _fold_bias(S, eqn, ins, shape)
  from . import fold
  if prim not in fold.OPS:
    return (), (), f"`{prim}` of a removed feature's constant cannot be folded"
  out = []
  axes = sorted({a + len(shape) - r.ndim for r in ins if r.related for a, _ in r.missing})
  for a in axes:
    per_index: dict = {}
    for k, r in enumerate(ins):
      for i, expr in _operand_exprs(S, old, k, r, a, shape, ins):
        per_index.setdefault(i, [None] * len(ins))[k] = expr
    entries = []
    for i, args in sorted(per_index.items()):
      if any(x is None for x in args):
        return (), (), "a removed feature's constant meets a value that has no known old value there"
      entries.append((i, ("op", prim, eqn.params.get("y"), *args)))
    out.append((a, tuple(entries)))
  return tuple(out), (), None


def _operand_exprs(S, old, k, r: Rel, a: int, shape, ins):
  """(old index, expression) of operand ``k`` at the missing old positions of output axis ``a``."""
  idx = sorted({i for rr in ins if rr.related for ax, ent in rr.missing
                if ax + len(shape) - rr.ndim == a for i, _ in ent})
  off = len(shape) - r.ndim
  if r.related and r.missing:
    own = dict(dict(r.missing).get(a - off, ()))
    if own:
      return [(i, own[i]) for i in idx if i in own]
  if r.is_const or not r.related:
    v = S.old_const(old.invars[k]) if r.is_const else None
    if v is None:
      return []
    v = np.asarray(v)
    v = v.reshape((1,) * (len(shape) - v.ndim) + v.shape)
    if v.shape[a] == 1:
      return [(i, ("const", float(v.reshape(-1)[0]))) for i in idx] if v.size == 1 else []
    if np.take(v, 0, axis=a).size != 1:
      return []
    return [(i, ("const", float(np.take(v, i, axis=a).reshape(-1)[0]))) for i in idx]
  if r.origin is None or a < off:
    return []
  p_idx = S.P.pairs.get(r.origin[0])
  pa = r.origin[1][a - off]
  if p_idx is None or pa is None or any(n != 1 for b, n in enumerate(r.shape) if b != a - off):
    return []
  return [(i, ("param", p_idx, pa, i)) for i in idx]


def _fold_bias(S, eqn, ins, shape):
  """``(x @ W) + b`` where the contraction lost removed constant features: ``b`` absorbs them."""
  prim = eqn.primitive.name
  if prim != "add" or len(ins) != 2:
    return (), (), "a removed feature's contribution reaches an op other than a bias add"
  d = next(k for k, r in enumerate(ins) if r.related and r.deficit)
  b = ins[1 - d]
  (axis, terms), = ins[d].deficit
  off = len(shape) - b.ndim
  if not (b.related and b.origin is not None and axis >= off and b.origin[1][axis - off] is not None
          and all(n == 1 for j, n in enumerate(b.shape) if j != axis - off)):
    return (), (), "a removed feature's contribution is not followed by a bias to fold it into"
  if S.P.decisions.fold.get(b.origin[0]) == tuple(terms):
    return (), (), None  # folded in an earlier round
  s = S.site(eqn, "the constant of a removed feature is folded into this bias")
  S.pending_now.append(("fold", b.origin[0], tuple(terms), s))
  return (), (), None
