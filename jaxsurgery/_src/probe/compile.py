"""The probe's compiled functions: one jitted base and one jitted chunk function per traced function.

They evaluate the traced jaxpr, never ``fn`` itself, and are cached across
calls (:data:`COMPILED`, keyed weakly by ``fn`` and by the abstract signature,
so an entry does not keep ``fn`` alive). Like ``jax.jit``, a function whose
behaviour changes through global state must be a new object. Columns (one per
probed feature or id) are vmapped in chunks sized from a memory budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.probe.contact import ContactSum, contact_eval

_COMPILER_OPTIONS: dict[str, Any] | None = None
# Small problems: XLA's compile time dominates the run time. Without backend optimisation and
# with the classic (non-"fusion emitter") CPU codegen, the probe compiles 3-5x faster.
_FAST_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_SUPPORTED_OPTIONS: dict[tuple, bool] = {}
# (params + intermediates) x columns x runs below which XLA's compile time dominates the run time
FAST_COMPILE_ELEMENTS = 1 << 27

MEMORY_BUDGET = 1 << 30   # bytes of device memory the vmapped columns of one chunk may use
MAX_CHUNK = 128           # columns per chunk at most (beyond this vmap gains nothing)
CACHE_SIZE = 8            # compiled probe functions kept (LRU, weakly keyed by fn)

#: The compiled probe functions (see the module docstring).
COMPILED = compat.WeakLRU(CACHE_SIZE)

_BIG_LEAF = 1 << 20  # float leaves at least this large are not concatenated with others


class BaseInfo(NamedTuple):
  """What the base function measures at a run's base input (device arrays)."""

  live: list[Any]           # per group of float leaves (flat): contact-local gradient nonzero
  grad_scale: list[Any]     # per group (flat): the leaf's largest |output gradient| (atol's scale)
  contact_scale: list[Any]  # per group (flat): the leaf's largest |contact-local gradient|
  placed: list[Any]         # per float leaf: live elements of placing first contacts
  finite: Any               # outputs and gradients are finite at the base


class Fns(NamedTuple):
  """The two compiled functions of one traced function."""

  base: Callable    # (pf, po, consts, x, r, seed) -> BaseInfo
  chunk: Callable   # (..., accumulators) -> accumulators with the chunk's columns ORed in


def groups(sizes: Sequence[int]) -> list[list[int]]:
  """Consecutive float leaves processed together: small ones concatenated, large ones alone.

  Concatenating gives one fusion per operation instead of one per leaf (half the
  compile time); large leaves stay alone (no copy).
  """
  out: list[list[int]] = []
  for t, n in enumerate(sizes):
    if n >= _BIG_LEAF or not out or sizes[out[-1][-1]] >= _BIG_LEAF:
      out.append([t])
    else:
      out[-1].append(t)
  return out


