"""Applying a plan: the pure pytree -> pytree remap of the parameters.

:class:`Surgery` holds the two tables and the :class:`~jaxsurgery.Report`; it
remaps parameter trees leaf by leaf (:func:`apply_leaf`), in one jitted program
per tree structure and sharding (:func:`sharded_call`, shared with
:func:`~jaxsurgery.remap_state`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.shard_alike import shard_alike

from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import SurgeryError
from jaxsurgery._src.core.table import FeatureTable
from jaxsurgery._src.surgery.relations import fold

if TYPE_CHECKING:  # plan builds Surgery objects, so it imports this module
  from jaxsurgery._src.surgery.plan import LeafPlan, Report
  from jaxsurgery._src.surgery.relations.driver import Relation


def leaves_by_path(tree: Any, table: FeatureTable, what: str) -> dict[str, Any]:
  """``{path: leaf}`` of ``tree``, checked against the table's parameter paths and shapes."""
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


def apply_leaf(leaf: LeafPlan, old: Any, init: Any, old_leaves: Sequence[Any] | None = None) -> Any:
  """One new leaf from its plan (see :class:`~jaxsurgery._src.surgery.plan.LeafPlan` for the order).

  Args:
    leaf: the leaf's plan.
    old: the old leaf (``None`` for a new leaf).
    init: the new model's init of the leaf (fresh positions take it, and its dtype).
    old_leaves: every old leaf, in the old table's order (needed to fold removed constant
      features, which read the old kernel they fed).

  Returns:
    The new leaf.
  """
  if leaf.old_path is None:
    out = init
  else:
    x = jnp.asarray(old)
    for term in getattr(leaf, "fold", ()):
      if old_leaves is None:
        raise SurgeryError(f"{leaf.path!r} folds a removed constant feature, which reads other old leaves: "
                           f"apply the plan to the whole tree (Surgery.apply), not leaf by leaf.")
      x = x + fold.contribution(term, old_leaves, leaf.old_shape).astype(x.dtype)
    x, valid = gather(x, leaf.maps, len(leaf.shape))
    x = x.astype(init.dtype)
    out = x if valid is None else jnp.where(valid, x, init)
    for a in getattr(leaf, "mean_axes", ()):
      out = _mean_fill(out, leaf.maps[a], a)
    if getattr(leaf, "scale", 1.0) != 1.0:
      out = out * jnp.asarray(leaf.scale, out.dtype)
    for a in getattr(leaf, "noise_axes", ()):
      out = out + _paired_noise(leaf, a, out)
  if getattr(leaf, "zero_all", False):
    return jnp.zeros_like(out)
  for a in getattr(leaf, "zero_axes", ()):
    m = leaf.maps[a] if leaf.maps else None
    if m is not None and (m < 0).any():
      out = jnp.where(_column(m < 0, a, len(leaf.shape)), jnp.zeros((), out.dtype), out)
  if not getattr(leaf, "zero_axes", ()) and leaf.zero is not None:
    out = jnp.where(leaf.zero, jnp.zeros((), init.dtype), out)
  return out


def _column(m: np.ndarray, a: int, rank: int) -> np.ndarray:
  return m.reshape((1,) * a + (-1,) + (1,) * (rank - a - 1))


def gather(x, maps, rank: int):
  """``x`` taken through the per-axis maps, and where the result holds old values (None: everywhere).

  Axes whose map is an old prefix then new positions are one slice and one pad for all of
  them, not a gather: under SPMD a gather along a sharded axis all-gathers its operand, and
  a pad per axis makes the partitioner reshard between the pads (~2x the temporary memory).
  """
  valid = None
  keep, pads = [slice(None)] * rank, [(0, 0)] * rank
  for a, m in enumerate(maps):
    if m is None:
      continue
    n = _prefix(m)
    if n is not None:
      keep[a], pads[a] = slice(0, n), (0, len(m) - n)
    else:
      x = jnp.take(x, np.maximum(m, 0), axis=a)
    if (m < 0).any():  # per-axis columns ANDed in jax: a dense numpy mask would be a leaf-sized constant
      v = jnp.asarray(_column(m >= 0, a, rank))
      valid = v if valid is None else (valid & v)
  if any(k.stop is not None and k.stop < x.shape[a] for a, k in enumerate(keep)):
    x = x[tuple(keep)]
  if any(p != (0, 0) for p in pads):
    x = jnp.pad(x, pads)
  return x, valid


def _prefix(m: np.ndarray) -> int | None:
  """``n`` if map ``m`` is the old positions ``0..n-1`` then only new ones (a slice and a pad), else None."""
  n = int(np.argmax(m < 0)) if (m < 0).any() else len(m)
  return n if np.array_equal(m[:n], np.arange(n)) and (m[n:] < 0).all() else None


