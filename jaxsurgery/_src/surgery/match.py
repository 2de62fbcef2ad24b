"""Matching: which old leaf each new one comes from, and how inputs and outputs correspond.

Leaves are paired by explicit renames (exact paths or path prefixes), then by
aligning the two programs' parameters in order of first use (an edit distance,
see :func:`match_leaves`). Input and output leaves correspond by path, their
named positions by name (:func:`input_maps`, :func:`output_maps`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
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
  seen: set[int] = set()
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      i = pos.get(id(v))
      if i is not None and i not in seen:
        seen.add(i)
        order.append(i)
  order += [i for i in range(len(table.paths)) if i not in seen]
  return [table.paths[i] for i in order]


_SKIP = 1.5          # a leaf only in one model (inserted or removed)
_RENAMED = 0.5       # matched leaves whose paths differ only in their numbers (Dense_1 -> Dense_2)
_RENAMED_OTHER = 2.0  # ...or in their words (head -> B1): a named layer keeps its name
_RESIZED = 1.0       # per axis whose size differs
_OTHER_FEATURES = 1.0  # the features touching the two leaves differ


def _feature_set(table: FeatureTable, path: str, idx: np.ndarray) -> bytes:
  dense = restrict(table.packed[path], idx, table.shapes[path])
  return np.packbits(dense.reshape(-1, dense.shape[-1]).any(0)).tobytes()


def expand_renames(rename: Mapping[str, str], old: FeatureTable, new: FeatureTable) -> dict[str, str]:
  """Exact path renames, with prefix renames (keys ending in ``/``) expanded to every leaf under them.

  Raises:
    SurgeryError: a key that names no old path or prefix, or a target that is not a new path,
      with the closest paths.
  """
  out: dict[str, str] = {}
  for o, n in rename.items():
    if o.endswith("/"):
      under = [p for p in old.paths if p.startswith(o)]
      if not under:
        raise SurgeryError(f"`rename_params` prefix {o!r} matches no old parameter path. "
                           f"{_closest(o, old.paths, 'Old paths')}")
      for p in under:
        out[p] = n + p[len(o):]
    elif o in old.paths:
      out[o] = n
    else:
      raise SurgeryError(f"`rename_params` (or `rename`) names {o!r}, which is neither an old parameter path "
                         f"nor an old feature. {_closest(o, list(old.paths) + list(old.features), 'Old names')}")
  bad = [n for n in out.values() if n not in new.paths]
  if bad:
    raise SurgeryError(f"`rename_params` (or `rename`) maps to {bad[:4]}, which "
                       f"{'is' if len(bad) == 1 else 'are'} not a parameter of the new model. "
                       f"{_closest(bad[0], new.paths, 'New paths')}")
  return out


def _closest(name: str, known: Sequence[str], what: str) -> str:
  near = difflib.get_close_matches(name, list(known), n=4, cutoff=0.4)
  return f"Closest: {near}." if near else f"{what}: {list(known)[:12]}{' ...' if len(known) > 12 else ''}."


def match_leaves(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str],
                 fmaps: FeatureMaps | None = None) -> list[tuple[str, str, str]]:
  """Pairs (old path, new path, why): explicit renames, then the two programs' parameters aligned.

  They are aligned in order of first use, by an edit distance: matching two leaves
  costs nothing for the same path and shape, more for a renamed path, per resized
  axis and for different touching features; a leaf present in one model only costs
  ``_SKIP``. So a widened layer keeps its path, and an inserted layer shifts
  ``Linear_1`` to ``Linear_2`` instead of pairing the old output layer with the new
  hidden one. Identical leading and trailing leaves are matched first (optimal for
  an edit distance), and the rest is aligned one anti-diagonal at a time.
  """
  explicit = expand_renames(rename, old, new)
  pairs = [(o, n, "rename") for o, n in explicit.items()]
  used_old, used_new = set(explicit), set(explicit.values())
  olds = [p for p in first_use_order(old) if p not in used_old]
  news = [p for p in first_use_order(new) if p not in used_new]
  osig = nsig = None
  if fmaps is not None:
    osig = [_feature_set(old, p, fmaps.old_idx) for p in olds]
    nsig = [_feature_set(new, p, fmaps.new_idx) for p in news]
  found = _trimmed_align(olds, news, [old.shapes[p] for p in olds], [new.shapes[p] for p in news], osig, nsig)
  for a, b in found:
    o, n = olds[a], news[b]
    why = "same path" if o == n else ("dataflow order and shape" if old.shapes[o] == new.shapes[n]
                                      else "dataflow order")
    pairs.append((o, n, why))
  return pairs


def _trimmed_align(olds, news, old_shapes, new_shapes, old_sigs, new_sigs) -> list[tuple[int, int]]:
  def same(a, b):
    return olds[a] == news[b] and old_shapes[a] == new_shapes[b] and (
        old_sigs is None or old_sigs[a] == new_sigs[b])
  lo = 0
  while lo < len(olds) and lo < len(news) and same(lo, lo):
    lo += 1
  hi = 0
  while hi < len(olds) - lo and hi < len(news) - lo and same(len(olds) - 1 - hi, len(news) - 1 - hi):
    hi += 1
  pairs = [(k, k) for k in range(lo)]
  mo, mn = slice(lo, len(olds) - hi), slice(lo, len(news) - hi)
  if mo.stop > mo.start and mn.stop > mn.start:
    c = _costs(old_shapes[mo], new_shapes[mn], olds[mo], news[mn],
               None if old_sigs is None else old_sigs[mo], None if new_sigs is None else new_sigs[mn])
    pairs += [(a + lo, b + lo) for a, b in _align(c)]
  pairs += [(len(olds) - hi + k, len(news) - hi + k) for k in range(hi)]
  return pairs


def _costs(old_shapes, new_shapes, old_paths, new_paths, old_sigs, new_sigs) -> np.ndarray:
  """Matching costs (old x new): renamed, per resized axis, other features; inf for other ranks."""
  rank = max([len(s) for s in list(old_shapes) + list(new_shapes)] + [1])

  def grid(shapes):
    g = np.full((len(shapes), rank), -1, np.int64)
    for k, s in enumerate(shapes):
      g[k, :len(s)] = s
    return g, np.array([len(s) for s in shapes], np.int64)
  og, orank = grid(old_shapes)
  ng, nrank = grid(new_shapes)
  c = _RESIZED * (og[:, None, :] != ng[None, :, :]).sum(-1).astype(np.float64)
  c += _rename_costs(old_paths, new_paths)
  if old_sigs is not None:
    sid = {s: k for k, s in enumerate(dict.fromkeys(list(old_sigs) + list(new_sigs)))}
    old_ids, new_ids = np.array([sid[s] for s in old_sigs]), np.array([sid[s] for s in new_sigs])
    c += _OTHER_FEATURES * (old_ids[:, None] != new_ids[None, :])
  c[orank[:, None] != nrank[None, :]] = np.inf
  return c


def _rename_costs(old_paths, new_paths) -> np.ndarray:
  """0 for the same path, ``_RENAMED`` if only the numbers differ, else ``_RENAMED_OTHER``."""
  words = lambda ps: [re.sub(r"\d+", "#", p) for p in ps]
  ids = {p: k for k, p in enumerate(dict.fromkeys(list(old_paths) + list(new_paths)))}
  wid = {p: k for k, p in enumerate(dict.fromkeys(words(old_paths) + words(new_paths)))}
  same = np.array([ids[p] for p in old_paths])[:, None] == np.array([ids[p] for p in new_paths])[None, :]
  same_words = (np.array([wid[w] for w in words(old_paths)])[:, None]
                == np.array([wid[w] for w in words(new_paths)])[None, :])
  return np.where(same, 0.0, np.where(same_words, _RENAMED, _RENAMED_OTHER))


def _align(cost: np.ndarray) -> list[tuple[int, int]]:
  """Pairs (old index, new index) of the cheapest alignment.

  Pairs (old index, new index) of the cheapest alignment; the table is filled one anti-diagonal at a time
  (vectorised), ties prefer a match, then skipping an old leaf.
  """
  no, nn = cost.shape
  d = np.empty((no + 1, nn + 1))
  d[:, 0] = np.arange(no + 1) * _SKIP
  d[0, :] = np.arange(nn + 1) * _SKIP
  for k in range(2, no + nn + 1):
    i = np.arange(max(1, k - nn), min(no, k - 1) + 1)
    j = k - i
    d[i, j] = np.minimum(np.minimum(d[i - 1, j], d[i, j - 1]) + _SKIP, d[i - 1, j - 1] + cost[i - 1, j - 1])
  i, j, found = no, nn, []
  while i > 0 and j > 0:
    c = cost[i - 1, j - 1]
    if c < np.inf and np.isclose(d[i, j], d[i - 1, j - 1] + c):
      found.append((i - 1, j - 1))
      i, j = i - 1, j - 1
    elif np.isclose(d[i, j], d[i - 1, j] + _SKIP):
      i -= 1
    else:
      j -= 1
  return found[::-1]


# -- input and output positions ---------------------------------------------------------

class LeafMap(NamedTuple):
  """How a new input (or output) leaf's positions correspond to an old one's."""

  old: int | None          # the old leaf, by index in its spec (None: no counterpart)
  maps: tuple              # per axis: old position per new position (np.ndarray), or None (by position)
  labels: tuple            # per axis: what aligned it, e.g. "features of 'obs'"
  grown_zero: tuple        # per axis: new positions assumed zero (an unnamed axis that grew)
  foreign: tuple = ()      # per axis: {new position: (old leaf, position)} for names from other leaves
  constants: tuple = ()    # per axis: {old position: value} for removed features declared constant


def input_maps(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str],
               constants: Mapping[str, float] | None = None) -> list[LeafMap]:
  """Per new input leaf: the old leaf of the same path, and the old position of every new feature.

  Per new input leaf, the old leaf of the same path and, along its feature axis, the old position of every new feature
  by name (``-1``: a new feature).
  """
  return _leaf_maps(old.spec, new.spec, rename, dict(constants or {}), "features")


def output_maps(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str]) -> list[tuple | None] | None:
  """Per output leaf and axis: the old position of every new named output position.

  Per output leaf (in the new table's order), per axis: the old position of every new named output position (``-1``: a
  new output), or None. None if no output has names.
  """
  old_spec, new_spec = getattr(old, "output_spec", None), getattr(new, "output_spec", None)
  if old_spec is None or new_spec is None or not (old_spec.names or new_spec.names):
    return None
  maps = _leaf_maps(old_spec, new_spec, rename, {}, "outputs")
  by_path = {l.path: m for l, m in zip(new_spec.leaves, maps)}
  return [None if p not in by_path else tuple(x if isinstance(x, np.ndarray) else None for x in by_path[p].maps)
          for p in new.output_paths]


def name_changes(old_names: Sequence[str], new_names: Sequence[str], rename: Mapping[str, str]):
  """(added, removed) names after ``rename`` (old -> new)."""
  renamed = [rename.get(n, n) for n in old_names]
  return (tuple(n for n in new_names if n not in renamed),
          tuple(o for o, n in zip(old_names, renamed) if n not in new_names))


def _renamed(old_names: Sequence[str], rename: Mapping[str, str], what: str) -> list[str]:
  """The old names after ``rename``; two old names may not become one."""
  out = [rename.get(n, n) for n in old_names]
  if len(set(out)) != len(out):
    seen: dict[str, str] = {}
    for o, n in zip(old_names, out):
      if n in seen:
        a, b = (seen[n], o) if seen[n] in rename else (o, seen[n])
        raise SurgeryError(
            f"rename maps old {what} {a!r} to {n!r}, but the old model already has {what} {b!r} "
            f"{'named' if b == n else 'renamed to'} {n!r}: two old {what}s would become one. Rename "
            f"{b!r} as well, or remove the entry for {a!r}.")
      seen[n] = o
  return out


def _leaf_maps(old_spec, new_spec, rename, constants, what: str) -> list[LeafMap]:
  old_by_path = {l.path: k for k, l in enumerate(old_spec.leaves)}
  old_names = _renamed(old_spec.names, rename, "output" if what == "outputs" else "feature")
  where = {}
  for j, leaf in enumerate(old_spec.leaves):
    if leaf.axis is not None:
      for p, fid in enumerate(leaf.feature_ids):
        where[old_names[fid]] = (j, p)
  out = []
  for leaf in new_spec.leaves:
    k = old_by_path.get(leaf.path)
    ol = None if k is None else old_spec.leaves[k]
    if ol is None or len(ol.shape) != len(leaf.shape) or (
        leaf.axis is None and ol.axis is None and leaf.feature_ids and ol.feature_ids
        and old_names[ol.feature_ids[0]] != new_spec.names[leaf.feature_ids[0]]):
      out.append(LeafMap(None, (), (), ()))
      continue
    maps: list[np.ndarray | None] = []
    labels, zero, foreign, consts = [], [], [], []
    for a in range(len(leaf.shape)):
      if leaf.axis == a and ol.axis == a:
        pos = {old_names[fid]: p for p, fid in enumerate(ol.feature_ids)}
        names = [new_spec.names[fid] for fid in leaf.feature_ids]
        src = np.array([pos.get(nm, -1) for nm in names], np.int64)
        maps.append(src)
        labels.append(f"{what} of {leaf.path or '<root>'!r}")
        zero.append(False)
        foreign.append({i: where[nm] for i, nm in enumerate(names)
                        if src[i] < 0 and nm in where and where[nm][0] != k})
        present = set(names)
        consts.append({p: float(constants[old_spec.names[fid]]) for p, fid in enumerate(ol.feature_ids)
                       if old_spec.names[fid] in constants and old_names[fid] not in present})
      else:
        maps.append(None)
        labels.append("")
        zero.append(leaf.axis is None and not leaf.feature_ids)
        foreign.append({})
        consts.append({})
    out.append(LeafMap(k, tuple(maps), tuple(labels), tuple(zero), tuple(foreign), tuple(consts)))
  return out
