"""``FeatureTable.reach``: backward masks over output names contain the Jacobian sparsity (and equal it when dense)."""

from __future__ import annotations

import dataclasses
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from jax import lax
from jax.flatten_util import ravel_pytree
from test_rules import CASES as RULE_CASES

import jaxsurgery as js
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core import reach as R

f32 = jnp.float32
sds = jax.ShapeDtypeStruct


def names(prefix, n):
  return [f"{prefix}{i}" for i in range(n)]


def _sample(tree, rng, maxval):
  def draw(s):
    if jnp.issubdtype(s.dtype, jnp.integer):
      return jnp.asarray(rng.randint(0, maxval, s.shape), s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) + 0.1, s.dtype)
  return jax.tree.map(draw, tree)


def jacobian_reach(table, fn, params, inputs, seeds=(0, 1, 2), maxval=3, nan=True):
  """Per parameter path, ``param.shape + (K,)``: the union over random points of the nonzero
  Jacobian of the named outputs, reduced to names (forward mode with unit and NaN tangents, so
  coincidental zeros of the derivative cannot hide a dependence; reverse mode for custom_vjp).

  ``nan=False`` for ops that XLA implements with structural zeros (batch-grouped convs multiply
  other groups' kernels by zero, so a NaN tangent leaks into outputs that do not depend on it)."""
  points = []
  for s in seeds:
    rng = np.random.RandomState(s)
    points.append((_sample(params, rng, maxval), _sample(inputs, rng, maxval)))
  return jacobian_reach_at(table, fn, points, nan=nan)


def jacobian_reach_at(table, fn, points, nan=True):
  """:func:`jacobian_reach` at the given ``(params, inputs)`` points."""
  spec = table.output_spec
  K = len(table.output_features)
  pat = {p: np.zeros(table.shapes[p] + (K,), bool) for p in table.paths}
  for p0, x in points:
    flat, unravel = ravel_pytree(p0)
    outs = jax.tree.leaves(fn(unravel(flat), x))
    sizes = [o.size for o in outs]
    def f(v, unravel=unravel, x=x):
      return jnp.concatenate([jnp.ravel(o).astype(f32) for o in jax.tree.leaves(fn(unravel(v), x))])
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    push = jax.jit(jax.vmap(lambda t, f=f, flat=flat: jax.jvp(f, (flat,), (t,))[1]))
    try:
      J = np.array(push(eye) != 0)  # (n_params, out)
      if nan:
        J |= np.asarray(jnp.isnan(push(jnp.where(eye > 0, jnp.nan, 0.0))))
    except TypeError:  # custom_vjp: reverse mode only
      J = np.asarray(jax.jacrev(f)(flat) != 0).T
    offs = np.cumsum([0] + sizes)
    for i, (leaf, o) in enumerate(zip(spec.leaves, outs)):
      if not leaf.feature_ids:
        continue
      Ji = J[:, offs[i]:offs[i + 1]].reshape((-1,) + tuple(o.shape))  # (n_params,) + out.shape
      if leaf.axis is None:
        per = {leaf.feature_ids[0]: Ji.reshape(Ji.shape[0], -1).any(1)}
      else:
        moved = np.moveaxis(Ji, 1 + leaf.axis, 1).reshape(Ji.shape[0], o.shape[leaf.axis], -1).any(2)
        per = {k: moved[:, pos] for pos, k in enumerate(leaf.feature_ids)}
      for k, col in per.items():
        parts = unravel(jnp.asarray(col, f32))
        leaves = jax.tree.leaves(parts)
        for path, part in zip(table.paths, leaves):
          pat[path][..., k] |= np.asarray(part).astype(bool).reshape(table.shapes[path])
  return pat


def check(fn, params, inputs, outputs, *, exact=False, features=None, maxval=3, seeds=(0, 1, 2), nan=True):
  """Builds the table, asserts jac <= reach (== reach if exact) on every leaf; returns the table."""
  table = js.dependency_table(fn, params, inputs, features, outputs=outputs)
  jac = jacobian_reach(table, fn, params, inputs, seeds=seeds, maxval=maxval, nan=nan)
  for p in table.paths:
    r = table.reach(p)
    assert r.shape == table.shapes[p] + (len(table.output_features),), p
    missed = jac[p] & ~r
    assert not missed.any(), f"{p}: reach misses (element..., output) {np.argwhere(missed).tolist()[:10]}"
    if exact:
      extra = r & ~jac[p]
      assert not extra.any(), f"{p}: reach over-approximates at {np.argwhere(extra).tolist()[:10]}"
  return table


