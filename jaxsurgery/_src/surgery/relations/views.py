"""Data-movement relation rules: the same movement applied to the axis maps.

* ``transpose``/``squeeze``/``broadcast_in_dim``: maps move with their axes; a
  broadcast axis holds one value repeated, so it fits any map (``Bcast``).
* ``reshape``: merged axes become a grid (``Kron``) of their maps; a split axis
  is factored (a Free parameter axis becomes a grid of Free factors).
* ``slice``/``split``/``concatenate``/``pad``/``rev``: positions are moved and
  renumbered against the old op's own slice, pieces and padding.
"""

from __future__ import annotations

import numpy as np

from jaxsurgery._src.rules.common import reshape_groups

from . import maps as A
from .elementwise import _kind_of
from .engine import Scope, out_shape, rule
from .values import CONST, NOVEL, ZERO, Rel, join, none


def _moved(S: Scope, eqn, x: Rel, maps, slab, origin_axes=None, j: int = 0, old=None) -> Rel:
  shape = out_shape(eqn, j)
  origin = None
  if x.origin is not None and origin_axes is not None:
    origin = (x.origin[0], tuple(None if a is None else x.origin[1][a] for a in origin_axes))
  keep_term = eqn.primitive.name in ("reshape", "broadcast_in_dim", "squeeze")
  missing: tuple = ()
  if x.missing and origin_axes is not None and eqn.primitive.name in ("broadcast_in_dim", "transpose", "squeeze"):
    missing = tuple((j, ent) for a, ent in x.missing for j, oa in enumerate(origin_axes) if oa == a)
  return Rel(shape, eqn.outvars[j].aval.dtype, ref=old.outvars[j], maps=tuple(maps), coef=x.coef,
             broken=x.broken, slab=tuple(slab), origin=origin, scaled_at=x.scaled_at,
             term=x.term if keep_term else None, extras=x.extras if keep_term else (), missing=missing)


def _unrelated(eqn, x: Rel, extra_kind: int | None = None) -> list[Rel]:
  """A view of a value with no old counterpart (it stays a view of its parameter, if it is one)."""
  kind = x.whole if extra_kind is None else join(x.whole, extra_kind)
  outs = []
  for o in eqn.outvars:
    shape = tuple(o.aval.shape)
    origin = None if x.origin is None else (x.origin[0], (None,) * len(shape))
    outs.append(none(shape, o.aval.dtype, kind, origin=origin))
  return outs


def _paired(S: Scope, eqn, ins):
  old = S.pair(eqn, ins)
  if old is None:
    s = S.site(eqn, "the old program has no such operation on these values")
    shape = out_shape(eqn)
    return None, [Rel(shape, eqn.outvars[0].aval.dtype, ref=None, whole=NOVEL, broken=s)
                  for _ in eqn.outvars]
  return old, None


def _view_rule(*names: str, paired: int | None = None, unrelated_kind=None):
  """Registers ``fn(S, eqn, ins, old)`` for a view of ``ins[0]``.

  A view of a value with no old counterpart stays unrelated (``unrelated_kind(ins)``
  joins its new positions' kind); an eqn the old program lacks (paired on the first
  ``paired`` operands, default all) is broken. ``fn`` sees only the paired case.
  """
  def register(fn):
    @rule(*names)
    def view(S, eqn, ins):
      x = ins[0]
      if not x.related:
        return _unrelated(eqn, x, None if unrelated_kind is None else unrelated_kind(ins))
      old, fail = _paired(S, eqn, ins if paired is None else ins[:paired])
      return fail if fail else fn(S, eqn, ins, old)
    return fn
  return register


@_view_rule("transpose")
def transpose(S, eqn, ins, old):
  x = ins[0]
  perm = list(eqn.params["permutation"])
  if list(old.params["permutation"]) != perm:
    return [_broken(S, eqn, old, "the transpose differs from the old program's")]
  return [_moved(S, eqn, x, [x.maps[p] for p in perm], [x.slab[p] for p in perm], perm, old=old)]


