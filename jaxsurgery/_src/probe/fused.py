"""The chunk's evaluation: one forward pass serves the output projection and the contact-local sum.

:func:`main_eval` evaluates the jaxpr once per column, for the gradient of the
output projection, and along the way records:

* the feature-dependent operands of every *simple* first contact (the
  contact-local evaluation's order, :mod:`jaxsurgery._src.probe.contact`).
  :func:`contact_sum` then re-evaluates only the feature-free chain and those
  contacts, with the recorded operands as constants: the contact-local gradient
  without a second forward pass.
* for *factored* leaves (large float parameters used only as an operand of
  ``dot_general``, at top level, inside plain calls or in the body of a
  ``scan`` that takes them as constants), the other operand of every such dot
  and, through a zero added to the dot's output, its cotangent. The leaf's
  gradient is the transpose of those dots; :func:`factored_rows` computes it a
  block of rows at a time, so the per-column gradients of the largest leaves
  are never all in memory, and inside a ``scan`` it is one contraction over the
  steps instead of a gradient carried and accumulated step by step.

:func:`flow` is the static walk both need: the (parameter-derived,
feature-dependent) flags of contact_eval, the leaves the contact-local sum can
reach, and whether a sub-jaxpr has a simple contact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsurgery._src import compat
from jaxsurgery._src.core.errors import NoSubJaxprError
from jaxsurgery._src.probe import walk as W
from jaxsurgery._src.probe.contact import ContactSum

#: Call primitives evaluated in place in the main pass: their derivative is their body's.
#: Others (custom_jvp_call, custom_vjp_call...) are bound as they are, so their rules apply.
INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "call", "named_call", "xla_call", "remat",
                    "remat2", "checkpoint", "composite", "compute_on", "eval_jaxpr"})

Flags = tuple[bool, bool]  # (parameter-derived, feature-dependent), as in contact_eval


def _sub(eqn) -> tuple[Any, list[Any]] | None:
  """The sub-jaxpr both contact walks evaluate in place, or None."""
  if eqn.primitive.name not in W.calls():
    return None
  try:
    return compat.sub_jaxpr(eqn.params, eqn.primitive.name)
  except NoSubJaxprError:
    return None


def _kind(fl: Sequence[Flags]) -> tuple[bool, bool, bool]:
  """(any feature-dependent, any parameter-derived, first contact) of an eqn's operand flags."""
  any_fd = any(f[1] for f in fl)
  any_pd = any(f[0] for f in fl)
  return any_fd, any_pd, any_fd and any(f[0] and not f[1] for f in fl)


# ---------------------------------------------------------------------------
# The static flow.


class Flow(NamedTuple):
  out_flags: list[Flags]
  out_leaves: list[int]  # per output: float leaves (bitmask) a feature-free output is derived from
  reached: int           # float leaves (bitmask) the simple contact-local sum depends on
  has_contact: bool      # a simple first contact somewhere inside


def flow(jaxpr, flags: Sequence[Flags], leaves: Sequence[int]) -> Flow:
  """contact_eval's flags through ``jaxpr``; ``leaves``: float leaves (bitmask) per argument."""
  env: dict[Any, tuple[Flags, int]] = {}
  reached, has_contact = 0, False
  for v in jaxpr.constvars:
    env[v] = ((False, False), 0)
  for v, f, p in zip(jaxpr.invars, flags, leaves):
    env[v] = (f, p)
  read = lambda v: ((False, False), 0) if isinstance(v, compat.Literal) else env[v]
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    fl = [f for f, _ in ins]
    sub = _sub(eqn)
    if sub is not None:
      inner = flow(sub[0], fl, [p for _, p in ins])
      reached |= inner.reached
      has_contact |= inner.has_contact
      outs = list(zip(inner.out_flags, inner.out_leaves))
    else:
      any_fd, any_pd, contact = _kind(fl)
      if contact and eqn.primitive.name not in W.compound():
        has_contact = True
        reached |= _union(p for f, p in ins if not f[1])
      outs = [((any_pd, any_fd), 0 if any_fd else _union(p for _, p in ins))] * len(eqn.outvars)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  res = [read(v) for v in jaxpr.outvars]
  return Flow([f for f, _ in res], [p for _, p in res], reached, has_contact)


