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
from jaxsurgery._src.probe import fused
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
#: Float leaves at least this large whose every use is a dot are factored (fused.py).
FACTOR_MIN = 1 << 18
#: Bytes of one block of a factored leaf's per-column gradient (computed, compared, dropped).
TILE_BYTES = 4 << 20


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


class Layout(NamedTuple):
  """How the chunk function treats the float leaves (positions in ``float_idx``)."""

  groups: list[list[int]]                  # processed together (see :func:`groups`)
  uses: list[tuple[int, fused.Use]]        # the factored leaves' dot uses, in evaluation order
  reached: frozenset[int]                  # leaves the simple contact-local sum depends on

  @property
  def factored(self) -> frozenset[int]:
    return frozenset(t for t, _ in self.uses)


def layout(closed, n_params: int, float_idx: Sequence[int], in_flags) -> Layout:
  """The chunk function's :class:`Layout` of a traced function (a static walk of its jaxpr)."""
  jaxpr = closed.jaxpr
  sizes = [int(np.prod(jaxpr.invars[i].aval.shape, dtype=np.int64)) for i in float_idx]
  candidates = {t: jaxpr.invars[i] for t, i in enumerate(float_idx) if sizes[t] >= FACTOR_MIN}
  uses = fused.factored_uses(jaxpr, candidates)
  factored = {t for t, _ in uses}
  bits = [0] * len(jaxpr.invars)
  for t, i in enumerate(float_idx):
    bits[i] = 1 << t
  reached = fused.flow(jaxpr, in_flags, bits).reached
  return Layout(groups(sizes, alone=factored), uses,
                frozenset(t for t in range(len(float_idx)) if reached >> t & 1))


def groups(sizes: Sequence[int], alone=frozenset()) -> list[list[int]]:
  """Consecutive float leaves processed together: small ones concatenated, large ones alone.

  Concatenating gives one fusion per operation instead of one per leaf (half the
  compile time); large leaves stay alone (no copy), and so do the leaves in ``alone``.
  """
  single = lambda t: sizes[t] >= _BIG_LEAF or t in alone
  out: list[list[int]] = []
  for t in range(len(sizes)):
    if single(t) or not out or single(out[-1][-1]):
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


class Placement(NamedTuple):
  """Where a chunk's columns go in the packed masks (see gradient_table._placement)."""

  rel: Any      # per column: its word, relative to the chunk's first word
  bit: Any      # per column: its bit in that word
  valid: Any    # per column: a real column (the last chunk is padded)
  K: int        # words a chunk spans


def _changed_bits(cols, base, scale, rtol, atol, where: Placement):
  """The columns of ``cols`` (columns, *shape) that differ from ``base``, packed, and non-finite ones.

  A float element differs when ``|a - b| > rtol * max(|a|, |b|) + atol * scale`` with both
  finite. Returns ``(*shape, K)`` uint32 words (column c sets bit ``bit[c]`` of word ``rel[c]``)
  and a ``shape`` bool: some valid column is non-finite there. One elementwise pass with the
  columns unrolled: XLA fuses it into one loop over the elements, 5x faster than reducing
  over a columns axis.
  """
  one = jnp.left_shift(jnp.uint32(1), where.bit.astype(jnp.uint32))
  words = [jnp.zeros(base.shape, jnp.uint32) for _ in range(where.K)]
  nonfinite = jnp.zeros(base.shape, bool)
  inexact = jnp.issubdtype(cols.dtype, jnp.inexact)
  if inexact:
    abs_b, fin_b, tol_b = jnp.abs(base), jnp.isfinite(base), atol * scale
  for c in range(cols.shape[0]):
    a = cols[c]
    if inexact:
      fin = jnp.isfinite(a) & fin_b
      ch = fin & (jnp.abs(a - base) > rtol * jnp.maximum(jnp.abs(a), abs_b) + tol_b)
      nonfinite = nonfinite | (~fin & where.valid[c])
    else:
      ch = a != base
    for w in range(where.K):
      m = jnp.where((where.rel[c] == w) & where.valid[c], one[c], jnp.uint32(0))
      words[w] = words[w] | jnp.where(ch, m, jnp.uint32(0))
  return jnp.stack(words, axis=-1), nonfinite


