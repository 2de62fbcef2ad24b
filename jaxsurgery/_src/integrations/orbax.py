"""Orbax integration: restore an *old* checkpoint straight into the *new* model's state.

The old tree is read from the checkpoint's own metadata (or given), so the old
model never has to be built. orbax-checkpoint is imported lazily: it is not a
dependency of jaxsurgery.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import SurgeryError, UnknownNameError
from jaxsurgery._src.surgery.remap import Surgery
from jaxsurgery._src.surgery.state import PathRenamer, StatePlan, assemble, plan_state, run_state_plan, step_reads


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # pragma: no cover - exercised only without orbax
    raise ImportError("jaxsurgery.orbax needs orbax-checkpoint: pip install orbax-checkpoint") from e
  return ocp


# -- locating the checkpoint ---------------------------------------------------------------

def _is_item_dir(path) -> bool:
  return os.path.exists(os.path.join(path, "_METADATA"))


def _is_step_dir(path) -> bool:
  return os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")) and not _is_item_dir(path)


def _step_dirs(path) -> dict[int, str]:
  """``{step: directory}`` of a CheckpointManager root (``5``, or ``<prefix>_5`` with a step prefix)."""
  try:
    names = os.listdir(path)
  except (FileNotFoundError, NotADirectoryError):
    return {}
  out: dict[int, str] = {}
  for n in names:
    m = re.fullmatch(r"(?:.*_)?(\d+)", n)
    full = os.path.join(path, n)
    if m and os.path.isdir(full) and (_is_step_dir(full) or _is_item_dir(full)):
      out.setdefault(int(m.group(1)), full)
  return out


class _Source:
  """One checkpointed item, resolved to its directory: read its metadata, restore it.

  A ``CheckpointManager`` (object or root directory) is resolved to the item
  directory of the requested step, which is read with ``StandardCheckpointer``:
  that needs no handler registry, so a manager opened without knowing the
  item's handler works too.
  """

  def __init__(self, source, step: int | None, item: str | None):
    ocp = _ocp()
    self.item = item
    if isinstance(source, ocp.CheckpointManager):
      root = os.fspath(source.directory)
      where = f"the CheckpointManager at {root!r}"
    else:
      root = os.fspath(source)
      where = repr(root)
    if step is None and _is_item_dir(root):
      self.path = root
    elif step is None and _is_step_dir(root):
      self.path = self._item_dir(root, where)
    else:
      steps = _step_dirs(root)
      if not steps:
        raise FileNotFoundError(
            f"No orbax checkpoint at {where}: expected a checkpoint directory (with _METADATA), a step "
            f"directory of a CheckpointManager, or a CheckpointManager root with step directories.")
      step = max(steps) if step is None else step
      if step not in steps:
        raise FileNotFoundError(f"No step {step} in {where}; steps: {sorted(steps)}.")
      self.path = self._item_dir(steps[step], f"step {step} of {where}")
    self.step = step

  def _item_dir(self, step_dir: str, where: str) -> str:
    if _is_item_dir(step_dir):
      return step_dir
    items = sorted(n for n in os.listdir(step_dir) if _is_item_dir(os.path.join(step_dir, n)))
    if self.item is not None:
      if self.item not in items:
        raise UnknownNameError(f"{where} has no item {self.item!r}; items: {items}. Pass `item=` one of them.")
      return os.path.join(step_dir, self.item)
    if len(items) == 1:
      return os.path.join(step_dir, items[0])
    raise UnknownNameError(f"{where} holds the items {items}; pass `item=` to choose one.")

  def metadata(self):
    with _ocp().StandardCheckpointer() as ckpt:
      md = ckpt.metadata(self.path)
    return getattr(md, "item_metadata", md)

  def restore_leaves(self, abstract_leaves, treedef, wanted) -> list:
    """The leaves at the ``wanted`` indices (the others are not read: orbax's PLACEHOLDER), as a list."""
    ocp = _ocp()
    target = [x if i in wanted else ocp.PLACEHOLDER for i, x in enumerate(abstract_leaves)]
    args = [ocp.PLACEHOLDER if x is ocp.PLACEHOLDER else
            ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype) for x in target]
    with ocp.PyTreeCheckpointer() as ckpt:
      restored = ckpt.restore(self.path, args=ocp.args.PyTreeRestore(
          item=jax.tree_util.tree_unflatten(treedef, target), restore_args=jax.tree_util.tree_unflatten(treedef, args)))
    leaves = jax.tree_util.tree_leaves(restored, is_leaf=lambda x: x is ocp.PLACEHOLDER)
    return [x if i in wanted else None for i, x in enumerate(leaves)]


# -- abstract trees --------------------------------------------------------------------------

def _tree(md):
  return getattr(md, "tree", md)