def _union(ps) -> int:
  out = 0
  for p in ps:
    out |= p
  return out


# ---------------------------------------------------------------------------
# Factored leaves: where they are used.


class Use(NamedTuple):
  """One ``dot_general`` reading a factored leaf."""

  eqn: Any            # the dot_general
  w_pos: int          # the leaf is operand 0 (lhs) or 1 (rhs)
  steps: int | None   # inside a scan body: the number of steps (residuals are stacked); else None
  a_aval: Any         # the other operand, per step
  out_aval: Any


def _leaf_uses(jaxpr, leafmap: dict, steps: int | None, uses: list[tuple[int, Use]]) -> bool:
  """Appends the factorable uses of the leaves in ``leafmap`` (var -> leaf); False if one is not."""
  if any(not isinstance(v, compat.Literal) and v in leafmap for v in jaxpr.outvars):
    return False
  for eqn in jaxpr.eqns:
    hits = [(k, leafmap[v]) for k, v in enumerate(eqn.invars) if not isinstance(v, compat.Literal) and v in leafmap]
    if not hits:
      continue
    name = eqn.primitive.name
    sub = _sub(eqn) if name in INLINE else None
    if name == "dot_general" and len(hits) == 1 and eqn.invars[0] is not eqn.invars[1]:
      k, t = hits[0]
      uses.append((t, Use(eqn, k, steps, eqn.invars[1 - k].aval, eqn.outvars[0].aval)))
    elif sub is not None:
      if not _leaf_uses(sub[0], {sub[0].invars[k]: t for k, t in hits}, steps, uses):
        return False
    elif name == "scan" and steps is None:
      nc, _ = compat.scan_counts(eqn.params)
      if any(k >= nc for k, _ in hits):
        return False
      body = compat.open_jaxpr(eqn.params["jaxpr"])[0]
      if not _leaf_uses(body, {body.invars[k]: t for k, t in hits}, int(eqn.params["length"]), uses):
        return False
    else:
      return False
  return True


def factored_uses(jaxpr, candidates: dict[int, Any]) -> list[tuple[int, Use]]:
  """The factored leaves' dot uses, in evaluation order, as (leaf, use).

  ``candidates``: ``{leaf: jaxpr invar}``. A leaf is factored if every use of it is a
  factorable dot (and a dot reads at most one factored leaf).
  """
  ok = {}
  for t, v in candidates.items():
    uses: list[tuple[int, Use]] = []
    if _leaf_uses(jaxpr, {v: t}, None, uses) and uses:
      ok[t] = v
  uses = []
  if not _leaf_uses(jaxpr, {v: t for t, v in ok.items()}, None, uses):
    return []  # two factored leaves in one dot: rare; no factoring then
  return uses


def _count_uses(jaxpr, leafmap: dict) -> int:
  uses: list[tuple[int, Use]] = []
  _leaf_uses(jaxpr, leafmap, 0, uses)
  return len(uses)


# ---------------------------------------------------------------------------
# The main pass.


class _State:
  """What one main pass records: simple contacts' feature-dependent operands, factored dots' operands."""

  def __init__(self, zs: Sequence[Any]):
    self.zs = list(zs)   # the zeros added to the factored dots' outputs, in use order
    self.k = 0
    self.captured: list[list[Any]] = []
    self.resid: list[Any] = []

  def next_z(self):
    z = self.zs[self.k]
    self.k += 1
    return z


def main_eval(jaxpr, consts, args, flags: Sequence[Flags], leafmap: dict, st: _State, capture: bool = True,
              inline_all: bool = False) -> tuple[list[Any], list[Flags]]:
  """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, recording into ``st`` (module docstring).

  ``leafmap``: argument var -> factored leaf. ``inline_all``: evaluate every call in place (a
  forward pass that only records contacts, on values cut from autodiff).
  """
  env: dict[Any, Any] = {}
  fenv: dict[Any, Flags] = {}

  def read(v):
    if isinstance(v, compat.Literal):
      return v.val, (False, False)
    return env[v], fenv[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v], fenv[v] = c, (False, False)
  for v, a, f in zip(jaxpr.invars, args, flags):
    env[v], fenv[v] = a, f
  for eqn in jaxpr.eqns:
    pairs = [read(v) for v in eqn.invars]
    vals, fl = [a for a, _ in pairs], [f for _, f in pairs]
    hits = {k: leafmap[v] for k, v in enumerate(eqn.invars) if not isinstance(v, compat.Literal) and v in leafmap}
    outs, oflags = _main_eqn(eqn, vals, fl, hits, leafmap, st, capture, inline_all)
    for v, o, f in zip(eqn.outvars, outs, oflags):
      if not isinstance(v, compat.DropVar):
        env[v], fenv[v] = o, f
  res = [read(v) for v in jaxpr.outvars]
  return [a for a, _ in res], [f for _, f in res]