def _output_scale(b):
  """The largest finite |value| of an output (the scale of ``atol`` for forward differences)."""
  if not jnp.issubdtype(b.dtype, jnp.inexact):
    return None
  return jnp.max(jnp.where(jnp.isfinite(b), jnp.abs(b), 0.0), initial=0.0)


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


def _or_rows(acc, contrib, e0, w0):
  """``acc`` (n, W) with ``contrib`` (rows, K) ORed in at row ``e0``, word ``w0``."""
  cur = jax.lax.dynamic_slice(acc, (e0, w0), contrib.shape)
  return jax.lax.dynamic_update_slice(acc, cur | contrib, (e0, w0))


class _Evaluators(NamedTuple):
  grad_proj: Callable    # (pf, po, consts, x, r) -> (gradient of the output projection, outputs)
  contacts: Callable     # (pf, po, consts, x, seed) -> ContactSum


def _merger(n_params: int, float_idx: tuple[int, ...]):
  """(float leaves, other leaves) -> the flat parameter list of the jaxpr."""
  other_idx = tuple(i for i in range(n_params) if i not in float_idx)

  def merge(pf, po):
    flat: list[Any] = [None] * n_params
    for i, x in zip(float_idx, pf):
      flat[i] = x
    for i, x in zip(other_idx, po):
      flat[i] = x
    return flat
  return merge


def _projection(outs, r, out_float):
  """The random projection of the outputs that is differentiated."""
  s = jnp.zeros((), jnp.float32)
  for o, ri, fl in zip(outs, r, out_float):
    if fl:
      s = s + jnp.sum(ri * jnp.real(o).astype(jnp.float32))
  return s


def _evaluators(jaxpr, n_params: int, float_idx: tuple[int, ...], in_flags: tuple,
                out_float: Sequence[bool]) -> _Evaluators:
  """The base function's differentiated evaluations of the jaxpr."""
  merge = _merger(n_params, float_idx)

  def projection(pf, po, consts, x, r):
    outs = jax.core.eval_jaxpr(jaxpr, consts, *merge(pf, po), *x)
    return _projection(outs, r, out_float), outs

  def contacts(pf, po, consts, x, seed):
    acc = ContactSum(seed)
    contact_eval(jaxpr, consts, merge(pf, po) + list(x), in_flags, acc)
    return acc

  return _Evaluators(jax.grad(projection, has_aux=True), contacts)


def _concat(parts):
  """Leaves -> one flat vector (one group, see :func:`groups`)."""
  parts = [x.reshape(-1) for x in parts]
  if len(parts) == 1:
    return parts[0]
  dtype = jnp.result_type(*[x.dtype for x in parts])
  return jnp.concatenate([x.astype(dtype) for x in parts], -1)


def _flattener(leaf_groups: list[list[int]]):
  """Float leaves -> one flat vector per group (see :func:`groups`)."""
  return lambda ts: [_concat([ts[t] for t in g]) for g in leaf_groups]


def _base_fn(ev: _Evaluators, flat, out_float: Sequence[bool], options):
  def leaf_scale(ts):
    """Per element: the largest finite |value| of its leaf (the scale of ``atol``)."""
    return flat([jnp.broadcast_to(jnp.max(jnp.where(jnp.isfinite(t), jnp.abs(t), 0), initial=0), t.shape)
                 for t in ts])

  @functools.partial(jax.jit, compiler_options=options)
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


