"""Runs the relation pass over two tables' programs, in rounds, until its decisions settle."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import numpy as np

from . import contract, control, elementwise, index, reduce, views  # noqa: F401  (register the rules)
from . import maps as A
from .engine import Decisions, Pass, Scope
from .oldside import OldSide
from .pullback import pull_back, pull_mean, pull_scale
from .values import MEAN, NOVEL, ZERO, Rel, Site, none, same_coef

_MAX_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class OutputCheck:
  path: str
  ok: bool
  reason: str = ""
  approx: tuple = ()   # exact up to these notes (an epsilon that did not scale with the width)


@dataclasses.dataclass
class Relation:
  """What the relation pass found: parameter maps, decisions, and whether outputs are preserved."""

  maps: dict[int, list[np.ndarray]]     # new param index -> per axis old index per new index
  structure: dict[int, list[str]]       # how each axis was aligned
  decisions: Decisions
  outputs: list[OutputCheck]
  sites: list[Site]
  failures: list[Site]
  assumptions: list[str]
  rounds: int

  @property
  def preserved(self) -> bool:
    return all(o.ok for o in self.outputs)


def relate(old_table, new_table, pairs: Mapping[int, int], inputs: Sequence,
           defaults: Mapping[tuple[int, int], Callable] | None = None,
           output_maps: Sequence | None = None, widen: str = "auto") -> Relation:
  """Relates ``new_table``'s program to ``old_table``'s.

  Args:
    old_table: the old model's table (its jaxpr is the reference).
    new_table: the new model's table.
    pairs: new param index -> old param index (matched leaves).
    inputs: one :class:`~jaxsurgery._src.surgery.match.LeafMap` per new input leaf.
    defaults: ``(new param, axis) -> fn(free) -> src`` for axes nothing constrains.
    output_maps: per output leaf, per axis, a Fixed src array (named outputs) or None.
    widen: ``"auto"``, ``"zero"`` or ``"clone"`` (see :func:`jaxsurgery.plan`).
  """
  defaults = dict(defaults or {})
  fresh = [i not in pairs for i in range(len(new_table.paths))]
  A.POLICY[0] = A.tile_policy if widen == "clone" else A.prefix_policy
  try:
    return _relate(old_table, new_table, pairs, inputs, defaults, output_maps, widen, fresh)
  finally:
    A.POLICY[0] = A.prefix_policy


def _relate(old_table, new_table, pairs, inputs, defaults, output_maps, widen, fresh) -> Relation:
  presets: dict = {}
  run = lambda d: _settle(d, fresh, old_table, new_table, pairs, inputs, defaults, output_maps, widen, presets)
  for _ in range(4):  # named outputs can overrule defaults taken before the output was reached
    decisions, P, S, outs, checks, rounds = run(Decisions())
    more = {k: v for k, v in P.presets.items() if k not in presets}
    if not more:
      break
    presets.update(more)
  if all(c.ok or c.approx for c in checks):
    decisions, P, S, outs, checks, extra = _prune(decisions, run, new_table)
    rounds += extra
  maps, how = _param_maps(P, new_table, pairs)
  return Relation(maps, how, decisions, checks, list(P.sites.values()), list(dict.fromkeys(P.failures)),
                  sorted(P.assumptions), rounds)


def _settle(decisions, fresh, old_table, new_table, pairs, inputs, defaults, output_maps, widen, presets):
  """Rounds until the decisions stop changing: each round applies them from the start."""
  for r in range(_MAX_ROUNDS):  # noqa: B007  (r + 1 rounds are reported)
    P = Pass(decisions, fresh, allow_mean=widen == "auto")
    P.param_shapes = [new_table.shapes[p] for p in new_table.paths]
    P.param_uses = _param_uses(new_table.jaxpr.jaxpr, len(new_table.paths))
    P.pairs = dict(pairs)
    P.presets = {}
    outs, S = _round(P, old_table, new_table, pairs, inputs, defaults, presets)
    for o in outs:
      for item in (o.pending if o.related else ()):
        P.issue(item)
    pull_mean(P)
    pull_back(P)
    pull_scale(P)
    if P.new_decisions == decisions:
      break
    decisions = P.new_decisions
  return decisions, P, S, outs, _check_outputs(P, S, outs, old_table, new_table, output_maps), r + 1


def _prune(decisions: Decisions, run, new_table):
  """Drops zero decisions that later ones made unnecessary, largest first.

  Drops zero decisions that later ones made unnecessary, largest first, so that as many fresh elements as possible
  keep their init (a layer reading a zero-padded, normalised stream keeps its new rows).
  """
  best = run(decisions)
  rounds = 0
  forced = best[1].forcing
  items = [(p, a) for p, axes in decisions.zero_axes.items() for a in axes if (p, a) not in forced] + [
      (p, None) for p in decisions.zero_whole if p not in best[1].forcing_whole]
  size = lambda it: int(np.prod(new_table.shapes[new_table.paths[it[0]]], dtype=np.int64))
  for p, a in sorted(items, key=size, reverse=True):
    trial = best[0].copy()
    if a is None:
      trial.zero_whole.discard(p)
    else:
      trial.zero_axes[p].discard(a)
      if not trial.zero_axes[p]:
        del trial.zero_axes[p]
    got = run(trial)
    rounds += got[5]
    if got[0] == trial and all(c.ok or c.approx for c in got[4]):
      best = got
  return best[0], best[1], best[2], best[3], best[4], rounds


def _round(P: Pass, old_table, new_table, pairs, inputs, defaults, presets):
  old_j, new_j = old_table.jaxpr, new_table.jaxpr
  old_consts = {id(v): np.asarray(c) for v, c in zip(old_j.jaxpr.constvars, old_j.consts)
                if _arrayable(c)}
  S = Scope(P, new_j.jaxpr, OldSide(old_j.jaxpr, old_consts))
  for v, c in zip(new_j.jaxpr.constvars, new_j.consts):
    S.env[v] = Rel(tuple(v.aval.shape), v.aval.dtype, const=np.asarray(c)) if _arrayable(c) else \
        none(tuple(v.aval.shape), v.aval.dtype, NOVEL)
  args = [_param_rel(P, i, p, old_table, new_table, pairs, defaults, presets)
          for i, p in enumerate(new_table.paths)]
  n_old_params = len(old_table.paths)
  for leaf, im in zip(new_table.spec.leaves, inputs):
    args.append(_input_rel(P, leaf, im, old_j.jaxpr.invars, n_old_params, old_table))
  outs = S.run(args)
  return outs, S


def _arrayable(c) -> bool:
  try:
    np.asarray(c)
    return True
  except Exception:
    return False


def _param_rel(P: Pass, i: int, path: str, old_table, new_table, pairs, defaults, presets) -> Rel:
  shape, dtype = new_table.shapes[path], new_table.dtypes[path]
  origin = (i, tuple(range(len(shape))))
  if i not in pairs:
    if i in P.decisions.zero_whole:
      return dataclasses.replace(none(shape, dtype, ZERO, origin=origin), zeroed_by=frozenset({i}))
    return none(shape, dtype, NOVEL, origin=origin)
  j = pairs[i]
  old_shape = old_table.shapes[old_table.paths[j]]
  maps = []
  for a, (n, o) in enumerate(zip(shape, old_shape)):
    f = P.frees.get((i, a))
    if f is None:
      f = P.frees[(i, a)] = A.Free(n, o, defaults.get((i, a)), member=(i, a))
      if (i, a) in presets:  # an output name decided it in an earlier run
        A.unify(f, A.Fixed(presets[(i, a)], o, "outputs"))
    maps.append(f)
  zeroed = P.decisions.zero_axes.get(i, set())
  meaned = P.decisions.mean_axes.get(i, set())
  slab = tuple(MEAN if a in meaned else ZERO if a in zeroed else NOVEL for a in range(len(shape)))
  return Rel(shape, dtype, ref=old_table.jaxpr.jaxpr.invars[j], maps=tuple(maps),
             coef=P.decisions.scale.get(i, 1.0), slab=slab, origin=origin)


def _input_rel(P: Pass, leaf, im, old_invars, n_old_params, old_table) -> Rel:
  if im.old is None:
    return none(leaf.shape, leaf.dtype, NOVEL)
  old_leaf = old_table.spec.leaves[im.old]
  maps, slab = [], []
  for a, n in enumerate(leaf.shape):
    o = old_leaf.shape[a]
    src = im.maps[a]
    if src is None:
      maps.append(A.identity(n) if n == o else A.Fixed(A.prefix(n, o), o, "positional"))
      if n > o and im.grown_zero[a]:
        P.assumptions.add(f"input {leaf.path or '<root>'!r} grew along axis {a} ({o} -> {n}): its new "
                          f"positions are assumed zero")
      slab.append(ZERO if im.grown_zero[a] else NOVEL)
    else:
      foreign = im.foreign[a] if im.foreign else None
      maps.append(A.Fixed(src, o, im.labels[a], leaf=im.old, foreign=foreign))
      slab.append(NOVEL)
  missing = tuple((a, tuple((i, ("const", float(v))) for i, v in sorted(c.items())))
                  for a, c in enumerate(im.constants) if c) if im.constants else ()
  return Rel(leaf.shape, leaf.dtype, ref=old_invars[n_old_params + im.old], maps=tuple(maps),
             slab=tuple(slab), missing=missing)


def _check_outputs(P: Pass, S: Scope, outs, old_table, new_table, output_maps) -> list[OutputCheck]:
  old_outs = old_table.jaxpr.jaxpr.outvars
  checks = []
  if len(old_outs) != len(outs):
    return [OutputCheck(p, False, f"the old model has {len(old_outs)} outputs, the new one {len(outs)}")
            for p in new_table.output_paths]
  for k, (r, ov) in enumerate(zip(outs, old_outs)):
    path = new_table.output_paths[k]
    want = None if output_maps is None else output_maps[k]
    ok, why = _output_ok(P, S, r, ov, want)
    checks.append(OutputCheck(path, ok and not r.approx, why or "; ".join(r.approx), r.approx))
  return checks


def _output_ok(P, S, r: Rel, ov, want) -> tuple[bool, str]:
  if r.is_const:
    old = S.old.value(ov)
    ok = old is not None and np.shape(old) == np.shape(r.value()) and np.array_equal(old, r.value())
    return ok, "" if ok else "a constant output changed"
  if not r.related:
    return False, "the output has no counterpart in the old model (novel values reach it)"
  if want is not None:
    for a, m in enumerate(r.maps):
      if want[a] is not None:
        _bind_output(P, m, want[a])
  if r.broken is not None:
    return False, r.broken.describe()
  conditions = [item for item in r.pending if item[0] != "noise"]
  if conditions:
    return False, "; ".join(dict.fromkeys(next(x for x in item if isinstance(x, Site)).describe()
                                          for item in conditions))
  if not S.old.same(r.ref, ov):
    return False, "the output corresponds to another value of the old model"
  if not same_coef(r.coef, 1.0, 1e-5):
    return False, f"the output is the old one rescaled by {r.coef:.6g}"
  for a, m in enumerate(r.maps):
    if want is not None and want[a] is not None:
      _bind_output(P, m, want[a])
    src = A.resolve(m)
    n_old = A.find(m).n_old
    expect = A.prefix(len(src), n_old) if want is None or want[a] is None else want[a]
    if not np.array_equal(src, expect):
      return False, f"output axis {a}: positions moved ({_describe_moves(src, expect)})"
  return True, ""


def _bind_output(P, m, want) -> None:
  """A named output axis: its map is the names' map.

  A named output axis: its map is the names' map. If a default was taken for it earlier (a softmax over the axis
  resolved it), the parameters behind it are preset for the next run.
  """
  try:
    A.unify(m, A.Fixed(want, A.find(m).n_old, "outputs"))
    return
  except A.MapConflict:
    pass
  root = A.find(m)
  free = getattr(root, "free", None)
  if free is not None:
    for member in free.members:
      P.presets[member] = np.asarray(want)


def _describe_moves(src, expect) -> str:
  bad = np.nonzero(src != expect)[0]
  return f"{len(bad)} positions, first at {bad[:4].tolist()}"


def _param_maps(P: Pass, new_table, pairs):
  maps, how = {}, {}
  for i in pairs:
    shape = new_table.shapes[new_table.paths[i]]
    ms: list[np.ndarray | None] = []
    hs: list[str] = []
    for a in range(len(shape)):
      f = P.frees.get((i, a))
      if f is None:
        ms.append(None)
        hs.append("unused")
        continue
      hs.append(_how(f))
      ms.append(A.resolve(f))
    maps[i], how[i] = ms, hs
  return maps, how


def _how(m) -> str:
  """How an axis was aligned, in the report's words."""
  A.resolve(m)
  r = A.find(m)
  if isinstance(r, A.Cat):
    olds, news = [p.n_old for p in r.parts], [p.n_new for p in r.parts]
    if r.kind == "concat":
      feat = any(_is_features(p) for p in r.parts)
      return ("features in segments " if feat else "segments ") + _sizes(olds, "+") + " -> " + _sizes(news, "+")
    if len(set(olds)) == 1 and len(set(news)) == 1:
      return f"blockwise {len(olds)}x{olds[0]} -> {len(news)}x{news[0]}"
    return "blockwise " + _sizes(olds, "+") + " -> " + _sizes(news, "+")
  if isinstance(r, A.Kron):
    return ("blockwise " + _sizes([p.n_old for p in r.parts], "x") + " -> "
            + _sizes([p.n_new for p in r.parts], "x"))
  if isinstance(r, A.Fixed) and r.label == "outputs":
    return "outputs"
  if _is_features(r):
    return "features"
  src = A.resolve(r)
  if len(src) == r.n_old and np.array_equal(src, np.arange(len(src))):
    return "identity"
  if np.array_equal(src, A.prefix(len(src), r.n_old)):
    return "prefix"
  if r.n_old and len(src) % r.n_old == 0 and np.array_equal(src, np.arange(len(src)) % r.n_old):
    return f"clone x{len(src) // r.n_old}"
  return "positional"


