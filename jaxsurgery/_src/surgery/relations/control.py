"""Calls and control flow: bodies are related to the old program's bodies.

* Calls (``jit``, ``custom_jvp_call``, ``remat``...): the callee is related with its
  operands' relations; references to old values are renamed to the old callee's
  variables on the way in and back to the old eqn's outputs on the way out.
* ``scan``/``while``: the carry's relation is iterated to a fixed point (the join
  of the initial carry and the body's output: maps unify, scales must agree, new
  positions take the worst kind). Per-step inputs drop the time axis, outputs
  gain it.
* ``cond``: every branch is related; outputs join over the branches. The index
  must be unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core.errors import NoSubJaxprError
from jaxsurgery._src.rules.control_flow import CALLS

from . import maps as A
from .engine import Scope, as_related, rule
from .oldside import OldSide
from .values import NOVEL, Rel, Site, none, same_coef
from .values import join as join_kinds

_MAX_LOOP = 12


def _inside(r: Rel, old_var) -> Rel:
  """``r`` as seen inside a body, where the old value is ``old_var``."""
  if r.related:
    return dataclasses.replace(r, ref=old_var)
  return r


def _outside(r: Rel, body: OldSide, old_eqn, k: int, offset: int = 0) -> Rel:
  """A body output seen from outside: it must be the old body's output ``k``."""
  if not r.related:
    return r
  old_body = body.jaxpr
  if body.same(r.ref, old_body.outvars[k]):
    return dataclasses.replace(r, ref=old_eqn.outvars[k], origin=None)
  for j, v in enumerate(old_body.invars):
    if body.same(r.ref, v) and j + offset < len(old_eqn.invars) and old_eqn.primitive.name not in ("scan", "while"):
      return dataclasses.replace(r, ref=old_eqn.invars[j + offset], origin=None)
  return none(r.shape, r.dtype, NOVEL)


def body_scope(S: Scope, eqn, sub, old_sub, old_consts, ins, old_ins, kind: str) -> Scope:
  consts = {}
  for v, val in zip(old_sub.constvars, old_consts):
    consts[id(v)] = np.asarray(val) if not hasattr(val, "aval") or hasattr(val, "__array__") else val
  for v, atom in zip(old_sub.invars, old_ins):
    c = S.old.value(atom) if atom is not None else None
    if c is not None:
      consts[id(v)] = c
  return Scope(S.P, sub, OldSide(old_sub, consts), parent=(S, eqn, kind))


def _const_rels(sub, consts):
  out = []
  for v, c in zip(sub.constvars, consts):
    try:
      val = np.asarray(c)
    except Exception:
      val = None
    out.append(Rel(tuple(v.aval.shape), v.aval.dtype, const=val) if val is not None else
               none(tuple(v.aval.shape), v.aval.dtype, NOVEL))
  return out


def _run_body(B: Scope, sub, consts, args):
  for v, r in zip(sub.constvars, _const_rels(sub, consts)):
    B.env[v] = r
  return B.run(args)


