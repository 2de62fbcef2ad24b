"""Reductions, cumulative ops, windowed reductions, sort and top_k.

Structure:
* reduce_* / argmax / argmin: ``out[e]`` depends on the whole reduced group of
  ``e``: OR over the reduced axes. Group members touch each other.
* cumulative ops: ``out[i]`` depends on ``x[j]`` for ``j <= i`` (``j >= i``
  reversed): cumulative OR.
* reduce_window: ``out[p]`` depends on the window at ``p``: windowed OR.
* sort / top_k: every output along the sorted axis may come from any position,
  and the keys decide which: OR along the axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from jax import lax

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.values import Val, out_val
from jaxsurgery._src.rules.common import cut_pull, unsqueeze
from jaxsurgery._src.rules.registry import add_traits, register

if TYPE_CHECKING:  # the interpreter imports the rules
  from jaxsurgery._src.compat import Eqn
  from jaxsurgery._src.core.interpreter import Context


def reduce(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[e] = op(x[group(e)])``: OR over ``axes``."""
  axes = tuple(eqn.params["axes"] if "axes" in eqn.params else eqn.params["dimensions"])
  n = len(eqn.outvars)
  data, inits = invals[:n], invals[n:]  # generic `reduce` has init values; reduce_* has none
  init_words = M.orr(*(M.reduce_all(v.mask) for v in inits))
  parts = [M.reduce_or(M.lift(v.mask, v.ndim), axes) for v in data]
  out_rank = data[0].ndim - len(axes)
  mask = M.orr(*parts, M.uniform(init_words, out_rank))
  group = None if mask is None else unsqueeze(M.lift(mask, out_rank), axes)  # broadcasts over the group
  for v in data:
    ctx.touch(v, group)
  for v in inits:
    ctx.touch(v, M.uniform(M.reduce_all(mask), v.ndim))
  pull = cut_pull([(v, lambda t: unsqueeze(M.lift(t, out_rank), axes)) for v in data]
                  + [(v, lambda t, r=v.ndim: M.uniform(M.reduce_all(t), r)) for v in inits], mask)
  return [out_val(o, mask, pull) for o in eqn.outvars]


def _cum_or(m, axis, reverse):
  if m.shape[axis] == 1:
    return m
  if reverse:
    m = np.flip(m, axis)
  m = np.bitwise_or.accumulate(m, axis=axis)
  return np.flip(m, axis) if reverse else m


