"""Novelty: which fresh elements must be zero for the new model to compute the old function.

Generalised "random in, zero out" (design §7). The mask interpreter is run on
the new model with a single feature, *novelty*, set on the new input features
and on the fresh parameter elements. Decisions are taken online, as novelty
meets fresh elements:

* **products** (``mul``, ``dot_general``, ``conv_general_dilated``): a fresh
  element that multiplies a novel value is zeroed ("zero out"); from then on it
  is a known zero and *cuts* the product, so its partner's novelty does not
  flow through it. A fresh element that multiplies old values keeps its
  initial value ("random in") and makes its product novel.
* **sums** (``add``, ``sub``, ``add_any``): a fresh element added where the
  other operand is not novel would change an old value, so it is zeroed (the
  output bias of an inserted residual block); one added to a novel value keeps
  its initial value (the bias of a new unit).
* nowhere else: a zeroed divisor, ``rsqrt`` or ``log`` argument would make an
  infinity, and ``0 * inf`` is NaN, so no later cut could hold.

Zeroed elements are tracked through the feature-free ops that parameters reach
their products through (broadcast, reshape, transpose, slice, casts...), by
applying the same op to the zero mask. If novelty still reaches an output, the
ops where it *spreads* (its share of the elements grows: a reduction over a
widened axis such as a LayerNorm's statistics, an old weight reading a novel
value) are recorded, so the report can name them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsurgery._src import compat
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.interpreter import Context
from jaxsurgery._src.core.values import Val, const_vals
from jaxsurgery._src.rules import registry

# What the pass needs to know about primitives comes from their registered traits:
# views (feature-free data movement: a zero mask is carried by applying the op to it),
# casts, products, sums, elementwise ops, and calls and loops, which are evaluated in
# place (spreading is recorded at the ops inside them).
_has = registry.has_trait


def _compound(name: str) -> bool:
  return _has(name, "call") or _has(name, "control")


@dataclasses.dataclass(frozen=True)
class Site:
  """An operation where novelty spreads to elements that its inputs did not mark."""

  primitive: str
  where: str       # source line (file:line (function)) or ""
  scope: str       # Flax/JAX name stack, e.g. "LayerNorm_0" or ""
  before: float    # novel share of the inputs (summed)
  after: float     # novel share of the output

  def describe(self) -> str:
    at = " ".join(x for x in (f"in {self.scope}" if self.scope else "",
                              f"at {self.where}" if self.where else "") if x)
    return (f"`{self.primitive}`{' ' + at if at else ''}: novel share grows "
            f"{self.before:.0%} -> {self.after:.0%}")


@dataclasses.dataclass(frozen=True)
class Novelty:
  zeroed: Mapping[str, np.ndarray | None]   # per new path: bool (broadcastable) zeroed fresh elements
  novel_outputs: tuple[str, ...]            # outputs novelty still reaches (empty: preserved)
  sites: tuple[Site, ...]                   # where it spreads, in program order
  touched: Mapping[str, np.ndarray | None] = dataclasses.field(default_factory=dict, repr=False)
  # Gathered tables grown at the end: preservation holds for ids the old table had.
  assumed_in_range: tuple[str, ...] = ()
  deferred: int = 0  # elementwise fresh factors of novel values left at init (lazy mode)


def _dense(mask, shape) -> np.ndarray:
  """Bool array (broadcastable to ``shape``) of a 1-bit packed mask."""
  if mask is None:
    return np.zeros((1,) * len(shape), bool)
  return M.lift(mask, len(shape))[..., 0] != 0


def _pack(b: np.ndarray) -> np.ndarray | None:
  if not b.any():
    return None
  return M.compress(np.asarray(b)[..., None].astype(M.WORD))


def _squeeze(b: np.ndarray) -> np.ndarray:
  """``b`` with the axes along which it is constant shrunk to size 1."""
  b = np.asarray(b)
  return M.compress(b[..., None])[..., 0] if b.ndim else b


def _contract(x, y, x_shape, y_shape, dims) -> np.ndarray:
  """``OR_c x[b, i, c] & y[b, c, j]`` for bool arrays broadcastable to the operands.

  In dot_general layout, without expanding the free axes along which they are constant.

  Where one side is constant along the contracted axes, the other is first reduced
  over them (an outer product remains); otherwise a float matmul over the shared axes.
  """
  (xc, yc), (xb, yb) = dims
  x = _squeeze(np.asarray(x).reshape((1,) * (len(x_shape) - np.ndim(x)) + np.shape(x)))
  y = _squeeze(np.asarray(y).reshape((1,) * (len(y_shape) - np.ndim(y)) + np.shape(y)))
  if all(x.shape[a] == 1 for a in xc):
    y = y.any(axis=tuple(yc), keepdims=True)
  elif all(y.shape[a] == 1 for a in yc):
    x = x.any(axis=tuple(xc), keepdims=True)
  else:
    xt, yt = list(x.shape), list(y.shape)
    for a, b in zip(xc, yc):
      xt[a] = yt[b] = x_shape[a]
    x, y = np.broadcast_to(x, xt), np.broadcast_to(y, yt)
  xt, yt = list(x.shape), list(y.shape)
  for a, b in zip(xb, yb):
    xt[a] = yt[b] = max(x.shape[a], y.shape[b])
  x, y = np.broadcast_to(x, xt), np.broadcast_to(y, yt)
  out = lax.dot_general(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), dims,
                        preferred_element_type=jnp.float32)
  return np.asarray(out) > 0


def _share(mask, shape) -> float:
  if mask is None:
    return 0.0
  return M.broadcast_count(_dense(mask, shape), shape) / max(int(np.prod(shape, dtype=np.int64)), 1)


def _scope(eqn) -> str:
  try:
    return str(eqn.source_info.name_stack)
  except Exception:  # pragma: no cover - private API
    return ""


def _unpulled(outs):
  """Outputs without provenance: decisions are taken where a fresh element meets novelty.

  Not further down: a value computed from old values is not a parameter, so touches stop
  there (a view of a fresh element is one too).
  """
  return [o if o.pull is None else dataclasses.replace(o, pull=None) for o in outs]


class _Context(Context):
  """The mask interpreter with one bit (novelty), online zeroing and zero tracking."""

  def __init__(self, table, fresh: list, prezero: list, grown: list, eager_mul: bool):
    super().__init__(1, [table.shapes[p] for p in table.paths], strict=False,
                     rules=registry.active_rules())
    self.fresh = fresh
    self.prezero = prezero
    self.eager_mul = eager_mul        # zero fresh elementwise factors of novel values too
    self.deferred = 0                 # lazy mode: fresh factors of novel values left at init
    self.grown = grown                # per param: {axis: old size} for axes grown at the end
    self.param_of: dict[int, int] = {}  # id(param Val) -> param index
    self.assumed: set[int] = set()    # params whose grown rows were taken as unselected
    self.views: dict[int, tuple[Val, Callable[[], np.ndarray | None]]] = {}  # id(val) -> (val kept alive, zeros)
    self._zero_cache: dict[int, tuple] = {}       # param -> (touch it was computed from, zeros)
    self._effective_cache: dict[int, tuple] = {}  # id(val) -> (val, zeros, effective val)
    self.sites: dict[tuple[str, str, str], Site] = {}

  # -- zeros ---------------------------------------------------------------
  def param_zero(self, i: int) -> np.ndarray | None:
    f = self.fresh[i]
    if f is None:
      return None
    t = self.param_touch[i]
    hit = self._zero_cache.get(i)
    if hit is not None and hit[0] is t:  # touches are replaced, never mutated
      return hit[1]
    z = self.prezero[i]
    if t is not None:
      new = f & _dense(t, self.param_shapes[i])
      z = new if z is None else (z | new)
    z = None if z is None or not z.any() else _squeeze(z)
    self._zero_cache[i] = (t, z)
    return z

  def zero_of(self, val: Val) -> np.ndarray | None:
    entry = self.views.get(id(val))
    return None if entry is None else entry[1]()

  def _view(self, val: Val, fn) -> None:
    self.views[id(val)] = (val, fn)

  # -- evaluation -----------------------------------------------------------
  def apply(self, eqn, invals):
    name = eqn.primitive.name
    involved = [id(v) in self.views for v in invals]
    if not any(involved) or _compound(name) or self._foldable(eqn, invals):
      # Calls and loops keep their operands' identity: the ops inside see the views.
      outs = _unpulled(super().apply(eqn, invals))
      self._record(eqn, invals, outs)
      return outs
    effective = [self._effective(v) for v in invals]
    if _has(name, "view") or _has(name, "cast"):
      outs = super().apply(eqn, effective)
      if involved[0]:
        self._derive(eqn, invals[0], outs[0], cast=_has(name, "cast"))
      else:
        outs = _unpulled(outs)
      self._record(eqn, effective, outs)
      return outs
    if _has(name, "product"):
      if name == "mul" and not self.eager_mul:
        # Elementwise: the product stays at the same (new) position, where a later
        # contraction can cut it; zeroing here would leave the new unit without gradient.
        if any(involved[k] and any(e.mask is not None for j, e in enumerate(effective) if j != k)
               for k in range(len(invals))):
          self.deferred += 1
        effective = [dataclasses.replace(e, pull=None) if involved[k] else e
                     for k, e in enumerate(effective)]
      outs = super().apply(eqn, effective)  # touches: fresh elements times novelty -> zero
      outs = self._cut(eqn, invals, outs)
      if any(involved[k] and self._effective(v).mask is not None for k, v in enumerate(invals[:2])):
        return _unpulled(outs)  # novelty from a kept fresh factor is "random in", not a spread
    elif _has(name, "sum"):
      outs = self._sum(eqn, invals)
    elif name == "gather" and id(invals[0]) in self.param_of and invals[1].mask is None:
      outs = super().apply(eqn, [self._unselected(eqn, invals[0], effective[0]), effective[1]])
    else:
      # No decision here: a zero is safe only as a factor or a summand (a zeroed
      # divisor or log argument would make infinities that no later cut removes).
      outs = super().apply(eqn, [dataclasses.replace(e, pull=None) if involved[k] else e
                                 for k, e in enumerate(effective)])
    outs = _unpulled(outs)
    self._record(eqn, effective, outs)
    return outs

  def _effective(self, v: Val) -> Val:
    """``v`` with the novelty of its zeroed elements removed (a known zero is not novel)."""
    z = self.zero_of(v)
    if z is None or v.mask is None:
      return v
    hit = self._effective_cache.get(id(v))
    if hit is not None and hit[0] is v and hit[1] is z:
      return hit[2]
    nov = _dense(v.mask, v.shape) & ~z
    out = dataclasses.replace(v, mask=_pack(nov))
    self._effective_cache[id(v)] = (v, z, out)
    return out

  def _unselected(self, eqn, param: Val, effective: Val) -> Val:
    """A gathered table grown at its end (a vocabulary), whose new rows bring no novelty.

    Rows past the old size are selected only by ids the old model could not take.
    """
    i = self.param_of[id(param)]
    dims = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    mask = effective.mask
    for axis in dims.start_index_map:
      old = self.grown[i].get(axis)
      if old is None or sizes[axis] != 1 or mask is None:
        continue
      rows = (np.arange(param.shape[axis]) < old).reshape(
          (1,) * axis + (-1,) + (1,) * (param.ndim - axis - 1))
      mask = _pack(_dense(mask, param.shape) & rows)
      self.assumed.add(i)
    return dataclasses.replace(effective, mask=mask, pull=None)

  def _derive(self, eqn, parent: Val, out: Val, cast: bool) -> None:
    parent_fn = self.views[id(parent)][1]
    last: list[np.ndarray] = []  # (parent zeros, derived zeros) of the last call

    def zero():
      z = parent_fn()
      if z is None or cast:
        return z
      if last and last[0] is z:  # the parent's zeros did not change
        return last[1]
      full = jnp.asarray(np.broadcast_to(z, parent.shape))
      value = _squeeze(np.asarray(compat.bind(eqn, [full])[0]).astype(bool))
      last[:] = [z, value]
      return value
    self._view(out, zero)

  def _cut(self, eqn, invals, outs):
    """Output novelty of a product, with zeroed elements as cuts."""
    zs = [self.zero_of(v) for v in invals[:2]]
    if all(z is None for z in zs):
      return outs
    a, b = invals[:2]
    nov = [_dense(v.mask, v.shape) & (True if z is None else ~z) for v, z in zip((a, b), zs)]
    live = [np.ones((1,) * v.ndim, bool) if z is None else ~z for v, z in zip((a, b), zs)]
    if eqn.primitive.name == "mul":
      out = (nov[0] & live[1]) | (nov[1] & live[0])
    elif eqn.primitive.name == "dot_general":
      out = np.zeros((1,) * len(outs[0].shape), bool)
      if nov[0].any():
        out = out | _contract(nov[0], live[1], a.shape, b.shape, eqn.params["dimension_numbers"])
      if nov[1].any():
        out = out | _contract(live[0], nov[1], a.shape, b.shape, eqn.params["dimension_numbers"])
    else:
      full = lambda x, v: jnp.asarray(np.broadcast_to(x, v.shape), jnp.float32)
      params = dict(eqn.params, preferred_element_type=np.float32)
      bind = lambda x, y: np.asarray(eqn.primitive.bind(x, y, **params)) > 0
      out = np.zeros((1,) * len(outs[0].shape), bool)
      if nov[0].any():
        out = out | bind(full(nov[0], a), full(live[1], b))
      if nov[1].any():
        out = out | bind(full(live[0], a), full(nov[1], b))
    return [dataclasses.replace(outs[0], mask=_pack(np.broadcast_to(out, outs[0].shape)))]

  def _sum(self, eqn, invals):
    """A fresh element added where nothing else is novel is zeroed; one added to novelty is kept."""
    effective = [self._effective(v) for v in invals]
    novs = [_dense(v.mask, v.shape) for v in effective]
    shape = tuple(eqn.outvars[0].aval.shape)
    for k, v in enumerate(invals):
      if id(v) not in self.views or v.pull is None or not novs[k].any():
        continue
      if all(w.const is not None for j, w in enumerate(invals) if j != k):
        continue  # a fresh statistic plus a constant (var + eps) is not an old value
      others = np.zeros((1,) * len(shape), bool)
      for j, n in enumerate(novs):
        if j != k:
          others = others | n
      alone = np.broadcast_to(novs[k], shape) & ~others
      if alone.any():
        self.touch(v, M.unbroadcast(_pack(alone), v.shape))
    # Decisions taken: recompute, and keep the remaining fresh elements from being
    # zeroed by their (novel) partners.
    effective = [dataclasses.replace(self._effective(v), pull=None) if id(v) in self.views
                 else v for v in invals]
    return super().apply(eqn, effective)

  def _record(self, eqn, invals, outs) -> None:
    if _compound(eqn.primitive.name) or not outs or all(o.mask is None for o in outs):
      return
    shares = [_share(v.mask, v.shape) for v in invals if v.mask is not None]
    # Elementwise ops take the union of their operands' novelty (spreading means more
    # than the sum); anything else combines elements (more than the largest share).
    before = sum(shares) if _has(eqn.primitive.name, "elementwise") else max(shares, default=0.0)
    if before == 0.0:
      return
    after = max(_share(o.mask, o.shape) for o in outs)
    if after > before * (1 + 1e-6) + 1e-9:  # shares are float ratios
      site = Site(eqn.primitive.name, compat.source_line(eqn), _scope(eqn), min(before, 1.0), after)
      self.sites.setdefault((site.primitive, site.where, site.scope), site)


_PACKED: dict[int, tuple] = {}


def _packed_fresh(fresh) -> dict:
  """Packed fresh masks, computed once per ``fresh`` mapping (the rounds share it)."""
  hit = _PACKED.get(id(fresh))
  if hit is None or hit[0] is not fresh:
    _PACKED.clear()  # one plan at a time: keep only the latest
    hit = _PACKED[id(fresh)] = (fresh, {p: None if f is None else _pack(f) for p, f in fresh.items()})
  return hit[1]


def run(table, added: tuple[str, ...], fresh: Mapping[str, np.ndarray | None],
        prezero: Mapping[str, np.ndarray | None] | None = None,
        grown: Mapping[str, Mapping[int, int]] | None = None, eager_mul: bool = False) -> Novelty:
  """One novelty pass over ``table``'s program (see the module docstring)."""
  added_ids = {table.features.index(n) for n in added}
  fresh_list = [fresh.get(p) for p in table.paths]
  pre = [None if prezero is None else prezero.get(p) for p in table.paths]
  ctx = _Context(table, fresh_list, pre, [dict((grown or {}).get(p, {})) for p in table.paths], eager_mul)
  args = []
  packed = _packed_fresh(fresh)
  for i, p in enumerate(table.paths):
    f = fresh_list[i]
    val = Val(table.shapes[p], table.dtypes[p], mask=packed.get(p), pull=ctx.param_pull(i))
    if f is not None:
      ctx._view(val, lambda i=i: ctx.param_zero(i))
      ctx.param_of[id(val)] = i
    args.append(val)
  for leaf, mask in zip(table.spec.leaves, table.spec.input_masks(flagged=added_ids)):
    args.append(Val(leaf.shape, leaf.dtype, mask=mask))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    outs = ctx.run(table.jaxpr.jaxpr, const_vals(table.jaxpr.consts), args)
  zeroed = {p: ctx.param_zero(i) for i, p in enumerate(table.paths)}
  touched = {}
  for i, p in enumerate(table.paths):
    f, t = fresh_list[i], ctx.param_touch[i]
    z = None if f is None or t is None else f & _dense(t, table.shapes[p])
    touched[p] = None if z is None or not z.any() else z
  novel = tuple(p for p, v in zip(table.output_paths, outs) if not M.is_empty(v.mask))
  assumed = tuple(table.paths[i] for i in sorted(ctx.assumed))
  return Novelty(zeroed, novel, tuple(ctx.sites.values()), touched, assumed, ctx.deferred)


