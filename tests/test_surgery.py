"""Surgery: plans move the right values, and the new model computes what the old one did."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsurgery as js

KEY = jax.random.key(0)


def rand(key, shape, scale=0.5):
  return jax.random.normal(key, shape) * scale


def surgery_and_check(old_fn, new_fn, old_p, new_init, old_x, new_x, old_spec, new_spec, *, rename=None,
                      expect_preserved=True, atol=1e-5):
  old_t = js.dependency_table(old_fn, old_p, old_x, old_spec, strict=True)
  new_t = js.dependency_table(new_fn, new_init, new_x, new_spec, strict=True)
  surgery = js.plan(old_t, new_t, rename=rename)
  new_p = surgery(old_p, new_init)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_p, new_init)
  check = js.verify(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x, key=jax.random.key(7), atol=atol)
  assert check.ok == expect_preserved, (check, surgery.report)
  # The static proof (novelty propagation) agrees with the numbers.
  assert (surgery.report.preserved is True) == expect_preserved, surgery.report
  return surgery, new_p


# -- plain MLP --------------------------------------------------------------------

def mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  return h @ p["l2"]["w"] + p["l2"]["b"]


def mlp_params(key, nin, nh, nout):
  k = jax.random.split(key, 4)
  return {"l1": {"w": rand(k[0], (nin, nh)), "b": rand(k[1], (nh,))},
          "l2": {"w": rand(k[2], (nh, nout)), "b": rand(k[3], (nout,))}}


def test_add_and_reorder_features_moves_rows():
  old_p, new_init = mlp_params(KEY, 3, 4, 2), mlp_params(jax.random.key(1), 4, 4, 2)
  surgery, new_p = surgery_and_check(
      mlp, mlp, old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 4)),
      js.Features(["a", "b", "c"]), js.Features(["c", "new", "a", "b"]))
  w_old, w_new = np.asarray(old_p["l1"]["w"]), np.asarray(new_p["l1"]["w"])
  np.testing.assert_array_equal(w_new[0], w_old[2])
  np.testing.assert_array_equal(w_new[2], w_old[0])
  np.testing.assert_array_equal(w_new[3], w_old[1])
  np.testing.assert_array_equal(w_new[1], 0)  # new feature: zero in
  assert surgery.report.added == ("new",) and set(surgery.report.moved) == {"a", "b", "c"}
  leaf = {l.path: l for l in surgery.report.leaves}["l1/w"]
  assert leaf.counts["moved"] == 12 and leaf.counts["zeroed"] == 4


def test_removed_feature_is_reported_and_not_preserved():
  old_p, new_init = mlp_params(KEY, 3, 4, 2), mlp_params(jax.random.key(1), 2, 4, 2)
  surgery, new_p = surgery_and_check(
      mlp, mlp, old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 2)),
      js.Features(["a", "b", "c"]), js.Features(["a", "c"]), expect_preserved=False)
  np.testing.assert_array_equal(np.asarray(new_p["l1"]["w"]), np.asarray(old_p["l1"]["w"])[[0, 2]])
  assert surgery.report.removed == ("b",) and surgery.report.preserved is False
  dropped = surgery.report.dropped_elements()
  assert dropped["l1/w"][1].all() and not dropped["l1/w"][[0, 2]].any()
  assert "removed" in repr(surgery.report)


def test_feature_rename_map():
  old_p, new_init = mlp_params(KEY, 3, 4, 2), mlp_params(jax.random.key(1), 3, 4, 2)
  _, new_p = surgery_and_check(
      mlp, mlp, old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)),
      js.Features(["a", "b", "c"]), js.Features(["health", "a", "c"]), rename={"b": "health"})
  np.testing.assert_array_equal(np.asarray(new_p["l1"]["w"])[0], np.asarray(old_p["l1"]["w"])[1])


def two_leaf_fn(p, x):
  z = jnp.concatenate([x["u"], x["g"]], axis=-1)
  return jnp.tanh(z @ p["w"] + p["b"]) @ p["v"]


@pytest.mark.slow
def test_features_move_across_leaves_and_other_axis():
  # "g1" moves from the global leaf into the unit leaf; the unit leaf's feature axis is axis 0.
  def fn(p, x):
    return two_leaf_fn(p, {"u": x["u"].T, "g": x["g"]})
  k = jax.random.split(KEY, 6)
  old_p = {"w": rand(k[0], (4, 5)), "b": rand(k[1], (5,)), "v": rand(k[2], (5, 2))}
  new_init = {"w": rand(k[3], (5, 5)), "b": rand(k[4], (5,)), "v": rand(k[5], (5, 2))}
  old_spec = {"u": js.Features(["u0", "u1"], axis=0), "g": js.Features(["g0", "g1"])}
  new_spec = {"u": js.Features(["u0", "g1", "u1"], axis=0), "g": js.Features(["g0", "g2"])}
  old_x = {"u": jnp.ones((2, 3)), "g": jnp.ones((3, 2))}
  new_x = {"u": jnp.ones((3, 3)), "g": jnp.ones((3, 2))}
  surgery, new_p = surgery_and_check(fn, fn, old_p, new_init, old_x, new_x, old_spec, new_spec)
  w_old, w_new = np.asarray(old_p["w"]), np.asarray(new_p["w"])
  np.testing.assert_array_equal(w_new[[0, 1, 2, 3]], w_old[[0, 3, 1, 2]])
  np.testing.assert_array_equal(w_new[4], 0)
  assert surgery.report.moved == ("g1",) or "g1" in surgery.report.moved


# -- categorical features, statistics, vocabulary ---------------------------------

def embed_fn(p, x):
  z = (x["obs"] - p["norm"]["mean"]) / p["norm"]["std"]
  e = p["embed"][x["hero"]]
  return jnp.tanh(jnp.concatenate([z, e], -1) @ p["w"]) @ p["v"]


def embed_params(key, nf, vocab, d=3, h=4):
  k = jax.random.split(key, 5)
  return {"norm": {"mean": rand(k[0], (nf,)), "std": jnp.exp(rand(k[1], (nf,)))},
          "embed": rand(k[2], (vocab, d)), "w": rand(k[3], (nf + d, h)), "v": rand(k[4], (h, 2))}


@pytest.mark.slow
def test_categorical_statistics_and_vocabulary_growth():
  old_p, new_init = embed_params(KEY, 2, 5), embed_params(jax.random.key(1), 3, 8)
  old_x = {"obs": jnp.ones((4, 2)), "hero": jnp.zeros((4,), jnp.int32)}
  new_x = {"obs": jnp.ones((4, 3)), "hero": jnp.zeros((4,), jnp.int32)}
  surgery, new_p = surgery_and_check(
      embed_fn, embed_fn, old_p, new_init, old_x, new_x,
      {"obs": js.Features(["hp", "mana"]), "hero": "hero"},
      {"obs": js.Features(["mana", "armor", "hp"]), "hero": "hero"})
  np.testing.assert_array_equal(np.asarray(new_p["norm"]["mean"])[[0, 2]], np.asarray(old_p["norm"]["mean"])[[1, 0]])
  np.testing.assert_array_equal(np.asarray(new_p["embed"])[:5], np.asarray(old_p["embed"]))
  np.testing.assert_array_equal(np.asarray(new_p["embed"])[5:], np.asarray(new_init["embed"])[5:])
  np.testing.assert_array_equal(np.asarray(new_p["w"])[3:], np.asarray(old_p["w"])[2:])
  # verify draws ids over the whole old vocabulary by default: a wrong row 4 is caught.
  from jaxsurgery._src.surgery.verify import id_bound
  assert id_bound(surgery.old_table.jaxpr) == 5
  broken = dict(new_p, embed=new_p["embed"].at[4].add(1.0))
  args = (surgery, embed_fn, embed_fn, old_p, broken, old_x, new_x)
  assert not js.verify(*args, key=jax.random.key(7), samples=8).ok
  assert js.verify(*args, key=jax.random.key(7), samples=8, int_high=2).ok  # ids 0 and 1 only


# -- widening ---------------------------------------------------------------------

def test_widen_dense_random_in_zero_out():
  old_p, new_init = mlp_params(KEY, 3, 4, 2), mlp_params(jax.random.key(1), 3, 7, 2)
  _, new_p = surgery_and_check(mlp, mlp, old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)),
                               js.Features(["a", "b", "c"]), js.Features(["a", "b", "c"]))
  np.testing.assert_array_equal(np.asarray(new_p["l1"]["w"])[:, :4], np.asarray(old_p["l1"]["w"]))
  np.testing.assert_array_equal(np.asarray(new_p["l1"]["w"])[:, 4:], np.asarray(new_init["l1"]["w"])[:, 4:])
  np.testing.assert_array_equal(np.asarray(new_p["l2"]["w"])[4:], 0)


def conv_fn(p, x):
  y = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.nn.relu(y + p["b1"])
  y = jax.lax.conv_general_dilated(y, p["k2"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.mean((1, 2))


@pytest.mark.slow
def test_widen_conv_channels_and_add_input_channel():
  def params(key, cin, c):
    k = jax.random.split(key, 3)
    return {"k1": rand(k[0], (3, 3, cin, c)), "b1": rand(k[1], (c,)), "k2": rand(k[2], (3, 3, c, 2))}
  old_p, new_init = params(KEY, 2, 3), params(jax.random.key(1), 3, 5)
  _, new_p = surgery_and_check(conv_fn, conv_fn, old_p, new_init, jnp.ones((1, 5, 5, 2)), jnp.ones((1, 5, 5, 3)),
                               js.Features(["r", "g"]), js.Features(["r", "depth", "g"]))
  k1o, k1n = np.asarray(old_p["k1"]), np.asarray(new_p["k1"])
  np.testing.assert_array_equal(k1n[:, :, [0, 2], :3], k1o)
  np.testing.assert_array_equal(k1n[:, :, 1], 0)
  np.testing.assert_array_equal(np.asarray(new_p["k2"])[:, :, 3:], 0)


def nnx_rnn(cell_cls, nin, hidden, seed):
  cell = cell_cls(nin, hidden, rngs=nnx.Rngs(seed))
  graph, params = nnx.split(cell, nnx.Param)
  is_lstm = cell_cls is nnx.OptimizedLSTMCell

  def fn(p, xs):
    c = nnx.merge(graph, p)
    b = xs.shape[0]
    carry = (jnp.zeros((b, hidden)), jnp.zeros((b, hidden))) if is_lstm else jnp.zeros((b, hidden))
    carry, ys = jax.lax.scan(lambda cr, x: c(cr, x), carry, jnp.swapaxes(xs, 0, 1))
    return ys[-1]
  # random (not zero) biases so that nothing hides
  params = jax.tree_util.tree_map(lambda x: x + rand(jax.random.key(seed + 9), x.shape, 0.3), params)
  return fn, params


@pytest.mark.slow
@pytest.mark.parametrize("cell_cls", [nnx.OptimizedLSTMCell, nnx.GRUCell], ids=["lstm", "gru"])
def test_widen_fused_gate_cells_blockwise(cell_cls):
  old_fn, old_p = nnx_rnn(cell_cls, 2, 3, 0)
  new_fn, new_init = nnx_rnn(cell_cls, 2, 5, 1)
  xs = jnp.ones((2, 4, 2))
  # outputs have different widths: compare the old units only
  old_out = lambda p, x: old_fn(p, x)
  new_out = lambda p, x: new_fn(p, x)[..., :3]
  surgery, new_p = surgery_and_check(old_out, new_out, old_p, new_init, xs, xs,
                                     js.Features(["a", "b"]), js.Features(["a", "b"]))
  gates = 4 if cell_cls is nnx.OptimizedLSTMCell else 3
  kernel = old_p["dense_i"]["kernel"]
  ki_old = np.asarray(kernel[...] if isinstance(kernel, nnx.Variable) else kernel)
  leaves = {l.path: l for l in surgery.report.leaves}
  assert any("blockwise" in h for h in leaves["dense_i/kernel/value"].how)
  ki_new = np.asarray(jax.tree_util.tree_leaves(new_p["dense_i"]["kernel"])[0])
  for g in range(gates):  # gate g, old units 0..2 -> new columns g*5 + 0..2
    np.testing.assert_array_equal(ki_new[:, g * 5:g * 5 + 3], ki_old[:, g * 3:g * 3 + 3])


def attention_fn(heads, hd):
  def fn(p, x):
    b, t, _ = x.shape
    q = (x @ p["q"]).reshape(b, t, heads, hd)
    k = (x @ p["k"]).reshape(b, t, heads, hd)
    v = (x @ p["v"]).reshape(b, t, heads, hd)
    a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / 2.0, axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, heads * hd)
    return o @ p["o"]
  return fn


def test_widen_attention_heads_per_head():
  def params(key, heads, hd, d=3):
    k = jax.random.split(key, 4)
    return {n: rand(kk, (d, heads * hd)) for n, kk in zip("qkv", k[:3])} | {"o": rand(k[3], (heads * hd, d))}
  old_p, new_init = params(KEY, 2, 2), params(jax.random.key(1), 3, 3)
  x = jnp.ones((1, 4, 3))
  spec = js.Features(["a", "b", "c"])
  # The attention scale is a constant (1/2) here, so zeroing one side of q.k is exact.
  surgery, new_p = surgery_and_check(attention_fn(2, 2), attention_fn(3, 3), old_p, new_init, x, x, spec, spec)
  # head h, dim d -> column h*hd + d
  qn, qo = np.asarray(new_p["q"]), np.asarray(old_p["q"])
  np.testing.assert_array_equal(qn[:, [0, 1, 3, 4]], qo)
  kn = np.asarray(new_p["k"])
  np.testing.assert_array_equal(kn[:, [2, 5]], 0)  # new k dims of the old heads: zero
  np.testing.assert_array_equal(qn[:, [2, 5]], np.asarray(new_init["q"])[:, [2, 5]])  # q keeps its init
  assert any("blockwise" in h for h in {l.path: l for l in surgery.report.leaves}["q"].how)


# -- inserted blocks, narrowed layers, renamed leaves -------------------------------

def res_fn(nblocks):
  def fn(p, x):
    h = x @ p["in"]
    for i in range(nblocks):
      blk = p[f"block{i}"]
      h = h + jax.nn.relu(h @ blk["w1"] + blk["b1"]) @ blk["w2"] + blk["b2"]
    return h @ p["out"]
  return fn


def res_params(key, nblocks, nin=3, d=4):
  k = jax.random.split(key, 2 + 4 * nblocks)
  p = {"in": rand(k[0], (nin, d)), "out": rand(k[1], (d, 2))}
  for i in range(nblocks):
    p[f"block{i}"] = {"w1": rand(k[2 + 4 * i], (d, d)), "b1": rand(k[3 + 4 * i], (d,)),
                      "w2": rand(k[4 + 4 * i], (d, d)), "b2": rand(k[5 + 4 * i], (d,))}
  return p


def test_insert_residual_block_is_exact():
  old_p, new_init = res_params(KEY, 1), res_params(jax.random.key(1), 2)
  spec = js.Features(["a", "b", "c"])
  surgery, new_p = surgery_and_check(res_fn(1), res_fn(2), old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)),
                                     spec, spec)
  np.testing.assert_array_equal(np.asarray(new_p["block1"]["w2"]), 0)
  np.testing.assert_array_equal(np.asarray(new_p["block1"]["b2"]), 0)  # added to the old stream
  np.testing.assert_array_equal(np.asarray(new_p["block1"]["w1"]), np.asarray(new_init["block1"]["w1"]))
  np.testing.assert_array_equal(np.asarray(new_p["block1"]["b1"]), np.asarray(new_init["block1"]["b1"]))


def ln_mlp(p, x, eps=1e-5):
  h = x @ p["l1"]["w"] + p["l1"]["b"]
  mu = h.mean(-1, keepdims=True)
  h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + eps) * p["ln"]["g"] + p["ln"]["b"]
  return jnp.tanh(h) @ p["l2"]["w"] + p["l2"]["b"]


def ln_params(key, nin, nh, nout):
  p = mlp_params(key, nin, nh, nout)
  k = jax.random.split(key, 7)
  return p | {"ln": {"g": 1 + rand(k[5], (nh,)), "b": rand(k[6], (nh,))}}


def test_layernorm_over_widened_axis_by_average_expansion():
  """The new units hold the mean of the old ones (LEMON): the mean is unchanged, the variance
  scales by 4/6, which an epsilon scaled the same way keeps exact."""
  old_p, new_init = ln_params(KEY, 3, 4, 2), ln_params(jax.random.key(1), 3, 6, 2)
  spec = js.Features(["a", "b", "c"])
  new_fn = lambda p, x: ln_mlp(p, x, eps=1e-5 * 4 / 6)
  surgery, new_p = surgery_and_check(ln_mlp, new_fn, old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)),
                                     spec, spec)
  w = np.asarray(new_p["l1"]["w"])
  np.testing.assert_allclose(w[:, 4:], np.repeat(w[:, :4].mean(1, keepdims=True), 2, 1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new_p["ln"]["g"])[:4], np.asarray(old_p["ln"]["g"]) * np.sqrt(4 / 6),
                             rtol=1e-6)  # the gain absorbs the variance's 4/6
  np.testing.assert_array_equal(np.asarray(new_p["ln"]["b"])[4:], 0)  # new outputs of the norm: zero
  np.testing.assert_array_equal(np.asarray(new_p["l2"]["w"])[4:], np.asarray(new_init["l2"]["w"])[4:])


def test_layernorm_over_widened_axis_with_the_same_epsilon_names_the_bound():
  old_p, new_init = ln_params(KEY, 3, 4, 2), ln_params(jax.random.key(1), 3, 6, 2)
  spec = js.Features(["a", "b", "c"])
  old_t = js.dependency_table(ln_mlp, old_p, jnp.ones((2, 3)), spec)
  new_t = js.dependency_table(ln_mlp, new_init, jnp.ones((2, 3)), spec)
  surgery = js.plan(old_t, new_t)
  assert surgery.report.preserved is None
  note = " ".join(surgery.report.reasons)
  assert "exact only if the new constant is 6.66667e-06" in note and "ln_mlp" in note, note


def test_layernorm_over_widened_axis_with_zero_padding_is_reported_with_its_operation():
  old_p, new_init = ln_params(KEY, 3, 4, 2), ln_params(jax.random.key(1), 3, 6, 2)
  spec = js.Features(["a", "b", "c"])
  old_t = js.dependency_table(ln_mlp, old_p, jnp.ones((2, 3)), spec)
  new_t = js.dependency_table(ln_mlp, new_init, jnp.ones((2, 3)), spec)
  surgery = js.plan(old_t, new_t, widen="zero")
  note = " ".join(surgery.report.reasons)
  assert "`div`" in note and "ln_mlp" in note, note  # the mean divides by the new width
  assert "function not proven" in repr(surgery.report)
  new_p = surgery(old_p, new_init)
  check = js.verify(surgery, ln_mlp, ln_mlp, old_p, new_p, jnp.ones((2, 3)), jnp.ones((2, 3)), key=KEY)
  assert not check.ok


@pytest.mark.slow
def test_new_feature_and_wider_lstm_keep_new_units_alive():
  """Random in, zero out, exactly: the new units read x and the old units (init), the
  weights reading a new unit or the new feature are zero; statically preserved."""
  old_fn, old_p = nnx_rnn(nnx.OptimizedLSTMCell, 2, 3, 0)
  new_fn, new_init = nnx_rnn(nnx.OptimizedLSTMCell, 3, 5, 1)
  surgery, new_p = surgery_and_check(
      old_fn, lambda p, x: new_fn(p, x)[..., :3], old_p, new_init, jnp.ones((2, 4, 2)), jnp.ones((2, 4, 3)),
      js.Features(["a", "b"]), js.Features(["a", "new", "b"]))
  leaf = lambda t, name: np.asarray(jax.tree_util.tree_leaves(t[name]["kernel"])[0])
  ki, ki0 = leaf(new_p, "dense_i"), leaf(new_init, "dense_i")
  kh, kh0 = leaf(new_p, "dense_h"), leaf(new_init, "dense_h")
  new_cols = np.array([g * 5 + u for g in range(4) for u in (3, 4)])
  np.testing.assert_array_equal(ki[1], 0)                                    # the new feature's row
  np.testing.assert_array_equal(ki[[0, 2]][:, new_cols], ki0[[0, 2]][:, new_cols])  # new units read x
  np.testing.assert_array_equal(kh[3:], 0)                                   # rows reading new units
  np.testing.assert_array_equal(kh[:3][:, new_cols], kh0[:3][:, new_cols])  # new units read old units
  assert np.abs(ki0[[0, 2]][:, new_cols]).min() > 0


def test_narrowed_layer_reports_dropped_units_and_strict():
  old_p, new_init = mlp_params(KEY, 3, 6, 2), mlp_params(jax.random.key(1), 3, 4, 2)
  spec = js.Features(["a", "b", "c"])
  old_t = js.dependency_table(mlp, old_p, jnp.ones((2, 3)), spec)
  new_t = js.dependency_table(mlp, new_init, jnp.ones((2, 3)), spec)
  surgery = js.plan(old_t, new_t)
  dropped = surgery.report.dropped_elements()
  assert dropped["l1/w"][:, 4:].all() and not dropped["l1/w"][:, :4].any()
  assert dropped["l2/w"][4:].all()
  assert surgery.report.totals()["dropped"] == 3 * 2 + 2 + 2 * 2
  np.testing.assert_array_equal(np.asarray(surgery(old_p, new_init)["l1"]["w"]), np.asarray(old_p["l1"]["w"])[:, :4])


def test_dropped_leaf_is_reported_and_strict_raises():
  old_p = res_params(KEY, 2)
  new_init = res_params(jax.random.key(1), 1)
  spec = js.Features(["a", "b", "c"])
  old_t = js.dependency_table(res_fn(2), old_p, jnp.ones((2, 3)), spec)
  new_t = js.dependency_table(res_fn(1), new_init, jnp.ones((2, 3)), spec)
  surgery = js.plan(old_t, new_t)
  assert {p for p, _ in surgery.report.dropped_leaves} == {"block1/w1", "block1/b1", "block1/w2", "block1/b2"}
  assert surgery.report.preserved is False
  with pytest.raises(js.SurgeryError, match="block1"):
    js.plan(old_t, new_t, strict=True)


def test_rename_map_for_parameter_leaves():
  def fn_old(p, x):
    return mlp({"l1": p["first"], "l2": p["second"]}, x)
  old_p = mlp_params(KEY, 3, 4, 2)
  old_named = {"first": old_p["l1"], "second": old_p["l2"]}
  new_init = mlp_params(jax.random.key(1), 3, 4, 2)
  spec = js.Features(["a", "b", "c"])
  rename = {"first/w": "l1/w", "first/b": "l1/b", "second/w": "l2/w", "second/b": "l2/b"}
  surgery, new_p = surgery_and_check(fn_old, mlp, old_named, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)),
                                     spec, spec, rename=rename)
  assert ("first/w", "l1/w", "rename") in surgery.report.matching
  assert "first/w -> l1/w" in repr(surgery.report)


def test_mismatched_tree_error_names_paths_and_shapes():
  old_p, new_init = mlp_params(KEY, 3, 4, 2), mlp_params(jax.random.key(1), 3, 5, 2)
  spec = js.Features(["a", "b", "c"])
  surgery = js.plan(js.dependency_table(mlp, old_p, jnp.ones((2, 3)), spec),
                    js.dependency_table(mlp, new_init, jnp.ones((2, 3)), spec))
  wrong = mlp_params(KEY, 3, 7, 2)
  with pytest.raises(js.SurgeryError, match=r"'l1/w': shape \(3, 7\), expected \(3, 4\)"):
    surgery(wrong, new_init)
  with pytest.raises(js.SurgeryError, match="missing paths"):
    surgery({"l1": old_p["l1"]}, new_init)


def test_jit_pool_and_sharding():
  old_p, new_init = mlp_params(KEY, 3, 4, 2), mlp_params(jax.random.key(1), 4, 6, 2)
  surgery = js.plan(js.dependency_table(mlp, old_p, jnp.ones((2, 3)), js.Features(["a", "b", "c"])),
                    js.dependency_table(mlp, new_init, jnp.ones((2, 4)), js.Features(["a", "x", "b", "c"])))
  eager = surgery(old_p, new_init)
  jitted = jax.jit(surgery)(old_p, new_init)
  jax.tree_util.tree_map(np.testing.assert_array_equal, eager, jitted)
  pool = [mlp_params(jax.random.key(i), 3, 4, 2) for i in range(3)]
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *pool)
  out = jax.vmap(surgery, in_axes=(0, None))(stacked, new_init)
  for i, p in enumerate(pool):
    np.testing.assert_array_equal(np.asarray(out["l1"]["w"][i]), np.asarray(surgery(p, new_init)["l1"]["w"]))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded_init = jax.device_put(new_init, sharding)
  result = surgery(old_p, sharded_init)
  assert all(x.sharding == sharding for x in jax.tree_util.tree_leaves(result))


def test_inserted_block_shifts_leaf_names_and_is_matched_by_dataflow():
  """Flax-style names: inserting a block shifts Dense_1 (the head) to Dense_3. Matching by path
  alone would pair the old head with the new block; the dataflow alignment pairs it with Dense_3."""
  def fn(n_blocks):
    def f(p, x):
      h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
      for b in range(n_blocks):
        inner, outer = p[f"Dense_{1 + 2 * b}"], p[f"Dense_{2 + 2 * b}"]
        h = h + jax.nn.relu(h @ inner["kernel"] + inner["bias"]) @ outer["kernel"] + outer["bias"]
      head = p[f"Dense_{1 + 2 * n_blocks}"]
      return h @ head["kernel"] + head["bias"]
    return f

  def params(key, n_blocks, d=4):
    shapes = [(3, d)] + [(d, d)] * (2 * n_blocks) + [(d, 2)]
    ks = jax.random.split(key, 2 * len(shapes))
    return {f"Dense_{i}": {"kernel": rand(ks[2 * i], s), "bias": rand(ks[2 * i + 1], s[1:])}
            for i, s in enumerate(shapes)}
  spec = js.Features(["a", "b", "c"])
  old_p, new_init = params(KEY, 0), params(jax.random.key(1), 1)
  surgery, new_p = surgery_and_check(fn(0), fn(1), old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)),
                                     spec, spec)
  matching = {o: (n, why) for o, n, why in surgery.report.matching}
  assert matching["Dense_1/kernel"] == ("Dense_3/kernel", "dataflow order and shape")
  assert matching["Dense_0/kernel"] == ("Dense_0/kernel", "same path")
  np.testing.assert_array_equal(np.asarray(new_p["Dense_3"]["kernel"]), np.asarray(old_p["Dense_1"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(new_p["Dense_2"]["kernel"]), 0)
  assert "Dense_1/kernel -> Dense_3/kernel" in repr(surgery.report)


def test_strict_accepts_removed_features_and_narrowed_axes():
  old_p, new_init = mlp_params(KEY, 3, 6, 2), mlp_params(jax.random.key(1), 2, 4, 2)
  old_t = js.dependency_table(mlp, old_p, jnp.ones((2, 3)), js.Features(["a", "b", "c"]))
  new_t = js.dependency_table(mlp, new_init, jnp.ones((2, 2)), js.Features(["a", "c"]))
  surgery = js.plan(old_t, new_t, strict=True)  # drops: feature b's row, units 4 and 5
  assert surgery.report.dropped_elements()["l1/w"][1].all()


def test_swapped_leaves_are_inconsistent_reported_and_strict_raises():
  def fn(p, x):
    return jnp.tanh(x["u"] @ p["wu"]) @ p["vu"] + jnp.tanh(x["g"] @ p["wg"]) @ p["vg"]
  k = jax.random.split(KEY, 4)
  params = {"wu": rand(k[0], (2, 4)), "wg": rand(k[1], (2, 4)), "vu": rand(k[2], (4, 1)), "vg": rand(k[3], (4, 1))}
  x = {"u": jnp.ones((1, 2)), "g": jnp.ones((1, 2))}
  spec = {"u": js.Features(["u0", "u1"]), "g": js.Features(["g0", "g1"])}
  table = js.dependency_table(fn, params, x, spec)
  # Swapped second layers: uniform touches (no feature axis), so only the element-wise check sees it.
  swapped = js.plan(table, table, rename={"vu": "vg", "vg": "vu"})
  assert any("4 elements of 'vg' come from elements of 'vu'" in r for r in swapped.report.reasons), \
      swapped.report.reasons
  with pytest.raises(js.SurgeryError, match="vg: 4 inconsistent elements"):
    js.plan(table, table, rename={"vu": "vg", "vg": "vu"}, strict=True)
  # Swapped first layers: their rows meet other features, so they are fresh and the old rows dropped.
  with pytest.raises(js.SurgeryError, match="wg: axis 0 indices \\[0, 1\\] are dropped"):
    js.plan(table, table, rename={"wu": "wg", "wg": "wu"}, strict=True)
  assert not js.plan(table, table, strict=True).report.reasons  # the identity plan is clean


def test_gate_split_after_a_jitted_matmul_is_found():
  """The fused axis leaves a jit call before it is split: alignment follows it back out."""
  def cell(p, x):
    z = jax.jit(lambda a, w: a @ w)(x, p["w"])
    i, g = jnp.split(z, 2, axis=-1)
    return jax.nn.sigmoid(i) * jnp.tanh(g)
  k = jax.random.split(KEY, 2)
  old_p, new_init = {"w": rand(k[0], (3, 2 * 2))}, {"w": rand(k[1], (3, 2 * 3))}
  spec = js.Features(["a", "b", "c"])
  surgery, new_p = surgery_and_check(cell, lambda p, x: cell(p, x)[..., :2], old_p, new_init,
                                     jnp.ones((1, 3)), jnp.ones((1, 3)), spec, spec)
  leaf = {l.path: l for l in surgery.report.leaves}["w"]
  assert leaf.how[1] == "blockwise 2x2 -> 2x3", leaf.how
  np.testing.assert_array_equal(np.asarray(new_p["w"])[:, [0, 1, 3, 4]], np.asarray(old_p["w"]))


def bn_mlp(p, x):
  h = x @ p["l1"]["w"]
  h = (h - p["bn"]["mean"]) * jax.lax.rsqrt(p["bn"]["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  return jnp.tanh(h) @ p["l2"]["w"]


@pytest.mark.slow
def test_widened_batchnorm_keeps_new_units_trainable():
  """Only the rows reading new units are zero: the new units' statistics, scale and bias keep
  their init (a zero variance or scale would leave them without gradient)."""
  def params(key, h):
    k = jax.random.split(key, 6)
    return {"l1": {"w": rand(k[0], (3, h))}, "l2": {"w": rand(k[1], (h, 2))},
            "bn": {"mean": rand(k[2], (h,)), "var": jnp.exp(rand(k[3], (h,))), "scale": 1 + rand(k[4], (h,)),
                   "bias": rand(k[5], (h,))}}
  old_p, new_init = params(KEY, 4), params(jax.random.key(1), 6)
  spec = js.Features(["a", "b", "c"])
  surgery, new_p = surgery_and_check(bn_mlp, bn_mlp, old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)), spec, spec)
  for name in ("mean", "var", "scale", "bias"):
    np.testing.assert_array_equal(np.asarray(new_p["bn"][name])[4:], np.asarray(new_init["bn"][name])[4:])
  np.testing.assert_array_equal(np.asarray(new_p["l2"]["w"])[4:], 0)
  grad = jax.grad(lambda p: bn_mlp(p, jax.random.normal(KEY, (8, 3))).sum())(new_p)
  assert np.abs(np.asarray(grad["l2"]["w"])[4:]).min() > 0  # the new units learn


def test_layerscale_gate_is_the_cut_when_nothing_else_is():
  """h + gamma * tanh(h @ w): no fresh weight reads the branch, so the elementwise gate is zeroed."""
  def fn(blocks):
    def f(p, x):
      h = x @ p["in"]
      for b in range(blocks):
        h = h + p[f"gamma{b}"] * jnp.tanh(h @ p[f"w{b}"])
      return h @ p["out"]
    return f
  def params(key, blocks):
    k = jax.random.split(key, 2 + 2 * blocks)
    p = {"in": rand(k[0], (3, 4)), "out": rand(k[1], (4, 2))}
    for b in range(blocks):
      p[f"w{b}"], p[f"gamma{b}"] = rand(k[2 + 2 * b], (4, 4)), 1 + rand(k[3 + 2 * b], (4,))
    return p
  spec = js.Features(["a", "b", "c"])
  old_p, new_init = params(KEY, 0), params(jax.random.key(1), 1)
  _, new_p = surgery_and_check(fn(0), fn(1), old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)), spec, spec)
  np.testing.assert_array_equal(np.asarray(new_p["gamma0"]), 0)
  np.testing.assert_array_equal(np.asarray(new_p["w0"]), np.asarray(new_init["w0"]))


def test_new_feature_statistics_keep_a_usable_divisor_and_verify_catches_nan():
  def fn(p, x):
    return jnp.tanh(((x - p["mean"]) / p["std"]) @ p["w"]) @ p["v"]
  def params(key, n):
    k = jax.random.split(key, 4)
    return {"mean": rand(k[0], (n,)), "std": jnp.exp(rand(k[1], (n,))), "w": rand(k[2], (n, 4)),
            "v": rand(k[3], (4, 2))}
  old_p, new_init = params(KEY, 3), params(jax.random.key(1), 4)
  old_x, new_x = jnp.ones((2, 3)), jnp.ones((2, 4))
  surgery, new_p = surgery_and_check(fn, fn, old_p, new_init, old_x, new_x,
                                     js.Features(["a", "b", "c"]), js.Features(["a", "new", "b", "c"]))
  assert float(new_p["std"][1]) == float(new_init["std"][1]) > 0  # not a zero divisor
  np.testing.assert_array_equal(np.asarray(new_p["w"])[1], 0)  # the cut is the kernel row
  broken = dict(new_p, std=new_p["std"].at[1].set(0.0))  # what a zeroed divisor would do: 0 * inf
  check = js.verify(surgery, fn, fn, old_p, broken, old_x, new_x, key=KEY)
  assert not check.ok and check.max_abs_diff[""] == float("inf"), check


@pytest.mark.slow
def test_more_attention_heads_is_exact():
  def params(key, heads, hd=2, d=3):
    k = jax.random.split(key, 4)
    return {n: rand(kk, (d, heads * hd)) for n, kk in zip("qkv", k[:3])} | {"o": rand(k[3], (heads * hd, d))}
  old_p, new_init = params(KEY, 2), params(jax.random.key(1), 3)
  x = jax.random.normal(KEY, (1, 4, 3))
  spec = js.Features(["a", "b", "c"])
  surgery, new_p = surgery_and_check(attention_fn(2, 2), attention_fn(3, 2), old_p, new_init, x, x, spec, spec)
  np.testing.assert_array_equal(np.asarray(new_p["o"])[4:], 0)  # the new head's output rows
  for n in "qkv":  # the new head reads the old stream: init
    np.testing.assert_array_equal(np.asarray(new_p[n])[:, 4:], np.asarray(new_init[n])[:, 4:])


def test_new_input_leaf_with_its_own_encoder():
  def old_fn(p, x):
    return jnp.tanh(x["units"] @ p["wu"]) @ p["head"]

  def new_fn(p, x):
    return jnp.tanh(x["units"] @ p["wu"] + x["globals"] @ p["wg"]) @ p["head"]
  k = jax.random.split(KEY, 4)
  old_p = {"wu": rand(k[0], (2, 4)), "head": rand(k[1], (4, 1))}
  new_init = {"wu": rand(k[2], (2, 4)), "wg": rand(k[3], (3, 4)), "head": rand(k[1], (4, 1))}
  old_x = {"units": jnp.ones((2, 2))}
  new_x = {"units": jnp.ones((2, 2)), "globals": jnp.ones((2, 3))}
  surgery, new_p = surgery_and_check(
      old_fn, new_fn, old_p, new_init, old_x, new_x, {"units": js.Features(["hp", "mana"])},
      {"units": js.Features(["hp", "mana"]), "globals": js.Features(["time", "gold", "xp"])})
  assert surgery.report.added == ("time", "gold", "xp")
  np.testing.assert_array_equal(np.asarray(new_p["wg"]), 0)
  np.testing.assert_array_equal(np.asarray(new_p["wu"]), np.asarray(old_p["wu"]))


@pytest.mark.slow
def test_dense_reading_a_concatenation_is_aligned_per_piece():
  """torso(concat([max_u h, mean_u h, glob])): widening h shifts the later pieces; each piece
  of the kernel's rows is aligned on its own (not by prefix)."""
  def fn(p, x):
    h = jnp.tanh(x["units"] @ p["unit"])                                   # (U, H)
    g = jnp.tanh(x["globals"] @ p["glob"])                                 # (H,)
    pooled = jnp.concatenate([h.max(0), h.mean(0)], -1)
    return jnp.tanh(jnp.concatenate([pooled, g], -1) @ p["torso"]) @ p["out"]
  def params(key, h):
    k = jax.random.split(key, 4)
    return {"unit": rand(k[0], (2, h)), "glob": rand(k[1], (3, h)), "torso": rand(k[2], (3 * h, 5)),
            "out": rand(k[3], (5, 1))}
  old_p, new_init = params(KEY, 4), params(jax.random.key(1), 6)
  x = {"units": jnp.ones((7, 2)), "globals": jnp.ones((3,))}
  spec = {"units": js.Features(["hp", "mana"]), "globals": js.Features(["t", "gold", "xp"])}
  surgery, new_p = surgery_and_check(fn, fn, old_p, new_init, x, x, spec, spec)
  leaf = {l.path: l for l in surgery.report.leaves}["torso"]
  assert leaf.how[0] == "features in segments 4+4+4 -> 6+6+6", leaf.how
  t_old, t_new = np.asarray(old_p["torso"]), np.asarray(new_p["torso"])
  for k in range(3):
    np.testing.assert_array_equal(t_new[6 * k:6 * k + 4], t_old[4 * k:4 * k + 4])
    np.testing.assert_array_equal(t_new[6 * k + 4:6 * k + 6], 0)  # rows reading new units