def cumulative(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[i]`` depends on ``x[:i+1]`` along ``axis`` (``x[i:]`` when reversed)."""
  x = invals[0]
  axis, reverse = eqn.params["axis"], eqn.params.get("reverse", False)
  mask = None if x.mask is None else _cum_or(M.lift(x.mask, x.ndim), axis, reverse)
  if x.pull is not None:
    ctx.touch(x, M.reduce_or(mask, [axis], keepdims=True))
  pull = cut_pull([(x, lambda t: _cum_or(M.lift(t, x.ndim), axis, not reverse))], mask)
  return [out_val(eqn.outvars[0], mask, pull)]


def window_or(m, shape, dims, strides, padding, base_dilation, window_dilation):
  """OR over every window of a reduce_window (or conv) with these parameters."""
  r = len(shape)
  # A mask constant along an axis stays constant under windowing as long as every
  # window sees a real element: without padding or base dilation. Otherwise the
  # axis is expanded, so windows that see only padding (or holes) get nothing.
  def moves(a):
    if dims[a] == 1 and strides[a] == 1 and tuple(padding[a]) == (0, 0) and base_dilation[a] == 1:
      return False
    return m.shape[a] > 1 or tuple(padding[a]) != (0, 0) or base_dilation[a] != 1
  axes = [a for a in range(r) if moves(a)]
  if not axes:
    return m
  m = M.expand_axes(m, shape, axes)
  if sum(dims[a] for a in axes) <= 64:
    return _window_or_numpy(m, axes, dims, strides, padding, base_dilation, window_dilation)
  win = [dims[a] if a in axes else 1 for a in range(r)] + [1]
  st = [strides[a] if a in axes else 1 for a in range(r)] + [1]
  pad = [tuple(padding[a]) if a in axes else (0, 0) for a in range(r)] + [(0, 0)]
  bd = [base_dilation[a] if a in axes else 1 for a in range(r)] + [1]
  wd = [window_dilation[a] if a in axes else 1 for a in range(r)] + [1]
  with jax.default_device(jax.devices("cpu")[0]):
    out = lax.reduce_window(np.ascontiguousarray(m), np.uint32(0), lax.bitwise_or, win, st, pad, bd, wd)
  return np.asarray(out)


def _window_or_numpy(m, axes, dims, strides, padding, base_dilation, window_dilation):
  """Windowed OR as ORs of strided slices (no JAX dispatch for small windows).

  A window is a box, so the OR is separable: one axis at a time, ``sum(dims)``
  slices instead of ``prod(dims)``. Base dilation and padding (possibly negative)
  are applied first, in one allocation, with zeros in the holes.
  """
  lows, highs, grow = {}, {}, False
  for a in axes:
    lo, hi = padding[a]
    lows[a], highs[a] = lo, hi
    grow = grow or base_dilation[a] != 1 or lo > 0 or hi > 0
  if grow:
    shape, dst = list(m.shape), [slice(None)] * m.ndim
    for a in axes:
      n, bd = m.shape[a], base_dilation[a]
      shape[a] = (n - 1) * bd + 1 + max(lows[a], 0) + max(highs[a], 0)
      dst[a] = slice(max(lows[a], 0), max(lows[a], 0) + (n - 1) * bd + 1, bd)
    out = np.zeros(shape, m.dtype)
    out[tuple(dst)] = m
    m = out
  crop = [slice(None)] * m.ndim
  for a in axes:  # negative padding crops
    crop[a] = slice(max(-lows[a], 0), m.shape[a] - max(-highs[a], 0))
  m = m[tuple(crop)]
  outn = {a: (m.shape[a] - (dims[a] - 1) * window_dilation[a] - 1) // strides[a] + 1 for a in axes}
  if min(outn.values()) <= 0:
    return np.zeros(tuple(max(outn.get(a, m.shape[a]), 0) for a in range(m.ndim - 1)) + m.shape[-1:], m.dtype)
  # strided axes first: they shrink what the other axes' taps read
  for a in sorted(axes, key=lambda a: -strides[a]):
    idx = [slice(None)] * m.ndim
    res = None
    for k in range(dims[a]):
      s = k * window_dilation[a]
      idx[a] = slice(s, s + (outn[a] - 1) * strides[a] + 1, strides[a])
      part = m[tuple(idx)]
      res = part.copy() if res is None else np.bitwise_or(res, part, out=res)
    m = res
  return m


def reduce_window(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[p]`` depends on the window of ``x`` at ``p``."""
  p = eqn.params
  n = len(eqn.outvars)
  data, inits = invals[:n], invals[n:]
  out_rank = len(eqn.outvars[0].aval.shape)
  words = M.orr(*(M.reduce_all(v.mask) for v in inits))
  mask = M.orr(*(None if v.mask is None else window_or(
      M.lift(v.mask, v.ndim), v.shape, p["window_dimensions"], p["window_strides"], p["padding"],
      p["base_dilation"], p["window_dilation"]) for v in data), M.uniform(words, out_rank))
  moving = [a for a in range(out_rank) if p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1]
  for v in data + inits:
    ctx.touch(v, M.reduce_or(M.lift(mask, v.ndim), moving, keepdims=True) if v.ndim == out_rank
              else M.uniform(M.reduce_all(mask), v.ndim))
  pull = cut_pull([(v, lambda t: M.reduce_or(t, moving, keepdims=True)) for v in data]
                  + [(v, lambda t, r=v.ndim: M.uniform(M.reduce_all(t), r)) for v in inits], mask)
  return [out_val(o, mask, pull) for o in eqn.outvars]


def sort(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Along ``dimension``, each output may come from any position; keys pick which."""
  d = eqn.params["dimension"]
  nk = eqn.params.get("num_keys", 1)
  keys = M.orr(*(M.reduce_or(M.lift(v.mask, v.ndim), [d], keepdims=True) for v in invals[:nk]))
  outs = []
  for o, v in zip(eqn.outvars, invals):
    own = M.reduce_or(M.lift(v.mask, v.ndim), [d], keepdims=True)
    mask = M.orr(own, keys)
    ctx.touch(v, keys)
    outs.append(out_val(o, mask, cut_pull([(v, lambda t: M.reduce_or(t, [d], keepdims=True))], mask)))
  return outs


def top_k(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Values and indices of the k largest along the last (or ``axis``) axis."""
  x = invals[0]
  axis = eqn.params.get("axis", -1) % x.ndim
  mask = M.reduce_or(M.lift(x.mask, x.ndim), [axis], keepdims=True)
  ctx.touch(x, mask)
  pull = cut_pull([(x, lambda t: M.reduce_or(t, [axis], keepdims=True))], mask)
  return [out_val(o, mask, pull) for o in eqn.outvars]


def argreduce(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Argmax / argmin: the index of the extremum over ``axes``."""
  return reduce(ctx, eqn, invals)


register(("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
          "reduce_xor", "reduce"), reduce)
register(("argmax", "argmin"), argreduce)
register(("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"), cumulative)
register(("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"),
         reduce_window)
register("sort", sort)
register("top_k", top_k)

# What the probe needs beyond the mask rule (see registry.TRAITS).
add_traits(("reduce_sum", "cumsum", "reduce_window_sum"), "linear")
add_traits(("argmax", "argmin"), "zero_grad")
add_traits(("reduce_max", "reduce_min", "cummax", "cummin", "sort", "reduce_window_max", "reduce_window_min",
            "top_k"), "selection")
