"""Orbax integration: restore an *old* checkpoint straight into the *new* model's state.

The old tree is read from the checkpoint's own metadata (or given), so the old
model never has to be built. orbax-checkpoint is imported lazily: it is not a
dependency of jaxsurgery.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxsurgery._src import features as feats
from jaxsurgery._src.plan import Surgery, SurgeryError
from jaxsurgery._src.state import _Renamer, remap_state


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # pragma: no cover - exercised only without orbax
    raise ImportError("jaxsurgery.orbax needs orbax-checkpoint: pip install orbax-checkpoint") from e
  return ocp


# -- locating the checkpoint ---------------------------------------------------------------

def _is_item_dir(path) -> bool:
  return os.path.exists(os.path.join(path, "_METADATA"))


def _step_dirs(path) -> list[int]:
  try:
    names = os.listdir(path)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n)))


class _Source:
  """One checkpointed item: read its metadata, restore it with given abstract leaves."""

  def __init__(self, source, step: int | None, item: str | None):
    ocp = _ocp()
    self.manager, self.path, self.item, self.step, self._own = None, None, item, step, False
    if isinstance(source, ocp.CheckpointManager):
      self.manager = source
    else:
      path = os.fspath(source)
      if step is None and _is_item_dir(path):
        self.path = path
      elif step is None and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        items = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
        self.path = os.path.join(path, self._pick(items, f"checkpoint {path!r}"))
      elif _step_dirs(path):
        self.manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
        self._own = True
      else:
        raise FileNotFoundError(
            f"No orbax checkpoint at {path!r}: expected a checkpoint directory (with _METADATA), a step "
            f"directory of a CheckpointManager, or a CheckpointManager root with numbered steps"
            f"{'' if step is None else f' (step {step} was requested)'}.")
    if self.manager is not None:
      steps = list(self.manager.all_steps())
      if self.step is None:
        self.step = self.manager.latest_step()
        if self.step is None:
          raise FileNotFoundError(f"The CheckpointManager at {str(self.manager.directory)!r} has no checkpoints.")
      elif self.step not in steps:
        raise FileNotFoundError(f"No step {self.step} in {str(self.manager.directory)!r}; steps: {steps}.")

  def _pick(self, items: Sequence[str], where: str) -> str:
    if self.item is not None:
      if self.item not in items:
        raise KeyError(f"{where} has no item {self.item!r}; items: {list(items)}.")
      return self.item
    if len(items) == 1:
      return items[0]
    raise KeyError(f"{where} holds several items {list(items)}; pass item=... to choose one.")

  def metadata(self):
    ocp = _ocp()
    if self.manager is None:
      md = ocp.StandardCheckpointer().metadata(self.path)
      return getattr(md, "item_metadata", md)
    md = self.manager.item_metadata(self.step)
    if isinstance(md, ocp.args.Composite) or (isinstance(md, Mapping) and not hasattr(md, "tree")
                                             and self._composite()):
      names = [k for k in md.keys() if md[k] is not None]
      self.item = self._pick(names, f"step {self.step} of {str(self.manager.directory)!r}")
      md = md[self.item]
    return md

  def _composite(self) -> bool:
    return bool(getattr(self.manager, "_item_names", None))

  def restore(self, abstract):
    ocp = _ocp()
    if self.manager is None:
      return ocp.StandardCheckpointer().restore(self.path, abstract)
    if self.item is not None:
      out = self.manager.restore(self.step, args=ocp.args.Composite(**{self.item: ocp.args.StandardRestore(abstract)}))
      return out[self.item]
    return self.manager.restore(self.step, args=ocp.args.StandardRestore(abstract))

  def close(self):
    if self._own:
      self.manager.close()


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
    >>> abstract = jso.old_abstract("/ckpt/old_run", step=1000)   # doctest: +SKIP
  """
  src = _Source(source, step, item)
  try:
    md = _tree(src.metadata())
  finally:
    src.close()
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), jax.dtypes.canonicalize_dtype(m.dtype), sharding=sharding),
      md, is_leaf=_is_meta)


def _old_shardings(abstract, new_state_init, rename):
  """Sharding per old leaf: the new leaf's when path and shape agree, else replicated on the new mesh."""
  new = {feats.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(new_state_init)[0]}
  default = None
  for x in new.values():
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
      default = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
      break
    if s is not None and default is None:
      default = jax.sharding.SingleDeviceSharding(next(iter(s.device_set)))
  default = default or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  to_new = _Renamer({n: o for o, n in (rename or {}).items()})  # old path -> new path

  def pick(path, leaf):
    if getattr(leaf, "sharding", None) is not None:
      return leaf
    x = new.get(to_new.to_old(feats.keystr(path)))
    s = getattr(x, "sharding", None)
    ok = s is not None and tuple(getattr(x, "shape", ())) == tuple(leaf.shape) and x.dtype == leaf.dtype
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
    rename, prefixes, strict: see :func:`~jaxsurgery.remap_state`.
    return_report: also return the :class:`~jaxsurgery.StateReport`.

  Returns:
    The new state, or ``(new_state, report)``.

  Raises:
    SurgeryError: the checkpoint does not fit the old model (e.g. another
      model's checkpoint); the message names the paths and shapes.
    FileNotFoundError: no checkpoint at ``source`` / ``step``.

  Example:
    >>> mngr = ocp.CheckpointManager("/ckpt/run")                            # doctest: +SKIP
    >>> new_state = jso.restore(surgery, mngr, new_train_state)             # latest step
    >>> state, report = jso.restore(surgery, "/ckpt/run", nnx.state(new_model), step=1000,
    ...                             return_report=True)
    >>> nnx.update(new_model, state)
  """
  src = _Source(source, step, item)
  try:
    if old_state_abstract is None:
      md = _tree(src.metadata())
      old_state_abstract = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), jax.dtypes.canonicalize_dtype(m.dtype)), md,
          is_leaf=_is_meta)
    elif src.manager is not None:
      src.metadata()  # resolves the item name of a multi-item checkpoint
    abstract = _old_shardings(old_state_abstract, new_state_init, rename)
    try:
      old_state = src.restore(abstract)
    except (ValueError, KeyError, TypeError) as e:
      where = src.path or f"step {src.step} of {str(src.manager.directory)!r}"
      raise SurgeryError(f"Could not restore {where} with the given old_state_abstract: {e}\n  Leave "
                         f"old_state_abstract=None to read the old tree from the checkpoint metadata.") from e
  finally:
    src.close()
  return remap_state(surgery, old_state, new_state_init, rename=rename, prefixes=prefixes, strict=strict,
                     return_report=return_report)


__all__ = ["restore", "old_abstract"]