@_view_rule("squeeze")
def squeeze(S, eqn, ins, old):
  x = ins[0]
  dims = {d % x.ndim for d in eqn.params["dimensions"]}
  keep = [a for a in range(x.ndim) if a not in dims]
  return [_moved(S, eqn, x, [x.maps[a] for a in keep], [x.slab[a] for a in keep], keep, old=old)]


@_view_rule("broadcast_in_dim", paired=1)
def broadcast_in_dim(S, eqn, ins, old):
  x = ins[0]
  shape, old_shape = out_shape(eqn), tuple(old.outvars[0].aval.shape)
  if len(shape) != len(old_shape) or tuple(eqn.params["broadcast_dimensions"]) != tuple(
      old.params["broadcast_dimensions"]):
    return [_broken(S, eqn, old, "the broadcast differs from the old program's")]
  bd = list(eqn.params["broadcast_dimensions"])
  maps: list[A.AxisMap] = []
  slab: list[int] = []
  axes: list[int | None] = []
  for b in range(len(shape)):
    if b in bd and x.shape[bd.index(b)] == shape[b]:
      a = bd.index(b)
      maps.append(x.maps[a])
      slab.append(x.slab[a])
      axes.append(a)
    else:
      maps.append(A.Bcast(shape[b], old_shape[b]))
      slab.append(CONST)
      axes.append(None)
  return [_moved(S, eqn, x, maps, slab, axes, old=old)]


def _broken(S, eqn, old, why: str) -> Rel:
  s = S.site(eqn, why)
  shape = out_shape(eqn)
  return Rel(shape, eqn.outvars[0].aval.dtype, ref=old.outvars[0],
             maps=tuple(A.identity(n) for n in shape), broken=s, slab=tuple(NOVEL for _ in shape))


@_view_rule("reshape", paired=1)
def reshape(S, eqn, ins, old):
  x = ins[0]
  if eqn.params.get("dimensions") is not None or old.params.get("dimensions") is not None:
    return [_broken(S, eqn, old, "reshape with a dimensions permutation is not followed")]
  in_n, out_n = x.shape, out_shape(eqn)
  in_o, out_o = tuple(old.invars[0].aval.shape), tuple(old.outvars[0].aval.shape)
  if len(in_n) != len(in_o) or len(out_n) != len(out_o):
    return [_broken(S, eqn, old, "the reshape changes rank differently from the old program's")]
  groups = reshape_groups(in_n, out_n)
  if [g for g in groups] != [g for g in reshape_groups(in_o, out_o)]:
    groups = _common_groups(in_n, out_n, in_o, out_o)
    if groups is None:
      return [_broken(S, eqn, old, f"the reshape {in_n}->{out_n} groups axes differently from the "
                                   f"old {in_o}->{out_o}")]
  maps, slab, axes = [None] * len(out_n), [None] * len(out_n), [None] * len(out_n)
  try:
    for gi, gj in groups:
      _reshape_group(x, gi, gj, in_o, out_n, out_o, maps, slab, axes)
  except _NotAGrid as e:
    return [_broken(S, eqn, old, str(e))]
  return [_moved(S, eqn, x, maps, slab, axes, old=old)]


class _NotAGrid(Exception):
  pass


def _common_groups(in_n, out_n, in_o, out_o):
  """Groups valid for both shapes (the coarsest common refinement), or None."""
  merged = []
  gn, go = reshape_groups(in_n, out_n), reshape_groups(in_o, out_o)
  i = j = 0
  while i < len(gn) and j < len(go):
    ai, aj = list(gn[i][0]), list(gn[i][1])
    bi, bj = list(go[j][0]), list(go[j][1])
    i, j = i + 1, j + 1
    while ai[-1] != bi[-1] or aj[-1] != bj[-1]:
      if ai[-1] < bi[-1] or aj[-1] < bj[-1]:
        if i >= len(gn):
          return None
        ai += gn[i][0]
        aj += gn[i][1]
        i += 1
      else:
        if j >= len(go):
          return None
        bi += go[j][0]
        bj += go[j][1]
        j += 1
    merged.append((sorted(set(ai)), sorted(set(aj))))
  return merged if i == len(gn) and j == len(go) else None