def _sizes(xs, sep) -> str:
  return sep.join(str(x) for x in xs)


def _is_features(m) -> bool:
  r = A.find(m)
  return isinstance(r, A.Fixed) and (r.label.startswith("features") or r.leaf is not None)


_VIEW_PRIMS = frozenset({"transpose", "reshape", "broadcast_in_dim", "squeeze", "convert_element_type",
                         "copy", "copy_p", "slice", "rev"})


def _param_uses(jaxpr, n_params: int) -> dict[int, int]:
  """How many operations (past views) each parameter takes part in, across nested bodies."""
  from jaxsurgery._src import compat
  from jaxsurgery._src.rules.control_flow import CALLS
  uses: dict[int, int] = {}
  view_of = {id(v): i for i, v in enumerate(jaxpr.invars[:n_params])}

  def walk(j):
    for eqn in j.eqns:
      srcs = cast("set[int]", {view_of.get(id(v)) for v in eqn.invars if not isinstance(v, compat.Literal)} - {None})
      if not srcs:
        continue
      if eqn.primitive.name in _VIEW_PRIMS and len(srcs) == 1:
        view_of[id(eqn.outvars[0])] = next(iter(srcs))
        continue
      subs = []
      for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
          if isinstance(x, (compat.Jaxpr, compat.ClosedJaxpr)):
            subs.append(compat.open_jaxpr(x)[0])
      if subs and eqn.primitive.name in CALLS:
        for sub in subs:
          for v, inner in zip(eqn.invars, sub.invars):
            if not isinstance(v, compat.Literal) and id(v) in view_of:
              view_of[id(inner)] = view_of[id(v)]
          walk(sub)
        continue
      for s in srcs:
        uses[s] = uses.get(s, 0) + 1
  walk(jaxpr)
  return uses