def _is_meta(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, jax.ShapeDtypeStruct)


def old_abstract(source, *, step: int | None = None, item: str | None = None, sharding=None):
  """The old state's abstract tree, read from the checkpoint metadata (the old model is not needed).

  Args:
    source: a checkpoint directory, a ``CheckpointManager`` root directory, or
      an ``orbax.checkpoint.CheckpointManager``.
    step: the manager step (default: the latest).
    item: the item name in a multi-item (``Composite``) checkpoint.
    sharding: the sharding of every leaf (default: the first device).

  Returns:
    A tree of ``jax.ShapeDtypeStruct`` (dicts and lists in place of the saved
    containers; only the paths matter to :func:`~jaxsurgery.remap_state`).

  Example:
    >>> import os, tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, jaxsurgery.orbax as jso
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> with ocp.StandardCheckpointer() as ckpt:
    ...   ckpt.save(path, {"params": {"w": jnp.ones((2, 3))}, "step": 7})
    >>> jso.old_abstract(path)["params"]["w"].shape
    (2, 3)
  """
  md = _tree(_Source(source, step, item).metadata())
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), jax.dtypes.canonicalize_dtype(m.dtype), sharding=sharding),
      md, is_leaf=_is_meta)


def _old_shardings(abstract, new_state_init, rename):
  """Sharding per old leaf: the new leaf's when path and shape agree, else replicated on the new mesh."""
  new = {feats.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(new_state_init)[0]}
  default: jax.sharding.Sharding | None = None
  for x in new.values():
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
      default = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
      break
    if s is not None and default is None:
      default = jax.sharding.SingleDeviceSharding(next(iter(s.device_set)))
  default = default or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  to_new = PathRenamer({n: o for o, n in (rename or {}).items()})  # old path -> new path

  def pick(path, leaf):
    if not hasattr(leaf, "shape") or getattr(leaf, "sharding", None) is not None:
      return leaf
    x = new.get(to_new.to_old(feats.keystr(path)))
    s = getattr(x, "sharding", None)
    same = tuple(getattr(x, "shape", ())) == tuple(leaf.shape) and getattr(x, "dtype", None) == leaf.dtype
    ok = s is not None and same
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s if ok else default)
  return jax.tree_util.tree_map_with_path(pick, abstract)


def _nbytes(x) -> int:
  try:
    itemsize = jax.numpy.dtype(x.dtype).itemsize
  except TypeError:  # typed keys
    itemsize = 8
  return int(np.prod(x.shape, dtype=np.int64)) * itemsize


