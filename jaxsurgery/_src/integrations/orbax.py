"""Orbax integration: restore an *old* checkpoint straight into the *new* model's state.

The old tree is read from the checkpoint's own metadata (or given), so the old
model never has to be built. orbax-checkpoint is imported lazily: it is not a
dependency of jaxsurgery.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax

from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import SurgeryError, UnknownNameError
from jaxsurgery._src.surgery.remap import Surgery
from jaxsurgery._src.surgery.state import PathRenamer, remap_state


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
    md = _ocp().StandardCheckpointer().metadata(self.path)
    return getattr(md, "item_metadata", md)

  def restore(self, abstract):
    return _ocp().StandardCheckpointer().restore(self.path, abstract)


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


def restore(surgery: Surgery, source, new_state_init, *, step: int | None = None, item: str | None = None,
            old_state_abstract=None, rename: Mapping[str, str] | None = None, prefixes=None,
            strict: bool = False, return_report: bool = False):
  """Restores an old checkpoint and returns the new state, remapped by the surgery.

  The old tree is read from the checkpoint metadata unless
  ``old_state_abstract`` is given, so the old model never has to be built.
  Old leaves whose path and shape are unchanged are restored directly with the
  new target's sharding; the others on a replicated sharding of the new mesh
  (pass ``old_state_abstract`` with shardings to control this). The result has
  ``new_state_init``'s structure and shardings.

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
    strict: raise if anything is left behind or missing; see :func:`~jaxsurgery.remap_state`.
    return_report: also return the :class:`~jaxsurgery.StateReport`.

  Returns:
    The new state, or ``(new_state, report)``.

  Raises:
    SurgeryError: the checkpoint does not fit the old model (e.g. another
      model's checkpoint); the message names the paths and shapes.
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
    old_state_abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), jax.dtypes.canonicalize_dtype(m.dtype)),
        _tree(src.metadata()), is_leaf=_is_meta)
  abstract = _old_shardings(old_state_abstract, new_state_init, rename)
  try:
    old_state = src.restore(abstract)
  except (ValueError, KeyError, TypeError) as e:
    hint = ("Leave old_state_abstract=None to read the old tree from the checkpoint metadata." if given else
            "Was the item written with StandardCheckpointer / PyTreeCheckpointer (StandardSave / PyTreeSave)?")
    raise SurgeryError(f"Could not restore {src.path!r}: {e}\n  {hint}") from e
  return remap_state(surgery, old_state, new_state_init, rename=rename, prefixes=prefixes, strict=strict,
                     return_report=return_report)


__all__ = ["restore", "old_abstract"]