class _Column(NamedTuple):
  """What one column's evaluation gives the chunk function (vmapped: a leading columns axis)."""

  grads: list     # per group: the flat output-projection gradient, or None for a factored leaf
  contact: list   # per group: the flat contact-local gradient, or None where it is zero
  outs: list      # the outputs
  resid: list     # per factored use: the dot's other operand
  dz: list        # per factored use: the dot output's cotangent


def _column_fn(jaxpr, n_params: int, float_idx: tuple[int, ...], in_flags: tuple, out_float: Sequence[bool],
               lay: Layout):
  """One column: one forward pass, the projection's and the contact-local gradients (fused.py)."""
  merge = _merger(n_params, float_idx)
  factored = lay.factored
  dense = [t for t in range(len(float_idx)) if t not in factored]
  reached = sorted(lay.reached)
  leafmap = {jaxpr.invars[float_idx[t]]: t for t in factored}
  uses = [u for _, u in lay.uses]

  def column(pf, po, consts, x, r, seed) -> _Column:
    def replaced(ts, values):
      full = list(pf)
      for t, v in zip(ts, values):
        full[t] = v
      return merge(full, po) + list(x)

    def projection(pd, zs):
      st = fused._State(zs)
      outs, _ = fused.main_eval(jaxpr, consts, replaced(dense, pd), in_flags, leafmap, st)
      return _projection(outs, r, out_float), (outs, st.captured, st.resid)

    (gd, dz), (outs, captured, resid) = jax.grad(projection, argnums=(0, 1), has_aux=True)(
        [pf[t] for t in dense], fused.zeros_for(uses))

    def contact_sum(pr):
      acc = ContactSum(seed)
      fused.contact_sum(jaxpr, consts, replaced(reached, pr), in_flags, iter(captured), acc)
      return acc.simple

    gc = dict(zip(reached, jax.grad(contact_sum)([pf[t] for t in reached]))) if reached else {}
    g = dict(zip(dense, gd))
    grads = [None if grp[0] in factored else _concat([g[t] for t in grp]) for grp in lay.groups]
    contact = [_concat([gc[t] if t in gc else jnp.zeros_like(pf[t]) for t in grp])
               if any(t in gc for t in grp) else None for grp in lay.groups]
    return _Column(grads, contact, outs, resid, dz)
  return column