def _main_eqn(eqn, vals, fl, hits, leafmap, st: _State, capture: bool, inline_all: bool):
  name = eqn.primitive.name
  sub = _sub(eqn)
  if sub is not None and (inline_all or name in INLINE):
    inner = {sub[0].invars[k]: t for k, t in hits.items()}
    return main_eval(sub[0], sub[1], vals, fl, inner, st, capture, inline_all)
  if sub is not None:  # bound as it is (its own derivative rule); its contacts recorded apart
    fw = flow(sub[0], fl, [0] * len(fl))
    if capture and fw.has_contact:
      main_eval(sub[0], sub[1], [jax.lax.stop_gradient(v) for v in vals], fl, {}, st, True, True)
    return compat.bind(eqn, vals), fw.out_flags
  any_fd, any_pd, contact = _kind(fl)
  oflags = [(any_pd, any_fd)] * len(eqn.outvars)
  if name == "scan" and hits:
    return _factored_scan(eqn, vals, hits, st), oflags
  outs = compat.bind(eqn, vals)
  if name == "dot_general" and hits:
    (k, _), = hits.items()
    outs = [outs[0] + st.next_z()]
    st.resid.append(vals[1 - k])
  if capture and contact and name not in W.compound():
    st.captured.append([jax.lax.stop_gradient(v) for v, f in zip(vals, fl) if f[1]])
  return outs, oflags


def _factored_scan(eqn, vals, hits, st: _State):
  """A scan whose constants include factored leaves, rebuilt so that its dots' operands are outputs."""
  p = eqn.params
  nc, ncarry = compat.scan_counts(p)
  body, body_consts = compat.open_jaxpr(p["jaxpr"])
  inner = {body.invars[k]: t for k, t in hits.items()}
  n = _count_uses(body, inner)
  zs = st.zs[st.k:st.k + n]
  st.k += n
  consts, init, xs = vals[:nc], vals[nc:nc + ncarry], vals[nc + ncarry:]
  none = [(False, False)] * len(body.invars)

  def step(carry, x):
    xs_t, zs_t = x
    child = _State(zs_t)
    outs, _ = main_eval(body, body_consts, list(consts) + list(carry) + list(xs_t), none, inner, child,
                        capture=False)
    return outs[:ncarry], (outs[ncarry:], child.resid)

  carry, (ys, resid) = jax.lax.scan(step, list(init), (list(xs), zs), length=p["length"],
                                    reverse=p["reverse"], unroll=p["unroll"])
  st.resid.extend(resid)
  return list(carry) + list(ys)


def zeros_for(uses: Sequence[Use]) -> list[Any]:
  """The zeros added to the factored dots' outputs (-0.0: ``x + -0.0`` is ``x``, signed zeros too)."""
  out = []
  for u in uses:
    shape = tuple(u.out_aval.shape) if u.steps is None else (u.steps,) + tuple(u.out_aval.shape)
    out.append(jnp.full(shape, -0.0, u.out_aval.dtype))
  return out


# ---------------------------------------------------------------------------
# The contact-local sum from the recorded operands.


def contact_sum(jaxpr, consts, args, flags: Sequence[Flags], captured, acc: ContactSum) -> None:
  """contact_eval's simple sum, evaluating only the feature-free chain and the simple contacts.

  ``captured`` (an iterator) yields each simple contact's feature-dependent operands, recorded
  by :func:`main_eval` in the same order; other feature-dependent values are not computed.
  """
  _contact_sum(jaxpr, consts, args, flags, captured, acc)


