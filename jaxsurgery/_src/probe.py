"""Gradient mapping (the paper's second method) and the cross-check against the boolean table.

:func:`gradient_table` builds a :class:`FeatureTable` from gradients: from a base
input (zeros unless given), each feature is switched on alone and a random
projection of the outputs is differentiated with respect to every parameter;
the parameter elements whose gradient changes are marked with the feature.
Parameters are random (fresh draws, several runs) so that dead units or
zero-initialised weights cannot hide an interaction, and one *annihilating* run
zeroes the parameters that give feature-dependent values a nonzero base (added
biases and means, embedding rows gathered at the base id).

:func:`cross_check` compares that probe with the boolean table. The expected
relation is probe ⊆ table. A probe entry the table lacks is *legitimate* only
by a checkable criterion (see :func:`cross_check` and docs/probe.md); every
other one is reported as missed.

Besides the output gradients, the probe records evidence per run, stored with
the table (``FeatureTable.evidence``, a :class:`ProbeEvidence`):

* the *contact-local gradient*: the jaxpr is re-evaluated with every value that
  depends on a named feature detached from autodiff (``stop_gradient``) after
  the operation where a feature-free, parameter-derived value first meets it
  (the "first contact" of design §4). Its gradient is ``sum_c J_c^T u_c`` over
  those contacts ``c`` with fixed pseudo-random cotangents ``u_c``: it sees the
  first-contact Jacobians and nothing downstream of them. It changes with a
  feature exactly when a first-contact partner of the element changes with it;
* whether that contact-local gradient is nonzero at the base ("live"): a
  parameter whose first contact is annihilated at the base (a kernel row times
  a zero input) cannot have its output gradient changed by anything but its own
  first-contact features. The probe table reads such elements from the runs
  where they are annihilated; what live runs add is kept as evidence.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src import features as feats
from jaxsurgery._src import masks as M
from jaxsurgery._src.table import FeatureTable, trace

__all__ = ["gradient_table", "cross_check", "CrossCheck", "Miss", "Difference", "LeafAgreement"]

_COMPILER_OPTIONS: dict[str, Any] | None = None
# Small problems: XLA's compile time dominates the run time. Without backend optimisation and
# with the classic (non-"fusion emitter") CPU codegen, the probe compiles 3-5x faster.
_FAST_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_SUPPORTED_OPTIONS: dict[tuple, bool] = {}
# (params + intermediates) x columns x runs below which XLA's compile time dominates the run time
_FAST_COMPILE_ELEMENTS = 1 << 27

# Primitives whose sub-jaxpr is evaluated in place by both walks below.
_CALLS = frozenset(compat.JIT_NAMES + compat.CALL_NAMES)
# Compound primitives evaluated as one unit by the contact-local evaluation.
_COMPOUND = frozenset(compat.CONTROL_NAMES)

# ---------------------------------------------------------------------------
# Primitive classes used to explain differences (how an operation's local
# derivative w.r.t. one operand depends on the other operands).

_ZERO_GRAD = frozenset({
    "stop_gradient", "eq", "ne", "lt", "le", "gt", "ge", "floor", "ceil", "round", "sign",
    "is_finite", "and", "or", "not", "xor", "argmax", "argmin", "population_count", "clz",
    "shift_left", "shift_right_arithmetic", "shift_right_logical", "iota", "random_bits",
    "random_seed", "random_wrap", "random_unwrap", "rng_bit_generator", "threefry2x32",
})
_LINEAR = frozenset({
    "add", "sub", "neg", "add_any", "reshape", "transpose", "broadcast_in_dim", "squeeze",
    "expand_dims", "slice", "concatenate", "pad", "reduce_sum", "convert_element_type", "copy",
    "copy_p", "rev", "real", "imag", "conj", "complex", "cumsum", "reduce_precision", "split",
    "reduce_window_sum", "psum", "device_put", "optimization_barrier", "pvary", "pbroadcast",
    "sharding_constraint", "mesh_cast", "reshard", "name", "tie",
})
_MULTIPLICATIVE = frozenset({"mul", "dot_general", "conv_general_dilated"})
_SELECTION = frozenset({"max", "min", "reduce_max", "reduce_min", "cummax", "cummin", "sort",
                        "reduce_window_max", "reduce_window_min", "top_k", "clamp"})
_INDEXED = frozenset({"gather", "dynamic_slice", "dynamic_update_slice", "scatter", "scatter-add",
                      "scatter_add", "select_n"})
_ADDITIVE_CONTACT = frozenset({"add", "sub", "add_any", "concatenate", "pad", "dynamic_update_slice",
                               "scatter", "scatter-add", "scatter_add", "select_n"})
# Contacts that place a parameter-derived value into a feature-dependent one: a live element
# of such a contact gives the feature-dependent value a nonzero base (zeroed when annihilating).
_PLACED = _ADDITIVE_CONTACT | frozenset({"gather", "dynamic_slice"})


def _derivative_features(name: str, params: Mapping[str, Any], i: int, fs: Sequence[int]) -> tuple[int, str]:
  """Features the local derivative w.r.t. operand ``i`` depends on, and how (a phrase)."""
  allf = 0
  for f in fs:
    allf |= f
  others = 0
  for j, f in enumerate(fs):
    if j != i:
      others |= f
  if name in _ZERO_GRAD:
    return 0, ""
  if name in _LINEAR:
    return 0, ""
  if name in _MULTIPLICATIVE:
    return others, "multiplies it by a value that depends on"
  if name == "div":
    if i == 0:
      return fs[1], "divides it by a value that depends on"
    return allf, "divides by it (nonlinear in its denominator) with values that depend on"
  if name == "select_n":
    return (0, "") if i == 0 else (fs[0], "selects it by a predicate that depends on")
  if name in ("gather", "dynamic_slice"):
    idx = 0
    for f in fs[1:]:
      idx |= f
    return (idx, "indexes it by an index that depends on") if i == 0 else (0, "")
  if name == "dynamic_update_slice":
    idx = 0
    for f in fs[2:]:
      idx |= f
    return (idx, "places it at an index that depends on") if i in (0, 1) else (0, "")
  if name in ("scatter-add", "scatter_add", "scatter"):
    return (fs[1] if len(fs) > 1 else 0, "scatters it at indices that depend on") if i != 1 else (0, "")
  if name == "integer_pow" and params.get("y") in (0, 1):
    return 0, ""
  if name in _SELECTION:
    return allf, "selects between values that depend on"
  return allf, "is nonlinear in"


# ---------------------------------------------------------------------------
# Static walk: per-variable feature / parameter flow at whole-array granularity.


class _St(NamedTuple):
  F: int = 0      # named features the value may depend on
  P: int = 0      # parameter leaves it is derived from
  post: int = 0   # parameter leaves whose influence reaches it past their first contact
  T: int = 0      # integer input leaves (categorical range inference)
  iota: int = 0   # size of the iota it is a view of (one_hot detection)


_Z = _St()


def _join(a: _St, b: _St) -> _St:
  return _St(a.F | b.F, a.P | b.P, a.post | b.post, a.T | b.T, a.iota or b.iota)


_source = compat.source_line


@dataclasses.dataclass
class _Record:
  desc: str
  prim: str
  params: int     # parameter leaves concerned (bitmask)
  features: int   # features concerned (bitmask)
  how: str = ""


class _Static:
  """Walks a jaxpr once, recording first contacts, downstream derivative dependences and gathers."""

  def __init__(self):
    self.contacts: dict[tuple, _Record] = {}
    self.downs: dict[tuple, _Record] = {}
    self.bounds: list[tuple[int, int]] = []  # (integer input leaves, number of valid ids)

  def run(self, jaxpr, consts: Sequence[_St], ins: Sequence[_St], where: str = "") -> list[_St]:
    env: dict[Any, _St] = {}

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
    src = _source(eqn)
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

  def eqn(self, eqn, ins: list[_St], where: str) -> list[_St]:
    name = eqn.primitive.name
    p = eqn.params
    n_out = len(eqn.outvars)
    inner = f"{where}/{name}" if where else name
    if name in _CALLS:
      try:
        jaxpr, consts = compat.sub_jaxpr(p)
      except KeyError:
        jaxpr = None
      if jaxpr is not None:
        label = p.get("name")
        return self.run(jaxpr, [_Z] * len(consts), ins, f"{inner} {label}" if label else inner)
    if name == "scan":
      nc, ncarry = compat.scan_counts(p)
      body_j, body_c = compat.open_jaxpr(p["jaxpr"])
      run = lambda a: self.run(body_j, [_Z] * len(body_c), a, inner)
      carry, outs = self._fixed(run, ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:], ncarry)
      return carry + list(outs[ncarry:])
    if name == "while":
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
            self._down((id(eqn), "pred", k), self._desc(eqn, where), name, c.post, pred.F,
                       "repeats it a number of times that depends on")
        return self.run(bj, [_Z] * len(bc), a, inner)

      carry, _ = self._fixed(body, bconsts, init, [], len(init), extra=lambda outs: preds[-1].F)
      return carry
    if name == "cond":
      index, ops = ins[0], ins[1:]
      for k, s in enumerate(ops):
        if s.post and index.F:
          self._down((id(eqn), k), self._desc(eqn, where), name, s.post, index.F,
                     "picks a branch for it by an index that depends on")
      results = [self.run(b.jaxpr, [_Z] * len(b.consts), ops, inner) for b in p["branches"]]
      outs = []
      for k in range(n_out):
        s = _Z
        for r in results:
          s = _join(s, r[k])
        outs.append(s._replace(F=s.F | index.F, T=s.T | index.T))
      return outs
    # Generic (first-order) primitive.
    F = P = post = T = 0
    for s in ins:
      F, P, post, T = F | s.F, P | s.P, post | s.post, T | s.T
    free = 0
    for s in ins:
      if s.P and not s.F:
        free |= s.P
    if free and F:
      key = (id(eqn),)
      rec = self.contacts.get(key)
      if rec is None:
        self.contacts[key] = _Record(self._desc(eqn, where), name, free, F)
      else:
        rec.params |= free
        rec.features |= F
      post |= free
    fs = [s.F for s in ins]
    for i, s in enumerate(ins):
      if s.post:
        d, how = _derivative_features(name, p, i, fs)
        if d:
          self._down((id(eqn), i), self._desc(eqn, where), name, s.post, d, how)
    if name in _ZERO_GRAD:
      post = 0
    self._categorical(eqn, ins)
    iota = 0
    if name == "iota":
      iota = int(eqn.outvars[0].aval.shape[p["dimension"]])
    elif name in ("broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "expand_dims") and ins:
      iota = ins[0].iota
    outs = []
    for o in eqn.outvars:  # only integer values can carry a categorical index
      integer = np.issubdtype(np.dtype(getattr(o.aval, "dtype", np.float32)), np.integer)
      outs.append(_St(F, P, post, T if integer else 0, iota))
    return outs

  def _down(self, key, desc, prim, params, features, how):
    rec = self.downs.get(key)
    if rec is None:
      self.downs[key] = _Record(desc, prim, params, features, how)
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


def _static(closed, n_params: int, spec: feats.ResolvedSpec) -> _Static:
  walk = _Static()
  ins = [_St(P=1 << j) for j in range(n_params)]
  for li, leaf in enumerate(spec.leaves):
    F = 0
    for k in leaf.feature_ids:
      F |= 1 << k
    integer = F and not np.issubdtype(leaf.dtype, np.inexact)
    ins.append(_St(F=F, T=(1 << li) if integer else 0))
  walk.run(closed.jaxpr, [_Z] * len(closed.consts), ins)
  return walk


# ---------------------------------------------------------------------------
# Contact-local evaluation (autodiff cut after every first contact).


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


class _ContactSum:
  """Accumulates ``sum_c <u_c, out_c>`` over first-contact outputs.

  ``simple``: contacts evaluated as one primitive; ``compound``: ``scan``/``while``/``cond``
  evaluated as one unit; ``placed``: the simple contacts that place a parameter-derived
  value into a feature-dependent one (add, sub, concatenate, select, gather...), whose
  live elements the annihilating run zeroes.
  """

  def __init__(self, seed):
    self.seed = jnp.asarray(seed, jnp.uint32)
    self.count = 0
    self.simple = jnp.zeros((), jnp.float32)
    self.compound = jnp.zeros((), jnp.float32)
    self.placed = jnp.zeros((), jnp.float32)

  def add(self, outs, compound: bool, placed: bool = False):
    for o in outs:
      o = jnp.asarray(o)
      if not jnp.issubdtype(o.dtype, jnp.inexact) or o.size == 0:
        continue
      w = _hash_weights(o.shape, self.seed ^ np.uint32(((self.count + 1) * 0x9E3779B9) & 0xFFFFFFFF))
      self.count += 1
      term = jnp.sum(w * jnp.real(o).astype(jnp.float32))
      if compound:
        self.compound = self.compound + term
      else:
        self.simple = self.simple + term
        if placed:
          self.placed = self.placed + term


def _contact_eval(jaxpr, consts, args, flags, acc: _ContactSum):
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
    if name in _CALLS:
      try:
        sub, sub_consts = compat.sub_jaxpr(eqn.params)
      except KeyError:
        sub = None
      if sub is not None:
        outs, oflags = _contact_eval(sub, sub_consts, vals, fl, acc)
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
          acc.add(outs, compound=name in _COMPOUND, placed=name in _PLACED)
        outs = [jax.lax.stop_gradient(o) for o in outs]
        oflags = [(any_pd, True)] * len(outs)
    for v, o, f in zip(eqn.outvars, outs, oflags):
      if not isinstance(v, compat.DropVar):
        env[v], fenv[v] = o, f
  res = [read(v) for v in jaxpr.outvars]
  return [a for a, _ in res], [f for _, f in res]


def _uses(jaxpr, names: frozenset) -> bool:
  """Whether ``jaxpr`` (or a call inside it) contains one of the primitives ``names``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in names:
      return True
    if eqn.primitive.name in _CALLS:
      try:
        sub, _ = compat.sub_jaxpr(eqn.params)
      except KeyError:
        continue
      if _uses(sub, names):
        return True
  return False


