"""Data movement with static structure.

Structure: every output element is a copy of one input element (or of a
padding value), chosen by the op's static parameters. The forward rule applies
the same movement to the masks, keeping compressed (size-1) axes compressed
where the movement allows; the provenance pullback applies the transposed
movement, ORing where several outputs read one input (broadcast). Exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.values import Val, join_pulls, out_val
from jaxsurgery._src.rules.common import argsort, forward_pull, reshape_groups, unsqueeze
from jaxsurgery._src.rules.registry import add_traits, register

if TYPE_CHECKING:  # the interpreter imports the rules
  from jaxsurgery._src.compat import Eqn
  from jaxsurgery._src.core.interpreter import Context


def _one(eqn, x, fwd, bwd):
  return [out_val(eqn.outvars[0], None if x.mask is None else fwd(x.mask), forward_pull(x, bwd))]


# -- transpose / squeeze / broadcast_in_dim / reshape ------------------------

def transpose(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[p] = x[perm^-1(p)]``."""
  perm = list(eqn.params["permutation"])
  inv = argsort(perm)
  r = len(perm)
  return _one(eqn, invals[0], lambda m: m.transpose(perm + [r]),
              lambda t: M.lift(t, r).transpose(inv + [r]))


def squeeze(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Drops size-1 axes."""
  x = invals[0]
  dims = tuple(d % x.ndim for d in eqn.params["dimensions"])
  keep = lambda m: m.reshape(tuple(s for i, s in enumerate(m.shape[:-1]) if i not in dims) + m.shape[-1:])
  return _one(eqn, x, lambda m: keep(M.lift(m, x.ndim)),
              lambda t: unsqueeze(M.lift(t, x.ndim - len(dims)), dims))


def broadcast_in_dim_fwd(m, out_rank, bd):
  shape = [1] * out_rank + [m.shape[-1]]
  for i, d in enumerate(bd):
    shape[d] = m.shape[i]
  return m.reshape(shape)


def broadcast_in_dim_bwd(t, in_shape, out_shape, bd):
  t = M.lift(t, len(out_shape))
  other = [a for a in range(len(out_shape)) if a not in bd]
  ones = [d for i, d in enumerate(bd) if in_shape[i] == 1]
  t = M.reduce_or(t, other + ones, keepdims=True)
  return t.reshape([t.shape[d] for d in bd] + [t.shape[-1]])


def broadcast_in_dim(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[..., p_bd, ...] = x[p]``: new axes and size-1 axes are replicas."""
  x = invals[0]
  bd = tuple(eqn.params["broadcast_dimensions"])
  out_shape = tuple(eqn.outvars[0].aval.shape)
  return _one(eqn, x, lambda m: broadcast_in_dim_fwd(m, len(out_shape), bd),
              lambda t: broadcast_in_dim_bwd(t, x.shape, out_shape, bd))


def reshape_mask(m, in_shape, out_shape):
  """Reshapes a mask, keeping axis groups compressed when the whole group is."""
  if m is None:
    return None
  m = M.lift(m, len(in_shape))
  W = m.shape[-1]
  if all(s == 1 for s in m.shape[:-1]):
    return m.reshape((1,) * len(out_shape) + (W,))
  if 0 in in_shape or 0 in out_shape:
    return np.zeros(tuple(out_shape) + (W,), m.dtype)
  shape, expand = [], []
  for gi, gj in reshape_groups(tuple(in_shape), tuple(out_shape)):
    if all(m.shape[a] == 1 for a in gi):
      shape += [1] * len(gj)
    else:
      expand += gi
      shape += [out_shape[a] for a in gj]
  m = M.expand_axes(m, in_shape, expand)
  return m.reshape(tuple(shape) + (W,))


def reshape(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Row-major reshape; the dimensions parameter (if any) transposes first."""
  x = invals[0]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  dims = eqn.params.get("dimensions")
  if dims is not None:
    dims = list(dims)
    inv = argsort(dims)
    tshape = tuple(x.shape[d] for d in dims)
    return _one(eqn, x, lambda m: reshape_mask(m.transpose(dims + [x.ndim]), tshape, out_shape),
                lambda t: reshape_mask(t, out_shape, tshape).transpose(inv + [x.ndim]))
  return _one(eqn, x, lambda m: reshape_mask(m, x.shape, out_shape),
              lambda t: reshape_mask(t, out_shape, x.shape))


# -- slice / rev / pad --------------------------------------------------------

def slice_fwd(m, starts, limits, strides):
  idx = tuple(slice(None) if m.shape[a] == 1 else slice(s, l, st)
              for a, (s, l, st) in enumerate(zip(starts, limits, strides)))
  return m[idx]


def slice_bwd(t, in_shape, starts, limits, strides):
  t = M.lift(t, len(in_shape))
  full = [(s == 0 and l == n and st == 1) for s, l, st, n in zip(starts, limits, strides, in_shape)]
  shape = [1 if (t.shape[a] == 1 and full[a]) else in_shape[a] for a in range(len(in_shape))]
  out = np.zeros(tuple(shape) + t.shape[-1:], t.dtype)
  idx = tuple(slice(None) if shape[a] == 1 else slice(starts[a], limits[a], strides[a])
              for a in range(len(in_shape)))
  out[idx] = t
  return out


def slice_rule(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[i] = x[start + i * stride]``."""
  x = invals[0]
  starts = eqn.params["start_indices"]
  limits = eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * x.ndim
  return _one(eqn, x, lambda m: slice_fwd(m, starts, limits, strides),
              lambda t: slice_bwd(t, x.shape, starts, limits, strides))


def rev(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[i] = x[n - 1 - i]`` along the reversed axes."""
  dims = eqn.params["dimensions"]
  x = invals[0]

  def flip(m):
    m = M.lift(m, x.ndim)
    axes = tuple(d for d in dims if m.shape[d] > 1)
    return np.flip(m, axes) if axes else m
  return _one(eqn, x, flip, flip)


def _pad_axis(m, axis, lo, hi, interior, n_out, fill):
  """Pads one axis of a (materialised along ``axis``) mask."""
  n = m.shape[axis]
  pos = np.arange(n) * (interior + 1) + lo
  keep = (pos >= 0) & (pos < n_out)
  shape = list(m.shape)
  shape[axis] = n_out
  out = np.empty(shape, m.dtype)
  out[...] = 0 if fill is None else fill
  dst = [slice(None)] * m.ndim
  src = [slice(None)] * m.ndim
  dst[axis], src[axis] = pos[keep], np.nonzero(keep)[0]
  out[tuple(dst)] = m[tuple(src)]
  return out


def _unpad_axis(t, axis, lo, interior, n_in):
  pos = np.arange(n_in) * (interior + 1) + lo
  keep = (pos >= 0) & (pos < t.shape[axis])
  shape = list(t.shape)
  shape[axis] = n_in
  out = np.zeros(shape, t.dtype)
  dst = [slice(None)] * t.ndim
  src = [slice(None)] * t.ndim
  dst[axis], src[axis] = np.nonzero(keep)[0], pos[keep]
  out[tuple(dst)] = t[tuple(src)]
  return out


def pad(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out`` holds ``x`` at strided positions and the padding value elsewhere."""
  x, padv = invals
  config = eqn.params["padding_config"]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  axes = [a for a, c in enumerate(config) if tuple(c) != (0, 0, 0)]
  fill = M.reduce_all(padv.mask)
  if x.mask is None and fill is None:
    mask = None
  else:
    m = x.mask if x.mask is not None else np.zeros((1,) * x.ndim + (ctx.W,), M.WORD)
    m = M.expand_axes(M.lift(m, x.ndim), x.shape, axes)
    for a in axes:
      lo, hi, it = config[a]
      m = _pad_axis(m, a, lo, hi, it, out_shape[a], fill)
    mask = m

  def to_x(t):
    t = M.expand_axes(M.lift(t, len(out_shape)), out_shape, axes)
    for a in axes:
      t = _unpad_axis(t, a, config[a][0], config[a][2], x.shape[a])
    return t
  pull = join_pulls(forward_pull(x, to_x), forward_pull(padv, M.reduce_all))
  return [out_val(eqn.outvars[0], mask, pull)]


# -- concatenate / split ------------------------------------------------------

def _join_masks(masks, sizes, d):
  """Masks laid side by side along axis ``d`` (operand k spans ``sizes[k]``)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  if len(present) == len(masks) and all(m.shape[d] == 1 for m in masks) and all(
      np.array_equal(masks[0], m) for m in masks[1:]):
    return masks[0]
  shape = list(present[0].shape)  # other axes: 1 (compressed) or full, so max is the broadcast
  for m in present[1:]:
    shape = [max(a, b) for a, b in zip(shape, m.shape)]
  shape[d] = int(sum(sizes))
  out = (np.empty if len(present) == len(masks) else np.zeros)(tuple(shape), M.WORD)
  idx = [slice(None)] * len(shape)
  start = 0
  for size, m in zip(sizes, masks):
    if m is not None:
      idx[d] = slice(start, start + size)
      out[tuple(idx)] = m
    start += size
  return out


def _join_pull(invals, sizes, d, rank, to_operand):
  """Pull for a join along ``d``: each operand receives its slab, mapped by ``to_operand``."""
  offsets = np.cumsum([0] + list(sizes))
  pulled = [(i, v) for i, v in enumerate(invals) if v.pull is not None]
  if not pulled:
    return None

  def pull(t):
    t = M.lift(t, rank)
    for i, v in pulled:
      part = t if t.shape[d] == 1 else np.take(t, np.arange(offsets[i], offsets[i + 1]), axis=d)
      part = to_operand(part)
      if not M.is_empty(part):
        v.pull(part)
  return pull


def concatenate(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Operands side by side along ``dimension``."""
  d = eqn.params["dimension"]
  rank = len(eqn.outvars[0].aval.shape)
  sizes = [v.shape[d] for v in invals]
  mask = _join_masks([M.lift(v.mask, rank) for v in invals], sizes, d)
  return [out_val(eqn.outvars[0], mask, _join_pull(invals, sizes, d, rank, lambda t: t))]


def _embed(t, axis: int, size: int, lo: int, hi: int):
  """``t`` placed at ``[lo, hi)`` along ``axis`` of zeros of size ``size`` there (a slab's pullback)."""
  shape = list(t.shape)
  shape[axis] = size
  full = np.zeros(shape, t.dtype)
  idx = [slice(None)] * t.ndim
  idx[axis] = slice(lo, hi)
  full[tuple(idx)] = t
  return full


def split(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Consecutive pieces of one axis."""
  x = invals[0]
  axis = eqn.params["axis"]
  sizes = eqn.params["sizes"]
  offsets = np.cumsum([0] + list(sizes))
  outs = []
  for k, o in enumerate(eqn.outvars):
    lo, hi = int(offsets[k]), int(offsets[k + 1])
    m = x.mask
    if m is not None and m.shape[axis] > 1:
      m = np.take(m, np.arange(lo, hi), axis=axis)

    to_x = lambda t, lo=lo, hi=hi: _embed(M.lift(t, x.ndim), axis, x.shape[axis], lo, hi)
    outs.append(out_val(o, m, forward_pull(x, to_x)))
  return outs


def stack(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[..., k, ...] = in_k``: a new axis at ``axis`` (a join of size-1 slabs)."""
  rank = len(eqn.outvars[0].aval.shape)
  d = eqn.params["axis"] % rank
  sizes = [1] * len(invals)
  masks = [None if v.mask is None else np.expand_dims(M.lift(v.mask, v.ndim), d) for v in invals]
  pull = _join_pull(invals, sizes, d, rank, lambda t: np.squeeze(t, axis=d))
  return [out_val(eqn.outvars[0], _join_masks(masks, sizes, d), pull)]


def unstack(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out_k = x[..., k, ...]`` along ``axis``."""
  x = invals[0]
  d = eqn.params["axis"] % x.ndim
  outs = []
  for k, o in enumerate(eqn.outvars):
    lifted = None if x.mask is None else M.lift(x.mask, x.ndim)
    m = None if lifted is None else np.take(lifted, 0 if lifted.shape[d] == 1 else k, axis=d)

    to_x = lambda t, k=k: _embed(np.expand_dims(M.lift(t, x.ndim - 1), d), d, x.shape[d], k, k + 1)
    outs.append(out_val(o, m, forward_pull(x, to_x)))
  return outs


def tile(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[i] = x[i mod n]`` along every axis."""
  x = invals[0]
  reps = tuple(eqn.params["reps"])

  def fwd(m):
    m = M.lift(m, x.ndim)
    return np.tile(m, tuple(r if m.shape[a] > 1 else 1 for a, r in enumerate(reps)) + (1,))

  def bwd(t):
    t = M.lift(t, x.ndim)
    for a, r in enumerate(reps):
      if t.shape[a] > 1 and r > 1:
        t = np.bitwise_or.reduce(t.reshape(t.shape[:a] + (r, x.shape[a]) + t.shape[a + 1:]), axis=a)
    return t
  return _one(eqn, x, fwd, bwd)


def constant(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Outputs that do not depend on the operand values (iota, zeros_like, empty...)."""
  return [out_val(o) for o in eqn.outvars]


def bitcast_convert_type(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Same shape: elementwise. Changed width: the last axis is regrouped (dense over it)."""
  x = invals[0]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if out_shape == x.shape:
    return [out_val(eqn.outvars[0], x.mask, x.pull)]
  batch = min(x.ndim, len(out_shape)) - 1
  keep = lambda m, r: M.reduce_or(M.lift(m, r), range(batch, r), keepdims=True)
  def fwd(m):
    m = keep(m, x.ndim)
    return m.reshape(m.shape[:batch] + (1,) * (len(out_shape) - batch) + m.shape[-1:])
  def bwd(t):
    t = keep(t, len(out_shape))
    return t.reshape(t.shape[:batch] + (1,) * (x.ndim - batch) + t.shape[-1:])
  return _one(eqn, x, fwd, bwd)


register("transpose", transpose)
register("squeeze", squeeze)
register("broadcast_in_dim", broadcast_in_dim)
register("reshape", reshape)
register("slice", slice_rule)
register("rev", rev)
register("pad", pad)
register("concatenate", concatenate)
register("split", split)
register("bitcast_convert_type", bitcast_convert_type)
register("stack", stack)
register("unstack", unstack)
register("tile", tile)
register(("iota", "empty", "empty2", "zeros_like", "create_token", "after_all", "iota_2x32_shape",
          "dce_sink"), constant)

# What the probe and the planner need beyond the mask rule (see registry.TRAITS).
add_traits(("broadcast_in_dim", "reshape", "transpose", "squeeze", "slice", "rev"), "view", "linear")
add_traits(("concatenate", "pad", "split"), "linear")
add_traits(("concatenate", "pad"), "additive")
add_traits("iota", "zero_grad")