def _contact_sum(jaxpr, consts, args, flags, captured, acc: ContactSum):
  env: dict[Any, Any] = {}
  fenv: dict[Any, Flags] = {}

  def read(v):
    if isinstance(v, compat.Literal):
      return v.val, (False, False)
    return env[v], fenv[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v], fenv[v] = c, (False, False)
  for v, a, f in zip(jaxpr.invars, args, flags):
    env[v], fenv[v] = a, f
  for eqn in jaxpr.eqns:
    pairs = [read(v) for v in eqn.invars]
    vals, fl = [a for a, _ in pairs], [f for _, f in pairs]
    sub = _sub(eqn)
    if sub is not None:
      outs, oflags = _contact_sum(sub[0], sub[1], vals, fl, captured, acc)
    else:
      outs, oflags = _contact_sum_eqn(eqn, vals, fl, captured, acc)
    for v, o, f in zip(eqn.outvars, outs, oflags):
      if not isinstance(v, compat.DropVar):
        env[v], fenv[v] = o, f
  res = [read(v) for v in jaxpr.outvars]
  return [a for a, _ in res], [f for _, f in res]


def _contact_sum_eqn(eqn, vals, fl, captured, acc: ContactSum):
  any_fd, any_pd, contact = _kind(fl)
  n = len(eqn.outvars)
  if not any_fd:
    return compat.bind(eqn, vals), [(any_pd, False)] * n
  name = eqn.primitive.name
  if contact and name in W.compound():
    acc.count([v.aval for v in eqn.outvars])
  elif contact:
    fd = iter(next(captured))
    outs = compat.bind(eqn, [next(fd) if f[1] else v for v, f in zip(vals, fl)])
    acc.add(outs, compound=False, placed=name in W.placing())
  return [None] * n, [(any_pd, True)] * n


# ---------------------------------------------------------------------------
# Gradients of factored leaves, a block of rows at a time.


def _row_axes(u: Use, ndim_w: int) -> tuple[int | None, int | None]:
  """Axes of the other operand and of the output (per step) that go with the leaf's axis 0."""
  (lc, rc), (lb, rb) = u.eqn.params["dimension_numbers"]
  wc, wb, oc, ob = (lc, lb, rc, rb) if u.w_pos == 0 else (rc, rb, lc, lb)
  if 0 in wc:
    return int(oc[list(wc).index(0)]), None
  if 0 in wb:
    k = list(wb).index(0)
    return int(ob[k]), k
  n_batch = len(wb)
  if u.w_pos == 0:
    return None, n_batch
  n_free_other = len(u.a_aval.shape) - len(oc) - len(ob)
  return None, n_batch + n_free_other


def _slice(x, axis: int | None, r0, rows: int):
  return x if axis is None else jax.lax.dynamic_slice_in_dim(x, r0, rows, axis=axis)


def factored_rows(uses: Sequence[Use], resid: Sequence[Any], dz: Sequence[Any], shape: tuple[int, ...], dtype,
                  r0, rows: int):
  """Rows ``r0 : r0 + rows`` of a factored leaf's gradient, per column: (columns, rows, *shape[1:]).

  ``resid`` and ``dz``: per use, the other operand and the output's cotangent, with a leading
  columns axis (and a steps axis after it inside a scan).
  """
  tile = jax.ShapeDtypeStruct((rows,) + tuple(shape[1:]), dtype)
  total = None
  for u, a, g in zip(uses, resid, dz):
    a_ax, o_ax = _row_axes(u, len(shape))
    lead = 1 if u.steps is None else 2
    a = _slice(a, None if a_ax is None else a_ax + lead, r0, rows)
    g = _slice(g, None if o_ax is None else o_ax + lead, r0, rows)

    def column(a_c, g_c, u=u):
      dot = lambda x, w: compat.bind(u.eqn, [w, x] if u.w_pos == 0 else [x, w])[0]
      f = (lambda w: dot(a_c, w)) if u.steps is None else (lambda w: jax.vmap(lambda x: dot(x, w))(a_c))
      return jax.linear_transpose(f, tile)(g_c)[0]

    part = jax.vmap(column)(a, g)
    total = part if total is None else total + part
  return total
