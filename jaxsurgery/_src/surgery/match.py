"""Leaf matching: which old parameter leaf each new one comes from, and how the features correspond.

Leaves are paired by explicit renames, then by aligning the two programs'
parameters in order of first use (an edit distance, see :func:`match_leaves`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import SurgeryError
from jaxsurgery._src.core.table import FeatureTable


class FeatureMaps(NamedTuple):
  """The correspondence of the two tables' features (after renames)."""

  old_idx: np.ndarray          # old index of every shared feature
  new_idx: np.ndarray          # new index of every shared feature (same order)
  added: tuple[str, ...]       # new features the old table does not have
  removed: tuple[str, ...]     # old features the new table does not have
  moved: tuple[str, ...]       # shared features at another input leaf or position


def feature_maps(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str]) -> FeatureMaps:
  """Shared, added, removed and moved features; ``rename`` maps old feature names to new ones."""
  unknown = [k for k in rename if k not in old.features]
  if unknown:
    raise SurgeryError(f"`rename_features` (or `rename`) maps features {unknown} that the old table does "
                       f"not have. Old features: {list(old.features)}")
  old_names = [rename.get(n, n) for n in old.features]
  shared = [n for n in old_names if n in new.features]
  added = tuple(n for n in new.features if n not in old_names)
  removed = tuple(f for f, n in zip(old.features, old_names) if n not in new.features)
  old_idx = np.array([old_names.index(n) for n in shared], dtype=np.int64)
  new_idx = np.array([new.features.index(n) for n in shared], dtype=np.int64)
  moved = tuple(n for n in shared if _location(old, old.features[old_names.index(n)]) != _location(new, n))
  return FeatureMaps(old_idx, new_idx, added, removed, moved)


def _location(table: FeatureTable, name: str):
  spec = table.spec
  if spec is None:
    raise SurgeryError("The table has no feature spec (`FeatureTable.spec`): build it with "
                       "jaxsurgery.dependency_table, or keep the spec when replacing fields.")
  k = table.features.index(name)
  leaf, pos = spec.locations[k]
  return spec.leaves[leaf].path, pos, k


def restrict(packed: np.ndarray | None, idx: np.ndarray, shape) -> np.ndarray:
  """Dense bool touches (compressed axes kept) restricted to features ``idx``: (..., len(idx))."""
  if packed is None:
    return np.zeros((1,) * len(shape) + (len(idx),), bool)
  p = M.lift(packed, len(shape))
  bits = (p[..., idx // M.BITS] >> (idx % M.BITS).astype(np.uint32)) & np.uint32(1)
  return bits.astype(bool)


def first_use_order(table: FeatureTable) -> list[str]:
  """The table's parameter paths in the order the program first uses them."""
  jaxpr = table.jaxpr.jaxpr
  pos = {id(v): i for i, v in enumerate(jaxpr.invars[:len(table.paths)])}
  order: list[int] = []
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      i = pos.get(id(v))
      if i is not None and i not in order:
        order.append(i)
  order += [i for i in range(len(table.paths)) if i not in order]
  return [table.paths[i] for i in order]


_SKIP = 1.5          # a leaf only in one model (inserted or removed)
_RENAMED = 0.5       # matched leaves whose paths differ
_RESIZED = 1.0       # per axis whose size differs
_OTHER_FEATURES = 1.0  # the features touching the two leaves differ


def _feature_set(table: FeatureTable, path: str, idx: np.ndarray) -> bytes:
  dense = restrict(table.packed[path], idx, table.shapes[path])
  return np.packbits(dense.reshape(-1, dense.shape[-1]).any(0)).tobytes()


def match_leaves(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str],
                 fmaps: FeatureMaps | None = None) -> list[tuple[str, str, str]]:
  """Pairs (old path, new path, why): explicit renames, then the two programs' parameters aligned.

  They are aligned in order of first use.

  The alignment is an edit distance: matching two leaves costs nothing for the same
  path and shape, more for a renamed path, per resized axis and for different
  touching features; a leaf present in one model only costs ``_SKIP``. So a widened
  layer keeps its path, and an inserted layer shifts ``Linear_1`` to ``Linear_2``
  instead of pairing the old output layer with the new hidden one.
  """
  pairs, used_old, used_new = [], set(), set()
  for o, n in rename.items():
    if o in old.paths:
      if n not in new.paths:
        raise SurgeryError(f"`rename_params` (or `rename`) maps {o!r} to {n!r}, which is not a parameter "
                           f"of the new model. New paths: {list(new.paths)}")
      pairs.append((o, n, "rename"))
      used_old.add(o)
      used_new.add(n)
  olds = [p for p in first_use_order(old) if p not in used_old]
  news = [p for p in first_use_order(new) if p not in used_new]
  if fmaps is not None:
    osig = {p: _feature_set(old, p, fmaps[0]) for p in olds}
    nsig = {p: _feature_set(new, p, fmaps[1]) for p in news}
  inf = float("inf")

  def cost(o, n):
    so, sn = old.shapes[o], new.shapes[n]
    if len(so) != len(sn):
      return inf
    c = _RESIZED * sum(a != b for a, b in zip(so, sn)) + (0.0 if o == n else _RENAMED)
    if fmaps is not None and osig[o] != nsig[n]:
      c += _OTHER_FEATURES
    return c

  no, nn = len(olds), len(news)
  d = np.zeros((no + 1, nn + 1))
  d[:, 0] = np.arange(no + 1) * _SKIP
  d[0, :] = np.arange(nn + 1) * _SKIP
  for i in range(1, no + 1):
    for j in range(1, nn + 1):
      d[i, j] = min(d[i - 1, j] + _SKIP, d[i, j - 1] + _SKIP, d[i - 1, j - 1] + cost(olds[i - 1], news[j - 1]))
  i, j, found = no, nn, []
  while i > 0 and j > 0:
    c = cost(olds[i - 1], news[j - 1])
    if c < inf and np.isclose(d[i, j], d[i - 1, j - 1] + c):
      o, n = olds[i - 1], news[j - 1]
      why = "same path" if o == n else (
          "dataflow order and shape" if old.shapes[o] == new.shapes[n] else "dataflow order")
      found.append((o, n, why))
      i, j = i - 1, j - 1
    elif np.isclose(d[i, j], d[i - 1, j] + _SKIP):
      i -= 1
    else:
      j -= 1
  return pairs + found[::-1]
