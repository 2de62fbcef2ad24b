"""New cases for the relation planner (scratch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_surgery import rand, surgery_and_check

import jaxsurgery as js

KEY = jax.random.key(0)


def test_residual_over_features_reordered():
  def fn(p, x):
    h = x + jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return h @ p["out"]
  def params(key, n):
    k = jax.random.split(key, 5)
    return {"w1": rand(k[0], (n, 5)), "b1": rand(k[1], (5,)), "w2": rand(k[2], (5, n)), "b2": rand(k[3], (n,)),
            "out": rand(k[4], (n, 2))}
  old_p, new_init = params(KEY, 4), params(jax.random.key(1), 5)
  s, new_p = surgery_and_check(fn, fn, old_p, new_init, jnp.ones((2, 4)), jnp.ones((2, 5)),
                               js.Features(["f0", "f1", "f2", "f3"]), js.Features(["f0", "f2", "n", "f3", "f1"]))
  np.testing.assert_array_equal(np.asarray(new_p["b2"])[[0, 1, 3, 4]], np.asarray(old_p["b2"])[[0, 2, 3, 1]])
  np.testing.assert_array_equal(np.asarray(new_p["out"])[[0, 1, 3, 4]], np.asarray(old_p["out"])[[0, 2, 3, 1]])


def test_positional_table_longer_than_trace():
  def fn(p, x):
    t = x.shape[1]
    h = p["emb"][x] + p["pos"][:t] + p["tt"][jnp.zeros_like(x)]
    return jnp.tanh(h) @ p["out"]
  def params(key, v):
    k = jax.random.split(key, 4)
    return {"emb": rand(k[0], (v, 4)), "pos": rand(k[1], (16, 4)), "tt": rand(k[2], (2, 4)), "out": rand(k[3], (4, 3))}
  old_p, new_init = params(KEY, 10), params(jax.random.key(1), 10)
  x = jnp.zeros((2, 8), jnp.int32)
  s, new_p = surgery_and_check(fn, fn, old_p, new_init, x, x, "tokens", "tokens")
  np.testing.assert_array_equal(np.asarray(new_p["pos"]), np.asarray(old_p["pos"]))
  np.testing.assert_array_equal(np.asarray(new_p["tt"]), np.asarray(old_p["tt"]))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_conv_widen_alone_then_flatten(layout):
  def fn(c):
    def f(p, x):
      dn = (layout, "HWIO", layout)
      h = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn)
      h = jnp.tanh(h + (p["b1"] if layout == "NHWC" else p["b1"][:, None, None]))
      h = jax.lax.conv_general_dilated(h, p["k2"], (2, 2), "SAME", dimension_numbers=dn)
      return h.reshape(h.shape[0], -1) @ p["d"]
    return f
  def params(key, c):
    k = jax.random.split(key, 4)
    return {"k1": rand(k[0], (3, 3, 2, c)), "b1": rand(k[1], (c,)), "k2": rand(k[2], (3, 3, c, 3)),
            "d": rand(k[3], (4 * 4 * 3, 2))}
  old_p, new_init = params(KEY, 4), params(jax.random.key(1), 6)
  shape = (2, 8, 8, 2) if layout == "NHWC" else (2, 2, 8, 8)
  spec = js.Features(["r", "g"], axis=-1 if layout == "NHWC" else 1)
  s, new_p = surgery_and_check(fn(4), fn(6), old_p, new_init, jnp.ones(shape), jnp.ones(shape), spec, spec)
  np.testing.assert_array_equal(np.asarray(new_p["k2"])[:, :, 4:], 0)


def test_flatten_after_widened_conv():
  def f(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jnp.tanh(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn))
    return h.reshape(h.shape[0], -1) @ p["d"]
  def params(key, c):
    k = jax.random.split(key, 2)
    return {"k1": rand(k[0], (3, 3, 2, c)), "d": rand(k[1], (4 * 4 * c, 2))}
  old_p, new_init = params(KEY, 3), params(jax.random.key(1), 5)
  spec = js.Features(["r", "g"])
  x = jnp.ones((2, 4, 4, 2))
  s, new_p = surgery_and_check(f, f, old_p, new_init, x, x, spec, spec)
  d_new, d_old = np.asarray(new_p["d"]).reshape(16, 5, 2), np.asarray(old_p["d"]).reshape(16, 3, 2)
  np.testing.assert_array_equal(d_new[:, :3], d_old)
  np.testing.assert_array_equal(d_new[:, 3:], 0)


def test_uneven_split_gru():
  def cell(h_dim):
    def f(p, xs):
      def step(h, x):
        zr_x, n_x = jnp.split(x @ p["wx"], [2 * h_dim], -1)
        zr_h, n_h = jnp.split(h @ p["wh"], [2 * h_dim], -1)
        z, r = jnp.split(jax.nn.sigmoid(zr_x + zr_h), 2, -1)
        n = jnp.tanh(n_x + r * n_h)
        h = (1 - z) * h + z * n
        return h, h
      h, ys = jax.lax.scan(step, jnp.zeros((xs.shape[0], h_dim)), jnp.swapaxes(xs, 0, 1))
      return h @ p["out"]
    return f
  def params(key, h):
    k = jax.random.split(key, 3)
    return {"wx": rand(k[0], (2, 3 * h)), "wh": rand(k[1], (h, 3 * h)), "out": rand(k[2], (h, 2))}
  old_p, new_init = params(KEY, 3), params(jax.random.key(1), 5)
  xs = jnp.ones((2, 4, 2))
  spec = js.Features(["a", "b"])
  s, new_p = surgery_and_check(cell(3), cell(5), old_p, new_init, xs, xs, spec, spec)
  wx_n, wx_o = np.asarray(new_p["wx"]), np.asarray(old_p["wx"])
  for g in range(3):
    np.testing.assert_array_equal(wx_n[:, g * 5:g * 5 + 3], wx_o[:, g * 3:g * 3 + 3])


def test_inserted_pre_ln_block_zeroes_the_writes():
  def ln(x, g, b):
    mu = x.mean(-1, keepdims=True)
    v = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(v + 1e-5) * g + b
  def fn(n):
    def f(p, x):
      h = x @ p["in"]
      for i in range(n):
        b = p[f"blk{i}"]
        z = ln(h, b["g"], b["b"])
        h = h + jax.nn.gelu(z @ b["w1"] + b["b1"]) @ b["w2"] + b["b2"]
      return h @ p["out"]
    return f
  def params(key, n):
    k = jax.random.split(key, 2 + 6 * n)
    p = {"in": rand(k[0], (3, 4)), "out": rand(k[1], (4, 2))}
    for i in range(n):
      kk = k[2 + 6 * i:]
      p[f"blk{i}"] = {"g": 1 + rand(kk[0], (4,)), "b": rand(kk[1], (4,)), "w1": rand(kk[2], (4, 8)),
                      "b1": rand(kk[3], (8,)), "w2": rand(kk[4], (8, 4)), "b2": rand(kk[5], (4,))}
    return p
  old_p, new_init = params(KEY, 1), params(jax.random.key(1), 2)
  spec = js.Features(["a", "b", "c"])
  s, new_p = surgery_and_check(fn(1), fn(2), old_p, new_init, jnp.ones((2, 3)), jnp.ones((2, 3)), spec, spec,
                               rename={"blk0/g": "blk0/g"})
  blk = new_p["blk1"]
  np.testing.assert_array_equal(np.asarray(blk["w2"]), 0)
  np.testing.assert_array_equal(np.asarray(blk["b2"]), 0)
  np.testing.assert_array_equal(np.asarray(blk["w1"]), np.asarray(new_init["blk1"]["w1"]))
  np.testing.assert_array_equal(np.asarray(blk["g"]), np.asarray(new_init["blk1"]["g"]))