# -- rule families, one small program each -------------------------------------------------

X34 = sds((3, 4), f32)
W44 = {"w": sds((4, 4), f32), "b": sds((4,), f32)}
OUT4 = js.Features(names("o", 4))
K_HWIO = jnp.asarray(np.random.RandomState(0).normal(size=(3, 3, 2, 4)), f32)


def _dense(p, x):
  return x @ p["w"] + p["b"]


CASES = {
    # name: (fn, params, inputs, outputs, exact)
    "elementwise": (lambda p, x: jnp.tanh(x * p["b"]) * jnp.exp(p["b"]) - jnp.maximum(x, p["b"]),
                    W44, X34, OUT4, True),
    "broadcast_bias": (lambda p, x: x + p["b"] + p["w"][0, 0], W44, X34, OUT4, True),
    "select_n": (lambda p, x: jnp.where(x > 0, x * p["b"], p["b"] ** 2), W44, X34, OUT4, False),
    "integer_pow_div": (lambda p, x: (x ** 2) / (1.0 + p["b"] ** 2) + lax.rsqrt(1.0 + p["b"] ** 2), W44, X34,
                        OUT4, True),
    "dot": (_dense, W44, X34, OUT4, True),
    "dot_rows": (lambda p, x: p["w"] @ x.T, W44, X34, js.Features(names("o", 3)), True),
    "einsum_batch": (lambda p, x: jnp.einsum("bij,bjk->bik", p["a"], x), {"a": sds((2, 3, 4), f32)},
                     sds((2, 4, 5), f32), js.Features(["b0", "b1"], axis=0), True),
    "reduce_sum": (lambda p, x: (x @ p["w"]).sum(0), W44, X34, OUT4, True),
    "reduce_max": (lambda p, x: (x @ p["w"]).max(0), W44, X34, OUT4, False),
    "mean_var": (lambda p, x: jnp.var(x @ p["w"], axis=-1, keepdims=True) + p["b"], W44, X34, OUT4, True),
    "softmax": (lambda p, x: jax.nn.softmax(x @ p["w"]), W44, X34, OUT4, True),
    "cumsum": (lambda p, x: jnp.cumsum(x * p["b"], axis=-1), W44, X34, OUT4, True),
    "argmax_gather": (lambda p, x: jnp.take_along_axis(x, jnp.argmax(x @ p["w"], -1, keepdims=True), -1)
                      * p["b"], W44, X34, OUT4, False),
    "reshape_transpose": (lambda p, x: (x @ p["w"]).reshape(2, 6).T.reshape(3, 4), W44, X34, OUT4, True),
    "slice_pad_rev": (lambda p, x: jnp.pad((x * p["b"])[:, 1:3], ((0, 0), (1, 1)))[:, ::-1] + p["w"][1],
                      W44, X34, OUT4, True),
    "strided_interior_pad": (lambda p, x: lax.pad((x @ p["w"])[:, ::2], 0.0, [(0, 0, 0), (0, 1, 1)]),
                             W44, X34, OUT4, True),
    "concatenate": (lambda p, x: jnp.concatenate([(x @ p["w"])[:, :2], x[:, :2] * p["b"][:2]], -1),
                    W44, X34, OUT4, True),
    "squeeze_expand_tile": (lambda p, x: jnp.tile((x @ p["w"])[:, None, :2], (1, 1, 2))[:, 0] + p["b"],
                            W44, X34, OUT4, True),
    "split": (lambda p, x: jnp.split(x @ p["w"], 2, axis=-1)[1].repeat(2, -1), W44, X34, OUT4, True),
    "static_gather": (lambda p, x: (x @ p["w"])[:, jnp.array([3, 0, 0, 1])], W44, X34, OUT4, True),
    "traced_gather": (lambda p, x: p["emb"][x["ids"]] @ p["w"], {"emb": sds((5, 4), f32), "w": sds((4, 4), f32)},
                      {"ids": sds((6,), jnp.int32)}, OUT4, False),
    "dynamic_slice": (lambda p, x: lax.dynamic_slice_in_dim(x["x"] @ p["w"], x["i"][0], 2, 0),
                      W44, {"x": X34, "i": sds((1,), jnp.int32)}, OUT4, False),
    "dynamic_update_slice": (lambda p, x: lax.dynamic_update_slice(x["x"] @ p["w"], p["b"][None, :2],
                                                                   (x["i"][0], 1)),
                             W44, {"x": X34, "i": sds((1,), jnp.int32)}, OUT4, False),
    "scatter_add": (lambda p, x: jnp.zeros((4,)).at[jnp.array([1, 1, 3])].add(p["b"][:3]) * x[0],
                    W44, X34, OUT4, True),
    "traced_scatter": (lambda p, x: jnp.zeros((4,)).at[x["i"]].add(p["b"][:3]) * x["x"][0],
                       W44, {"x": X34, "i": sds((3,), jnp.int32)}, OUT4, False),
    "sort": (lambda p, x: jnp.sort(x @ p["w"], axis=-1), W44, X34, OUT4, False),
    "max_pool": (lambda p, x: lax.reduce_window(x @ p["w"], -jnp.inf, lax.max, (1, 2), (1, 2), "VALID")
                 .repeat(2, -1), W44, X34, OUT4, False),
    "conv_head": (lambda p, x: lax.conv_general_dilated(x + p["b0"], p["k"], (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b"],
                  {"k": sds((3, 3, 2, 4), f32), "b": sds((4,), f32), "b0": sds((4, 4, 2), f32)},
                  sds((1, 4, 4, 2), f32), OUT4, True),
    "conv_grouped_nchw": (lambda p, x: lax.conv_general_dilated(
        x * p["s"], p["k"], (1, 1), "VALID", feature_group_count=2,
        dimension_numbers=("NCHW", "OIHW", "NCHW")).sum((2, 3)),
        {"k": sds((6, 2, 2, 1), f32), "s": sds((1, 4, 1, 1), f32)}, sds((2, 4, 3, 3), f32),
        js.Features(names("o", 6)), True),
    "conv_batch_groups": (lambda p, x: lax.conv_general_dilated(
        x, p["k"], (1, 1), "VALID", batch_group_count=2, dimension_numbers=("NCHW", "OIHW", "NCHW")).sum((0, 2, 3)),
        {"k": sds((4, 2, 2, 2), f32)}, sds((2, 2, 3, 3), f32), js.Features(names("o", 4)), True),
    "jit_custom_jvp": (lambda p, x: jax.jit(lambda a: jax.nn.relu(a) + jax.nn.gelu(a))(x @ p["w"]),
                       W44, X34, OUT4, True),
    "custom_vjp_remat": (lambda p, x: jax.checkpoint(_cvjp)(x @ p["w"]), W44, X34, OUT4, True),
    "cond": (lambda p, x: lax.cond(x["x"].sum() > 0, lambda a: a @ p["w"], lambda a: a * p["b"], x["x"]),
             W44, {"x": X34}, OUT4, False),
    "switch_three": (lambda p, x: lax.switch(x["i"][0], [lambda a: a @ p["w"], lambda a: a * p["b"],
                                                       lambda a: a + 1.0], x["x"]),
                     W44, {"x": X34, "i": sds((1,), jnp.int32)}, OUT4, False),
    "while": (lambda p, x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])),
                                          (0, x))[1], W44, X34, OUT4, False),
    "while_pred_param": (lambda p, x: lax.while_loop(lambda c: (c[0] < 3) & (c[1].sum() < p["b"].sum() * 50),
                                                     lambda c: (c[0] + 1, c[1] * 1.5), (0, x))[1],
                         W44, X34, OUT4, False),
    "scan_short_shift": (lambda p, x: _shift(p, x, 4), {"b": sds((4,), f32)}, sds((4, 4), f32),
                         js.Features(names("t", 4), axis=0), True),
    "scan_long_shift": (lambda p, x: _shift(p, x, 12), {"b": sds((4,), f32)}, sds((12, 4), f32),
                        js.Features(names("t", 12), axis=0), False),
    "scan_reverse": (lambda p, x: lax.scan(lambda c, xt: (c * xt, c), p["b"], x, reverse=True)[1],
                     {"b": sds((4,), f32)}, sds((3, 4), f32), OUT4, True),
}