def _reshape_group(x, gi, gj, in_o, out_n, out_o, maps, slab, axes):
  big_in = [a for a in gi if x.shape[a] > 1 or in_o[a] > 1]
  big_out = [b for b in gj if out_n[b] > 1 or out_o[b] > 1]
  for b in gj:
    if b not in big_out:
      maps[b], slab[b] = A.identity(1), ZERO
  if not big_out:
    return
  if len(big_in) == 1:
    m = x.maps[big_in[0]]
  elif not big_in:
    m = A.identity(1)
  else:
    m = A.Kron([x.maps[a] for a in big_in])
  kind = join(*[x.slab[a] for a in big_in]) if big_in else ZERO
  param_axis = big_in[0] if len(big_in) == 1 else None
  if len(big_out) == 1:
    maps[big_out[0]], slab[big_out[0]], axes[big_out[0]] = m, kind, param_axis
    return
  parts = A.factor(m, [out_n[b] for b in big_out], [out_o[b] for b in big_out])
  if parts is None:
    raise _NotAGrid(f"the reshape splits an axis whose positions do not form a "
                    f"{'x'.join(str(out_o[b]) for b in big_out)} grid")
  for b, p in zip(big_out, parts):
    maps[b], slab[b], axes[b] = p, kind, param_axis


@_view_rule("rev")
def rev(S, eqn, ins, old):
  x = ins[0]
  dims = set(eqn.params["dimensions"])
  maps = list(x.maps)
  for a in dims:
    src = A.resolve(x.maps[a])[::-1]
    n_old = x.maps[a].n_old
    maps[a] = A.Fixed(np.where(src < 0, -1, n_old - 1 - src), n_old)
  return [_moved(S, eqn, x, maps, x.slab, list(range(x.ndim)), old=old)]