def analyse(table, added: tuple[str, ...], fresh: Mapping[str, np.ndarray | None],
            grown: Mapping[str, Mapping[int, int]] | None = None, max_rounds: int = 6) -> Novelty:
  """Zeroed fresh elements and what novelty still reaches.

  Online decisions come late inside loops: a recurrent weight reading a new unit
  is zeroed only at the loop's second level, after the first level already let
  novelty into the old units. So the pass is repeated with the previous round's
  decisions in place from the start, keeping only the decisions that novelty
  still forces, until they are stable.

  Elementwise products first do not zero (a new unit's scale keeps its init, and a
  later contraction cuts the unit); if that leaves novelty at an output, they zero
  too (a fresh LayerScale gate on an inserted branch is the only cut there).

  If novelty still reaches an output, the decisions that keep new units alive
  stand and the spreading operations are reported.
  """
  for eager_mul in (False, True):
    result = run(table, added, fresh, grown=grown, eager_mul=eager_mul)
    prezero = result.touched
    for r in range(max_rounds):
      result = run(table, added, fresh, prezero=prezero, grown=grown, eager_mul=eager_mul)
      # Later rounds only add decisions, so they end (a bias can otherwise flip between
      # "added to novelty" and "alone" as the cuts around it change).
      following = result.touched if r < 1 else {p: _or(prezero.get(p), result.touched.get(p))
                                                 for p in table.paths}
      if _same(following, prezero, table.paths):
        break
      prezero = following
    if not result.novel_outputs:
      return result
    if not eager_mul:
      lazy = result
      if not result.deferred:  # nothing an eager pass would zero differently
        break
  return lazy  # neither proves preservation: keep the decisions that leave new units alive


def _same(a, b, paths) -> bool:
  for p in paths:
    x, y = a.get(p), b.get(p)
    if (x is None) != (y is None):
      return False
    if x is not None and not np.array_equal(np.broadcast_to(x, np.broadcast_shapes(x.shape, y.shape)),
                                            np.broadcast_to(y, np.broadcast_shapes(x.shape, y.shape))):
      return False
  return True


def _or(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return _squeeze(a | b)
