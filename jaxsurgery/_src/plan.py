"""Surgery: align two tables, decide where every new parameter element comes from, and remap.

Leaves are paired by ``rename``, then by aligning the two programs' parameters
in order of first use. For each pair the plan is a product of per-axis index
maps ``new index -> old index or -1 (fresh)``:

* feature axes (touch sets vary along the axis in either model) match indices
  by their signature, the OR of their touch sets over the other axes restricted
  to the features both models share (named features wherever they sit, shared
  signatures in order within each concatenated piece). Empty signature -> fresh.
* other axes are aligned positionally in the coordinates in which they are
  consumed (:mod:`jaxsurgery._src.axes`): a grown axis keeps the old prefix of
  every block / factor / piece, the rest is fresh; a shrunk one drops the tail.

Which fresh elements become zero ("random in, zero out") is decided by
:mod:`jaxsurgery._src.novelty`, which also proves preservation statically."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurgery._src import axes as axes_lib
from jaxsurgery._src import features as feats
from jaxsurgery._src import masks as M
from jaxsurgery._src import novelty
from jaxsurgery._src.table import FeatureTable


class SurgeryError(ValueError):
  """The plan cannot be applied (mismatched trees) or violates ``strict``."""


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  path: str
  old_path: str | None
  shape: tuple[int, ...]
  old_shape: tuple[int, ...] | None
  maps: tuple[np.ndarray | None, ...]  # per axis: old index per new index (-1 fresh); None = identity
  how: tuple[str, ...]                  # per axis: "identity", "features", "prefix", "blockwise ..."
  zero: np.ndarray | None               # broadcastable bool: fresh elements set to zero
  counts: Mapping[str, int]             # copied, moved, fresh, zeroed, dropped


@dataclasses.dataclass(frozen=True)
class Report:
  leaves: tuple[LeafPlan, ...]
  dropped_leaves: tuple[tuple[str, tuple[int, ...]], ...]
  added: tuple[str, ...]
  removed: tuple[str, ...]
  moved: tuple[str, ...]
  renamed_features: Mapping[str, str]
  matching: tuple[tuple[str, str, str], ...]  # (old path, new path, why)
  preserved: bool | None
  reasons: tuple[str, ...]

  def totals(self) -> dict[str, int]:
    out = {k: 0 for k in ("copied", "moved", "fresh", "zeroed", "dropped")}
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
      if leaf.old_path is None:
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
    from jaxsurgery._src import display
    return display.report_text(self)

  def _repr_html_(self) -> str:
    from jaxsurgery._src import display
    return display.report_html(self)


# -- feature correspondence ---------------------------------------------------

def _feature_maps(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str]):
  unknown = [k for k in rename if k not in old.features]
  if unknown:
    raise SurgeryError(f"rename maps features {unknown} that the old table does not have. "
                       f"Old features: {list(old.features)}")
  old_names = [rename.get(n, n) for n in old.features]
  shared = [n for n in old_names if n in new.features]
  added = tuple(n for n in new.features if n not in old_names)
  removed = tuple(f for f, n in zip(old.features, old_names) if n not in new.features)
  old_idx = np.array([old_names.index(n) for n in shared], dtype=np.int64)
  new_idx = np.array([new.features.index(n) for n in shared], dtype=np.int64)
  moved = tuple(n for n in shared if _location(old, old.features[old_names.index(n)]) != _location(new, n))
  return old_idx, new_idx, added, removed, moved


def _location(table: FeatureTable, name: str):
  k = table.features.index(name)
  leaf, pos = table.spec.locations[k]
  return table.spec.leaves[leaf].path, pos, k


def _restrict(packed: np.ndarray | None, idx: np.ndarray, shape) -> np.ndarray:
  """Dense bool touches (compressed axes kept) restricted to features ``idx``: (..., len(idx))."""
  if packed is None:
    return np.zeros((1,) * len(shape) + (len(idx),), bool)
  p = M.lift(packed, len(shape))
  bits = (p[..., idx // M.BITS] >> (idx % M.BITS).astype(np.uint32)) & np.uint32(1)
  return bits.astype(bool)


# -- leaf matching --------------------------------------------------------------

def _first_use_order(table: FeatureTable) -> list[str]:
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
  dense = _restrict(table.packed[path], idx, table.shapes[path])
  return np.packbits(dense.reshape(-1, dense.shape[-1]).any(0)).tobytes()


def _match_leaves(old: FeatureTable, new: FeatureTable, rename: Mapping[str, str], fmaps=None):
  """Pairs (old path, new path, why): explicit renames, then an alignment of the two
  programs' parameters in order of first use.

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
        raise SurgeryError(f"rename maps {o!r} to {n!r}, which is not a parameter of the new model. "
                           f"New paths: {list(new.paths)}")
      pairs.append((o, n, "rename"))
      used_old.add(o)
      used_new.add(n)
  olds = [p for p in _first_use_order(old) if p not in used_old]
  news = [p for p in _first_use_order(new) if p not in used_new]
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


