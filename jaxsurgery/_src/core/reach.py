"""Reach: the backward (output-side) dependency masks.

``reach_masks(closed, n_params, output_spec)`` says, for every parameter element, which
*named outputs* it can influence. It is a reverse pass over the jaxpr with packed masks
over the ``K`` output names (``masks.py``'s layout: words on the last axis, size-1 axes
where the mask is constant):

1. A forward sweep marks the values derived from parameters (only those are followed
   back) and folds constants (``Lazy``, as the interpreter does), so static indices
   keep their exact index maps.
2. The output leaves get their masks from the outputs spec (a ``str`` leaf: every
   element names it; ``Features(names, axis)``: position ``k`` along ``axis`` names
   ``names[k]``; ``None``: nothing).
3. Eqns are walked in reverse. Each one maps its outputs' masks to its operands' masks,
   which are ORed into the operand's accumulated mask (a value used many times gets the
   union over its uses), so every value is processed once: the pass is linear in the
   program, whatever its fan-out.

The rule of an eqn:

* leaf primitives reuse the forward rule's *provenance pullback* (docs/design.md §5):
  the forward rule is run on operands without features whose pulls capture what
  reaches them, and the outputs' masks are pulled. With no features there is no
  first-contact cut, so a pull is exactly "send to every operand element that
  contributes": the transposed movement for data movement (exact), unbroadcast for
  elementwise ops, the reduced group for reductions, ``OR`` over the other operand's
  free axes for ``dot_general`` (exact), the index map for static gathers/scatters,
  the indexed axes ORed for traced ones, uniform for opaque ops. Index operands of
  indexed ops additionally reach every output they select into (soundness: an index
  influences what it selects), and a rule that gives an output no pullback is treated
  as dense (a user rule without provenance cannot make reach miss anything);
* ``conv_general_dilated``: the kernel element ``rhs[o, i, taps]`` reaches what output
  channel ``o`` reaches, over every batch element and position (exact for generic
  kernels); the input ``lhs[n, c, p]`` reaches, for every ``p``, what the output
  channels of ``c``'s feature group reach in batch element ``n`` (sound, spatially
  coarse);
* calls (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, remat...): the callee's
  reverse pass;
* ``cond``: the union over the branches that can run; the index reaches every output;
* ``while``: the fixed point of the carries' masks, ``C = out ∪ body^T(C) ∪ cond^T(P)``
  with ``P`` (the predicate) reaching every output bit (it decides the trip count);
  the constants accumulate;
* ``scan``: short scans (``length <= UNROLL``) are walked step by step backwards
  (exact per step for ``xs`` and ``ys``); longer ones iterate the body's reverse pass
  on the carries to a fixed point with ``ys`` ORed over time, ``xs`` getting the
  union over steps;
* ``shard_map``: the body's reverse pass on the union of the shards;
* a primitive without any rule: dense (every operand element reaches every bit of
  every output), with an :class:`UnknownPrimitiveWarning`; ``strict=True`` raises.

Loops are widened after ``WIDEN_AFTER`` iterations to the union of every bit that
entered them (bits only come from the outputs, so that is an upper bound of the fixed
point), so every loop terminates.

Soundness: every rule over-approximates the operands' influence on its outputs, and
composition by OR-accumulation is the boolean transpose of the chain rule, so
``reach`` contains the Jacobian sparsity of the named outputs (tests/test_reach.py).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxsurgery._src import compat
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import RuleError, UnknownPrimitiveError, UnknownPrimitiveWarning
from jaxsurgery._src.core.values import Lazy, Val
from jaxsurgery._src.rules.common import argsort

# Scans up to this length are walked step by step (exact per step); longer ones iterate
# the body to a fixed point.
UNROLL = 8
# Iterations of a loop's fixed point before its carries are widened.
WIDEN_AFTER = 32
# Constant folding is skipped for values larger than this (elements), as in the interpreter.
_MAX_FOLD = 1 << 22

Mask = np.ndarray | None


class Info(NamedTuple):
  """What the reverse pass knows of a value before it walks back: shape, dtype, constant, param-derived."""

  shape: tuple[int, ...]
  dtype: Any
  const: Any = None      # np.ndarray | Lazy | None
  dep: bool = False      # derived from a parameter (only those are followed back)


def _concrete(c: Any) -> Any:
  return c.get() if isinstance(c, Lazy) else c


def _fit(m: Mask, shape: tuple[int, ...], name: str) -> Mask:
  """A rule's operand mask at the operand's rank, each axis 1 or full (``None`` if empty)."""
  if m is None:
    return None
  m = M.unbroadcast(M.lift(m, len(shape)), shape)
  if m.ndim != len(shape) + 1 or any(s not in (1, n) for s, n in zip(m.shape[:-1], shape)):
    raise RuleError(
        f"The reach rule of primitive `{name}` produced an operand mask of shape {m.shape[:-1]} for an "
        f"operand of shape {shape}: a bug in that rule (or in its forward rule's provenance pullback).")
  return None if M.is_empty(m) else m


def _or(a: Mask, b: Mask) -> Mask:
  if a is None:
    return b
  if b is None:
    return a
  return np.bitwise_or(a, b)


def _same(a: Mask, b: Mask) -> bool:
  if a is None or b is None:
    return M.is_empty(a) and M.is_empty(b)
  shape = np.broadcast_shapes(a.shape, b.shape)
  return bool(np.array_equal(np.broadcast_to(a, shape), np.broadcast_to(b, shape)))


def _is_float(dtype: Any) -> bool:
  try:
    return bool(np.issubdtype(np.dtype(dtype), np.inexact))
  except TypeError:  # extended dtypes (typed PRNG keys)
    return False


def _all_words(ms: Sequence[Mask]) -> Mask:
  """OR of every element of every mask: a (W,) mask."""
  return M.orr(*(M.reduce_all(m) for m in ms))


class Backward:
  """State of one reverse pass: the number of output names, options, rules, unknown primitives.

  Args:
    num_outputs: the number of output names (bits per mask).
    strict: raise :class:`UnknownPrimitiveError` for a primitive without a rule.
    rules: ``{name: forward rule}``; default: the registry's active rules.
  """

  def __init__(self, num_outputs: int, strict: bool = False, rules: dict[str, Any] | None = None):
    from jaxsurgery._src.core.interpreter import Context  # the interpreter imports the rules
    from jaxsurgery._src.rules import registry
    self.K = num_outputs
    self.W = M.num_words(num_outputs)
    self.strict = strict
    self.rules = rules if rules is not None else registry.active_rules()
    self.ctx = Context(num_outputs, [], strict, rules=self.rules)  # what forward rules read (W, touch)
    self.indexed = registry.with_trait("indexed") - {"select_n"}  # select_n's predicate: elementwise
    self.unknown: dict[str, int] = {}
    self._literals: dict[int, tuple] = {}
    self._sweeps: dict[tuple, tuple] = {}  # forward sweeps of (sub-)jaxprs, reused by loop iterations
    self._adapters: dict[int, tuple] = {}  # id(eqn) -> forward rule's output Vals and capture slots

  # -- the pass --------------------------------------------------------------
  def run(self, jaxpr: Any, consts: Sequence[Any], ins: Sequence[Info],
          out_masks: Sequence[Mask]) -> list[Mask]:
    """The masks of ``jaxpr``'s invars given its outvars' masks (``None``: reaches nothing)."""
    env: dict[Any, Info] = {}

    def read(v) -> Info:
      if isinstance(v, compat.Literal):
        hit = self._literals.get(id(v))
        if hit is None or hit[0] is not v:  # one array per literal: adapter caches stay valid
          val = np.asarray(v.val)
          hit = self._literals[id(v)] = (v, Info(tuple(val.shape), val.dtype, val, False))
        return hit[1]
      return env[v]

    key = (id(jaxpr), tuple(id(c) for c in consts), tuple((id(i.const), i.dep) for i in ins))
    hit = self._sweeps.get(key)
    if hit is not None and hit[0] is jaxpr:  # a loop body again: same constants, same Lazy values
      env, walk = hit[2], hit[3]
    else:
      env, walk = self._sweep(jaxpr, consts, ins, read, env)
      self._sweeps[key] = (jaxpr, (consts, ins), env, walk)  # the keys' objects kept alive
    return self._walk_back(jaxpr, env, walk, out_masks)

  def _sweep(self, jaxpr: Any, consts: Sequence[Any], ins: Sequence[Info], read: Callable,
             env: dict[Any, Info]) -> tuple[dict[Any, Info], list[tuple[Any, list[Info]]]]:
    """The forward sweep: which values derive from parameters, and the folded constants."""
    for var, c in zip(jaxpr.constvars, consts):
      env[var] = Info(tuple(var.aval.shape), var.aval.dtype, c, False)
    for var, info in zip(jaxpr.invars, ins):
      env[var] = info
    walk: list[tuple[Any, list[Info]]] = []
    for eqn in jaxpr.eqns:
      infos = [read(v) for v in eqn.invars]
      if any(i.dep for i in infos):
        walk.append((eqn, infos))
        for o in eqn.outvars:
          env[o] = Info(tuple(o.aval.shape), o.aval.dtype, None, True)
        continue
      foldable = not eqn.effects and all(i.const is not None for i in infos) and all(
          int(np.prod(o.aval.shape, dtype=np.int64)) <= _MAX_FOLD for o in eqn.outvars)
      cache: dict[str, Any] = {}
      for k, o in enumerate(eqn.outvars):
        const = Lazy(eqn, [i.const for i in infos], k, cache) if foldable else None
        env[o] = Info(tuple(o.aval.shape), o.aval.dtype, const, False)
    return env, walk

  def _walk_back(self, jaxpr: Any, env: dict[Any, Info], walk: list[tuple[Any, list[Info]]],
                 out_masks: Sequence[Mask]) -> list[Mask]:
    """The reverse walk: outputs' masks to the invars', OR-accumulated per variable."""
    acc: dict[Any, np.ndarray] = {}

    def add(v, m: Mask, name: str) -> None:
      if m is None or isinstance(v, (compat.Literal, compat.DropVar)):
        return
      info = env[v]
      if not info.dep:
        return
      m = _fit(m, info.shape, name)
      if m is not None:
        acc[v] = _or(acc.get(v), m)  # type: ignore[assignment]

    for v, m in zip(jaxpr.outvars, out_masks):
      add(v, m, "<outputs>")
    for eqn, infos in reversed(walk):
      outs = [None if isinstance(o, compat.DropVar) else acc.pop(o, None) for o in eqn.outvars]
      if all(m is None for m in outs):
        continue
      outs = [None if m is None else M.lift(m, len(o.aval.shape)) for m, o in zip(outs, eqn.outvars)]
      for v, m in zip(eqn.invars, self.apply(eqn, infos, outs)):
        add(v, m, eqn.primitive.name)
    return [acc.get(v) if not isinstance(v, compat.Literal) and env[v].dep else None for v in jaxpr.invars]

  def apply(self, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
    """The operands' masks of one eqn from its outputs' masks."""
    name = eqn.primitive.name
    own = BACKWARD.get(name)
    if own is not None and (name not in OWN_IF_DEFAULT or self.rules.get(name) is OWN_IF_DEFAULT[name]):
      return own(self, eqn, ins, outs)
    rule = self.rules.get(name)
    if rule is None:
      self._unknown(name)
      return dense(self, eqn, ins, outs)
    return self._adapt(eqn, rule, ins, outs)

  def _unknown(self, name: str) -> None:
    if self.strict:
      raise UnknownPrimitiveError(
          f"jaxsurgery has no dependency rule for primitive {name!r}, so reach cannot follow it "
          f"(strict=True). Register one with jaxsurgery.register_rule({name!r}, rule) or use "
          f"strict=False to fall back to the conservative dense rule.")
    if name not in self.unknown:
      warnings.warn(
          f"jaxsurgery: no dependency rule for primitive {name!r}; reach uses the conservative rule "
          f"(every operand element reaches every output of it). Register a precise rule with "
          f"jaxsurgery.register_rule({name!r}, ...).", UnknownPrimitiveWarning, stacklevel=6)
    self.unknown[name] = self.unknown.get(name, 0) + 1

  # -- leaf primitives: the forward rule's provenance pullback, without the cut ----------
  def _adapt(self, eqn: Any, rule: Callable, ins: list[Info], outs: list[Mask]) -> list[Mask]:
    key = tuple(id(i.const) for i in ins)
    entry = self._adapters.get(id(eqn))
    if entry is None or entry[0] is not eqn or entry[1] != key:
      slots: list[Mask] = [None] * len(ins)
      vals = [Val(i.shape, i.dtype, None, self._capture(slots, k, i.shape, eqn.primitive.name) if i.dep
                  else None, i.const) for k, i in enumerate(ins)]
      outer, self.ctx.eqn = self.ctx.eqn, eqn
      try:
        outvals = rule(self.ctx, eqn, vals)
      finally:
        self.ctx.eqn = outer
      entry = (eqn, key, slots, outvals, [i.const for i in ins])  # consts kept alive: ids stay valid
      self._adapters[id(eqn)] = entry
    _, _, slots, outvals, _ = entry
    slots[:] = [None] * len(ins)
    from jaxsurgery._src.rules import structural
    dense_words = None
    for o, m in zip(outvals, outs):
      if m is None:
        continue
      if o.pull is not None:
        o.pull(m)
      elif rule is not structural.constant:  # no provenance given: every operand may contribute
        dense_words = _or(dense_words, M.reduce_all(m))
    result = list(slots)
    if eqn.primitive.name in self.indexed:  # an index reaches everything it selects into
      words = _all_words(outs)
      for k, i in enumerate(ins):
        if i.dep and not _is_float(i.dtype):
          result[k] = _or(result[k], M.uniform(words, len(i.shape)))
    if dense_words is not None:
      result = [_or(r, M.uniform(dense_words, len(i.shape))) if i.dep else r for r, i in zip(result, ins)]
    return result

  @staticmethod
  def _capture(slots: list[Mask], k: int, shape: tuple[int, ...], name: str) -> Callable:
    def pull(t):
      t = _fit(t, shape, name)
      if t is not None:
        slots[k] = _or(slots[k], t)
    return pull


def _infos(jaxpr: Any, dep: bool = True) -> list[Info]:
  return [Info(tuple(v.aval.shape), v.aval.dtype, None, dep) for v in jaxpr.invars]


# -- rules of its own ------------------------------------------------------------------

def dense(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """Every operand element reaches every bit of every output."""
  words = _all_words(outs)
  return [M.uniform(words, len(i.shape)) if i.dep else None for i in ins]


def conv(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """``out[n, o, p] = sum_{i in group(o), k} lhs[n, i, window(p, k)] * rhs[o, i, k]``.

  ``rhs[o, i, k]``: OR over batch and positions of output channel ``o`` (exact for
  generic kernels). ``lhs[n, c, p]``: OR over positions of the output channels of
  ``c``'s feature group in batch element ``n`` (every batch element for batch groups).
  """
  (t,) = outs
  assert t is not None  # the pass only applies rules to eqns with a named output
  lhs, rhs = ins[:2]
  p = eqn.params
  dn = p["dimension_numbers"]
  lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  G, B = p["feature_group_count"], p["batch_group_count"]
  r = len(ospec)
  W = t.shape[-1]
  res: list[Mask] = [None] * len(ins)
  if rhs.dep:
    m = M.reduce_or(t, [ospec[0]] + list(ospec[2:]), keepdims=True).transpose(list(ospec) + [r])
    shape = [1] * r + [W]
    shape[rspec[0]] = m.shape[1]
    res[1] = m.reshape(shape)
  if lhs.dep:
    m = t.transpose(list(ospec) + [r])  # (N, O, spatial..., W), compressed axes kept
    if B > 1:  # batch groups: the union over the batch
      m = M.reduce_or(m, [0], keepdims=True)
    o = m.shape[1]
    C = lhs.shape[lspec[1]]
    if G > 1 and o > 1:  # OR over the output channels of each feature group -> (N, G, spatial...)
      m = np.bitwise_or.reduce(m.reshape((m.shape[0], G, o // G) + m.shape[2:]), axis=2)
    else:
      m = M.reduce_or(m, [1], keepdims=True)
    m = _window_transpose(m, lhs, rhs, eqn, lspec, rspec, ospec)
    if G > 1 and m.shape[1] > 1:
      m = np.repeat(m, C // G, axis=1)
    res[0] = m.transpose(argsort(list(lspec)) + [r])
  return res


def _window_t(m: np.ndarray, in_shape, out_shape, dims, strides, padding, base_dilation,
              window_dilation) -> np.ndarray:
  """``in[p] = OR over the outputs q whose window holds p``: the transposed windowed OR.

  What JAX's gradients of convs and window sums compute with: strides and base dilation
  swapped, the VJP padding (exact). Falls back to the OR over the windowed axes if the
  transposed windows do not give the operand's shape.
  """
  from jaxsurgery._src import compat
  from jaxsurgery._src.rules.reductions import window_or
  r = len(in_shape)
  try:
    pads = compat.conv_vjp_lhs_padding(tuple(in_shape), tuple(dims), tuple(strides), tuple(out_shape),
                                         tuple(tuple(x) for x in padding), tuple(base_dilation),
                                         tuple(window_dilation))
    w = window_or(m, tuple(out_shape), tuple(dims), tuple(base_dilation),
                  tuple(tuple(int(v) for v in x) for x in pads), tuple(strides), tuple(window_dilation))
    if w.ndim == r + 1 and all(s in (1, n) for s, n in zip(w.shape[:-1], in_shape)):
      return w
  except Exception:  # another JAX version's helper: the coarse rule below is sound
    pass
  return M.reduce_or(m, [a for a in range(r) if dims[a] > 1 or in_shape[a] != out_shape[a]], keepdims=True)


def _window_transpose(m, lhs: Info, rhs: Info, eqn: Any, lspec, rspec, ospec) -> np.ndarray:
  """:func:`_window_t` for a conv's (N, G, spatial...) mask."""
  p = eqn.params
  in_sp = tuple(lhs.shape[a] for a in lspec[2:])
  k = tuple(rhs.shape[a] for a in rspec[2:])
  out_sp = tuple(eqn.outvars[0].aval.shape[a] for a in ospec[2:])
  return _window_t(m, m.shape[:2] + in_sp, m.shape[:2] + out_sp, (1, 1) + k, (1, 1) + tuple(p["window_strides"]),
                   ((0, 0), (0, 0)) + tuple(tuple(x) for x in p["padding"]), (1, 1) + tuple(p["lhs_dilation"]),
                   (1, 1) + tuple(p["rhs_dilation"]))


