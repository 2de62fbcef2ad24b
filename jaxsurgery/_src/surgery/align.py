"""Touch signatures: the table's view of a parameter axis, for axes the dataflow leaves open.

The relation pass aligns every parameter axis by what it meets (input features
by name, residual streams, output names, the blocks of a fused gate). An axis
that nothing binds falls back to the table, as in the paper: each index's
*signature* is the OR of its touch sets over the other axes, restricted to the
features both models share; a signature held by one index on each side (a
named feature) matches wherever it sits, shared signatures match in order.
An index no feature touches at all, in both models, is not new: it keeps its
position (a positional table's rows beyond the traced length).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.table import FeatureTable
from jaxsurgery._src.surgery.match import FeatureMaps, restrict


def signatures(dense: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Per index along ``axis``: the OR of its touch sets over the other axes (``(size, features)``)."""
  other = tuple(a for a in range(dense.ndim - 1) if a != axis)
  sig = dense.any(axis=other) if other else dense
  return np.broadcast_to(sig, (size, sig.shape[-1]))


def varies(packed: np.ndarray | None, shape, axis: int) -> bool:
  """Whether touch sets differ along ``axis`` (the axis carries features)."""
  if packed is None:
    return False
  p = M.lift(packed, len(shape))
  if p.shape[axis] == 1:
    return False
  other = tuple(a for a in range(len(shape)) if a != axis)
  sig = np.bitwise_or.reduce(p, axis=other) if other else p
  return bool((sig != sig[:1]).any())


def untouched(table: FeatureTable, path: str, axis: int) -> np.ndarray:
  """Per index along ``axis``: touched by no feature at all."""
  shape = table.shapes[path]
  packed = table.packed[path]
  if packed is None:
    return np.ones(shape[axis], bool)
  p = M.lift(packed, len(shape))
  other = tuple(b for b in range(len(shape)) if b != axis)
  sig = np.bitwise_or.reduce(p, axis=other) if other else p
  return np.broadcast_to(~(sig != 0).any(-1), (shape[axis],))


def match_signatures(new_sig: np.ndarray, old_sig: np.ndarray) -> np.ndarray:
  """New index -> old index with the same signature (-1: none).

  A signature held by one index on each side (a named feature) matches directly,
  wherever it sits. Shared signatures (the units of a layer) match in order.
  """
  def pools(sig):
    keys = np.packbits(sig, axis=-1)
    out: dict[bytes, list[int]] = {}
    for i in np.nonzero(sig.any(-1))[0]:
      out.setdefault(keys[i].tobytes(), []).append(int(i))
    return out
  new_pools, old_pools = pools(new_sig), pools(old_sig)
  out = np.full(len(new_sig), -1, np.int64)
  for key, news in new_pools.items():
    olds = old_pools.get(key, [])
    out[news[:len(olds)]] = olds[:len(news)]
  return out


def keep_untouched(src: np.ndarray, new_free: np.ndarray, old_free: np.ndarray) -> np.ndarray:
  """Indices no feature touches, on both sides, keep their position (they are not new)."""
  src = np.array(src)
  used = np.zeros(len(old_free) + 1, bool)
  used[src[src >= 0]] = True
  cand = np.nonzero((src < 0) & new_free[:len(src)])[0]
  cand = cand[cand < len(old_free)]
  cand = cand[old_free[cand] & ~used[cand]]
  src[cand] = cand
  return src


def signature_defaults(old: FeatureTable, new: FeatureTable, pairs: Mapping[int, int],
                       fmaps: FeatureMaps) -> dict[tuple[int, int], Callable]:
  """``(new param, axis) -> default`` for the axes whose touch sets vary (in either table).

  The default is computed only if the relation pass needs it (nothing bound the axis).
  """
  out = {}
  for i, j in pairs.items():
    n, o = new.paths[i], old.paths[j]
    shape, old_shape = new.shapes[n], old.shapes[o]
    for a in range(min(len(shape), len(old_shape))):
      if varies(new.packed[n], shape, a) or varies(old.packed[o], old_shape, a):
        out[(i, a)] = _default(old, new, o, n, a, fmaps)
  return out


def _default(old: FeatureTable, new: FeatureTable, o: str, n: str, a: int, fmaps: FeatureMaps) -> Callable:
  def compute(free):
    nd = restrict(new.packed[n], fmaps.new_idx, new.shapes[n])
    od = restrict(old.packed[o], fmaps.old_idx, old.shapes[o])
    src = match_signatures(signatures(nd, a, new.shapes[n][a]), signatures(od, a, old.shapes[o][a]))
    return keep_untouched(src, untouched(new, n, a), untouched(old, o, a)), "features"
  return compute