def _chunks(splan: StatePlan, chunk_bytes: int | None) -> list[list]:
  """The plan's steps in checkpoint order, cut where the old bytes they read pass ``chunk_bytes``.

  Default: the larger of the largest old leaf read and 1/8 of all the old bytes read.
  """
  steps = sorted(splan.steps, key=lambda s: min(step_reads(s), default=-1))
  sizes = {j: _nbytes(splan.old_leaves[j]) for s in steps for j in step_reads(s)}
  if chunk_bytes is None:
    chunk_bytes = max(max(sizes.values(), default=0), sum(sizes.values()) // 8)
  chunks: list[list] = [[]]
  used, seen = 0, set()
  for s in steps:
    new = [j for j in step_reads(s) if j not in seen]
    size = sum(sizes[j] for j in new)
    if chunks[-1] and new and used + size > chunk_bytes:
      chunks.append([])
      used = 0
    chunks[-1].append(s)
    used += size
    seen.update(new)
  return chunks


def restore(surgery: Surgery, source, new_state_init, *, step: int | None = None, item: str | None = None,
            old_state_abstract=None, rename: Mapping[str, str] | None = None, prefixes=None,
            roles: Mapping[str, str] | None = None, strict: bool = False, return_report: bool = False,
            chunk_bytes: int | None = None):
  """Restores an old checkpoint and returns the new state, remapped by the surgery.

  The old tree is read from the checkpoint metadata unless
  ``old_state_abstract`` is given, so the old model never has to be built, and
  the state remap is planned (and checked against the old model) before any
  array is read. The old leaves are then read a chunk at a time (about
  ``chunk_bytes``) and each chunk is remapped and released before the next is
  read, so the memory needed beyond the new state is about one chunk. Old
  leaves whose path and shape are unchanged are restored directly with the
  new target's sharding and, when the plan leaves them as they are, become
  the new state's leaves without a copy; the others are restored on a
  replicated sharding of the new mesh (pass ``old_state_abstract`` with
  shardings to control this). The result has ``new_state_init``'s structure
  and shardings.

  Args:
    surgery: the plan from the old model to the new one.
    source: a checkpoint directory (``StandardCheckpointer``), a step
      directory or root directory of a ``CheckpointManager``, or an
      ``orbax.checkpoint.CheckpointManager``.
    new_state_init: the new model's initialised state (e.g. a ``TrainState``,
      ``{"params": ..., "opt_state": ...}``, ``nnx.state(new_model)``).
    step: the manager step (default: the latest).
    item: the item name in a multi-item (``Composite``) checkpoint.
    old_state_abstract: the old state's abstract tree (``jax.ShapeDtypeStruct``
      leaves, optionally with shardings); default: from the metadata.
    rename: ``{old state prefix: new state prefix}``; see :func:`~jaxsurgery.remap_state`.
    prefixes: the state prefixes that hold param-shaped subtrees; see :func:`~jaxsurgery.remap_state`.
    roles: ``{new state prefix: role}``; see :func:`~jaxsurgery.remap_state`.
    strict: raise if anything is left behind or missing; see :func:`~jaxsurgery.remap_state`.
    return_report: also return the :class:`~jaxsurgery.StateReport`.
    chunk_bytes: how many bytes of old leaves to read at a time (default: the
      larger of the largest leaf and 1/8 of the checkpoint).

  Returns:
    The new state, or ``(new_state, report)``.

  Raises:
    SurgeryError: the checkpoint does not fit the old model (e.g. another
      model's checkpoint; the message names the paths and shapes), or cannot
      be read (a corrupt or partial checkpoint; the message names its path).
    FileNotFoundError: no checkpoint at ``source`` / ``step``.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, jaxsurgery as js, jaxsurgery.orbax as jso
    >>> fn = lambda p, x: x @ p["w"]
    >>> old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.zeros((3, 3))}
    >>> table = lambda p, names: js.dependency_table(fn, p, jnp.ones((1, len(names))), js.Features(names))
    >>> surgery = js.plan(table(old_p, ["a", "b"]), table(new_init, ["a", "new", "b"]))
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> with ocp.StandardCheckpointer() as ckpt:      # the old run's checkpoint
    ...   ckpt.save(path, {"params": old_p, "step": 7})
    >>> state = jso.restore(surgery, path, {"params": new_init, "step": jnp.int32(0)})
    >>> state["params"]["w"].tolist(), int(state["step"])
    ([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], 7)

    With a ``CheckpointManager`` (object or root directory), ``step=`` picks a
    step (default: the latest) and ``item=`` an item of a composite checkpoint.
  """
  src = _Source(source, step, item)
  given = old_state_abstract is not None
  if not given:
    old_state_abstract = _abstract_from(src)
  abstract = _old_shardings(old_state_abstract, new_state_init, rename)
  splan = plan_state(surgery, abstract, new_state_init, rename=rename, prefixes=prefixes, roles=roles)
  problems = splan.strict_problems() if strict else []
  if problems:
    raise SurgeryError(f"strict=True: the state remap of {src.path!r} is incomplete:\n" + "\n".join(problems[:30]))
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  computed: dict[int, Any] = {}
  for chunk in _chunks(splan, chunk_bytes):
    wanted = {j for s in chunk for j in step_reads(s)}
    old_leaves = _read(src, leaves, treedef, wanted, given) if wanted else [None] * len(leaves)
    computed.update(run_state_plan(splan, old_leaves, chunk, alias=True))
    del old_leaves   # this chunk's old buffers go before the next chunk is read
  new_state = assemble(splan, computed)
  return (new_state, splan.report) if return_report else new_state


def _abstract_from(src: _Source):
  try:
    md = _tree(src.metadata())
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SurgeryError(f"Could not read the checkpoint metadata of {src.path!r}: {type(e).__name__}: {e}\n"
                       f"  Is it a complete orbax checkpoint (an interrupted save leaves a partial one)?") from e
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), jax.dtypes.canonicalize_dtype(m.dtype)), md, is_leaf=_is_meta)
  if not jax.tree_util.tree_leaves(abstract):
    raise SurgeryError(f"Could not read the checkpoint at {src.path!r}: its metadata lists no arrays. A corrupt "
                       f"or partially written checkpoint? Restore it from a copy, or leave this step out.")
  return abstract


def _read(src: _Source, leaves, treedef, wanted, given: bool) -> list:
  try:
    return src.restore_leaves(leaves, treedef, wanted)
  except Exception as e:  # orbax / tensorstore raise many types for unreadable data
    hint = ("Leave old_state_abstract=None to read the old tree from the checkpoint metadata." if given else
            "Was the item written with StandardCheckpointer / PyTreeCheckpointer (StandardSave / PyTreeSave)? "
            "A corrupt or partially written checkpoint cannot be read: restore it from a copy or skip this step.")
    raise SurgeryError(f"Could not restore {src.path!r}: {type(e).__name__}: {e}\n  {hint}") from e


__all__ = ["restore", "old_abstract"]
