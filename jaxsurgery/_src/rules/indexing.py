"""Indexed data movement: dynamic_slice, dynamic_update_slice, gather, scatter.

Structure with *static* indices (known constants, folded from literals and
closed-over arrays): each output element copies one operand element (or, for
scatter, combines the operand element with the updates that land on it). The
rules build the exact index map by binding the primitive on an ``iota`` of the
operand and move the masks along it. Exact.

Structure with *traced* indices: any element along an indexed axis could be
selected, so the rule ORs over those axes and adds the masks of the indices to
every output element. The selected-from parameter (e.g. an embedding table) is
touched by the indices' masks ("any row could be selected").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from jax import lax

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.values import Val, join_pulls, out_val
from jaxsurgery._src.rules.common import all_words, concrete_ints, cut_pull, forward_pull, place
from jaxsurgery._src.rules.registry import add_traits, register
from jaxsurgery._src.rules.structural import slice_bwd, slice_fwd

if TYPE_CHECKING:  # the interpreter imports the rules
  from jaxsurgery._src.compat import Eqn
  from jaxsurgery._src.core.interpreter import Context


def _select_touches(ctx, data, index_vals):
  """Selection: data operands are touched by the indices' masks, indices by the data."""
  idx_words = all_words(index_vals)
  for v in data:
    ctx.touch(v, M.uniform(idx_words, v.ndim))
  data_words = all_words(data)
  for v in index_vals:
    ctx.touch(v, M.uniform(data_words, v.ndim))
  return idx_words


# -- dynamic_slice / dynamic_update_slice -------------------------------------

def dynamic_slice(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[i] = x[start + i]`` (starts clamped).

  Static starts: an exact slice. Traced: OR over the sliced axes plus the starts' masks
  on every element.
  """
  x, idx = invals[0], invals[1:]
  sizes = tuple(eqn.params["slice_sizes"])
  starts = concrete_ints(idx)
  idx_words = _select_touches(ctx, [x], idx)
  out = eqn.outvars[0]
  if starts is not None:
    first = [int(np.clip(int(s), 0, n - k)) for s, n, k in zip(starts, x.shape, sizes)]
    limits = [s + k for s, k in zip(first, sizes)]
    ones = [1] * x.ndim
    mask = None if x.mask is None else slice_fwd(M.lift(x.mask, x.ndim), first, limits, ones)
    return [out_val(out, mask, forward_pull(x, lambda t: slice_bwd(t, x.shape, first, limits, ones)))]
  moving = [a for a in range(x.ndim) if sizes[a] < x.shape[a]]
  mask = M.orr(M.reduce_or(M.lift(x.mask, x.ndim), moving, keepdims=True), M.uniform(idx_words, x.ndim))
  return [out_val(out, mask, cut_pull([(x, lambda t: M.reduce_or(t, moving, keepdims=True))], mask))]


def dynamic_update_slice(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out = x`` with ``out[start + i] = upd[i]`` (starts clamped).

  Static starts: the region takes ``upd``'s mask, the rest keeps ``x``'s (compressed axes
  expanded only where the region cuts them). Traced: ``x``'s mask OR ``upd``'s spread
  over the moving axes, plus the starts' masks.
  """
  x, upd, idx = invals[0], invals[1], invals[2:]
  out = eqn.outvars[0]
  starts = concrete_ints(idx)
  idx_words = _select_touches(ctx, [x, upd], idx)
  moving = [a for a in range(x.ndim) if upd.shape[a] < x.shape[a]]
  if starts is not None:
    first = [int(np.clip(int(s), 0, n - k)) for s, n, k in zip(starts, x.shape, upd.shape)]
    region = tuple(slice(s, s + k) for s, k in zip(first, upd.shape))
    if x.mask is None and upd.mask is None:
      mask = None
    else:
      base = x.mask if x.mask is not None else np.zeros((1,) * x.ndim + (ctx.W,), M.WORD)
      base = M.lift(base, x.ndim)
      upd_full = [] if upd.mask is None else [a for a in range(x.ndim) if M.lift(upd.mask, x.ndim).shape[a] > 1]
      shape = [x.shape[a] if (a in moving or base.shape[a] > 1 or a in upd_full) else 1 for a in range(x.ndim)]
      mask = np.array(np.broadcast_to(base, tuple(shape) + (ctx.W,)))
      reg = tuple(r if shape[a] > 1 else slice(None) for a, r in enumerate(region))
      mask[reg] = 0 if upd.mask is None else M.lift(upd.mask, x.ndim)

    def to_x(t):
      t = np.array(M.expand_axes(M.lift(t, x.ndim), x.shape, moving))
      t[tuple(r if t.shape[a] > 1 else slice(None) for a, r in enumerate(region))] = 0
      return t

    def to_upd(t):
      t = M.lift(t, x.ndim)
      return t[tuple(r if t.shape[a] > 1 else slice(None) for a, r in enumerate(region))]
    return [out_val(out, mask, join_pulls(forward_pull(x, to_x), forward_pull(upd, to_upd)))]
  upd_spread = M.reduce_or(M.lift(upd.mask, x.ndim), moving, keepdims=True)
  mask = M.orr(M.lift(x.mask, x.ndim), upd_spread, M.uniform(idx_words, x.ndim))
  pull = cut_pull([(x, lambda t: t), (upd, lambda t: M.reduce_or(t, moving, keepdims=True))], mask)
  return [out_val(out, mask, pull)]


# -- gather / scatter -----------------------------------------------------------

def _iota(shape):
  return np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.int32).reshape(shape)


