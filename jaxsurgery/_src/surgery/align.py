"""Per-leaf alignment: the index map of every axis of a matched leaf.

Feature axes (touch sets vary along the axis in either model) match indices
by their signature, the OR of their touch sets over the other axes restricted
to the features both models share (named features wherever they sit, shared
signatures in order within each concatenated piece); an empty signature is
fresh. Other axes are aligned positionally in the coordinates in which they
are consumed (:mod:`jaxsurgery._src.surgery.axes`).
"""

from __future__ import annotations

import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import SurgeryError
from jaxsurgery._src.core.table import FeatureTable
from jaxsurgery._src.surgery import axes as axes_lib
from jaxsurgery._src.surgery.axes import AxisHow
from jaxsurgery._src.surgery.match import FeatureMaps, restrict


def signatures(dense: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Per index along ``axis``: the OR of its touch sets over the other axes (``(size, features)``)."""
  other = tuple(a for a in range(dense.ndim - 1) if a != axis)
  sig = dense.any(axis=other) if other else dense
  return np.broadcast_to(sig, (size, sig.shape[-1]))


def _varies(packed, shape, axis) -> bool:
  if packed is None:
    return False
  p = M.lift(packed, len(shape))
  if p.shape[axis] == 1:
    return False
  other = tuple(a for a in range(len(shape)) if a != axis)
  sig = np.bitwise_or.reduce(p, axis=other) if other else p
  return bool((sig != sig[:1]).any())


def _match_signatures(new_sig: np.ndarray, old_sig: np.ndarray, new_seg=None, old_seg=None) -> np.ndarray:
  """New index -> old index with the same signature (-1: none).

  A signature held by one index on each side (a named feature) matches directly,
  wherever it sits. Shared signatures (the units of a layer) match in order: the
  k-th new index takes the k-th old one, within the same concatenated piece when
  the axis is consumed as pieces (``new_seg``/``old_seg``: piece number per index).
  """
  def pools(sig):
    out: dict[bytes, list[int]] = {}
    for i, s_ in enumerate(sig):
      if s_.any():
        out.setdefault(np.packbits(s_).tobytes(), []).append(i)
    return out
  new_pools, old_pools = pools(new_sig), pools(old_sig)
  out = np.full(len(new_sig), -1, np.int64)
  for key, news in new_pools.items():
    olds = old_pools.get(key, [])
    if len(news) == 1 and len(olds) == 1:
      out[news[0]] = olds[0]
      continue
    if new_seg is not None and old_seg is not None:
      for piece in set(new_seg[news].tolist()):
        ns = [i for i in news if new_seg[i] == piece]
        os_ = [i for i in olds if old_seg[i] == piece]
        out[ns[:len(os_)]] = os_[:len(ns)]
    else:
      out[news[:len(olds)]] = olds[:len(news)]
  return out


def _pieces_of(structure, size):
  if isinstance(structure, axes_lib.Segments) and sum(structure.sizes) == size:
    return np.repeat(np.arange(len(structure.sizes)), structure.sizes)
  return None


def align_leaf(old: FeatureTable, new: FeatureTable, old_path: str, new_path: str, fmaps: FeatureMaps,
               axes_cache: dict) -> tuple[list[np.ndarray | None], list[AxisHow]]:
  """Per axis of ``new_path``: the old index of every new index (``-1``: fresh; ``None``: identity), and how."""
  old_idx, new_idx = fmaps.old_idx, fmaps.new_idx
  shape, old_shape = new.shapes[new_path], old.shapes[old_path]
  if len(shape) != len(old_shape):
    raise SurgeryError(f"Cannot align {old_path!r} {old_shape} with {new_path!r} {shape}: ranks differ. "
                       f"Pass `rename_params=` to pair leaves explicitly, or leave it unmatched.")
  new_dense = restrict(new.packed[new_path], new_idx, shape)
  old_dense = restrict(old.packed[old_path], old_idx, old_shape)
  maps: list[np.ndarray | None] = []
  how: list[AxisHow] = []
  old_pi, new_pi = old.paths.index(old_path), new.paths.index(new_path)
  for a, (n, o) in enumerate(zip(shape, old_shape)):
    if _varies(new.packed[new_path], shape, a) or _varies(old.packed[old_path], old_shape, a):
      new_seg = _pieces_of(axes_lib.axis_structure(new.jaxpr, new_pi, a, cache=axes_cache), n)
      old_seg = _pieces_of(axes_lib.axis_structure(old.jaxpr, old_pi, a, cache=axes_cache), o)
      if new_seg is None or old_seg is None or new_seg[-1] != old_seg[-1]:
        new_seg = old_seg = None
      m = _match_signatures(signatures(new_dense, a, n), signatures(old_dense, a, o), new_seg, old_seg)
      maps.append(None if (n == o and np.array_equal(m, np.arange(n))) else m)
      how.append(AxisHow("features") if new_seg is None or old_seg is None else AxisHow(
          "features", "in segments " + "+".join(str(c) for c in np.bincount(old_seg)) + " -> "
          + "+".join(str(c) for c in np.bincount(new_seg))))
    elif n == o:
      maps.append(None)
      how.append(AxisHow("identity"))
    else:
      ns = axes_lib.axis_structure(new.jaxpr, new_pi, a, cache=axes_cache)
      os_ = axes_lib.axis_structure(old.jaxpr, old_pi, a, cache=axes_cache)
      m, desc = axes_lib.index_map(n, o, ns, os_)
      maps.append(m)
      how.append(desc)
  return maps, how
