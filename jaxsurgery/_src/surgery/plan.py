"""Surgery planning: decide where every new parameter element comes from, and report it.

The steps: match the features and the leaves (:mod:`~jaxsurgery._src.surgery.match`),
align every axis of every matched leaf (:mod:`~jaxsurgery._src.surgery.align`,
:mod:`~jaxsurgery._src.surgery.axes`), decide which fresh elements become zero
("random in, zero out") and whether the function is preserved
(:mod:`~jaxsurgery._src.surgery.novelty`), count, explain and check. Applying
the plan is :mod:`~jaxsurgery._src.surgery.remap`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

from jaxsurgery._src import display
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import SurgeryError
from jaxsurgery._src.core.table import FeatureTable
from jaxsurgery._src.surgery import novelty
from jaxsurgery._src.surgery.align import align_leaf, signatures
from jaxsurgery._src.surgery.axes import AxisHow
from jaxsurgery._src.surgery.match import FeatureMaps, feature_maps, match_leaves, restrict
from jaxsurgery._src.surgery.remap import Surgery

#: The element counts of a leaf plan (keys of ``LeafPlan.counts`` and ``Report.totals()``).
Count = Literal["copied", "moved", "fresh", "zeroed", "dropped"]
COUNTS: tuple[Count, ...] = ("copied", "moved", "fresh", "zeroed", "dropped")


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Where the elements of one new parameter leaf come from.

  Attributes:
    path: the new leaf's path.
    old_path: the old leaf it is taken from, or ``None`` for a new leaf.
    shape: the new shape.
    old_shape: the old shape (``None`` for a new leaf).
    maps: per axis, the old index of every new index (``-1``: fresh), or
      ``None`` for the identity.
    how: per axis, how it was aligned (an :class:`AxisHow`: prints as
      ``"identity"``, ``"features"``, ``"features in segments ..."``,
      ``"segments ..."``, ``"blockwise ..."`` or ``"prefix"``).
    zero: broadcastable bool mask of the fresh elements set to zero, or ``None``.
    counts: element counts ``copied``, ``moved``, ``fresh``, ``zeroed`` (new
      elements) and ``dropped`` (old elements not carried over).

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: x @ p["w"]
    >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"]))
    >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["a", "c", "b"]))
    >>> (leaf,) = js.plan(old, new).report.leaves
    >>> leaf.how, leaf.maps[0].tolist(), leaf.counts["fresh"]
    (('features', 'identity'), [0, -1, 1], 3)
  """

  path: str
  old_path: str | None
  shape: tuple[int, ...]
  old_shape: tuple[int, ...] | None
  maps: tuple[np.ndarray | None, ...]
  how: tuple[AxisHow, ...]
  zero: np.ndarray | None
  counts: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class Report:
  """What a surgery does, leaf by leaf, and whether it preserves the function.

  ``preserved`` is the verdict of the static check (novelty propagation):

  * ``True`` -- proven: the new model computes the old function on the old
    features, whatever the new features' values (a static proof; check it
    numerically with :func:`~jaxsurgery.verify`);
  * ``None`` -- not proven: novelty (new features or fresh elements) may reach
    an output; ``reasons`` names the operations where it spreads. The function
    may still be preserved, and :func:`~jaxsurgery.verify` tells;
  * ``False`` -- not preserved: a removed feature the old outputs depend on, or
    an old leaf dropped.

  Attributes:
    leaves: one :class:`LeafPlan` per new parameter leaf.
    dropped_leaves: ``(old path, shape)`` of old leaves with no counterpart.
    added: features of the new table only.
    removed: features of the old table only.
    moved: shared features at another input leaf or position.
    renamed_features: ``{old name: new name}`` applied.
    matching: ``(old path, new path, why)`` per matched leaf.
    preserved: ``True``, ``None`` or ``False`` (see above).
    reasons: why the verdict is not ``True``, and other remarks.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> w = lambda n: {"w": jax.ShapeDtypeStruct((n, 2), jnp.float32)}
    >>> x = lambda n: jax.ShapeDtypeStruct((1, n), jnp.float32)
    >>> old = js.dependency_table(fn, w(2), x(2), js.Features(["a", "b"]))
    >>> new = js.dependency_table(fn, w(3), x(3), js.Features(["a", "new", "b"]))
    >>> report = js.plan(old, new).report
    >>> report.preserved, report.added, report.totals()["moved"]
    (True, ('new',), 2)
  """

  leaves: tuple[LeafPlan, ...]
  dropped_leaves: tuple[tuple[str, tuple[int, ...]], ...]
  added: tuple[str, ...]
  removed: tuple[str, ...]
  moved: tuple[str, ...]
  renamed_features: Mapping[str, str]
  matching: tuple[tuple[str, str, str], ...]
  preserved: bool | None
  reasons: tuple[str, ...]

  def totals(self) -> dict[str, int]:
    """Element counts summed over the leaves (dropped leaves count as dropped)."""
    out: dict[str, int] = {k: 0 for k in COUNTS}
    for leaf in self.leaves:
      for k in out:
        out[k] += leaf.counts[k]
    for _, shape in self.dropped_leaves:
      out["dropped"] += int(np.prod(shape, dtype=np.int64))
    return out

  def dropped_elements(self) -> dict[str, np.ndarray]:
    """Old elements that are not carried over: ``{old path: bool array of the old shape}``."""
    out = {}
    for leaf in self.leaves:
      if leaf.old_path is None or leaf.old_shape is None:
        continue
      used = np.zeros(leaf.old_shape, bool)
      idx = []
      for a, m in enumerate(leaf.maps):
        m = np.arange(leaf.shape[a]) if m is None else m
        idx.append(np.unique(m[m >= 0]))
      used[np.ix_(*idx)] = True
      if not used.all():
        out[leaf.old_path] = ~used
    for path, shape in self.dropped_leaves:
      out[path] = np.ones(shape, bool)
    return out

  def __repr__(self) -> str:
    return display.report_text(self)

  def _repr_html_(self) -> str:
    return display.report_html(self)