def _mean_fill(out, m: np.ndarray, a: int):
  """New positions along ``a`` := the mean of the old positions (average expansion)."""
  keep = np.nonzero(m >= 0)[0]
  mean = jnp.mean(jnp.take(out, keep, axis=a), axis=a, keepdims=True)
  return jnp.where(_column(m < 0, a, out.ndim), mean, out)


def _paired_noise(leaf: LeafPlan, a: int, x):
  """Noise that sums to zero over the copies of each old position along ``a``.

  Noise that sums to zero over the copies of each old position along ``a``: the copies see the same inputs, so what
  they feed is unchanged, yet their gradients differ (HyperCloning).
  """
  m = leaf.maps[a]
  if m is None or not leaf.noise:
    return jnp.zeros_like(x)
  assert leaf.old_shape is not None  # a map to old positions: the leaf has an old counterpart
  key = jax.random.fold_in(jax.random.key(0), zlib.crc32(f"{leaf.path}/{a}".encode()) & 0x7FFFFFFF)
  z = jnp.moveaxis(jax.random.normal(key, x.shape, jnp.float32), a, -1)
  onehot = (m[:, None] == np.arange(leaf.old_shape[a])[None, :]).astype(np.float32)  # (new, old)
  mean = (z @ onehot) / np.maximum(onehot.sum(0), 1)
  z = jnp.moveaxis(z - mean @ onehot.T, -1, a)
  rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))) + 1e-30)
  return (z * (leaf.noise * rms)).astype(x.dtype)


def copies_as_is(leaf: LeafPlan) -> bool:
  """The leaf plan copies its old parameter leaf as it is (no data moves)."""
  return (leaf.old_path is not None and leaf.old_shape == leaf.shape and all(m is None for m in leaf.maps)
          and leaf.zero is None and not getattr(leaf, "zero_all", False) and not getattr(leaf, "fold", ())
          and not getattr(leaf, "mean_axes", ()) and not getattr(leaf, "noise_axes", ())
          and bool(np.all(np.asarray(getattr(leaf, "scale", 1.0)) == 1.0)))


#: Eager remaps whose moving leaves sum to more than this (bytes per device) run as several programs.
PROGRAM_BYTES = 64 << 20


def shard_bytes(x) -> int:
  """Bytes of one device's shard of ``x`` (an array or a ``ShapeDtypeStruct``; unsharded: all of it)."""
  shape = tuple(np.shape(x))
  sharding = getattr(x, "sharding", None)
  if sharding is not None:
    shape = tuple(sharding.shard_shape(shape))
  try:
    itemsize = jnp.dtype(getattr(x, "dtype", None) or np.result_type(x)).itemsize
  except TypeError:  # typed PRNG keys
    itemsize = 8
  return int(np.prod(shape, dtype=np.int64)) * itemsize


def program_groups(weights: Sequence[int]) -> list[list[int]]:
  """Consecutive indices split into programs whose weights sum to at most ~one leaf (or PROGRAM_BYTES).

  In one program XLA may run every leaf's gather or pad at once (the CPU scheduler does, to
  overlap them), so its temporaries are those of all the moving leaves together; programs of
  about one leaf's worth keep the peak near one leaf's. Weight 0: a leaf that moves no data.
  """
  if not weights:
    return []
  budget = max(max(weights), PROGRAM_BYTES)
  groups: list[list[int]] = [[]]
  used = 0
  for i, w in enumerate(weights):
    if groups[-1] and w and used + w > budget:
      groups.append([])
      used = 0
    groups[-1].append(i)
    used += w
  return groups


def sharded_call(cache: dict, key: Any, fn: Callable, args: tuple, targets: Sequence[Any],
                 out_shardings_of: Callable) -> Any:
  """``fn(*args)``: inline under an outer transformation, else one jitted program per key and sharding.

  Otherwise one jitted program per ``key`` and sharding of ``targets`` (the new init's
  leaves), whose outputs get those shardings (``out_shardings_of(list of shardings)``
  lays them out).

  ``cache`` holds the jitted programs (one dict per caller object).
  """
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
    typed = [getattr(jax.typeof(x), "sharding", None) for x in targets]
    if _explicit(typed):   # sharding in types: gathers need their output sharding spelled out
      return jax.sharding.auto_axes(fn, out_sharding=out_shardings_of(typed))(*args)
    return _laid_out_like(fn(*args), targets)
  shardings = tuple(getattr(x, "sharding", None) for x in targets)
  full = (key, shardings if all(s is not None for s in shardings) else None)
  compiled = cache.get(full)
  if compiled is None:
    out = None if full[1] is None else out_shardings_of(list(full[1]))
    body = jax.sharding.auto_axes(fn, out_sharding=out) if out is not None and _explicit(full[1]) else fn
    compiled = cache[full] = jax.jit(body, out_shardings=out)
  return compiled(*args)