@jax.custom_vjp
def _cvjp(a):
  return jnp.sin(a)


_cvjp.defvjp(lambda a: (jnp.sin(a), a), lambda a, g: (g * jnp.cos(a),))


def _shift(p, x, T):
  """A scan whose carry is a shift register: step t's output depends on the params of step 0 only
  through the register, so ys[t] sees p["b"][j] only for j <= t (per-step precision)."""
  def step(c, xt):
    c = jnp.concatenate([c[1:], c[:1] * 0.0]) + xt * 0.0
    return c, c[0] * xt
  return lax.scan(step, p["b"], x)[1].sum(-1, keepdims=True) * jnp.ones((T, 4))


@pytest.mark.parametrize("name", list(CASES))
def test_rule_family_contains_jacobian(name):
  fn, params, inputs, outputs, exact = CASES[name]
  maxval = 4 if name != "traced_gather" else 5
  check(fn, params, inputs, outputs, exact=exact, maxval=maxval, nan=name != "conv_batch_groups")


def test_scan_short_keeps_per_step_precision():
  table = check(lambda p, x: _shift(p, x, 4), {"b": sds((4,), f32)}, sds((4, 4), f32),
                js.Features(names("t", 4), axis=0), exact=True)
  r = table.reach("b")  # b[j] is emitted at step j - 1 (b[0], zeroed, at the last step): one step each
  assert (r.sum(0) == 1).all() and (r.sum(1) == 1).all() and r[1:, :3].diagonal().all()
  long = js.dependency_table(lambda p, x: _shift(p, x, 12), {"b": sds((4,), f32)}, sds((12, 4), f32), None,
                             outputs=js.Features(names("t", 12), axis=0))
  assert long.reach("b").all()  # the fixed point: ys ORed over time (sound, coarse)