def chunking(C: int, chunk_size: int | None, memory_budget: int | None, per_column: int) -> int:
  """Columns per chunk: ``chunk_size``, or as many as ``memory_budget`` allows; balanced over chunks."""
  if chunk_size is not None:
    cap = chunk_size
  else:
    budget = MEMORY_BUDGET if memory_budget is None else memory_budget
    cap = max(1, min(MAX_CHUNK, budget // max(per_column, 1)))
  cap = max(1, min(cap, C))
  n = -(-C // cap)
  return -(-C // n)


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


def _changed_scaled(a, b, scale, rtol, atol):
  """:func:`_changed` for float gradients, with ``atol`` scaled per element by its leaf's ``scale``."""
  fin = jnp.isfinite(a) & jnp.isfinite(b)
  tol = rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)) + atol * scale
  return fin & (jnp.abs(a - b) > tol), ~fin


class _Evaluators(NamedTuple):
  grad_proj: Callable    # (pf, po, consts, x, r) -> (gradient of the output projection, outputs)
  grad_simple: Callable  # (pf, po, consts, x, seed) -> gradient of the simple contact-local sum
  contacts: Callable     # (pf, po, consts, x, seed) -> ContactSum


def _evaluators(jaxpr, n_params: int, float_idx: tuple[int, ...], in_flags: tuple,
                out_float: Sequence[bool]) -> _Evaluators:
  """The differentiated evaluations of the jaxpr, with the float and other parameters apart."""
  other_idx = tuple(i for i in range(n_params) if i not in float_idx)

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
    acc = ContactSum(seed)
    contact_eval(jaxpr, consts, merge(pf, po) + list(x), in_flags, acc)
    return acc

  grad_proj = jax.grad(projection, has_aux=True)
  grad_simple = jax.grad(lambda pf, po, consts, x, seed: contacts(pf, po, consts, x, seed).simple)
  return _Evaluators(grad_proj, grad_simple, contacts)


def _flattener(leaf_groups: list[list[int]]):
  """Float leaves -> one flat vector per group (see :func:`groups`)."""
  def flat(ts, lead: tuple = ()):
    out = []
    for g in leaf_groups:
      parts = [ts[t].reshape(lead + (-1,)) for t in g]
      dtype = jnp.result_type(*[x.dtype for x in parts])
      out.append(parts[0] if len(parts) == 1 else jnp.concatenate([x.astype(dtype) for x in parts], -1))
    return out
  return flat


def _base_fn(ev: _Evaluators, flat, out_float: Sequence[bool]):
  def leaf_scale(ts):
    """Per element: the largest finite |value| of its leaf (the scale of ``atol``)."""
    return flat([jnp.broadcast_to(jnp.max(jnp.where(jnp.isfinite(t), jnp.abs(t), 0), initial=0), t.shape)
                 for t in ts])

  # The base function runs a few times per call: always compile it fast.
  @functools.partial(jax.jit, compiler_options=_supported(_FAST_COMPILER_OPTIONS))
  def base_fn(pf, po, consts, x, r, seed) -> BaseInfo:
    """Liveness (flat), tolerance scales (flat), placing elements (per leaf), finiteness."""
    g, outs = ev.grad_proj(pf, po, consts, x, r)

    def sums(pf_):
      acc = ev.contacts(pf_, po, consts, x, seed)
      return jnp.stack([acc.simple, acc.compound, acc.placed])

    J = jax.jacrev(sums)(list(pf)) if pf else []
    live = flat([(jnp.abs(j[0]) > 0) | (jnp.abs(j[1]) > 0) for j in J])
    placed = [jnp.abs(j[2]) > 0 for j in J]
    finite = jnp.array(True)
    for t in list(g) + [o for o, fl in zip(outs, out_float) if fl]:
      finite = finite & jnp.all(jnp.isfinite(t))
    return BaseInfo(live, leaf_scale(g), leaf_scale([j[0] for j in J]), placed, finite)
  return base_fn


def _chunk_fn(ev: _Evaluators, flat, n_groups: int, options):
  @functools.partial(jax.jit, compiler_options=options, donate_argnums=(15, 16, 17, 18, 19))
  def chunk_fn(pf, po, consts, val, r, seed, live, scale_g, scale_c, rtol, atol, w0, rel, bit, valid,
               acc_u, acc_a, acc_c, acc_nf, acc_o):
    """Runs one chunk of columns and ORs the changed bits into the accumulators.

    ``val``: column 0 is the base, columns 1.. switch one (feature, id) on; the changed bits
    are ORed into the accumulators (flat over the float leaves, outputs per leaf). The base is a
    column of the same vmapped computation, so that elements the feature does not reach compare
    bitwise equal (a separately compiled base can round differently).
    """
    def one(v):
      g, outs = ev.grad_proj(pf, po, consts, v, r)
      gc = ev.grad_simple(pf, po, consts, v, seed)
      return flat(g), flat(gc), outs

    G, GC, O = jax.vmap(one)(val)
    W = acc_o[0].shape[-1] if acc_o else (acc_u[0].shape[-1] if acc_u else 1)
    K = min(W, -(-rel.shape[0] // M.BITS) + 1)
    place = lambda ch: _place(ch, rel, bit, valid, K)
    n_nf = jnp.zeros((), jnp.int32)
    new: tuple[list, list, list, list] = ([], [], [], [])
    for t in range(n_groups):
      ch, nf = _changed_scaled(G[t][1:], G[t][0], scale_g[t], rtol, atol)
      contrib = place(ch)
      new[0].append(_or_into(acc_u[t], contrib, w0))
      new[1].append(_or_into(acc_a[t], jnp.where(live[t][:, None], jnp.uint32(0), contrib), w0))
      nf = nf & valid[:, None]
      new[2].append(acc_nf[t] | jnp.any(nf, axis=0))
      n_nf = n_nf + jnp.sum(nf)
      changed_c = _changed_scaled(GC[t][1:], GC[t][0], scale_c[t], rtol, atol)[0]
      new[3].append(_or_into(acc_c[t], place(changed_c), w0))
    acc_o = [_or_into(acc, place(_changed(o[1:], o[0], rtol, atol)[0]), w0) for acc, o in zip(acc_o, O)]
    # A small output to wait on (the accumulators are donated to the next chunk).
    return new[0], new[1], new[3], new[2], acc_o, n_nf
  return chunk_fn


def build(closed, n_params: int, float_idx: Sequence[int], in_flags, out_float: Sequence[bool],
          fast: bool) -> Fns:
  """The jitted base and chunk functions of one traced function (see :func:`gradient_table`)."""
  jaxpr = closed.jaxpr
  float_idx = tuple(float_idx)
  ev = _evaluators(jaxpr, n_params, float_idx, tuple(in_flags), out_float)
  options = _supported(_FAST_COMPILER_OPTIONS) if fast else _COMPILER_OPTIONS
  leaf_groups = groups([int(np.prod(jaxpr.invars[i].aval.shape, dtype=np.int64)) for i in float_idx])
  flat = _flattener(leaf_groups)
  return Fns(_base_fn(ev, flat, out_float), _chunk_fn(ev, flat, len(leaf_groups), options))
