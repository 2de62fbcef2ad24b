"""Higher-order primitives: calls, cond, while, scan, shard_map.

* jit / closed_call / custom_jvp_call / custom_vjp_call / remat: interpret the
  callee with the caller's values (masks *and* provenance flow through).
* cond: union over the branches that can run, plus the index's mask on every
  output; a statically known index runs only its branch.
* while / scan: iterate the body until the carry masks and the touch table stop
  growing. The first iteration runs on the exact initial carry (so parameter
  initial states get their first contacts), later ones on the join of every
  carry seen so far. Per-step inputs use the OR over time; per-step outputs get
  the join over iterations. Forward and reverse scans are the same fixed point.
* shard_map: the body sees the union of all shards (masks ORed over sharded
  axes), so collectives inside are identities or dense.
"""

from __future__ import annotations

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src import masks as M
from jaxsurgery._src.interpreter import Val
from jaxsurgery._src.rules.common import all_words, join_pulls, out_val, same_mask
from jaxsurgery._src.rules.registry import register

MAX_ITERATIONS = 1000


def const_vals(consts):
  out = []
  for c in consts:
    shape = tuple(np.shape(c))
    out.append(Val(shape, getattr(c, "dtype", None), const=c))
  return out


def call(ctx, eqn, invals):
  """Interpret the callee in place."""
  jaxpr, consts = compat.sub_jaxpr(eqn.params)
  outs = ctx.run(jaxpr, const_vals(consts), invals)
  return [Val(tuple(o.aval.shape), o.aval.dtype, v.mask, v.pull, v.const) for o, v in zip(eqn.outvars, outs)]


def cond(ctx, eqn, invals):
  index, ops = invals[0], invals[1:]
  branches = eqn.params["branches"]
  known = index.concrete()
  if known is not None:
    i = int(np.clip(int(np.asarray(known)), 0, len(branches) - 1))
    branches = branches[i:i + 1]
  words = M.reduce_all(index.mask)
  for v in ops:
    ctx.touch(v, M.uniform(words, v.ndim))
  results = [ctx.run(b.jaxpr, const_vals(b.consts), ops) for b in branches]
  outs = []
  for k, o in enumerate(eqn.outvars):
    rank = len(o.aval.shape)
    mask = M.orr(*(M.lift(r[k].mask, rank) for r in results), M.uniform(words, rank))
    outs.append(out_val(o, mask, join_pulls(*(r[k].pull for r in results))))
  return outs


def _join(a: Val, b: Val, extra=None) -> Val:
  rank = a.ndim
  return Val(a.shape, a.dtype, M.orr(M.lift(a.mask, rank), M.lift(b.mask, rank), extra),
             join_pulls(a.pull, b.pull))


def _fixed_point(ctx, eqn, carry, step):
  """Iterates ``step(carry) -> (carry_out, extra_mask)`` until nothing grows."""
  for _ in range(MAX_ITERATIONS):
    version = ctx.version
    outs, extra = step(carry)
    new = [_join(c, o, M.uniform(extra, c.ndim)) for c, o in zip(carry, outs)]
    stable = ctx.version == version and all(same_mask(c.mask, n.mask) for c, n in zip(carry, new))
    carry = new
    if stable:
      return carry
  raise RuntimeError(f"{eqn.primitive.name}: dependency masks did not reach a fixed point in "
                     f"{MAX_ITERATIONS} iterations; please report this model.")


def while_loop(ctx, eqn, invals):
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
  cj, cc = compat.open_jaxpr(p["cond_jaxpr"])
  bj, bc = compat.open_jaxpr(p["body_jaxpr"])
  preds: list = []

  def step(carry):
    pred = ctx.run(cj, const_vals(cc), list(cconsts) + list(carry))[0]
    words = M.reduce_all(pred.mask)  # the trip count depends on the predicate
    preds.append(pred)
    for v in cconsts:
      ctx.touch(v, M.uniform(all_words(carry), v.ndim))
    return ctx.run(bj, const_vals(bc), list(bconsts) + list(carry)), words

  carry = _fixed_point(ctx, eqn, list(init), step)
  return [Val(tuple(o.aval.shape), o.aval.dtype, c.mask, c.pull) for o, c in zip(eqn.outvars, carry)]


def scan(ctx, eqn, invals):
  p = eqn.params
  nc, ncarry = compat.scan_counts(p)
  jaxpr, consts = compat.open_jaxpr(p["jaxpr"])
  sconsts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  x_steps = []
  for x in xs:
    pull = None
    if x.pull is not None:
      pull = (lambda t, x=x: x.pull(M.lift(t, x.ndim - 1)[None]))
    x_steps.append(Val(x.shape[1:], x.dtype, M.reduce_or(M.lift(x.mask, x.ndim), [0]), pull))
  n_ys = len(eqn.outvars) - ncarry
  ys_masks: list = [None] * n_ys
  ys_pulls: list[list] = [[] for _ in range(n_ys)]

  def step(carry):
    outs = ctx.run(jaxpr, const_vals(consts), list(sconsts) + list(carry) + x_steps)
    for k, y in enumerate(outs[ncarry:]):
      ys_masks[k] = M.orr(ys_masks[k], M.lift(y.mask, y.ndim))
      if y.pull is not None:
        ys_pulls[k].append(y.pull)
    return outs[:ncarry], None

  carry = _fixed_point(ctx, eqn, list(init), step)
  outs = [Val(tuple(o.aval.shape), o.aval.dtype, c.mask, c.pull)
          for o, c in zip(eqn.outvars[:ncarry], carry)]
  for k, o in enumerate(eqn.outvars[ncarry:]):
    m = ys_masks[k]
    step_pull = join_pulls(*ys_pulls[k])
    pull = None if step_pull is None else (lambda t, f=step_pull: f(M.reduce_or(t, [0])))
    outs.append(out_val(o, None if m is None else m[None], pull))
  return outs


def shard_map(ctx, eqn, invals):
  jaxpr, consts = compat.sub_jaxpr(eqn.params)
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
      pull = (lambda t, v=v: v.pull(M.reduce_or(M.lift(t, v.ndim), sharded, keepdims=True)))
    result.append(out_val(o, mask, pull))
  return result


register(compat.JIT_NAMES + compat.CALL_NAMES, call)
register("cond", cond)
register("while", while_loop)
register("scan", scan)
register("shard_map", shard_map)