def _named_by_last_axis(out_shape):
  """Every output leaf named along its last axis (a whole scalar leaf by one name), names unique."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(out_shape)
  specs = [js.Features([f"{jax.tree_util.keystr(p)}:{i}" for i in range(o.shape[-1])]) if o.ndim
           else f"{jax.tree_util.keystr(p)}" or "out" for p, o in flat]
  return jax.tree_util.tree_unflatten(treedef, specs)


@pytest.mark.parametrize("case", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_every_forward_rule_case_has_a_sound_reach(case):
  """The forward rules' own cases (tests/test_rules.py), the operand made a parameter."""
  name, f, n, exact = case
  fn = lambda p, x: f(p["x"])
  params = {"x": sds((n,), f32)}
  outputs = _named_by_last_axis(jax.eval_shape(fn, params, None))
  with warnings.catch_warnings():
    warnings.simplefilter("error", js.UnknownPrimitiveWarning)
    check(fn, params, None, outputs, exact=exact)  # exact forward masks: exact reach too


# -- composed programs ---------------------------------------------------------------------

def test_mlp_policy_two_heads_concatenated_is_exact():
  params = {"torso": {"w": sds((5, 8), f32), "b": sds((8,), f32)},
            "move": {"w": sds((8, 3), f32), "b": sds((3,), f32)},
            "act": {"w": sds((8, 2), f32), "b": sds((2,), f32)},
            "value": {"w": sds((8, 1), f32)}}

  def fn(p, x):
    h = jax.nn.relu(x @ p["torso"]["w"] + p["torso"]["b"])
    logits = jnp.concatenate([h @ p["move"]["w"] + p["move"]["b"], h @ p["act"]["w"] + p["act"]["b"]], -1)
    return {"logits": logits, "value": (h @ p["value"]["w"])[..., 0]}

  outputs = {"logits": js.Features(["up", "down", "left", "fire", "wait"]), "value": "value"}
  table = check(fn, params, sds((4, 5), f32), outputs, exact=True, features=js.Features(names("f", 5)))
  assert table.output_features == ("up", "down", "left", "fire", "wait", "value")
  r = table.reach("act/w")  # act/w[:, j] reaches "fire" (j = 0) or "wait" (j = 1) only
  assert (r == np.eye(6, dtype=bool)[3:5][None]).all()
  assert table.reach("torso/w").all()