@rule(*CALLS)
def call(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  old = S.pair(eqn, ins) if any(r.related for r in ins) else None
  try:
    sub, consts = compat.sub_jaxpr(eqn.params, eqn.primitive.name)
  except NoSubJaxprError:
    from .engine import congruence
    return congruence(S, eqn, ins)
  if old is None:
    # No old counterpart: still walk the body (decisions inside it, unrelated values).
    B = Scope(S.P, sub, OldSide(sub, {}), parent=(S, eqn, "call"))
    outs = _run_body(B, sub, consts, [r if not r.related else none(r.shape, r.dtype, NOVEL) for r in ins])
    S.bodies = getattr(S, "bodies", {})
    S.bodies[id(eqn)] = [B]
    return [none(o.shape, o.dtype, o.whole if o.whole is not None else NOVEL) if o.related else o for o in outs]
  old_sub, old_consts = compat.sub_jaxpr(old.params, old.primitive.name)
  B = body_scope(S, eqn, sub, old_sub, old_consts, ins, list(old.invars), "call")
  outs = _run_body(B, sub, consts, [_inside(r, v) for r, v in zip(ins, old_sub.invars)])
  S.bodies = getattr(S, "bodies", {})
  S.bodies[id(eqn)] = [B]
  return [_outside(r, B.old, old, k) for k, r in enumerate(outs)]


def join(a: Rel, b: Rel, S: Scope, eqn) -> Rel:
  """The relation that holds for both ``a`` and ``b`` (a loop carry over its iterations)."""
  if not a.related and not a.is_const or not b.related and not b.is_const:
    ka = a.whole if not a.related and not a.is_const else NOVEL
    kb = b.whole if not b.related and not b.is_const else NOVEL
    return none(a.shape, a.dtype, join_kinds(ka, kb))
  if a.is_const and b.related:
    a, b = b, a
  if b.is_const and a.related:
    return _join_const(a, b, S, eqn)
  if a.is_const and b.is_const:
    return a if np.array_equal(a.value(), b.value()) else none(a.shape, a.dtype, NOVEL)
  broken = a.broken or b.broken
  maps = []
  for x, y in zip(a.maps, b.maps):
    try:
      maps.append(A.unify(x, y))
    except A.MapConflict as e:
      broken = broken or S.site(eqn, f"a loop carry's positions differ between iterations ({e})")
      maps.append(x)
  if not same_coef(a.coef, b.coef):
    broken = broken or S.site(eqn, f"a loop carry is rescaled differently between iterations "
                                   f"({a.coef:.4g} vs {b.coef:.4g})")
  slab = tuple(join_kinds(x, y) for x, y in zip(a.slab, b.slab))
  from .engine import _dedupe
  return Rel(a.shape, a.dtype, ref=a.ref, maps=tuple(maps), coef=a.coef, broken=broken, slab=slab,
             scaled_at=a.scaled_at or b.scaled_at, pending=_dedupe(a.pending + b.pending))


def _join_const(a: Rel, c: Rel, S: Scope, eqn) -> Rel:
  """A carry started from a constant (zeros) joined with a related body output."""
  from .elementwise import const_kind, const_ratio
  vn = c.value()
  vo = S.old.value(a.ref) if a.ref is not None else None
  if vo is None:
    vo = vn
  r = const_ratio(vn, vo, a.maps, a.shape)
  broken = a.broken
  if r is None or (not same_coef(r, a.coef) and np.any(vo != 0)):
    broken = broken or S.site(eqn, "a loop's initial carry differs from the old program's")
  slab = tuple(join_kinds(k, const_kind(vn, a.maps, a.shape, ax)) for ax, k in enumerate(a.slab))
  return dataclasses.replace(a, broken=broken, slab=slab)


def same_rel(a: Rel, b: Rel) -> bool:
  if a.related != b.related or a.whole != b.whole or (a.broken is None) != (b.broken is None):
    return False
  if not a.related:
    return True
  return (same_coef(a.coef, b.coef) and a.slab == b.slab and len(a.pending) == len(b.pending)
          and all(A.find(x) is A.find(y) for x, y in zip(a.maps, b.maps)))


@rule("scan")
def scan(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  nc, ncarry = compat.scan_counts(eqn.params)
  sub, consts = compat.open_jaxpr(eqn.params["jaxpr"])
  old = S.pair(eqn, ins) if any(r.related for r in ins) else None
  if old is None or old.params["length"] != eqn.params["length"] or old.params["reverse"] != eqn.params["reverse"]:
    return _unrelated_loop(S, eqn, ins, "no matching scan in the old program" if old is None else
                           "the scan's length or direction changed")
  old_sub, old_consts = compat.open_jaxpr(old.params["jaxpr"])
  xs = [_drop_time(r) for r in ins[nc + ncarry:]]
  carry = [_carry_in(S, r, o, v) for r, o, v in zip(ins[nc:nc + ncarry], old.invars[nc:nc + ncarry],
                                                     old_sub.invars[nc:nc + ncarry])]
  const_in = [_inside(r, v) for r, v in zip(ins[:nc], old_sub.invars[:nc])]
  xs_in = [_inside(r, v) for r, v in zip(xs, old_sub.invars[nc + ncarry:])]
  outer_old = list(old.invars[:nc]) + [None] * ncarry + [None] * len(xs)
  for _ in range(_MAX_LOOP):
    B = body_scope(S, eqn, sub, old_sub, old_consts, ins, outer_old, "scan")
    outs = _run_body(B, sub, consts, const_in + carry + xs_in)
    nxt = [join(c, _carry_back(o, B.old, k, nc), B, eqn) for k, (c, o) in enumerate(zip(carry, outs))]
    if all(same_rel(x, y) for x, y in zip(nxt, carry)):
      break
    carry = nxt
  else:
    s = S.site(eqn, "the loop's carry relation did not settle")
    carry = [dataclasses.replace(c, broken=c.broken or s) if c.related else c for c in carry]
  S.bodies = getattr(S, "bodies", {})
  S.bodies[id(eqn)] = [B]
  res = [_final_carry(c, old, k) for k, c in enumerate(carry)]
  for k, o in enumerate(outs[ncarry:], start=ncarry):
    res.append(_add_time(_outside(o, B.old, old, k), eqn.params["length"]))
  return res


def _final_carry(c: Rel, old, k: int) -> Rel:
  return dataclasses.replace(c, ref=old.outvars[k], origin=None) if c.related else c


def _carry_in(S: Scope, r: Rel, old_atom, old_var) -> Rel:
  """The initial carry inside the body: a constant (zeros) is taken as related to the old one."""
  if r.is_const:
    rr = as_related(S, r, old_atom)
    r = rr if rr is not None else none(r.shape, r.dtype, NOVEL)
  return _inside(r, old_var)


def _carry_back(o: Rel, body: OldSide, k: int, nc: int) -> Rel:
  """Body output ``k`` as the carry of the next iteration (old body invar ``nc + k``)."""
  if not o.related:
    return o
  old_sub = body.jaxpr
  if not body.same(o.ref, old_sub.outvars[k]):
    return none(o.shape, o.dtype, NOVEL)
  return dataclasses.replace(o, ref=old_sub.invars[nc + k], origin=None)


def _drop_time(r: Rel) -> Rel:
  if not r.related:
    return dataclasses.replace(r, shape=r.shape[1:]) if not r.is_const else Rel(r.shape[1:], r.dtype, whole=NOVEL)
  origin = None if r.origin is None else (r.origin[0], r.origin[1][1:])
  broken = r.broken
  if not A.pin_identity(r.maps[0]):
    broken = broken or Site("scan", "the scanned-over axis of an input moved or changed length")
  return dataclasses.replace(r, shape=r.shape[1:], maps=r.maps[1:], slab=r.slab[1:], origin=origin,
                             broken=broken)


def _add_time(r: Rel, length: int) -> Rel:
  if not r.related:
    return dataclasses.replace(r, shape=(length,) + r.shape)
  return dataclasses.replace(r, shape=(length,) + r.shape, maps=(A.identity(length),) + r.maps,
                             slab=(0,) + r.slab)


def _unrelated_loop(S: Scope, eqn, ins, why: str) -> list[Rel]:
  if any(r.related for r in ins):
    S.site(eqn, why)
  return [none(tuple(o.aval.shape), o.aval.dtype, NOVEL) for o in eqn.outvars]


@rule("while")
def while_loop(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  old = S.pair(eqn, ins) if any(r.related for r in ins) else None
  if old is None or old.params["cond_nconsts"] != cn or old.params["body_nconsts"] != bn:
    return _unrelated_loop(S, eqn, ins, "no matching while loop in the old program")
  csub, cconsts = compat.open_jaxpr(p["cond_jaxpr"])
  bsub, bconsts = compat.open_jaxpr(p["body_jaxpr"])
  ocsub, occ = compat.open_jaxpr(old.params["cond_jaxpr"])
  obsub, obc = compat.open_jaxpr(old.params["body_jaxpr"])
  init = ins[cn + bn:]
  carry = [_carry_in(S, r, o, v) for r, o, v in zip(init, old.invars[cn + bn:], obsub.invars[bn:])]
  outer_b = list(old.invars[cn:cn + bn]) + [None] * len(init)
  outer_c = list(old.invars[:cn]) + [None] * len(init)
  for _ in range(_MAX_LOOP):
    C = body_scope(S, eqn, csub, ocsub, occ, ins, outer_c, "while_cond")
    cin = [_inside(r, v) for r, v in zip(ins[:cn], ocsub.invars[:cn])] + [
        _inside(r, v) for r, v in zip(carry, ocsub.invars[cn:])]
    pred = _run_body(C, csub, cconsts, cin)[0]
    if not (pred.is_const or (pred.related and pred.broken is None)):
      S.site(eqn, "the loop's condition differs from the old program's")
      return [none(tuple(o.aval.shape), o.aval.dtype, NOVEL) for o in eqn.outvars]
    B = body_scope(S, eqn, bsub, obsub, obc, ins, outer_b, "while")
    outs = _run_body(B, bsub, bconsts, [_inside(r, v) for r, v in zip(ins[cn:cn + bn], obsub.invars[:bn])]
                     + carry)
    nxt = [join(c, _carry_back(o, B.old, k, bn), B, eqn) for k, (c, o) in enumerate(zip(carry, outs))]
    if all(same_rel(x, y) for x, y in zip(nxt, carry)):
      break
    carry = nxt
  S.bodies = getattr(S, "bodies", {})
  S.bodies[id(eqn)] = [B]
  return [_final_carry(c, old, k) for k, c in enumerate(carry)]


@rule("cond")
def cond(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  index, ops = ins[0], ins[1:]
  old = S.pair(eqn, ins) if any(r.related for r in ins) else None
  branches = eqn.params["branches"]
  if old is None or len(old.params["branches"]) != len(branches):
    return _unrelated_loop(S, eqn, ins, "no matching cond in the old program")
  if not (index.is_const or (index.related and index.broken is None)):
    S.site(eqn, "the branch index differs from the old program's")
    return [none(tuple(o.aval.shape), o.aval.dtype, NOVEL) for o in eqn.outvars]
  chosen: range | list[int] = range(len(branches))
  if index.is_const and index.value() is not None:
    chosen = [int(np.clip(index.value(), 0, len(branches) - 1))]
  result, scopes = None, []
  for b in chosen:
    sub, consts = compat.open_jaxpr(branches[b])
    osub, oconsts = compat.open_jaxpr(old.params["branches"][b])
    B = body_scope(S, eqn, sub, osub, oconsts, ins[1:], list(old.invars[1:]), "cond")
    outs = _run_body(B, sub, consts, [_inside(r, v) for r, v in zip(ops, osub.invars)])
    outs = [_outside(o, B.old, old, k, offset=1) for k, o in enumerate(outs)]
    scopes.append(B)
    result = outs if result is None else [join(x, y, S, eqn) for x, y in zip(result, outs)]
  S.bodies = getattr(S, "bodies", {})
  S.bodies[id(eqn)] = scopes
  assert result is not None  # a cond has at least one branch
  return result
