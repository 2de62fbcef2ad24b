"""Where each element of a planned leaf comes from, as arrays a picture can draw (numpy only).

A :class:`~jaxsurgery.LeafPlan` stores per-axis index maps, a broadcastable zero
mask and leaf-level recipes, never an element-level array. Every element falls in
one of five classes, in order of precedence:

* ``COPIED`` (0): the old value at the same index on every axis;
* ``MOVED`` (1): an old value carried from another index;
* ``RECIPE`` (2): computed by a recipe: old values rescaled (``scale``) or with a
  removed constant feature folded in (``fold``), new positions filled with the mean
  of the old ones (``mean_axes``), clones with paired zero-sum noise (``noise_axes``);
* ``FRESH`` (3): keeps the new model's init;
* ``ZEROED`` (4): set to zero.

Because the maps are per axis, the class of an element is a function of one small
*state* per axis index (same, moved, clone, fresh, mean-filled): everything here is
computed from those vectors, so a 75M-element leaf costs O(sum of its axes), not
O(elements). When a picture shows a block of elements as one cell, the cell takes
the highest class present (``ZEROED`` > ``FRESH`` > ``RECIPE`` > ``MOVED`` >
``COPIED``), so a single fresh row never disappears in a reduced view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

#: Element classes, by code (an ``np.int8``); a higher code wins when cells are reduced.
COPIED, MOVED, RECIPE, FRESH, ZEROED = 0, 1, 2, 3, 4
SOURCES: tuple[str, ...] = ("copied", "moved", "recipe", "fresh", "zeroed")

# Per-axis states. An element's state is the max over its axes (and the leaf's base state); the
# order encodes precedence: fresh on any axis is fresh, unless a mean-filled axis fills it.
_SAME, _MOVED, _CLONE, _FRESH, _MEAN = 0, 1, 2, 3, 4
_N_STATES = 5


def _class_of_state(leaf: Any) -> np.ndarray:
  """Element class per combined state: old values rescaled or folded make every carried element a recipe."""
  carried_recipe = getattr(leaf, "scale", 1.0) != 1.0 or bool(getattr(leaf, "fold", ()))
  carried = (RECIPE, RECIPE) if carried_recipe else (COPIED, MOVED)
  return np.array([*carried, RECIPE, FRESH, RECIPE], np.int8)


def _noise_active(leaf: Any) -> bool:
  # A plan that records a noise scale of 0 adds none (exact clones); without the field, trust noise_axes.
  return getattr(leaf, "noise", 1.0) != 0


def axis_states(leaf: Any, axis: int) -> np.ndarray:
  """The state of every index along ``axis`` (an ``np.int8`` vector): same, moved, clone, fresh or mean-filled.

  Args:
    leaf: a ``LeafPlan``.
    axis: an axis of the new leaf.

  Returns:
    ``(leaf.shape[axis],)`` codes ``0`` same index, ``1`` moved, ``2`` a clone (noised),
    ``3`` fresh, ``4`` fresh but mean-filled.
  """
  n = leaf.shape[axis]
  if leaf.old_path is None or not leaf.maps or leaf.maps[axis] is None:
    return np.zeros(n, np.int8)
  m = np.asarray(leaf.maps[axis])
  states = np.where(m < 0, _FRESH, np.where(m == np.arange(n), _SAME, _MOVED)).astype(np.int8)
  if axis in getattr(leaf, "noise_axes", ()) and _noise_active(leaf):
    copies = np.bincount(m[m >= 0], minlength=int(m.max(initial=0)) + 1)
    states[(m >= 0) & (copies[np.maximum(m, 0)] > 1)] = _CLONE
  if axis in getattr(leaf, "mean_axes", ()):
    states[m < 0] = _MEAN
  return states


def _base_state(leaf: Any) -> int:
  return _FRESH if leaf.old_path is None else _SAME


def _check(leaf: Any) -> None:
  if leaf.old_path is not None and len(leaf.maps) != len(leaf.shape):
    raise ValueError(f"leaf {leaf.path!r}: {len(leaf.maps)} axis maps for shape {tuple(leaf.shape)}; a plan of a "
                     f"matched leaf has one map (or None) per axis.")


def zero_mask(leaf: Any) -> np.ndarray | None:
  """The leaf's zero mask at full rank (size-1 axes where it is constant), or None when nothing is zeroed."""
  rank = len(leaf.shape)
  if getattr(leaf, "zero_all", False):
    return np.ones((1,) * rank, bool)
  if leaf.zero is None:
    return None
  z = np.asarray(leaf.zero, bool)
  z = z.reshape((1,) * (rank - z.ndim) + z.shape)
  if any(d not in (1, n) for d, n in zip(z.shape, leaf.shape)):
    raise ValueError(f"leaf {leaf.path!r}: zero mask of shape {np.shape(leaf.zero)} does not broadcast to "
                     f"{tuple(leaf.shape)}.")
  return z if z.any() else None


