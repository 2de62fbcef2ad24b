"""Reduction relation rules: a reduction over an axis sees every old position once.

* The reduced axis must *cover* the old one: every old index exactly once (a
  removed feature, a dropped row, or a position moved into another piece breaks it).
* New positions must hold the reduction's neutral element: zero for sums. A
  novel summand is a demand (zero it); anything else for max/min/prod breaks it.
* A broadcast axis sums to ``n`` times its value: the coefficient gains
  ``n_new / n_old``, which a later division by the new size may cancel (a mean).
"""

from __future__ import annotations

import numpy as np

from . import maps as A
from .engine import Scope, out_shape, rule
from .values import CONST, MEAN, MEAN2, NOVEL, ZERO, Rel, none

_NEUTRAL_ZERO = ("reduce_sum", "reduce_or", "reduce_xor", "argmax", "argmin")


@rule("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
      "reduce_xor", "argmax", "argmin")
def reduce(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  x = ins[0]
  prim = eqn.primitive.name
  shape, dtype = out_shape(eqn), eqn.outvars[0].aval.dtype
  if not x.related:
    return [none(shape, dtype, x.whole)]
  old = S.pair(eqn, ins)
  if old is None or tuple(old.params["axes"]) != tuple(eqn.params["axes"]):
    s = S.site(eqn, "the old program reduces other axes")
    return [Rel(shape, dtype, ref=None if old is None else old.outvars[0], broken=s,
                maps=tuple(A.identity(n) for n in shape), slab=tuple(NOVEL for _ in shape),
                whole=NOVEL if old is None else None)]
  axes = sorted(a % x.ndim for a in eqn.params["axes"])
  coef, broken = x.coef, x.broken
  for a in axes:
    c, why = _reduced_axis(S, eqn, x, a, prim)
    if why is not None:
      broken = broken or S.site(eqn, why)
    coef *= c
  if prim in ("argmax", "argmin"):
    coef = 1.0 if x.coef > 0 else coef
    if x.coef <= 0:
      broken = broken or S.site(eqn, "a value rescaled by a negative factor is compared")
  elif prim in ("reduce_max", "reduce_min") and x.coef <= 0:
    broken = broken or S.site(eqn, "a value rescaled by a negative factor is compared")
  elif prim in ("reduce_prod", "reduce_and", "reduce_or", "reduce_xor") and not np.isclose(x.coef, 1):
    broken = broken or S.site(eqn, f"`{prim}` of a rescaled value")
  keep = [a for a in range(x.ndim) if a not in axes]
  term = None
  extras: tuple = ()
  if prim == "reduce_sum" and len(axes) == 1:  # a symbolic name, also on broken values (for demands)
    a = axes[0]
    m = A.find(x.maps[a])
    term = ("sum", x.ref, a, m.n_old)
    base = dict(x.mean_base).get(a)
    if x.slab[a] == MEAN2 and base is not None:
      extras = extras + ((("mean", base, a, 2), float(m.n_new - m.n_old)),)
  scaled_at = x.scaled_at
  if not np.isclose(coef, x.coef) and not scaled_at:
    from jaxsurgery._src import compat
    scaled_at = f"`{prim}` over a broadcast axis at {compat.source_line(eqn)}"
  return [Rel(shape, dtype, ref=old.outvars[0], maps=tuple(x.maps[a] for a in keep), coef=coef,
              broken=broken, slab=tuple(x.slab[a] for a in keep), scaled_at=scaled_at, term=term,
              extras=extras)]


def _reduced_axis(S, eqn, x: Rel, a: int, prim: str) -> tuple[float, str | None]:
  m = A.find(x.maps[a])
  if isinstance(m, A.Bcast):
    if prim == "reduce_sum":
      return m.n_new / max(m.n_old, 1), None
    if prim in ("reduce_max", "reduce_min", "reduce_and", "reduce_or"):
      return 1.0, None
    return 1.0, None if m.n_new == m.n_old else f"`{prim}` over a broadcast axis that changed size"
  src = A.resolve(m)
  k = A.multiplicity(src, m.n_old)
  if k is None:
    return 1.0, _coverage_reason(src, m)
  if prim in ("argmax", "argmin") and (k != 1 or not np.array_equal(src[src >= 0], np.arange(m.n_old))):
    return 1.0, "the positions of an arg-reduction moved or repeat"
  if k > 1 and prim not in ("reduce_sum", "reduce_max", "reduce_min", "reduce_and", "reduce_or"):
    return 1.0, f"`{prim}` over an axis whose positions repeat (a clone)"
  if not (src < 0).any():
    return (float(k) if prim == "reduce_sum" else 1.0), None
  kind = x.slab[a]
  if prim in _NEUTRAL_ZERO and prim not in ("argmax", "argmin") and kind == ZERO:
    return 1.0, None
  if prim == "reduce_sum" and kind == MEAN:  # average expansion: the new positions add n_new - n_old means
    return m.n_new / m.n_old, None
  if prim == "reduce_sum" and kind == MEAN2 and dict(x.mean_base).get(a) is not None:
    return 1.0, None  # the extra term is recorded by the caller
  if kind in (MEAN, MEAN2, CONST) and prim in ("reduce_max", "reduce_min"):
    return 1.0, f"`{prim}` over axis {a} sees its new positions"
  if prim == "reduce_sum" and kind == NOVEL:
    s = S.site(eqn, f"novel values at the new positions of axis {a} are summed with the old ones")
    S.demand(eqn, 0, ("slab", a), s)
    return 1.0, None
  return 1.0, (f"`{prim}` over axis {a} sees its {int((src < 0).sum())} new positions, which hold "
               f"{'zeros' if kind == ZERO else 'other values'}")


def _coverage_reason(src, m) -> str:
  used = src[src >= 0]
  missing = np.setdiff1d(np.arange(m.n_old), used)
  label = getattr(m, "label", "")
  if missing.size:
    what = f"old positions {missing[:6].tolist()}" + (f" ({label})" if label else "")
    return f"{what} are missing from the new program's reduction (removed or moved elsewhere)"
  return "old positions are repeated in the new program's reduction"


@rule("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def cumulative(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  x = ins[0]
  shape, dtype = out_shape(eqn), eqn.outvars[0].aval.dtype
  if not x.related:
    return [none(shape, dtype, x.whole)]
  old = S.pair(eqn, ins)
  a = eqn.params["axis"] % x.ndim
  broken = x.broken
  if old is None or old.params["axis"] != eqn.params["axis"] or old.params["reverse"] != eqn.params["reverse"]:
    broken = broken or S.site(eqn, "the old program accumulates along another axis")
  else:
    src = A.resolve(x.maps[a])
    n_old = x.maps[a].n_old
    order = src if not eqn.params["reverse"] else src[::-1]
    k = int((order >= 0).sum())
    if not (np.array_equal(order[:k], np.arange(n_old) if not eqn.params["reverse"]
                           else np.arange(n_old)[::-1]) and (order[k:] < 0).all()):
      broken = broken or S.site(eqn, "positions accumulated over moved, or new ones come first")
    if eqn.primitive.name != "cumsum" and not np.isclose(x.coef, 1) and eqn.primitive.name != "cummax":
      broken = broken or S.site(eqn, "accumulation of a rescaled value")
  return [Rel(shape, dtype, ref=None if old is None else old.outvars[0], maps=x.maps, coef=x.coef,
              broken=broken, slab=x.slab, whole=NOVEL if old is None else None)]
