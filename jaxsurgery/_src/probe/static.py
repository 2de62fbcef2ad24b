"""The probe's static walk: per-variable feature and parameter flow at whole-array granularity.

One pass over the jaxpr records, per parameter leaf, its *first contacts* (the
operations where its feature-free chain meets feature-dependent values), the
operations after them whose local derivative depends on a feature (which make a
gradient change legitimately, see :mod:`jaxsurgery._src.probe.cross_check`), and
the table sizes that bound integer (categorical) inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import NoSubJaxprError
from jaxsurgery._src.probe import walk as W
from jaxsurgery._src.rules import registry


class St(NamedTuple):
  """What the walk knows about one variable (bitmasks over features, parameter and input leaves)."""

  F: int = 0      # named features the value may depend on
  P: int = 0      # parameter leaves it is derived from
  post: int = 0   # parameter leaves whose influence reaches it past their first contact
  T: int = 0      # integer input leaves (categorical range inference)
  iota: int = 0   # size of the iota it is a view of (one_hot detection)


_Z = St()


def _join(a: St, b: St) -> St:
  return St(a.F | b.F, a.P | b.P, a.post | b.post, a.T | b.T, a.iota or b.iota)


@dataclasses.dataclass
class Record:
  """An operation the walk found: a first contact, or a later op whose derivative depends on features."""

  desc: str
  prim: str
  params: int     # parameter leaves concerned (bitmask)
  features: int   # features concerned (bitmask)
  how: str = ""


class StaticWalk:
  """Walks a jaxpr once, recording first contacts, downstream derivative dependences and gathers."""

  def __init__(self):
    self.contacts: dict[tuple, Record] = {}
    self.downs: dict[tuple, Record] = {}
    self.bounds: list[tuple[int, int]] = []  # (integer input leaves, number of valid ids)

  def run(self, jaxpr, consts: Sequence[St], ins: Sequence[St], where: str = "") -> list[St]:
    env: dict[Any, St] = {}

    def read(v):
      return _Z if isinstance(v, compat.Literal) else env.get(v, _Z)

    for v, s in zip(jaxpr.constvars, consts):
      env[v] = s
    for v, s in zip(jaxpr.invars, ins):
      env[v] = s
    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(v) for v in eqn.invars], where)
      for v, s in zip(eqn.outvars, outs):
        if not isinstance(v, compat.DropVar):
          env[v] = s
    return [read(v) for v in jaxpr.outvars]

  def _desc(self, eqn, where: str) -> str:
    src = compat.source_line(eqn)
    return f"`{eqn.primitive.name}`" + (f" (in {where})" if where else "") + (f" at {src}" if src else "")

  def _fixed(self, body, consts, carry, rest, ncarry, extra=lambda outs: 0):
    carry = list(carry)
    outs = []
    for _ in range(64):
      outs = body(list(consts) + carry + list(rest))
      xf = extra(outs)
      new = [(lambda j: j._replace(F=j.F | xf))(_join(c, o)) for c, o in zip(carry, outs[:ncarry])]
      if new == carry:
        break
      carry = new
    return carry, outs

  def eqn(self, eqn, ins: list[St], where: str) -> list[St]:
    """The flow out of one eqn (recording its contacts, derivative dependences and bounds)."""
    name = eqn.primitive.name
    inner = f"{where}/{name}" if where else name
    if name in W.calls():
      try:
        jaxpr, consts = compat.sub_jaxpr(eqn.params, name)
      except NoSubJaxprError:
        jaxpr = None
      if jaxpr is not None:
        label = eqn.params.get("name")
        return self.run(jaxpr, [_Z] * len(consts), ins, f"{inner} {label}" if label else inner)
    if name == "scan":
      return self._scan(eqn, ins, inner)
    if name == "while":
      return self._while(eqn, ins, where, inner)
    if name == "cond":
      return self._cond(eqn, ins, where, inner)
    return self._first_order(eqn, ins, where)

  def _scan(self, eqn, ins: list[St], inner: str) -> list[St]:
    nc, ncarry = compat.scan_counts(eqn.params)
    body_j, body_c = compat.open_jaxpr(eqn.params["jaxpr"])
    run = lambda a: self.run(body_j, [_Z] * len(body_c), a, inner)
    carry, outs = self._fixed(run, ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:], ncarry)
    return carry + list(outs[ncarry:])

  def _while(self, eqn, ins: list[St], where: str, inner: str) -> list[St]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cj, cc = compat.open_jaxpr(p["cond_jaxpr"])
    bj, bc = compat.open_jaxpr(p["body_jaxpr"])
    cconsts, bconsts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    preds = []

    def body(a):
      carry = a[bn:]
      pred = self.run(cj, [_Z] * len(cc), list(cconsts) + carry, inner)[0]
      preds.append(pred)
      for k, c in enumerate(carry):
        if c.post and pred.F:
          self._down((id(eqn), "pred", k), self._desc(eqn, where), "while", c.post, pred.F,
                     "repeats it a number of times that depends on")
      return self.run(bj, [_Z] * len(bc), a, inner)

    carry, _ = self._fixed(body, bconsts, init, [], len(init), extra=lambda outs: preds[-1].F)
    return carry

  def _cond(self, eqn, ins: list[St], where: str, inner: str) -> list[St]:
    index, ops = ins[0], ins[1:]
    for k, s in enumerate(ops):
      if s.post and index.F:
        self._down((id(eqn), k), self._desc(eqn, where), "cond", s.post, index.F,
                   "picks a branch for it by an index that depends on")
    results = [self.run(b.jaxpr, [_Z] * len(b.consts), ops, inner) for b in eqn.params["branches"]]
    outs = []
    for k in range(len(eqn.outvars)):
      s = _Z
      for r in results:
        s = _join(s, r[k])
      outs.append(s._replace(F=s.F | index.F, T=s.T | index.T))
    return outs

  def _first_order(self, eqn, ins: list[St], where: str) -> list[St]:
    name = eqn.primitive.name
    F = P = post = T = 0
    for s in ins:
      F, P, post, T = F | s.F, P | s.P, post | s.post, T | s.T
    free = 0
    for s in ins:
      if s.P and not s.F:
        free |= s.P
    if free and F:
      self._contact(eqn, where, free, F)
      post |= free
    fs = [s.F for s in ins]
    for i, s in enumerate(ins):
      if s.post:
        d, how = W.derivative_features(name, eqn.params, i, fs)
        if d:
          self._down((id(eqn), i), self._desc(eqn, where), name, s.post, d, how)
    if registry.has_trait(name, "zero_grad"):
      post = 0
    self._categorical(eqn, ins)
    iota = 0
    if name == "iota":
      iota = int(eqn.outvars[0].aval.shape[eqn.params["dimension"]])
    elif name in ("broadcast_in_dim", "reshape", "convert_element_type", "squeeze") and ins:
      iota = ins[0].iota
    outs = []
    for o in eqn.outvars:  # only integer values can carry a categorical index
      integer = np.issubdtype(np.dtype(getattr(o.aval, "dtype", np.float32)), np.integer)
      outs.append(St(F, P, post, T if integer else 0, iota))
    return outs

  def _contact(self, eqn, where: str, params: int, features: int) -> None:
    key = (id(eqn),)
    rec = self.contacts.get(key)
    if rec is None:
      self.contacts[key] = Record(self._desc(eqn, where), eqn.primitive.name, params, features)
    else:
      rec.params |= params
      rec.features |= features

  def _down(self, key, desc, prim, params, features, how):
    rec = self.downs.get(key)
    if rec is None:
      self.downs[key] = Record(desc, prim, params, features, how)
    else:
      rec.params |= params
      rec.features |= features

  def _categorical(self, eqn, ins):
    name = eqn.primitive.name
    p = eqn.params
    try:
      if name == "gather" and len(ins) > 1 and ins[1].T:
        shape = eqn.invars[0].aval.shape
        dn = p["dimension_numbers"]
        sizes = p["slice_sizes"]
        for d in dn.start_index_map:
          self.bounds.append((ins[1].T, int(shape[d]) - int(sizes[d]) + 1))
      elif name == "dynamic_slice":
        shape = eqn.invars[0].aval.shape
        for d, s in enumerate(ins[1:]):
          if s.T:
            self.bounds.append((s.T, int(shape[d]) - int(p["slice_sizes"][d]) + 1))
      elif name == "eq" and len(ins) == 2:
        a, b = ins
        if a.T and b.iota:
          self.bounds.append((a.T, b.iota))
        elif b.T and a.iota:
          self.bounds.append((b.T, a.iota))
    except (KeyError, AttributeError, TypeError, IndexError):  # pragma: no cover - odd params
      pass


def static_walk(closed: Any, n_params: int, spec: feats.ResolvedSpec) -> StaticWalk:
  """The static walk of a traced function with ``n_params`` parameter leaves and ``spec``'s inputs."""
  walk = StaticWalk()
  ins = [St(P=1 << j) for j in range(n_params)]
  for li, leaf in enumerate(spec.leaves):
    F = 0
    for k in leaf.feature_ids:
      F |= 1 << k
    integer = F and not np.issubdtype(leaf.dtype, np.inexact)
    ins.append(St(F=F, T=(1 << li) if integer else 0))
  walk.run(closed.jaxpr, [_Z] * len(closed.consts), ins)
  return walk