def test_positional_axis_contracted_against_pieces_is_aligned_per_piece():
  def fn(p, x):
    both = jnp.concatenate([jnp.tanh(x @ p["a"]), jax.nn.relu(x @ p["b"])], -1)
    return both @ p["w"]
  def params(key, h):
    k = jax.random.split(key, 3)
    return {"a": rand(k[0], (3, h)), "b": rand(k[1], (3, h)), "w": rand(k[2], (2 * h, 2))}
  old_p, new_init = params(KEY, 4), params(jax.random.key(1), 6)
  spec = js.Features(["a", "b", "c"])
  surgery, new_p = surgery_and_check(fn, fn, old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)), spec, spec)
  assert {l.path: l for l in surgery.report.leaves}["w"].how[0] == "segments 4+4 -> 6+6"
  w_old, w_new = np.asarray(old_p["w"]), np.asarray(new_p["w"])
  np.testing.assert_array_equal(w_new[[0, 1, 2, 3, 6, 7, 8, 9]], w_old)


def test_strict_accepts_a_removed_feature_inside_a_concatenated_piece():
  """A kernel reading concat([units, globals]): removing a unit feature while adding a global one
  keeps the axis size; the dropped row belongs to the removed feature, so strict=True accepts it
  (the axis is labelled "features in segments ...", which strict once took for positional)."""
  def fn(p, x):
    return jnp.tanh(jnp.concatenate([x["units"], x["globals"]], -1) @ p["w"])
  old_p, new_init = {"w": rand(KEY, (5, 4))}, {"w": rand(jax.random.key(1), (5, 4))}
  old_x = {"units": jnp.ones((2, 3)), "globals": jnp.ones((2, 2))}
  new_x = {"units": jnp.ones((2, 2)), "globals": jnp.ones((2, 3))}
  old_spec = {"units": js.Features(["hp", "mana", "x"]), "globals": js.Features(["time", "gold"])}
  new_spec = {"units": js.Features(["hp", "x"]), "globals": js.Features(["time", "gold", "xp"])}
  old_t = js.dependency_table(fn, old_p, old_x, old_spec, strict=True)
  new_t = js.dependency_table(fn, new_init, new_x, new_spec, strict=True)
  surgery = js.plan(old_t, new_t, strict=True)   # raised "did not shrink" before
  (leaf,) = surgery.report.leaves
  assert leaf.how[0] == "features in segments 3+2 -> 2+3" and leaf.how[0].kind == "features", leaf.how
  assert surgery.report.removed == ("mana",) and surgery.report.added == ("xp",)
  np.testing.assert_array_equal(leaf.maps[0], [0, 2, 3, 4, -1])
  w_old, w_new = np.asarray(old_p["w"]), np.asarray(surgery(old_p, new_init)["w"])
  np.testing.assert_array_equal(w_new[:4], w_old[[0, 2, 3, 4]])
  np.testing.assert_array_equal(w_new[4], 0)  # the new global's row: random in, zero out