def _lstm(p, x, T):
  H = p["wh"].shape[0]

  def cell(carry, xt):
    c, h = carry
    g = xt @ p["wi"] + h @ p["wh"] + p["b"]
    i, f, gg, o = jnp.split(g, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h

  (_, _), hs = lax.scan(cell, (jnp.zeros(H), p["h0"]), x)
  return {"logits": hs @ p["head"], "last": hs[-1] @ p["value"]}


@pytest.mark.parametrize("T", [5, 12])  # step by step, and the fixed point
def test_lstm_under_scan(T):
  H, D = 3, 2
  params = {"wi": sds((D, 4 * H), f32), "wh": sds((H, 4 * H), f32), "b": sds((4 * H,), f32),
            "h0": sds((H,), f32), "head": sds((H, 3), f32), "value": sds((H, 1), f32)}
  outputs = {"logits": js.Features(["a", "b", "c"]), "last": "value"}
  table = check(lambda p, x: _lstm(p, x, T), params, sds((T, D), f32), outputs, exact=True)
  assert table.output_features == ("value", "a", "b", "c")  # output leaves in key order: last, logits
  assert table.reach("value")[..., 0].all() and not table.reach("value")[..., 1:].any()
  assert table.reach("head").reshape(-1, 3, 4)[:, :, 1:].tolist() == [np.eye(3, dtype=bool).tolist()] * 3


def test_while_loop_program():
  params = {"w": sds((4, 4), f32), "u": sds((4, 2), f32), "s": sds((), f32)}

  def fn(p, x):
    def body(c):
      i, h = c
      return i + 1, jnp.tanh(h @ p["w"]) * p["s"]
    _, h = lax.while_loop(lambda c: c[0] < 4, body, (0, x))
    return h @ p["u"]

  table = check(fn, params, X34, js.Features(["l", "r"]), exact=True)
  assert table.reach("u")[:, 0].tolist() == [[True, False]] * 4


def test_cond_program():
  params = {"a": sds((4, 2), f32), "b": sds((4, 2), f32), "c": sds((4, 2), f32)}

  def fn(p, x):
    y = lax.cond(x[0, 0] > 0, lambda h: h @ p["a"], lambda h: h @ p["b"], x)
    return {"y": y, "z": x @ p["c"]}

  table = check(fn, params, X34, {"y": js.Features(["l", "r"]), "z": None})
  assert table.reach("a")[0].tolist() == [[True, False], [False, True]]
  assert not table.reach("c").any()  # an unnamed output is not in reach


def test_tied_embedding_head_is_exact():
  V, D = 6, 3
  params = {"emb": sds((V, D), f32), "enc": sds((4, D), f32)}

  def fn(p, x):
    h = jnp.tanh(x @ p["enc"])
    return h @ p["emb"].T  # the embedding table used as the output head

  table = check(fn, params, sds((2, 4), f32), js.Features(names("tok", V)), exact=True)
  r = table.reach("emb")  # row v of the tied table reaches logit v only
  assert (r == np.eye(V, dtype=bool)[:, None, :]).all()


def test_tied_embedding_lookup_and_head_is_sound():
  V, D = 6, 3
  params = {"emb": sds((V, D), f32)}
  fn = lambda p, ids: jnp.tanh(p["emb"][ids]) @ p["emb"].T
  table = check(fn, params, sds((4,), jnp.int32), js.Features(names("tok", V)), maxval=V)
  assert table.reach("emb").all()  # any row may be looked up, and then reaches every logit


def test_conv_policy_head_is_exact():
  params = {"k1": sds((3, 3, 2, 3), f32), "b1": sds((3,), f32), "k2": sds((1, 1, 3, 4), f32),
            "b2": sds((4,), f32)}

  def fn(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn) + p["b1"])
    y = lax.conv_general_dilated(h, p["k2"], (1, 1), "SAME", dimension_numbers=dn) + p["b2"]
    return y.mean((1, 2))  # (N, 4) channel logits

  table = check(fn, params, sds((2, 5, 5, 2), f32), OUT4, exact=True)
  assert (table.reach("k2")[0, 0, :, :, :] == np.eye(4, dtype=bool)[None]).all()


def test_residual_stack_is_linear_time():
  """A deep residual stack: every value is walked back once (no per-path blow-up)."""
  L = 40
  params = {f"w{i}": sds((4, 4), f32) for i in range(L)}

  def fn(p, x):
    for i in range(L):
      x = x + jnp.tanh(x @ p[f"w{i}"])
    return x

  table = js.dependency_table(fn, params, X34, None, outputs=OUT4)
  t = time.perf_counter()
  assert table.reach("w0").all()  # mixed by every later layer
  assert time.perf_counter() - t < 10  # 2^40 paths if values were not accumulated before walking back
  assert (table.reach(f"w{L - 1}") == np.eye(4, dtype=bool)[None]).all()  # the last layer: column j -> j


