"""The feature→parameter table: precision on canonical layers, model sources, bad input.

Expected touch sets are written out by hand from the touch relation (first
contact, pulled back through views; see docs/design.md), never read from the
implementation.
"""

from __future__ import annotations

import gc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from checks import jacobian_pattern
from flax import nnx
from jax import lax

import jaxsurgery as js

SDS = jax.ShapeDtypeStruct
F32 = jnp.float32


def sds(*shape, dtype=F32):
  return SDS(shape, dtype)


def sets(table, path) -> np.ndarray:
  """Object array of param.shape: the set of feature names touching each element."""
  m = table.mask(path)
  out = np.empty(m.shape[:-1], object)
  for idx in np.ndindex(*m.shape[:-1]):
    out[idx] = frozenset(table.features[k] for k in np.nonzero(m[idx])[0])
  return out


def assert_sets(table, path, expected) -> None:
  got = sets(table, path)
  expected = np.asarray(expected, object) if not isinstance(expected, np.ndarray) else expected
  expected = np.broadcast_to(expected, got.shape)
  bad = [(idx, set(got[idx]), set(expected[idx])) for idx in np.ndindex(*got.shape) if got[idx] != expected[idx]]
  assert not bad, f"{path}: (index, got, expected) {bad[:6]}"


def fs(*names):
  return frozenset(names)


def rows(shape, per_row):
  """Expected sets of a 2-D (or more) leaf whose row i is touched by per_row[i]."""
  out = np.empty(shape, object)
  for idx in np.ndindex(*shape):
    out[idx] = per_row[idx[0]]
  return out


ABCD = js.Features(["a", "b", "c", "d"])
ALL4 = fs("a", "b", "c", "d")


# -- canonical layers ------------------------------------------------------------

def test_dense_kernel_rows_are_touched_by_their_feature():
  fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  params = {"w1": sds(4, 5), "b1": sds(5), "w2": sds(5, 2), "b2": sds(2)}
  t = js.dependency_table(fn, params, sds(3, 4), ABCD)
  assert_sets(t, "w1", rows((4, 5), [fs("a"), fs("b"), fs("c"), fs("d")]))
  for path in ("b1", "w2", "b2"):
    assert_sets(t, path, ALL4)
  assert (t.output_mask() == True).all()  # noqa: E712
  assert t.feature_counts("w1").tolist() == [5, 5, 5, 5]
  assert t.touched_elements("w1") == 20
  assert t.lookup("c")["w1"][2].all() and not t.lookup("c")["w1"][[0, 1, 3]].any()


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_conv_kernel_is_touched_per_input_channel(layout):
  C, O = 3, 4
  if layout == "NHWC":
    dn, kshape, x = ("NHWC", "HWIO", "NHWC"), (3, 3, C, O), sds(2, 6, 6, C)
    spec, in_axis = js.Features(["r", "g", "b"], axis=3), 2
  else:
    dn, kshape, x = ("NCHW", "OIHW", "NCHW"), (O, C, 3, 3), sds(2, C, 6, 6)
    spec, in_axis = js.Features(["r", "g", "b"], axis=1), 1
  fn = lambda p, x: jax.nn.relu(lax.conv_general_dilated(x, p["k"], (2, 1), "SAME", dimension_numbers=dn))
  t = js.dependency_table(fn, {"k": sds(*kshape)}, x, spec)
  expected = np.empty(kshape, object)
  for idx in np.ndindex(*kshape):
    expected[idx] = fs("rgb"[idx[in_axis]])
  assert_sets(t, "k", expected)


