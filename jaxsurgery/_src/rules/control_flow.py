"""Higher-order primitives: calls, cond, while, scan, shard_map.

* jit / closed_call / custom_jvp_call / custom_vjp_call / remat / linear_call /
  eval_jaxpr: interpret the callee with the caller's values (masks, provenance
  and constants flow through unchanged).
* cond: ``out`` depends on the branch that runs and on the index. Union over the
  branches that can run, plus the index's mask on every output. Like
  ``select_n``, the index touches nothing: parameters first met inside a branch
  keep their own rows' touch sets. A statically known index runs only its
  branch (and keeps constants foldable).
* while / scan: the fixed point of the carry masks over *levels*. Level 0 is
  the exact initial carry (constants included, so first contacts at step 0 are
  recorded exactly); level ``k + 1`` is level ``k`` joined with the body's
  outputs on level ``k`` (so level ``k`` covers every step ``<= k``... and
  over-approximates step ``k``). Iteration stops at the first level whose body
  outputs add nothing (that level is *steady*: it stands for every later step),
  at the scan's length, and a level is widened to the union of everything that
  enters the loop after ``WIDEN_AFTER`` levels, so every loop terminates.
  - while: the predicate's mask joins every carry (it decides the trip count),
    and the body's operands are touched by it (selection, as in cond).
  - scan: iteration ``k`` reads ``xs`` of step ``k`` only, so a carry that grows
    step by step stays causal (a running sum is lower-triangular). A level that
    adds nothing is steady only once confirmed: its body is run again on the OR
    of ``xs`` over the steps ``>= k`` and must still add nothing; that run then
    stands for every later step. ``ys[s]`` is the output of iteration
    ``min(s, last)``. Reverse scans are the same with the time axis read
    backwards.
  - provenance: touches on a level's carry are carried to the level below and
    back through the body's outputs of the level below (the boolean transpose
    of one step), down to the initial carry; a steady level also feeds back
    into itself. Touches are propagated once per new bit, with a worklist.
* shard_map: the body sees the union of all shards (masks ORed over sharded
  axes), so collectives inside are identities or dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.values import Val, const_vals, join_pulls, out_val
from jaxsurgery._src.rules.common import all_words, same_mask
from jaxsurgery._src.rules.registry import register

if TYPE_CHECKING:  # the interpreter imports the rules
  from jaxsurgery._src.compat import Eqn
  from jaxsurgery._src.core.interpreter import Context

# Levels computed precisely before a loop's carry masks are widened.
WIDEN_AFTER = 64

# Call-like primitives (a sub-jaxpr evaluated in place), under every supported JAX
# version's name: "pjit" was renamed "jit" (0.7); remat is "checkpoint" or "remat2".
CALLS = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "remat",
         "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "xla_call",
         "named_call", "custom_jvp_call_jaxpr", "custom_vmap_call", "compute_on", "call",
         "remat_opt", "composite", "linear_call", "eval_jaxpr")


def call(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Interpret the callee in place: ``out = callee(*in)``."""
  jaxpr, consts = compat.sub_jaxpr(eqn.params, eqn.primitive.name)
  outs = ctx.run(jaxpr, const_vals(consts), invals)
  return [Val(tuple(o.aval.shape), o.aval.dtype, v.mask, v.pull, v.const) for o, v in zip(eqn.outvars, outs)]


