"""Forward masks contain the Jacobian sparsity pattern, rule by rule; structurally dense ops equal it."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import forward_pattern, jacobian_pattern, perturbation_pattern
from jax import lax

R = np.random.RandomState(0)
W34 = jnp.asarray(R.normal(size=(3, 4)), jnp.float32)
K = jnp.asarray(R.normal(size=(3, 3, 2, 4)), jnp.float32)  # HWIO


def conv(x, **kw):
  return lax.conv_general_dilated(x.reshape(1, 4, 4, 2), K, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


K_OIHW = jnp.asarray(R.normal(size=(4, 2, 2, 3)), jnp.float32)     # O=4, I=2, 2x3 taps
K_G = jnp.asarray(R.normal(size=(6, 2, 2, 1)), jnp.float32)        # O=6, I=C/G=2 (G=2)
K_BG = jnp.asarray(R.normal(size=(4, 2, 2, 2)), jnp.float32)       # O=4 = 2 batch groups x 2
K_3D = jnp.asarray(R.normal(size=(2, 1, 2, 2, 3)), jnp.float32)    # DHWIO, I=2, O=3
MESH = jax.sharding.Mesh(jax.devices()[:1], ("x",))
P = jax.sharding.PartitionSpec


def nchw(x, k, dn=("NCHW", "OIHW", "NCHW"), **kw):
  return lax.conv_general_dilated(x, k, dimension_numbers=dn, **kw)


def _shard(f, in_specs, out_specs):
  return jax.shard_map(f, mesh=MESH, in_specs=in_specs, out_specs=out_specs)


def _shard_experimental(f, in_specs, out_specs):
  from jax.experimental.shard_map import shard_map
  return shard_map(f, mesh=MESH, in_specs=in_specs, out_specs=out_specs)


# (name, f, n, exact): `exact` cases must equal the Jacobian pattern.
CASES = [
    # elementwise
    ("tanh", jnp.tanh, 6, True),
    ("add_rev", lambda x: x + x[::-1], 6, True),
    ("mul", lambda x: x[:3] * x[3:], 6, True),
    ("div_pow", lambda x: x[:3] / (1.5 + x[3:] ** 2), 6, True),
    ("max_min", lambda x: jnp.maximum(x[:3], x[3:]) + jnp.minimum(x[:3], 2.0), 6, False),
    ("select", lambda x: jnp.where(x[:3] > 0, x[3:], -x[3:]), 6, False),
    ("clamp", lambda x: jnp.clip(x[:3], x[3:], 5.0), 6, False),
    ("integer_pow_exp_log", lambda x: jnp.exp(x) ** 3 + jnp.log1p(x ** 2), 5, True),
    ("convert_copy", lambda x: jnp.array(x.astype(jnp.float16).astype(jnp.float32), copy=True), 5, True),
    ("reduce_precision", lambda x: lax.reduce_precision(x, 5, 10), 5, True),
    ("stop_gradient", lambda x: lax.stop_gradient(x) + x, 5, False),
    ("gelu", jax.nn.gelu, 5, True),
    ("softmax", jax.nn.softmax, 5, True),
    # structural
    ("reshape", lambda x: x.reshape(2, 3).T.reshape(3, 2)[::-1], 6, True),
    ("reshape_split", lambda x: x.reshape(2, 3, 2).sum(1), 12, True),
    ("broadcast", lambda x: jnp.broadcast_to(x[:, None], (4, 3)) * jnp.arange(3.0), 4, False),
    ("transpose", lambda x: jnp.transpose(x.reshape(2, 3, 2), (2, 0, 1)), 12, True),
    ("squeeze_expand", lambda x: jnp.squeeze(x.reshape(1, 6, 1), (0, 2))[None], 6, True),
    ("concat", lambda x: jnp.concatenate([x[:2], x, x[3:]]), 6, True),
    ("pad", lambda x: lax.pad(x, 0.0, [(2, -1, 1)]), 5, True),
    ("pad_value", lambda x: lax.pad(x[:4], x[4], [(1, 1, 1)]), 5, True),
    ("slice_stride", lambda x: x[1::2], 7, True),
    ("rev", lambda x: lax.rev(x.reshape(2, 3), (1,)), 6, True),
    ("split", lambda x: jnp.split(x, [2, 5]), 7, True),
    ("dynamic_slice_static", lambda x: lax.dynamic_slice(x, (2,), (3,)), 7, True),
    ("dynamic_slice_traced", lambda x: lax.dynamic_slice(x[:6], (x[6].astype(jnp.int32) % 3,), (3,)), 7, False),
    ("dynamic_update_slice", lambda x: lax.dynamic_update_slice(x[:5], x[5:] * 2, (1,)), 7, True),
    ("dynamic_update_traced", lambda x: lax.dynamic_update_slice(x[:5], x[5:6], (x[6].astype(jnp.int32),)), 7, False),
    ("gather_static", lambda x: x[jnp.array([3, 0, 0, 5])], 6, True),
    ("gather_2d", lambda x: x.reshape(3, 4)[jnp.array([2, 0]), 1:3], 12, True),
    ("gather_traced", lambda x: x[:5][jnp.clip(x[5].astype(jnp.int32), 0, 4)], 6, False),
    ("take_along", lambda x: jnp.take_along_axis(x.reshape(2, 3), jnp.array([[2, 0], [1, 1]]), axis=1), 6, True),
    ("scatter_set", lambda x: x[:5].at[jnp.array([1, 3])].set(x[5:7]), 7, True),
    ("scatter_add_dup", lambda x: x[:5].at[jnp.array([1, 1, 4])].add(x[5:8]), 8, True),
    ("scatter_traced", lambda x: x[:5].at[x[5].astype(jnp.int32) % 5].set(x[6]), 7, False),
    ("scatter_mul_max", lambda x: x[:4].at[jnp.array([0, 2])].multiply(x[4:6], unique_indices=True).at[jnp.array([3])].max(x[6:7]), 7, True),
    ("iota", lambda x: x * lax.iota(jnp.float32, 5), 5, False),
    # reductions
    ("sum_axes", lambda x: x.reshape(2, 3, 2).sum((0, 2)), 12, True),
    ("max_prod", lambda x: jnp.stack([x.reshape(3, 2).max(1), x.reshape(3, 2).prod(1)]), 6, False),
    ("argmax", lambda x: jnp.argmax(x.reshape(2, 3), axis=1).astype(jnp.float32) * x[:2], 6, False),
    ("cumsum", lambda x: jnp.cumsum(x), 5, True),
    ("cumsum_rev", lambda x: lax.cumsum(x, reverse=True), 5, True),
    ("cumprod_max", lambda x: lax.cumprod(x) + lax.cummax(x), 5, False),
    ("logsumexp", lambda x: jax.nn.logsumexp(x.reshape(2, 3), axis=1), 6, True),
    ("sort", lambda x: jnp.sort(x), 5, False),
    ("argsort", lambda x: x[jnp.argsort(x)], 5, False),
    ("top_k", lambda x: lax.top_k(x, 2)[0], 5, False),
    ("avg_pool", lambda x: lax.reduce_window(x.reshape(1, 6, 1), 0.0, lax.add, (1, 3, 1), (1, 2, 1), "SAME"), 6, True),
    ("max_pool", lambda x: lax.reduce_window(x.reshape(4, 3), -jnp.inf, lax.max, (2, 1), (1, 1), "VALID"), 12, False),
    # contractions
    ("dot", lambda x: x.reshape(2, 3) @ W34, 6, True),
    ("dot_both", lambda x: x[:6].reshape(2, 3) @ x[6:].reshape(3, 2), 12, True),
    ("einsum_batch", lambda x: jnp.einsum("bij,bjk->bik", x[:8].reshape(2, 2, 2), x[8:].reshape(2, 2, 2)), 16, True),
    ("conv_same", lambda x: conv(x, window_strides=(1, 1), padding="SAME"), 32, True),
    ("conv_stride_dil", lambda x: conv(x, window_strides=(2, 1), padding=((1, 0), (0, 1)), rhs_dilation=(1, 2)), 32, True),
    ("conv_lhs_dil", lambda x: conv(x, window_strides=(1, 1), padding=((1, 1), (2, 0)), lhs_dilation=(2, 1)), 32, True),
    ("conv_groups", lambda x: lax.conv_general_dilated(
        x.reshape(1, 2, 3, 4), jnp.asarray(R.normal(size=(4, 1, 2, 1)), jnp.float32), (1, 1), "VALID",
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2), 24, True),
    ("conv_1d", lambda x: jnp.convolve(x, jnp.array([1.0, -2.0, 0.5]), mode="same"), 6, True),
    # linalg / fft / random
    ("cholesky", lambda x: jnp.linalg.cholesky(x.reshape(2, 2) @ x.reshape(2, 2).T + 3 * jnp.eye(2)), 4, False),
    ("solve", lambda x: jnp.linalg.solve(x[:4].reshape(2, 2) + 3 * jnp.eye(2), x[4:]), 6, False),
    ("qr_svd", lambda x: jnp.linalg.svd(x.reshape(2, 3), compute_uv=False) + jnp.linalg.qr(x.reshape(3, 2))[1].sum(), 6, False),
    ("fft", lambda x: jnp.abs(jnp.fft.fft(x.reshape(2, 3), axis=-1)), 6, False),
    ("random", lambda x: x * jax.random.normal(jax.random.key(0), (5,)) + jax.random.uniform(
        jax.random.fold_in(jax.random.key(1), 3), (5,)), 5, False),
    # control flow
    ("stack_tile", lambda x: jnp.tile(jnp.stack([x[:2], x[2:4] * 2], axis=1), (2, 3)), 4, True),
    ("unstack", lambda x: jnp.unstack(x.reshape(2, 3), axis=1)[2], 6, True),
    ("roll", lambda x: jnp.roll(x.reshape(2, 3), 1, axis=1), 6, True),
    ("jit", lambda x: jax.jit(lambda y: jnp.sin(y) * 2)(x), 4, True),
    ("cond", lambda x: lax.cond(x[0] > 0, lambda y: y * 2, lambda y: y[::-1], x[1:]), 5, False),
    ("cond_static", lambda x: lax.cond(True, lambda y: y * 2, lambda y: y[::-1], x), 5, True),
    ("switch", lambda x: lax.switch(x[0].astype(jnp.int32) % 3, [jnp.sin, jnp.cos, lambda y: y[::-1]], x[1:]), 5, False),
    ("while", lambda x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.roll(c[1], 1) * 1.1), (0, x))[1], 5, False),
    ("while_pred", lambda x: lax.while_loop(lambda c: c[1][0] < 10.0, lambda c: (c[0] + 1, c[1] + 1.0), (0, x))[1], 4, False),
    ("fori", lambda x: lax.fori_loop(0, 3, lambda i, c: c + jnp.roll(c, 1), x), 5, False),
    ("scan", lambda x: lax.scan(lambda c, xi: (c * 0.5 + xi, c.sum()), x[:2], x[2:].reshape(3, 2)), 8, False),
    ("scan_reverse", lambda x: lax.scan(lambda c, xi: (c + xi, c), x[:2], x[2:].reshape(3, 2), reverse=True)[1], 8, False),
    ("remat", lambda x: jax.checkpoint(lambda y: jnp.tanh(y) * y)(x), 4, True),
    ("custom_jvp", lambda x: jax.nn.relu(x) + jax.nn.softplus(x), 4, False),
    ("custom_vjp", lambda x: _clip_grad(x) * 2, 4, True),
    ("closed_call", lambda x: jax.named_call(lambda y: y * y, name="sq")(x), 4, True),
    # conv: more dimension numbers, strides, dilations, groups, batch groups
    ("conv_nchw_oihw", lambda x: nchw(x.reshape(1, 2, 4, 3), K_OIHW, window_strides=(1, 2),
                                      padding=((1, 0), (1, 1))), 24, True),
    ("conv_nchw_dil", lambda x: nchw(x.reshape(2, 2, 3, 2), K_OIHW, window_strides=(2, 1),
                                     padding=((1, 1), (0, 2)), rhs_dilation=(2, 1), lhs_dilation=(1, 2)), 24, True),
    ("conv_mixed_layouts", lambda x: nchw(x.reshape(4, 3, 1, 2), jnp.transpose(K_OIHW, (2, 3, 1, 0)),
                                          dn=("HWNC", "HWIO", "CNHW"), window_strides=(1, 1), padding="SAME"), 24, True),
    ("conv_groups_nchw", lambda x: nchw(x.reshape(1, 4, 3, 2), K_G, window_strides=(1, 1), padding="VALID",
                                        feature_group_count=2), 24, True),
    ("conv_batch_groups", lambda x: nchw(x.reshape(4, 2, 3, 1), K_BG, window_strides=(1, 1),
                                         padding=((0, 1), (0, 1)), batch_group_count=2), 24, False),
    ("conv_3d", lambda x: lax.conv_general_dilated(x.reshape(1, 2, 3, 2, 2), K_3D, (1, 1, 1), "SAME",
                                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), 24, True),
    ("conv_1d_stride_pad", lambda x: lax.conv_general_dilated(
        x.reshape(1, 2, 6), K_OIHW[:, :, 0, :], (2,), ((2, 1),), dimension_numbers=("NCH", "OIH", "NCH")), 12, True),
    # reductions / cumulative
    ("argmin", lambda x: jnp.argmin(x.reshape(2, 3), axis=1).astype(jnp.float32) * x[:2], 6, False),
    ("cumlogsumexp", lambda x: lax.cumlogsumexp(x.reshape(2, 3), axis=1, reverse=True), 6, True),
    ("cummin", lambda x: lax.cummin(x.reshape(3, 2), axis=0), 6, False),
    ("reduce_window_base_dil", lambda x: lax.reduce_window(x.reshape(2, 3), 0.0, lax.add, (1, 2), (1, 1),
                                                           ((0, 0), (1, 1)), base_dilation=(1, 2)), 6, True),
    # structural, indexing
    ("select_n_3", lambda x: lax.select_n(jnp.clip(x[:2].astype(jnp.int32), 0, 2), x[2:4], x[4:6], x[6:8]), 8, False),
    ("lax_split", lambda x: lax.split(x.reshape(2, 5), (2, 3), axis=1)[1] * 2, 10, True),
    ("pad_negative", lambda x: lax.pad(x.reshape(2, 3), 1.0, [(0, 1, 0), (-1, 2, 1)]), 6, True),
    ("dus_compressed", lambda x: lax.dynamic_update_slice(jnp.broadcast_to(x[:3, None], (3, 4)),
                                                          x[3:5].reshape(1, 2), (1, 2)), 5, True),
    ("dus_compressed_upd", lambda x: lax.dynamic_update_slice(x[:8].reshape(2, 4),
                                                              jnp.broadcast_to(x[8], (2, 2)), (0, 1)), 9, True),
    ("dus_clamped", lambda x: lax.dynamic_update_slice(x[:5], x[5:7], (4,)), 7, True),
    ("gather_fill_oob", lambda x: x[:5].at[jnp.array([0, 9, -1, 4, -9])].get(mode="fill", fill_value=0.0), 6, True),
    ("gather_clip_oob", lambda x: x[:5].at[jnp.array([0, 9, -1, 4])].get(mode="clip"), 6, True),
    ("take_fill", lambda x: jnp.take(x.reshape(2, 3), jnp.array([2, 5, 0]), axis=1, mode="fill", fill_value=1.0), 6, True),
    ("gather_compressed_fill", lambda x: jnp.broadcast_to(x[0], (4,)).at[jnp.array([1, 7])].get(mode="fill", fill_value=0.0), 2, True),
    ("scatter_drop_oob", lambda x: x[:5].at[jnp.array([1, 7, 3])].set(x[5:8], mode="drop"), 8, True),
    ("scatter_add_2d", lambda x: x[:6].reshape(2, 3).at[:, jnp.array([0, 0, 2])].add(x[6:12].reshape(2, 3)), 12, True),
    ("gather_traced_rows", lambda x: x[:8].reshape(4, 2)[jnp.clip(jnp.floor(x[8:10]).astype(jnp.int32), 0, 3)], 10, False),
    ("take_traced_cols", lambda x: jnp.take(x[:8].reshape(2, 4), jnp.clip(jnp.floor(x[8:10]).astype(jnp.int32), 0, 3),
                                            axis=1), 10, False),
    ("vmap_gather_batching_dims", lambda x: jax.vmap(lambda r, i: r[i])(
        x[:8].reshape(2, 4), jnp.clip(jnp.floor(x[8:10]).astype(jnp.int32), 0, 3)), 10, False),
    ("vmap_dynamic_slice", lambda x: jax.vmap(lambda r, i: lax.dynamic_slice(r, (i,), (2,)))(
        x[:8].reshape(2, 4), jnp.clip(jnp.floor(x[8:10]).astype(jnp.int32), 0, 2)), 10, False),
    ("gather_jit_const", lambda x: jax.jit(lambda y: y[np.array([2, 2, 0])])(x), 3, True),
    ("dynamic_slice_folded", lambda x: lax.dynamic_slice(x, (lax.iota(jnp.int32, 3)[2],), (2,)), 5, True),
    # linalg
    ("eigh", lambda x: jnp.linalg.eigh(x.reshape(2, 2, 2) + jnp.swapaxes(x.reshape(2, 2, 2), 1, 2))[0], 8, False),
    ("triangular_solve", lambda x: lax.linalg.triangular_solve(
        jnp.tril(x[:4].reshape(2, 2)) + 3 * jnp.eye(2), x[4:].reshape(2, 2), left_side=True, lower=True), 8, False),
    ("batched_solve", lambda x: jnp.linalg.solve(x[:8].reshape(2, 2, 2) + 3 * jnp.eye(2), x[8:].reshape(2, 2, 1)), 12, False),
    ("rfft_2d", lambda x: jnp.abs(jnp.fft.rfft2(x.reshape(2, 2, 3))), 12, False),
    # random: typed keys and raw uint32 keys; constant keys leave masks elementwise
    ("random_typed_key", lambda x: x * jax.random.normal(jax.random.key(0), (5,)), 5, True),
    ("random_raw_key", lambda x: x * jax.random.uniform(jax.random.PRNGKey(0), (5,)), 5, True),
    ("random_split_keys", lambda x: x * jax.vmap(lambda k: jax.random.normal(k, ()))(
        jax.random.split(jax.random.key(3), 5)), 5, True),
    ("random_key_data", lambda x: x + jax.random.key_data(jax.random.split(jax.random.key(1), 5))[:, 0].astype(
        jnp.float32), 5, True),
    # higher order
    ("cond_folded_index", lambda x: lax.cond(lax.iota(jnp.int32, 2)[1] > 0, lambda y: y * 2, lambda y: y[::-1], x), 5, True),
    ("switch_folded", lambda x: lax.switch(lax.iota(jnp.int32, 3)[2], [jnp.sin, jnp.cos, lambda y: y[::-1]], x), 5, True),
    ("scan_const_counter", lambda x: lax.scan(lambda i, _: (i + 1, x[i]), 0, None, length=3)[1], 3, False),
    ("scan_shift_register", lambda x: lax.scan(lambda c, _: (jnp.roll(c, 1), c[0]), x, None, length=7)[1], 7, False),
    ("scan_params_consts", lambda x: lax.scan(lambda c, xt: (jnp.tanh(c @ W34[:, :3] + xt), c), x[:3],
                                               x[3:].reshape(2, 3))[1], 9, False),
    ("fori_long_roll", lambda x: lax.fori_loop(0, 100, lambda i, c: jnp.roll(c, 1).at[0].add(c[-1]), x), 80, False),
    ("while_long_roll", lambda x: lax.while_loop(lambda c: c[0] < 90, lambda c: (c[0] + 1, jnp.roll(c[1], 1) * 1.01),
                                                 (0, x))[1], 80, False),
    ("while_fixed_point_shift", lambda x: lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, c[2], c[3], c[3]),
                                                         (0, x[0], x[1], x[2]))[1:], 3, False),
    ("shard_map_psum", lambda x: _shard(lambda w, xb: lax.psum(jnp.tanh(xb @ w), "x"), (P(), P("x")), P())(
        W34, x.reshape(2, 3)), 6, True),
    ("shard_map_experimental", lambda x: _shard_experimental(lambda xb: xb[:, ::-1] * 2, (P("x"),), P("x"))(
        x.reshape(2, 3)), 6, True),
]


def _linear_call(x):
  from jax._src.custom_derivatives import linear_call
  return linear_call(lambda r, y: y * r, lambda r, ct: ct * r, 2.0, x)


@jax.custom_vjp
def _clip_grad(x):
  return jnp.sin(x)


_clip_grad.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


@pytest.mark.parametrize("name,f,n,exact", CASES, ids=[c[0] for c in CASES])
def test_forward_masks_contain_jacobian_pattern(name, f, n, exact):
  forward = forward_pattern(f, n)
  jac = jacobian_pattern(f, n)
  missed = jac & ~forward
  assert not missed.any(), f"{name}: forward masks miss {np.argwhere(missed).tolist()}"
  if exact:
    extra = forward & ~jac
    assert not extra.any(), f"{name}: over-approximates at {np.argwhere(extra).tolist()}"


def test_over_approximation_is_real_where_allowed():
  # sanity: the checker can detect over-approximation (argmax is piecewise constant)
  f = lambda x: jnp.argmax(x).astype(jnp.float32)
  assert forward_pattern(f, 3).any() and not jacobian_pattern(f, 3).any()


def test_scan_const_counter_step_zero_is_exact():
  # the initial carry is a constant: step 0 reads exactly x[0]; later steps are traced
  f = lambda x: lax.scan(lambda i, _: (i + 1, x[i]), 0, None, length=3)[1]
  forward = forward_pattern(f, 3)
  assert forward[0].tolist() == [True, False, False]
  assert forward[1:].all()


def test_linear_call_is_interpreted():
  # linear_call has no batching rule, so the Jacobian helper cannot run on it
  from jax._src.custom_derivatives import linear_call
  f = lambda x: linear_call(lambda r, y: y[::-1] * r, lambda r, ct: ct[::-1] * r, 2.0, x)
  assert (forward_pattern(f, 4) == np.eye(4, dtype=bool)[::-1]).all()


# Outputs that autodiff cannot see (integers, booleans, predicates): compare with
# a value-level oracle that redraws one input at a time.
DISCRETE = [
    ("reduce_and", lambda x: jnp.all(x.reshape(2, 3) > 0, axis=1), 6),
    ("reduce_or", lambda x: jnp.any(x.reshape(3, 2) > 0.5, axis=0), 6),
    ("reduce_xor", lambda x: lax.reduce_xor_p.bind((x.reshape(2, 3) > 0), axes=(1,)), 6),
    ("argmin", lambda x: jnp.argmin(x.reshape(2, 3), axis=1), 6),
    ("argmax_axis0", lambda x: jnp.argmax(x.reshape(2, 3), axis=0), 6),
    ("compare", lambda x: (x[:3] < x[3:]) & (x[:3] != 0.5), 6),
    ("convert_int", lambda x: jnp.floor(x * 2).astype(jnp.int32) % 3, 5),
    ("argsort", lambda x: jnp.argsort(x.reshape(2, 3), axis=1), 6),
    ("top_k_idx", lambda x: lax.top_k(x.reshape(2, 4), 2)[1], 8),
    ("where_pred", lambda x: jnp.where(x[:3] > 0, 1.0, 2.0), 3),
    ("cond_pred", lambda x: lax.cond(x[0] > 0, lambda y: y * 0 + 1.0, lambda y: y * 0 + 2.0, x[1:]), 3),
    ("while_trip_count", lambda x: lax.while_loop(lambda c: c[1] < x[0] * 5, lambda c: (c[0] + 1, c[1] + 1.0),
                                                  (0, 0.0))[0], 2),
    ("fold_in_feature", lambda x: jax.random.bits(jax.random.fold_in(jax.random.key(0), (x[0] > 0).astype(jnp.uint32)),
                                                  (3,)), 2),
    ("raw_key_feature", lambda x: jax.random.randint(
        jax.random.PRNGKey(0) + (x[1] > 0).astype(jnp.uint32), (2,), 0, 100), 2),
    ("gather_traced", lambda x: x[:4][jnp.clip(jnp.floor(x[4:6]).astype(jnp.int32), 0, 3)] > 0, 6),
    ("vmap_gather_traced", lambda x: jax.vmap(lambda r, i: r[i])(
        x[:8].reshape(2, 4), jnp.clip(jnp.floor(x[8:10]).astype(jnp.int32), 0, 3)), 10),
    ("scatter_traced_idx", lambda x: jnp.zeros(4).at[jnp.clip(jnp.floor(x[0]).astype(jnp.int32), 0, 3)].set(1.0), 2),
]


@pytest.mark.parametrize("name,f,n", DISCRETE, ids=[c[0] for c in DISCRETE])
def test_discrete_outputs_contain_value_dependence(name, f, n):
  forward = forward_pattern(f, n)
  changed = perturbation_pattern(f, n)
  assert changed.any(), f"{name}: the oracle saw no dependence at all"
  missed = changed & ~forward
  assert not missed.any(), f"{name}: forward masks miss {np.argwhere(missed).tolist()}"


def test_reduce_and_groups_are_exact():
  f = lambda x: jnp.all(x.reshape(2, 3) > 0, axis=1)
  assert (forward_pattern(f, 6) == np.kron(np.eye(2, dtype=bool), np.ones((1, 3), bool))).all()


def test_traced_gather_keeps_the_sliced_axes_precise():
  # rows picked by a traced index keep their column masks; vmapped gathers keep the batch
  f = lambda x: x[:8].reshape(4, 2)[jnp.clip(jnp.floor(x[8:10]).astype(jnp.int32), 0, 3)]
  forward = forward_pattern(f, 10)
  col = np.zeros((4, 10), bool)
  col[[0, 2], 0:8:2] = col[[1, 3], 1:8:2] = True
  col[[0, 1], 8] = col[[2, 3], 9] = True
  assert (forward == col).all()
  g = lambda x: jax.vmap(lambda r, i: r[i])(x[:8].reshape(2, 4), jnp.clip(jnp.floor(x[8:10]).astype(jnp.int32), 0, 3))
  assert forward_pattern(g, 10).astype(int).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]]


_SHARD_SCRIPT = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from checks import forward_pattern, jacobian_pattern
mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
W = jnp.asarray(np.random.RandomState(0).normal(size=(3, 2)), jnp.float32)
sm = lambda f, i, o, **kw: jax.shard_map(f, mesh=mesh, in_specs=i, out_specs=o, **kw)
cases = {
  "local": lambda x: sm(lambda xb: jnp.tanh(xb) * 2, P("x"), P("x"))(x.reshape(4, 3)),
  "psum": lambda x: sm(lambda w, xb: lax.psum(xb @ w, "x"), (P(), P("x")), P())(W, x.reshape(4, 3)),
  "row_parallel": lambda x: sm(lambda w, xb: lax.psum(xb @ w, "x"), (P("x"), P(None, "x")), P())(
      jnp.ones((4, 2)), x.reshape(3, 4)),
  "all_gather": lambda x: sm(lambda xb: lax.all_gather(xb, "x", tiled=True) * 1.0, P("x"), P(), check_vma=False)(
      x.reshape(4, 3)),
  "ppermute": lambda x: sm(lambda xb: lax.ppermute(xb, "x", [(0, 1), (1, 0)]), P("x"), P("x"))(x.reshape(4, 3)),
}
assert len(jax.devices()) == 2
for name, f in cases.items():
  fw, jac = forward_pattern(f, 12), jacobian_pattern(f, 12, seeds=(0,))
  print(name, "MISS" if (jac & ~fw).any() else "ok")
'''


@pytest.mark.slow
def test_shard_map_on_two_devices_is_sound():
  """Sharded axes really split (local shapes differ from global); run in a fresh process."""
  import os
  import subprocess
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT, here], capture_output=True, text=True, env=env,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = res.stdout.split()
  assert lines.count("ok") == 5 and "MISS" not in lines, res.stdout


def test_deep_chain_of_constant_ops_folds_without_recursion():
  # static indices computed by thousands of constant ops (folded lazily, iteratively)
  def f(x):
    idx = jnp.arange(3)
    for _ in range(2000):
      idx = (idx + 1) % 3
    return x[idx[::-1]]
  perm = ((np.arange(3) + 2000) % 3)[::-1]
  assert (forward_pattern(f, 3) == np.eye(3, dtype=bool)[perm]).all()


@jax.custom_batching.custom_vmap
def _vmapped_sin(x):
  return jnp.sin(x)


_vmapped_sin.def_vmap(lambda axis_size, in_batched, xs: (jnp.sin(xs), True))


@pytest.mark.parametrize("name,f", [
    ("custom_vmap_call", lambda x: _vmapped_sin(x[::-1])),
    ("composite", lambda x: lax.composite(lambda y: y[::-1] * 2.0, name="my.rev")(x)),
    ("compute_on_or_jit", lambda x: jax.jit(lambda y: y[::-1])(x)),
])
def test_call_like_primitives_interpret_their_callee(name, f):
  # (no jvp/vmap for some of these: compare with the known permutation)
  with jax.checking_leaks():
    forward = forward_pattern(f, 4)
  assert (forward == np.eye(4, dtype=bool)[::-1]).all(), name
