"""Contraction relation rules: ``dot_general`` and ``conv_general_dilated``.

``out[b, i, j] = sum_c lhs[b, i, c] rhs[b, c, j]``:

* contracted axes of the two operands share one map (this is where a kernel's
  rows take the order of the features it reads);
* that map must cover the old axis, and at its new positions one side must be
  zero: where neither is, the parameter side's new positions are zeroed
  ("zero out") -- a decision the next round applies from the start;
* free axes keep their maps; coefficients multiply.

A convolution contracts its input-feature axis the same way (per group); its
spatial axes must be unchanged.
"""

from __future__ import annotations

import numpy as np

from . import maps as A
from .elementwise import combine
from .engine import Scope, as_related, out_shape, rule
from .values import BCAST, CONST, MEAN, NONFIN, NOVEL, ZERO, Rel, join, none


def _unrelated(eqn, ins) -> Rel | None:
  if all(r.related for r in ins):
    return None
  kinds = [r.whole if not r.related and not r.is_const else CONST for r in ins]
  shape, dtype = out_shape(eqn), eqn.outvars[0].aval.dtype
  if ZERO in kinds and NONFIN not in kinds:
    return none(shape, dtype, ZERO)
  if any(r.is_const for r in ins) and all(r.related or r.is_const for r in ins):
    return None
  return none(shape, dtype, join(*kinds, NOVEL) if any(r.related for r in ins) else join(*kinds))


def contract_axis(S: Scope, eqn, lhs: Rel, rhs: Rel, a: int, b: int):
  """Unifies the contracted axis ``a`` of lhs with ``b`` of rhs and checks its new positions.

  Returns (map, reason it is not related or None, how many times each old position is summed).
  """
  try:
    m = A.unify(lhs.maps[a], rhs.maps[b])
  except A.MapConflict as e:
    return lhs.maps[a], f"the contracted positions do not line up ({e})", 1
  src = A.resolve(m)
  consts = [i for r, ax in ((lhs, a), (rhs, b)) for i, _ in dict(r.missing).get(ax, ())]
  k = A.multiplicity(np.concatenate([src, np.asarray(consts, np.int64)]), A.find(m).n_old)
  why = None
  if k is None:
    missing = np.setdiff1d(np.arange(A.find(m).n_old), src[src >= 0])
    label = getattr(A.find(m), "label", "")
    why = (f"old positions {missing[:6].tolist()} of the contracted axis are missing or repeat unevenly"
           + (f" ({label})" if label else "") + " (a removed feature or unit)")
    k = 1
  if not (src < 0).any():
    return m, why, k
  kl, kr = lhs.slab[a], rhs.slab[b]
  if NONFIN in (kl, kr):  # 0 * inf is NaN: no zero on the other side cancels them
    return m, why or ("non-finite values (inf or NaN: a division by zero?) at the new positions of a "
                      "contracted axis"), k
  if ZERO in (kl, kr):
    for side, axis, other in ((lhs, a, kr), (rhs, b, kl)):  # a zero that this contraction needs
      if side.origin is not None and other != ZERO and side.slab[axis] == ZERO and side.origin[1][axis] is not None:
        S.P.forcing.add((side.origin[0], side.origin[1][axis]))
    return m, why, k
  s = S.site(eqn, "novel values at the new positions of a contracted axis meet on both sides")
  _zero_one_side(S, eqn, lhs, rhs, a, b, kl, kr, s)  # even if old positions are missing: zero out
  return m, why, k


def _zero_one_side(S: Scope, eqn, lhs: Rel, rhs: Rel, a: int, b: int, kl: int, kr: int, s) -> None:
  """"Random in, zero out": which side of a contraction to zero.

  "Random in, zero out": zero the parameter side's new positions (a kernel's rows reading new units or features). The
  other side instead only if that zeroes just added biases (the new entries of a norm's offset, after a centring that
  made the rest zero: the consumers keep random rows), or if the parameter side cannot be zero (its new positions hold
  a mean, e.g. a tied embedding's average-expanded columns).
  """
  from .pullback import trial
  param_side = None
  for j, side, axis in ((1, rhs, b), (0, lhs, a)):
    if side.origin is not None and side.origin[1][axis] is not None and side.slab[axis] != MEAN and (
        side.origin[1][axis] not in S.P.new_decisions.mean_axes.get(side.origin[0], ())):
      param_side = (j, side, axis)
      break
  other = [(j, axis) for j, side, axis in ((1, rhs, b), (0, lhs, a)) if param_side is None or j != param_side[0]]
  for j, axis in other:
    got = trial(S.P, S, eqn.invars[j], ("slab", axis))
    if got is None:
      continue
    zeros, through_product = got
    if param_side is None or (not through_product and all(len(S.P.param_shapes[p]) == 1 for p, _ in zeros)):
      S.demand(eqn, j, ("slab", axis), s)
      return
  if param_side is not None:
    S.require_zero(param_side[1].origin, param_side[2], s)
    return
  S.demand(eqn, 1 if kr >= kl else 0, ("slab", b if kr >= kl else a), s)