def test_rename_features_and_rename_params_are_unambiguous():
  """A parameter path that is also a feature name: ``rename`` takes it for the feature, the
  specific arguments say which is meant; conflicting entries are an error."""
  def fn_old(p, x):
    return mlp({"l1": p["b"], "l2": p["second"]}, x)
  old_p = mlp_params(KEY, 3, 4, 2)
  old_named = {"b": old_p["l1"], "second": old_p["l2"]}   # leaf paths b/w, b/b ...
  new_init = mlp_params(jax.random.key(1), 3, 4, 2)
  x = jnp.ones((2, 3))
  old_t = js.dependency_table(fn_old, old_named, x, js.Features(["a", "b/w", "c"]))
  new_t = js.dependency_table(mlp, new_init, x, js.Features(["a", "hp", "c"]))
  params = {"b/w": "l1/w", "b/b": "l1/b", "second/w": "l2/w", "second/b": "l2/b"}
  surgery = js.plan(old_t, new_t, rename_features={"b/w": "hp"}, rename_params=params)
  assert surgery.report.renamed_features == {"b/w": "hp"} and not surgery.report.added
  assert ("b/w", "l1/w", "rename") in surgery.report.matching
  np.testing.assert_array_equal(np.asarray(surgery(old_named, new_init)["l1"]["w"]), np.asarray(old_p["l1"]["w"]))
  # `rename` alone reads "b/w" as the feature; the explicit arguments agree with it.
  same = js.plan(old_t, new_t, rename={"b/w": "hp", "b/b": "l1/b"}, rename_features={"b/w": "hp"},
                 rename_params={"b/w": "l1/w"})
  assert same.report.renamed_features == {"b/w": "hp"} and ("b/w", "l1/w", "rename") in same.report.matching
  with pytest.raises(js.SurgeryError, match=r"`rename` maps 'b/w' to 'hp' but `rename_features` maps it to 'x'"):
    js.plan(old_t, new_t, rename={"b/w": "hp"}, rename_features={"b/w": "x"})
  with pytest.raises(js.SurgeryError, match="rename_features.*'nope'"):
    js.plan(old_t, new_t, rename_features={"nope": "hp"})
  with pytest.raises(js.SurgeryError, match="rename_outputs.*no named outputs"):
    js.plan(old_t, new_t, rename_outputs={"logits": "logits"})