def element_sources(leaf: Any, index: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
  """The class of every element of a new leaf: copied, moved, recipe, fresh or zeroed.

  Vectorised over axes (an outer combination of per-axis states), so it never loops
  over elements; pass ``index`` (e.g. :func:`strided_index`) to compute only a
  sub-grid of a huge leaf.

  Args:
    leaf: a ``LeafPlan`` (``surgery.leaf_plans[path]``).
    index: per axis, the indices to compute (``None``: all of that axis).

  Returns:
    An ``np.int8`` array of ``leaf.shape`` (or of the ``index`` sub-grid) holding
    ``COPIED`` (0), ``MOVED`` (1), ``RECIPE`` (2), ``FRESH`` (3) or ``ZEROED`` (4).

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> from jaxsurgery._src.display_sources import element_sources
    >>> fn = lambda p, x: x @ p["w"]
    >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"]))
    >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["a", "new", "b"]))
    >>> element_sources(js.plan(old, new).leaf_plans["w"]).tolist()   # row 1 is new, row 2 moved from 1
    [[0, 0, 0], [4, 4, 4], [1, 1, 1]]
  """
  _check(leaf)
  rank = len(leaf.shape)
  index = [None] * rank if index is None else list(index)
  if len(index) != rank:
    raise ValueError(f"`index` has {len(index)} entries for the {rank} axes of {leaf.path!r}.")
  code = np.full((1,) * rank, _base_state(leaf), np.int8)
  for a in range(rank):
    s = axis_states(leaf, a)
    s = s if index[a] is None else s[np.asarray(index[a])]
    code = np.maximum(code, s.reshape((1,) * a + (-1,) + (1,) * (rank - a - 1)))
  sub_shape = tuple(leaf.shape[a] if i is None else len(i) for a, i in enumerate(index))
  out = np.broadcast_to(_class_of_state(leaf)[code], sub_shape)
  z = zero_mask(leaf)
  if z is not None:
    if rank:  # size-1 axes broadcast; the others take the sub-grid's indices
      z = z[np.ix_(*[np.arange(z.shape[a]) if z.shape[a] == 1 or index[a] is None else np.asarray(index[a])
                     for a in range(rank)])]
    out = np.where(z, ZEROED, out)
  return np.array(out, np.int8)


def strided_index(shape: Sequence[int], max_elements: int = 1 << 20) -> list[np.ndarray | None]:
  """Per-axis indices of an evenly strided sub-grid of at most ``max_elements`` (``None``: a whole axis).

  Args:
    shape: the leaf's shape.
    max_elements: the sub-grid's size limit.

  Returns:
    A list for :func:`element_sources`'s ``index``.

  Example:
    >>> import jaxsurgery.display as jsd
    >>> [None if i is None else i.tolist() for i in jsd.strided_index((4, 3), max_elements=6)]
    [[0, 2], None]
  """
  strides = [1] * len(shape)
  def size():
    return math.prod(-(-n // s) for n, s in zip(shape, strides))
  while size() > max_elements:
    a = max(range(len(shape)), key=lambda b: -(-shape[b] // strides[b]))
    strides[a] *= 2
  return [None if s == 1 else np.arange(0, n, s) for n, s in zip(shape, strides)]


def source_counts(leaf: Any) -> dict[str, int]:
  """Exact number of elements per class (keys :data:`SOURCES`), from the per-axis states alone.

  Args:
    leaf: a ``LeafPlan``.

  Returns:
    ``{"copied": ..., "moved": ..., "recipe": ..., "fresh": ..., "zeroed": ...}``, summing
    to the leaf's size.

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
    >>> fn = lambda p, x: x @ p["w"]
    >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["hp", "mana"]))
    >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["hp", "armor", "mana"]))
    >>> jsd.source_counts(js.plan(old, new).leaf_plans["w"])
    {'copied': 3, 'moved': 3, 'recipe': 0, 'fresh': 0, 'zeroed': 3}
  """
  _check(leaf)
  rank, base = len(leaf.shape), _base_state(leaf)
  states = [axis_states(leaf, a) for a in range(rank)]
  # at_most[a][m]: indices along axis a whose state is <= m; elements with state <= m are a product.
  at_most = [np.cumsum(np.bincount(s, minlength=_N_STATES)) for s in states]
  def n_at_most(m, axes):
    return 0 if base > m else math.prod(int(at_most[a][m]) for a in axes)
  per_state = np.diff([0] + [n_at_most(m, range(rank)) for m in range(_N_STATES)])
  zeroed = np.zeros(_N_STATES, np.int64)
  z = zero_mask(leaf)
  if z is not None:
    full = [a for a in range(rank) if z.shape[a] > 1]
    code = np.full(z.shape, base, np.int8)
    for a in full:
      code = np.maximum(code, states[a].reshape((1,) * a + (-1,) + (1,) * (rank - a - 1)))
    broadcast = [a for a in range(rank) if z.shape[a] == 1]
    z_at_most = [int(np.count_nonzero(z & (code <= m))) * n_at_most(m, broadcast) for m in range(_N_STATES)]
    zeroed = np.diff([0] + z_at_most)
  out = dict.fromkeys(SOURCES, 0)
  for m, cls in enumerate(_class_of_state(leaf)):
    out[SOURCES[cls]] += int(per_state[m] - zeroed[m])
  out["zeroed"] += int(zeroed.sum())
  return out


# -- reduced views ----------------------------------------------------------------------------

def bin_starts(n: int, max_bins: int) -> np.ndarray:
  """Starts of equal bins (the last may be shorter) covering ``range(n)``, at most ``max_bins`` of them."""
  return np.arange(0, n, max(1, -(-n // max(1, max_bins))))


def _presence(states: np.ndarray, starts: np.ndarray | None) -> np.ndarray:
  """Which states occur in each bin (``(bins, states)`` bool); one bin for the whole axis if ``starts`` is None."""
  onehot = (states[:, None] == np.arange(_N_STATES)).astype(np.int32)
  if starts is None:
    return onehot.any(0, keepdims=True)
  return np.add.reduceat(onehot, starts, axis=0) > 0


def source_grid(leaf: Any, axes: Sequence[int], bins: Sequence[np.ndarray]) -> np.ndarray:
  """The highest class in each block of a leaf, over the shown ``axes`` cut in ``bins``, all other axes reduced.

  Exact for any bin size, without element-level arrays: a state ``m`` occurs in a
  block iff some axis has ``m`` in it and every axis has a state ``<= m`` in it.

  Args:
    leaf: a ``LeafPlan``.
    axes: the shown axes (0, 1 or 2 of them, in display order).
    bins: per shown axis, the bin starts (:func:`bin_starts`).

  Returns:
    An ``np.int8`` array ``(len(bins[0]), len(bins[1]), ...)`` of classes.
  """
  _check(leaf)
  rank, k = len(leaf.shape), len(axes)
  grid = tuple(len(b) for b in bins)
  if any(n == 0 for n in leaf.shape):
    return np.zeros(grid, np.int8)
  present = np.zeros(grid + (_N_STATES,), bool)
  all_at_most = np.ones(grid + (_N_STATES,), bool)
  base = np.zeros(_N_STATES, bool)
  base[_base_state(leaf)] = True
  for a, starts in [(None, None)] + [(a, bins[axes.index(a)] if a in axes else None) for a in range(rank)]:
    p = base[None] if a is None else _presence(axis_states(leaf, a), starts)   # (bins or 1, states)
    view = (1,) * k + (_N_STATES,)
    if a in axes:
      i = axes.index(a)
      view = (1,) * i + (-1,) + (1,) * (k - i - 1) + (_N_STATES,)
    present |= p.reshape(view)
    all_at_most &= np.logical_or.accumulate(p, axis=-1).reshape(view)   # some state <= m here
  achievable = present & all_at_most
  classes = _class_of_state(leaf)
  out = np.max(np.where(achievable, classes, -1), axis=-1).astype(np.int8)
  z = zero_mask(leaf)
  if z is not None:
    out = np.where(_zero_grid(z, axes, bins, rank), ZEROED, out).astype(np.int8)
  return out


def _zero_grid(z: np.ndarray, axes: Sequence[int], bins: Sequence[np.ndarray], rank: int) -> np.ndarray:
  other = tuple(a for a in range(rank) if a not in axes and z.shape[a] > 1)
  z = np.asarray(z.any(axis=other, keepdims=True)) if other else z
  shown = tuple(z.shape[a] for a in axes)
  z = np.transpose(z, list(axes) + [a for a in range(rank) if a not in axes]).reshape(shown)
  for i, starts in enumerate(bins):
    if z.shape[i] > 1:
      z = np.logical_or.reduceat(z, starts, axis=i)
  return z


# -- axes -------------------------------------------------------------------------------------

class Run(NamedTuple):
  """Consecutive indices of an axis with the same state (and, if carried, consecutive old indices)."""

  start: int
  stop: int
  state: int
  old_start: int   # -1 for fresh runs


def axis_runs(leaf: Any, axis: int) -> list[Run]:
  """The axis cut where its state changes or its old indices jump: what a picture labels.

  Args:
    leaf: a ``LeafPlan``.
    axis: an axis of the new leaf.

  Returns:
    A list of :class:`Run`.
  """
  n = leaf.shape[axis]
  if n == 0:
    return []
  states = axis_states(leaf, axis)
  m = None if leaf.old_path is None or not leaf.maps else leaf.maps[axis]
  old = np.arange(n) if m is None else np.asarray(m)
  if leaf.old_path is None:
    old = np.full(n, -1)
  carried = old >= 0
  breaks = (states[1:] != states[:-1]) | (carried[1:] & (old[1:] != old[:-1] + 1))
  starts = np.concatenate([[0], np.nonzero(breaks)[0] + 1])
  stops = np.concatenate([starts[1:], [n]])
  base = _base_state(leaf)
  return [Run(int(s), int(e), max(int(states[s]), base), int(old[s])) for s, e in zip(starts, stops)]


def changed_axes(leaf: Any) -> list[int]:
  """Axes whose map is not the identity, most changed first."""
  if leaf.old_path is None:
    return []
  scores = [(int(np.count_nonzero(axis_states(leaf, a))), a) for a in range(len(leaf.shape))]
  return [a for s, a in sorted(scores, key=lambda t: (-t[0], t[1])) if s]


def shown_axes(leaf: Any, axes: Sequence[int] | None = None) -> tuple[int, ...]:
  """The (at most two) axes a picture of the leaf shows: ``axes`` if given, else the changed ones, else the largest.

  Args:
    leaf: a ``LeafPlan``.
    axes: explicit axes (validated).

  Returns:
    The axes in increasing order (rows first).
  """
  rank = len(leaf.shape)
  if axes is not None:
    axes = tuple(int(a) % rank if rank else int(a) for a in axes)
    if len(axes) > 2 or len(set(axes)) != len(axes) or any(not 0 <= a < rank for a in axes):
      raise ValueError(f"`axes` must name at most two distinct axes of {leaf.path!r} (rank {rank}), got {axes}.")
    return axes
  picked = changed_axes(leaf)[:2]
  rest = sorted((a for a in range(rank) if a not in picked), key=lambda a: (-leaf.shape[a], a))
  return tuple(sorted(picked + rest[:max(0, min(2, rank) - len(picked))]))


def axis_feature_names(table: Any, path: str, axis: int) -> list[str | None] | None:
  """Per index along ``axis``, the one feature that touches it alone (a named row), else None.

  An index is named when its touches, ORed over the other axes, are exactly one feature and no
  other index of the axis has that same single feature (a kernel row per observation feature;
  not the rows of an embedding, which all meet one categorical feature).

  Args:
    table: a ``FeatureTable``.
    path: a parameter path of ``table``.
    axis: the axis.

  Returns:
    A list of names (``None`` for unnamed indices), or None if no index is named.
  """
  packed = table.packed.get(path)
  shape = table.shapes[path]
  if packed is None or not shape:
    return None
  p = packed.reshape((1,) * (len(shape) - packed.ndim + 1) + packed.shape)
  other = tuple(b for b in range(len(shape)) if b != axis)
  sig = np.bitwise_or.reduce(p, axis=other) if other else p            # (n or 1, words)
  if sig.shape[0] == 1:
    return None
  bits = np.unpackbits(np.ascontiguousarray(sig).view(np.uint8), axis=-1, bitorder="little")[:, :table.num_features]
  single = bits.sum(-1) == 1
  which = np.where(single, bits.argmax(-1), -1)
  counts = np.bincount(which[which >= 0], minlength=table.num_features)
  named = single & (counts[np.maximum(which, 0)] == 1)
  if not named.any():
    return None
  return [table.features[w] if ok else None for w, ok in zip(which, named)]
