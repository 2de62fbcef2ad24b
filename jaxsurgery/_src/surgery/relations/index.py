"""Indexing relation rules: ``gather`` and ``dynamic_slice`` (tables looked up by ids).

* Indexed axes (an embedding's rows, a positional table's rows): the ids select
  the same rows in both programs only if every old row keeps its index. A table
  grown at the end keeps them; the report states the assumption that ids stay
  below the old size. Rows that moved break the relation.
* Fully sliced axes keep their maps (an embedding's columns follow the model width).
* The ids themselves must be unchanged. ``jnp``'s wrap-around of negative ids,
  ``select_n(i < 0, i, i + n)``, differs between sizes; for non-negative ids it is
  ``i`` (also stated as an assumption).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import maps as A
from .engine import RULES, Scope, out_shape, rule
from .values import CONST, NOVEL, ZERO, Rel, none


def _ids_unchanged(r: Rel) -> bool:
  return r.is_const or (r.related and r.broken is None and abs(r.coef - 1.0) < 1e-12)


def _rows_kept(S: Scope, table: Rel, axis: int, ids, what: str) -> str | None:
  """None if the old rows keep their index along ``axis`` (else the reason)."""
  m = A.find(table.maps[axis])
  src = A.resolve(m)
  n_old = m.n_old
  if ids is not None:
    ids = np.asarray(ids).reshape(-1)
    ids = np.where(ids < 0, ids + table.shape[axis], ids)
    ids = ids[(ids >= 0) & (ids < len(src))]
    ok = bool(np.all(src[ids] == ids))
    return None if ok else f"rows selected by constant ids of {what} moved"
  k = min(n_old, len(src))
  if not np.array_equal(src[:k], np.arange(k)):
    return f"the rows of {what} moved, so the same ids select other rows"
  if len(src) < n_old:
    return f"{what} lost rows {len(src)}..{n_old - 1}; ids that selected them now fail"
  if len(src) > n_old:
    S.P.assumptions.add(f"ids into axis {axis} of a table grown from {n_old} to {len(src)} rows "
                        f"are assumed below {n_old}")
  return None


@rule("gather")
def gather(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  table, idx = ins
  shape, dtype = out_shape(eqn), eqn.outvars[0].aval.dtype
  if not table.related:
    return [none(shape, dtype, table.whole if table.whole is not None else CONST)]
  old = S.pair(eqn, ins)
  p = eqn.params
  dn = p["dimension_numbers"]
  why = None
  if old is None:
    why = "no matching gather in the old program"
  elif old.params["dimension_numbers"] != dn or old.params["mode"] != p["mode"]:
    why = "the gather's indexing differs from the old program's"
  elif dn.operand_batching_dims:
    why = None if all(A.pin_identity(m) for m in table.maps) else "batched gather with changed sizes"
  elif not _ids_unchanged(idx):
    why = "the ids differ from the old program's"
  if why is None:
    ids: Any = idx.value() if idx.is_const else None
    if idx.is_const and not np.array_equal(ids, S.old_const(old.invars[1])):
      why = "the constant ids differ from the old program's"
    for a in dn.start_index_map:
      if why is None and p["slice_sizes"][a] == 1:
        why = _rows_kept(S, table, a, ids, f"gathered operand axis {a}")
      elif why is None and p["slice_sizes"][a] != old.params["slice_sizes"][a]:
        why = "the gathered window changed size"
  if why is not None:
    s = S.site(eqn, why)
    return [Rel(shape, dtype, ref=None if old is None else old.outvars[0], broken=s,
                maps=tuple(A.identity(n) for n in shape), slab=tuple(NOVEL for _ in shape),
                whole=NOVEL if old is None else None)]
  return [_gather_rel(eqn, old, table, idx, shape, dtype)]


def _gather_rel(eqn, old, table: Rel, idx: Rel, shape, dtype) -> Rel:
  dn = eqn.params["dimension_numbers"]
  sizes = eqn.params["slice_sizes"]
  offset_src = [a for a in range(table.ndim) if a not in dn.collapsed_slice_dims]
  maps: list[A.AxisMap | None] = [None] * len(shape)
  slab = [ZERO] * len(shape)
  axes: list[int | None] = [None] * len(shape)
  for o, a in zip(dn.offset_dims, offset_src):
    full = sizes[a] == table.shape[a]
    maps[o] = table.maps[a] if full else A.identity(shape[o])
    slab[o] = table.slab[a] if full else ZERO
    axes[o] = a
  batch_out = [o for o in range(len(shape)) if o not in dn.offset_dims]
  idx_axes = list(range(idx.ndim - 1))
  for o, a in zip(batch_out, idx_axes):
    maps[o] = idx.maps[a] if idx.related else A.identity(shape[o])
    slab[o] = idx.slab[a] if idx.related else ZERO
  origin = None
  if table.origin is not None:
    origin = (table.origin[0], tuple(None if a is None else table.origin[1][a] for a in axes))
  return Rel(shape, dtype, ref=old.outvars[0], maps=tuple(maps), coef=table.coef,
             broken=table.broken or (idx.broken if idx.related else None), slab=tuple(slab),
             origin=origin)


@rule("dynamic_slice")
def dynamic_slice(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  x, starts = ins[0], ins[1:]
  shape, dtype = out_shape(eqn), eqn.outvars[0].aval.dtype
  if not x.related:
    return [none(shape, dtype, x.whole if x.whole is not None else CONST)]
  old = S.pair(eqn, ins)
  why = None if old is not None else "no matching dynamic_slice in the old program"
  maps, slab = [], []
  for a in range(x.ndim):
    n, size = x.shape[a], eqn.params["slice_sizes"][a]
    if why is None:
      o_n, o_size = old.invars[0].aval.shape[a], old.params["slice_sizes"][a]
      if size == n and o_size == o_n:
        maps.append(x.maps[a])
        slab.append(x.slab[a])
        continue
      st = starts[a]
      if not _ids_unchanged(st) or size != o_size:
        why = "the slice window or its start changed"
      elif st.is_const and not np.array_equal(st.value(), S.old_const(old.invars[1 + a])):
        why = "the slice start changed"
      else:
        why = _rows_kept(S, x, a, None, f"sliced axis {a}")
    maps.append(A.identity(size))
    slab.append(ZERO)
  if why is not None:
    s = S.site(eqn, why)
    return [Rel(shape, dtype, ref=None if old is None else old.outvars[0], broken=s,
                maps=tuple(A.identity(n) for n in shape), slab=tuple(NOVEL for _ in shape),
                whole=NOVEL if old is None else None)]
  return [Rel(shape, dtype, ref=old.outvars[0], maps=tuple(maps), coef=x.coef, broken=x.broken,
              slab=tuple(slab), origin=x.origin)]


def _outer(S: Scope, var):
  """``var`` seen from the outermost enclosing call: a body's invar is its call's operand."""
  while S.producer.get(id(var)) is None:
    outside = S.call_operand(var)
    if outside is None:
      break
    S, var = outside
  return S, var


def wrap_pattern(S: Scope, eqn) -> int | None:
  """The position of ``x`` if ``eqn`` is ``select_n(x < 0, x, x + n)``, else None.

  If ``eqn`` is ``select_n(x < 0, x, x + n)``, the position of ``x`` among its operands (also when the select sits in
  a call of its own, as ``jnp.where`` does).
  """
  if eqn.primitive.name != "select_n" or len(eqn.invars) != 3:
    return None
  (Sp, pred), (Sx, x), (Sw, wrapped) = (_outer(S, v) for v in eqn.invars)
  lt, add = Sp.producer.get(id(pred)), Sw.producer.get(id(wrapped))
  if lt is None or add is None or lt.primitive.name != "lt" or add.primitive.name != "add":
    return None
  if _outer(Sp, lt.invars[0])[1] is not x or not _is_zero_literal(lt.invars[1]):
    return None
  if _outer(Sw, add.invars[0])[1] is not x:
    return None
  return 1


def _is_zero_literal(v) -> bool:
  val = getattr(v, "val", None)
  return val is not None and np.ndim(val) == 0 and val == 0


_elementwise = RULES["select_n"]


@rule("select_n")
def select_n(S: Scope, eqn, ins: list[Rel]) -> list[Rel]:
  k = wrap_pattern(S, eqn)
  if k is not None and ins[k].related and ins[2].broken is not None:
    old = S.pair(eqn, ins)
    if old is not None:
      S.P.assumptions.add("integer ids are assumed non-negative (negative ids wrap around by the "
                          "table size, which changed)")
      x = ins[k]
      return [Rel(x.shape, x.dtype, ref=old.outvars[0], maps=x.maps, coef=x.coef, broken=x.broken,
                  slab=x.slab)]
  return _elementwise(S, eqn, ins)
