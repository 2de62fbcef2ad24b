"""Feature specs: naming the input features that the tables are keyed by.

A feature spec is a pytree matching the model inputs (or a prefix of them).
Each spec leaf is one of

* :class:`Features` -- named positions along one axis of the input leaf; every
  other axis (batch, time, unit slots...) holds replicas of the same features;
* ``str`` -- the whole input leaf is one feature with that name;
* ``None`` -- the leaf carries no named feature (its mask is empty).

A spec leaf that covers a whole subtree of the inputs applies to every input
leaf in that subtree. Names must be unique across the spec.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import FeatureSpecError


@dataclasses.dataclass(frozen=True)
class Features:
  """The names of the features laid out along one axis of an input leaf.

  Args:
    names: one name per position along ``axis``.
    axis: the feature axis; negative values count from the end.

  Example:
    >>> import jaxsurgery as js
    >>> spec = {"units": js.Features(["hp", "mana", "x", "y"]), "hero_id": "hero"}
  """

  names: tuple[str, ...]
  axis: int = -1

  def __init__(self, names: Sequence[str], axis: int = -1):
    if isinstance(names, str):
      raise TypeError(
          f"Features(names=...) takes a sequence of names, got the string {names!r}. "
          f"Use a plain string spec leaf ({names!r}) if the whole leaf is one feature, "
          f"or Features([{names!r}]) for a one-element axis.")
    names = tuple(names)
    for n in names:
      if not isinstance(n, str):
        raise TypeError(f"Feature names must be strings; got {n!r} of type {type(n).__name__}.")
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "axis", int(axis))

  def __len__(self) -> int:
    return len(self.names)


def is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (Features, str))


@dataclasses.dataclass(frozen=True)
class InputLeaf:
  """One input leaf with the features it carries (resolved from the spec)."""

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  axis: int | None            # feature axis, or None for a str / None spec leaf
  feature_ids: tuple[int, ...]  # global feature index per position (or one for a str leaf)


@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
  names: tuple[str, ...]
  leaves: tuple[InputLeaf, ...]

  @functools.cached_property
  def locations(self) -> tuple[tuple[int, int | None], ...]:
    """For each feature: (index of the input leaf that names it, position along its axis or None)."""
    out: list = [None] * len(self.names)
    for i, leaf in enumerate(self.leaves):
      for pos, k in enumerate(leaf.feature_ids):
        if out[k] is None:  # leaves under one spec leaf share ids; the first names them
          out[k] = (i, None if leaf.axis is None else pos)
    return tuple(out)

  @property
  def num_features(self) -> int:
    return len(self.names)

  def input_masks(self, flagged: frozenset[int] | set[int] | None = None) -> list[np.ndarray | None]:
    """Packed dependency masks of the input leaves, compressed along replica axes.

    With ``flagged`` (feature ids), the masks have a single feature instead, set
    on exactly the flagged features (the planner's novelty pass).
    """
    W = 1 if flagged is not None else M.num_words(self.num_features)
    out: list[np.ndarray | None] = []
    for leaf in self.leaves:
      ids = leaf.feature_ids[:1] if leaf.axis is None else leaf.feature_ids
      if not ids or (flagged is not None and flagged.isdisjoint(ids)):
        out.append(None)
        continue
      rows = (M.one_hot(np.asarray(ids), W) if flagged is None
              else np.array([[k in flagged] for k in ids], M.WORD))
      shape = [1] * len(leaf.shape) + [W]
      if leaf.axis is not None:
        shape[leaf.axis] = len(ids)
      out.append(rows.reshape(shape))
    return out


def keystr(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def canonical_dtype(dtype: Any) -> Any:
  """``np.dtype(dtype)``, except for JAX extended dtypes (typed PRNG keys ``key<fry>``)."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    return dtype
  return np.dtype(dtype)


def leaf_shape_dtype(x: Any, what: str, path: str):
  if isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "shape") and hasattr(x, "dtype"):
    try:
      return tuple(int(s) for s in x.shape), canonical_dtype(x.dtype)
    except TypeError:
      pass  # e.g. a dtype numpy cannot interpret: reported below
  if isinstance(x, (bool, int, float, complex)):
    arr = np.asarray(x)
    return tuple(arr.shape), arr.dtype
  raise TypeError(
      f"{what} leaf {path or '<root>'!r} is a {type(x).__name__} ({_short(x)}), not an array. Every {what} "
      f"leaf must be a jax/numpy array or a jax.ShapeDtypeStruct. Wrap static configuration in "
      f"`fn` (e.g. with functools.partial) instead of passing it as a leaf.")