def _slice_axis(m: A.AxisMap, n: int, start: int, limit: int, stride: int,
                o_start: int, o_limit: int, o_stride: int, o_n: int):
  """The map of ``x[start:limit:stride]`` against the old ``x[o_start:o_limit:o_stride]``."""
  o_size = max(0, -(-(o_limit - o_start) // o_stride))
  if (start, limit, stride) == (0, n, 1) and (o_start, o_limit, o_stride) == (0, o_n, 1):
    return m, False
  if stride == 1 and o_stride == 1 and isinstance(A.find(m), (A.Free, A.Cat)):
    parts = A.split(m, [start, limit - start, n - limit], [o_start, o_limit - o_start, o_n - o_limit])
    return parts[1], False
  src = A.resolve(m)[start:limit:stride]
  t = src - o_start
  ok = (src >= 0) & (t >= 0) & (t % o_stride == 0) & (t // o_stride < o_size)
  lost = bool(((src >= 0) & ~ok).any())  # old values that are not in the old slice
  return A.Fixed(np.where(ok, t // o_stride, -1), o_size), lost


@rule("slice")
def slice_rule(S, eqn, ins):
  x = ins[0]
  if not x.related:
    return _unrelated(eqn, x)
  old = S.pair(eqn, ins)
  if old is None:
    return [_unpaired_slice(eqn, x)]
  p, q = eqn.params, old.params
  in_o = tuple(old.invars[0].aval.shape)
  strides = p["strides"] or (1,) * x.ndim
  o_strides = q["strides"] or (1,) * x.ndim
  maps, slab = [], []
  for a in range(x.ndim):
    m, lost = _slice_axis(x.maps[a], x.shape[a], p["start_indices"][a], p["limit_indices"][a],
                          strides[a], q["start_indices"][a], q["limit_indices"][a], o_strides[a],
                          in_o[a])
    maps.append(m)
    slab.append(join(x.slab[a], CONST) if lost else x.slab[a])
  return [_moved(S, eqn, x, maps, slab, list(range(x.ndim)), old=old)]


def _unpaired_slice(eqn, x: Rel) -> Rel:
  """A slice the old program does not take: the kept positions still index the old value."""
  p = eqn.params
  strides = p["strides"] or (1,) * x.ndim
  maps = []
  for a in range(x.ndim):
    s, l, st = p["start_indices"][a], p["limit_indices"][a], strides[a]
    if (s, l, st) == (0, x.shape[a], 1):
      maps.append(x.maps[a])
    else:
      maps.append(A.Fixed(A.resolve(x.maps[a])[s:l:st], A.find(x.maps[a]).n_old))
  return Rel(out_shape(eqn), eqn.outvars[0].aval.dtype, ref=x.ref, maps=tuple(maps), coef=x.coef,
             broken=x.broken, slab=x.slab, origin=x.origin)


@_view_rule("split")
def split(S, eqn, ins, old):
  x = ins[0]
  axis = eqn.params["axis"]
  if old.params["axis"] != axis or len(old.params["sizes"]) != len(eqn.params["sizes"]):
    return [_broken(S, eqn, old, "the split differs from the old program's") for _ in eqn.outvars]
  parts = A.split(x.maps[axis], list(eqn.params["sizes"]), list(old.params["sizes"]))
  outs = []
  for j, part in enumerate(parts):
    maps = list(x.maps)
    maps[axis] = part
    outs.append(_moved(S, eqn, x, maps, x.slab, list(range(x.ndim)), j=j, old=old))
  return outs


@rule("concatenate")
def concatenate(S, eqn, ins):
  dim = eqn.params["dimension"]
  shape = out_shape(eqn)
  dtype = eqn.outvars[0].aval.dtype
  related = [k for k, r in enumerate(ins) if r.related]
  if not related:
    return [none(shape, dtype, join(*(r.whole if r.whole is not None else CONST for r in ins)))]
  old = _pair_concat(S, eqn, ins)
  if old is None:
    if len(related) == 1:  # the old program had one piece: no concatenate at all
      ref, old_ins = ins[related[0]].ref, {related[0]: 0}
      old_sizes = {related[0]: ins[related[0]].maps[dim].n_old}
    else:
      s = S.site(eqn, "the old program concatenates other pieces")
      return [Rel(shape, dtype, whole=NOVEL, broken=s)]
  else:
    ref = old.outvars[0]
    old_ins = _concat_slots(S.old, ins, old)
    old_sizes = {k: old.invars[j].aval.shape[dim] for k, j in old_ins.items()}
  return [_concat_rel(S, eqn, ins, dim, shape, dtype, ref, old_ins, old_sizes)]


def _concat_rel(S, eqn, ins, dim, shape, dtype, ref, old_ins, old_sizes) -> Rel:
  pieces: list[A.AxisMap] = []
  kinds, coefs, broken = [], [], None
  others: list = [None] * len(shape)  # AxisMap | None per axis
  for k, r in enumerate(ins):
    n = r.shape[dim]
    if k not in old_ins:
      pieces.append(A.Fixed(np.full(n, -1), 0))
      kinds.append(r.whole if not r.related and not r.is_const else _kind_of(r.value())
                   if r.is_const else NOVEL)
      continue
    if r.is_const:
      s = S.site(eqn, "a constant piece is not followed")
      return Rel(shape, dtype, ref=ref, maps=tuple(A.identity(n) for n in shape), broken=s,
                 slab=tuple(NOVEL for _ in shape))
    piece = r.maps[dim] if r.maps[dim].n_old == old_sizes[k] else A.Fixed(
        np.where(A.resolve(r.maps[dim]) < old_sizes[k], A.resolve(r.maps[dim]), -1), old_sizes[k])
    inner = A.find(piece)
    pieces.extend(inner.parts if isinstance(inner, A.Cat) and inner.kind == "concat" else [piece])
    kinds.append(r.slab[dim])
    coefs.append(r.coef)
    broken = broken or r.broken
    for a in range(len(shape)):
      if a != dim:
        others[a] = r.maps[a] if others[a] is None else A.unify(others[a], r.maps[a])
  if coefs and not all(abs(c - coefs[0]) <= 1e-6 * abs(coefs[0]) for c in coefs):
    broken = broken or S.site(eqn, "pieces rescaled differently are concatenated")
  maps = [others[a] if a != dim else _foreign(A.Cat(pieces, kind="concat")) for a in range(len(shape))]
  maps = [m if m is not None else A.identity(n) for m, n in zip(maps, shape)]
  slab = []
  for a in range(len(shape)):
    if a == dim:
      slab.append(join(*kinds) if kinds else ZERO)
    else:
      slab.append(join(*(r.slab[a] if r.related else (r.whole if r.whole is not None else CONST)
                         for r in ins)))
  return Rel(shape, dtype, ref=ref, maps=tuple(maps), coef=coefs[0] if coefs else 1.0,
             broken=broken, slab=tuple(slab))


def _foreign(cat: A.Cat) -> A.AxisMap:
  """Features that moved between input leaves find their old place in the concatenation."""
  parts = [A.find(p) for p in cat.parts]
  if not any(isinstance(p, A.Fixed) and p.foreign for p in parts):
    return cat
  offsets, start = {}, 0
  for p in parts:
    if isinstance(p, A.Fixed) and p.leaf is not None:
      offsets[p.leaf] = start
    start += p.n_old
  src = A.resolve(cat).copy()
  new_start = 0
  for p in parts:
    if isinstance(p, A.Fixed):
      for i, (leaf, pos) in p.foreign.items():
        if leaf in offsets:
          src[new_start + i] = offsets[leaf] + pos
    new_start += p.n_new
  return A.Fixed(src, cat.n_old, "features (across input leaves)")


def _pair_concat(S, eqn, ins):
  """The old concatenate whose operands appear, in order, among the new operands' counterparts."""
  refs = [r.ref for r in ins if r.related]
  first = next(r for r in ins if r.related)
  for i, _ in S.old.consumers.get(id(S.old.canonical(first.ref)), ()):
    cand = S.old.jaxpr.eqns[i]
    if cand.primitive.name != "concatenate" or cand.params["dimension"] != eqn.params["dimension"]:
      continue
    olds = list(cand.invars)
    it = iter(olds)
    if all(any(S.old.same(o, ref) for o in it) for ref in refs):
      S.old.paired.add(i)
      return cand
  return None


def _concat_slots(old_side, ins, old) -> dict[int, int]:
  """New operand index -> old operand index (related operands by identity, in order)."""
  out, j = {}, 0
  olds = list(old.invars)
  for k, r in enumerate(ins):
    if not r.related:
      continue
    while j < len(olds) and not old_side.same(olds[j], r.ref):
      j += 1
    if j < len(olds):
      out[k] = j
      j += 1
  return out


def _pad_kind(ins) -> int:
  """What a pad writes at its padded positions."""
  value = ins[1]
  return _kind_of(value.value()) if value.is_const else NOVEL


@_view_rule("pad", paired=1, unrelated_kind=_pad_kind)
def pad(S, eqn, ins, old):
  x, pad_kind = ins[0], _pad_kind(ins)
  cfg, ocfg = eqn.params["padding_config"], old.params["padding_config"]
  maps, slab = [], []
  for a, ((lo, hi, it), (olo, ohi, oit)) in enumerate(zip(cfg, ocfg)):
    if (lo, hi, it) == (olo, ohi, oit) and x.shape[a] == old.invars[0].aval.shape[a]:
      maps.append(x.maps[a])
      slab.append(x.slab[a])
      continue
    if it or oit:
      return [_broken(S, eqn, old, "interior padding changed")]
    n_out, o_out = out_shape(eqn)[a], old.outvars[0].aval.shape[a]
    src = A.resolve(x.maps[a])
    i = np.arange(n_out) - lo
    inside = (i >= 0) & (i < x.shape[a])
    s = np.where(inside, src[np.clip(i, 0, max(x.shape[a] - 1, 0))], -1)
    t = np.where(s >= 0, s + olo, -1)
    t = np.where((t >= 0) & (t < o_out), t, -1)
    maps.append(A.Fixed(t, o_out))
    # x's slab describes x's own new positions: only if it has some do they join the padding's
    slab.append(join(x.slab[a], pad_kind) if (src < 0).any() else pad_kind)
  return [_moved(S, eqn, x, maps, slab, list(range(x.ndim)), old=old)]


