"""Remap whole training states (optimizer moments, EMA params, step counts, rng keys) with a surgery.

A :class:`~jaxsurgery.Surgery` maps parameter trees. A training state holds
several *param-shaped subtrees*: the params themselves, optax's ``mu`` and
``nu``, an EMA copy, the inner states of ``optax.masked`` (where masked-out
leaves are missing) or ``optax.multi_transform`` (a subset of the params per
label). :func:`remap_state` finds them by path, without knowing the container
types: a leaf of ``new_state_init`` whose path (``keystr``, the format the
tables use) is ``prefix + p``, where ``p`` is a parameter path of the new table
and the leaf has that parameter's shape (and a compatible dtype), belongs to the
subtree at ``prefix``. Every such leaf is computed with the parameter's leaf
plan from the old state's leaf at ``old prefix + old parameter path``. All other
leaves (step counts, hyperparameters, rng keys...) are copied from the old state
when it has a leaf at the same path with the same shape and dtype, and otherwise
taken from ``new_state_init``. The accounting (:class:`StateReport`) lists every
new leaf's source and every old leaf that was left behind.

A table root is understood as well: when a table's paths start with a
collection name (Linen's ``params/Dense_0/kernel``), a subtree that holds the
paths below it (``opt_state/0/mu/Dense_0/kernel``) is matched with that root
stripped.

This module is generic: it imports neither flax nor orbax.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurgery._src import display
from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import SurgeryError
from jaxsurgery._src.optim import moments
from jaxsurgery._src.surgery.remap import apply_leaf, program_groups, shard_bytes, sharded_call

if TYPE_CHECKING:
  from jaxsurgery._src.surgery.plan import LeafPlan


# -- the report -------------------------------------------------------------------------

#: The kinds of :class:`StateLeaf`.
LeafKind = Literal["remapped", "fresh", "missing", "reset", "copied", "init"]
REMAPPED: Final = "remapped"  # param-shaped leaf computed by the plan from an old leaf
FRESH: Final = "fresh"        # param-shaped leaf of a parameter the old model did not have: init (zeroed where planned)
MISSING: Final = "missing"    # param-shaped leaf whose old source is absent from the old state: init
RESET: Final = "reset"        # leaf under a param path but of another shape (e.g. factored moments): init
COPIED: Final = "copied"      # other leaf, copied from the old state (same path, shape, dtype)
INIT: Final = "init"          # other leaf, taken from new_state_init


@dataclasses.dataclass(frozen=True)
class StateLeaf:
  """Where one leaf of the new state comes from.

  Attributes:
    path: the leaf's path in the new state.
    kind: ``"remapped"``, ``"fresh"``, ``"missing"``, ``"reset"``, ``"copied"`` or ``"init"``.
    old_path: the old state's leaf it is computed or copied from (``None`` if none).
    param: the new table's parameter path it is an image of (param-shaped leaves only).
    prefix: the param-shaped subtree it belongs to (``None`` for other leaves).
    why: a short explanation for leaves taken from ``new_state_init``.
  """

  path: str
  kind: LeafKind
  old_path: str | None = None
  param: str | None = None
  prefix: str | None = None
  why: str = ""


@dataclasses.dataclass(frozen=True)
class Subtree:
  """A param-shaped subtree of the new state.

  Attributes:
    prefix: its path prefix in the new state (``"opt_state/0/mu/"``; ``""`` for the params).
    old_prefix: the prefix its sources were looked up under in the old state.
    root: the table root stripped from the parameter paths (``""`` or e.g. ``"params/"``).
    counts: number of leaves per kind (``remapped``, ``fresh``, ``missing``).
    elements: element counts summed over the remapped leaves' plans (``copied``,
      ``moved``, ``fresh``, ``zeroed``, ``dropped``).
    role: what it holds, which decides its operator: ``"param"`` (params, EMA
      params: the leaf plans), ``"grad"`` / ``"grad_sq"`` (first / second
      moments), ``"counts"`` / ``"ages"`` (per-element counts).
  """

  prefix: str
  old_prefix: str
  root: str
  counts: Mapping[str, int]
  elements: Mapping[str, int]
  role: str = "param"

  @property
  def size(self) -> int:
    """Number of param-shaped leaves in the subtree."""
    return sum(self.counts.values())


@dataclasses.dataclass(frozen=True)
class StateReport:
  """The accounting of :func:`remap_state`: every new leaf's source, every old leaf left behind.

  Attributes:
    leaves: one :class:`StateLeaf` per leaf of the new state, in flattening order.
    subtrees: the param-shaped subtrees found, as :class:`Subtree`.
    left_behind: ``(old path, shape, dtype, why)`` for every old leaf that was
      neither a source of a remapped leaf nor copied.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxsurgery as js
    >>> fn = lambda p, x: x @ p["w"]
    >>> old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.zeros((3, 3))}
    >>> table = lambda p, names: js.dependency_table(fn, p, jnp.ones((1, len(names))), js.Features(names))
    >>> surgery = js.plan(table(old_p, ["a", "b"]), table(new_init, ["a", "c", "b"]))
    >>> old_state = {"params": old_p, "ema": old_p, "step": 7, "seed": 1}
    >>> _, report = js.remap_state(surgery, old_state, {"params": new_init, "ema": new_init, "step": 0},
    ...                            return_report=True)
    >>> print(report)
    StateReport: 3 leaves -- 2 remapped, 0 fresh params, 1 copied, 0 from new init; 1 old leaves left behind
    ...
      left behind in the old state:
        seed () int32: no leaf at this path in the new state
  """

  leaves: tuple[StateLeaf, ...]
  subtrees: tuple[Subtree, ...]
  left_behind: tuple[tuple[str, tuple[int, ...], str, str], ...]

  def of_kind(self, *kinds: LeafKind) -> tuple[StateLeaf, ...]:
    """The leaves of these kinds (``"remapped"``, ``"copied"``...)."""
    return tuple(l for l in self.leaves if l.kind in kinds)

  @property
  def params(self) -> dict[str, int]:
    """``{prefix: number of param-shaped leaves}`` of the subtrees mapped as params."""
    return {s.prefix: s.size for s in self.subtrees}

  @property
  def copied(self) -> dict[str, str]:
    """``{new path: old path}`` of the other leaves copied from the old state."""
    return {l.path: l.old_path for l in self.leaves if l.kind == COPIED and l.old_path is not None}

  @property
  def from_init(self) -> dict[str, str]:
    """``{new path: why}`` of every leaf taken (entirely) from ``new_state_init``."""
    return {l.path: l.why for l in self.leaves if l.kind in (MISSING, RESET, INIT)}

  def totals(self) -> dict[str, int]:
    """Number of new leaves per kind, and ``left_behind`` (old leaves)."""
    out = {k: 0 for k in (REMAPPED, FRESH, MISSING, RESET, COPIED, INIT)}
    for l in self.leaves:
      out[l.kind] += 1
    out["left_behind"] = len(self.left_behind)
    return out

  def __repr__(self) -> str:
    t = self.totals()
    lines = [f"StateReport: {len(self.leaves)} leaves -- {t[REMAPPED]} remapped, {t[FRESH]} fresh params, "
             f"{t[COPIED]} copied, {t[MISSING] + t[RESET] + t[INIT]} from new init; "
             f"{t['left_behind']} old leaves left behind"]
    if self.subtrees:
      lines.append("  param-shaped subtrees (remapped with the plan):")
      rows = []
      for s in self.subtrees:
        c, e = s.counts, s.elements
        src = s.old_prefix if s.old_prefix == s.prefix else f"<- {s.old_prefix or '<root>'}"
        rows.append([s.prefix or "<root>", s.role, str(s.size), str(c[REMAPPED]), str(c[FRESH]), str(c[MISSING]),
                     f"{e['copied'] + e['moved']:,}", f"{e['fresh']:,} ({e['zeroed']:,})",
                     s.root or "-", "" if s.old_prefix == s.prefix else src])
      table = display.columns(rows, ["prefix", "role", "leaves", "remapped", "fresh", "missing",
                                     "elements kept", "fresh (zeroed)", "root", "old prefix"])
      lines += ["  " + line for line in table.split("\n")]
    copied = [l for l in self.leaves if l.kind == COPIED]
    if copied:
      lines.append("  copied from the old state: " + _list(
          [l.path if l.old_path == l.path else f"{l.path} <- {l.old_path}" for l in copied]))
    init = [l for l in self.leaves if l.kind in (MISSING, RESET, INIT)]
    if init:
      lines.append("  taken from the new init:")
      lines += [f"    {l.path or '<root>'}: {l.why}" for l in init[:20]]
      if len(init) > 20:
        lines.append(f"    ... +{len(init) - 20} more (see report.from_init)")
    if self.left_behind:
      lines.append("  left behind in the old state:")
      lines += [f"    {p or '<root>'} {display.fmt_shape(s)} {d}: {why}" for p, s, d, why in self.left_behind[:20]]
      if len(self.left_behind) > 20:
        lines.append(f"    ... +{len(self.left_behind) - 20} more (see report.left_behind)")
    else:
      lines.append("  left behind in the old state: nothing")
    return "\n".join(lines)


def _list(items, limit=12) -> str:
  if len(items) > limit:
    items = list(items[:limit]) + [f"... +{len(items) - limit}"]
  return ", ".join(i or "<root>" for i in items)


# -- paths ------------------------------------------------------------------------------

def _split(path: str) -> list[str]:
  return path.split("/") if path else []


def _join(parts) -> str:
  return "/".join(parts)


def _prefix_str(parts) -> str:
  return _join(parts) + "/" if parts else ""


def _norm_prefix(p: str) -> str:
  p = p.strip("/")
  return p + "/" if p else ""


class PathRenamer:
  """Maps new state paths to old ones (``rename={old prefix: new prefix}``), on path components.

  Example:
    >>> PathRenamer({"opt_state": "opt_state/1"}).to_old("opt_state/1/mu/w")
    'opt_state/mu/w'
  """

  def __init__(self, rename: Mapping[str, str] | None):
    pairs = [(_split(o.strip("/")), _split(n.strip("/"))) for o, n in (rename or {}).items()]
    self.pairs = sorted(pairs, key=lambda on: -len(on[1]))

  def to_old(self, new_path: str) -> str:
    parts = _split(new_path)
    for o, n in self.pairs:
      if parts[:len(n)] == n:
        return _join(o + parts[len(n):])
    return new_path

  def prefix_to_old(self, new_prefix: str) -> str:
    parts = _split(new_prefix.rstrip("/"))
    for o, n in self.pairs:
      if parts[:len(n)] == n:
        return _prefix_str(o + parts[len(n):])
    return new_prefix


# -- leaves -----------------------------------------------------------------------------

_SCALARS = (bool, int, float, complex, np.generic)


def _shape_dtype(x):
  """(shape, dtype) of an array-like leaf, or None for opaque leaves (strings, objects)."""
  if isinstance(x, _SCALARS):
    return (), jax.dtypes.canonicalize_dtype(x.dtype if isinstance(x, np.generic) else np.result_type(type(x)))
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or dtype is None:
    return None
  # Values entering JAX are canonicalised (a restored int64 step is an int32 under x64=False).
  return tuple(int(s) for s in shape), (dtype if _is_key(dtype) else jax.dtypes.canonicalize_dtype(dtype))


def _is_key(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _param_compatible(dtype, param_dtype) -> bool:
  """A state leaf can hold an image of a parameter: same dtype, or both inexact (bf16 moments...)."""
  if dtype == param_dtype:
    return True
  if _is_key(dtype) or _is_key(param_dtype):
    return False
  return jnp.issubdtype(dtype, jnp.inexact) and jnp.issubdtype(param_dtype, jnp.inexact)


def _copy_conversion(old_sd, new_sd, new_leaf) -> str | None:
  """How an old leaf can be copied into a new leaf: ``"same"``, ``"wrap_key"`` or None."""
  (os_, od), (ns, nd) = old_sd, new_sd
  if os_ == ns and od == nd:
    return "same"
  if _is_key(nd) and not _is_key(od) and jnp.issubdtype(od, jnp.unsignedinteger):
    data_shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(ns, nd)).shape
    if os_ == tuple(data_shape):
      return "wrap_key"
  return None


def _is_raw_key(sd, key_shape, key_dtype) -> bool:
  """``sd`` is the raw ``uint32`` data of typed keys of this shape and dtype (how checkpoint metadata shows keys)."""
  if not _is_key(key_dtype) or _is_key(sd[1]) or not jnp.issubdtype(sd[1], jnp.unsignedinteger):
    return False
  data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(tuple(key_shape), key_dtype))
  return sd[0] == tuple(data.shape)


def _describe(sd) -> str:
  return "opaque" if sd is None else f"{display.fmt_shape(sd[0])} {sd[1]}"


# -- the state plan ---------------------------------------------------------------------

#: Where a computed leaf's old input comes from.
Source = Literal["leaf", "scalar", "none", "warm"]


@dataclasses.dataclass(frozen=True)
class _Step:
  """One computed output leaf: ``plan`` (a leaf plan applied to an old leaf, or to none) or ``copy``.

  ``source`` says what the old input is: ``"leaf"`` (the old leaf at ``old_index``),
  ``"scalar"`` (an old scalar count broadcast to every old element), ``"none"``
  (a fresh parameter) or ``"warm"`` (ages with no old source: old elements keep
  the new init's value, fresh ones become 0). ``fold`` lists, for a param leaf
  with folded constant features, the old leaves of its subtree in the old
  table's order (indices into the old state, ``None`` where absent).
  """
  new_index: int
  op: str                    # "plan" | "copy"
  param: str | None          # new table path (plan)
  old_index: int | None
  conversion: str = "same"   # for copies: "same" | "wrap_key"
  role: moments.Role = moments.PARAM
  source: Source = "leaf"
  fold: tuple[int | None, ...] | None = None


class _TableIndex:
  """Table paths by suffix, for the root "" and for each first path component (collection)."""

  def __init__(self, table):
    self.table = table
    self.full = {p: p for p in table.paths}
    self.roots: dict[str, dict[str, str]] = {}
    for p in table.paths:
      head, sep, rest = p.partition("/")
      if sep and rest:
        self.roots.setdefault(head + "/", {})[rest] = p

  def candidates(self, suffix: str):
    if suffix in self.full:
      yield "", self.full[suffix]
    for root, sub in self.roots.items():
      if suffix in sub:
        yield root, sub[suffix]


def _role_compatible(dtype, param_dtype, role: str) -> bool:
  if role in moments.INTEGER_ROLES:
    return not _is_key(dtype) and jnp.issubdtype(dtype, jnp.integer)
  return _param_compatible(dtype, param_dtype)


def _match_param(index: _TableIndex, path: str, sd, prefixes, role_of):
  """Classifies a state leaf by the longest path suffix that names a parameter of the table.

  Returns ``("param", prefix, root, table path)`` when the leaf has that
  parameter's shape and a dtype its subtree's role allows (the parameter's, or
  any float for moments, any integer for counts), ``("reset", prefix, root,
  table path)`` when it only has its name (factored statistics...), or None.
  """
  parts = _split(path)
  for k in range(len(parts)):
    prefix = _prefix_str(parts[:k])
    if prefixes is not None and prefix not in prefixes:
      continue
    named = list(index.candidates(_join(parts[k:])))
    if not named:
      continue
    role = role_of(prefix)
    found = [(r, p) for r, p in named if sd is not None and sd[0] == index.table.shapes[p]
             and _role_compatible(sd[1], index.table.dtypes[p], role)]
    if not found:
      return ("reset", prefix) + named[0]
    if any(r == "" for r, _ in found):
      return ("param", prefix) + next((r, p) for r, p in found if r == "")
    if len(found) > 1:
      raise SurgeryError(
          f"State leaf {path!r} matches several parameters of the new table under different roots: "
          f"{[p for _, p in found]}. Pass `prefixes=[...]` to say which state prefixes hold params, "
          f"or build the table over one collection.")
    return ("param", prefix) + found[0]
  return None


def _dropped_param(path: str, dropped: set[str]) -> str | None:
  """The dropped old parameter that ``path`` is an image of (suffix match, table root allowed)."""
  parts = _split(path)
  for k in range(len(parts)):
    suffix = _join(parts[k:])
    for d in dropped:
      if d == suffix or d.partition("/")[2] == suffix:
        return d
  return None


def _roles(roles: Mapping[str, str] | None) -> Callable[[str], moments.Role]:
  """``role_of(prefix)``: the user's ``roles`` first, then the subtree's field name."""
  given: dict[str, moments.Role] = {}
  for p, r in (roles or {}).items():
    if r not in moments.ROLES:
      raise ValueError(f"`roles` maps {p!r} to {r!r}; a role is one of {list(moments.ROLES)}.")
    given[_norm_prefix(p)] = r
  return lambda prefix: given.get(prefix) or moments.role_of_prefix(prefix)


@dataclasses.dataclass
class StatePlan:
  """What :func:`remap_state` computes, planned before any old value is read.

  Built by :func:`plan_state` from an old state whose leaves may be abstract
  (``jax.ShapeDtypeStruct``, e.g. read from checkpoint metadata); run with
  :func:`run_state_plan` on the old leaves (all at once, or a few at a time).

  Attributes:
    steps: the computed leaves.
    treedef: the new state's treedef.
    new_leaves: the leaves of ``new_state_init``.
    old_paths: the old state's leaf paths.
    old_leaves: the old state's leaves as given (possibly abstract).
    report: the :class:`StateReport`.
  """
  surgery: Any
  steps: list[_Step]
  treedef: Any
  new_leaves: list[Any]
  old_paths: list[str]
  old_leaves: list[Any]
  report: StateReport

  def strict_problems(self) -> list[str]:
    """What ``strict=True`` refuses: leaves missing or reset, old leaves left behind."""
    problems = [f"  new {l.path!r}: {l.kind}: {l.why}" for l in self.report.leaves if l.kind in (MISSING, RESET)]
    problems += [f"  old {p!r} {s} {d} left behind: {why}" for p, s, d, why in self.report.left_behind]
    return problems


class _Planner:
  """Builds a :class:`StatePlan`: one pass over the new state's leaves."""

  def __init__(self, surgery, old_state, new_state_init, rename, prefixes, roles):
    new_flat, self.treedef = jax.tree_util.tree_flatten_with_path(new_state_init)
    old_flat, _ = jax.tree_util.tree_flatten_with_path(old_state)
    self.surgery = surgery
    self.new_paths = [feats.keystr(p) for p, _ in new_flat]
    self.old_paths = [feats.keystr(p) for p, _ in old_flat]
    self.new_leaves = [x for _, x in new_flat]
    self.old_leaves = [x for _, x in old_flat]
    self.old_at = {p: i for i, p in enumerate(self.old_paths)}
    self.old_sd = [_shape_dtype(x) for x in self.old_leaves]
    self.renamer = PathRenamer(rename)
    self.prefixes = None if prefixes is None else {_norm_prefix(p) for p in prefixes}
    self.role_of = _roles(roles)
    self.index = _TableIndex(surgery.new_table)
    self.plans: Mapping[str, LeafPlan] = surgery.leaf_plans
    self.entries: list[StateLeaf] = []
    self.steps: list[_Step] = []
    self.used_old: set[int] = set()
    self.errors: list[str] = []
    self.why_old: dict[int, str] = {}
    self.groups: dict[tuple[str, str], dict] = {}

  def run(self) -> StatePlan:
    self._check_new_init()
    for i, (path, x) in enumerate(zip(self.new_paths, self.new_leaves)):
      sd = _shape_dtype(x)
      match = _match_param(self.index, path, sd, self.prefixes, self.role_of)
      if match is not None and match[0] == "param":
        self._param_leaf(i, path, *match[1:])
      elif match is not None:
        self._reset_leaf(i, path, x, sd, *match[1:])
      else:
        self._other_leaf(i, path, x, sd)
    self._check()
    left = _left_behind(self.surgery, self.old_paths, self.old_leaves, self.old_sd, self.used_old, self.why_old)
    subtrees = tuple(Subtree(prefix, g["old_prefix"], root, dict(g["counts"]), dict(g["elements"]), g["role"])
                     for (prefix, root), g in self.groups.items())
    report = StateReport(tuple(self.entries), subtrees, tuple(left))
    return StatePlan(self.surgery, self.steps, self.treedef, self.new_leaves, self.old_paths, self.old_leaves,
                     report)

  def _check_new_init(self):
    abstract = [p for p, x in zip(self.new_paths, self.new_leaves) if isinstance(x, jax.ShapeDtypeStruct)]
    if abstract:
      raise SurgeryError(
          f"`new_state_init` holds abstract leaves (ShapeDtypeStruct) at {abstract[:5]}"
          f"{' ...' if len(abstract) > 5 else ''}: fresh elements take new_state_init's values, so it must "
          f"hold arrays. Build it with the new model's init (for a large model, jax.jit(init, out_shardings=...)).")

  def _group(self, prefix: str, root: str) -> dict:
    return self.groups.setdefault((prefix, root), dict(
        old_prefix=self.renamer.prefix_to_old(prefix), role=self.role_of(prefix),
        counts={REMAPPED: 0, FRESH: 0, MISSING: 0}, elements={k: 0 for k in _ELEMENTS}))

  def _param_leaf(self, i: int, path: str, prefix: str, root: str, param: str):
    g = self._group(prefix, root)
    role, leaf = g["role"], self.plans[param]
    if leaf.old_path is None:
      self.steps.append(_Step(i, "plan", param, None, role=role, source="none"))
      self.entries.append(StateLeaf(path, FRESH, None, param, prefix, "a parameter the old model does not have"))
      g["counts"][FRESH] += 1
      return
    if root and not leaf.old_path.startswith(root):
      self.errors.append(f"  {path!r}: the plan takes parameter {param!r} from the old model's {leaf.old_path!r}, "
                         f"which is not under the root {root!r}; build both tables over the same collections.")
      return
    old_path = g["old_prefix"] + leaf.old_path[len(root):]
    j = self.old_at.get(old_path)
    if j is None:
      self._missing_leaf(i, path, prefix, param, g, old_path)
      return
    if not self._fits_old(j, old_path, leaf, path, role):
      return
    self.used_old.add(j)
    self.steps.append(_Step(i, "plan", param, j, role=role, fold=self._fold_sources(leaf, g, root, role)))
    self.entries.append(StateLeaf(path, REMAPPED, old_path, param, prefix))
    self._count(g, leaf)

  @staticmethod
  def _count(g: dict, leaf: LeafPlan):
    g["counts"][REMAPPED] += 1
    for k in g["elements"]:
      g["elements"][k] += leaf.counts.get(k, 0)

  def _fits_old(self, j: int, old_path: str, leaf: LeafPlan, path: str, role: str) -> bool:
    want_dtype = self.surgery.old_table.dtypes.get(leaf.old_path)
    got = self.old_sd[j]
    if got is not None and want_dtype is not None and _is_raw_key(got, leaf.old_shape, want_dtype):
      return True   # a key saved as its raw data (checkpoint metadata): wrapped when computed
    if got is None or got[0] != leaf.old_shape or (want_dtype is not None
                                                    and not _role_compatible(got[1], want_dtype, role)):
      what = "per-element counts" if role in moments.INTEGER_ROLES else "an image"
      self.errors.append(f"  old state {old_path!r} is {_describe(got)}, but it should be {what} of the old "
                         f"model's {leaf.old_path!r} {_describe((leaf.old_shape, want_dtype))} (for new {path!r})")
      return False
    return True

  def _fold_sources(self, leaf: LeafPlan, g: dict, root: str, role: str) -> tuple[int | None, ...] | None:
    """The old subtree's leaves in the old table's order, for a param leaf that folds constant features."""
    if role != moments.PARAM or not getattr(leaf, "fold", ()):
      return None
    out: list[int | None] = []
    for p in self.surgery.old_table.paths:
      if root and not p.startswith(root):
        out.append(None)
        continue
      j = self.old_at.get(g["old_prefix"] + p[len(root):])
      if j is not None:
        self.used_old.add(j)
      out.append(j)
    return tuple(out)

  def _missing_leaf(self, i: int, path: str, prefix: str, param: str, g: dict, old_path: str):
    """A param-shaped leaf with no old leaf: per-element counts from an old scalar count, warm ages, or init."""
    role = g["role"]
    if role == moments.COUNTS:
      j = self._scalar_count(g["old_prefix"])
      if j is not None:
        self.used_old.add(j)
        self.steps.append(_Step(i, "plan", param, j, role=role, source="scalar"))
        self.entries.append(StateLeaf(path, REMAPPED, self.old_paths[j], param, prefix,
                                      "per-element counts from the old state's scalar count (fresh elements 0)"))
        self._count(g, self.plans[param])
        return
    if role == moments.AGES:
      self.steps.append(_Step(i, "plan", param, None, role=role, source="warm"))
      self.entries.append(StateLeaf(path, REMAPPED, None, param, prefix,
                                    "no old ages: old elements get the new init's (not held), fresh ones 0"))
      self._count(g, self.plans[param])
      return
    why = f"no leaf {old_path!r} in the old state (old source of {param!r})"
    self.entries.append(StateLeaf(path, MISSING, None, param, prefix, why))
    g["counts"][MISSING] += 1

  def _scalar_count(self, old_prefix: str) -> int | None:
    """The old scalar integer ``count`` next to a per-element ``counts`` subtree (optax's Adam state)."""
    parent = _prefix_str(_split(old_prefix.rstrip("/"))[:-1])
    for p in (parent + "count", parent + "count/value"):
      j = self.old_at.get(p)
      sd = None if j is None else self.old_sd[j]
      if sd is not None and sd[0] == () and not _is_key(sd[1]) and jnp.issubdtype(sd[1], jnp.integer):
        return j
    return None

  def _reset_leaf(self, i: int, path: str, x, sd, prefix: str, root: str, param: str):
    """Under a param path, but not of the param's shape (factored moments...)."""
    old_path = self.renamer.to_old(path)
    j = self.old_at.get(old_path)
    leaf = self.plans[param]
    # the parameter is unchanged (same name, identity maps, nothing zeroed): its statistics still fit
    identity = leaf.old_path == param and leaf.zero is None and all(m is None for m in leaf.maps)
    if j is not None and identity and self.old_sd[j] is not None and sd is not None \
        and _copy_conversion(self.old_sd[j], sd, x) == "same":
      self.used_old.add(j)
      self.steps.append(_Step(i, "copy", None, j))
      self.entries.append(StateLeaf(path, COPIED, old_path, None, None))
      return
    table = self.surgery.new_table
    why = (f"under parameter path {param!r} but {_describe(sd)}, not the parameter's "
           f"{_describe((table.shapes[param], table.dtypes[param]))}; the plan cannot map it")
    self.entries.append(StateLeaf(path, RESET, None, param, None, why))
    if j is not None:
      self.why_old[j] = f"statistics of parameter {param!r} that the plan cannot map (new {path!r} reset)"

  def _other_leaf(self, i: int, path: str, x, sd):
    """Not param-shaped: copied by path when it fits."""
    old_path = self.renamer.to_old(path)
    j = self.old_at.get(old_path)
    if j is None:
      self.entries.append(StateLeaf(path, INIT, None, None, None, "not in the old state"))
      return
    if sd is None or self.old_sd[j] is None:
      self.entries.append(StateLeaf(path, INIT, None, None, None, "not an array; kept from the new init"))
      self.why_old[j] = "not an array; the new init's value is kept"
      return
    conv = _copy_conversion(self.old_sd[j], sd, x)
    if conv is None:
      self.entries.append(StateLeaf(path, INIT, None, None, None,
                                    f"old {old_path!r} is {_describe(self.old_sd[j])}, new is {_describe(sd)}"))
      self.why_old[j] = f"new {path!r} is {_describe(sd)}"
      return
    self.used_old.add(j)
    self.steps.append(_Step(i, "copy", None, j, conv))
    self.entries.append(StateLeaf(path, COPIED, old_path, None, None))

  def _check(self):
    if self.errors:
      more = f"\n  ... +{len(self.errors) - 20} more" if len(self.errors) > 20 else ""
      raise SurgeryError("The old state does not fit the old model the plan was built for:\n"
                         + "\n".join(self.errors[:20]) + more
                         + "\n  Check that the checkpoint is the old model's (the one given to dependency_table), "
                           "or map moved subtrees with `rename={old prefix: new prefix}`.")
    if not self.groups:
      raise SurgeryError(
          "No leaf of new_state_init has the path and shape of a parameter of the new table, so nothing would be "
          f"remapped. New table parameters: {list(self.surgery.new_table.paths)[:8]}; new state leaves: "
          f"{self.new_paths[:8]}. Build the table over the same params (NNX state paths end in '/value'; Linen "
          "variables start with 'params/'), or pass the state whose params the table was built from.")
    expected = sum(g["counts"][REMAPPED] + g["counts"][MISSING] for g in self.groups.values())
    if expected and not any(g["counts"][REMAPPED] for g in self.groups.values()):
      self._nothing_found()

  def _nothing_found(self):
    want = {}
    for l in self.entries:
      if l.kind == MISSING and l.param is not None and l.prefix not in want:
        leaf = self.plans[l.param]
        want[l.prefix] = (f"{_groups_old_path(self.groups, l, leaf)!r} {display.fmt_shape(leaf.old_shape)} "
                          f"(old {leaf.old_path!r}, for new {l.path!r})")
    raise SurgeryError(
        "The old state holds none of the old model's parameters where the plan expects them; e.g.\n    "
        + "\n    ".join(want.values())
        + f"\n  Old state leaves: {self.old_paths[:8]}{' ...' if len(self.old_paths) > 8 else ''}"
        "\n  Is it a checkpoint of another model? If its layout differs, map it with rename={old prefix: new prefix}.")


_ELEMENTS = ("copied", "moved", "fresh", "zeroed", "dropped")


def _groups_old_path(groups, entry: StateLeaf, leaf: LeafPlan) -> str:
  old_path = leaf.old_path or ""  # only called for leaves with an old source
  for (prefix, root), g in groups.items():
    if prefix == entry.prefix and old_path.startswith(root):
      return g["old_prefix"] + old_path[len(root):]
  return old_path


def _left_behind(surgery, old_paths, old_leaves, old_sd, used_old: set[int], why_old: dict[int, str]):
  """``(old path, shape, dtype, why)`` of every old leaf that is neither remapped from nor copied."""
  dropped = {p for p, _ in surgery.report.dropped_leaves}
  left = []
  for j, p in enumerate(old_paths):
    if j in used_old:
      continue
    sdj = old_sd[j]
    why = why_old.get(j)
    if why is None:
      why = "no leaf at this path in the new state"
      hit = _dropped_param(p, dropped)
      if hit is not None:
        why = f"image of old parameter {hit!r}, which the plan drops (no counterpart in the new model)"
    shape, dtype = (sdj if sdj is not None else ((), type(old_leaves[j]).__name__))
    left.append((p, shape, str(dtype), why))
  return left


def plan_state(surgery, old_state, new_state_init, *, rename: Mapping[str, str] | None = None,
               prefixes: Sequence[str] | None = None, roles: Mapping[str, str] | None = None) -> StatePlan:
  """Plans :func:`remap_state` without reading old values (the old leaves may be abstract).

  Args:
    surgery: the plan.
    old_state: the old state, or its abstract tree (``jax.ShapeDtypeStruct`` leaves).
    new_state_init: the new model's initialised state (arrays).
    rename: see :func:`remap_state`.
    prefixes: see :func:`remap_state`.
    roles: see :func:`remap_state`.

  Returns:
    A :class:`StatePlan` (``.report`` is the :class:`StateReport`).

  Raises:
    SurgeryError: the old state does not fit the old model; see :func:`remap_state`.
  """
  return _Planner(surgery, old_state, new_state_init, rename, prefixes, roles).run()


# -- applying ---------------------------------------------------------------------------

def _compute(plans, s: _Step, old, init, fold_leaves):
  """One output leaf, traced."""
  if old is not None and _is_key(init.dtype) and not _is_key(old.dtype):   # raw key data (a checkpoint)
    old = jax.random.wrap_key_data(jnp.asarray(old), impl=jax.random.key_impl(init))
  if s.op == "copy":
    return jnp.asarray(old).astype(init.dtype) if not _is_key(init.dtype) else old
  leaf = plans[s.param]
  if s.role == moments.PARAM:
    if fold_leaves is not None:
      return apply_leaf(leaf, old, init, fold_leaves)
    return apply_leaf(leaf, old, init)
  if s.source == "warm":
    return jnp.where(moments.fresh_mask(leaf), jnp.zeros((), init.dtype), init)
  return moments.apply_statistic(leaf, old, init, s.role, from_scalar=s.source == "scalar")


def _run_steps(plans, steps, olds, inits):
  return [_compute(plans, s, old, init, fold) for s, (old, fold), init in zip(steps, olds, inits)]


def _aliasable(plans, s: _Step, old, init) -> bool:
  """The output can be the old array itself: an unchanged leaf of the same dtype and sharding."""
  if s.old_index is None or s.source != "leaf" or not isinstance(old, jax.Array) or not isinstance(init, jax.Array):
    return False
  if old.shape != init.shape or old.dtype != init.dtype or old.sharding != init.sharding:
    return False
  if s.op == "copy":
    return s.conversion == "same"
  return s.fold is None and moments.is_identity(plans[s.param], s.role)


_COMPILED: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def run_state_plan(splan: StatePlan, old_leaves: Sequence[Any], steps: Sequence[_Step] | None = None, *,
                   alias: bool = False) -> dict[int, Any]:
  """Computes ``steps`` (default: all) of a state plan from the old leaves: ``{new leaf index: value}``.

  Eagerly, one jitted program per set of steps and shardings (cached per
  surgery), whose outputs get ``new_state_init``'s shardings; under an outer
  transformation, traced inline.

  Args:
    splan: from :func:`plan_state`.
    old_leaves: the old state's leaves, in the order of ``splan.old_paths``
      (only those the steps read need to be arrays).
    steps: the steps to run (e.g. those whose old leaves were just restored).
    alias: unchanged leaves may be returned as the old arrays themselves (no
      copy); only when the old state is not used afterwards.

  Returns:
    ``{index into the new state's leaves: value}``.
  """
  steps = splan.steps if steps is None else list(steps)
  plans, new_leaves = splan.surgery.leaf_plans, splan.new_leaves
  out: dict[int, Any] = {}

  def passes(s):  # a copy into a non-array leaf (a Python int step): no program needed
    return s.op == "copy" and not isinstance(new_leaves[s.new_index], (jax.Array, jax.core.Tracer))
  traced = []
  for s in steps:
    old = None if s.old_index is None else old_leaves[s.old_index]
    if passes(s) or (alias and _aliasable(plans, s, old, new_leaves[s.new_index])):
      out[s.new_index] = old
    else:
      traced.append(s)
  cache = _COMPILED.setdefault(splan.surgery, {})
  for group in _programs(plans, traced, old_leaves, new_leaves):
    olds = [(None if s.old_index is None else old_leaves[s.old_index],
             None if s.fold is None else [None if j is None else old_leaves[j] for j in s.fold]) for s in group]
    inits = [new_leaves[s.new_index] for s in group]
    steps_key = tuple(group)
    run = lambda o, i, steps_key=steps_key: _run_steps(plans, steps_key, o, i)
    results = sharded_call(cache, steps_key, run, (olds, inits), inits, list)
    out.update((s.new_index, r) for s, r in zip(group, results))
  return out


def _programs(plans, steps: list[_Step], old_leaves, new_leaves) -> list[list[_Step]]:
  """The steps split into programs of about one moving leaf (:func:`program_groups`).

  Under an outer transformation everything is one trace.
  """
  leaves = [new_leaves[s.new_index] for s in steps]
  if not steps or any(isinstance(x, jax.core.Tracer) for x in leaves) \
      or any(isinstance(old_leaves[j], jax.core.Tracer) for s in steps for j in step_reads(s)):
    return [steps] if steps else []
  weights = [0 if s.op == "copy" or (s.param is not None and s.fold is None
                                     and moments.is_identity(plans[s.param], s.role)) else shard_bytes(x)
             for s, x in zip(steps, leaves)]
  return [[steps[i] for i in g] for g in program_groups(weights)]


def assemble(splan: StatePlan, computed: Mapping[int, Any]):
  """The new state: computed leaves where given, ``new_state_init``'s elsewhere."""
  leaves = [computed.get(i, x) for i, x in enumerate(splan.new_leaves)]
  return jax.tree_util.tree_unflatten(splan.treedef, leaves)


def _check_concrete(splan: StatePlan) -> None:
  abstract_old = [splan.old_paths[j] for s in splan.steps for j in step_reads(s)
                  if isinstance(splan.old_leaves[j], jax.ShapeDtypeStruct)]
  if abstract_old:
    raise SurgeryError(f"old state leaves {abstract_old[:5]} are abstract (ShapeDtypeStruct); restore the "
                       f"checkpoint first (jaxsurgery.orbax.restore does both).")


def step_reads(s: _Step) -> list[int]:
  """The old leaves (indices into the old state's leaves) a step reads."""
  out = [] if s.old_index is None else [s.old_index]
  return out + [j for j in (s.fold or ()) if j is not None]


def remap_state(surgery, old_state, new_state_init, *, rename: Mapping[str, str] | None = None,
                prefixes: Sequence[str] | None = None, roles: Mapping[str, str] | None = None,
                strict: bool = False, return_report: bool = False):
  """Remaps a whole training state: params, optimizer moments, EMA params, counts, rng keys.

  Every *param-shaped subtree* of ``new_state_init`` (leaves whose path is a
  common prefix followed by a parameter path of the new table, with that
  parameter's shape: the params, optax ``mu``/``nu``, EMA params, the inner
  states of ``optax.masked`` and ``optax.multi_transform``, per-element counts)
  is computed from the old state's leaves at the same prefix and the old
  parameter paths, with the operator of its *role* (named by the subtree's
  field, see docs/integrations.md): the params (and EMA params) go through the
  leaf plans; first moments (``mu``, ``trace``) and second moments (``nu``)
  follow their parameter element and, under clone and scale recipes, are
  divided by ``s*n`` and ``(s*n)**2`` so that they equal what the grown model's
  gradients would have accumulated; per-element counts (``counts`` of
  :func:`jaxsurgery.optim.adam`, filled from an optax state's scalar count) and
  :func:`jaxsurgery.freeze_fresh` ages are carried along. Fresh elements keep
  ``new_state_init``'s values (the optimizer's zeros for moments) and get count
  0; zeroed elements become 0. Other leaves (step counts,
  ``inject_hyperparams`` values, rng keys) are copied from the old state when it
  has a leaf at the same path with the same shape and dtype (raw key data is
  wrapped into a typed key), else taken from ``new_state_init``. Nothing is
  dropped silently: the report lists every old leaf left behind.

  Pure and jittable; called eagerly it runs one jitted program and keeps the
  shardings of ``new_state_init``, like ``surgery(old_params, new_init)``.

  Args:
    surgery: a :class:`~jaxsurgery.Surgery` from :func:`~jaxsurgery.plan`.
    old_state: the trained old state (any pytree: a dict, a Linen ``TrainState``,
      an ``nnx.State``, or a tree restored from a checkpoint with dicts and lists
      in place of the containers; only the paths matter).
    new_state_init: the new model's freshly initialised state (arrays, not
      abstract shapes: fresh elements take its values). Its structure, dtypes
      and shardings are those of the result.
    rename: ``{old state prefix: new state prefix}`` for subtrees that moved
      (e.g. ``{"opt_state": "opt_state/1"}`` when ``tx = adam`` became
      ``chain(clip, adam)``; ``{"": "params"}`` when the old state is a bare param tree).
    prefixes: if given, only these prefixes of the new state hold param-shaped
      subtrees (``["params", "opt_state/0/mu", "opt_state/0/nu"]``); use it
      when another leaf happens to look like a parameter.
    roles: ``{new state prefix: role}`` for subtrees whose field name does not
      say what they hold; a role is ``"param"``, ``"grad"`` (linear in the
      gradients), ``"grad_sq"`` (quadratic), ``"counts"`` or ``"ages"``.
    strict: raise if any old leaf is left behind or any param-shaped leaf has
      no source in the old state (``missing``/``reset``).
    return_report: also return the :class:`StateReport`.

  Returns:
    The new state, shaped like ``new_state_init``; with ``return_report=True``
    a tuple ``(new_state, report)``.

  Raises:
    SurgeryError: the old state does not fit the old model (wrong shapes at the
      expected paths, or none of its parameters where expected), or no leaf of
      ``new_state_init`` looks like a parameter of the new table; with
      ``strict=True``, anything left behind or missing.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxsurgery as js
    >>> fn = lambda p, x: x @ p["w"]
    >>> old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.zeros((3, 3))}
    >>> old = js.dependency_table(fn, old_p, jnp.ones((1, 2)), js.Features(["a", "b"]))
    >>> new = js.dependency_table(fn, new_init, jnp.ones((1, 3)), js.Features(["a", "c", "b"]))
    >>> surgery = js.plan(old, new)
    >>> tx = optax.adam(1e-3)
    >>> old_state = {"params": old_p, "opt_state": tx.init(old_p), "step": 7}
    >>> new_state = {"params": new_init, "opt_state": tx.init(new_init), "step": 0}
    >>> state, report = js.remap_state(surgery, old_state, new_state, return_report=True)
    >>> state["step"], sorted(report.params)   # params, adam's mu and nu remapped; counts copied
    (7, ['opt_state/0/mu/', 'opt_state/0/nu/', 'params/'])
  """
  splan = plan_state(surgery, old_state, new_state_init, rename=rename, prefixes=prefixes, roles=roles)
  _check_concrete(splan)
  if strict:
    problems = splan.strict_problems()
    if problems:
      raise SurgeryError("strict=True: the state remap is incomplete:\n" + "\n".join(problems[:30])
                         + "\n  See remap_state(..., return_report=True) for the full accounting.")
  new_state = assemble(splan, run_state_plan(splan, splan.old_leaves))
  return (new_state, splan.report) if return_report else new_state