# ---------------------------------------------------------------------------
# The probe.


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeEvidence:
  """What :func:`gradient_table` measured besides its table; :func:`cross_check` reads it.

  Stored on the probe table (``FeatureTable.evidence``), so it survives
  ``dataclasses.replace`` and pickling (numpy arrays, strings and ints only).
  Per-element bool masks are stored as compressed 1-bit masks (see
  :meth:`mask`); feature masks as compressed packed masks like the table's.

  Attributes:
    features: feature names (must match the probe table's).
    shapes: parameter shape per path (must match the probe table's).
    contact_change: per leaf, packed: the contact-local gradient of the element
      changed when the feature was switched on (in some run).
    live: per leaf, 1-bit: the contact-local gradient was nonzero at the base
      in some run (a first contact not annihilated at the base).
    annihilated: per leaf, 1-bit: the contact-local gradient was zero at the
      base in some run; the probe table reads such elements from those runs only.
    live_only: per leaf, packed: features that changed the element's gradient
      only in runs where its first contact was live (annihilated elements only;
      not in the probe table, checked by the cross-check).
    runs: one line per run (parameter draw and base).
    num_ids: categorical feature -> number of ids probed.
    ids_capped: categorical features whose ids were sampled (``max_ids``).
    draws: number of generic draws.
    positive_draws: generic draws redrawn positive after non-finite values.
    nonfinite: leaf -> elements with a non-finite gradient in some column (not marked there).
    zeroed: leaf -> elements zeroed in the annihilating run.
    notes: remarks for the cross-check report.
    columns: probed (feature, id) columns per run.
    chunk: columns vmapped together (from ``chunk_size`` or ``memory_budget``).
  """

  features: tuple[str, ...]
  shapes: Mapping[str, tuple[int, ...]]
  contact_change: Mapping[str, np.ndarray | None]
  live: Mapping[str, np.ndarray | None]
  annihilated: Mapping[str, np.ndarray | None]
  live_only: Mapping[str, np.ndarray | None]
  runs: tuple[str, ...]
  num_ids: Mapping[str, int]
  ids_capped: tuple[str, ...]
  draws: int
  positive_draws: int
  nonfinite: Mapping[str, int]
  zeroed: Mapping[str, int]
  notes: tuple[str, ...] = ()
  columns: int = 0
  chunk: int = 0

  def mask(self, what: str, path: str) -> np.ndarray:
    """A dense mask: ``"live"``/``"annihilated"`` -> bool ``shape``; ``"contact_change"``/
    ``"live_only"`` -> bool ``shape + (num_features,)``."""
    shape = tuple(self.shapes[path])
    if what in ("live", "annihilated"):
      return M.unpack(getattr(self, what)[path], shape, 1)[..., 0]
    if what in ("contact_change", "live_only"):
      return M.unpack(getattr(self, what)[path], shape, len(self.features))
    raise KeyError(f"No evidence mask {what!r}; known: live, annihilated, contact_change, live_only.")


def _bits1(b: np.ndarray) -> np.ndarray | None:
  """A bool array as a compressed 1-feature packed mask (None if all False)."""
  b = np.asarray(b, bool)
  return M.compress(b[..., None].astype(np.uint32)) if b.any() else None


class _Progress:

  def __init__(self, total: int, enabled: bool | None, what: str):
    self.total = total
    self.enabled = total >= 16 if enabled is None else bool(enabled)
    self.what = what
    self.start = self.last = time.monotonic()
    self.done = 0

  def step(self, label: str):
    self.done += 1
    if not self.enabled:
      return
    now = time.monotonic()
    if self.done == self.total or now - self.last >= 1.0 or self.done == 1:
      self.last = now
      pct = 100.0 * self.done / max(self.total, 1)
      print(f"jaxsurgery.gradient_table({self.what}): {label}, chunk {self.done}/{self.total} "
            f"({pct:.0f}%), {now - self.start:.1f}s", file=sys.stderr, flush=True)


