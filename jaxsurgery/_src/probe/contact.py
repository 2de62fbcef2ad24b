"""Contact-local evaluation: the jaxpr evaluated with autodiff cut after every first contact.

Every value that depends on a named feature is detached from autodiff
(``stop_gradient``) after the operation where a feature-free, parameter-derived
value first meets it, and the outputs of those first contacts are summed with
fixed pseudo-random weights. The gradient of that sum w.r.t. the parameters
sees the first-contact Jacobians and nothing downstream of them (see
docs/probe.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core.errors import NoSubJaxprError
from jaxsurgery._src.probe import walk as W


def _hash_weights(shape, seed):
  """Pseudo-random weights in (-0.5, 0.5), never 0, from an integer hash of the position.

  No PRNG (threefry is slow to compile) and no transcendental: XLA fuses these weights into
  every (vmapped) consumer, where a cosine hash was recomputed per column and cost more than
  the contact-local gradient itself.
  """
  n = jnp.arange(int(np.prod(shape, dtype=np.int64)), dtype=jnp.uint32).reshape(shape)
  h = (n + seed) * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 16)
  h = h * np.uint32(0xC2B2AE35)
  h = h ^ (h >> 13)
  h = h * np.uint32(0x27D4EB2F)
  h = h ^ (h >> 16)
  return ((h >> 8).astype(jnp.float32) + 0.5) * np.float32(1.0 / (1 << 24)) - 0.5


class ContactSum:
  """Accumulates ``sum_c <u_c, out_c>`` over first-contact outputs.

  ``simple``: contacts evaluated as one primitive; ``compound``: ``scan``/``while``/``cond``
  evaluated as one unit; ``placed``: the simple contacts that place a parameter-derived
  value into a feature-dependent one (add, sub, concatenate, select, gather...), whose
  live elements the annihilating run zeroes.
  """

  def __init__(self, seed):
    self.seed = jnp.asarray(seed, jnp.uint32)
    self.count_ = 0  # outputs weighed so far (each gets its own weights)
    self.simple = jnp.zeros((), jnp.float32)
    self.compound = jnp.zeros((), jnp.float32)
    self.placed = jnp.zeros((), jnp.float32)

  def _weighs(self, dtype, shape) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact)) and int(np.prod(shape, dtype=np.int64)) > 0

  def count(self, avals) -> None:
    """Advances the weights' seed past outputs that are not summed (as :meth:`add` would)."""
    self.count_ += sum(self._weighs(a.dtype, a.shape) for a in avals)

  def add(self, outs, compound: bool, placed: bool = False):
    for o in outs:
      o = jnp.asarray(o)
      if not self._weighs(o.dtype, o.shape):
        continue
      w = _hash_weights(o.shape, self.seed ^ np.uint32(((self.count_ + 1) * 0x9E3779B9) & 0xFFFFFFFF))
      self.count_ += 1
      term = jnp.sum(w * jnp.real(o).astype(jnp.float32))
      if compound:
        self.compound = self.compound + term
      else:
        self.simple = self.simple + term
        if placed:
          self.placed = self.placed + term


def contact_eval(jaxpr, consts, args, flags, acc: ContactSum):
  """Evaluates ``jaxpr``; values meeting named features are detached after their first contact.

  ``flags`` holds ``(param_derived, feature_dependent)`` per argument.
  """
  env: dict[Any, Any] = {}
  fenv: dict[Any, tuple[bool, bool]] = {}

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
    vals = [a for a, _ in pairs]
    fl = [f for _, f in pairs]
    name = eqn.primitive.name
    outs = None
    if name in W.calls():
      try:
        sub, sub_consts = compat.sub_jaxpr(eqn.params, name)
      except NoSubJaxprError:
        sub = None
      if sub is not None:
        outs, oflags = contact_eval(sub, sub_consts, vals, fl, acc)
    if outs is None:
      any_fd = any(f[1] for f in fl)
      any_pd = any(f[0] for f in fl)
      contact = any_fd and any(f[0] and not f[1] for f in fl)
      if not any_fd:
        outs = compat.bind(eqn, vals)
        oflags = [(any_pd, False)] * len(outs)
      else:
        vals = [jax.lax.stop_gradient(a) if f[1] else a for a, f in zip(vals, fl)]
        outs = compat.bind(eqn, vals)
        if contact:
          acc.add(outs, compound=name in W.compound(), placed=name in W.placing())
        outs = [jax.lax.stop_gradient(o) for o in outs]
        oflags = [(any_pd, True)] * len(outs)
    for v, o, f in zip(eqn.outvars, outs, oflags):
      if not isinstance(v, compat.DropVar):
        env[v], fenv[v] = o, f
  res = [read(v) for v in jaxpr.outvars]
  return [a for a, _ in res], [f for _, f in res]
