"""Contractions: dot_general and conv_general_dilated.

dot_general structure (no value-based zero skipping)::

    out[b, i, j] = sum_c lhs[b, i, c] * rhs[b, c, j]
    mask(out)[b, i, j] = OR_c mask(lhs)[b, i, c]  |  OR_c mask(rhs)[b, c, j]

Two OR-reductions and a broadcast OR, never a boolean matmul. A parameter
element ``rhs[b, c, j]`` multiplies ``lhs[b, i, c]`` for every ``i``, so it is
touched by ``OR_i mask(lhs)[b, i, c]``: each row of a dense kernel is touched
by exactly the features of its input.

conv structure: ``out[n, o, p]`` sums ``lhs[n, i, window(p)] * rhs[o, i, k]``
over the input channels ``i`` of ``o``'s feature group and the kernel taps
``k``: OR over the group's channels, then a windowed OR with the conv's
strides, padding and dilations. A kernel element ``rhs[o, i, k]`` is touched by
the masks of input channel ``i`` (over every position; edge taps that only see
padding are over-approximated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.values import Val, out_val
from jaxsurgery._src.rules.common import argsort, cut_pull, place
from jaxsurgery._src.rules.reductions import window_or
from jaxsurgery._src.rules.registry import register

if TYPE_CHECKING:  # the interpreter imports the rules
  from jaxsurgery._src.compat import Eqn
  from jaxsurgery._src.core.interpreter import Context


def _partial(m, rank, contract, batch, free, out_rank, free_pos):
  """OR over ``contract``; batch and free axes placed at their output positions."""
  m = M.reduce_or(M.lift(m, rank), contract, keepdims=True)
  m = m.transpose(list(batch) + list(free) + list(contract) + [rank])
  m = m.reshape(m.shape[:len(batch) + len(free)] + m.shape[-1:])
  return place(m, list(range(len(batch))) + list(free_pos), out_rank)


def _operand_touch(partner, p_rank, p_contract, p_batch, p_free, rank, contract, batch):
  """Touch on an operand: OR over the partner's free axes, laid out in the operand's axes."""
  m = M.reduce_or(M.lift(partner, p_rank), p_free, keepdims=True)
  m = m.transpose(list(p_batch) + list(p_contract) + list(p_free) + [p_rank])
  m = m.reshape(m.shape[:len(p_batch) + len(p_contract)] + m.shape[-1:])
  return place(m, list(batch) + list(contract), rank)


def _from_out(t, out_rank, n_batch, lo, hi, rank, batch, free):
  """Touch on the output -> operand: OR over the other operand's free axes."""
  t = M.lift(t, out_rank)
  other = [a for a in range(n_batch, out_rank) if not lo <= a < hi]
  t = M.reduce_or(t, other, keepdims=True)
  keep = list(range(n_batch)) + list(range(lo, hi))
  t = t.reshape([t.shape[a] for a in keep] + [t.shape[-1]])
  return place(t, list(batch) + list(free), rank)