def _as_key(key):
  if key is None:
    raise ValueError(
        "gradient_table needs a random key for its parameter draws: pass key=jax.random.key(0) "
        "(any seed). The probe draws fresh random parameters so that dead units and zero weights "
        "cannot hide an interaction.")
  try:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  except Exception:
    raise TypeError(f"key must be a jax random key (jax.random.key(seed)); got {key!r}.") from None


def _np_rng(key) -> np.random.Generator:
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().astype(np.uint64))


def _check_base(base, inputs, ipaths, ileaves):
  if base is None:
    return [np.zeros(tuple(l.shape), l.dtype) for l in ileaves]
  bleaves, bdef = jax.tree_util.tree_flatten_with_path(base)
  idef = jax.tree_util.tree_structure(inputs)
  bpaths = [feats.keystr(p) for p, _ in bleaves]
  if bdef != idef:
    raise ValueError(
        "`base` must be a pytree with the same structure as `inputs`.\n"
        f"  base leaves:   {[p or '<root>' for p in bpaths]}\n"
        f"  inputs leaves: {[p or '<root>' for p in ipaths]}")
  out = []
  for path, (_, b), l in zip(ipaths, bleaves, ileaves):
    shape, dtype = feats.leaf_shape_dtype(b, "base", path)
    if isinstance(b, jax.ShapeDtypeStruct):
      raise TypeError(f"base leaf {path or '<root>'!r} is a ShapeDtypeStruct; the base must be concrete.")
    if tuple(shape) != tuple(l.shape):
      raise ValueError(f"base leaf {path or '<root>'!r} has shape {tuple(shape)} but the input leaf has "
                       f"shape {tuple(l.shape)}.")
    out.append(np.asarray(b).astype(l.dtype))
  return out


def _draw_params(rng: np.random.Generator, pleaves, concrete, positive: bool, kept: Sequence[bool],
                 fan_in: bool = False):
  """Random float leaves as numpy arrays; kept and non-float leaves keep their values.

  ``fan_in``: divide leaves of rank >= 2 by their fan-in (all axes but the last), so that sums
  of positive terms stay O(1) through the layers instead of saturating tanh/sigmoid.
  """
  out = []
  for l, c, k in zip(pleaves, concrete, kept):
    if k:
      out.append(np.asarray(c))
    elif np.issubdtype(l.dtype, np.inexact):
      x = rng.standard_normal(tuple(l.shape))
      if positive:
        x = np.abs(x) + 0.1
      if fan_in and len(l.shape) >= 2:
        x = x / max(1, int(np.prod(l.shape[:-1], dtype=np.int64)))
      out.append(np.asarray(x, dtype=l.dtype))
    else:  # integer / bool parameters: kept (or zeros for abstract leaves); never differentiated
      out.append(np.zeros(tuple(l.shape), l.dtype) if c is None else np.asarray(c))
  return out


def _feature_sites(spec: feats.ResolvedSpec):
  """feature index -> [(input leaf index, position along the feature axis or None)]."""
  sites: dict[int, list[tuple[int, int | None]]] = {k: [] for k in range(spec.num_features)}
  for li, leaf in enumerate(spec.leaves):
    if not leaf.feature_ids:
      continue
    if leaf.axis is None:
      sites[leaf.feature_ids[0]].append((li, None))
    else:
      for pos, k in enumerate(leaf.feature_ids):
        sites[k].append((li, pos))
  return sites


def _resolve_num_ids(num_ids, spec, sites, walk: _Static) -> dict[int, int]:
  """Number of ids to probe per categorical feature."""
  names = spec.names
  cat = [k for k in range(spec.num_features)
         if any(not np.issubdtype(spec.leaves[li].dtype, np.inexact) for li, _ in sites[k])]
  given: dict[str, int] = {}
  if isinstance(num_ids, Mapping):
    unknown = sorted(set(num_ids) - {names[k] for k in cat})
    if unknown:
      raise KeyError(f"num_ids names {unknown}, which are not integer (categorical) features. "
                     f"Categorical features: {[names[k] for k in cat]}")
    given = {str(k): int(v) for k, v in num_ids.items()}
  elif num_ids is not None:
    given = {names[k]: int(num_ids) for k in cat}
  out = {}
  for k in cat:
    if names[k] in given:
      n = given[names[k]]
    else:
      leaves = 0
      for li, _ in sites[k]:
        leaves |= 1 << li
      found = [b for t, b in walk.bounds if t & leaves]
      n = min(found) if found else 2
    if any(spec.leaves[li].dtype == np.bool_ for li, _ in sites[k]):
      n = min(n, 2)
    if n < 2:
      raise ValueError(f"Categorical feature {names[k]!r}: need at least 2 ids to compare, got {n}.")
    out[k] = n
  return out


# ---------------------------------------------------------------------------
# Compiled probe functions (cached across calls) and their sizing.

_MEMORY_BUDGET = 1 << 30   # bytes of device memory the vmapped columns of one chunk may use
_MAX_CHUNK = 128           # columns per chunk at most (beyond this vmap gains nothing)
_CACHE_SIZE = 8            # compiled probe functions kept (LRU, weakly keyed by fn)


# Compiled probe functions, keyed weakly by ``fn`` and by the abstract signature. They
# evaluate the traced jaxpr, never ``fn`` itself, so an entry does not keep ``fn`` alive.
# Like ``jax.jit``, a function whose behaviour changes through global state must be a new
# object.
_COMPILED = compat.WeakLRU(_CACHE_SIZE)