# -- per-leaf alignment ----------------------------------------------------------

def _signatures(dense: np.ndarray, axis: int, size: int) -> np.ndarray:
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


def _align_leaf(old: FeatureTable, new: FeatureTable, old_path: str, new_path: str, fmaps, axes_cache):
  old_idx, new_idx = fmaps[0], fmaps[1]
  shape, old_shape = new.shapes[new_path], old.shapes[old_path]
  if len(shape) != len(old_shape):
    raise SurgeryError(f"Cannot align {old_path!r} {old_shape} with {new_path!r} {shape}: ranks differ. "
                       f"Pass rename= to pair leaves explicitly, or leave it unmatched.")
  new_dense = _restrict(new.packed[new_path], new_idx, shape)
  old_dense = _restrict(old.packed[old_path], old_idx, old_shape)
  maps, how = [], []
  old_pi, new_pi = old.paths.index(old_path), new.paths.index(new_path)
  for a, (n, o) in enumerate(zip(shape, old_shape)):
    if _varies(new.packed[new_path], shape, a) or _varies(old.packed[old_path], old_shape, a):
      new_seg = _pieces_of(axes_lib.axis_structure(new.jaxpr, new_pi, a, cache=axes_cache), n)
      old_seg = _pieces_of(axes_lib.axis_structure(old.jaxpr, old_pi, a, cache=axes_cache), o)
      if new_seg is None or old_seg is None or new_seg[-1] != old_seg[-1]:
        new_seg = old_seg = None
      m = _match_signatures(_signatures(new_dense, a, n), _signatures(old_dense, a, o), new_seg, old_seg)
      maps.append(None if (n == o and np.array_equal(m, np.arange(n))) else m)
      how.append("features" if new_seg is None else "features in segments " + "+".join(
          str(c) for c in np.bincount(old_seg)) + " -> " + "+".join(str(c) for c in np.bincount(new_seg)))
    elif n == o:
      maps.append(None)
      how.append("identity")
    else:
      ns = axes_lib.axis_structure(new.jaxpr, new_pi, a, cache=axes_cache)
      os_ = axes_lib.axis_structure(old.jaxpr, old_pi, a, cache=axes_cache)
      m, desc = axes_lib.index_map(n, o, ns, os_)
      maps.append(m)
      how.append(desc)
  return maps, how


# -- novelty: which fresh elements must be zero -----------------------------------

def _fresh_mask(shape, maps) -> np.ndarray | None:
  fresh = None
  for a, m in enumerate(maps):
    if m is None or (m >= 0).all():
      continue
    f = (m < 0).reshape((1,) * a + (-1,) + (1,) * (len(shape) - a - 1))
    fresh = f if fresh is None else (fresh | f)
  return fresh


# -- the plan --------------------------------------------------------------------

