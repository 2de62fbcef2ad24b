"""Soundness of the forward masks on randomly composed programs (hypothesis).

A program is a list of (op, seed) pairs drawn by hypothesis. It runs on a flat
input ``x`` with one feature per element, reshaped to a 2-D start value. Each
op picks operands among the values computed so far and appends a new 2-D
value; every value is an output. All choices inside an op (axes, indices,
random matrices...) come from ``np.random.RandomState(seed)`` and the operand
shapes, so tracing the program twice gives the same function.

* ``test_random_programs_are_sound``: forward masks contain the Jacobian
  sparsity pattern (jacfwd plus NaN tangents, see checks.py) for programs over
  the whole menu.
* ``test_dense_chains_are_exact``: programs made only of structurally dense
  ops (reshape, transpose, slice, concatenate, static gather, dot_general with
  random dense matrices, conv) give exactly the Jacobian pattern.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import assert_contains, assert_equal, forward_pattern, jacobian_pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

example = __import__("hypothesis").example  # (kept out of the import lines above)
N = 12
MAX_SIZE = 72
# More examples for a thorough run: JAXSURGERY_EXAMPLES=500 pytest tests/test_soundness.py
EXAMPLES = int(os.environ.get("JAXSURGERY_EXAMPLES", "40"))


def _other(r, v, vals, same_shape=False):
  pool = [w for w in vals if w.shape == v.shape] if same_shape else vals
  return pool[r.randint(len(pool))] if pool else v


def _mat(r, *shape):
  m = r.normal(size=shape).astype(np.float32)
  return jnp.asarray(np.where(np.abs(m) < 0.1, 0.5, m))  # no structural zeros


# -- structurally dense ops ----------------------------------------------------

def op_reshape(r, v, vals):
  n = v.size
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  d = divisors[r.randint(len(divisors))]
  return v.reshape(-1).reshape(d, n // d)


def op_transpose(r, v, vals):
  return v.T


def op_slice(r, v, vals):
  axis = r.randint(2)
  n = v.shape[axis]
  start = r.randint(n)
  stop = r.randint(start + 1, n + 1)
  step = r.randint(1, 3)
  idx = [slice(None), slice(None)]
  idx[axis] = slice(start, stop, step)
  return v[tuple(idx)]


def op_concat(r, v, vals):
  axis = r.randint(2)
  fits = [w for w in vals if w.shape[1 - axis] == v.shape[1 - axis]]
  w = fits[r.randint(len(fits))]
  return jnp.concatenate([v, w[::-1]] if r.randint(2) else [w, v], axis=axis)


def op_gather(r, v, vals):
  axis = r.randint(2)
  idx = r.randint(0, v.shape[axis], size=r.randint(1, 6))
  if r.randint(2):
    return jnp.take(v, jnp.asarray(idx), axis=axis)
  return v[jnp.asarray(idx)] if axis == 0 else v[:, jnp.asarray(idx)]


def op_dot(r, v, vals):
  kind = r.randint(3)
  if kind == 0:
    return v @ _mat(r, v.shape[1], r.randint(1, 5))
  if kind == 1:
    return _mat(r, r.randint(1, 5), v.shape[0]) @ v
  w = _other(r, v, [w for w in vals if w.shape[1] == v.shape[1]])
  return v @ w.T  # both operands feature-dependent


def op_conv(r, v, vals):
  a, c = v.shape
  k = r.randint(1, min(a, 3) + 1)
  groups = [g for g in (1, 2, 3) if c % g == 0]
  g = groups[r.randint(len(groups))]
  o = g * r.randint(1, 3)
  stride, rdil, ldil = r.randint(1, 3), r.randint(1, 3), r.randint(1, 3)
  pad = (r.randint(0, 2), r.randint(0, 2))
  out = lax.conv_general_dilated(
      v[None], _mat(r, k, c // g, o), (stride,), (pad,), lhs_dilation=(ldil,), rhs_dilation=(rdil,),
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=g)
  return out[0] if out.shape[1] > 0 else v


DENSE_OPS = {"reshape": op_reshape, "transpose": op_transpose, "slice": op_slice,
             "concat": op_concat, "gather": op_gather, "dot": op_dot, "conv": op_conv}


# -- the rest of the menu --------------------------------------------------------

def op_unary(r, v, vals):
  f = [jnp.tanh, jnp.sin, jnp.square, jax.nn.sigmoid, lambda y: jnp.log1p(y * y)][r.randint(5)]
  return f(v)


def op_binary(r, v, vals):
  w = _other(r, v, vals, same_shape=True)
  if w is v and r.randint(2):
    w = v[::-1]
  f = [jnp.add, jnp.multiply, jnp.subtract, jnp.maximum, lambda a, b: a / (1.5 + b * b)][r.randint(5)]
  if r.randint(4) == 0:  # broadcast a row or a column
    w = w[:1] if r.randint(2) else w[:, :1]
  return f(v, w)


def op_where(r, v, vals):
  w = _other(r, v, vals, same_shape=True)
  return jnp.where(w > 0, v, -2.0 * v[::-1])


def op_reduce(r, v, vals):
  axis = r.randint(2)
  f = [jnp.sum, jnp.max, jnp.prod, jnp.min, jax.nn.logsumexp][r.randint(5)]
  return f(v, axis=axis, keepdims=True)


def op_cumulative(r, v, vals):
  axis = r.randint(2)
  f = [lax.cumsum, lax.cumprod, lax.cummax, lax.cumlogsumexp][r.randint(4)]
  return f(v, axis=axis, reverse=bool(r.randint(2)))


def op_scan(r, v, vals):
  a, b = v.shape
  s = _mat(r, b)
  init = v[0] * 0.5 if r.randint(2) else jnp.zeros(b)
  kind = r.randint(3)

  def body(c, xt):
    if kind == 0:
      c = jnp.tanh(c * s + xt)
    elif kind == 1:
      c = jnp.roll(c, 1) + xt
    else:
      c = c.sum() * s + xt[::-1]
    return c, c

  return lax.scan(body, init, v, reverse=bool(r.randint(2)))[1]


def op_fori(r, v, vals):
  steps = r.randint(1, 5)
  axis = r.randint(2)
  return lax.fori_loop(0, steps, lambda i, c: c + jnp.roll(c, 1, axis=axis) * 0.5, v)


def op_while(r, v, vals):
  def body(c):
    i, y = c
    return i + 1, jnp.roll(y, 1, axis=1) * 1.1 + y
  return lax.while_loop(lambda c: c[0] < 2, body, (0, v))[1]


def op_pad(r, v, vals):
  cfg = [(r.randint(-1, 2), r.randint(0, 2), r.randint(0, 2)) for _ in range(2)]
  cfg = [(lo if n + lo > 0 else 0, hi, it) for (lo, hi, it), n in zip(cfg, v.shape)]
  return lax.pad(v, jnp.float32(0.5) if r.randint(2) else v[0, 0], cfg)


def op_rev(r, v, vals):
  return lax.rev(v, (r.randint(2),))


def op_scatter(r, v, vals):
  idx = jnp.asarray(r.randint(0, v.shape[0], size=r.randint(1, 4)))
  upd = jnp.tanh(v[:1]) if r.randint(2) else _mat(r, 1, v.shape[1])
  upd = jnp.broadcast_to(upd, (idx.shape[0], v.shape[1]))
  return v.at[idx].add(upd) if r.randint(2) else v.at[idx].set(upd)


def op_update_slice(r, v, vals):
  a, b = v.shape
  h, w = r.randint(1, a + 1), r.randint(1, b + 1)
  upd = jnp.sin(v[:h, :w][::-1]) if r.randint(2) else jnp.full((h, w), 3.0)
  base = v if r.randint(2) else jnp.broadcast_to(v[:, :1], v.shape)  # a compressed mask
  return lax.dynamic_update_slice(base, upd, (r.randint(a - h + 1), r.randint(b - w + 1)))


def op_traced_index(r, v, vals):
  i = jnp.clip((v[0, 0] * 3).astype(jnp.int32), 0, v.shape[0] - 1)
  if r.randint(2):
    return lax.dynamic_slice(v, (i, 0), (1, v.shape[1])) * v[-1:]
  return v[jnp.clip((v[:, 0] * 2).astype(jnp.int32), 0, v.shape[0] - 1)]


def op_sort(r, v, vals):
  return jnp.sort(v, axis=r.randint(2))


def op_pool(r, v, vals):
  init, f = [(0.0, lax.add), (-jnp.inf, lax.max)][r.randint(2)]
  win = (r.randint(1, min(3, v.shape[0]) + 1), 1)
  return lax.reduce_window(v, init, f, win, (r.randint(1, 3), 1), "VALID")


ALL_OPS = dict(DENSE_OPS, unary=op_unary, binary=op_binary, where=op_where, reduce=op_reduce,
               cumulative=op_cumulative, scan=op_scan, fori=op_fori, pad=op_pad, rev=op_rev,
               scatter=op_scatter, update_slice=op_update_slice, traced_index=op_traced_index,
               sort=op_sort, pool=op_pool, while_loop=op_while)


def build(program, ops):
  """The function ``x -> [every value the program computes]``."""
  def f(x):
    r0 = np.random.RandomState(program[0][1])
    rows = [1, 2, 3, 4, 6, 12][r0.randint(6)]
    vals = [x.reshape(rows, N // rows)]
    for name, seed in program:
      r = np.random.RandomState(seed)
      v = vals[r.randint(len(vals))]
      out = ops[name](r, v, vals)
      if out.ndim != 2 or 0 in out.shape:
        out = v * 2.0
      if out.size > MAX_SIZE:
        out = out[:max(1, MAX_SIZE // out.shape[1]), :MAX_SIZE]
      vals.append(out)
    return vals[1:]
  return f


def programs(ops):
  return st.lists(st.tuples(st.sampled_from(sorted(ops)), st.integers(0, 2**31 - 1)),
                  min_size=1, max_size=6)


def describe(program) -> str:
  return " -> ".join(f"{name}({seed})" for name, seed in program)


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(ALL_OPS))
@example([("sort", 40)])  # a (4, 3) value sorted along axis 0: a fixed draw, not only a random one (issue 16)
@example([("sort", 3), ("sort", 4)])  # (3, 4) along axis 0, twice
def test_random_programs_are_sound(program):
  f = build(program, ALL_OPS)
  assert_contains(forward_pattern(f, N), jacobian_pattern(f, N, seeds=(0, 1)), describe(program))


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(DENSE_OPS))
def test_dense_chains_are_exact(program):
  f = build(program, DENSE_OPS)
  assert_equal(forward_pattern(f, N), jacobian_pattern(f, N, seeds=(0,)), describe(program))


def test_checker_detects_a_wrong_rule():
  """The soundness check fails on a rule that drops a dependence (so the tests above can fail)."""
  import jaxsurgery as js

  def drop_second(ctx, eqn, invals):  # an unsound "add": forgets its second operand
    out_val = js.rules.out_val
    return [out_val(eqn.outvars[0], invals[0].mask)]

  f = lambda x: [jnp.tanh(x.reshape(3, 4)) + x.reshape(3, 4)[::-1]]
  with js.override_rule("add", drop_second):
    forward = forward_pattern(f, N)
  jac = jacobian_pattern(f, N, seeds=(0,))
  assert (jac & ~forward).any()
  assert (jac & ~forward_pattern(f, N)).sum() == 0


# -- provenance: parameters used through feature-free views ------------------------
#
# A parameter ``w`` goes through a random chain V of feature-free ops, then meets
# ``x`` (one feature per element of V(w)) in a product. The touch on V(w)[p] is
# feature p, pulled back to every element of ``w`` that V(w)[p] reads: the
# Jacobian pattern of V. Data movement is exact; reductions, dots with constant
# matrices and elementwise maps pull back to all contributing elements, which is
# again the Jacobian pattern. So the table must equal it.

def view_reshape(r, v):
  return op_reshape(r, v, [v])


def view_slice(r, v):
  return op_slice(r, v, [v])


def view_gather(r, v):
  return op_gather(r, v, [v])


def view_concat(r, v):
  return jnp.concatenate([v, v[::-1]], axis=r.randint(2))


def view_pad(r, v):
  return lax.pad(v, 0.0, [(r.randint(-1, 2) if n > 1 else 0, r.randint(0, 2), r.randint(0, 2)) for n in v.shape])


def view_rev(r, v):
  return lax.rev(v, (r.randint(2),))


def view_broadcast(r, v):
  return jnp.repeat(v, 2, axis=r.randint(2)) if r.randint(2) else jnp.tile(v, (1, 2))


def view_update(r, v):
  a, b = v.shape
  h, w = r.randint(1, a + 1), r.randint(1, b + 1)
  return lax.dynamic_update_slice(v, jnp.zeros((h, w)), (r.randint(a - h + 1), r.randint(b - w + 1)))


def view_reduce(r, v):
  return v.sum(axis=r.randint(2), keepdims=True) if r.randint(2) else jnp.cumsum(v, axis=r.randint(2))


def view_dot(r, v):
  return v @ _mat(r, v.shape[1], r.randint(1, 4))


def view_elementwise(r, v):
  return jnp.exp(jnp.tanh(v)) if r.randint(2) else jax.nn.softplus(v) * 0.5  # no overflow (inf * 0 = NaN)


VIEWS = {"reshape": view_reshape, "transpose": lambda r, v: v.T, "slice": view_slice,
         "gather": view_gather, "concat": view_concat, "pad": view_pad, "rev": view_rev,
         "broadcast": view_broadcast, "update": view_update, "reduce": view_reduce,
         "dot": view_dot, "elementwise": view_elementwise}
W_SHAPE = (3, 4)


def build_view(program):
  def view(w):
    v = w
    for name, seed in program:
      out = VIEWS[name](np.random.RandomState(seed), v)
      if out.ndim == 2 and 0 not in out.shape and out.size <= MAX_SIZE:
        v = out
    return v
  return view


def _view_table(view):
  """Table of ``x * view(w)`` with one feature per output element, and the elements of w each output reads."""
  import jaxsurgery as js

  out_shape = jax.eval_shape(view, jax.ShapeDtypeStruct(W_SHAPE, jnp.float32)).shape
  n = int(np.prod(out_shape))
  fn = lambda p, x: x.reshape(out_shape) * view(p["w"])
  table = js.dependency_table(fn, {"w": jax.ShapeDtypeStruct(W_SHAPE, jnp.float32)},
                              jax.ShapeDtypeStruct((n,), jnp.float32),
                              js.Features([f"p{i}" for i in range(n)]))
  reads = jacobian_pattern(lambda w: view(w.reshape(W_SHAPE)), int(np.prod(W_SHAPE)), seeds=(0,))
  return table, reads, n


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(VIEWS)), st.integers(0, 2**31 - 1)), min_size=1, max_size=5))
def test_parameter_views_pull_back_to_the_elements_they_read(program):
  table, reads, n = _view_table(build_view(program))  # reads: (n, |w|)
  got = table.mask("w").reshape(-1, n)                 # (|w|, n)
  assert_equal(got, reads.T, describe(program))


LOOP_VIEWS = {
    "fori_roll": lambda w: lax.fori_loop(0, 3, lambda i, c: jnp.roll(c, 1, axis=0) * 1.5, w),
    "scan_ys": lambda w: lax.scan(lambda c, r: (c + r, c * r), w[0], w)[1],
    "scan_reverse_carry": lambda w: lax.scan(lambda c, r: (jnp.roll(c, 1) + r, None), w[0] * 0, w,
                                             reverse=True)[0][None],
    "while_shift": lambda w: lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1][::-1]), (0, w))[1],
    "scan_consts": lambda w: lax.scan(lambda c, _: (c * w[1], None), w[0], None, length=4)[0][None],
}


@pytest.mark.parametrize("name", sorted(LOOP_VIEWS))
def test_parameter_views_through_loops_pull_back_soundly(name):
  """Touches through loops cover at least the elements each output reads (loops may over-approximate)."""
  table, reads, n = _view_table(LOOP_VIEWS[name])
  assert reads.any()
  assert_contains(table.mask("w").reshape(-1, n), reads.T, name)