def reduce_window(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """Each operand element reaches the outputs whose window holds it (exact); init values reach all."""
  p = eqn.params
  n = len(eqn.outvars)
  t = M.orr(*outs)
  assert t is not None  # the pass only applies rules to eqns with a named output
  out_shape = tuple(eqn.outvars[0].aval.shape)
  res: list[Mask] = []
  for k, i in enumerate(ins):
    if not i.dep:
      res.append(None)
    elif k < n:
      res.append(_window_t(t, i.shape, out_shape, p["window_dimensions"], p["window_strides"], p["padding"],
                           p["base_dilation"], p["window_dilation"]))
    else:
      res.append(M.uniform(M.reduce_all(t), len(i.shape)))
  return res


def split(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """The pieces' masks side by side (kept compressed when every piece has the same constant mask)."""
  from jaxsurgery._src.rules.structural import _join_masks
  (x,) = ins
  axis = eqn.params["axis"] % len(x.shape)
  rank = len(x.shape)
  return [_join_masks([M.lift(m, rank) for m in outs], list(eqn.params["sizes"]), axis)]


def pad(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """The operand: its strided positions (exact); the padding value: the OR over padding positions (exact)."""
  from jaxsurgery._src.rules.structural import _unpad_axis
  (t,) = outs
  assert t is not None  # the pass only applies rules to eqns with a named output
  x, padv = ins
  config = eqn.params["padding_config"]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  axes = [a for a, c in enumerate(config) if tuple(c) != (0, 0, 0)]
  t = M.expand_axes(t, out_shape, axes)
  res: list[Mask] = [None, None]
  if x.dep:
    m = t
    for a in axes:
      m = _unpad_axis(m, a, config[a][0], config[a][2], x.shape[a])
    res[0] = m
  if padv.dep:
    inside = np.ones((1,) * len(out_shape), bool)
    for a in axes:  # positions that hold an operand element (a product set over the padded axes)
      lo, _, it = config[a]
      pos = np.arange(x.shape[a]) * (it + 1) + lo
      hit = np.zeros(out_shape[a], bool)
      hit[pos[(pos >= 0) & (pos < out_shape[a])]] = True
      inside = inside & hit.reshape([-1 if b == a else 1 for b in range(len(out_shape))])
    pad_t = np.where(inside[..., None], M.WORD(0), t)  # only the padding positions
    res[1] = M.uniform(M.reduce_all(pad_t), len(padv.shape))
  return res


def call(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """The callee's reverse pass."""
  jaxpr, consts = compat.sub_jaxpr(eqn.params, eqn.primitive.name)
  return bw.run(jaxpr, consts, ins, outs)


def cond(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """Union over the branches that can run; the index reaches every output."""
  index, ops = ins[0], ins[1:]
  branches = eqn.params["branches"]
  known = _concrete(index.const)
  if known is not None:
    i = int(np.clip(int(np.asarray(known)), 0, len(branches) - 1))
    branches = branches[i:i + 1]
  res: list[Mask] = [None] * len(ops)
  for b in branches:
    res = [_or(a, m) for a, m in zip(res, bw.run(b.jaxpr, b.consts, ops, outs))]
  return [M.uniform(_all_words(outs), 0) if index.dep else None] + res


def _widen(ms: Sequence[Mask], infos: Sequence[Info]) -> list[Mask]:
  words = _all_words(ms)
  return [M.uniform(words, len(i.shape)) for i in infos]


def while_loop(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """Fixed point ``C = out ∪ body^T(C) ∪ cond^T(every output bit)``; constants accumulate."""
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cjaxpr, bjaxpr = p["cond_jaxpr"], p["body_jaxpr"]
  cc, bc, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
  carry = [Info(i.shape, i.dtype, None, True) for i in init]
  C = list(outs)
  kc: list[Mask] = [None] * cn
  kb: list[Mask] = [None] * bn
  pred = M.uniform(_all_words(outs), 0)  # the trip count decides every output
  for it in range(WIDEN_AFTER + 2):
    if it == WIDEN_AFTER:
      C = _widen(C, carry)
    b = bw.run(bjaxpr.jaxpr, bjaxpr.consts, bc + carry, C)
    c = bw.run(cjaxpr.jaxpr, cjaxpr.consts, cc + carry, [pred])
    kb = [_or(a, m) for a, m in zip(kb, b[:bn])]
    kc = [_or(a, m) for a, m in zip(kc, c[:cn])]
    new = [_or(_or(x, y), z) for x, y, z in zip(C, b[bn:], c[cn:])]
    if all(_same(a, n) for a, n in zip(C, new)):
      break
    C = new
  return kc + kb + C


def scan(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """Step by step backwards for short scans, else a fixed point on the carries (ys ORed over time)."""
  p = eqn.params
  nc, ncar = compat.scan_counts(p)
  length, reverse = p["length"], p["reverse"]
  body = p["jaxpr"]
  consts, xs = ins[:nc], ins[nc + ncar:]
  carry = [Info(i.shape, i.dtype, None, True) for i in ins[nc:nc + ncar]]
  xinfo = [Info(i.shape[1:], i.dtype, None, i.dep) for i in xs]
  binfo = consts + carry + xinfo
  C, Y = list(outs[:ncar]), list(outs[ncar:])
  K: list[Mask] = [None] * nc
  if length <= UNROLL:
    per_step: list[list[Mask]] = [[None] * len(xs) for _ in range(length)]
    for t in (range(length) if reverse else range(length - 1, -1, -1)):
      y_t = [None if m is None else m[0 if m.shape[0] == 1 else t] for m in Y]
      r = bw.run(body.jaxpr, body.consts, binfo, C + y_t)
      K = [_or(a, m) for a, m in zip(K, r[:nc])]
      C = r[nc:nc + ncar]
      per_step[t] = r[nc + ncar:]
    X: list[Mask] = []
    for j, x in enumerate(xs):
      if not x.dep or all(s[j] is None for s in per_step):
        X.append(None)
        continue
      X.append(M.compress(np.stack([M.materialize(s[j], x.shape[1:], bw.W) for s in per_step])))
    return K + C + X
  y_all = [None if m is None else M.reduce_or(m, [0]) for m in Y]
  Xs: list[Mask] = [None] * len(xs)
  for it in range(WIDEN_AFTER + 2):
    if it == WIDEN_AFTER:
      C = _widen(C, carry)
    r = bw.run(body.jaxpr, body.consts, binfo, C + y_all)
    K = [_or(a, m) for a, m in zip(K, r[:nc])]
    Xs = [_or(a, m) for a, m in zip(Xs, r[nc + ncar:])]
    new = [_or(a, m) for a, m in zip(C, r[nc:nc + ncar])]
    if all(_same(a, n) for a, n in zip(C, new)):
      break
    C = new
  return K + C + [None if m is None else m[None] for m in Xs]


def shard_map(bw: Backward, eqn: Any, ins: list[Info], outs: list[Mask]) -> list[Mask]:
  """The body's reverse pass on the union of the shards (ORed over the sharded axes)."""
  jaxpr, consts = compat.sub_jaxpr(eqn.params, eqn.primitive.name)
  local_out = [tuple(v.aval.shape) for v in jaxpr.outvars]
  outs_local = []
  for m, o, s in zip(outs, eqn.outvars, local_out):
    sharded = [a for a, (g, loc) in enumerate(zip(o.aval.shape, s)) if g != loc]
    outs_local.append(None if m is None else M.reduce_or(m, sharded, keepdims=True))
  local_in = [Info(tuple(v.aval.shape), i.dtype, None, i.dep) for v, i in zip(jaxpr.invars, ins)]
  res = bw.run(jaxpr, consts, local_in, outs_local)
  out: list[Mask] = []
  for m, i, loc in zip(res, ins, local_in):
    sharded = [a for a, (g, s) in enumerate(zip(i.shape, loc.shape)) if g != s]
    out.append(None if m is None else M.reduce_or(m, sharded, keepdims=True))
  return out


def _calls() -> tuple[str, ...]:
  from jaxsurgery._src.rules.control_flow import CALLS
  return CALLS


_WINDOWS = ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window")


def _own() -> tuple[dict[str, Callable], dict[str, Callable]]:
  from jaxsurgery._src.rules import contraction, reductions, structural
  own: dict[str, Callable] = {name: call for name in _calls()}
  own.update({"cond": cond, "while": while_loop, "scan": scan, "shard_map": shard_map,
              "conv_general_dilated": conv, "split": split,
              "pad": pad, **dict.fromkeys(_WINDOWS, reduce_window)})
  return own, {"conv_general_dilated": contraction.conv, "split": structural.split,
                "pad": structural.pad, **dict.fromkeys(_WINDOWS, reductions.reduce_window)}


#: Reverse rules of their own (calls, control flow, conv); every other primitive with a
#: forward rule uses that rule's provenance pullback.
BACKWARD, OWN_IF_DEFAULT = _own()


# -- entry points -----------------------------------------------------------------------

def reach_masks(closed: Any, n_params: int, output_spec: Any, *, strict: bool = False,
                out_masks: Sequence[Mask] | None = None) -> list[Mask]:
  """Packed reach masks of the first ``n_params`` invars of ``closed`` (the parameter leaves).

  Args:
    closed: a closed jaxpr whose invars are the parameter leaves, then the inputs, and
      whose outvars are the output leaves (what ``dependency_table`` traces).
    n_params: the number of parameter leaves.
    output_spec: a resolved outputs spec (``features.ResolvedSpec`` over the output
      leaves): bit ``k`` is output name ``k``.
    strict: raise :class:`UnknownPrimitiveError` on a primitive without a rule.
    out_masks: packed masks of the output leaves, instead of the spec's (then
      ``output_spec`` only gives the number of names).

  Returns:
    Per parameter leaf, its packed reach mask ``shape' + (W,)`` (compressed: size 1 along
    axes where it is constant), or ``None`` if it reaches no named output.
  """
  jaxpr = closed.jaxpr
  bw = Backward(output_spec.num_features, strict)
  if out_masks is None:
    out_masks = output_spec.input_masks()
  ins = [Info(tuple(v.aval.shape), v.aval.dtype, None, k < n_params) for k, v in enumerate(jaxpr.invars)]
  res = bw.run(jaxpr, list(closed.consts), ins, list(out_masks))
  return [None if m is None else M.compress(m) for m in res[:n_params]]


# Per table, its reach masks (tables are frozen and compared by identity).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _table_masks(table: Any) -> dict[str, Mask]:
  """Per parameter path, the packed reach masks of a table (computed once per table)."""
  if not getattr(table, "output_features", ()):
    raise ValueError(
        "This table's outputs have no names, so it has no reach: pass outputs= to dependency_table "
        "(e.g. outputs=js.Features(action_names) for an output whose last axis is the actions, or a "
        "str naming a whole output leaf).")
  if getattr(table, "jaxpr", None) is None:
    raise ValueError(
        "This table has no traced program (table.jaxpr is None, e.g. a table of a loaded plan), so reach "
        "cannot be computed: rebuild the table with dependency_table(fn, params, inputs, features, "
        "outputs=...).")
  try:
    cached = _CACHE.get(table)
  except TypeError:  # not weakly referenceable: no cache
    cached = None
  if cached is None:
    paths = tuple(table.paths)
    cached = dict(zip(paths, reach_masks(table.jaxpr, len(paths), table.output_spec,
                                         strict=getattr(table, "strict", False))))
    try:
      _CACHE[table] = cached
    except TypeError:
      pass
  return cached


def reach(table: Any, path: str) -> np.ndarray:
  """``table.reach(path)``: which named outputs each element of parameter leaf ``path`` can influence.

  Args:
    table: a :class:`FeatureTable` built with ``outputs=`` (it needs ``jaxpr``,
      ``paths``, ``shapes`` and ``output_spec``).
    path: a parameter leaf path.

  Returns:
    A dense bool array ``shapes[path] + (len(output_features),)``.

  Raises:
    ValueError: the outputs have no names, or the table has no traced program.
  """
  masks = _table_masks(table)
  return M.unpack(masks[path], table.shapes[path], len(table.output_features))