def dot_general(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[b, i, j] = sum_c lhs[b, i, c] * rhs[b, c, j]``.

  mask(out)[b, i, j] = OR_c mask(lhs)[b, i, c] | OR_c mask(rhs)[b, c, j] (exact
  without value-based zeros). ``rhs[b, c, j]`` is touched by OR_i mask(lhs)[b, i, c]
  (and symmetrically); touches on ``out`` pull back to every contracted element.
  """
  lhs, rhs = invals[:2]
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if any(lhs.shape[a] == 0 for a in lc):
    return [out_val(eqn.outvars[0], None, None)]   # an empty sum: zeros that depend on nothing
  lf = [a for a in range(lhs.ndim) if a not in lc and a not in lb]
  rf = [a for a in range(rhs.ndim) if a not in rc and a not in rb]
  nb = len(lb)
  out_rank = nb + len(lf) + len(rf)
  lpos = list(range(nb, nb + len(lf)))
  rpos = list(range(nb + len(lf), out_rank))
  mask = M.orr(
      None if lhs.mask is None else _partial(lhs.mask, lhs.ndim, lc, lb, lf, out_rank, lpos),
      None if rhs.mask is None else _partial(rhs.mask, rhs.ndim, rc, rb, rf, out_rank, rpos))
  if rhs.pull is not None and lhs.mask is not None:
    ctx.touch(rhs, _operand_touch(lhs.mask, lhs.ndim, lc, lb, lf, rhs.ndim, rc, rb))
  if lhs.pull is not None and rhs.mask is not None:
    ctx.touch(lhs, _operand_touch(rhs.mask, rhs.ndim, rc, rb, rf, lhs.ndim, lc, lb))
  pull = cut_pull([
      (lhs, lambda t: _from_out(t, out_rank, nb, nb, nb + len(lf), lhs.ndim, lb, lf)),
      (rhs, lambda t: _from_out(t, out_rank, nb, nb + len(lf), out_rank, rhs.ndim, rb, rf)),
  ], mask)
  return [out_val(eqn.outvars[0], mask, pull)]


def conv(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[n, o, p] = sum_{i in group(o), k} lhs[n, i, window(p, k)] * rhs[o, i, k]``.

  Forward: OR over the channels of each feature group, a windowed OR with the
  conv's strides, padding and dilations (windows that see only padding get
  nothing), spread to the group's output channels; batch groups OR over the
  batch (sound, coarse). ``rhs[o, i, k]`` is touched by input channel ``i`` of
  ``o``'s group over every position and batch element. Pullbacks from ``out``
  are uniform (every operand element may contribute).
  """
  lhs, rhs = invals[:2]
  p = eqn.params
  dn = p["dimension_numbers"]
  lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec  # (batch, feature, spatial...)
  G, B = p["feature_group_count"], p["batch_group_count"]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  nsp = len(lspec) - 2
  r = nsp + 2
  W = ctx.W
  O = rhs.shape[rspec[0]]
  mask = None
  if lhs.mask is not None:
    m = M.lift(lhs.mask, lhs.ndim)
    C = lhs.shape[lspec[1]]
    if B > 1:  # batch groups: over-approximate by the union over the batch
      m = M.reduce_or(m, [lspec[0]], keepdims=True)
    if G == 1:  # OR over the input channels, in the operand's layout (no transposed copy)
      m = M.reduce_or(m, [lspec[1]], keepdims=True)
    # to (N, C, spatial...) layout
    m = m.transpose(list(lspec) + [r])
    # OR over the input channels of each feature group -> (N, G, spatial...)
    if m.shape[1] > 1:
      m = np.bitwise_or.reduce(m.reshape((m.shape[0], G, C // G) + m.shape[2:]), axis=2)
    sp_shape = (m.shape[0], m.shape[1]) + tuple(lhs.shape[a] for a in lspec[2:])
    k = tuple(rhs.shape[a] for a in rspec[2:])
    m = window_or(m, sp_shape, (1, 1) + k, (1, 1) + tuple(p["window_strides"]),
                  ((0, 0), (0, 0)) + tuple(tuple(x) for x in p["padding"]),
                  (1, 1) + tuple(p["lhs_dilation"]), (1, 1) + tuple(p["rhs_dilation"]))
    if m.shape[1] > 1:  # output channel o belongs to group o // (O // G)
      m = np.repeat(m, O // G, axis=1)
    # back to the output layout
    mask = m.transpose(argsort(ospec) + [r])
  if rhs.mask is not None:  # kernel masks: OR over input channels and taps, per output channel
    km = M.reduce_or(M.lift(rhs.mask, rhs.ndim), [rspec[1]] + list(rspec[2:]), keepdims=True)
    km = km.transpose(list(rspec) + [r])  # (O or 1, 1, 1...)
    km = np.swapaxes(km, 0, 1)  # as (batch 1, channel O, spatial...): the output channel is the feature axis
    mask = M.orr(mask, km.transpose(argsort(ospec) + [r]))
  if rhs.pull is not None and lhs.mask is not None:
    # kernel[o, i, taps] touched by input channel i (i within o's group)
    m = M.lift(lhs.mask, lhs.ndim).transpose(list(lspec) + [r])
    m = M.reduce_or(m, [0] + list(range(2, r)), keepdims=False)  # (C or 1, W)
    if m.shape[0] == 1 or G == 1:
      t = m.reshape((1, m.shape[0]) + (1,) * nsp + (W,))
    else:
      Cg = lhs.shape[lspec[1]] // G
      t = np.repeat(m.reshape(G, 1, Cg, W), O // G, axis=1).reshape((O, Cg) + (1,) * nsp + (W,))
    ctx.touch(rhs, t.transpose(argsort(rspec) + [r]))
  if lhs.pull is not None and rhs.mask is not None:
    ctx.touch(lhs, M.uniform(M.reduce_all(rhs.mask), lhs.ndim))
  pull = cut_pull([(v, lambda t, n=v.ndim: M.uniform(M.reduce_all(t), n)) for v in (lhs, rhs)], mask)
  assert mask is None or mask.ndim == len(out_shape) + 1
  return [out_val(eqn.outvars[0], mask, pull)]


register("dot_general", dot_general, traits=("product",))
register("conv_general_dilated", conv, traits=("product",))