def _laid_out_like(out: Any, targets: Sequence[Any]) -> Any:
  """Each output leaf sharded like its target (the new init) when an outer ``jit`` propagates layouts.

  Without it an unchanged leaf is the old leaf itself and keeps the old layout. Leaves that are
  not arrays of the target's shape (Python scalars, keys) pass as they are.
  """
  leaves, treedef = jax.tree_util.tree_flatten(out)
  if len(leaves) != len(targets):
    return out
  tied = []
  for x, t in zip(leaves, targets):
    ok = all(isinstance(v, jax.core.Tracer) and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
             for v in (x, t)) and x.shape == t.shape
    tied.append(shard_alike(x, t)[0] if ok else x)
  return jax.tree_util.tree_unflatten(treedef, tied)


def _explicit(shardings) -> bool:
  """Whether a sharding lives on a mesh with Explicit axes (``jax.make_mesh``'s default)."""
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  return explicit is not None and any(
      explicit in tuple(getattr(getattr(s, "mesh", None), "axis_types", ()) or ()) for s in shardings if s is not None)


class Surgery:
  """A planned transfer. ``surgery(old_params, new_params_init) -> new_params`` is pure and jittable.

  Apply it to any tree shaped like the params the tables were built from: EMA
  params, optimizer moments, or every checkpoint of a pool of past versions.
  Eager calls run one jitted program (one per large leaf once the moving
  leaves pass 64 MiB per device) and keep the shardings of
  ``new_params_init``; under an outer ``jax.jit`` it is traced inline.
  Build it with :func:`~jaxsurgery.plan`.

  Attributes:
    old_table: the old model's :class:`~jaxsurgery.FeatureTable`.
    new_table: the new model's.
    report: the :class:`~jaxsurgery.Report` (what moves where).
    leaf_plans: ``{new path: LeafPlan}``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jaxsurgery as js
    >>> fn = lambda p, x: x @ p["w"]
    >>> old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.zeros((3, 3))}
    >>> old = js.dependency_table(fn, old_p, jnp.ones((1, 2)), js.Features(["a", "b"]))
    >>> new = js.dependency_table(fn, new_init, jnp.ones((1, 3)), js.Features(["a", "c", "b"]))
    >>> surgery = js.plan(old, new)
    >>> surgery(old_p, new_init)["w"].shape
    (3, 3)
    >>> pool = {"w": jnp.stack([jnp.ones((2, 3)), 2 * jnp.ones((2, 3))])}   # two checkpoints
    >>> np.asarray(jax.vmap(surgery.apply, in_axes=(0, None))(pool, new_init)["w"][1]).tolist()
    [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]
  """

  def __init__(self, old_table: FeatureTable, new_table: FeatureTable, report: Report):
    self.old_table, self.new_table, self.report = old_table, new_table, report
    self.leaf_plans: dict[str, LeafPlan] = {l.path: l for l in report.leaves}  # by new path
    self._compiled: dict = {}
    self.relation: Relation | None = None  # the relation pass's result (set by plan)

  def apply(self, old_params: Any, new_params_init: Any) -> Any:
    """The new params, computed leaf by leaf (traced as is: use it inside your own ``jit``).

    Args:
      old_params: a tree shaped like the old table's params (the trained
        params, an EMA copy, an optimizer moment...).
      new_params_init: a tree shaped like the new table's params (the new
        model's init); fresh elements take its values, and its dtypes.

    Returns:
      A tree shaped like ``new_params_init``.

    Raises:
      SurgeryError: a tree that does not match its table (paths or shapes).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxsurgery as js
      >>> fn = lambda p, x: x @ p["w"]
      >>> old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.zeros((3, 3))}
      >>> old = js.dependency_table(fn, old_p, jnp.ones((1, 2)), js.Features(["a", "b"]))
      >>> new = js.dependency_table(fn, new_init, jnp.ones((1, 3)), js.Features(["b", "c", "a"]))
      >>> np.asarray(js.plan(old, new).apply(old_p, new_init)["w"]).tolist()
      [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    treedef = jax.tree_util.tree_structure(new_params_init)
    return jax.tree_util.tree_unflatten(treedef, self._apply_leaves(old_params, new_params_init, None))

  def _apply_leaves(self, old_params: Any, new_params_init: Any, which: Sequence[int] | None) -> list[Any]:
    """The new leaves ``which`` (indices into ``new_params_init``'s leaves; None: all), in order."""
    old = leaves_by_path(old_params, self.old_table, "old_params")
    init_leaves = jax.tree_util.tree_flatten_with_path(new_params_init)[0]
    leaves_by_path(new_params_init, self.new_table, "new_params_init")
    old_list = [old[p] for p in self.old_table.paths]
    operands = []
    for path, x in (init_leaves if which is None else [init_leaves[i] for i in which]):
      leaf = self.leaf_plans[feats.keystr(path)]
      operands.append((leaf, None if leaf.old_path is None else old.get(leaf.old_path), x, old_list))
    return [apply_leaf(*ops) for ops in operands]

  def remap_state(self, old_state: Any, new_state_init: Any, **kwargs: Any) -> Any:
    """Remaps a whole training state (params, EMA, optimizer moments, counts).

    Args:
      old_state: the trained old state.
      new_state_init: the new model's initialised state.
      **kwargs: passed to :func:`jaxsurgery.remap_state` (``rename``,
        ``prefixes``, ``strict``, ``return_report``).

    Returns:
      What :func:`jaxsurgery.remap_state` returns.
    """
    from jaxsurgery._src.surgery.state import remap_state  # state builds on this module
    return remap_state(self, old_state, new_state_init, **kwargs)

  def __call__(self, old_params: Any, new_params_init: Any) -> Any:
    """:meth:`apply`, run as jitted programs that keep ``new_params_init``'s shardings.

    One program, or programs of about one leaf once the leaves that move data pass
    ``PROGRAM_BYTES`` (64 MiB per device), which bounds the temporaries.

    Under an outer transformation (``jit``, ``vmap``) it is traced inline.

    Args:
      old_params: a tree shaped like the old table's params.
      new_params_init: a tree shaped like the new table's params.

    Returns:
      The new params, shaped like ``new_params_init``.
    """
    init_leaves, treedef = jax.tree_util.tree_flatten(new_params_init)
    groups = self._programs(old_params, new_params_init)
    if len(groups) <= 1:
      return sharded_call(self._compiled, treedef, self.apply, (old_params, new_params_init), init_leaves,
                          lambda shardings: jax.tree_util.tree_unflatten(treedef, shardings))
    out: list[Any] = [None] * len(init_leaves)
    for group in groups:
      some = lambda o, n, group=tuple(group): self._apply_leaves(o, n, group)
      results = sharded_call(self._compiled, (treedef, tuple(group)), some, (old_params, new_params_init),
                             [init_leaves[i] for i in group], list)
      for i, r in zip(group, results):
        out[i] = r
    return jax.tree_util.tree_unflatten(treedef, out)

  def _programs(self, old_params: Any, new_params_init: Any) -> list[list[int]]:
    """Eager calls with large moving leaves: indices of the new leaves, in programs of about one leaf each."""
    init_leaves = jax.tree_util.tree_flatten_with_path(new_params_init)[0]
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((old_params, new_params_init))):
      return []
    plans = [self.leaf_plans.get(feats.keystr(p)) for p, _ in init_leaves]
    if any(lp is None for lp in plans):
      return []  # apply raises the error naming the paths
    return program_groups([0 if lp is not None and copies_as_is(lp) else shard_bytes(x)
                           for lp, (_, x) in zip(plans, init_leaves)])

  def show(self, path: str | None = None, **kwargs: Any):
    """A picture of new leaf ``path``, each element coloured by where its value comes from.

    ``path=None`` draws every leaf at once (:func:`jaxsurgery.display.show_overview`). Needs
    the ``viz`` extra (matplotlib).

    Args:
      path: a new leaf path, or None for the overview.
      **kwargs: passed to :func:`jaxsurgery.display.show_surgery`.

    Returns:
      A :class:`jaxsurgery.display.Picture`.
    """
    from jaxsurgery._src.display_viz import show_surgery
    return show_surgery(self, path, **kwargs)

  def save(self, path: str, *, overwrite: bool = False) -> str:
    """Writes this plan to directory ``path`` (JSON and ``.npz``, versioned; no pickle).

    :func:`jaxsurgery.load_surgery` reads it back, in any process, and applies it identically.

    Args:
      path: the directory to create.
      overwrite: replace a plan already at ``path``.

    Returns:
      The plan's id (a fingerprint of what it does).
    """
    from jaxsurgery._src.surgery import persist
    return persist.save(self, path, overwrite=overwrite)

  def __repr__(self) -> str:
    return "Surgery(\n" + repr(self.report) + "\n)"