def _take_rows(flat, src):
  """Rows of ``flat`` (N, W) at ``src`` (any shape, -1 = none)."""
  src = np.asarray(src)
  out = np.take(flat, np.clip(src, 0, None), axis=0)  # a copy, also for 0-d ``src``
  if (src < 0).any():
    out = np.where((src < 0)[..., None], M.WORD(0), out)
  return out


def _scatter_rows(rows, src, n, W):
  acc = np.zeros((n, W), M.WORD)
  valid = src.reshape(-1) >= 0
  np.bitwise_or.at(acc, src.reshape(-1)[valid], rows.reshape(-1, W)[valid])
  return acc


def gather(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[batch, offset] = x[idx[batch] + offset]`` (clip / fill modes).

  Static indices: the exact source of every output element, found by gathering an
  iota of ``x`` with the same parameters (fill: -1 = no source, empty mask).
  Traced: fully sliced operand axes keep their masks at their offset dims (and
  batching axes at their batch dims); indexed axes are ORed over; every output
  element also gets its index vector's mask. ``x`` is touched by the indices'
  masks everywhere (any row may be selected).
  """
  x, idx = invals
  indices = concrete_ints([idx])
  _select_touches(ctx, [x], [idx])
  if indices is not None and x.size < (1 << 26):
    return _gather_static(ctx, eqn, x, indices[0])
  return _gather_traced(eqn, x, idx)


def _gather_static(ctx: Context, eqn: Eqn, x: Val, indices: np.ndarray) -> list[Val]:
  """The exact source of every output element: the gather of an iota of ``x`` (-1: none)."""
  out = eqn.outvars[0]
  out_shape = tuple(out.aval.shape)
  p = eqn.params
  params = dict(p, fill_value=-1, mode=lax.GatherScatterMode.FILL_OR_DROP
                if p["mode"] == lax.GatherScatterMode.FILL_OR_DROP else p["mode"])
  src = np.asarray(lax.gather_p.bind(_iota(x.shape), indices.astype(np.int32), **params))
  if x.mask is None:
    mask = None
  elif all(s == 1 for s in x.mask.shape[:-1]):
    mask = np.where((src >= 0)[..., None], x.mask.reshape(-1), 0).astype(M.WORD) if (src < 0).any() \
        else M.uniform(x.mask.reshape(-1), len(out_shape))
  else:
    mask = _take_rows(M.materialize(x.mask, x.shape, ctx.W).reshape(-1, ctx.W), src)

  def to_x(t):
    t = M.materialize(M.lift(t, len(out_shape)), out_shape, t.shape[-1])
    return _scatter_rows(t, src, x.size, t.shape[-1]).reshape(x.shape + (t.shape[-1],))
  return [out_val(out, mask, forward_pull(x, to_x))]


def _gather_traced(eqn: Eqn, x: Val, idx: Val) -> list[Val]:
  """Traced indices: ``out[batch..., offset...] = x[idx[batch] + offset]``.

  Operand axes that are indexed (or windowed, or batching) are ORed over; fully
  sliced axes keep their mask and move to their offset dims. Every output element
  also depends on its batch position's index vector.
  """
  out = eqn.outvars[0]
  out_shape = tuple(out.aval.shape)
  p = eqn.params
  dn = p["dimension_numbers"]
  rank = len(out_shape)
  offset = list(dn.offset_dims)
  batch_axes = [a for a in range(rank) if a not in offset]
  obatch = list(getattr(dn, "operand_batching_dims", ()))
  ibatch = list(getattr(dn, "start_indices_batching_dims", ()))
  # where each operand axis lands in the output: fully or partly sliced axes at
  # their offset dim, batching axes at their indices' batch dim (vmap of a gather)
  kept = [a for a in range(x.ndim) if a not in dn.collapsed_slice_dims and a not in obatch]
  pos_of = dict(zip(kept, offset))
  pos_of.update({a: batch_axes[b] for a, b in zip(obatch, ibatch)})
  axes_in = sorted(pos_of)
  src = [pos_of[a] for a in axes_in]
  others = [o for o in range(rank) if o not in src]
  indexed = set(dn.start_index_map) | {a for a in kept if p["slice_sizes"][a] != x.shape[a]}
  reduced = sorted(indexed | (set(range(x.ndim)) - set(axes_in)))
  moved = [j for j, a in enumerate(axes_in) if a in indexed]
  idx_m = M.reduce_or(M.lift(idx.mask, idx.ndim), [idx.ndim - 1])
  idx_part = None if idx_m is None else place(idx_m, batch_axes, rank)
  x_part = None
  if x.mask is not None:
    xm = M.reduce_or(M.lift(x.mask, x.ndim), reduced, keepdims=True)
    x_part = place(xm.reshape([xm.shape[a] for a in axes_in] + [xm.shape[-1]]), src, rank)
  mask = M.orr(idx_part, x_part)

  def to_x(t):
    t = M.reduce_or(M.lift(t, rank), others, keepdims=True)
    t = t.transpose(src + others + [rank])
    t = t.reshape(t.shape[:len(src)] + t.shape[-1:])
    t = M.reduce_or(t, moved, keepdims=True)
    return place(t, axes_in, x.ndim)
  return [out_val(out, mask, cut_pull([(x, to_x)], mask))]


def _scatter_dest(x_shape, idx, upd_shape, dn, mode):
  """For each update element, the flat operand index it lands on (-1: dropped)."""
  slice_sizes, pos = [], 0
  for i in range(len(x_shape)):
    if i in dn.inserted_window_dims or i in getattr(dn, "operand_batching_dims", ()):
      slice_sizes.append(1)
    else:
      slice_sizes.append(upd_shape[dn.update_window_dims[pos]])
      pos += 1
  gdn = lax.GatherDimensionNumbers(
      offset_dims=dn.update_window_dims, collapsed_slice_dims=dn.inserted_window_dims,
      start_index_map=dn.scatter_dims_to_operand_dims,
      operand_batching_dims=getattr(dn, "operand_batching_dims", ()),
      start_indices_batching_dims=getattr(dn, "scatter_indices_batching_dims", ()))
  gmode = lax.GatherScatterMode.FILL_OR_DROP if mode == lax.GatherScatterMode.FILL_OR_DROP \
      else lax.GatherScatterMode.CLIP
  return np.asarray(lax.gather(_iota(x_shape), idx.astype(np.int32), gdn, tuple(slice_sizes),
                               mode=gmode, fill_value=-1))


def scatter(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``scatter`` overwrites; the others combine the operand with every update landing on it."""
  x, idx, upd = invals[:3]
  out = eqn.outvars[0]
  p = eqn.params
  combining = eqn.primitive.name != "scatter"
  indices = concrete_ints([idx])
  idx_words = _select_touches(ctx, [x, upd], [idx])
  if indices is not None and x.size < (1 << 26):
    dest = _scatter_dest(x.shape, indices[0], upd.shape, p["dimension_numbers"], p["mode"])
    W = ctx.W
    xm = M.materialize(M.lift(x.mask, x.ndim), x.shape, W).reshape(-1, W)
    um = M.materialize(M.lift(upd.mask, upd.ndim), upd.shape, W)
    acc = _scatter_rows(um, dest, x.size, W)
    hit = np.zeros(x.size, bool)
    hit[dest[dest >= 0]] = True
    if combining:
      ctx.touch(x, acc.reshape(x.shape + (W,)))
      ctx.touch(upd, _take_rows(xm, dest))
      flat = xm | acc
    else:
      flat = np.where(hit[:, None], acc, xm)
    mask = None if not flat.any() else M.compress(flat.reshape(x.shape + (W,)))

    def to_x(t):
      t = M.materialize(M.lift(t, x.ndim), x.shape, t.shape[-1]).reshape(-1, t.shape[-1])
      return (t if combining else np.where(hit[:, None], 0, t)).reshape(x.shape + (t.shape[-1],))

    def to_upd(t):
      t = M.materialize(M.lift(t, x.ndim), x.shape, t.shape[-1]).reshape(-1, t.shape[-1])
      return _take_rows(t, dest)
    pull = cut_pull([(x, to_x), (upd, to_upd)], mask if combining else None)
    return [out_val(out, mask, pull)]
  if combining:
    ctx.touch(x, M.uniform(M.reduce_all(upd.mask), x.ndim))
    ctx.touch(upd, M.uniform(M.reduce_all(x.mask), upd.ndim))
  spread = M.orr(M.reduce_all(upd.mask), idx_words)
  mask = M.orr(M.lift(x.mask, x.ndim), M.uniform(spread, x.ndim))
  pull = cut_pull([(x, lambda t: t), (upd, lambda t: M.uniform(M.reduce_all(t), upd.ndim))],
                  M.uniform(idx_words, x.ndim))
  return [out_val(out, mask, pull)]


register("dynamic_slice", dynamic_slice)
register("dynamic_update_slice", dynamic_update_slice)
register("gather", gather)
register(("scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min",
          "scatter_min", "scatter-max", "scatter_max", "scatter_sub", "scatter-sub"), scatter)

# What the probe needs beyond the mask rule (see registry.TRAITS).
add_traits(("gather", "dynamic_slice"), "indexed", "places")
add_traits(("dynamic_update_slice", "scatter", "scatter-add", "scatter_add"), "indexed", "additive")