# -- arguments ---------------------------------------------------------------------

def _merge(what: str, generic: Mapping[str, str], specific: Mapping[str, str] | None) -> dict[str, str]:
  out = dict(generic)
  for k, v in (specific or {}).items():
    if k in out and out[k] != v:
      raise SurgeryError(f"`rename` maps {k!r} to {out[k]!r} but `{what}` maps it to {v!r}; give each old "
                         f"name once (prefer `{what}`, which cannot be mistaken for the other kind of name).")
    out[k] = v
  return out


def split_rename(old: FeatureTable, rename: Mapping[str, str] | None, rename_features: Mapping[str, str] | None,
                 rename_params: Mapping[str, str] | None,
                 rename_outputs: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
  """``(feature renames, parameter path renames)`` from :func:`plan`'s rename arguments.

  ``rename`` keys that are old feature names rename features, the others
  parameter paths; ``rename_features`` and ``rename_params`` say which.
  """
  if rename_outputs:
    raise SurgeryError(
        f"`rename_outputs` renames output names, but these tables have no named outputs: output names "
        f"come with `outputs=` in dependency_table, which this version does not support yet. Got "
        f"{dict(rename_outputs)}; leave `rename_outputs` out.")
  rename = dict(rename or {})
  features = _merge("rename_features", {k: v for k, v in rename.items() if k in old.features}, rename_features)
  params = _merge("rename_params", {k: v for k, v in rename.items() if k not in old.features}, rename_params)
  return features, params


# -- per-leaf plans -------------------------------------------------------------------

def _fresh_mask(shape, maps) -> np.ndarray | None:
  fresh = None
  for a, m in enumerate(maps):
    if m is None or (m >= 0).all():
      continue
    f = (m < 0).reshape((1,) * a + (-1,) + (1,) * (len(shape) - a - 1))
    fresh = f if fresh is None else (fresh | f)
  return fresh


def _grown_axes(maps) -> dict[int, int]:
  """Axes whose old indices keep their place and whose fresh indices are all at the end."""
  out = {}
  for a, m in enumerate(maps):
    if m is None:
      continue
    k = int(np.count_nonzero(m >= 0))
    if k < len(m) and np.array_equal(m[:k], np.arange(k)) and (m[k:] < 0).all():
      out[a] = k
  return out


def _counts(shape, old_shape, maps, fresh, zero) -> dict[str, int]:
  size = int(np.prod(shape, dtype=np.int64))
  n_fresh = 0 if fresh is None else M.broadcast_count(fresh, shape)
  n_zero = 0 if zero is None else M.broadcast_count(zero, shape)
  # copied: the same index on every axis (an outer product: count per axis, multiply);
  # moved: carried over from another position. A fresh index (-1) is never "same".
  n_same = 1
  for a, m in enumerate(maps):
    n_same *= shape[a] if m is None else int(np.count_nonzero(m == np.arange(shape[a])))
  used = 1
  for a, m in enumerate(maps):
    used *= old_shape[a] if m is None else len(np.unique(m[m >= 0]))
  return dict(copied=n_same, moved=size - n_fresh - n_same, fresh=n_fresh, zeroed=n_zero,
              dropped=int(np.prod(old_shape, dtype=np.int64)) - used)


def _leaf_plans(old: FeatureTable, new: FeatureTable, by_new, aligned, fresh, zeroed) -> list[LeafPlan]:
  leaves = []
  for n in new.paths:
    shape = new.shapes[n]
    zero = zeroed[n]
    if n in aligned:
      o = by_new[n][0]
      maps, how = aligned[n]
      counts = _counts(shape, old.shapes[o], maps, fresh[n], zero)
      leaves.append(LeafPlan(n, o, shape, old.shapes[o], tuple(maps), tuple(how), zero, counts))
    else:
      size = int(np.prod(shape, dtype=np.int64))
      nz = 0 if zero is None else M.broadcast_count(zero, shape)
      leaves.append(LeafPlan(n, None, shape, None, (), (), zero,
                             dict(copied=0, moved=0, fresh=size, zeroed=nz, dropped=0)))
  return leaves


# -- verdict, reasons and strict checks ----------------------------------------------

def _removed_reasons(old: FeatureTable, removed: tuple[str, ...]) -> list[str]:
  reasons = []
  for f_ in removed:
    k = old.features.index(f_)
    used = any(M.reduce_all(m) is not None and (M.reduce_all(m)[k // M.BITS] >> (k % M.BITS)) & 1
               for m in old.output_packed.values() if m is not None)
    if used:
      reasons.append(f"feature {f_!r} was removed and the old outputs depend on it")
  return reasons


def _novelty_reasons(nov: novelty.Novelty) -> list[str]:
  reasons = []
  if nov.novel_outputs:
    where = "; ".join(s.describe() for s in nov.sites[:4]) or "no single operation (see docs/surgery.md)"
    more = f" (+{len(nov.sites) - 4} more)" if len(nov.sites) > 4 else ""
    reasons.append("novelty (new features / fresh elements) reaches outputs " + ", ".join(
        repr(p or "<root>") for p in nov.novel_outputs) + f"; it spreads at {where}{more}. Exact "
        "preservation is not proven statically -- check with jaxsurgery.verify")
  for p in nov.assumed_in_range:
    reasons.append(f"{p!r} grew at the end of a gathered axis: preservation assumes ids within the old "
                   f"size (the old model could not select the new rows)")
  return reasons


def _unexplained_drop(old: FeatureTable, leaf: LeafPlan, removed) -> str | None:
  """Why old elements of ``leaf`` are dropped, if neither a removed feature nor a narrowed axis explains it.

  ``None`` when everything dropped is expected.
  """
  if leaf.old_path is None or leaf.old_shape is None or not leaf.counts["dropped"]:
    return None
  gone = np.array([old.features.index(f) for f in removed], dtype=np.int64)
  for a, (m, how) in enumerate(zip(leaf.maps, leaf.how)):
    if m is None:
      continue
    dropped = np.setdiff1d(np.arange(leaf.old_shape[a]), m[m >= 0])
    if not len(dropped):
      continue
    if how.kind == "features":  # plain or in segments: a drop is explained by removed features
      sig = signatures(restrict(old.packed[leaf.old_path], gone, leaf.old_shape), a, leaf.old_shape[a])
      bad = [int(i) for i in dropped if not sig[i].any()]
      if bad:
        return f"axis {a} indices {bad[:8]} are dropped but touched by no removed feature"
    elif leaf.shape[a] >= leaf.old_shape[a]:
      return f"axis {a} ({how}) drops indices {dropped[:8].tolist()} although it did not shrink"
  return None


def _inconsistent(old: FeatureTable, new: FeatureTable, leaf: LeafPlan, fmaps: FeatureMaps) -> int:
  """Carried-over elements whose touch sets (over shared features) differ between the tables."""
  if not len(fmaps.old_idx) or leaf.old_path is None:
    return 0
  nd = restrict(new.packed[leaf.path], fmaps.new_idx, leaf.shape)
  od = restrict(old.packed[leaf.old_path], fmaps.old_idx, leaf.old_shape)
  valid = np.ones((1,) * len(leaf.shape), bool)
  for a, m in enumerate(leaf.maps):
    if m is None:
      continue
    if od.shape[a] != 1:
      od = np.take(od, np.maximum(m, 0), axis=a)
    valid = valid & (m >= 0).reshape((1,) * a + (-1,) + (1,) * (len(leaf.shape) - a - 1))
  differs = (nd != od).any(-1) & valid
  return M.broadcast_count(differs, leaf.shape) if differs.any() else 0


def _check_strict(old: FeatureTable, leaves, removed, dropped_leaves, inconsistent) -> None:
  unexplained = {l.path: why for l in leaves for why in [_unexplained_drop(old, l, removed)] if why}
  unexplained.update({p: "no counterpart in the new model" for p, _ in dropped_leaves})
  unexplained.update({p: f"{n:,} inconsistent elements" for p, n in inconsistent.items()})
  if unexplained:
    lines = "\n".join(f"  {p}: {why}" for p, why in unexplained.items())
    raise SurgeryError(f"strict=True: old parameter elements would be dropped or misplaced beyond removed "
                       f"features and narrowed axes:\n{lines}\nSee surgery.report; pass `rename_params=` to "
                       f"pair leaves, or strict=False to accept.")


# -- the plan --------------------------------------------------------------------

def plan(old_table: FeatureTable, new_table: FeatureTable, *, rename: Mapping[str, str] | None = None,
         rename_features: Mapping[str, str] | None = None, rename_params: Mapping[str, str] | None = None,
         rename_outputs: Mapping[str, str] | None = None, strict: bool = False) -> Surgery:
  """Plans the transfer of parameters from the old model to the new one.

  Args:
    old_table: :func:`dependency_table` of the old model.
    new_table: :func:`dependency_table` of the new model.
    rename: maps old names to new names, for features *and* parameter paths
      (e.g. ``{"Linear_1/kernel": "Linear_2/kernel", "hp": "health"}``); a key
      that is an old feature name renames that feature.
    rename_features: ``{old feature name: new feature name}``.
    rename_params: ``{old parameter path: new parameter path}``, pairing leaves
      explicitly.
    rename_outputs: reserved for output names (see ``outputs=`` of the coming
      output-side surgery); must be empty for now.
    strict: raise if anything beyond removed features and narrowed axes would
      be dropped, or carried over inconsistently.

  Returns:
    A :class:`Surgery`: call it as ``surgery(old_params, new_params_init)``.
    ``surgery.report`` says what moves where.

  Raises:
    SurgeryError: renames that name nothing or conflict, leaves that cannot be
      aligned, or (with ``strict=True``) elements dropped without a reason.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> old_x = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    >>> new_x = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> old_p = {"w": jnp.array([[1., 2.], [3., 4.]])}
    >>> new_init = {"w": jnp.full((3, 2), 9.)}
    >>> old = js.dependency_table(fn, old_p, old_x, js.Features(["hp", "mana"]))
    >>> new = js.dependency_table(fn, new_init, new_x, js.Features(["mana", "armor", "health"]))
    >>> surgery = js.plan(old, new, rename_features={"hp": "health"})
    >>> np.asarray(surgery(old_p, new_init)["w"]).tolist()  # rows follow their features
    [[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]]
  """
  feature_rename, path_rename = split_rename(old_table, rename, rename_features, rename_params, rename_outputs)
  fmaps = feature_maps(old_table, new_table, feature_rename)
  pairs = match_leaves(old_table, new_table, path_rename, fmaps)
  by_new = {n: (o, why) for o, n, why in pairs}
  axes_cache: dict = {}  # consumer/producer indexes of both jaxprs, for this plan only
  aligned = {n: align_leaf(old_table, new_table, by_new[n][0], n, fmaps, axes_cache)
             for n in new_table.paths if n in by_new}
  fresh = {n: _fresh_mask(new_table.shapes[n], aligned[n][0]) if n in aligned
           else np.ones((1,) * len(new_table.shapes[n]), bool) for n in new_table.paths}
  nov = novelty.analyse(new_table, fmaps.added, fresh, grown={n: _grown_axes(aligned[n][0]) for n in aligned})
  leaves = _leaf_plans(old_table, new_table, by_new, aligned, fresh, nov.zeroed)
  matched_old = {o for o, _, _ in pairs}
  dropped_leaves = tuple((p, old_table.shapes[p]) for p in old_table.paths if p not in matched_old)

  reasons = _removed_reasons(old_table, fmaps.removed)
  reasons += [f"old parameter {p!r} {shape} has no counterpart in the new model" for p, shape in dropped_leaves]
  reasons += _novelty_reasons(nov)
  preserved = False if any("removed" in r or "no counterpart" in r for r in reasons) else (
      True if not nov.novel_outputs else None)
  inconsistent = {}
  for leaf in leaves:
    n_bad = _inconsistent(old_table, new_table, leaf, fmaps)
    if n_bad:
      inconsistent[leaf.path] = n_bad
      reasons.append(f"{n_bad:,} elements of {leaf.path!r} come from elements of {leaf.old_path!r} that "
                     f"shared features touch differently: check the leaf matching (pass `rename_params=`) "
                     f"or the feature names")
  if inconsistent and preserved:
    preserved = None
  report = Report(tuple(leaves), dropped_leaves, fmaps.added, fmaps.removed, fmaps.moved, feature_rename,
                  tuple(pairs), preserved, tuple(reasons))
  if strict:
    _check_strict(old_table, leaves, fmaps.removed, dropped_leaves, inconsistent)
  return Surgery(old_table, new_table, report)