def _short(x: Any) -> str:
  r = repr(x)
  return r if len(r) <= 60 else r[:57] + "..."


def resolve(features: Any, inputs: Any, side: str = "inputs") -> ResolvedSpec:
  """Checks ``features`` against ``inputs`` and assigns global feature indices.

  ``side="outputs"``: the same for an outputs spec over ``fn``'s output tree (output names are a
  namespace of their own, and the errors say "output").
  """
  leaf_word, spec_word, name_word = (("output", "outputs spec", "output name") if side == "outputs"
                                     else ("input", "feature spec", "feature name"))
  input_leaves, input_def = jax.tree_util.tree_flatten_with_path(inputs)
  spec_leaves, spec_def = jax.tree_util.tree_flatten_with_path(features, is_leaf=is_spec_leaf)
  for key_path, s in spec_leaves:
    if not is_spec_leaf(s):
      raise FeatureSpecError(
          f"{spec_word.capitalize()} leaf at {keystr(key_path) or '<root>'!r} is {s!r}; expected "
          f"jaxsurgery.Features(...), a{'n' if side == 'outputs' else ''} {name_word} (str) or None.")
  try:
    per_input = spec_def.flatten_up_to(inputs)  # type: ignore[attr-defined]  # missing from jax's stub
  except (ValueError, TypeError) as e:
    spec_paths = [keystr(p) or "<root>" for p, _ in spec_leaves]
    input_paths = [keystr(p) or "<root>" for p, _ in input_leaves]
    raise FeatureSpecError(
        f"The {spec_word} does not match the structure of the {side}. It must be a pytree "
        f"with the same structure as `{'fn(params, inputs)' if side == 'outputs' else 'inputs'}` "
        f"(or a prefix of it).\n"
        f"  spec leaves:  {spec_paths}\n  {leaf_word} leaves: {input_paths}\n"
        f"  jax says: {e}") from None

  names: list[str] = []
  seen: dict[str, str] = {}
  leaves: list[InputLeaf] = []

  def add_name(name: str, where: str) -> int:
    if name in seen:
      raise FeatureSpecError(
          f"Duplicate {name_word} {name!r}: it names a position of {seen[name]!r} and of "
          f"{where!r}. {name_word.capitalize()}s must be unique across the whole spec; rename one of them.")
    seen[name] = where
    names.append(name)
    return len(names) - 1

  for (spec_path, spec_leaf), sub in zip(spec_leaves, per_input):
    sub_leaves = jax.tree_util.tree_flatten_with_path(sub)[0]
    shared_ids: tuple[int, ...] | None = None  # a spec leaf covering a subtree names each feature once
    for sub_path, x in sub_leaves:
      path = keystr(tuple(spec_path) + tuple(sub_path))
      shape, dtype = leaf_shape_dtype(x, leaf_word, path)
      where = path or "<root>"
      if spec_leaf is None:
        leaves.append(InputLeaf(path, shape, dtype, None, ()))
        continue
      if isinstance(spec_leaf, str):
        if shared_ids is None:
          shared_ids = (add_name(spec_leaf, where),)
        leaves.append(InputLeaf(path, shape, dtype, None, shared_ids))
        continue
      ndim = len(shape)
      if not -ndim <= spec_leaf.axis < ndim:
        raise FeatureSpecError(
            f"Features(axis={spec_leaf.axis}) is out of range for {leaf_word} leaf {where!r} of shape "
            f"{shape} ({ndim} axes). Use an axis in [{-ndim}, {ndim - 1}].")
      axis = spec_leaf.axis % ndim
      if len(spec_leaf.names) != shape[axis]:
        raise FeatureSpecError(
            f"{leaf_word.capitalize()} leaf {where!r} has shape {shape}: axis {spec_leaf.axis} has size {shape[axis]}, "
            f"but its Features lists {len(spec_leaf.names)} names. Give exactly one name per "
            f"position along the feature axis (or pick the right `axis`).")
      if shared_ids is None:
        fresh = dict.fromkeys(spec_leaf.names, where)
        if len(fresh) != len(spec_leaf.names) or not seen.keys().isdisjoint(fresh):
          for n in spec_leaf.names:
            add_name(n, where)  # raises the precise duplicate-name error
        start = len(names)
        seen.update(fresh)  # many names at C speed: 16k features in ~1 ms
        names.extend(spec_leaf.names)
        shared_ids = tuple(range(start, len(names)))
      leaves.append(InputLeaf(path, shape, dtype, axis, shared_ids))
  return ResolvedSpec(tuple(names), tuple(leaves))
