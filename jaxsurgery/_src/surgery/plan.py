"""Surgery planning: decide where every new parameter element comes from, and report it.

The steps: match the features and the leaves (:mod:`~jaxsurgery._src.surgery.match`);
relate the new program to the old one (:mod:`~jaxsurgery._src.surgery.relations`),
which aligns every parameter axis by what it meets, decides the recipes (zeros,
means, scales, clones, folded constants) and proves preservation; count, explain
and check. Applying the plan is :mod:`~jaxsurgery._src.surgery.remap`.
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
from jaxsurgery._src.surgery import match
from jaxsurgery._src.surgery.align import signature_defaults, signatures, varies
from jaxsurgery._src.surgery.match import FeatureMaps, feature_maps, match_leaves, restrict
from jaxsurgery._src.surgery.relations import maps as A
from jaxsurgery._src.surgery.relations.driver import Relation, relate
from jaxsurgery._src.surgery.remap import Surgery

#: How one axis of a leaf is aligned.
AxisKind = Literal["identity", "features", "outputs", "segments", "blockwise", "prefix", "positional",
                   "clone", "unused"]


class AxisHow(str):
  """How one axis of a leaf was aligned: a ``kind``, and a ``detail`` for segments and blocks.

  It is the string ``kind`` or ``"kind detail"`` (``"features in segments 4+4 -> 6+6"``,
  ``"blockwise 4x8 -> 4x12"``), so it prints and compares as that text.

  Example:
    >>> h = AxisHow("blockwise", "4x8 -> 4x12")
    >>> h, h.kind, h == "blockwise 4x8 -> 4x12"
    ('blockwise 4x8 -> 4x12', 'blockwise', True)
  """

  kind: AxisKind
  detail: str

  def __new__(cls, kind: AxisKind, detail: str = "") -> AxisHow:
    self = super().__new__(cls, f"{kind} {detail}" if detail else kind)
    self.kind, self.detail = kind, detail
    return self

  def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]  # pickles as (kind, detail)
    return self.kind, self.detail


#: The element counts of a leaf plan (keys of ``LeafPlan.counts`` and ``Report.totals()``).
Count = Literal["copied", "moved", "fresh", "zeroed", "dropped", "recipe"]
COUNTS: tuple[Count, ...] = ("copied", "moved", "fresh", "zeroed", "dropped", "recipe")


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Where the elements of one new parameter leaf come from.

  The value of a new leaf is computed in this order: the old leaf taken through
  ``maps`` (``init`` at fresh positions), plus the ``fold`` terms, the ``mean_axes``
  filled with the mean of the old positions, times ``scale``, plus the clone
  ``noise``, and zeros where ``zero`` says.

  Attributes:
    path: the new leaf's path.
    old_path: the old leaf it is taken from, or ``None`` for a new leaf.
    shape: the new shape.
    old_shape: the old shape (``None`` for a new leaf).
    maps: per axis, the old index of every new index (``-1``: fresh), or
      ``None`` for the identity.
    how: per axis, how it was aligned (an :class:`AxisHow`: prints as
      ``"identity"``, ``"features"``, ``"outputs"``, ``"features in segments ..."``,
      ``"segments ..."``, ``"blockwise ..."``, ``"clone"`` or ``"prefix"``).
    zero: broadcastable bool mask of the fresh elements set to zero, or ``None``.
    counts: element counts ``copied``, ``moved``, ``fresh``, ``zeroed`` (new
      elements), ``dropped`` (old elements not carried over) and ``recipe``
      (elements a recipe computes: rescaled, mean-filled or folded).
    zero_axes: the axes whose fresh positions are zero (``zero`` is their union).
    zero_all: the whole (new) leaf is zero.
    scale: the old values are multiplied by it (a gain absorbing a changed
      normalisation, a key absorbing a changed ``1/sqrt(head_dim)``, ``1/n`` for
      the fan-in of clones).
    mean_axes: axes whose fresh positions hold the mean of the old ones
      (average expansion, LEMON).
    noise_axes: axes along which clones get zero-sum noise (so they train apart).
    noise: the noise's scale, relative to the leaf's root mean square.
    fold: removed features declared constant, folded into this bias:
      ``((expression, old kernel index, row axis, row), ...)``.
    notes: the recipes in words.

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
  zero_axes: tuple[int, ...] = ()
  zero_all: bool = False
  scale: float = 1.0
  mean_axes: tuple[int, ...] = ()
  noise_axes: tuple[int, ...] = ()
  noise: float = 0.0
  fold: tuple = ()
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Report:
  """What a surgery does, leaf by leaf, and whether it preserves the function.

  ``preserved`` is the verdict of the static check, which relates the new
  program to the old one operation by operation (docs/surgery.md):

  * ``True`` -- proven: on the old inputs (shared features equal, new ones any
    value), every old output position of the new model equals the old model's,
    under the stated ``assumptions`` (e.g. ids below an old vocabulary's size);
    check it numerically with :func:`~jaxsurgery.verify`;
  * ``None`` -- not proven: ``reasons`` names the operation (and source line)
    where the relation is lost, or the epsilon that keeps it approximate. The
    function may still be preserved, and :func:`~jaxsurgery.verify` tells;
  * ``False`` -- not preserved: a removed feature the old outputs depend on (and
    that was not declared constant), or an old leaf dropped.

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
    outputs_added: named output positions of the new model only.
    outputs_removed: named output positions of the old model only.
    outputs_moved: shared output names at another leaf or position.
    renamed_outputs: ``{old output name: new name}`` applied.
    assumptions: what the proof assumes about the inputs and the fresh values
      (e.g. that a new running variance under ``rsqrt`` stays positive).
    widen: the recipe used for widened axes (``"auto"``, ``"zero"`` or ``"clone"``).
    constants: ``{removed feature: value}`` declared constant and folded (``verify`` feeds
      the old model these values).

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
  outputs_added: tuple[str, ...] = ()
  outputs_removed: tuple[str, ...] = ()
  outputs_moved: tuple[str, ...] = ()
  renamed_outputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  assumptions: tuple[str, ...] = ()
  widen: str = "auto"
  constants: Mapping[str, float] = dataclasses.field(default_factory=dict)

  def totals(self) -> dict[str, int]:
    """Element counts summed over the leaves (dropped leaves count as dropped)."""
    out: dict[str, int] = {k: 0 for k in COUNTS}
    for leaf in self.leaves:
      for k in out:
        out[k] += leaf.counts.get(k, 0)
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
                 rename_params: Mapping[str, str] | None, rename_outputs: Mapping[str, str] | None
                 ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
  """``(feature renames, parameter path renames, output renames)`` from :func:`plan`'s rename arguments.

  ``rename`` keys that are old feature names rename features, old output names
  rename outputs, the others parameter paths (or path prefixes ending in ``/``);
  ``rename_features``, ``rename_params`` and ``rename_outputs`` say which.
  """
  rename = dict(rename or {})
  outputs_known = tuple(getattr(old, "output_features", ()) or ())
  features = _merge("rename_features", {k: v for k, v in rename.items() if k in old.features}, rename_features)
  outputs = _merge("rename_outputs", {k: v for k, v in rename.items() if k in outputs_known
                                      and k not in old.features}, rename_outputs)
  params = _merge("rename_params", {k: v for k, v in rename.items() if k not in old.features
                                    and k not in outputs_known}, rename_params)
  unknown = [k for k in outputs if k not in outputs_known]
  if unknown and not outputs_known:
    raise SurgeryError(f"`rename_outputs` renames {unknown}, but the old table has no named outputs: give "
                       f"output names with `outputs=` in dependency_table, or leave `rename_outputs` out.")
  if unknown:
    raise SurgeryError(f"`rename_outputs` names {unknown}, which the old table's outputs do not have. "
                       f"Old output names: {list(outputs_known)}.")
  return features, params, outputs


# -- per-leaf plans -------------------------------------------------------------------

def _column(m: np.ndarray, a: int, rank: int) -> np.ndarray:
  return m.reshape((1,) * a + (-1,) + (1,) * (rank - a - 1))


def _counts(shape, old_shape, maps, zero_axes, zero_all, recipe_new, recipe_old) -> dict[str, int]:
  """Element counts from the per-axis maps alone (no element-level array)."""
  size = int(np.prod(shape, dtype=np.int64))
  if old_shape is None:
    return dict(copied=0, moved=0, fresh=size, zeroed=size if zero_all else 0, dropped=0, recipe=0)
  kept = [shape[a] if m is None else int(np.count_nonzero(m >= 0)) for a, m in enumerate(maps)]
  n_old_pos = int(np.prod(kept, dtype=np.int64))
  # zeroed: fresh positions along a zeroed axis (a union of slabs: inclusion-exclusion by complement)
  n_zero = size - int(np.prod([kept[a] if a in zero_axes else shape[a] for a in range(len(shape))],
                              dtype=np.int64)) if zero_axes else 0
  n_same = 1
  for a, m in enumerate(maps):
    n_same *= shape[a] if m is None else int(np.count_nonzero(m == np.arange(shape[a])))
  used = 1
  for a, m in enumerate(maps):
    used *= old_shape[a] if m is None else len(np.unique(m[m >= 0]))
  recipe = (n_old_pos if recipe_old else 0) + recipe_new
  return dict(copied=n_same, moved=n_old_pos - n_same, fresh=size - n_old_pos, zeroed=n_zero,
              dropped=int(np.prod(old_shape, dtype=np.int64)) - used, recipe=recipe)


def _zero_mask(shape, maps, zero_axes, zero_all) -> np.ndarray | None:
  if zero_all:
    return np.ones((1,) * len(shape), bool)
  zero = None
  for a in zero_axes:
    m = maps[a]
    if m is None or (m >= 0).all():
      continue
    z = _column(m < 0, a, len(shape))
    zero = z if zero is None else (zero | z)
  return zero


def _grows(m: np.ndarray | None) -> bool:
  """Whether an axis map has new positions."""
  return m is not None and bool(np.any(m < 0))


def _mean_count(shape, maps, mean_axes) -> int:
  n = 0
  for a in mean_axes:
    m = maps[a]
    if m is not None:
      n += int(np.prod(shape, dtype=np.int64)) // shape[a] * int(np.count_nonzero(m < 0))
  return n


def _notes(d, i: int, widen: str, noise: float, mean_axes: tuple[int, ...]) -> tuple[str, ...]:
  out = []
  if i in d.scale and d.scale[i] != 1.0:
    out.append(f"old values x {d.scale[i]:.6g} (cancels a rescaling downstream: a normalisation over a "
               f"widened axis, an attention scale that changed, or the fan-in of clones)")
  for a in mean_axes:
    out.append(f"axis {a}: new positions hold the mean of the old ones (average expansion)")
  if widen == "clone" and noise:
    for a in sorted(d.noise.get(i, ())):
      out.append(f"axis {a}: zero-sum noise between clones (x {noise:g} of the leaf's rms), so they train apart")
  if d.fold.get(i):
    out.append(f"{len(d.fold[i])} removed constant feature(s) folded in")
  return tuple(out)


def _leaf_plans(old: FeatureTable, new: FeatureTable, pairs: Mapping[int, int], rel: Relation, widen: str,
                noise: float) -> list[LeafPlan]:
  d = rel.decisions
  leaves = []
  for i, n in enumerate(new.paths):
    shape = new.shapes[n]
    if i not in pairs:
      zero_all = i in d.zero_whole
      leaves.append(LeafPlan(n, None, shape, None, (), (), _zero_mask(shape, (), (), zero_all),
                             _counts(shape, None, (), (), zero_all, 0, False), zero_all=zero_all))
      continue
    o = old.paths[pairs[i]]
    old_shape = old.shapes[o]
    maps, how = [], []
    for a, src in enumerate(rel.maps[i]):
      if src is None:
        src = A.prefix(shape[a], old_shape[a])
      maps.append(None if len(src) == old_shape[a] and np.array_equal(src, np.arange(len(src))) else src)
      text = rel.structure[i][a]
      if text.startswith("segments") and (varies(new.packed[n], shape, a) or varies(old.packed[o], old_shape, a)):
        text = "features in " + text  # a feature axis made of pieces (pooled units, globals)
      how.append(_axis_how(text))
    zero_axes = tuple(sorted(d.zero_axes.get(i, ())))
    # A mean asked of an axis without new positions (a segment of a concatenation that did not grow)
    # is nothing to do.
    mean_axes = tuple(a for a in sorted(d.mean_axes.get(i, ())) if _grows(maps[a]))
    scale = d.scale.get(i, 1.0)
    fold = tuple(d.fold.get(i, ()))
    counts = _counts(shape, old_shape, maps, zero_axes, False, _mean_count(shape, maps, mean_axes),
                     scale != 1.0 or bool(fold))
    leaves.append(LeafPlan(
        n, o, shape, old_shape, tuple(maps), tuple(how), _zero_mask(shape, maps, zero_axes, False), counts,
        zero_axes=zero_axes, scale=scale, mean_axes=mean_axes,
        noise_axes=tuple(sorted(d.noise.get(i, ()))) if widen == "clone" and noise else (),
        noise=noise if widen == "clone" else 0.0, fold=fold, notes=_notes(d, i, widen, noise, mean_axes)))
  return leaves


def _axis_how(text: str) -> AxisHow:
  kind, _, detail = text.partition(" ")
  return AxisHow(kind, detail)  # type: ignore[arg-type]


# -- verdict, reasons and strict checks ----------------------------------------------

def _removed_reasons(old: FeatureTable, removed: tuple[str, ...]) -> list[str]:
  reasons = []
  for f_ in removed:
    k = old.features.index(f_)
    used = any(M.reduce_all(m) is not None and (M.reduce_all(m)[k // M.BITS] >> (k % M.BITS)) & 1
               for m in old.output_packed.values() if m is not None)
    if used:
      reasons.append(f"feature {f_!r} was removed and the old outputs depend on it (if it was constant "
                     f"in the old runs, declare it: `constants={{{f_!r}: value}}` folds it into a bias)")
  return reasons


def _relation_reasons(rel: Relation) -> list[str]:
  reasons = [f"not proven for output {o.path or '<root>'!r}: {o.reason}" for o in rel.outputs if not o.ok]
  if not rel.preserved:
    reasons += [s.describe() for s in rel.failures[:6]]
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
    if how.kind in ("features", "outputs"):  # a drop is explained by removed features or outputs
      if how.kind == "outputs":
        continue
      sig = signatures(restrict(old.packed[leaf.old_path], gone, leaf.old_shape), a, leaf.old_shape[a])
      bad = [int(i) for i in dropped if not sig[i].any()]
      if bad:
        return f"axis {a} indices {bad[:8]} are dropped but touched by no removed feature"
    elif leaf.shape[a] >= leaf.old_shape[a]:
      return f"axis {a} ({how}) drops indices {dropped[:8].tolist()} although it did not shrink"
  return None


def _inconsistent(old: FeatureTable, new: FeatureTable, leaf: LeafPlan, fmaps: FeatureMaps) -> int:
  """Carried-over elements whose touch sets (over shared features) differ between the tables.

  Compared axis by axis on the signatures (touches ORed over the other axes): the carried-over
  elements lying in a slab whose signature differs from its source's.
  """
  if not len(fmaps.old_idx) or leaf.old_path is None or leaf.old_shape is None:
    return 0
  nd = restrict(new.packed[leaf.path], fmaps.new_idx, leaf.shape)
  od = restrict(old.packed[leaf.old_path], fmaps.old_idx, leaf.old_shape)
  carried, consistent = 1, 1
  for a, m in enumerate(leaf.maps):
    src = np.arange(leaf.shape[a]) if m is None else m
    ok = src >= 0
    same = np.zeros(leaf.shape[a], bool)
    same[ok] = ~(signatures(nd, a, leaf.shape[a])[ok] != signatures(od, a, leaf.old_shape[a])[src[ok]]).any(-1)
    carried *= int(ok.sum())
    consistent *= int(same.sum())
  return carried - consistent


def _check_strict(old: FeatureTable, leaves, removed, dropped_leaves, inconsistent) -> None:
  unexplained = {l.path: why for l in leaves for why in [_unexplained_drop(old, l, removed)] if why}
  unexplained.update({p: "no counterpart in the new model" for p, _ in dropped_leaves})
  unexplained.update({p: f"{n:,} inconsistent elements" for p, n in inconsistent.items()})
  if unexplained:
    lines = "\n".join(f"  {p}: {why}" for p, why in unexplained.items())
    raise SurgeryError(f"strict=True: old parameter elements would be dropped or misplaced beyond removed "
                       f"features and narrowed axes:\n{lines}\nSee surgery.report; pass `rename_params=` to "
                       f"pair leaves, or strict=False to accept.")


def _check_arguments(widen: str, new_outputs: str, constants: Mapping[str, float], old: FeatureTable,
                     removed: tuple[str, ...]) -> None:
  if widen not in ("auto", "zero", "clone"):
    raise SurgeryError(f"`widen` must be 'auto', 'zero' or 'clone', got {widen!r}.")
  if new_outputs not in ("init", "mean"):
    raise SurgeryError(f"`new_outputs` must be 'init' or 'mean', got {new_outputs!r}.")
  unknown = [f for f in constants if f not in old.features]
  if unknown:
    raise SurgeryError(f"`constants=` names {unknown}, which the old model does not have. Old features: "
                       f"{list(old.features)[:12]}{' ...' if len(old.features) > 12 else ''}.")
  kept = [f for f in constants if f not in removed]
  if kept:
    raise SurgeryError(f"`constants=` names {kept}, which {'is' if len(kept) == 1 else 'are'} not removed: "
                       f"the new model still reads {'it' if len(kept) == 1 else 'them'}. Declare constants "
                       f"only for removed features (removed: {list(removed)}).")


def _clone_error(e: A.NotAMultiple, new: FeatureTable) -> SurgeryError:
  where = ", ".join(f"axis {a} of {new.paths[i]!r}" for i, a in e.free.members[:4]) or "an axis"
  return SurgeryError(f"`widen='clone'` needs integer multiples, but {where} grows {e.free.n_old} -> "
                      f"{e.free.n_new}. Pick a multiple ({2 * e.free.n_old}, {3 * e.free.n_old}, ...) or "
                      f"use `widen='auto'` (average expansion works for any width).")


def _mean_outputs(leaves: list[LeafPlan], new_outputs: str) -> list[LeafPlan]:
  """``new_outputs="mean"``: new output columns and biases are the mean of the old ones."""
  if new_outputs != "mean":
    return leaves
  out = []
  for leaf in leaves:
    axes = tuple(a for a, (h, m) in enumerate(zip(leaf.how, leaf.maps))
                 if h.kind == "outputs" and m is not None and (m < 0).any())
    if axes:
      zero_axes = tuple(a for a in leaf.zero_axes if a not in axes)
      leaf = dataclasses.replace(
          leaf, mean_axes=tuple(sorted(set(leaf.mean_axes) | set(axes))), zero_axes=zero_axes,
          zero=_zero_mask(leaf.shape, leaf.maps, zero_axes, False),
          notes=leaf.notes + tuple(f"axis {a}: new outputs start at the mean of the old ones" for a in axes))
    out.append(leaf)
  return out


# -- the plan --------------------------------------------------------------------

def plan(old_table: FeatureTable, new_table: FeatureTable, *, rename: Mapping[str, str] | None = None,
         rename_features: Mapping[str, str] | None = None, rename_params: Mapping[str, str] | None = None,
         rename_outputs: Mapping[str, str] | None = None, strict: bool = False, widen: str = "auto",
         new_outputs: str = "init", constants: Mapping[str, float] | None = None,
         clone_noise: float = 1e-2) -> Surgery:
  """Plans the transfer of parameters from the old model to the new one.

  Args:
    old_table: :func:`dependency_table` of the old model.
    new_table: :func:`dependency_table` of the new model.
    rename: maps old names to new names, for features, outputs *and* parameter
      paths (e.g. ``{"Linear_1/kernel": "Linear_2/kernel", "hp": "health"}``); a
      key that is an old feature (or output) name renames it.
    rename_features: ``{old feature name: new feature name}``.
    rename_params: ``{old parameter path: new parameter path}``, pairing leaves
      explicitly; a key ending in ``/`` renames a whole subtree
      (``{"h/1/": "h/2/"}``).
    rename_outputs: ``{old output name: new output name}`` (see ``outputs=`` in
      :func:`dependency_table`).
    strict: raise if anything beyond removed features and narrowed axes would
      be dropped, or carried over inconsistently.
    widen: how a widened axis that nothing names is filled: ``"auto"`` (new
      positions zero where that is exact, else the mean of the old ones with
      the gains rescaled: average expansion, which keeps a LayerNorm exact at
      any width), ``"zero"`` (zeros only) or ``"clone"`` (integer multiples:
      the old positions repeated, fan-in divided by the copy count, with
      zero-sum noise between the copies).
    new_outputs: new named output positions (actions, classes, tokens) keep the
      new model's init (``"init"``) or start at the mean of the old ones
      (``"mean"``, like Hugging Face's ``mean_resizing``).
    constants: ``{removed feature: value}`` for features that were constant in
      the old runs: their contribution is folded into the bias they fed, exactly.
    clone_noise: the scale of the noise between clones (relative to each
      leaf's root mean square; ``0`` for exact copies).

  Returns:
    A :class:`Surgery`: call it as ``surgery(old_params, new_params_init)``.
    ``surgery.report`` says what moves where and whether it is proven exact.

  Raises:
    SurgeryError: renames that name nothing or conflict, bad ``widen`` /
      ``new_outputs`` / ``constants``, a clone that is not a multiple, or (with
      ``strict=True``) elements dropped without a reason.

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
  feature_rename, path_rename, output_rename = split_rename(old_table, rename, rename_features, rename_params,
                                                            rename_outputs)
  fmaps = feature_maps(old_table, new_table, feature_rename)
  constants = dict(constants or {})
  _check_arguments(widen, new_outputs, constants, old_table, fmaps.removed)
  named = match_leaves(old_table, new_table, path_rename, fmaps)
  pairs = {new_table.paths.index(n): old_table.paths.index(o) for o, n, _ in named}
  try:
    rel = relate(old_table, new_table, pairs, match.input_maps(old_table, new_table, feature_rename, constants),
                 signature_defaults(old_table, new_table, pairs, fmaps),
                 output_maps=match.output_maps(old_table, new_table, output_rename), widen=widen)
  except A.NotAMultiple as e:
    raise _clone_error(e, new_table) from None
  leaves = _mean_outputs(_leaf_plans(old_table, new_table, pairs, rel, widen, clone_noise), new_outputs)
  matched_old = {o for o, _, _ in named}
  dropped_leaves = tuple((p, old_table.shapes[p]) for p in old_table.paths if p not in matched_old)
  unfolded = tuple(f for f in fmaps.removed if f not in constants)
  lost = _removed_reasons(old_table, unfolded)
  reasons = lost + [f"old parameter {p!r} {shape} has no counterpart in the new model" for p, shape in dropped_leaves]
  reasons += _relation_reasons(rel)
  preserved = False if (lost or dropped_leaves) else (True if rel.preserved else None)
  inconsistent = {}
  if preserved is not True or strict:
    for leaf in leaves:
      n_bad = _inconsistent(old_table, new_table, leaf, fmaps)
      if n_bad:
        inconsistent[leaf.path] = n_bad
        reasons.append(f"{n_bad:,} elements of {leaf.path!r} come from elements of {leaf.old_path!r} that "
                       f"shared features touch differently: check the leaf matching (pass `rename_params=`) "
                       f"or the feature names")
  out_added, out_removed, out_moved = _output_changes(old_table, new_table, output_rename)
  positional = [] if preserved is True else _positional_named_axes(old_table, new_table, leaves, feature_rename,
                                                                  output_rename)
  reasons += positional
  report = Report(tuple(leaves), dropped_leaves, fmaps.added, fmaps.removed, fmaps.moved, feature_rename,
                  tuple(named), preserved, tuple(reasons), out_added, out_removed, out_moved, output_rename,
                  tuple(rel.assumptions), widen, dict(constants))
  if strict:
    _check_strict(old_table, leaves, fmaps.removed, dropped_leaves, inconsistent)
    if positional:
      raise SurgeryError("strict=True: axes aligned by position where names changed:\n  "
                         + "\n  ".join(positional))
  surgery = Surgery(old_table, new_table, report)
  surgery.relation = rel
  return surgery


def _positional_named_axes(old: FeatureTable, new: FeatureTable, leaves, feature_rename, output_rename) -> list[str]:
  """Axes aligned by position whose sizes are those of a changed named axis (features or outputs).

  The relation pass aligns an axis by name wherever it can follow the names to it; an axis it could
  not follow (an operation without a fine rule in between) falls back to position. When that axis
  has exactly the old and new counts of a spec leaf whose names changed, it most likely holds those
  names: say so, per leaf and axis, instead of shifting rows silently.
  """
  counts = set()
  for o_spec, n_spec, rename in ((old.spec, new.spec, feature_rename),
                                 (getattr(old, "output_spec", None), getattr(new, "output_spec", None), output_rename)):
    if o_spec is None or n_spec is None:
      continue
    o_leaves = {l.path: l for l in o_spec.leaves}
    for nl in n_spec.leaves:
      ol = o_leaves.get(nl.path)
      if ol is None or ol.axis is None or nl.axis is None:
        continue
      o_names = [rename.get(o_spec.names[k], o_spec.names[k]) for k in ol.feature_ids]
      n_names = [n_spec.names[k] for k in nl.feature_ids]
      if o_names != n_names:
        counts.add((len(o_names), len(n_names), nl.path or "<root>"))
  out = []
  for leaf in leaves:
    if leaf.old_shape is None:
      continue
    for a, how in enumerate(leaf.how):
      if str(how).split(" ")[0] not in ("prefix", "positional"):
        continue
      for n_old, n_new, where in sorted(counts):
        if (leaf.old_shape[a], leaf.shape[a]) == (n_old, n_new):
          out.append(f"{leaf.path!r} axis {a} ({n_old} -> {n_new}) is aligned by position ({how}), but its sizes "
                     f"are those of the named axis of {where!r}, whose names changed: the planner could not "
                     f"follow the names to it (see the notes above). Check its rows, give the operation in "
                     f"between a rule (js.register_rule), or pair it explicitly.")
          break
  return out


def _output_changes(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str]):
  old_names = tuple(getattr(old, "output_features", ()) or ())
  new_names = tuple(getattr(new, "output_features", ()) or ())
  added, removed = match.name_changes(old_names, new_names, rename)
  moved = ()
  o_spec, n_spec = getattr(old, "output_spec", None), getattr(new, "output_spec", None)
  if o_spec is not None and n_spec is not None:
    where = lambda spec, k: (spec.leaves[spec.locations[k][0]].path, spec.locations[k][1])
    o_loc = {rename.get(n, n): where(o_spec, k) for k, n in enumerate(o_spec.names)}
    moved = tuple(n for k, n in enumerate(n_spec.names) if n in o_loc and o_loc[n] != where(n_spec, k))
  return added, removed, moved