def test_grouped_conv_kernel_is_touched_by_its_groups_channels():
  # 4 input channels, 2 groups: kernel (O=4, I=2) of output channel o reads channels 2*(o//2) + i
  fn = lambda p, x: lax.conv_general_dilated(x, p["k"], (1,), "VALID", dimension_numbers=("NCH", "OIH", "NCH"),
                                             feature_group_count=2)
  t = js.dependency_table(fn, {"k": sds(4, 2, 3)}, sds(1, 4, 5), js.Features(list("abcd"), axis=1))
  expected = np.empty((4, 2, 3), object)
  for o, i, k in np.ndindex(4, 2, 3):
    expected[o, i, k] = fs("abcd"[2 * (o // 2) + i])
  assert_sets(t, "k", expected)


def test_embedding_table_is_touched_by_its_categorical_feature_only():
  def fn(p, x):
    e = p["embed"][x["cat"]]                       # (B, D): any row may be selected
    h = jax.nn.relu(jnp.concatenate([e, x["obs"]], -1) @ p["w"])
    return h * jnp.take(p["other"], x["cat2"], axis=0)  # an unnamed index: feature-free rows
  params = {"embed": sds(6, 3), "w": sds(5, 2), "other": sds(4, 2)}
  inputs = {"cat": sds(4, dtype=jnp.int32), "cat2": sds(4, dtype=jnp.int32), "obs": sds(4, 2)}
  spec = {"cat": "hero", "cat2": None, "obs": js.Features(["hp", "mana"])}
  t = js.dependency_table(fn, params, inputs, spec)
  assert_sets(t, "embed", fs("hero"))
  assert_sets(t, "w", rows((5, 2), [fs("hero")] * 3 + [fs("hp"), fs("mana")]))
  # the rows gathered by an unnamed index meet h (every feature) when they multiply it
  assert_sets(t, "other", fs("hero", "hp", "mana"))


def test_per_feature_normalisation_statistics():
  def fn(p, x):
    z = (x - p["mean"]) / p["std"]
    z = z * p["scale"] + p["shift"]
    return z @ p["w"]
  params = {"mean": sds(4), "std": sds(4), "scale": sds(4), "shift": sds(4), "w": sds(4, 3)}
  t = js.dependency_table(fn, params, sds(2, 7, 4), ABCD)
  for path in ("mean", "std", "scale", "shift"):
    assert_sets(t, path, np.array([fs("a"), fs("b"), fs("c"), fs("d")], object))
  assert_sets(t, "w", rows((4, 3), [fs("a"), fs("b"), fs("c"), fs("d")]))


def test_layer_norm_statistics_mix_all_features():
  def fn(p, x):
    mu = x.mean(-1, keepdims=True)
    z = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    return z * p["scale"] + p["bias"]
  t = js.dependency_table(fn, {"scale": sds(4), "bias": sds(4)}, sds(2, 4), ABCD)
  assert_sets(t, "scale", ALL4)
  assert_sets(t, "bias", ALL4)


def test_biases_and_deeper_layers_see_what_reaches_them():
  def fn(p, x):
    a = jax.nn.relu(x["left"] @ p["left"]["w"] + p["left"]["b"])
    b = jax.nn.relu(x["right"] * p["right"]["g"] + p["right"]["b"])
    return jnp.concatenate([a, b], -1) @ p["head"]["w"] + p["head"]["b"]
  params = {"left": {"w": sds(2, 3), "b": sds(3)}, "right": {"g": sds(1), "b": sds(1)},
            "head": {"w": sds(4, 2), "b": sds(2)}}
  inputs = {"left": sds(5, 2), "right": sds(5, 1)}
  spec = {"left": js.Features(["l0", "l1"]), "right": js.Features(["r"])}
  t = js.dependency_table(fn, params, inputs, spec)
  assert_sets(t, "left/b", fs("l0", "l1"))
  assert_sets(t, "right/b", fs("r"))
  assert_sets(t, "right/g", fs("r"))
  assert_sets(t, "head/w", rows((4, 2), [fs("l0", "l1")] * 3 + [fs("r")]))
  assert_sets(t, "head/b", fs("l0", "l1", "r"))


@pytest.mark.parametrize("named", [False, True])
def test_two_input_leaves_concatenated_give_one_block_per_leaf(named):
  fn = lambda p, x: jnp.concatenate([x["a"], x["b"]], -1) @ p["w"]
  inputs = {"a": sds(3, 2), "b": sds(3, 3)}
  if named:
    spec = {"a": js.Features(["a0", "a1"]), "b": js.Features(["b0", "b1", "b2"])}
    expected = [fs("a0"), fs("a1"), fs("b0"), fs("b1"), fs("b2")]
  else:
    spec = {"a": "A", "b": "B"}
    expected = [fs("A")] * 2 + [fs("B")] * 3
  t = js.dependency_table(fn, {"w": sds(5, 4)}, inputs, spec)
  assert_sets(t, "w", rows((5, 4), expected))


# -- parameters used through views -----------------------------------------------

def test_transposed_kernel_is_pulled_back_to_columns():
  t = js.dependency_table(lambda p, x: x @ p["w"].T, {"w": sds(3, 4)}, sds(2, 4), ABCD)
  expected = np.empty((3, 4), object)
  for i, j in np.ndindex(3, 4):
    expected[i, j] = fs("abcd"[j])
  assert_sets(t, "w", expected)


def test_reshaped_kernel_is_pulled_back_to_the_flat_vector():
  t = js.dependency_table(lambda p, x: x @ p["w"].reshape(4, 3), {"w": sds(12)}, sds(2, 4), ABCD)
  assert_sets(t, "w", np.array([fs("abcd"[i // 3]) for i in range(12)], object))


def test_sliced_kernel_touches_only_the_used_slice():
  fn = lambda p, x: (x @ p["w"][:, :2]) + x[:, 1:3] @ p["v"][2:4]
  t = js.dependency_table(fn, {"w": sds(4, 5), "v": sds(6, 2)}, sds(2, 4), ABCD)
  expected = np.empty((4, 5), object)
  for i, j in np.ndindex(4, 5):
    expected[i, j] = fs("abcd"[i]) if j < 2 else fs()
  assert_sets(t, "w", expected)
  assert_sets(t, "v", rows((6, 2), [fs(), fs(), fs("b"), fs("c"), fs(), fs()]))


def test_elementwise_parameter_views():
  # exp of a log-scale, a softplus, a stop_gradient: still per feature
  fn = lambda p, x: x * jnp.exp(p["log_scale"]) + jax.nn.softplus(p["raw"]) * lax.stop_gradient(x)
  t = js.dependency_table(fn, {"log_scale": sds(4), "raw": sds(4)}, sds(3, 4), ABCD)
  per = np.array([fs("a"), fs("b"), fs("c"), fs("d")], object)
  assert_sets(t, "log_scale", per)
  assert_sets(t, "raw", per)


def test_tied_embedding_is_touched_by_input_and_output_uses():
  def fn(p, x):
    h = p["embed"][x["tok"]].mean(1) + x["obs"] @ p["proj"]   # (B, D)
    return h @ p["embed"].T                                    # logits tied to the table
  params = {"embed": sds(7, 3), "proj": sds(2, 3)}
  inputs = {"tok": sds(2, 5, dtype=jnp.int32), "obs": sds(2, 2)}
  t = js.dependency_table(fn, params, inputs, {"tok": "tokens", "obs": js.Features(["o0", "o1"])})
  assert_sets(t, "embed", fs("tokens", "o0", "o1"))
  assert_sets(t, "proj", rows((2, 3), [fs("o0"), fs("o1")]))


def test_weight_normalised_kernel_mixes_over_the_norm_axis():
  def fn(p, x):
    k = p["g"] * p["v"] / jnp.linalg.norm(p["v"], axis=0, keepdims=True)
    return x @ k
  t = js.dependency_table(fn, {"v": sds(4, 3), "g": sds(3)}, sds(2, 4), ABCD)
  assert_sets(t, "v", ALL4)   # each column's norm reads every row
  assert_sets(t, "g", ALL4)


def test_param_derived_value_stops_pulling_where_it_becomes_feature_dependent():
  # h = x * w is feature dependent; h @ u touches u, not w (again) through h
  fn = lambda p, x: (x * p["w"]) @ p["u"]
  t = js.dependency_table(fn, {"w": sds(4), "u": sds(4, 2)}, sds(1, 4), ABCD)
  assert_sets(t, "w", np.array([fs("a"), fs("b"), fs("c"), fs("d")], object))
  assert_sets(t, "u", rows((4, 2), [fs("a"), fs("b"), fs("c"), fs("d")]))


# -- loops -----------------------------------------------------------------------

def test_scan_records_first_contact_of_a_learned_initial_carry():
  def fn(p, x):
    def cell(h, xt):
      h = jnp.tanh(h @ p["wh"] + xt @ p["wx"] + p["b"])
      return h, h
    return lax.scan(cell, p["h0"], x)[1]
  params = {"h0": sds(3), "wh": sds(3, 3), "wx": sds(2, 3), "b": sds(3)}
  t = js.dependency_table(fn, params, sds(4, 2), js.Features(["u", "v"], axis=1))
  assert_sets(t, "h0", fs("u", "v"))   # h0 @ wh meets xt @ wx at step 0
  assert_sets(t, "wx", rows((2, 3), [fs("u"), fs("v")]))
  assert_sets(t, "wh", fs("u", "v"))


def test_scan_over_stacked_layers_keeps_first_layer_rows_precise():
  layer = lambda h, w: (jnp.tanh(h @ w["k"] + w["b"]), None)
  params = {"layers": {"k": sds(3, 4, 4), "b": sds(3, 4)}}
  for reverse, first in ((False, 0), (True, 2)):
    fn = lambda p, x, reverse=reverse: lax.scan(layer, x, p["layers"], reverse=reverse)[0]
    t = js.dependency_table(fn, params, sds(2, 4), ABCD)
    got = sets(t, "layers/k")
    for l in range(3):
      want = rows((4, 4), [fs(n) for n in "abcd"]) if l == first else np.full((4, 4), ALL4, object)
      assert (got[l] == want).all(), (reverse, l, got[l])


def test_while_loop_touch_travels_along_a_chain_of_carries():
  # a <- b <- c <- p: after 3 steps `a` holds p, which then meets x
  def fn(p, x):
    body = lambda c: (c[0] + 1, c[2], c[3], c[3])
    _, a, _, _ = lax.while_loop(lambda c: c[0] < 5, body, (0, jnp.zeros(2), jnp.zeros(2), p["p"]))
    return a * x
  t = js.dependency_table(fn, {"p": sds(2)}, sds(2), js.Features(["u", "v"]))
  assert_sets(t, "p", np.array([fs("u"), fs("v")], object))


def test_while_predicate_touches_the_loop_operands():
  # the trip count depends on x[0]; the body's weight is selected by it
  def fn(p, x):
    body = lambda c: (c[0] + 1.0, c[1] * p["w"])
    return lax.while_loop(lambda c: c[0] < x[0], body, (0.0, p["h0"]))[1]
  t = js.dependency_table(fn, {"w": sds(3), "h0": sds(3)}, sds(1), js.Features(["n"]))
  assert_sets(t, "w", fs("n"))
  assert_sets(t, "h0", fs("n"))
  assert t.output_mask().all()


def test_loop_provenance_is_not_exponential_in_the_number_of_levels():
  # A shift register needs one level per position; before the worklist each level
  # doubled the pulls. Count how often the body's provenance is pulled.
  from jaxsurgery._src.rules import elementwise
  calls = [0]

  def counting_sin(ctx, eqn, invals):
    (out,) = elementwise.unary(ctx, eqn, invals)
    if out.pull is None:
      return [out]
    inner = out.pull

    def pull(t):
      calls[0] += 1
      inner(t)
    return [js.Val(out.shape, out.dtype, out.mask, pull)]

  n = 24
  def fn(p, x):
    s0 = jnp.zeros(n).at[0].set(x[0])
    def body(c):
      i, h, s = c
      return i + 1, jnp.sin(jnp.roll(h, 1)) * p["g"], jnp.roll(s, 1)
    _, h, s = lax.while_loop(lambda c: c[0] < 100, body, (0, p["h0"], s0))
    return h * x[1] + s

  with js.override_rule("sin", counting_sin):
    t = js.dependency_table(fn, {"h0": sds(n), "g": sds(n)}, sds(2), js.Features(["a", "b"]))
  assert_sets(t, "h0", fs("b"))
  assert 0 < calls[0] < 4 * n * n, calls[0]


def test_long_loops_terminate_by_widening():
  n = 200  # more levels than WIDEN_AFTER
  fn = lambda p, x: lax.fori_loop(0, 1000, lambda i, c: jnp.roll(c, 1) * p["g"], x)
  t = js.dependency_table(fn, {"g": sds(n)}, sds(n), js.Features([f"x{i}" for i in range(n)]))
  assert t.output_mask().all()
  assert t.mask("g").all()


# -- the zoo ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_tables():
  out = {}
  for name in zoo.names():
    m = zoo.get(name)
    params, inputs = zoo.abstract(m)
    out[name] = (m, js.dependency_table(m.fn, params, inputs, m.features, strict=True))
  return out


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_singles_meet_at_most_one_feature(zoo_tables, name):
  m, t = zoo_tables[name]
  assert t.unknown_primitives == ()
  for path in m.singles:
    per_element = t.mask(path).sum(-1)
    assert per_element.max() <= 1, f"{name}/{path}: {per_element}"
    assert per_element.max() == 1, f"{name}/{path} is never touched"
  for path in t.paths:
    if path not in m.singles and t.touched_elements(path):
      assert t.mask(path).any(-1).any()


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_output_masks_contain_the_input_jacobian(zoo_tables, name):
  """End to end soundness: d outputs / d float inputs, mapped to feature names, ⊆ output masks."""
  m, t = zoo_tables[name]
  spec = t.spec
  leaves, treedef = jax.tree_util.tree_flatten(m.inputs)
  float_idx = [i for i, (l, sl) in enumerate(zip(leaves, spec.leaves))
               if jnp.issubdtype(l.dtype, jnp.floating) and sl.feature_ids]
  if not float_idx:
    pytest.skip("no float feature inputs")
  sizes = [leaves[i].size for i in float_idx]
  n = sum(sizes)

  def f(flat):
    params = jax.tree.map(lambda a: a + 0.0 * flat[0], m.params)  # same trace level as flat (nnx)
    new = list(leaves)
    off = 0
    for i, s in zip(float_idx, sizes):
      new[i] = flat[off:off + s].reshape(leaves[i].shape)
      off += s
    return m.fn(params, jax.tree_util.tree_unflatten(treedef, new))

  base = jnp.concatenate([leaves[i].ravel() for i in float_idx])
  jac = jacobian_pattern(lambda d: f(base + d), n, seeds=(0,))            # (out, n)
  # feature of each flat input element
  feat = np.zeros((n, t.num_features), bool)
  off = 0
  for i, s in zip(float_idx, sizes):
    sl = spec.leaves[i]
    ids = np.empty(leaves[i].shape, np.int64)
    if sl.axis is None:
      ids[...] = sl.feature_ids[0]
    else:
      shape = [1] * ids.ndim
      shape[sl.axis] = -1
      ids[...] = np.asarray(sl.feature_ids).reshape(shape)
    feat[np.arange(off, off + s), ids.ravel()] = True
    off += s
  needed = (jac.astype(np.int64) @ feat.astype(np.int64)) > 0       # (out, features)
  got = np.concatenate([t.output_mask(p).reshape(-1, t.num_features) for p in t.output_paths], axis=0)
  missed = needed & ~got
  assert not missed.any(), f"{name}: output masks miss {np.argwhere(missed).tolist()[:10]}"


def test_zoo_expected_blocks(zoo_tables):
  _, t = zoo_tables["embedding"]
  assert_sets(t, "hero_embed", fs("hero"))
  assert_sets(t, "item_embed", fs("items"))
  assert_sets(t, "dense1/kernel", rows((11, 8), [fs("hero")] * 4 + [fs("items")] * 3
                                        + [fs("hp"), fs("mana"), fs("gold"), fs("level")]))
  _, t = zoo_tables["five"]
  unit = ["unit_hp", "unit_mana", "unit_x", "unit_y", "unit_dist"]
  assert_sets(t, "obs_norm/mean", np.array([fs(n) for n in unit], object))
  assert_sets(t, "unit_embed", fs("unit_type"))
  assert_sets(t, "torso/kernel", rows((11, 8), [fs("unit_type", *unit)] * 8
                                       + [fs("time"), fs("gold"), fs("team_score")]))
  _, t = zoo_tables["tied"]
  proj = np.empty((4, 5), object)
  for i, j in np.ndindex(4, 5):
    proj[i, j] = fs(f"o{j}") if j < 3 else fs()
  assert_sets(t, "proj_t", proj)
  assert not t.mask("head")[:, 4:].any() and t.mask("head")[:, :4].all()
  _, t = zoo_tables["convnet"]
  k = np.empty((3, 3, 3, 8), object)
  for idx in np.ndindex(*k.shape):
    k[idx] = fs(["red", "green", "blue"][idx[2]])
  assert_sets(t, "conv1/kernel", k)
  _, t = zoo_tables["attention"]
  q = np.empty((4, 2, 4), object)
  for idx in np.ndindex(*q.shape):
    q[idx] = fs(["pos_x", "pos_y", "size", "colour"][idx[0]])
  for path in ("attn/query/kernel/value", "attn/key/kernel/value", "attn/value/kernel/value"):
    assert_sets(t, path, q)


# -- model sources -----------------------------------------------------------------

class _Net(nnx.Module):
  def __init__(self, din, dh, rngs):
    self.l1 = nnx.Linear(din, dh, rngs=rngs)
    self.l2 = nnx.Linear(dh, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_nnx_split_merge_from_abstract_shapes_allocates_no_parameters():
  big = (1536, 2048)  # 12 MB of float32 if it were allocated
  gc.collect()
  before = {id(a) for a in jax.live_arrays()}
  module = nnx.eval_shape(lambda: _Net(big[0], big[1], nnx.Rngs(0)))
  graphdef, state = nnx.split(module)
  leaves = jax.tree_util.tree_leaves(state)
  assert leaves and all(isinstance(l, SDS) for l in leaves)

  def fn(state, x):
    return nnx.merge(graphdef, state)(x)

  t = js.dependency_table(fn, state, sds(4, big[0]), js.Features([f"f{i}" for i in range(big[0])]))
  gc.collect()
  new = [a for a in jax.live_arrays() if id(a) not in before]
  assert not [a.shape for a in new if a.size >= min(big)], "parameters were allocated"
  assert "l1/kernel/value" in t.paths
  counts = t.feature_counts("l1/kernel/value")
  assert (counts == big[1]).all()                 # row i: feature i, every column
  f1 = t.lookup("f1")["l1/kernel/value"]
  assert f1[1].all() and f1.sum() == big[1]
  assert t.packed["l1/kernel/value"].shape[:2] == (big[0], 1)  # stored compressed along columns


def test_nnx_concrete_state_and_linen_apply_and_plain_agree():
  x = jnp.ones((2, 3))
  spec = js.Features(["a", "b", "c"])
  # nnx with concrete parameters
  net = _Net(3, 4, nnx.Rngs(0))
  graphdef, state = nnx.split(net, nnx.Param)
  t_nnx = js.dependency_table(lambda s, x: nnx.merge(graphdef, s)(x), state, x, spec)

  # linen apply
  class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="l2")(nn.relu(nn.Dense(4, name="l1")(x)))
  module = LinenNet()
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  t_linen = js.dependency_table(lambda v, x: module.apply(v, x), variables, x, spec)

  # plain function
  plain = lambda p, x: jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] + p["l2"]["bias"]
  params = {"l1": {"kernel": sds(3, 4), "bias": sds(4)}, "l2": {"kernel": sds(4, 2), "bias": sds(2)}}
  t_plain = js.dependency_table(plain, params, x, spec)

  for t, prefix, suffix in ((t_nnx, "", "/value"), (t_linen, "params/", ""), (t_plain, "", "")):
    for layer in ("l1", "l2"):
      for leaf in ("kernel", "bias"):
        path = f"{prefix}{layer}/{leaf}{suffix}"
        assert (t.mask(path) == t_plain.mask(f"{layer}/{leaf}")).all(), path
  assert_sets(t_plain, "l1/kernel", rows((3, 4), [fs("a"), fs("b"), fs("c")]))


def test_typed_and_raw_prng_keys_as_leaves():
  def fn(p, x):
    noise = jax.random.normal(x["key"], x["obs"].shape) + jax.random.normal(p["key"], x["obs"].shape)
    return (x["obs"] + noise) @ p["w"]
  for make in (jax.random.key, jax.random.PRNGKey):
    params = {"w": sds(3, 2), "key": make(0)}
    inputs = {"obs": sds(4, 3), "key": make(1)}
    t = js.dependency_table(fn, params, inputs, {"obs": js.Features(["a", "b", "c"]), "key": None}, strict=True)
    assert_sets(t, "w", rows((3, 2), [fs("a"), fs("b"), fs("c")]))
    # the key parameter's noise is added to the features: an additive first contact
    assert (t.mask("key").sum(-1) == 3).all()


def test_shard_map_on_a_one_device_mesh():
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("x",))
  P = jax.sharding.PartitionSpec

  def fn(p, x):
    body = lambda w, xb: lax.psum(jnp.tanh(xb @ w), "x")
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("x")), out_specs=P())(p["w"], x)
  t = js.dependency_table(fn, {"w": sds(3, 2)}, sds(4, 3), js.Features(["a", "b", "c"]), strict=True)
  assert_sets(t, "w", rows((3, 2), [fs("a"), fs("b"), fs("c")]))


# -- FeatureTable accessors ----------------------------------------------------------

def test_table_accessor_errors_name_what_is_known():
  t = js.dependency_table(lambda p, x: x @ p["w"], {"w": sds(4, 2)}, sds(1, 4), ABCD)
  with pytest.raises(KeyError, match="No parameter leaf 'v'.*'w'"):
    t.mask("v")
  with pytest.raises(KeyError, match="No feature 'z'.*'a'"):
    t.lookup("z")
  assert set(t.lookup("a")) == {"w"}
  assert "w" in repr(t) and "a(2)" in t.summary()


# -- bad input ---------------------------------------------------------------------

FN = lambda p, x: x["obs"] @ p["w"]
PARAMS = {"w": sds(3, 2)}
INPUTS = {"obs": sds(5, 3)}


def test_error_number_of_names_differs_from_axis_size():
  with pytest.raises(js.FeatureSpecError, match=r"'obs' has shape \(5, 3\).*size 3.*2 names"):
    js.dependency_table(FN, PARAMS, INPUTS, {"obs": js.Features(["a", "b"])})


def test_error_duplicate_names():
  with pytest.raises(js.FeatureSpecError, match=r"Duplicate feature name 'a'.*'extra'.*'obs'"):
    js.dependency_table(lambda p, x: FN(p, x) + x["extra"], PARAMS, {"obs": sds(5, 3), "extra": sds(5, 1)},
                        {"obs": js.Features(["a", "b", "c"]), "extra": "a"})


def test_error_spec_structure_does_not_match_inputs():
  with pytest.raises(js.FeatureSpecError, match=r"(?s)does not match the structure.*spec leaves:.*'observations'.*"
                                                 r"input leaves:.*'obs'"):
    js.dependency_table(FN, PARAMS, INPUTS, {"observations": js.Features(["a", "b", "c"])})
  with pytest.raises(js.FeatureSpecError, match="does not match the structure"):
    js.dependency_table(FN, PARAMS, INPUTS, {"obs": ["a", "b", "c"]})  # a list is not Features


def test_error_axis_out_of_range():
  with pytest.raises(js.FeatureSpecError, match=r"axis=2\) is out of range for input leaf 'obs' of shape \(5, 3\)"):
    js.dependency_table(FN, PARAMS, INPUTS, {"obs": js.Features(["a", "b", "c"], axis=2)})


def test_error_fn_fails_to_trace_names_the_leaf_and_shape():
  with pytest.raises(js.TraceError) as info:
    js.dependency_table(FN, {"w": sds(4, 2)}, INPUTS, {"obs": js.Features(["a", "b", "c"])})
  msg = str(info.value)
  assert "dot_general" in msg
  assert "w: (4, 2) float32" in msg and "obs: (5, 3) float32" in msg
  assert "test_table.py" in msg  # the line of fn that failed


def test_error_non_array_leaves():
  with pytest.raises(TypeError, match=r"params leaf 'w/scale' is a str \('big'\), not an array"):
    js.dependency_table(FN, {"w": {"scale": "big"}}, INPUTS, {"obs": js.Features(["a", "b", "c"])})
  with pytest.raises(TypeError, match=r"input leaf 'mode' is a object"):
    js.dependency_table(FN, PARAMS, {"obs": sds(5, 3), "mode": object()},
                        {"obs": js.Features(["a", "b", "c"]), "mode": None})


def test_error_features_given_a_string():
  with pytest.raises(TypeError, match="sequence of names"):
    js.Features("abc")


class _Block(nnx.Module):
  def __init__(self, d, rngs):
    self.lin = nnx.Linear(d, d, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return x + nnx.relu(self.drop(self.lin(x)))


class _Stacked(nnx.Module):
  def __init__(self, d, n, rngs):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(d, rngs)
    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def step(x, block):
      return block(x)
    return step(x, self.blocks)


def test_nnx_scan_over_stacked_layers_with_rng_state():
  # whole NNX state (typed PRNG keys and counters included), vmap-created layers,
  # nnx.scan + nnx.remat: first layer rows stay per feature, deeper layers see all
  module = nnx.eval_shape(lambda: _Stacked(4, 3, nnx.Rngs(0)))
  graphdef, state = nnx.split(module)

  def fn(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)
  t = js.dependency_table(fn, state, sds(2, 4), ABCD, strict=True)
  k = sets(t, "blocks/lin/kernel/value")
  assert (k[0] == rows((4, 4), [fs(n) for n in "abcd"])).all()
  assert (k[1:] == ALL4).all()
  assert t.touched_elements("blocks/drop/rngs/key/value") == 0
