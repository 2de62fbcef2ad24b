"""Building blocks shared by the rule families."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.values import Pull, Val


def argsort(xs: Sequence[int]) -> list[int]:
  """``list(np.argsort(xs))`` for a short list of distinct ints (without numpy's overhead)."""
  return sorted(range(len(xs)), key=list(xs).__getitem__)


def place(m: np.ndarray, positions: Sequence[int], rank: int) -> np.ndarray:
  """Moves the value axes of ``m`` to ``positions`` of a rank-``rank`` mask (others size 1)."""
  positions = list(positions)
  order = argsort(positions)
  m = m.transpose(order + [m.ndim - 1])
  shape = [1] * rank + [m.shape[-1]]
  for j, i in enumerate(order):
    shape[positions[i]] = m.shape[j]
  return m.reshape(shape)


def unsqueeze(t: np.ndarray, axes: Sequence[int]) -> np.ndarray:
  """Inserts size-1 value axes at ``axes`` (positions in the result), e.g. reduced or squeezed axes."""
  shape = list(t.shape[:-1])
  for a in sorted(axes):
    shape.insert(a, 1)
  return t.reshape(tuple(shape) + t.shape[-1:])


def reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
  """Pairs of axis groups of shapes ``a`` and ``b`` with equal products (how a reshape regroups axes).

  Example:
    >>> reshape_groups((2, 3, 4), (6, 4))
    [([0, 1], [0]), ([2], [1])]
  """
  groups: list[tuple[list[int], list[int]]] = []
  i = j = 0
  while i < len(a) or j < len(b):
    gi: list[int] = []
    gj: list[int] = []
    pi = pj = 1
    if i < len(a):
      gi.append(i)
      pi *= a[i]
      i += 1
    if j < len(b):
      gj.append(j)
      pj *= b[j]
      j += 1
    while pi != pj:
      if (pi < pj and i < len(a)) or j >= len(b):
        gi.append(i)
        pi *= a[i]
        i += 1
      else:
        gj.append(j)
        pj *= b[j]
        j += 1
    # trailing size-1 axes join the group that precedes them
    while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
      gi.append(i)
      i += 1
    while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
      gj.append(j)
      j += 1
    groups.append((gi, gj))
  return groups


def same_mask(a: np.ndarray | None, b: np.ndarray | None) -> bool:
  if a is None or b is None:
    return M.is_empty(a) and M.is_empty(b)
  shape = np.broadcast_shapes(a.shape, b.shape)
  return bool(np.array_equal(np.broadcast_to(a, shape), np.broadcast_to(b, shape)))


def forward_pull(target: Val, transform: Callable[[np.ndarray], np.ndarray | None]) -> Pull | None:
  """A pull that maps touches through ``transform`` onto ``target``'s provenance."""
  target_pull = target.pull
  if target_pull is None:
    return None

  def pull(t):
    t = transform(t)
    if not M.is_empty(t):
      target_pull(t)
  return pull


def cut_pull(pulls: Sequence[tuple[Val, Callable[..., Any]]], out_mask: np.ndarray | None) -> Pull | None:
  """A pull for a combining op: touches reach operands only where the output is feature-free.

  Args:
    pulls: ``(operand, transform)`` pairs; ``transform`` maps an output-shaped touch
      to the operand's shape.
    out_mask: the op's output mask (the provenance cut-off).
  """
  present = [(v.pull, f) for v, f in pulls if v.pull is not None]
  if not present:
    return None

  def pull(t):
    t = M.where_free(t, out_mask)
    if t is None or M.is_empty(t):
      return
    for operand_pull, f in present:
      u = f(t)
      if not M.is_empty(u):
        operand_pull(u)
  return pull


def all_words(vals: Sequence[Val]) -> np.ndarray | None:
  """OR of every element mask of every value: a (W,) mask."""
  return M.orr(*(M.reduce_all(v.mask) for v in vals))


def concrete_ints(vals: Sequence[Val]) -> list[np.ndarray] | None:
  """Concrete integer values of index operands, or None if any is unknown."""
  out = []
  for v in vals:
    c = v.concrete()
    if c is None:
      return None
    try:
      out.append(np.asarray(c))
    except Exception:
      return None
  return out