def _work(jaxpr) -> int:
  """Array elements one evaluation produces (a proxy for activations and compute)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    for o in eqn.outvars:
      total += int(np.prod(getattr(o.aval, "shape", ()), dtype=np.int64))
    p = eqn.params
    try:
      if name == "scan":
        total += int(p.get("length", 1)) * _work(compat.open_jaxpr(p["jaxpr"])[0])
      elif name == "while":
        total += _work(compat.open_jaxpr(p["body_jaxpr"])[0]) + _work(compat.open_jaxpr(p["cond_jaxpr"])[0])
      elif name == "cond":
        total += max((_work(b.jaxpr) for b in p["branches"]), default=0)
      elif name in _CALLS:
        total += _work(compat.sub_jaxpr(p)[0])
    except (KeyError, AttributeError, TypeError):  # pragma: no cover - odd params
      pass
  return total


class _Fns(NamedTuple):
  base: Callable    # (pf, po, consts, x, r, seed) -> liveness, placing elements, finiteness
  chunk: Callable   # (..., accumulators) -> accumulators with the chunk's columns ORed in


_BIG_LEAF = 1 << 20  # float leaves at least this large are not concatenated with others


def _groups(sizes: Sequence[int]) -> list[list[int]]:
  """Consecutive float leaves processed together: small ones concatenated (one fusion per
  operation instead of one per leaf: half the compile time), large ones alone (no copy)."""
  groups: list[list[int]] = []
  for t, n in enumerate(sizes):
    if n >= _BIG_LEAF or not groups or sizes[groups[-1][-1]] >= _BIG_LEAF:
      groups.append([t])
    else:
      groups[-1].append(t)
  return groups


def _place(ch, rel, bit, valid, K: int):
  """``ch`` (columns, *shape) bool -> (*shape, K) uint32: column c sets bit ``bit[c]`` of word ``rel[c]``."""
  sh = (-1,) + (1,) * (ch.ndim - 1)
  one = jnp.left_shift(jnp.uint32(1), bit.astype(jnp.uint32)).reshape(sh)
  b = jnp.where(ch & valid.reshape(sh), one, jnp.uint32(0))
  words = [jax.lax.reduce(jnp.where((rel == w).reshape(sh), b, jnp.uint32(0)), np.uint32(0),
                          jax.lax.bitwise_or, (0,)) for w in range(K)]
  return jnp.stack(words, axis=-1)


def _or_into(acc, contrib, w0):
  axis = acc.ndim - 1
  cur = jax.lax.dynamic_slice_in_dim(acc, w0, contrib.shape[-1], axis=axis)
  return jax.lax.dynamic_update_slice_in_dim(acc, cur | contrib, w0, axis=axis)


def _supported(options: Mapping[str, Any]) -> dict[str, Any]:
  """The compiler options this XLA accepts (unknown ones fail at compile time; flags move)."""
  out = {}
  for k, v in options.items():
    key = (k, v, jax.default_backend())
    if key not in _SUPPORTED_OPTIONS:
      try:
        jax.jit(lambda x: x + 1, compiler_options={k: v}).lower(np.float32(0)).compile()
        _SUPPORTED_OPTIONS[key] = True
      except Exception:  # pragma: no cover - depends on the XLA version
        _SUPPORTED_OPTIONS[key] = False
    if _SUPPORTED_OPTIONS[key]:
      out[k] = v
  return out


def _changed(a, b, rtol, atol):
  """Elements of ``a`` (columns, *shape) that differ from ``b`` (the base), and non-finite ones."""
  if not jnp.issubdtype(a.dtype, jnp.inexact):
    return a != b, jnp.zeros(a.shape, bool)
  fin = jnp.isfinite(a) & jnp.isfinite(b)
  scale = jnp.max(jnp.where(jnp.isfinite(b), jnp.abs(b), 0.0), initial=0.0)
  tol = rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)) + atol * scale
  return fin & (jnp.abs(a - b) > tol), ~fin


def _build(closed, n_params: int, float_idx: Sequence[int], in_flags, out_float: Sequence[bool],
           fast: bool) -> _Fns:
  """The jitted base and chunk functions of one traced function (see :func:`gradient_table`)."""
  jaxpr = closed.jaxpr
  float_idx = tuple(float_idx)
  other_idx = tuple(i for i in range(n_params) if i not in float_idx)
  in_flags = tuple(in_flags)

  def merge(pf, po):
    flat: list[Any] = [None] * n_params
    for i, x in zip(float_idx, pf):
      flat[i] = x
    for i, x in zip(other_idx, po):
      flat[i] = x
    return flat

  def projection(pf, po, consts, x, r):
    outs = jax.core.eval_jaxpr(jaxpr, consts, *merge(pf, po), *x)
    s = jnp.zeros((), jnp.float32)
    for o, ri, fl in zip(outs, r, out_float):
      if fl:
        s = s + jnp.sum(ri * jnp.real(o).astype(jnp.float32))
    return s, outs

  def contacts(pf, po, consts, x, seed):
    acc = _ContactSum(seed)
    _contact_eval(jaxpr, consts, merge(pf, po) + list(x), in_flags, acc)
    return acc

  grad_proj = jax.grad(projection, has_aux=True)
  grad_simple = jax.grad(lambda pf, po, consts, x, seed: contacts(pf, po, consts, x, seed).simple)
  options = _supported(_FAST_COMPILER_OPTIONS) if fast else _COMPILER_OPTIONS

  groups = _groups([int(np.prod(jaxpr.invars[i].aval.shape, dtype=np.int64)) for i in float_idx])

  def flat(ts, lead: tuple = ()):
    """Float leaves -> one flat vector per group (see :func:`_groups`)."""
    out = []
    for g in groups:
      parts = [ts[t].reshape(lead + (-1,)) for t in g]
      dtype = jnp.result_type(*[x.dtype for x in parts])
      out.append(parts[0] if len(parts) == 1 else jnp.concatenate([x.astype(dtype) for x in parts], -1))
    return out

  def leaf_scale(ts):
    """Per element: the largest finite |value| of its leaf (the scale of ``atol``)."""
    return flat([jnp.broadcast_to(jnp.max(jnp.where(jnp.isfinite(t), jnp.abs(t), 0), initial=0), t.shape)
                 for t in ts])

  # The base function runs a few times per call: always compile it fast.
  @functools.partial(jax.jit, compiler_options=_supported(_FAST_COMPILER_OPTIONS))
  def base_fn(pf, po, consts, x, r, seed):
    """Liveness (flat), tolerance scales (flat), placing elements (per leaf), finiteness."""
    g, outs = grad_proj(pf, po, consts, x, r)

    def sums(pf_):
      acc = contacts(pf_, po, consts, x, seed)
      return jnp.stack([acc.simple, acc.compound, acc.placed])

    J = jax.jacrev(sums)(list(pf)) if pf else []
    live = flat([(jnp.abs(j[0]) > 0) | (jnp.abs(j[1]) > 0) for j in J])
    placed = [jnp.abs(j[2]) > 0 for j in J]
    finite = jnp.array(True)
    for t in list(g) + [o for o, fl in zip(outs, out_float) if fl]:
      finite = finite & jnp.all(jnp.isfinite(t))
    return live, leaf_scale(g), leaf_scale([j[0] for j in J]), placed, finite

  def changed(a, b, scale, rtol, atol):
    fin = jnp.isfinite(a) & jnp.isfinite(b)
    tol = rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)) + atol * scale
    return fin & (jnp.abs(a - b) > tol), ~fin

  @functools.partial(jax.jit, compiler_options=options, donate_argnums=(15, 16, 17, 18, 19))
  def chunk_fn(pf, po, consts, val, r, seed, live, scale_g, scale_c, rtol, atol, w0, rel, bit, valid,
               acc_u, acc_a, acc_c, acc_nf, acc_o):
    """``val``: column 0 is the base, columns 1.. switch one (feature, id) on; the changed bits
    are ORed into the accumulators (flat over the float leaves, outputs per leaf). The base is a
    column of the same vmapped computation, so that elements the feature does not reach compare
    bitwise equal (a separately compiled base can round differently)."""
    def one(v):
      g, outs = grad_proj(pf, po, consts, v, r)
      gc = grad_simple(pf, po, consts, v, seed)
      return flat(g), flat(gc), outs

    G, GC, O = jax.vmap(one)(val)
    W = acc_o[0].shape[-1] if acc_o else (acc_u[0].shape[-1] if acc_u else 1)
    K = min(W, -(-rel.shape[0] // M.BITS) + 1)
    place = lambda ch: _place(ch, rel, bit, valid, K)
    n_nf = jnp.zeros((), jnp.int32)
    new = [], [], [], []
    for t in range(len(groups)):
      ch, nf = changed(G[t][1:], G[t][0], scale_g[t], rtol, atol)
      contrib = place(ch)
      new[0].append(_or_into(acc_u[t], contrib, w0))
      new[1].append(_or_into(acc_a[t], jnp.where(live[t][:, None], jnp.uint32(0), contrib), w0))
      nf = nf & valid[:, None]
      new[2].append(acc_nf[t] | jnp.any(nf, axis=0))
      n_nf = n_nf + jnp.sum(nf)
      new[3].append(_or_into(acc_c[t], place(changed(GC[t][1:], GC[t][0], scale_c[t], rtol, atol)[0]), w0))
    acc_o = [_or_into(acc, place(_changed(o[1:], o[0], rtol, atol)[0]), w0) for acc, o in zip(acc_o, O)]
    # A small output to wait on (the accumulators are donated to the next chunk).
    return new[0], new[1], new[3], new[2], acc_o, n_nf

  return _Fns(base_fn, chunk_fn)


def _chunking(C: int, chunk_size: int | None, memory_budget: int | None, per_column: int) -> int:
  """Columns per chunk: ``chunk_size``, or as many as ``memory_budget`` allows; balanced over chunks."""
  if chunk_size is not None:
    cap = chunk_size
  else:
    budget = _MEMORY_BUDGET if memory_budget is None else memory_budget
    cap = max(1, min(_MAX_CHUNK, budget // max(per_column, 1)))
  cap = max(1, min(cap, C))
  n = -(-C // cap)
  return -(-C // n)


class _Run(NamedTuple):
  positive: bool     # |normal| + 0.1 parameters and positive "on" values
  annihilate: bool   # zero the live elements of placing first contacts
  shift: int         # categorical base ids + shift (mod the number of ids)
  label: str


def _schedule(draws: int, annihilate: bool, categorical: bool) -> list[_Run]:
  runs = [_Run(True, True, 0, "annihilating")] if annihilate else []
  for d in range(draws):
    shift = (d + 1) % 2 if categorical else 0
    runs.append(_Run(d == 0, False, shift, f"draw {d}"))
  return runs


def gradient_table(fn: Callable, params: Any, inputs: Any, features: Any, *, key=None, base: Any = None,
                   draws: int = 3, annihilate: bool = True, chunk_size: int | None = None,
                   memory_budget: int | None = None, progress: bool | None = None,
                   num_ids: int | Mapping[str, int] | None = None, max_ids: int = 256,
                   keep: Sequence[str] = (), rtol: float = 1e-4, atol: float = 1e-6) -> FeatureTable:
  """Builds the feature→parameter table by gradient mapping (the probe).

  For each *run* (a parameter draw and a base) and each feature ``f``: the
  inputs are set to the base except feature ``f``, which is switched on; a
  random projection of the outputs is differentiated w.r.t. every float
  parameter, and the elements whose gradient differs from the base gradient
  (``|g_on - g_base| > rtol * max(|g_on|, |g_base|) + atol * max|g_base|``,
  the last maximum over the leaf) changed with ``f``.

  Which runs mark an element: the probe also measures, per run, whether the
  element's first contacts are *annihilated* at the base (their contact-local
  gradient is zero; see docs/probe.md). There its gradient can only change
  through a first-contact feature. An element annihilated in some run is
  marked from those runs only; an element live in every run (an added bias,
  an additive mean) from all runs. Changes seen only in live runs are kept as
  evidence (``table.evidence.live_only``) and checked by :func:`cross_check`.

  Runs:

  * ``draws`` generic draws: draw 0 all-positive (``|normal| + 0.1``, positive
    "on" values: no ReLU dead at a zero base), later ones ``normal(0, 1)``
    (redrawn positive when the base gives non-finite values, e.g. a negative
    variance). With categorical features, draws 0, 2, 4... use the base ids
    ``+ 1`` (mod the number of ids), so that every embedding row is not
    gathered at the base in some run.
  * ``annihilate=True`` adds one positive run in which the elements that
    *place* a value into a feature-dependent one and are live at the base
    (biases and means added to features, rows gathered at the base id,
    concatenated tokens...) are zero, so that later normalised inputs and
    gathered embeddings vanish at the base and the kernels reading them single
    out their features. Leaves in ``keep`` are never zeroed.
  * Float features are switched on to ``base + v``, ``v`` random and nonzero
    (``±U(0.5, 1.5)``, positive in positive runs), per element (every replica
    position: batch, time, unit slots...) and per run.
  * Integer (categorical) features are compared at every id ``0 .. n-1``
    against the base id. ``n`` is ``num_ids`` or inferred from the jaxpr: the
    smallest table size of a ``gather``/``dynamic_slice`` indexed by the
    feature, or the size of an ``iota`` it is compared with (``one_hot``); 2
    when nothing bounds it; 2 for ``bool``. At most ``max_ids`` ids per run
    (a random sample when ``n`` is larger).
  * Integer parameter leaves keep their concrete values (zeros for abstract
    leaves) and are never marked.
  * Output masks are filled by forward differences from all runs: an output
    element depends on ``f`` if it changes when ``f`` is switched on.

  Columns (features and ids) are vmapped in chunks sized from
  ``memory_budget``; the compiled functions are cached across calls (per
  function object and abstract signature, weakly held, at most 8).

  Args:
    fn: a pure function ``fn(params, inputs) -> outputs``.
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes and
      dtypes of float leaves are used; values are drawn).
    inputs: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    features: a feature spec matching ``inputs`` (see :func:`dependency_table`).
    key: a ``jax.random.key``; required.
    base: a concrete pytree like ``inputs``; defaults to zeros.
    draws: number of generic parameter draws (union of patterns).
    annihilate: add the annihilating run (see above).
    chunk_size: columns vmapped together; default: from ``memory_budget``.
    memory_budget: bytes the columns of one chunk may use (estimated from the
      parameter, input, output and intermediate sizes of ``fn``); default 1 GiB.
    progress: print progress lines to stderr; ``None`` prints them only when
      there are 16 chunks or more.
    num_ids: number of valid ids of the categorical features (an int for all
      of them, or ``{feature name: n}``); inferred when omitted.
    max_ids: at most this many ids of one categorical feature per run.
    keep: parameter leaf paths kept at their given (concrete) values in every
      run instead of being drawn, e.g. normalisation statistics, so that a
      ``base`` at the running mean makes the normalised inputs vanish.
    rtol: relative tolerance of a gradient change.
    atol: absolute tolerance, relative to the leaf's largest base gradient.

  Returns:
    A :class:`FeatureTable` with ``method="gradient"`` and ``evidence`` (a
    :class:`ProbeEvidence`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> params = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
    >>> x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    >>> probe = js.gradient_table(fn, params, x, js.Features(["a", "b", "c"]),
    ...                           key=jax.random.key(0))
    >>> bool(probe.lookup("b")["w"][1].all()), bool(probe.lookup("b")["w"][0].any())
    (True, False)
  """
  key = _as_key(key)
  if draws < 1:
    raise ValueError(f"draws must be >= 1, got {draws}.")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  if memory_budget is not None and memory_budget <= 0:
    raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}.")
  spec = feats.resolve(features, inputs)
  closed, out_shape, (ppaths, pleaves, pdef) = trace(fn, params, inputs)
  n_params = len(pleaves)
  shapes = [tuple(l.shape) for l in pleaves]
  concrete = [None if isinstance(x, jax.ShapeDtypeStruct) else x for x in jax.tree.leaves(params)]
  keep = (keep,) if isinstance(keep, str) else tuple(keep)
  unknown = [k for k in keep if k not in ppaths]
  if unknown:
    raise KeyError(f"keep names parameter leaves {unknown} that do not exist. Parameter paths: {list(ppaths)}")
  kept = [p in keep for p in ppaths]
  for p, c, k in zip(ppaths, concrete, kept):
    if k and c is None:
      raise TypeError(f"keep: parameter leaf {p!r} is a ShapeDtypeStruct; a kept leaf needs a concrete value.")
  ileaves_src, idef = jax.tree_util.tree_flatten_with_path(inputs)
  ipaths = [feats.keystr(p) for p, _ in ileaves_src]
  ileaves = list(spec.leaves)
  base_np = _check_base(base, inputs, ipaths, ileaves)
  out_leaves = jax.tree_util.tree_flatten_with_path(out_shape)[0]
  opaths = tuple(feats.keystr(p) for p, _ in out_leaves)
  oshapes = {p: tuple(l.shape) for p, (_, l) in zip(opaths, out_leaves)}
  out_float = tuple(bool(jnp.issubdtype(l.dtype, jnp.inexact)) for _, l in out_leaves)
  F = spec.num_features
  W = M.num_words(F)

  walk = _static(closed, n_params, spec)
  sites = _feature_sites(spec)
  n_ids = _resolve_num_ids(num_ids, spec, sites, walk)
  float_idx = [i for i, l in enumerate(pleaves) if jnp.issubdtype(l.dtype, jnp.inexact)]
  other_idx = [i for i in range(n_params) if i not in float_idx]
  in_flags = [(True, False)] * n_params + [(False, bool(l.feature_ids)) for l in ileaves]

  # Columns: (feature, id index or None). One column per float feature; one per probed id.
  columns: list[tuple[int, int | None]] = []
  capped: list[str] = []
  for k in range(F):
    if k in n_ids:
      n = n_ids[k]
      if n > max_ids:
        capped.append(spec.names[k])
      columns.extend((k, j) for j in range(min(n, max_ids)))
    else:
      columns.append((k, None))
  C = max(len(columns), 1)
  size = lambda s: int(np.prod(s, dtype=np.int64))
  n_float = sum(size(shapes[i]) for i in float_idx)
  n_in = sum(size(l.shape) for l in ileaves)
  n_out = sum(size(s) for s in oshapes.values())
  work = _work(closed.jaxpr)
  # Bytes per column: the gradients (params), the intermediates kept for the backward pass, the
  # input column and the outputs. Measured on five_L1024 (10M params, 7.7M intermediates): 49 MB
  # per column (peak RSS at chunk 12 minus chunk 4, / 8); this estimate: 71 MB.
  per_column = 4 * (n_float + work + n_in + 2 * n_out)
  chunk = _chunking(C, chunk_size, memory_budget, per_column)  # (+ 1 base column per chunk)
  n_chunks = -(-C // chunk)
  runs = _schedule(draws, annihilate, bool(n_ids))
  # Small problems: XLA's compile time dominates the run time, so compile without optimisation.
  fast = (n_float + work) * (chunk + 1) * n_chunks * len(runs) <= _FAST_COMPILE_ELEMENTS

  avals = lambda leaves: tuple((tuple(l.shape), np.dtype(l.dtype).str) for l in leaves)
  x64 = bool(getattr(jax.config, "jax_enable_x64", False))
  signature = (pdef, avals(pleaves), idef, avals(ileaves), tuple(in_flags), fast, x64)
  fns = _COMPILED.get_or_build(
      fn, (signature,), lambda: _build(closed, n_params, float_idx, in_flags, out_float, fast))
  consts = list(closed.consts)

  prog = _Progress(len(runs) * n_chunks, progress, f"{len(columns)} columns x {len(runs)} runs")
  K = min(W, -(-chunk // M.BITS) + 1)
  # Device accumulators, updated in place (donated) by every chunk; numpy -> device_put, no compiles.
  # Float leaves in groups (see _groups): small ones concatenated, large ones alone, in float_idx order.
  zeros = lambda shape: jax.device_put(np.zeros(shape + (W,), np.uint32))
  gsizes = [sum(size(shapes[float_idx[t]]) for t in g) for g in _groups([size(shapes[i]) for i in float_idx])]
  acc_u, acc_a, acc_c = ([zeros((n,)) for n in gsizes] for _ in range(3))
  acc_nf = [jax.device_put(np.zeros(n, bool)) for n in gsizes]
  acc_o = [zeros(oshapes[p]) for p in opaths]
  live_any = np.zeros(n_float, bool)
  annihilated = np.zeros(n_float, bool)
  zeroed = np.zeros(len(float_idx), np.int64)
  redrawn = 0
  notes: list[str] = []
  run_lines: list[str] = []
  po = [jax.device_put(np.asarray(concrete[i]) if concrete[i] is not None
                      else np.zeros(shapes[i], pleaves[i].dtype)) for i in other_idx]
  rtol_j, atol_j = np.float32(rtol), np.float32(atol)
  cat_sites = {k: sites[k] for k in n_ids}

  def shifted_base(shift):
    out = [b.copy() for b in base_np]
    if shift:
      for k, where in cat_sites.items():
        for li, pos in where:
          idx = (Ellipsis,) if pos is None else (slice(None),) * ileaves[li].axis + (pos,)
          out[li][idx] = ((out[li][idx].astype(np.int64) + shift) % n_ids[k]).astype(out[li].dtype)
    return out

  def columns_input(part, rng, positive, base_run):
    val = [np.broadcast_to(b, (chunk + 1,) + b.shape).copy() for b in base_run]
    for c, (k, idv) in enumerate(part, start=1):
      for li, pos in sites[k]:
        leaf = ileaves[li]
        idx = (c,) if pos is None else (c,) + (slice(None),) * leaf.axis + (pos,)
        if np.issubdtype(leaf.dtype, np.inexact):
          shape = val[li][idx].shape
          v = rng.uniform(0.5, 1.5, shape)
          if not positive:
            v = v * rng.choice([-1.0, 1.0], shape)
          val[li][idx] = base_run[li][idx[1:]] + v.astype(leaf.dtype)
        else:
          val[li][idx] = np.asarray(idv).astype(leaf.dtype)
    return val

  def placement(part):
    words = np.array([k // M.BITS for k, _ in part] + [0] * (chunk - len(part)), np.int32)
    w0 = int(min(words[0], W - K))
    rel = np.where(np.arange(chunk) < len(part), words - w0, 0).astype(np.int32)
    bit = np.array([k % M.BITS for k, _ in part] + [0] * (chunk - len(part)), np.uint32)
    valid = np.arange(chunk) < len(part)
    return np.int32(w0), rel, bit, valid

  pending = None
  for run, seed in zip(runs, _np_rng(key).integers(0, 2**63, size=(len(runs), 2))):
    rng = np.random.default_rng(seed[1])
    cseed = np.uint32(rng.integers(0, 2**32))  # of the contact-local cotangents
    r = [jax.device_put(rng.standard_normal(oshapes[p]).astype(np.float32)) for p in opaths]
    ids = {k: (np.arange(n) if n <= max_ids else np.sort(rng.choice(n, max_ids, replace=False)))
           for k, n in n_ids.items()}
    cols = [(k, None if j is None else int(ids[k][j])) for k, j in columns]
    positive = on_positive = run.positive or run.annihilate
    base_run = shifted_base(run.shift)
    xb = [jax.device_put(b) for b in base_run]
    flat = _draw_params(np.random.default_rng(seed[0]), pleaves, concrete, positive, kept,
                        fan_in=run.annihilate)
    pf = [jax.device_put(flat[i]) for i in float_idx]
    info = fns.base(pf, po, consts, xb, r, cseed)
    if not bool(info[-1]) and not positive:
      # Non-finite at the base (e.g. a negative variance): redraw this draw positive.
      redrawn += 1
      positive = True
      flat = _draw_params(np.random.default_rng(seed[0]), pleaves, concrete, True, kept)
      pf = [jax.device_put(flat[i]) for i in float_idx]
      info = fns.base(pf, po, consts, xb, r, cseed)
    line = f"{run.label}: {'positive' if positive else 'normal(0, 1)'} parameters"
    if positive and not on_positive:
      line += " (redrawn: non-finite at the base with normal(0, 1))"
    if run.annihilate and bool(info[-1]):
      # Zero the elements that place a nonzero value into a feature-dependent one at the base,
      # lowest rank first (a bias before the kernel of `b @ w + x @ w`: zeroing b already
      # zeroes the placed value, and w keeps multiplying the features), until none is left.
      vals = {i: np.array(flat[i], copy=True) for i in float_idx}
      done = {i: np.zeros(shapes[i], bool) for i in float_idx}
      for _ in range(8):
        placed = {i: np.asarray(z) & ~done[i] & (not kept[i]) for z, i in zip(info[3], float_idx)}
        ranks = [len(shapes[i]) for i, z in placed.items() if z.any()]
        if not ranks or not bool(info[-1]):
          break
        for i, z in placed.items():
          if len(shapes[i]) == min(ranks):
            vals[i][z] = 0
            done[i] |= z
            zeroed[float_idx.index(i)] += int(z.sum())
        pf = [jax.device_put(vals[i]) for i in float_idx]
        info = fns.base(pf, po, consts, xb, r, cseed)
      line += f", kernels / fan-in, {int(zeroed.sum())} placing elements zeroed"
    if not bool(info[-1]):
      if run.annihilate:
        notes.append("the annihilating run was skipped: its base gives non-finite outputs or gradients "
                     "(e.g. a division by a value that vanishes there)")
        run_lines.append(line + " (skipped: non-finite at the base)")
        for _ in range(n_chunks):
          prog.step(run.label)
        continue
      warnings.warn(
          f"gradient_table: {run.label} gives non-finite outputs or gradients at the base even with "
          f"positive parameters; elements with non-finite gradients are not marked in this draw. "
          f"Pass `keep=` for leaves that need their real values (e.g. variances) or a finite `base`.",
          RuntimeWarning, stacklevel=2)
    if run.shift and n_ids:
      line += f", categorical base ids + {run.shift}"
    run_lines.append(line)
    live, scale_g, scale_c = info[0], info[1], info[2]
    live_np = np.concatenate([np.asarray(l) for l in live]) if live else np.zeros(0, bool)
    live_any |= live_np
    annihilated |= ~live_np
    for c0 in range(0, len(columns) or 1, chunk):
      part = cols[c0:c0 + chunk]
      val = columns_input(part, rng, on_positive, base_run)
      w0, rel, bit, valid = placement(part) if part else (np.int32(0), np.zeros(chunk, np.int32),
                                                          np.zeros(chunk, np.uint32), np.zeros(chunk, bool))
      acc_u, acc_a, acc_c, acc_nf, acc_o, done = fns.chunk(
          pf, po, consts, val, r, cseed, live, scale_g, scale_c, rtol_j, atol_j, w0, rel, bit, valid,
          acc_u, acc_a, acc_c, acc_nf, acc_o)
      if pending is not None:  # wait for the previous chunk (the next one is queued meanwhile)
        pending[0].block_until_ready()
        prog.step(pending[1])
      pending = (done, f"{run.label} ({len(run_lines)}/{len(runs)})")
  if pending is not None:
    pending[0].block_until_ready()
    prog.step(pending[1])

  packed: dict[str, np.ndarray | None] = {p: None for p in ppaths}
  contact_change = {p: None for p in ppaths}
  live_only = {p: None for p in ppaths}
  live_bits = {p: None for p in ppaths}
  ann_bits = {p: None for p in ppaths}
  join = lambda accs, empty: np.concatenate([np.asarray(a) for a in accs]) if accs else empty
  acc_u, acc_a, acc_c = (join(a, np.zeros((0, W), np.uint32)) for a in (acc_u, acc_a, acc_c))
  acc_nf = join(acc_nf, np.zeros(0, bool))
  nonfinite = {}
  start = 0
  for i in float_idx:
    p, n = ppaths[i], size(shapes[i])
    part = slice(start, start + n)
    start += n
    u, a = acc_u[part].reshape(shapes[i] + (W,)), acc_a[part].reshape(shapes[i] + (W,))
    ann = annihilated[part].reshape(shapes[i])
    m = np.where(ann[..., None], a, u)
    packed[p] = M.compress(m) if m.any() else None
    extra = u & ~m
    live_only[p] = M.compress(extra) if extra.any() else None
    c = acc_c[part].reshape(shapes[i] + (W,))
    contact_change[p] = M.compress(c) if c.any() else None
    live_bits[p] = _bits1(live_any[part].reshape(shapes[i]))
    ann_bits[p] = _bits1(ann)
    if acc_nf[part].any():
      nonfinite[p] = int(acc_nf[part].sum())
  output_packed = {}
  for p, o in zip(opaths, acc_o):
    o = np.asarray(o)
    output_packed[p] = M.compress(o) if o.any() else None
  evidence = ProbeEvidence(
      features=tuple(spec.names), shapes=dict(zip(ppaths, shapes)), contact_change=contact_change,
      live=live_bits, annihilated=ann_bits, live_only=live_only, runs=tuple(run_lines),
      num_ids={spec.names[k]: n for k, n in n_ids.items()}, ids_capped=tuple(capped),
      draws=draws, positive_draws=redrawn,
      nonfinite=nonfinite,
      zeroed={ppaths[i]: int(n) for i, n in zip(float_idx, zeroed) if n}, notes=tuple(notes),
      columns=len(columns), chunk=chunk)
  return FeatureTable(
      features=spec.names, paths=tuple(ppaths), shapes=dict(zip(ppaths, shapes)),
      dtypes={p: l.dtype for p, l in zip(ppaths, pleaves)}, packed=packed,
      output_paths=opaths, output_shapes=oshapes, output_packed=output_packed,
      spec=spec, method="gradient", jaxpr=closed, param_treedef=pdef, evidence=evidence)


# ---------------------------------------------------------------------------
# The cross-check.


class Miss(NamedTuple):
  """A probe entry the boolean table lacks and that no legitimate difference explains."""

  path: str
  index: tuple[int, ...]
  feature: str
  explanation: str


class Difference(NamedTuple):
  """A probe entry the table lacks, explained by a named downstream operation (legitimate)."""

  path: str
  index: tuple[int, ...]
  feature: str
  op: str
  explanation: str


class LeafAgreement(NamedTuple):
  """Counts of (element, feature) pairs of one leaf.

  ``both``/``table_only``/``probe_only`` compare the two tables; ``live_only``
  counts pairs outside both tables that changed the element's gradient only in
  runs where its first contact was live (probe evidence). ``legitimate`` and
  ``missed`` classify the ``probe_only`` and ``live_only`` pairs.
  """

  both: int
  table_only: int
  probe_only: int
  total: int
  legitimate: int = 0
  missed: int = 0
  live_only: int = 0

  @property
  def exact(self) -> bool:
    """True iff table and probe agree on every element and feature of the leaf."""
    return self.table_only == 0 and self.probe_only == 0


def _fmt_index(index) -> str:
  return "[" + ", ".join(str(i) for i in index) + "]" if index else ""


def _compact(items: Sequence[Any], limit: int = 6) -> str:
  items = [str(i) for i in items]
  if len(items) > limit:
    return ", ".join(items[:limit]) + f", ... (+{len(items) - limit})"
  return ", ".join(items)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossCheck:
  """The result of :func:`cross_check`.

  Attributes:
    features: feature names.
    missed: probe entries the table lacks with no legitimate explanation.
    legitimate: probe entries the table lacks, each explained by the operation
      after the parameter's first contact that makes its gradient depend on
      the feature.
    per_leaf: per parameter leaf, agreement counts over (element, feature) pairs.
    table_only_notes: per leaf with table-only entries, why the gradient does
      not see them (boolean over-approximation relative to the gradient).
    output_missed: output elements that change numerically with a feature
      that their forward mask lacks (always a real bug).
    output_per_leaf: agreement counts of the output masks.
    notes: general remarks (missing evidence, capped categorical ids...).
  """

  features: tuple[str, ...]
  missed: tuple[Miss, ...]
  legitimate: tuple[Difference, ...]
  per_leaf: Mapping[str, LeafAgreement]
  table_only_notes: Mapping[str, str]
  output_missed: tuple[Miss, ...]
  output_per_leaf: Mapping[str, LeafAgreement]
  notes: tuple[str, ...] = ()

  @property
  def ok(self) -> bool:
    """True iff nothing is missed (parameters and outputs)."""
    return not self.missed and not self.output_missed

  def agrees(self, path: str) -> bool:
    """True iff table and probe agree exactly on leaf ``path``."""
    if path not in self.per_leaf:
      raise KeyError(f"No parameter leaf {path!r}. Known: {list(self.per_leaf)}")
    return self.per_leaf[path].exact

  def report(self, max_rows: int = 12) -> str:
    """A readable report: verdict, per-leaf agreement, misses, legitimate differences, table-only notes."""
    n_missed = len(self.missed) + len(self.output_missed)
    head = (f"CrossCheck: {'OK' if self.ok else 'FAILED'} -- {len(self.missed)} missed parameter "
            f"entries, {len(self.output_missed)} missed output entries, {len(self.legitimate)} "
            f"legitimate differences, {len(self.features)} features")
    lines = [head]
    from jaxsurgery._src import display
    rows = []
    for p, a in self.per_leaf.items():
      rows.append([p or "<root>", f"{a.both}", f"{a.table_only}", f"{a.probe_only}", f"{a.live_only}",
                   f"{a.legitimate} legit, {a.missed} missed" if a.probe_only or a.live_only else "",
                   "exact" if a.exact else ""])
    lines.append(display.columns(rows, ["parameter", "both", "table-only", "probe-only", "live-only",
                                        "probe/live-only", ""]))
    if n_missed:
      lines.append("Missed (probe found, table lacks, not explained):")
      mgroups: dict[tuple[str, str], list[Miss]] = {}
      for m in self.missed + self.output_missed:
        mgroups.setdefault((m.path, m.explanation.replace(repr(m.feature), "the feature")), []).append(m)
      for (path, expl), ms in list(mgroups.items())[:max_rows]:
        elems = [_fmt_index(e) for e in sorted({m.index for m in ms})]
        fnames = sorted({m.feature for m in ms}, key=self.features.index)
        first = ms[0]
        lines.append(f"  {path or '<root>'}: {len(ms)} entries, elements {_compact(elems, 4)}; features "
                     f"{_compact(fnames)}; e.g. {path}{_fmt_index(first.index)} x {first.feature}\n"
                     f"    {first.explanation}")
      if len(mgroups) > max_rows:
        lines.append(f"  ... {len(mgroups) - max_rows} more groups")
    if self.legitimate:
      lines.append("Legitimate differences (probe-only and live-only; the gradient sees effects after the "
                   "first contact):")
      groups: dict[tuple[str, str], list[Difference]] = {}
      for d in self.legitimate:
        groups.setdefault((d.path, d.explanation), []).append(d)
      for (path, expl), ds in list(groups.items())[:max_rows]:
        elems = sorted({d.index for d in ds})
        fnames = sorted({d.feature for d in ds}, key=self.features.index)
        lines.append(f"  {path}: {len(ds)} entries, elements {_compact([_fmt_index(e) for e in elems], 4)}; "
                     f"features {_compact(fnames)}\n    {expl}")
      if len(groups) > max_rows:
        lines.append(f"  ... {len(groups) - max_rows} more groups")
    if self.table_only_notes:
      lines.append("Table only (boolean over-approximation relative to the gradient):")
      for p, note in self.table_only_notes.items():
        lines.append(f"  {p}: {note}")
    for n in self.notes:
      lines.append(f"Note: {n}")
    return "\n".join(lines)

  def __repr__(self) -> str:
    return self.report()


def _bits(mask: int) -> list[int]:
  out = []
  k = 0
  while mask:
    if mask & 1:
      out.append(k)
    mask >>= 1
    k += 1
  return out


def _contact_phrase(rec: _Record) -> str:
  if rec.prim in _MULTIPLICATIVE or rec.prim == "div":
    return "multiplicative"
  if rec.prim in _ADDITIVE_CONTACT:
    return "additive"
  if rec.prim in _SELECTION or rec.prim in _INDEXED:
    return "selection"
  if rec.prim in _ZERO_GRAD:
    return "zero-gradient"
  return "other"


_KIND_NOTE = {
    "additive": "the gradient of an added/placed parameter does not depend on its partner, so the probe "
                "sees the contact only through later operations",
    "selection": "the gradient flows only to the selected element/row (max, select, gather), so other "
                 "candidates keep their gradient",
    "zero-gradient": "a comparison or rounding has zero gradient",
    "multiplicative": "the partner stayed zero at the base (e.g. an unnamed input at zero, padding-only "
                      "taps) or everything downstream was dead or saturated in every draw",
    "other": "the operation's gradient did not change in the draws",
}


def cross_check(table: FeatureTable, probe: FeatureTable) -> CrossCheck:
  """Checks the boolean table against the gradient probe: nothing the probe finds may be missing.

  Every (element, feature) pair is counted per parameter leaf as ``both``,
  ``table_only`` or ``probe_only`` (probe table vs boolean table), plus
  ``live_only``: pairs outside both tables that changed the element's gradient
  only in runs where its first contact was live (``probe.evidence``). A
  probe-only or live-only entry ``(p[e], f)`` is *legitimate* when all of these
  hold (else it is *missed*):

  1. the contact-local gradient of ``p[e]`` (autodiff cut right after the
     operations where ``p``'s feature-free chain first meets feature-dependent
     values) does not change when ``f`` is switched on: ``f`` does not reach
     ``p[e]``'s first contacts;
  2. the change was seen where that contact-local gradient is nonzero at the
     base (the first contact is live, so the output gradient of ``p[e]``
     carries the cotangent from later operations): always true of live-only
     entries; a probe-only entry needs ``p[e]`` live in every run, since an
     element annihilated in some run is read from those runs only, where only
     a first-contact feature can change its gradient;
  3. some operation after ``p``'s first contact has a local derivative that
     depends on ``f`` (a multiplication by, division by, nonlinearity of,
     selection or indexing by an ``f``-dependent value); it is named in the
     report.

  Without evidence (``probe.evidence`` is None, or describes other features or
  shapes) every probe-only entry is missed, with a note.

  Output masks are checked too: an output element that changes when ``f`` is
  switched on must have ``f`` in its forward mask (no legitimate exception).

  Table-only entries are not errors (the boolean table over-approximates); the
  report summarises them per leaf with the kind of contact that hides them
  from gradients.

  Args:
    table: the boolean table (:func:`dependency_table`).
    probe: the gradient table (:func:`gradient_table`) of the same function,
      params, inputs and features.

  Returns:
    A :class:`CrossCheck`; ``.ok`` is True iff nothing is missed.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    >>> x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
    >>> table = js.dependency_table(fn, params, x, spec)
    >>> probe = js.gradient_table(fn, params, x, spec, key=jax.random.key(0))
    >>> js.cross_check(table, probe).ok
    True
  """
  for name, t in (("table", table), ("probe", probe)):
    if not isinstance(t, FeatureTable):
      raise TypeError(f"cross_check: {name} must be a FeatureTable, got {type(t).__name__}.")
  if tuple(table.features) != tuple(probe.features):
    raise ValueError("cross_check: the two tables have different features.\n"
                     f"  table: {list(table.features)}\n  probe: {list(probe.features)}")
  if tuple(table.paths) != tuple(probe.paths) or any(
      tuple(table.shapes[p]) != tuple(probe.shapes[p]) for p in table.paths):
    raise ValueError("cross_check: the two tables have different parameter leaves or shapes.\n"
                     f"  table: {[(p, table.shapes[p]) for p in table.paths]}\n"
                     f"  probe: {[(p, probe.shapes[p]) for p in probe.paths]}")
  notes: list[str] = []
  F = table.num_features
  names = table.features
  ev = probe.evidence
  if ev is not None and not isinstance(ev, ProbeEvidence):
    notes.append(f"the probe's evidence is a {type(ev).__name__}, not a ProbeEvidence; ignored.")
    ev = None
  if ev is not None and (tuple(ev.features) != tuple(probe.features) or any(
      tuple(ev.shapes.get(p, ())) != tuple(probe.shapes[p]) for p in probe.paths)):
    notes.append("the probe's evidence describes other features or parameter shapes than the probe "
                 "table; ignored.")
    ev = None
  if ev is None:
    notes.append("the probe carries no evidence from gradient_table (contact-local gradients, "
                 "liveness); every probe-only entry is reported as missed.")
  elif ev.ids_capped:
    notes.append(f"categorical features with more than max_ids ids were sampled: {list(ev.ids_capped)}; "
                 "their unsampled rows appear as table-only.")
  if ev is not None and ev.positive_draws:
    notes.append(f"{ev.positive_draws} of {ev.draws} draws were redrawn with positive parameters "
                 "because the base gave non-finite values.")
  if ev is not None and ev.nonfinite:
    notes.append(f"elements with non-finite gradients (not marked where non-finite): {dict(ev.nonfinite)}")
  if ev is not None:
    notes.extend(ev.notes)
  walk = None
  if table.jaxpr is not None and table.spec is not None:
    walk = _static(table.jaxpr, len(table.paths), table.spec)
  elif table.jaxpr is None:
    notes.append("the boolean table has no jaxpr: operations cannot be named.")

  # Per parameter leaf: first downstream op explaining each feature; contact records.
  downs_by_leaf: list[list[_Record]] = [[] for _ in table.paths]
  contacts_by_leaf: list[list[_Record]] = [[] for _ in table.paths]
  if walk is not None:
    for rec in walk.downs.values():
      for j in _bits(rec.params):
        if j < len(table.paths):
          downs_by_leaf[j].append(rec)
    for rec in walk.contacts.values():
      for j in _bits(rec.params):
        if j < len(table.paths):
          contacts_by_leaf[j].append(rec)

  missed: list[Miss] = []
  legit: list[Difference] = []
  per_leaf: dict[str, LeafAgreement] = {}
  notes_leaf: dict[str, str] = {}
  for j, path in enumerate(table.paths):
    shape = tuple(table.shapes[path])
    T = table.mask(path)
    P = probe.mask(path)
    both = int((T & P).sum())
    t_only = T & ~P
    p_only = P & ~T
    total = int(np.prod(shape, dtype=np.int64)) * F
    down = np.zeros(F, bool)
    first_down: dict[int, _Record] = {}
    for rec in downs_by_leaf[j]:
      for k in _bits(rec.features):
        if k < F and k not in first_down:
          first_down[k] = rec
          down[k] = True
    if ev is not None:
      cchange = ev.mask("contact_change", path)
      live = ev.mask("live", path)
      ann = ev.mask("annihilated", path)
      x_only = ev.mask("live_only", path) & ~T & ~P
    else:
      cchange = np.zeros(shape + (F,), bool)
      live = ann = np.zeros(shape, bool)
      x_only = np.zeros(shape + (F,), bool)
    # Probe-table entries of an element annihilated in some run come from such runs only, where
    # only a first contact can change the gradient: never legitimate. Live-only entries were
    # seen in live runs; probe-table entries of elements live in every run too.
    ok_entry = ((p_only & (live & ~ann)[..., None]) | x_only) & ~cchange & down
    miss_entry = (p_only | x_only) & ~ok_entry
    contacts = contacts_by_leaf[j]
    via = _compact(sorted({r.desc for r in contacts}), 3) if contacts else "no first contact found"
    kinds = sorted({_contact_phrase(r) for r in contacts})
    if miss_entry.any():
      for idx in zip(*np.nonzero(miss_entry)):
        e, k = tuple(int(i) for i in idx[:-1]), int(idx[-1])
        if cchange[idx]:
          why = (f"the contact-local gradient (autodiff cut after the first contact via {via}) changes "
                 f"when {names[k]!r} is switched on: a first-contact touch the table lacks")
        elif p_only[idx] and ann[e] and live[e]:
          why = (f"its first contact ({via}) is annihilated at the base of some run (contact-local "
                 f"gradient 0), and the probe reads this element from those runs only, where only a "
                 f"first contact with {names[k]!r} can change its gradient; the table lacks it")
        elif not live[e]:
          why = (f"its first contact ({via}) is annihilated at the base (contact-local gradient 0 in "
                 f"every draw), so only a first contact with {names[k]!r} can change its gradient; the "
                 f"table lacks it")
        else:
          why = (f"no operation after its first contact ({via}) depends on {names[k]!r}, so nothing "
                 f"explains the gradient change")
        missed.append(Miss(path, e, names[k], why))
    if ok_entry.any():
      cache: dict[int, str] = {}
      for idx in zip(*np.nonzero(ok_entry)):
        e, k = tuple(int(i) for i in idx[:-1]), int(idx[-1])
        rec = first_down[k]
        lo = bool(x_only[idx])
        if (k, lo) not in cache:
          cache[k, lo] = (
              f"`{path}` enters via {via} ({'/'.join(kinds) or 'unknown'} contact, not annihilated "
              f"at the base), then {rec.desc} {rec.how} the feature: its cotangent, hence its "
              f"gradient, changes" + (" (seen only in runs where the contact is live; the probe table "
                                      "reads this element from runs where it is annihilated)" if lo else ""))
        legit.append(Difference(path, e, names[k], rec.prim, cache[k, lo]))
    n_t = int(t_only.sum())
    if n_t:
      confirmed = int((t_only & cchange).sum())
      parts = [f"{n_t} entries"]
      if confirmed:
        parts.append(f"{confirmed} of them confirmed by the contact-local gradient (the output gradient "
                     f"did not change: downstream dead, saturated or cut in every draw)")
      ktxt = "; ".join(f"{k}: {_KIND_NOTE[k]}" for k in kinds) if kinds else "no first contact found"
      parts.append(f"contacts via {via} -- {ktxt}")
      notes_leaf[path] = "; ".join(parts)
    n_m = int(miss_entry.sum())
    per_leaf[path] = LeafAgreement(both, n_t, int(p_only.sum()), total, int(ok_entry.sum()), n_m,
                                   int(x_only.sum()))

  # Outputs: forward differences must be inside the forward masks.
  out_missed: list[Miss] = []
  out_leaf: dict[str, LeafAgreement] = {}
  if tuple(table.output_paths) == tuple(probe.output_paths):
    for path in table.output_paths:
      T = table.output_mask(path)
      P = probe.output_mask(path)
      miss = P & ~T
      for idx in zip(*np.nonzero(miss)):
        e, k = tuple(int(i) for i in idx[:-1]), int(idx[-1])
        out_missed.append(Miss(path, e, names[k],
                               f"the output changes when {names[k]!r} is switched on but its forward "
                               f"mask lacks it: a forward rule drops a dependence"))
      out_leaf[path] = LeafAgreement(int((T & P).sum()), int((T & ~P).sum()), int(miss.sum()),
                                     int(T[..., 0].size) * F, 0, int(miss.sum()))
  else:
    notes.append("output leaves differ between the tables; outputs not compared.")
  return CrossCheck(tuple(names), tuple(missed), tuple(legit), per_leaf, notes_leaf, tuple(out_missed),
                    out_leaf, tuple(notes))