@rule("dot_general")
def dot_general(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  u = _unrelated(eqn, ins)
  if u is not None:
    return [u]
  shape, dtype = out_shape(eqn), eqn.outvars[0].aval.dtype
  old = S.pair(eqn, ins)
  if old is None or old.params["dimension_numbers"] != eqn.params["dimension_numbers"]:
    s = S.site(eqn, "no matching contraction in the old program")
    return [Rel(shape, dtype, whole=NOVEL, broken=s)]
  lhs, rhs = [as_related(S, r, old.invars[k]) for k, r in enumerate(ins)]
  if lhs is None or rhs is None:
    s = S.site(eqn, "a constant operand differs from the old program's")
    return [Rel(shape, dtype, ref=old.outvars[0], maps=tuple(A.identity(n) for n in shape), broken=s,
                slab=tuple(NOVEL for _ in shape))]
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  broken = lhs.broken or rhs.broken
  repeats = 1
  for a, b in zip(lc, rc):
    _, why, k = contract_axis(S, eqn, lhs, rhs, a, b)
    repeats *= k
    if why:
      broken = broken or S.site(eqn, why)
  coef = lhs.coef * rhs.coef
  if repeats != 1 and broken is None:
    coef = _fan_in(S, eqn, ins, lhs, rhs, lc, rc, repeats, coef)
  deficit, why = _deficit(S, lhs, rhs, lc, rc, lb, rb)
  if why:
    broken = broken or S.site(eqn, why)
  maps, slab = [], []
  for a, b in zip(lb, rb):
    try:
      maps.append(A.unify(lhs.maps[a], rhs.maps[b]))
    except A.MapConflict as e:
      broken = broken or S.site(eqn, f"batch positions do not line up ({e})")
      maps.append(lhs.maps[a])
    slab.append(combine("mul", [lhs.slab[a], rhs.slab[b]]))
  for r, c, bt in ((lhs, lc, lb), (rhs, rc, rb)):
    for a in range(r.ndim):
      if a not in c and a not in bt:
        maps.append(r.maps[a])
        slab.append(combine("mul", [r.slab[a], BCAST]))
  return [Rel(shape, dtype, ref=old.outvars[0], maps=tuple(maps), coef=coef,
              broken=broken, slab=tuple(slab), scaled_at=lhs.scaled_at or rhs.scaled_at,
              deficit=deficit if broken is None else ())]


def _deficit(S, lhs, rhs, lc, rc, lb, rb):
  """Removed constant features on a contracted axis, as terms to fold into the next bias.

  Removed constant features on a contracted axis: what each contributed, ``v_i * W[i, :]``, as terms to fold into the
  bias that follows (its axis is the kernel's one free axis).
  """
  if not (lhs.missing or rhs.missing):
    return (), None
  for x, w, xc, wc in ((lhs, rhs, lc, rc), (rhs, lhs, rc, lc)):
    miss = [(ax, ent) for ax, ent in x.missing if ax in xc]
    if not miss:
      continue
    if len(miss) != 1 or w.missing or w.origin is None or len(wc) != 1:
      return (), "a removed feature's constant meets a contraction that cannot be folded"
    ax, entries = miss[0]
    wb = rc if w is rhs else lc
    w_free = [d for d in range(w.ndim) if d not in wb and d not in (rb if w is rhs else lb)]
    k = S.P.pairs.get(w.origin[0])
    row = w.origin[1][wc[0]]
    if k is None or row is None or len(w_free) != 1 or lb or rb or x.ndim - len(xc) < 1:
      return (), "a removed feature's constant meets a contraction that cannot be folded"
    n_lfree = lhs.ndim - len(lc) - len(lb)
    out_axis = n_lfree if w is rhs else 0  # outputs: batch (none here), lhs free, rhs free
    terms = tuple((expr, k, row, i) for i, expr in entries)
    return ((out_axis, terms),), None
  return (), None


def _fan_in(S, eqn, ins, lhs, rhs, lc, rc, repeats: int, coef: float) -> float:
  """A contraction over cloned positions: fan-in ``W / n`` and zero-sum noise.

  A contraction over cloned positions sums every old term ``repeats`` times. The parameter side, if it is used only
  here, takes ``1 / repeats`` (HyperCloning's fan-in ``W / n``) and zero-sum noise between the copies, so they train
  apart; otherwise the other side is rescaled upstream (a tied embedding: the final norm's gain and bias, as Staged
  Training does).
  """
  eff = coef * repeats
  if eff == 0 or eff != eff:
    return eff
  for side, axes in ((rhs, rc), (lhs, lc)):
    o = side.origin
    if o is not None and S.P.single_use(o[0]) and not S.P.param_fresh[o[0]]:
      S.pending_now.append(("noise", o, tuple(o[1][a] for a in axes), None))
      if abs(eff - 1.0) <= 1e-9:
        return eff  # the scale was applied in an earlier round
      if S.P.can_scale(o[0]):
        s = S.site(eqn, f"a contraction over positions cloned {repeats} times")
        S.pending_now.append(("scale", o, 1.0 / eff, s))
        return 1.0
  if abs(eff - 1.0) <= 1e-9:
    return eff
  s = S.site(eqn, f"a contraction over positions cloned {repeats} times")
  k = 0 if rhs.origin is not None else 1
  S.pending_now.append(("sdemand", S, eqn.invars[k], ("whole",), s, 1.0 / eff))
  return 1.0


@rule("conv_general_dilated")
def conv(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  u = _unrelated(eqn, ins)
  if u is not None:
    return [u]
  shape, dtype = out_shape(eqn), eqn.outvars[0].aval.dtype
  old = S.pair(eqn, ins)
  p = eqn.params
  why = None
  lhs: Rel | None
  rhs: Rel | None
  lhs, rhs = ins
  if old is not None:
    lhs, rhs = [as_related(S, r, old.invars[k]) for k, r in enumerate(ins)]
  if old is None or lhs is None or rhs is None:
    why = "no matching convolution in the old program"
  else:
    q = old.params
    for k in ("window_strides", "padding", "lhs_dilation", "rhs_dilation", "batch_group_count",
              "dimension_numbers"):
      if p[k] != q[k]:
        why = f"the convolution's {k} changed"
  if why:
    s = S.site(eqn, why)
    return [Rel(shape, dtype, ref=None if old is None else old.outvars[0], whole=NOVEL if old is None else None,
                maps=tuple(A.identity(n) for n in shape) if old is not None else (), broken=s,
                slab=tuple(NOVEL for _ in shape) if old is not None else ())]
  assert lhs is not None and rhs is not None  # else `why` is set above
  dn = p["dimension_numbers"]
  lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  broken = lhs.broken or rhs.broken
  for a in lspec[2:]:
    if lhs.shape[a] != old.invars[0].aval.shape[a] or not A.pin_identity(lhs.maps[a]):
      broken = broken or S.site(eqn, "a spatial axis of the convolution's input changed")
  for a in rspec[2:]:
    if not A.pin_identity(rhs.maps[a]):
      broken = broken or S.site(eqn, "a spatial axis of the kernel changed")
  if p["batch_group_count"] != 1:
    broken = broken or (None if all(A.pin_identity(m) for m in lhs.maps + rhs.maps) else
                        S.site(eqn, "batch-grouped convolution with changed sizes"))
  G, Go = p["feature_group_count"], old.params["feature_group_count"]
  fmap, omap, why = _grouped(S, eqn, lhs, rhs, lspec[1], rspec[1], rspec[0], G, Go, old)
  if why:
    broken = broken or S.site(eqn, why)
  maps: list[A.AxisMap | None] = [None] * len(shape)
  slab = [ZERO] * len(shape)
  maps[ospec[0]], slab[ospec[0]] = lhs.maps[lspec[0]], lhs.slab[lspec[0]]
  maps[ospec[1]], slab[ospec[1]] = omap, combine("mul", [rhs.slab[rspec[0]], BCAST])
  for o in ospec[2:]:
    maps[o] = A.identity(shape[o])
  return [Rel(shape, dtype, ref=old.outvars[0], maps=tuple(maps), coef=lhs.coef * rhs.coef,
              broken=broken, slab=tuple(slab), scaled_at=lhs.scaled_at or rhs.scaled_at)]


def _grouped(S, eqn, lhs, rhs, lf, ri, ro, G, Go, old):
  """Maps of the contracted input features and of the output features, per feature group."""
  if G == 1 and Go == 1:
    m, why, k = contract_axis(S, eqn, lhs, rhs, lf, ri)
    if k != 1:
      why = why or "a convolution over cloned channels (not supported yet)"
    return m, rhs.maps[ro], why
  o_lhs, o_rhs = old.invars[0].aval.shape, old.invars[1].aval.shape
  cpg, cpg_o = rhs.shape[ri], o_rhs[ri]
  opg, opg_o = rhs.shape[ro] // G, o_rhs[ro] // Go
  fparts = A.factor(lhs.maps[lf], [G, cpg], [Go, cpg_o])
  oparts = A.factor(rhs.maps[ro], [G, opg], [Go, opg_o])
  if fparts is None or oparts is None or o_lhs[lf] != Go * cpg_o:
    return rhs.maps[ro], rhs.maps[ro], "feature groups of the convolution do not line up"
  try:
    A.unify(fparts[0], oparts[0])
  except A.MapConflict as e:
    return rhs.maps[ro], rhs.maps[ro], f"feature groups do not line up ({e})"
  inner = Rel(lhs.shape, lhs.dtype, ref=lhs.ref, maps=(fparts[1],), slab=(lhs.slab[lf],), origin=None)
  kern = Rel(rhs.shape, rhs.dtype, ref=rhs.ref, maps=(rhs.maps[ri],), slab=(rhs.slab[ri],),
             origin=None if rhs.origin is None else (rhs.origin[0], (rhs.origin[1][ri],)))
  _, why, k = contract_axis(S, eqn, inner, kern, 0, 0)
  if k != 1:
    why = why or "a grouped convolution over cloned channels"
  return fparts[1], A.Kron(oparts), why