def plan(old_table: FeatureTable, new_table: FeatureTable, *, rename: Mapping[str, str] | None = None,
         strict: bool = False) -> "Surgery":
  """Plans the transfer of parameters from the old model to the new one.

  Args:
    old_table: :func:`dependency_table` of the old model.
    new_table: :func:`dependency_table` of the new model.
    rename: maps old names to new names, for features *and* parameter paths
      (e.g. ``{"Linear_1/kernel": "Linear_2/kernel", "hp": "health"}``).
    strict: raise if anything beyond removed features and narrowed axes would
      be dropped.

  Returns:
    A :class:`Surgery`: call it as ``surgery(old_params, new_params_init)``.
    ``surgery.report`` says what moves where.

  Example:
    >>> surgery = js.plan(old_table, new_table)          # doctest: +SKIP
    >>> print(surgery.report)                             # doctest: +SKIP
    >>> new_params = surgery(old_params, new_init)        # doctest: +SKIP
  """
  rename = dict(rename or {})
  feature_rename = {k: v for k, v in rename.items() if k in old_table.features}
  path_rename = {k: v for k, v in rename.items() if k not in old_table.features}
  fmaps = _feature_maps(old_table, new_table, feature_rename)
  old_idx, new_idx, added, removed, moved = fmaps
  pairs = _match_leaves(old_table, new_table, path_rename, fmaps)
  by_new = {n: (o, why) for o, n, why in pairs}

  aligned = {}
  axes_cache: dict = {}  # consumer/producer indexes of both jaxprs, for this plan only
  for n in new_table.paths:
    if n in by_new:
      aligned[n] = _align_leaf(old_table, new_table, by_new[n][0], n, fmaps, axes_cache)
  fresh = {}
  for n in new_table.paths:
    if n in aligned:
      fresh[n] = _fresh_mask(new_table.shapes[n], aligned[n][0])
    else:
      fresh[n] = np.ones((1,) * len(new_table.shapes[n]), bool)
  nov = novelty.analyse(new_table, added, fresh, grown={n: _grown_axes(aligned[n][0]) for n in aligned})
  zeroed, novel_outputs = nov.zeroed, nov.novel_outputs

  leaves = []
  for n in new_table.paths:
    shape = new_table.shapes[n]
    f = fresh[n]
    zero = zeroed[n]
    if n in aligned:
      o = by_new[n][0]
      maps, how = aligned[n]
      counts = _counts(shape, old_table.shapes[o], maps, f, zero)
      leaves.append(LeafPlan(n, o, shape, old_table.shapes[o], tuple(maps), tuple(how), zero, counts))
    else:
      size = int(np.prod(shape, dtype=np.int64))
      nz = 0 if zero is None else M.broadcast_count(zero, shape)
      leaves.append(LeafPlan(n, None, shape, None, (), (), zero,
                             dict(copied=0, moved=0, fresh=size, zeroed=nz, dropped=0)))
  matched_old = {o for o, _, _ in pairs}
  dropped_leaves = tuple((p, old_table.shapes[p]) for p in old_table.paths if p not in matched_old)

  reasons = []
  for f_ in removed:
    k = old_table.features.index(f_)
    used = any(M.reduce_all(m) is not None and (M.reduce_all(m)[k // M.BITS] >> (k % M.BITS)) & 1
               for m in old_table.output_packed.values() if m is not None)
    if used:
      reasons.append(f"feature {f_!r} was removed and the old outputs depend on it")
  for p, shape in dropped_leaves:
    reasons.append(f"old parameter {p!r} {shape} has no counterpart in the new model")
  if novel_outputs:
    where = "; ".join(s.describe() for s in nov.sites[:4]) or "no single operation (see docs/surgery.md)"
    more = f" (+{len(nov.sites) - 4} more)" if len(nov.sites) > 4 else ""
    reasons.append("novelty (new features / fresh elements) reaches outputs " + ", ".join(
        repr(p or "<root>") for p in novel_outputs) + f"; it spreads at {where}{more}. Exact "
        "preservation is not proven statically -- check with jaxsurgery.verify")
  for p in nov.assumed_in_range:
    reasons.append(f"{p!r} grew at the end of a gathered axis: preservation assumes ids within the old "
                   f"size (the old model could not select the new rows)")
  preserved = False if any("removed" in r or "no counterpart" in r for r in reasons) else (
      True if not novel_outputs else None)
  inconsistent = {}
  for leaf in leaves:
    if leaf.old_path is not None:
      n_bad = _inconsistent(old_table, new_table, leaf, fmaps)
      if n_bad:
        inconsistent[leaf.path] = n_bad
        reasons.append(f"{n_bad:,} elements of {leaf.path!r} come from elements of {leaf.old_path!r} that "
                       f"shared features touch differently: check the leaf matching (pass rename=) or "
                       f"the feature names")
  if inconsistent and preserved:
    preserved = None
  report = Report(tuple(leaves), dropped_leaves, added, removed, moved, feature_rename,
                  tuple(pairs), preserved, tuple(reasons))
  if strict:
    unexplained = {l.path: why for l in leaves for why in [_unexplained_drop(old_table, l, removed)] if why}
    unexplained.update({p: "no counterpart in the new model" for p, _ in dropped_leaves})
    unexplained.update({p: f"{n:,} inconsistent elements" for p, n in inconsistent.items()})
    if unexplained:
      lines = "\n".join(f"  {p}: {why}" for p, why in unexplained.items())
      raise SurgeryError(f"strict=True: old parameter elements would be dropped or misplaced beyond removed "
                         f"features and narrowed axes:\n{lines}\nSee surgery.report; pass rename= to pair "
                         f"leaves, or strict=False to accept.")
  return Surgery(old_table, new_table, report)


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


def _unexplained_drop(old: FeatureTable, leaf: LeafPlan, removed) -> str | None:
  """Why old elements of ``leaf`` are dropped, if neither a removed feature nor a narrowed
  positional axis explains it (``None`` when everything dropped is expected)."""
  if leaf.old_path is None or not leaf.counts["dropped"]:
    return None
  gone = np.array([old.features.index(f) for f in removed], dtype=np.int64)
  for a, (m, how) in enumerate(zip(leaf.maps, leaf.how)):
    if m is None:
      continue
    dropped = np.setdiff1d(np.arange(leaf.old_shape[a]), m[m >= 0])
    if not len(dropped):
      continue
    if how == "features":
      sig = _signatures(_restrict(old.packed[leaf.old_path], gone, leaf.old_shape), a, leaf.old_shape[a])
      bad = [int(i) for i in dropped if not sig[i].any()]
      if bad:
        return f"axis {a} indices {bad[:8]} are dropped but touched by no removed feature"
    elif leaf.shape[a] >= leaf.old_shape[a]:
      return f"axis {a} ({how}) drops indices {dropped[:8].tolist()} although it did not shrink"
  return None


def _inconsistent(old: FeatureTable, new: FeatureTable, leaf: LeafPlan, fmaps) -> int:
  """Carried-over elements whose touch sets (over shared features) differ between the tables."""
  old_idx, new_idx = fmaps[0], fmaps[1]
  if not len(old_idx):
    return 0
  nd = _restrict(new.packed[leaf.path], new_idx, leaf.shape)
  od = _restrict(old.packed[leaf.old_path], old_idx, leaf.old_shape)
  valid = np.ones((1,) * len(leaf.shape), bool)
  for a, m in enumerate(leaf.maps):
    if m is None:
      continue
    if od.shape[a] != 1:
      od = np.take(od, np.maximum(m, 0), axis=a)
    valid = valid & (m >= 0).reshape((1,) * a + (-1,) + (1,) * (len(leaf.shape) - a - 1))
  differs = (nd != od).any(-1) & valid
  return M.broadcast_count(differs, leaf.shape) if differs.any() else 0


def _counts(shape, old_shape, maps, fresh, zero):
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


# -- applying ---------------------------------------------------------------------

def _leaves_by_path(tree, table: FeatureTable, what: str):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  got = {feats.keystr(p): x for p, x in leaves}
  missing = [p for p in table.paths if p not in got]
  extra = [p for p in got if p not in table.shapes]
  bad = [(p, tuple(np.shape(got[p])), table.shapes[p]) for p in table.paths
         if p in got and tuple(np.shape(got[p])) != table.shapes[p]]
  if missing or extra or bad:
    lines = [f"{what} does not match the model the plan was built for."]
    if missing:
      lines.append(f"  missing paths: {missing}")
    if extra:
      lines.append(f"  unexpected paths: {extra}")
    for p, s, e in bad:
      lines.append(f"  {p!r}: shape {s}, expected {e}")
    lines.append("  Pass a tree shaped like the params given to dependency_table (e.g. the same "
                 "checkpoint format), or rebuild the tables for this model.")
    raise SurgeryError("\n".join(lines))
  return got


def _apply_leaf(leaf: LeafPlan, old, init):
  if leaf.old_path is None:
    out = init
  else:
    x = jnp.asarray(old)
    valid = None
    for a, m in enumerate(leaf.maps):
      if m is None:
        continue
      x = jnp.take(x, np.maximum(m, 0), axis=a)
      if (m < 0).any():
        v = (m >= 0).reshape((1,) * a + (-1,) + (1,) * (len(leaf.shape) - a - 1))
        valid = v if valid is None else (valid & v)
    x = x.astype(init.dtype)
    out = x if valid is None else jnp.where(valid, x, init)
  if leaf.zero is not None:
    out = jnp.where(leaf.zero, jnp.zeros((), init.dtype), out)
  return out


def sharded_call(cache: dict, key, fn, args, targets, out_shardings_of):
  """``fn(*args)``: traced inline under an outer transformation; otherwise one jitted
  program per ``key`` and sharding of ``targets`` (the new init's leaves), whose outputs
  get those shardings (``out_shardings_of(list of shardings)`` lays them out)."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
    return fn(*args)
  shardings = tuple(getattr(x, "sharding", None) for x in targets)
  full = (key, shardings if all(s is not None for s in shardings) else None)
  compiled = cache.get(full)
  if compiled is None:
    out = None if full[1] is None else out_shardings_of(list(full[1]))
    compiled = cache[full] = jax.jit(fn, out_shardings=out)
  return compiled(*args)


class Surgery:
  """A planned transfer. ``surgery(old_params, new_params_init) -> new_params`` is pure and jittable.

  Apply it to any tree shaped like the params the tables were built from: EMA
  params, optimizer moments, or every checkpoint of a pool of past versions.
  Eager calls run one jitted program and keep the shardings of
  ``new_params_init``; under an outer ``jax.jit`` it is traced inline.
  """

  def __init__(self, old_table: FeatureTable, new_table: FeatureTable, report: Report):
    self.old_table, self.new_table, self.report = old_table, new_table, report
    self._leaves = {l.path: l for l in report.leaves}
    self._compiled: dict = {}

  def apply(self, old_params, new_params_init):
    old = _leaves_by_path(old_params, self.old_table, "old_params")
    init_leaves, treedef = jax.tree_util.tree_flatten_with_path(new_params_init)
    _leaves_by_path(new_params_init, self.new_table, "new_params_init")
    out = []
    for path, x in init_leaves:
      leaf = self._leaves[feats.keystr(path)]
      out.append(_apply_leaf(leaf, old.get(leaf.old_path), x))
    return jax.tree_util.tree_unflatten(treedef, out)

  def remap_state(self, old_state, new_state_init, **kwargs):
    """Remaps a whole training state (params, EMA, optimizer moments, counts): see
    :func:`jaxsurgery.remap_state`."""
    from jaxsurgery._src.state import remap_state
    return remap_state(self, old_state, new_state_init, **kwargs)

  def __call__(self, old_params, new_params_init):
    init_leaves, treedef = jax.tree_util.tree_flatten(new_params_init)
    return sharded_call(self._compiled, treedef, self.apply, (old_params, new_params_init), init_leaves,
                        lambda shardings: jax.tree_util.tree_unflatten(treedef, shardings))

  def __repr__(self) -> str:
    return "Surgery(\n" + repr(self.report) + "\n)"
