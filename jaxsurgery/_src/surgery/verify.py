"""Numerical check of function preservation: old(x_old) == new(x_new) when shared features agree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core import features as feats


@dataclasses.dataclass(frozen=True)
class Verification:
  """The result of :func:`verify`: does the new model compute what the old one did?

  Attributes:
    ok: every output's largest difference is at most ``atol``.
    max_abs_diff: per output path, the largest ``|old - new|`` over the samples
      (``inf`` where exactly one side is NaN).
    atol: the tolerance.
    samples: the number of random input draws.

  Example:
    The new init alone does not compute the old function; the surgery's
    result does.

    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> old_p = {"w": jax.random.normal(jax.random.key(1), (2, 3))}
    >>> new_init = {"w": jax.random.normal(jax.random.key(2), (3, 3))}
    >>> old_x, new_x = jax.ShapeDtypeStruct((4, 2), jnp.float32), jax.ShapeDtypeStruct((4, 3), jnp.float32)
    >>> old = js.dependency_table(fn, old_p, old_x, js.Features(["hp", "mana"]))
    >>> new = js.dependency_table(fn, new_init, new_x, js.Features(["hp", "armor", "mana"]))
    >>> surgery = js.plan(old, new)
    >>> key = jax.random.key(0)
    >>> js.verify(surgery, fn, fn, old_p, new_init, old_x, new_x, key=key).ok
    False
    >>> check = js.verify(surgery, fn, fn, old_p, surgery(old_p, new_init), old_x, new_x, key=key)
    >>> check.ok, max(check.max_abs_diff.values()) < 1e-6
    (True, True)
  """

  ok: bool
  max_abs_diff: dict[str, float]
  atol: float
  samples: int

  def __repr__(self) -> str:
    worst = max(self.max_abs_diff.values(), default=0.0)
    head = (f"Verification: {'preserved' if self.ok else 'NOT preserved'} (max |old - new| = {worst:.3g}, "
            f"atol={self.atol:g}, {self.samples} samples)")
    return "\n".join([head] + [f"  {p or '<root>'}: {d:.3g}" for p, d in self.max_abs_diff.items()])


def _random_leaf(key, leaf: feats.InputLeaf, int_high: int):
  if jnp.issubdtype(leaf.dtype, jnp.integer):
    return jax.random.randint(key, leaf.shape, 0, int_high).astype(leaf.dtype)
  if leaf.dtype == jnp.bool_:
    return jax.random.bernoulli(key, 0.5, leaf.shape)
  return jax.random.normal(key, leaf.shape, leaf.dtype)


def id_bound(closed_jaxpr) -> int | None:
  """Smallest size of an axis that the program gathers from with computed indices."""
  sizes = []
  stack = [closed_jaxpr.jaxpr if hasattr(closed_jaxpr, "jaxpr") else closed_jaxpr]
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "gather" and not isinstance(eqn.invars[1], compat.Literal):
        shape = eqn.invars[0].aval.shape
        sizes += [shape[a] for a in eqn.params["dimension_numbers"].start_index_map
                  if eqn.params["slice_sizes"][a] == 1 and shape[a] > 1]
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if isinstance(sub, (compat.Jaxpr, compat.ClosedJaxpr)):
            stack.append(compat.open_jaxpr(sub)[0])
  return min(sizes) if sizes else None


def matched_inputs(key, old_spec, new_spec, old_inputs, new_inputs, feature_rename, int_high=2, constants=None):
  """Random new inputs and old inputs that agree on every shared feature.

  Removed features declared constant (``constants``) hold their value in the old inputs.
  """
  constants = dict(constants or {})
  keys = jax.random.split(key, len(new_spec.leaves) + len(old_spec.leaves))
  new_leaves = [_random_leaf(k, l, int_high) for k, l in zip(keys, new_spec.leaves)]
  new_loc = {name: new_spec.locations[i] for i, name in enumerate(new_spec.names)}
  old_leaves = []
  for j, leaf in enumerate(old_spec.leaves):
    x = _random_leaf(keys[len(new_spec.leaves) + j], leaf, int_high)
    if leaf.feature_ids:
      if leaf.axis is None:
        name = feature_rename.get(old_spec.names[leaf.feature_ids[0]], old_spec.names[leaf.feature_ids[0]])
        if name in new_loc and new_loc[name][1] is None:
          src = new_leaves[new_loc[name][0]]
          if src.shape == leaf.shape:
            x = src.astype(leaf.dtype)
      else:
        # One gather per source leaf (not one op per feature): columns of the old leaf
        # taken from the new leaf that holds the same feature, the rest stay random.
        by_source: dict[int, tuple[list[int], list[int]]] = {}
        for pos, k in enumerate(leaf.feature_ids):
          name = feature_rename.get(old_spec.names[k], old_spec.names[k])
          if name in new_loc and new_loc[name][1] is not None:
            li, npos = new_loc[name]
            by_source.setdefault(li, ([], []))[0].append(pos)
            by_source[li][1].append(npos)
        xo = jnp.moveaxis(x, leaf.axis, -1)
        for li, (old_pos, new_pos) in by_source.items():
          src = jnp.moveaxis(new_leaves[li], new_spec.leaves[li].axis, -1)[..., np.asarray(new_pos)]
          if src.shape[:-1] == xo.shape[:-1]:
            xo = xo.at[..., np.asarray(old_pos)].set(src.astype(leaf.dtype))
        fixed = [(pos, constants[old_spec.names[k]]) for pos, k in enumerate(leaf.feature_ids)
                 if old_spec.names[k] in constants]
        if fixed:
          xo = xo.at[..., np.asarray([p for p, _ in fixed])].set(
              jnp.asarray([v for _, v in fixed], leaf.dtype))
        x = jnp.moveaxis(xo, -1, leaf.axis)
      if leaf.axis is None and old_spec.names[leaf.feature_ids[0]] in constants:
        x = jnp.full(leaf.shape, constants[old_spec.names[leaf.feature_ids[0]]], leaf.dtype)
    else:
      same = [i for i, l in enumerate(new_spec.leaves) if l.path == leaf.path]
      if same:
        new_leaves[same[0]], x = _share_unnamed(new_spec.leaves[same[0]], new_leaves[same[0]], leaf, x)
    old_leaves.append(x)
  old_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(old_inputs), old_leaves)
  new_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(new_inputs), new_leaves)
  return old_tree, new_tree


def _share_unnamed(new_leaf, new_x, old_leaf, old_x):
  """An input leaf without feature names in both models (an RNN carry passed in).

  An input leaf without feature names in both models (an RNN carry passed in): the new one is built from the old draw,
  old positions first along every axis (as the plan aligns them) and zeros in the new positions.
  """
  if new_leaf.shape == old_leaf.shape:
    return new_x, new_x
  if len(new_leaf.shape) != len(old_leaf.shape) or any(n < o for n, o in zip(new_leaf.shape, old_leaf.shape)):
    raise ValueError(
        f"Input {old_leaf.path or '<root>'!r} has no feature names and changes shape from {old_leaf.shape} to "
        f"{new_leaf.shape}: verify can only grow such a leaf (old positions first, zeros after). Name its "
        f"positions with Features(...) in both specs, or give verify inputs of the same shape.")
  grown = jnp.zeros(new_leaf.shape, new_x.dtype)
  return grown.at[tuple(slice(0, o) for o in old_leaf.shape)].set(old_x.astype(new_x.dtype)), old_x


def _output_pairs(surgery, yo, yn):
  """``(path, old array, new array)`` to compare: named output axes by name, others as they are."""
  old_spec = getattr(surgery.old_table, "output_spec", None)
  new_spec = getattr(surgery.new_table, "output_spec", None)
  rename = dict(getattr(surgery.report, "renamed_outputs", {}) or {})
  named = {}
  if old_spec is not None and new_spec is not None:
    o_leaves = {l.path: l for l in old_spec.leaves}
    for l in new_spec.leaves:
      if l.axis is not None and l.path in o_leaves and o_leaves[l.path].axis == l.axis:
        named[l.path] = (o_leaves[l.path], l)
  out = []
  for (p, a), (_, b) in zip(yo, yn):
    name = feats.keystr(p)
    if name in named:
      ol, nl = named[name]
      assert old_spec is not None and new_spec is not None  # `named` is filled only when both are
      old_names = [rename.get(old_spec.names[k], old_spec.names[k]) for k in ol.feature_ids]
      new_pos = {new_spec.names[k]: i for i, k in enumerate(nl.feature_ids)}
      keep = [(i, new_pos[n]) for i, n in enumerate(old_names) if n in new_pos]
      a = jnp.take(a, np.asarray([i for i, _ in keep], np.int64), axis=ol.axis)
      b = jnp.take(b, np.asarray([j for _, j in keep], np.int64), axis=nl.axis)
    if np.shape(a) != np.shape(b):
      raise ValueError(
          f"Output {name or '<root>'!r} has shape {np.shape(a)} in the old model and {np.shape(b)} in the new "
          f"one. verify compares outputs position by position only where they are named: give the grown "
          f"axis names with `outputs=` in both dependency_tables (e.g. the actions or classes), or compare "
          f"a slice of the new output.")
    out.append((name, a, b))
  return out


def verify(surgery, old_fn: Callable, new_fn: Callable, old_params: Any, new_params: Any,
           old_inputs: Any, new_inputs: Any, *, key, samples: int = 4, atol: float = 1e-6,
           int_high: int | None = None) -> Verification:
  """Checks numerically that the new model computes what the old one did.

  Draws random inputs for the new model (new features random), builds old
  inputs that agree on every shared feature, and compares every output leaf:
  named output positions (``outputs=`` of :func:`dependency_table`) by name,
  other outputs position by position. An input leaf without feature names
  that grew (a recurrent state passed in) is built from the old draw, with
  zeros in its new positions.

  Args:
    surgery: the plan (its tables give the feature layouts and renames).
    old_fn: the old model, ``old_fn(params, inputs)``.
    new_fn: the new model, ``new_fn(params, inputs)``.
    old_params: the trained old parameters.
    new_params: the result of ``surgery(old_params, new_init)``.
    old_inputs: example old input tree (arrays or ShapeDtypeStruct).
    new_inputs: example new input tree.
    key: a PRNG key.
    samples: number of random input draws.
    atol: tolerance on ``max |old - new|``.
    int_high: integer (categorical) inputs are drawn from ``[0, int_high)``, so
      that they are valid ids for both vocabularies. Default: the smallest
      table size that the old model gathers from with computed indices (its
      vocabulary), or 2 if it gathers nothing.

  Returns:
    A :class:`Verification` with ``ok`` and the worst difference per output.

  Raises:
    ValueError: the two models' outputs differ in number, or in shape along an
      axis without names; an unnamed input leaf that shrank.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.full((3, 3), 5.0)}
    >>> old_x, new_x = jax.ShapeDtypeStruct((4, 2), jnp.float32), jax.ShapeDtypeStruct((4, 3), jnp.float32)
    >>> old = js.dependency_table(fn, old_p, old_x, js.Features(["hp", "mana"]))
    >>> new = js.dependency_table(fn, new_init, new_x, js.Features(["hp", "armor", "mana"]))
    >>> surgery = js.plan(old, new)
    >>> print(js.verify(surgery, fn, fn, old_p, surgery(old_p, new_init), old_x, new_x,
    ...                 key=jax.random.key(0)).ok)
    True
  """
  old_t, new_t = surgery.old_table, surgery.new_table
  if int_high is None:
    int_high = id_bound(old_t.jaxpr) or 2
  rename = dict(surgery.report.renamed_features)
  worst: dict[str, float] = {}
  old_call = jax.jit(old_fn)
  new_call = jax.jit(new_fn)
  for k in jax.random.split(key, samples):
    xo, xn = matched_inputs(k, old_t.spec, new_t.spec, old_inputs, new_inputs, rename, int_high,
                            getattr(surgery.report, "constants", None))
    yo = jax.tree_util.tree_flatten_with_path(old_call(old_params, xo))[0]
    yn = jax.tree_util.tree_flatten_with_path(new_call(new_params, xn))[0]
    if len(yo) != len(yn):
      raise ValueError(f"The old model has {len(yo)} output leaves and the new one {len(yn)}; "
                       "verify compares outputs leaf by leaf.")
    for name, a, b in _output_pairs(surgery, yo, yn):
      worst[name] = max(worst.get(name, 0.0), _max_diff(a, b))
  return Verification(all(d <= atol for d in worst.values()), worst, atol, samples)


def _max_diff(a, b) -> float:
  """Largest |a - b|; ``inf`` where exactly one side is NaN or they are infinities that differ.

  A NaN must never pass as "no difference".
  """
  if not np.size(a):
    return 0.0
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  same = (a == b) | (np.isnan(a) & np.isnan(b))
  with np.errstate(invalid="ignore"):
    d = np.where(same, 0.0, np.abs(a - b))
  d = np.where(np.isnan(d), np.inf, d)
  return float(d.max())