def cond(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out = branches[index](*ops)``: union of the branches, plus the index's mask."""
  index, ops = invals[0], invals[1:]
  branches = eqn.params["branches"]
  known = index.concrete()
  if known is not None:
    i = int(np.clip(int(np.asarray(known)), 0, len(branches) - 1))
    branches = branches[i:i + 1]
  words = M.reduce_all(index.mask)
  # Like select_n, the index selects and touches nothing: a kernel first met inside a branch keeps
  # the touch sets of its own rows (the outputs still carry the index's mask).
  results = [ctx.run(b.jaxpr, const_vals(b.consts), ops) for b in branches]
  outs = []
  for k, o in enumerate(eqn.outvars):
    rank = len(o.aval.shape)
    mask = M.orr(*(M.lift(r[k].mask, rank) for r in results), M.uniform(words, rank))
    const = results[0][k].const if len(results) == 1 else None
    outs.append(Val(tuple(o.aval.shape), o.aval.dtype, mask,
                    join_pulls(*(r[k].pull for r in results)), const))
  return outs


# -- loops ----------------------------------------------------------------------

def _minus(t, acc):
  """Bits of ``t`` not in ``acc`` (``None`` if none)."""
  if t is None:
    return None
  new = t if acc is None else np.bitwise_and(t, np.bitwise_not(acc))
  return None if not new.any() else M.compress(new)


class Levels:
  """Provenance of a loop's carries across the levels of its fixed point.

  ``enter(k, i, t)`` records touch ``t`` on carry ``i`` of level ``k``. Level
  ``k > 0`` is level ``k - 1`` joined with ``outs[k - 1]`` (the body's carry
  outputs on level ``k - 1``), so a touch goes to level ``k - 1`` as is and
  through ``outs[k - 1][i].pull`` (which reaches level ``k - 1`` carries, body
  constants and ``xs``). Level 0 is the initial carry. The steady level also
  feeds its own outputs back. Each level remembers what it already propagated,
  so every bit travels once, and a worklist (highest level first) replaces
  recursion.
  """

  def __init__(self, init: Sequence[Val]):
    self.init = list(init)
    self.ranks = [v.ndim for v in init]
    self.outs: list[list[Val]] = []
    self.acc: list[list] = []
    self.pending: dict[int, dict[int, np.ndarray]] = {}
    self.steady: int | None = None
    self._draining = False

  def level(self, k: int, masks, consts=None, provenance: bool = True) -> list[Val]:
    while len(self.acc) <= k:
      self.acc.append([None] * len(self.init))
    vals = []
    for i, (v, m) in enumerate(zip(self.init, masks)):
      pull = (lambda t, i=i: self.enter(k, i, t)) if provenance else None
      vals.append(Val(v.shape, v.dtype, m, pull, None if consts is None else consts[i]))
    return vals

  def enter(self, k: int, i: int, t) -> None:
    if M.is_empty(t):
      return
    t = M.lift(t, self.ranks[i])
    p = self.pending.setdefault(k, {})
    p[i] = t if p.get(i) is None else np.bitwise_or(p[i], t)
    if not self._draining:
      self._drain()

  def close(self, k: int) -> None:
    """Makes level ``k`` steady: its body outputs feed back into it."""
    self.steady = k
    self._draining = True
    try:
      for i, o in enumerate(self.outs[k]):
        if o.pull is not None and self.acc[k][i] is not None:
          o.pull(self.acc[k][i])
    finally:
      self._draining = False
    self._drain()

  def _drain(self) -> None:
    self._draining = True
    try:
      while self.pending:
        k = max(self.pending)
        touches = self.pending.pop(k)
        for i, t in touches.items():
          new = _minus(t, self.acc[k][i])
          if new is None:
            continue
          old = self.acc[k][i]
          self.acc[k][i] = new if old is None else M.compress(np.bitwise_or(old, new))
          if k == 0:
            init_pull = self.init[i].pull
            if init_pull is not None:
              init_pull(new)
          else:
            below = self.pending.setdefault(k - 1, {})
            below[i] = new if below.get(i) is None else np.bitwise_or(below[i], new)
            o = self.outs[k - 1][i]
            if o.pull is not None:
              o.pull(new)
          if self.steady == k:
            o = self.outs[k][i]
            if o.pull is not None:
              o.pull(new)
    finally:
      self._draining = False


def _iterate(ctx, eqn, init: Sequence[Val], step: Callable, *, length: int | None,
             entering: Sequence[Val], confirm: Callable | None = None):
  """Runs ``step(k, carry) -> (carry_outs, extra_words)`` over levels until steady.

  ``confirm(k, carry)``, when given, reruns a level that added nothing as it reads
  for every later step; the level is steady only if that run adds nothing too.
  Returns ``(final carry Vals, number of levels)``.
  """
  provenance = any(v.pull is not None for v in list(init) + list(entering))
  levels = Levels(init)
  cur = levels.level(0, [M.lift(v.mask, v.ndim) for v in init], [v.const for v in init], provenance)
  k = 0
  while True:
    outs, extra = step(k, cur)
    masks = _joined(cur, outs, extra)
    folded = any(c.const is not None for c in cur)
    steady = not folded and all(same_mask(c.mask, m) for c, m in zip(cur, masks))
    if steady and confirm is not None:
      later, later_extra = confirm(k, cur)
      if all(same_mask(c.mask, m) for c, m in zip(cur, _joined(cur, later, later_extra))):
        outs = later
      else:  # later steps add something: go on step by step
        steady = False
    levels.outs.append(list(outs))
    if steady:
      if provenance:
        levels.close(k)
      return cur, k + 1
    if length is not None and k + 1 >= length:
      return levels.level(k + 1, masks, None, provenance), k + 1
    if k + 1 >= WIDEN_AFTER:
      words = M.orr(all_words(cur), all_words(outs), all_words(entering), extra)
      masks = [M.uniform(words, c.ndim) for c in cur]
    k += 1
    cur = levels.level(k, masks, None, provenance)


def _joined(cur: Sequence[Val], outs: Sequence[Val], extra) -> list:
  """The next level's carry masks: this level joined with the body's carry outputs."""
  return [M.orr(c.mask, M.lift(o.mask, c.ndim), M.uniform(extra, c.ndim)) for c, o in zip(cur, outs)]


def while_loop(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``while cond(c): c = body(c)``: the level fixed point of the carry.

  The predicate's mask joins every carry and touches the body's operands.
  """
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
  cj, cc = compat.open_jaxpr(p["cond_jaxpr"])
  bj, bc = compat.open_jaxpr(p["body_jaxpr"])

  def step(k, carry):
    pred = ctx.run(cj, const_vals(cc), list(cconsts) + list(carry))[0]
    words = M.reduce_all(pred.mask)  # the trip count depends on the predicate
    for v in list(bconsts) + list(carry):
      ctx.touch(v, M.uniform(words, v.ndim))
    return ctx.run(bj, const_vals(bc), list(bconsts) + list(carry)), words

  carry, _ = _iterate(ctx, eqn, init, step, length=None, entering=list(cconsts) + list(bconsts))
  return [Val(tuple(o.aval.shape), o.aval.dtype, c.mask, c.pull) for o, c in zip(eqn.outvars, carry)]


def _suffix_or(m, reverse: bool):
  """``out[r]`` = OR of ``m`` over the rows (time axis 0) of the steps at or after row ``r``'s step.

  Rows ``>= r`` for a forward scan, rows ``<= r`` for a reverse one.
  """
  if m is None or m.shape[0] == 1:
    return m
  steps = m if reverse else m[::-1]  # steps in reverse order of execution
  acc = np.bitwise_or.accumulate(steps, axis=0)
  return acc if reverse else acc[::-1]


class _Scan:
  """One scan's reads of ``xs`` and body runs, in step order (``row`` maps a step to its time index)."""

  def __init__(self, ctx, eqn, invals):
    p = eqn.params
    self.ctx, self.nc, self.ncarry = ctx, *compat.scan_counts(p)
    self.jaxpr, self.consts = compat.open_jaxpr(p["jaxpr"])
    self.sconsts = invals[:self.nc]
    self.init, self.xs = invals[self.nc:self.nc + self.ncarry], invals[self.nc + self.ncarry:]
    self.length, self.reverse = int(p["length"]), bool(p.get("reverse", False))
    self.step_masks = [M.lift(x.mask, x.ndim) for x in self.xs]
    self.suffix = [_suffix_or(m, self.reverse) for m in self.step_masks]

  def row(self, s):
    return self.length - 1 - s if self.reverse else s

  def read(self, x, m, k: int, later: bool) -> Val:
    """``xs`` as read at step ``k``: that step, or (``later``) every step ``>= k``."""
    mask = None if m is None or m.shape[0] == 0 else m[0] if m.shape[0] == 1 else m[self.row(min(k, self.length - 1))]
    pull = None
    if x.pull is not None:
      def pull(t, x=x, k=k):
        t = M.lift(t, x.ndim - 1)[None]
        if self.length > 1:
          steps = np.arange(self.length)
          read = steps >= k if later else steps == k
          t = np.repeat(t, self.length, axis=0)
          t[self.row(steps[~read])] = 0
        x.pull(t)
    return Val(x.shape[1:], x.dtype, mask, pull)

  def run(self, k: int, carry, later: bool, dry: bool = False) -> list[Val]:
    """The body at step ``k`` (``later``: reading every step ``>= k``); ``dry``: its contacts are not recorded."""
    masks = self.suffix if later else self.step_masks
    reads = [self.read(x, m, k, later) for x, m in zip(self.xs, masks)]
    was, self.ctx.dry = self.ctx.dry, self.ctx.dry or dry
    try:
      return self.ctx.run(self.jaxpr, const_vals(self.consts), list(self.sconsts) + list(carry) + reads)
    finally:
      self.ctx.dry = was

  def alike_from(self, k: int) -> bool:
    """Whether every ``xs`` has the same mask at all steps ``>= k`` (one run then stands for all)."""
    for m in self.step_masks:
      if m is not None and m.shape[0] > 1:
        steps = (m[::-1] if self.reverse else m)[k:]
        if not (steps == steps[:1]).all():
          return False
    return True


def scan(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``c, ys[t] = body(c, xs[t])``: the level fixed point of the carry (at most ``length`` levels).

  Iteration ``k`` reads ``xs`` of step ``k`` and writes ``ys`` of step ``k``. After a
  confirmed steady level, later steps whose ``xs`` masks differ run one by one on the
  steady carry (up to ``WIDEN_AFTER`` runs in all); one run reading every remaining step
  stands for the rest.
  """
  sc = _Scan(ctx, eqn, invals)
  length, ncarry = sc.length, sc.ncarry
  pieces: list[tuple[int, list[Val]]] = []  # (first step, ys of the run standing for it and up to the next)
  confirmed: dict[int, list[Val]] = {}

  def step(k, carry):
    outs = sc.run(k, carry, later=False)
    pieces.append((k, outs[ncarry:]))
    return outs[:ncarry], None

  def confirm(k, carry):
    # Dry unless it will stand for the later steps: else the per-step runs record their contacts
    # (each step on its own xs), and this run's mix of every later step's xs would blur them.
    outs = sc.run(k, carry, later=True, dry=not sc.alike_from(k))
    confirmed[k] = outs[ncarry:]
    return outs[:ncarry], None

  carry, runs = _iterate(ctx, eqn, sc.init, step, length=max(length, 1),
                         entering=list(sc.sconsts) + list(sc.xs), confirm=confirm)
  last = runs - 1
  if last in confirmed and last < length - 1:  # steady before the end: the later steps
    pieces[-1:] = _steady_steps(sc, carry, last, pieces[-1][1], confirmed[last], budget=WIDEN_AFTER - runs)
  outs = [Val(tuple(o.aval.shape), o.aval.dtype, c.mask, c.pull) for o, c in zip(eqn.outvars[:ncarry], carry)]
  firsts = [k for k, _ in pieces]
  for j, o in enumerate(eqn.outvars[ncarry:]):
    outs.append(_stacked_ys(o, [ys[j] for _, ys in pieces], firsts, length, sc.reverse))
  return outs


def _steady_steps(sc: _Scan, carry, k: int, own: list[Val], later: list[Val], budget: int):
  """Pieces for the steps ``>= k`` of a level confirmed steady at ``k``.

  Each step whose ``xs`` differ from the later ones runs on its own (``own`` is step ``k``'s
  run); the first step from which all ``xs`` are alike (or where the budget ends) gets one run
  reading every remaining step (``later`` if that is ``k``).
  """
  if sc.alike_from(k):
    return [(k, later)]
  pieces = [(k, own)]
  s = k + 1
  while s < sc.length and not sc.alike_from(s) and budget > 0:
    pieces.append((s, sc.run(s, carry, later=False)[sc.ncarry:]))
    s, budget = s + 1, budget - 1
  if s < sc.length:
    pieces.append((s, sc.run(s, carry, later=True)[sc.ncarry:]))
  return pieces


def _stacked_ys(o, per_piece: list[Val], firsts: list[int], length: int, reverse: bool) -> Val:
  """``ys`` stacked over time: piece ``i``'s output stands for the steps ``firsts[i]`` up to ``firsts[i + 1]``."""
  shape = tuple(o.aval.shape)
  ends = firsts[1:] + [length]
  masks = [M.lift(v.mask, len(shape) - 1) for v in per_piece]
  if all(same_mask(masks[0], m) for m in masks[1:]):
    mask = None if masks[0] is None else masks[0][None]
  else:
    common = np.broadcast_shapes(*(m.shape for m in masks if m is not None))
    full = np.stack([np.zeros(common, M.WORD) if m is None else np.broadcast_to(m, common) for m in masks])
    which = np.repeat(np.arange(len(masks)), np.subtract(ends, firsts))  # piece per step
    by_step = np.take(full, which, axis=0)
    mask = by_step[::-1] if reverse else by_step
  pulls = [v.pull for v in per_piece]
  if all(q is None for q in pulls):
    return out_val(o, mask, None)

  def pull(t):
    t = M.lift(t, len(shape))
    by_step = t[::-1] if reverse and t.shape[0] > 1 else t
    for q, a, b in zip(pulls, firsts, ends):
      part = by_step if by_step.shape[0] == 1 else M.reduce_or(by_step[a:b], [0])
      if q is not None and not M.is_empty(part):
        q(part[0] if by_step.shape[0] == 1 else part)
  return out_val(o, mask, pull)


def shard_map(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """The body on the union of the shards, so collectives inside are sound.

  Masks are ORed over the sharded axes on the way in and out (local shapes come from
  the body's avals).
  """
  jaxpr, consts = compat.sub_jaxpr(eqn.params, eqn.primitive.name)
  local_in = [tuple(v.aval.shape) for v in jaxpr.invars]

  def to_local(v: Val, shape):
    sharded = [a for a in range(v.ndim) if shape[a] != v.shape[a]]
    mask = M.reduce_or(M.lift(v.mask, v.ndim), sharded, keepdims=True)
    pull = None
    if v.pull is not None:
      pull = (lambda t, v=v: v.pull(M.reduce_or(M.lift(t, v.ndim), sharded, keepdims=True)))
    return Val(shape, v.dtype, mask, pull)

  args = [to_local(v, s) for v, s in zip(invals, local_in)]
  outs = ctx.run(jaxpr, const_vals(consts), args)
  result = []
  for o, v in zip(eqn.outvars, outs):
    shape = tuple(o.aval.shape)
    sharded = [a for a in range(len(shape)) if v.shape[a] != shape[a]]
    mask = M.reduce_or(M.lift(v.mask, len(shape)), sharded, keepdims=True)
    pull = None
    if v.pull is not None:
      pull = (lambda t, v=v, sharded=sharded: v.pull(M.reduce_or(M.lift(t, v.ndim), sharded, keepdims=True)))
    result.append(out_val(o, mask, pull))
  return result


register(CALLS, call, traits=("call",))
register("cond", cond, traits=("control",))
register("while", while_loop, traits=("control",))
register("scan", scan, traits=("control",))
register("shard_map", shard_map, traits=("control",))