def test_values_that_only_select_still_reach():
  """Influence beyond the gradient: an index, a predicate or a trip count derived from a parameter."""
  fn = lambda p, x: {"pick": x[jnp.argmax(p["w"])],
                     "loop": lax.while_loop(lambda c: c.sum() < p["b"].sum(), lambda c: c * 2.0, x)}
  params = {"w": sds((3,), f32), "b": sds((4,), f32)}
  outputs = {"pick": js.Features(names("p", 4)), "loop": js.Features(names("l", 4))}
  table = check(fn, params, sds((3, 4), f32), outputs)
  assert table.output_features[:4] == ("l0", "l1", "l2", "l3")  # output leaves in key order
  assert table.reach("w")[..., 4:].all() and not table.reach("w")[..., :4].any()
  assert table.reach("b")[..., :4].all() and not table.reach("b")[..., 4:].any()


# -- the model zoo ---------------------------------------------------------------------------

def _zoo_outputs(out_shape):
  """Every output leaf named along its last axis, with names unique across leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(out_shape)
  specs = [js.Features([f"{jax.tree_util.keystr(p)}:{i}" for i in range(o.shape[-1])]) for p, o in flat]
  return jax.tree_util.tree_unflatten(treedef, specs)


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_models_contain_jacobian(name):
  m = zoo.get(name)
  params, inputs = zoo.abstract(m)
  outputs = _zoo_outputs(jax.eval_shape(m.fn, params, inputs))
  table = js.dependency_table(m.fn, params, inputs, m.features, outputs=outputs, strict=True)
  points = [(zoo.get(name, s).params, zoo.get(name, s).inputs) for s in (0, 1, 2)]
  jac = jacobian_reach_at(table, m.fn, points)
  for p in table.paths:
    r = table.reach(p)
    missed = jac[p] & ~r
    assert not missed.any(), f"{name} {p}: reach misses {np.argwhere(missed).tolist()[:10]}"
    if name in ZOO_EXACT:
      assert (r == jac[p]).all(), f"{name} {p}: over-approximates at {np.argwhere(r & ~jac[p]).tolist()[:10]}"


# Exact on the structurally dense models. Not listed: ReLU models (dead units have zero gradient at
# the sampled points), embeddings (rows not looked up), and models whose zeros depend on values.
ZOO_EXACT = {"mlp_tanh", "mlp_gelu", "mlp_nnx", "mlp_linen", "convnet", "lstm", "gru", "tied", "attention",
             "residual", "batchnorm", "five"}


# -- entry points and errors -----------------------------------------------------------------

def test_reach_masks_core_call_and_out_masks():
  fn = lambda p, x: {"a": x @ p["w"], "b": p["b"] * 2.0}
  params = {"w": sds((3, 2), f32), "b": sds((2,), f32)}
  table = js.dependency_table(fn, params, sds((5, 3), f32), None,
                              outputs={"a": js.Features(["l", "r"]), "b": "bias"})
  masks = R.reach_masks(table.jaxpr, len(table.paths), table.output_spec)
  assert table.paths == ("b", "w")
  assert M.unpack(masks[0], (2,), 3).tolist() == [[False, False, True]] * 2
  assert M.unpack(masks[1], (3, 2), 3)[0].tolist() == [[True, False, False], [False, True, False]]
  # explicit output masks: only "bias" on output "b"
  only = [None, M.one_hot(np.array([2]), 1).reshape(1, 1)]
  masks = R.reach_masks(table.jaxpr, len(table.paths), table.output_spec, out_masks=only)
  assert masks[1] is None and M.unpack(masks[0], (2,), 3)[:, 2].all()


def test_outputs_that_are_parameters_or_constants():
  fn = lambda p, x: {"b": p["b"], "c": jnp.float32(1.0), "w": p["w"].T}
  params = {"b": sds((2,), f32), "w": sds((2, 3), f32)}
  table = check(fn, params, None, {"b": js.Features(["b0", "b1"]), "c": "const", "w": js.Features(["w0", "w1"])},
                exact=True)
  assert table.reach("b").tolist() == [[True, False, False, False, False], [False, True, False, False, False]]
  assert table.reach("w")[:, 0].tolist() == [[False, False, False, True, False], [False, False, False, False, True]]


def test_reach_is_cached_per_table():
  table = js.dependency_table(_dense, W44, X34, None, outputs=OUT4)
  a = table.reach("w")
  assert R._table_masks(table) is R._table_masks(table)
  assert (table.reach("w") == a).all()


def test_no_output_names_is_a_clear_error():
  table = js.dependency_table(_dense, W44, X34, js.Features(names("f", 4)))
  with pytest.raises(ValueError, match="pass outputs= to dependency_table"):
    table.reach("w")
  with pytest.raises(ValueError, match="pass outputs= to dependency_table"):
    R.reach(table, "w")


def test_table_without_program_is_a_clear_error():
  table = js.dependency_table(_dense, W44, X34, None, outputs=OUT4)
  dropped = dataclasses.replace(table, jaxpr=None)
  with pytest.raises(ValueError, match="jaxpr is None"):
    dropped.reach("w")


def _my_op():
  from jax.extend.core import Primitive

  p = Primitive("my_reach_op")
  p.def_impl(lambda x, w: x * w.sum())
  p.def_abstract_eval(lambda x, w: jax.core.ShapedArray(x.shape, x.dtype))
  return p


MY_OP = _my_op()


def _unknown_model(p, x):
  y = MY_OP.bind(x[:, :2] @ p["w"], p["b"])
  return jnp.concatenate([y, x[:, :2] @ p["u"]], -1)


UNKNOWN_PARAMS = {"w": sds((2, 2), f32), "b": sds((3,), f32), "u": sds((2, 2), f32)}


def test_unknown_primitive_warns_and_is_dense():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", js.UnknownPrimitiveWarning)
    table = js.dependency_table(_unknown_model, UNKNOWN_PARAMS, X34, None, outputs=OUT4)
  masks = R.reach_masks  # the table's reach warns again, naming the primitive
  with pytest.warns(js.UnknownPrimitiveWarning, match="my_reach_op"):
    m = masks(table.jaxpr, len(table.paths), table.output_spec)
  dense = {p: M.unpack(x, table.shapes[p], 4) for p, x in zip(table.paths, m)}
  # every element entering my_reach_op reaches every output of it (o0, o1), not the u head's
  assert dense["b"].tolist() == [[True, True, False, False]] * 3
  assert dense["w"].reshape(-1, 4).tolist() == [[True, True, False, False]] * 4
  assert dense["u"][0].tolist() == [[False, False, True, False], [False, False, False, True]]


def test_unknown_primitive_strict_raises():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", js.UnknownPrimitiveWarning)
    table = js.dependency_table(_unknown_model, UNKNOWN_PARAMS, X34, None, outputs=OUT4)
  with pytest.raises(js.UnknownPrimitiveError, match="my_reach_op"):
    R.reach_masks(table.jaxpr, len(table.paths), table.output_spec, strict=True)


def test_rule_without_provenance_is_treated_as_dense():
  """A user rule that gives its output no pull cannot make reach miss a dependency."""
  from jaxsurgery._src.core.values import out_val

  def no_pull(ctx, eqn, invals):
    return [out_val(o, None) for o in eqn.outvars]

  with js.override_rule("tanh", no_pull):
    table = js.dependency_table(lambda p, x: jnp.tanh(x @ p["w"]), W44, X34, None, outputs=OUT4)
    assert table.reach("w").all()


def test_a_strict_table_keeps_strict_in_its_reach():
  """A table built with strict=True under a temporary rule: its reach, asked for after the rule is gone,
  raises naming the primitive (a non-strict table warns and is dense)."""
  from jaxsurgery._src.rules.opaque import dense as dense_rule
  with js.override_rule("my_reach_op", dense_rule):
    strict = js.dependency_table(_unknown_model, UNKNOWN_PARAMS, X34, None, outputs=OUT4, strict=True)
    loose = js.dependency_table(_unknown_model, UNKNOWN_PARAMS, X34, None, outputs=OUT4)
  assert strict.strict and not loose.strict
  with pytest.raises(js.UnknownPrimitiveError, match="my_reach_op"):
    strict.reach("w")
  with pytest.warns(js.UnknownPrimitiveWarning, match="my_reach_op"):
    assert loose.reach("w")[..., :2].all()   # dense over what my_reach_op writes