def _factored_update(uses, resid, dz, shape, dtype, scale, live, accs, tols, w0, where: Placement):
  """ORs a factored leaf's changed bits into its accumulators, a block of rows at a time.

  Each block of the per-column gradient is computed, compared with the base column and dropped.
  Blocks are clamped to the leaf (the last one may overlap the one before: ORs do not mind).
  """
  rtol, atol = tols
  columns = resid[0].shape[0]
  n0, rest = shape[0], int(np.prod(shape[1:], dtype=np.int64))
  rows = max(1, min(n0, TILE_BYTES // max(1, 4 * columns * rest)))
  n = rows * rest

  def block(i, carry):
    acc_u, acc_a, acc_nf = carry
    r0 = jnp.minimum(i * rows, n0 - rows)
    g = fused.factored_rows(uses, resid, dz, shape, dtype, r0, rows).reshape(columns, n)
    e0 = r0 * rest
    contrib, nf = _changed_bits(g[1:], g[0], jax.lax.dynamic_slice_in_dim(scale, e0, n), rtol, atol, where)
    lv = jax.lax.dynamic_slice_in_dim(live, e0, n)
    acc_u = _or_rows(acc_u, contrib, e0, w0)
    acc_a = _or_rows(acc_a, jnp.where(lv[:, None], jnp.uint32(0), contrib), e0, w0)
    nf = nf | jax.lax.dynamic_slice_in_dim(acc_nf, e0, n)
    return acc_u, acc_a, jax.lax.dynamic_update_slice_in_dim(acc_nf, nf, e0, 0)

  return jax.lax.fori_loop(0, -(-n0 // rows), block, accs)


def _chunk_fn(column, lay: Layout, shapes: list[tuple[int, ...]], dtypes: list[Any], options):
  by_leaf: dict[int, list[int]] = {}
  for k, (t, _) in enumerate(lay.uses):
    by_leaf.setdefault(t, []).append(k)

  @functools.partial(jax.jit, compiler_options=options, donate_argnums=(15, 16, 17, 18, 19))
  def chunk_fn(pf, po, consts, val, r, seed, live, scale_g, scale_c, rtol, atol, w0, rel, bit, valid,
               acc_u, acc_a, acc_c, acc_nf, acc_o):
    """Runs one chunk of columns and ORs the changed bits into the accumulators.

    ``val``: column 0 is the base, columns 1.. switch one (feature, id) on; the changed bits
    are ORed into the accumulators (flat per group of float leaves, outputs per leaf). The base
    is a column of the same vmapped computation, so that elements the feature does not reach
    compare bitwise equal (a separately compiled base can round differently).
    """
    col = jax.vmap(lambda v: column(pf, po, consts, v, r, seed))(val)
    W = acc_o[0].shape[-1] if acc_o else (acc_u[0].shape[-1] if acc_u else 1)
    K = min(W, -(-rel.shape[0] // M.BITS) + 1)
    where = Placement(rel, bit, valid, K)
    new: tuple[list, list, list, list] = ([], [], [], [])
    for t, grp in enumerate(lay.groups):
      if col.grads[t] is None:
        (leaf,) = grp
        ks = by_leaf[leaf]
        u, a, nf = _factored_update([lay.uses[k][1] for k in ks], [col.resid[k] for k in ks],
                                    [col.dz[k] for k in ks], shapes[leaf], dtypes[leaf], scale_g[t], live[t],
                                    (acc_u[t], acc_a[t], acc_nf[t]), (rtol, atol), w0, where)
      else:
        g = col.grads[t]
        contrib, nf = _changed_bits(g[1:], g[0], scale_g[t], rtol, atol, where)
        u = _or_into(acc_u[t], contrib, w0)
        a = _or_into(acc_a[t], jnp.where(live[t][:, None], jnp.uint32(0), contrib), w0)
        nf = acc_nf[t] | nf
      new[0].append(u)
      new[1].append(a)
      new[2].append(nf)
      gc = col.contact[t]
      if gc is None:  # the contact-local gradient is zero there: nothing changes
        new[3].append(acc_c[t])
      else:
        new[3].append(_or_into(acc_c[t], _changed_bits(gc[1:], gc[0], scale_c[t], rtol, atol, where)[0], w0))
    acc_o = [_or_into(acc, _changed_bits(o[1:], o[0], _output_scale(o[0]), rtol, atol, where)[0], w0)
             for acc, o in zip(acc_o, col.outs)]
    # A small output to wait on (the accumulators are donated to the next chunk).
    return new[0], new[1], new[3], new[2], acc_o, jnp.zeros((), jnp.int32) + len(new[0])
  return chunk_fn


def build(closed, n_params: int, float_idx: Sequence[int], in_flags, out_float: Sequence[bool],
          fast: bool, lay: Layout) -> Fns:
  """The jitted base and chunk functions of one traced function (see :func:`gradient_table`)."""
  jaxpr = closed.jaxpr
  float_idx = tuple(float_idx)
  in_flags = tuple(in_flags)
  ev = _evaluators(jaxpr, n_params, float_idx, in_flags, out_float)
  options = _supported(_FAST_COMPILER_OPTIONS) if fast else _COMPILER_OPTIONS
  column = _column_fn(jaxpr, n_params, float_idx, in_flags, out_float, lay)
  avals = [jaxpr.invars[i].aval for i in float_idx]
  return Fns(_base_fn(ev, _flattener(lay.groups), out_float, options),
             _chunk_fn(column, lay, [tuple(a.shape) for a in avals], [a.dtype for a in avals], options))
