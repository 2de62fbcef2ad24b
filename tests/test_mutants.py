"""Tests that fail when the code is wrong (issue 16): one per class of one-line bug that survived a mutation run.

Each test checks masks against JAX's own Jacobian sparsity (``checks.jacobian_pattern``; for touches the mixed
second derivative ``d/dx dL/dparam``), or against an exact expected pattern, on shapes where a mutant differs:
feature-dependent conv kernels, sort/top_k along a non-last axis, non-involutive transposes, fresh parameters
reshaped before a product, both time directions of scan, fixed points that need several levels, and
multi-output verification. ``scripts/mutate.py`` runs the mutants against these tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import assert_contains, assert_equal, element_features, forward_pattern, jacobian_pattern
from jax import lax

import jaxsurgery as js

R = np.random.RandomState(16)


def touch_reference(fn, params, n, seeds=(0, 1, 2)):
  """Per parameter leaf, ``(leaf.shape + (n,))``: where ``d/dx_f dL/dp_e`` is nonzero at some random point.

  ``L = sum(fn(p, x) * c)`` with a random cotangent ``c``: a parameter element whose gradient moves with
  feature ``f`` meets ``f`` in a product. Touches are *first contacts* (docs/design.md section 5): the programs
  checked here meet features first in that product, so the table must mark it touched.
  """
  out = None
  for s in seeds:
    k1, k2, k3 = jax.random.split(jax.random.key(100 + s), 3)
    x = jax.random.normal(k1, (n,)) + 0.1 * (s + 1)
    leaves, tree = jax.tree_util.tree_flatten(params)
    leaves = [jax.random.normal(jax.random.fold_in(k2, i), np.shape(v)) for i, v in enumerate(leaves)]
    p = jax.tree_util.tree_unflatten(tree, leaves)
    y = jax.eval_shape(fn, p, x)
    c = jax.tree_util.tree_map(lambda o, k3=k3: jax.random.normal(k3, o.shape), y)

    def loss(p, x, c=c):
      return sum(jnp.sum(a * b) for a, b in zip(jax.tree_util.tree_leaves(fn(p, x)), jax.tree_util.tree_leaves(c)))

    mixed = jax.jacfwd(lambda x, p=p, loss=loss: jax.grad(loss)(p, x))(x)
    pat = jax.tree_util.tree_map(lambda m: np.asarray(m != 0), mixed)
    out = pat if out is None else jax.tree_util.tree_map(np.logical_or, out, pat)
  return out


def table_of(fn, params, n):
  return js.dependency_table(fn, params, jax.ShapeDtypeStruct((n,), jnp.float32), element_features(n), strict=True)


def check_touches(fn, params, n, exact=True):
  """Table touches ⊇ the mixed-derivative pattern (== when ``exact``), leaf by leaf."""
  table = table_of(fn, params, n)
  ref = touch_reference(fn, params, n)
  for path, want in zip(table.paths, jax.tree_util.tree_leaves(ref)):
    got = table.mask(path).reshape(-1, n)
    want = want.reshape(-1, n)
    (assert_equal if exact else assert_contains)(got, want, f"touch {path}")
  return table


# -- conv: a kernel computed from features ------------------------------------------------------------------------

def _conv(lhs, rhs, padding="VALID", **kw):
  return lax.conv_general_dilated(lhs, rhs, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_conv_with_feature_kernel_depends_on_both_operands(padding):
  # image x[:32] (1x4x4x2), kernel x[32:] (3x3x2x1): every output depends on its window and on the kernel
  f = lambda x: _conv(x[:32].reshape(1, 4, 4, 2), x[32:].reshape(3, 3, 2, 1), padding)
  fw, jac = forward_pattern(f, 50), jacobian_pattern(f, 50)
  (assert_equal if padding == "VALID" else assert_contains)(fw, jac, f"conv {padding}")
  assert fw[:, 32:].any()


# A real bug these found (fixed in 852a69f): the kernel's per-output-channel mask (O, 1, ...) was put in the
# output layout as if its first axis were the batch, so the output channel landed on the batch axis: a broadcast
# error when O != N, silently missed dependencies when O == N.
@pytest.mark.parametrize("case", ["nhwc_o4", "nchw_n2_o2"])
def test_conv_with_feature_kernel_of_several_output_channels(case):
  if case == "nhwc_o4":  # output channel o reads exactly the kernel taps [:, :, :, o]
    f = lambda x: _conv(x[:32].reshape(1, 4, 4, 2), x[32:].reshape(3, 3, 2, 4))
    n = 104
  else:  # N == O: broadcasting hides the misplaced axis
    f = lambda x: lax.conv_general_dilated(x[:16].reshape(2, 2, 2, 2), x[16:].reshape(2, 2, 1, 2), (1, 1),
                                           "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    n = 24
  assert_equal(forward_pattern(f, n), jacobian_pattern(f, n), case)


def test_conv_kernel_computed_from_features_touches_the_image_parameter():
  # a parameter image convolved with a feature kernel: every image element meets every kernel feature
  fn = lambda p, x: _conv(p["img"], jnp.tanh(x.reshape(2, 2, 2, 1)))
  table = check_touches(fn, {"img": jnp.zeros((1, 4, 4, 2))}, 8, exact=False)
  assert table.mask("img").all()  # the rule: uniform (every kernel feature on every image element)


def test_conv_grouped_feature_kernel_and_param_kernel():
  # groups: output channels of group g read input channels of g only; a parameter kernel is touched per channel
  # (O // G = 2 output channels per group: repeated, not tiled, over the groups)
  k = jnp.asarray(R.normal(size=(2, 2, 1, 4)), jnp.float32)
  f = lambda x: lax.conv_general_dilated(x.reshape(1, 4, 4, 2), k, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  assert_equal(forward_pattern(f, 32), jacobian_pattern(f, 32), "grouped conv")
  fn = lambda p, x: _conv(x.reshape(1, 3, 3, 2), p["k"])
  table = check_touches(fn, {"k": jnp.zeros((2, 2, 2, 3))}, 18, exact=False)
  channel = np.arange(18) % 2  # kernel[..., i, o] meets input channel i only
  k = table.mask("k")
  assert k[:, :, 0][..., channel == 0].all() and not k[:, :, 0][..., channel == 1].any()


# -- sort and top_k along a non-last axis ---------------------------------------------------------------------------

def _columns(rows, cols, out_rows=None):
  """out[i, j] depends on x[:, j] (row-major (rows, cols) input)."""
  out_rows = rows if out_rows is None else out_rows
  pat = np.zeros((out_rows, cols, rows, cols), bool)
  for j in range(cols):
    pat[:, j, :, j] = True
  return pat.reshape(out_rows * cols, rows * cols)


@pytest.mark.parametrize("axis", [0, 1])
def test_sort_along_an_axis_mixes_that_axis_only(axis):
  f = lambda x: jnp.sort(x.reshape(3, 4), axis=axis)
  fw = forward_pattern(f, 12)
  assert_contains(fw, jacobian_pattern(f, 12))
  want = _columns(3, 4) if axis == 0 else np.kron(np.eye(3, dtype=bool), np.ones((4, 4), bool))
  assert (fw == want).all(), np.argwhere(fw != want).tolist()[:10]


def test_sort_with_values_along_axis_0():
  # values follow their keys: out[i, j] depends on keys[:, j] and values[:, j]
  f = lambda x: lax.sort((x[:12].reshape(3, 4), x[12:].reshape(3, 4)), dimension=0, num_keys=1)[1]
  fw = forward_pattern(f, 24)
  assert_contains(fw, jacobian_pattern(f, 24))
  col = _columns(3, 4)
  assert (fw == np.concatenate([col, col], axis=1)).all()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_top_k_along_an_axis(axis):
  a = axis % 2
  f = lambda x: lax.top_k(x.reshape(4, 3), 2, axis=axis)[0]
  fw = forward_pattern(f, 12)
  assert_contains(fw, jacobian_pattern(f, 12))
  if a == 0:
    want = _columns(4, 3, out_rows=2)
  else:
    want = np.kron(np.eye(4, dtype=bool), np.ones((2, 3), bool))
  assert (fw == want).all(), np.argwhere(fw != want).tolist()[:10]


def test_top_k_indices_and_touch_along_axis_0():
  # the indices along axis 0 depend on their column; a parameter top_k'd over rows is touched soundly
  f = lambda x: lax.top_k(x.reshape(4, 3), 2, axis=0)[1]
  assert (forward_pattern(f, 12) == _columns(4, 3, out_rows=2)).all()
  fn = lambda p, x: lax.top_k(p["w"] * x.reshape(4, 3), 2, axis=0)[0]
  table = check_touches(fn, {"w": jnp.zeros((4, 3))}, 12, exact=False)
  got = table.mask("w").reshape(12, 12)
  assert not (got & ~_columns(4, 3)).any()  # never across columns


# -- transposes that are not involutions ------------------------------------------------------------------------------

@pytest.mark.parametrize("perm", [(1, 2, 0), (2, 0, 1)])
def test_non_involutive_transpose_forward_and_touch(perm):
  f = lambda x: jnp.transpose(x.reshape(2, 3, 4), perm) * 2.0
  assert_equal(forward_pattern(f, 24), jacobian_pattern(f, 24), f"transpose {perm}")
  # a parameter transposed before it meets features: touches go back through the inverse permutation
  shape = tuple(np.array([2, 3, 4])[np.argsort(perm)])  # w.transpose(perm).shape == (2, 3, 4)
  fn = lambda p, x: jnp.transpose(p["w"], perm) * x.reshape(2, 3, 4)
  check_touches(fn, {"w": jnp.zeros(shape)}, 24)


def _transposed_fn(p, x):
  # w: (F, H, K) used as (H, K, F): rows of w follow the features
  wt = jnp.transpose(p["w"], (1, 2, 0))
  return jnp.tanh(jnp.einsum("hkf,bf->bhk", wt, x)) + p["b"]


def test_plan_through_a_non_involutive_transpose_moves_feature_rows():
  k = jax.random.split(jax.random.key(3), 3)
  old_p = {"w": jax.random.normal(k[0], (3, 2, 5)), "b": jax.random.normal(k[1], (2, 5))}
  new_init = {"w": jax.random.normal(k[2], (4, 2, 5)), "b": jnp.zeros((2, 5))}
  old_x, new_x = jnp.ones((2, 3)), jnp.ones((2, 4))
  old_t = js.dependency_table(_transposed_fn, old_p, old_x, js.Features(["a", "b", "c"]), strict=True)
  new_t = js.dependency_table(_transposed_fn, new_init, new_x, js.Features(["c", "a", "new", "b"]), strict=True)
  w_touch = new_t.mask("w")
  assert (w_touch[2, :, :, 2]).all() and not w_touch[2][..., [0, 1, 3]].any()
  surgery = js.plan(old_t, new_t)
  assert surgery.report.preserved is True, surgery.report
  new_p = surgery(old_p, new_init)
  w_old, w_new = np.asarray(old_p["w"]), np.asarray(new_p["w"])
  np.testing.assert_array_equal(w_new[0], w_old[2])
  np.testing.assert_array_equal(w_new[1], w_old[0])
  np.testing.assert_array_equal(w_new[3], w_old[1])
  np.testing.assert_array_equal(w_new[2], 0)
  check = js.verify(surgery, _transposed_fn, _transposed_fn, old_p, new_p, old_x, new_x, key=jax.random.key(5))
  assert check.ok, check


@pytest.mark.parametrize("perm", [(1, 2, 0), (2, 0, 1)])
def test_reshape_with_dimensions_pulls_touches_back_through_the_inverse(perm):
  # lax.reshape(..., dimensions=perm) transposes first: its pullback must use the inverse permutation
  shape = tuple(np.array([2, 3, 4])[np.argsort(perm)])
  fn = lambda p, x: lax.reshape(p["w"], (24,), dimensions=perm) * x
  check_touches(fn, {"w": jnp.zeros(shape)}, 24)


def test_broadcast_of_a_size_one_axis_pulls_back_to_its_operand_shape():
  # w[:, 1:2] is (3, 1), broadcast to (3, 4): the pullback ORs the broadcast axis before the slice sees it
  fn = lambda p, x: jnp.broadcast_to(p["w"][:, 1:2], (3, 4)) * x.reshape(3, 4)
  table = check_touches(fn, {"w": jnp.zeros((3, 2))}, 12)
  assert not table.mask("w")[:, 0].any()


@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_of_a_parameter_touch_direction(reverse):
  # c = cumsum(w): w[j] meets x[i] for i >= j (i <= j reversed)
  fn = lambda p, x: lax.cumsum(p["w"], reverse=reverse) * x
  check_touches(fn, {"w": jnp.zeros(5)}, 5)


def test_windows_over_padding_of_a_constant_axis_see_nothing():
  # the mask is constant along axis 1 (a broadcast); windows that see only padding depend on nothing
  f = lambda x: lax.reduce_window(jnp.broadcast_to(x[:, None], (3, 4)), 0.0, lax.add, (1, 2), (1, 1),
                                  ((0, 0), (2, 2)))
  fw = forward_pattern(f, 3)
  assert_equal(fw, jacobian_pattern(f, 3), "reduce_window over padding")
  assert not fw.reshape(3, 7, 3)[:, [0, 6]].any()


def test_gather_by_a_parameter_index_pulls_touches_back_to_the_table():
  # rows picked by an integer parameter (traced, feature-free): emb[r, c] meets column c of the features
  fn = lambda p, x: p["emb"][p["idx"]] * x.reshape(2, 3)
  table = table_of(fn, {"emb": jnp.zeros((4, 3)), "idx": jnp.zeros(2, jnp.int32)}, 6)
  want = np.broadcast_to(np.tile(np.eye(3, dtype=bool), (1, 2)), (4, 3, 6))
  assert (table.mask("emb") == want).all(), table.mask("emb").astype(int)


def test_a_parameter_met_twice_by_disjoint_features_keeps_both_touches():
  # the second touch shares no bit with the first: it is new, not "nothing new"
  fn = lambda p, x: p["w"] * x[0] + jnp.tanh(p["w"]) * x[1] + p["w"][::-1] * x[2]
  table = check_touches(fn, {"w": jnp.zeros(2)}, 3)
  assert table.mask("w").all()


def test_a_long_odd_axis_reduction_keeps_its_middle_entry():
  # a large mask with one word per element is ORed by halving; an odd length folds its middle entry in
  n = 4097
  f = lambda x: jnp.sum(jnp.concatenate([jnp.zeros(n // 2), x[:1], jnp.zeros(n // 2)]) * x[1]).reshape(1)
  fw = forward_pattern(f, 2)
  assert fw.tolist() == [[True, True]], fw
  g = lambda x: jnp.max(jnp.concatenate([jnp.zeros((n // 2, 2)), x[None, :2], jnp.zeros((n // 2, 2))]), axis=0)
  assert (forward_pattern(g, 2) == np.eye(2, dtype=bool)).all()


def _tanh_transposed_fn(p, x):
  # w2: (O, K, H) used as tanh((H, O, K)): the hidden axis has no parameter origin past the tanh, so its zeros
  # are a demand pulled back through tanh and the transpose to w2's last axis
  return jnp.einsum("bh,hok->bok", jnp.tanh(x @ p["w1"]), jnp.tanh(jnp.transpose(p["w2"], (2, 0, 1))))


def test_zero_demand_pulled_back_through_a_non_involutive_transpose():
  k = jax.random.split(jax.random.key(0), 4)
  old_p = {"w1": jax.random.normal(k[0], (3, 4)), "w2": jax.random.normal(k[1], (2, 5, 4))}
  new_init = {"w1": jax.random.normal(k[2], (3, 6)), "w2": jax.random.normal(k[3], (2, 5, 6))}
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  old_t = js.dependency_table(_tanh_transposed_fn, old_p, x, spec, strict=True)
  new_t = js.dependency_table(_tanh_transposed_fn, new_init, x, spec, strict=True)
  surgery = js.plan(old_t, new_t)
  assert surgery.report.preserved is True, surgery.report
  new_p = surgery(old_p, new_init)
  w2 = np.asarray(new_p["w2"])
  np.testing.assert_array_equal(w2[..., 4:], 0)  # the new hidden units' slab of w2: zero
  np.testing.assert_array_equal(w2[..., :4], np.asarray(old_p["w2"]))
  np.testing.assert_array_equal(np.asarray(new_p["w1"])[:, 4:], np.asarray(new_init["w1"])[:, 4:])
  check = js.verify(surgery, _tanh_transposed_fn, _tanh_transposed_fn, old_p, new_p, x, x, key=jax.random.key(1))
  assert check.ok, check


# -- a fresh or widened parameter reshaped before a product ------------------------------------------------------------

def _flat_w_fn(p, x):
  return jnp.tanh(x @ p["w"].reshape(x.shape[-1], 4)) @ p["out"]


def test_widened_flat_parameter_reshaped_before_product():
  k = jax.random.split(jax.random.key(4), 3)
  old_p = {"w": jax.random.normal(k[0], (12,)), "out": jax.random.normal(k[1], (4, 2))}
  new_init = {"w": jax.random.normal(k[2], (16,)), "out": jnp.zeros((4, 2))}
  old_x, new_x = jnp.ones((2, 3)), jnp.ones((2, 4))
  old_t = js.dependency_table(_flat_w_fn, old_p, old_x, js.Features(["a", "b", "c"]), strict=True)
  new_t = js.dependency_table(_flat_w_fn, new_init, new_x, js.Features(["a", "new", "b", "c"]), strict=True)
  surgery = js.plan(old_t, new_t)
  new_p = surgery(old_p, new_init)
  check = js.verify(surgery, _flat_w_fn, _flat_w_fn, old_p, new_p, old_x, new_x, key=jax.random.key(5))
  assert check.ok, (check, surgery.report)
  assert surgery.report.preserved is True, surgery.report
  w_old, w_new = np.asarray(old_p["w"]).reshape(3, 4), np.asarray(new_p["w"]).reshape(4, 4)
  np.testing.assert_array_equal(w_new[[0, 2, 3]], w_old)
  np.testing.assert_array_equal(w_new[1], 0)  # the new feature's row: zero in


_OUT_PROJ = {
    "reshape": lambda w: w.reshape(4, 4),  # the fresh output projection is stored flat
    "tanh_reshape": lambda w: jnp.tanh(w).reshape(4, 4),
    "reshape_tanh": lambda w: jnp.tanh(w.reshape(2, 8)).reshape(4, 4),
}


def _res_fn(nblocks, proj="reshape"):
  def fn(p, x):
    h = jnp.tanh(x @ p["w_in"])
    for i in range(1, nblocks):
      b = p[f"block{i}"]
      h = h + jnp.tanh(h @ b["w1"]) @ _OUT_PROJ[proj](b["w2"])
    return h @ p["w_out"]
  return fn


def _res_params(key, nblocks):
  k = jax.random.split(key, 2 + 2 * nblocks)
  p = {"w_in": jax.random.normal(k[0], (3, 4)), "w_out": jax.random.normal(k[1], (4, 2))}
  for i in range(1, nblocks):
    p[f"block{i}"] = {"w1": jax.random.normal(k[2 * i], (4, 4)), "w2": jax.random.normal(k[2 * i + 1], (16,))}
  return p


@pytest.mark.parametrize("proj", sorted(_OUT_PROJ))
def test_inserted_block_with_a_fresh_parameter_reshaped_before_product(proj):
  old_p, new_init = _res_params(jax.random.key(0), 1), _res_params(jax.random.key(1), 2)
  spec = js.Features(["a", "b", "c"])
  x = jnp.ones((2, 3))
  old_t = js.dependency_table(_res_fn(1, proj), old_p, x, spec, strict=True)
  new_t = js.dependency_table(_res_fn(2, proj), new_init, x, spec, strict=True)
  surgery = js.plan(old_t, new_t)
  assert surgery.report.preserved is True, surgery.report
  new_p = surgery(old_p, new_init)
  np.testing.assert_array_equal(np.asarray(new_p["block1"]["w2"]), 0)  # zeroed through the reshape
  np.testing.assert_array_equal(np.asarray(new_p["block1"]["w1"]), np.asarray(new_init["block1"]["w1"]))
  check = js.verify(surgery, _res_fn(1, proj), _res_fn(2, proj), old_p, new_p, x, x, key=jax.random.key(5))
  assert check.ok, check


# -- scan: the time direction ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_like_scan_is_sound(reverse):
  # ys[t] depends on xs[:t+1] (forward) or xs[t:] (reverse); the rules may be coarser, never finer
  f = lambda x: lax.scan(lambda c, xt: (c + xt, c + xt), jnp.zeros(2), x.reshape(5, 2), reverse=reverse)
  assert_contains(forward_pattern(f, 10), jacobian_pattern(f, 10), f"cumsum scan reverse={reverse}")


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_parameter_met_at_the_first_step_only(reverse):
  # carry starts at zero and accumulates features; the per-step weight w[t] multiplies the carry *before* step t
  # adds x[t]: the weight of the first step executed (t = 0 forward, t = T - 1 reverse) meets nothing
  T = 5

  def fn(p, x):
    def body(c, xw):
      xt, wt = xw
      return c + xt, c * wt
    return lax.scan(body, jnp.zeros(2), (x.reshape(T, 2), p["w"]), reverse=reverse)[1]

  table = check_touches(fn, {"w": jnp.zeros((T, 2))}, 2 * T, exact=False)
  first = T - 1 if reverse else 0
  touch = table.mask("w")
  assert not touch[first].any(), touch.any(-1)
  assert touch[[t for t in range(T) if t != first]].any(-1).all()
  assert_contains(forward_pattern(lambda x: fn({"w": jnp.ones((T, 2))}, x), 2 * T),
                  jacobian_pattern(lambda x: fn({"w": jnp.ones((T, 2))}, x), 2 * T))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_output_of_the_first_step_reads_the_initial_carry_only(reverse):
  # ys[step 0] is the initial carry: exact at level 0, at the right end of the time axis
  T = 4
  f = lambda x: lax.scan(lambda c, xt: (xt, c), x[:2], x[2:].reshape(T, 2), reverse=reverse)[1]
  fw = forward_pattern(f, 2 + 2 * T).reshape(T, 2, 2 + 2 * T)
  assert_contains(fw.reshape(2 * T, -1), jacobian_pattern(f, 2 + 2 * T))
  first = T - 1 if reverse else 0
  assert (fw[first] == np.eye(2, 2 + 2 * T, dtype=bool)).all(), fw[first].astype(int)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_per_step_weights_touch_direction(reverse):
  # ys[t] = xs[t] * w[t] with a constant carry: w[t] meets exactly x[t] (soundness), in both directions
  T = 4
  fn = lambda p, x: lax.scan(lambda c, xw: (c, xw[0] * xw[1] + c), 0.0, (x.reshape(T, 2), p["w"]),
                             reverse=reverse)[1]
  check_touches(fn, {"w": jnp.zeros((T, 2))}, 2 * T, exact=False)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_steady_after_one_level_reads_every_later_step(reverse):
  # the carry is steady from level 1 on: iteration 1 stands for every later step, so it must read xs of all of
  # them (steps >= 1: rows 1.. forward, rows ..T-2 reversed), not the steps before it
  T = 5
  f = lambda x: lax.scan(lambda c, xt: ((c[0], c[0]), xt * 2.0 + c[1]), (x[0], 0.0), x[1:], reverse=reverse)[1]
  assert_contains(forward_pattern(f, T + 1), jacobian_pattern(f, T + 1), f"steady scan reverse={reverse}")


# -- fixed points that need several levels -----------------------------------------------------------------------------

def test_scan_shift_register_reaches_its_fixed_point():
  # carry = roll(carry, 1).at[0].set(x_t): x_t reaches carry[j] after j more steps
  f = lambda x: lax.scan(lambda c, xt: (jnp.roll(c, 1).at[0].set(xt), c), jnp.zeros(4), x)
  assert_contains(forward_pattern(f, 6), jacobian_pattern(f, 6), "scan shift register")


def test_while_shift_register_reaches_its_fixed_point():
  # after 3 trips carry[3] holds x[0]: three levels of the fixed point are needed
  f = lambda x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.roll(c[1], 1).at[0].set(1.0)),
                               (0, x))[1]
  fw = forward_pattern(f, 4)
  assert_contains(fw, jacobian_pattern(f, 4), "while shift register")
  assert fw[3, 0]


def test_fori_shift_register_touches_a_parameter_several_levels_down():
  # the parameter multiplies carry[3] only; x[0] reaches carry[3] after three trips
  fn = lambda p, x: lax.fori_loop(0, 4, lambda i, c: jnp.roll(c, 1).at[0].set(1.0).at[3].multiply(p["w"]), x)
  table = check_touches(fn, {"w": jnp.zeros(())}, 4, exact=False)
  assert table.mask("w")[0]


# -- verify: several outputs ------------------------------------------------------------------------------------------

def _two_out(p, x):
  h = jnp.tanh(x @ p["w"])
  return {"logits": h @ p["v"], "value": h.sum(-1)}


def test_verify_reports_the_output_that_changed():
  k = jax.random.split(jax.random.key(6), 2)
  p = {"w": jax.random.normal(k[0], (3, 4)), "v": jax.random.normal(k[1], (4, 2))}
  x = jnp.ones((2, 3))
  spec = js.Features(["a", "b", "c"])
  t = js.dependency_table(_two_out, p, x, spec, strict=True)
  surgery = js.plan(t, t)
  same = js.verify(surgery, _two_out, _two_out, p, surgery(p, p), x, x, key=jax.random.key(0))
  assert same.ok and len(same.max_abs_diff) == 2, same

  def changed(p, x):
    out = _two_out(p, x)
    return {"logits": out["logits"], "value": out["value"] * 1.5}

  check = js.verify(surgery, _two_out, changed, p, surgery(p, p), x, x, key=jax.random.key(0))
  assert not check.ok, check
  bad = [path for path, d in check.max_abs_diff.items() if d > check.atol]
  assert len(bad) == 1 and "value" in str(bad[0]), check.max_abs_diff
  good = [path for path, d in check.max_abs_diff.items() if d <= check.atol]
  assert len(good) == 1 and "logits" in str(good[0]), check.max_abs_diff


def test_verify_a_nan_on_one_side_is_a_difference():
  k = jax.random.split(jax.random.key(6), 2)
  p = {"w": jax.random.normal(k[0], (3, 4)), "v": jax.random.normal(k[1], (4, 2))}
  x = jnp.ones((2, 3))
  t = js.dependency_table(_two_out, p, x, js.Features(["a", "b", "c"]), strict=True)
  surgery = js.plan(t, t)

  def nan_value(p, x):
    out = _two_out(p, x)
    return {"logits": out["logits"], "value": out["value"] * jnp.nan}

  check = js.verify(surgery, _two_out, nan_value, p, p, x, x, key=jax.random.key(0))
  assert not check.ok and np.isinf(max(check.max_abs_diff.values())), check
  both = js.verify(surgery, nan_value, nan_value, p, p, x, x, key=jax.random.key(0))
  assert both.ok, both  # NaN on both sides is the same value


def test_verify_takes_the_worst_sample_not_the_last():
  from jaxsurgery._src.surgery.verify import matched_inputs
  k = jax.random.split(jax.random.key(6), 2)
  p = {"w": jax.random.normal(k[0], (3, 4)), "v": jax.random.normal(k[1], (4, 2))}
  x = jnp.ones((2, 3))
  spec = js.Features(["a", "b", "c"])
  t = js.dependency_table(_two_out, p, x, spec, strict=True)
  surgery = js.plan(t, t)
  key, samples = jax.random.key(1), 4
  firsts = [float(matched_inputs(kk, t.spec, t.spec, x, x, {})[1][0, 0]) for kk in jax.random.split(key, samples)]
  top = int(np.argmax(firsts))
  assert top != samples - 1  # the key is chosen so that the one differing draw is not the last
  hi = firsts[top]

  def differs_on_one_draw(p, x):
    out = _two_out(p, x)
    return {"logits": out["logits"], "value": out["value"] + (x[0, 0] >= hi)}

  check = js.verify(surgery, _two_out, differs_on_one_draw, p, p, x, x, key=key, samples=samples)
  assert not check.ok, check


# -- plans: which side is zeroed, the zero masks, constants --------------------------------------------------------

def test_random_in_zero_out_zeroes_the_kernel_side_when_both_are_parameters():
  # x @ (a @ b) with the hidden width 4 -> 6: both factors are fresh at the new units; the kernel (b) is zeroed
  fn = lambda p, x: x @ (p["a"] @ p["b"])
  k = jax.random.split(jax.random.key(0), 4)
  old_p = {"a": jax.random.normal(k[0], (3, 4)), "b": jax.random.normal(k[1], (4, 2))}
  new_init = {"a": jax.random.normal(k[2], (3, 6)), "b": jax.random.normal(k[3], (6, 2))}
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  surgery = js.plan(js.dependency_table(fn, old_p, x, spec), js.dependency_table(fn, new_init, x, spec))
  assert surgery.report.preserved is True, surgery.report
  new_p = surgery(old_p, new_init)
  np.testing.assert_array_equal(np.asarray(new_p["b"])[4:], 0)
  np.testing.assert_array_equal(np.asarray(new_p["a"])[:, 4:], np.asarray(new_init["a"])[:, 4:])


def test_leaf_zero_masks_mark_the_new_positions_of_every_zeroed_axis():
  # x^T W x with a feature inserted at 1: W's new row and new column are zero, and LeafPlan.zero says so
  fn = lambda p, x: jnp.einsum("bi,ij,bj->b", x, p["w"], x)
  k = jax.random.split(jax.random.key(0), 2)
  old_p, new_init = {"w": jax.random.normal(k[0], (3, 3))}, {"w": jax.random.normal(k[1], (4, 4))}
  xo, xn = jnp.ones((2, 3)), jnp.ones((2, 4))
  surgery = js.plan(js.dependency_table(fn, old_p, xo, js.Features(["a", "b", "c"])),
                    js.dependency_table(fn, new_init, xn, js.Features(["a", "new", "b", "c"])))
  assert surgery.report.preserved is True, surgery.report
  leaf = {l.path: l for l in surgery.report.leaves}["w"]
  want = np.zeros((4, 4), bool)
  want[1, :] = want[:, 1] = True
  assert set(leaf.zero_axes) == {0, 1}
  np.testing.assert_array_equal(np.broadcast_to(leaf.zero, (4, 4)), want)
  new_p = surgery(old_p, new_init)
  np.testing.assert_array_equal(np.asarray(new_p["w"])[want], 0)
  assert js.verify(surgery, fn, fn, old_p, new_p, xo, xn, key=jax.random.key(0)).ok


def test_leaf_zero_mask_of_a_moved_feature_row():
  k = jax.random.split(jax.random.key(3), 3)
  old_p = {"w": jax.random.normal(k[0], (3, 2, 5)), "b": jax.random.normal(k[1], (2, 5))}
  new_init = {"w": jax.random.normal(k[2], (4, 2, 5)), "b": jnp.zeros((2, 5))}
  old_t = js.dependency_table(_transposed_fn, old_p, jnp.ones((2, 3)), js.Features(["a", "b", "c"]))
  new_t = js.dependency_table(_transposed_fn, new_init, jnp.ones((2, 4)), js.Features(["c", "a", "new", "b"]))
  leaf = {l.path: l for l in js.plan(old_t, new_t).report.leaves}["w"]
  zero = np.broadcast_to(leaf.zero, (4, 2, 5))
  assert zero[2].all() and not zero[[0, 1, 3]].any()


def test_a_changed_constant_over_an_old_zero_is_not_a_rescaling():
  # the new constant agrees with the old one (ratio 1) except where the old one is zero: not preserved
  p = {"w": jax.random.normal(jax.random.key(0), (3, 4))}
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  old_fn = lambda p, x: jnp.tanh(x @ p["w"]) * jnp.asarray([1.0, 0.0, 2.0, 1.0])
  new_fn = lambda p, x: jnp.tanh(x @ p["w"]) * jnp.asarray([1.0, 3.0, 2.0, 1.0])
  surgery = js.plan(js.dependency_table(old_fn, p, x, spec), js.dependency_table(new_fn, p, x, spec))
  new_p = surgery(p, p)
  assert not js.verify(surgery, old_fn, new_fn, p, new_p, x, x, key=jax.random.key(0)).ok
  assert surgery.report.preserved is not True, surgery.report


def test_remap_state_an_integer_leaf_shaped_like_a_parameter_is_not_its_image():
  # an int32 state leaf under a float parameter's path and shape: taken from the init, not remapped
  fn = lambda p, x: jnp.tanh(x @ p["w"])
  old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.zeros((3, 3))}
  old = js.dependency_table(fn, old_p, jnp.ones((1, 2)), js.Features(["hp", "mana"]))
  new = js.dependency_table(fn, new_init, jnp.ones((1, 3)), js.Features(["hp", "armor", "mana"]))
  surgery = js.plan(old, new)
  old_state = {"params": old_p, "flags": {"w": jnp.ones((2, 3), jnp.int32)}}
  new_state = {"params": new_init, "flags": {"w": jnp.zeros((3, 3), jnp.int32)}}
  out, report = js.remap_state(surgery, old_state, new_state, return_report=True)
  kinds = {l.path: l.kind for l in report.leaves}
  assert kinds == {"flags/w": "reset", "params/w": "remapped"}, kinds
  np.testing.assert_array_equal(np.asarray(out["flags"]["w"]), 0)


def _product_transposed_fn(p, x):
  # as _tanh_transposed_fn, but the transposed value is a product of two parameters: it has no parameter origin, so
  # the zero demand on its hidden axis is pulled back through the (non-involutive) transpose as a slab
  return jnp.einsum("bh,hok->bok", jnp.tanh(x @ p["w1"]), jnp.tanh(jnp.transpose(p["w2"] * p["g"], (2, 0, 1))))


def test_slab_demand_pulled_back_through_a_non_involutive_transpose():
  k = jax.random.split(jax.random.key(0), 6)
  old_p = {"w1": jax.random.normal(k[0], (3, 4)), "w2": jax.random.normal(k[1], (2, 5, 4)),
           "g": jax.random.normal(k[2], (2, 5, 4))}
  new_init = {"w1": jax.random.normal(k[3], (3, 6)), "w2": jax.random.normal(k[4], (2, 5, 6)),
              "g": jax.random.normal(k[5], (2, 5, 6))}
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  surgery = js.plan(js.dependency_table(_product_transposed_fn, old_p, x, spec, strict=True),
                    js.dependency_table(_product_transposed_fn, new_init, x, spec, strict=True))
  assert surgery.report.preserved is True, surgery.report
  new_p = surgery(old_p, new_init)
  zeroed = [n for n in ("w2", "g") if not np.asarray(new_p[n])[..., 4:].any()]
  assert zeroed, "one factor's new hidden slab must be zero"
  check = js.verify(surgery, _product_transposed_fn, _product_transposed_fn, old_p, new_p, x, x,
                    key=jax.random.key(1))
  assert check.ok, check


# -- non-finite values at new positions ---------------------------------------------------------------------------

def _inverse_scale_fn(n_old):
  def fn(p, x):
    d = 1.0 / jnp.pad(p["s"], (0, p["w1"].shape[1] - n_old))   # inf on the new hidden units
    return jnp.tanh(x @ p["w1"]) @ (p["w2"] * d[:, None])
  return fn


def test_a_zero_times_a_non_finite_value_is_not_zero():
  # widening 4 -> 6: the new rows of w2 are scaled by 1/0 = inf, so zeroing them (or w1's new columns) gives NaN
  fn = _inverse_scale_fn(4)
  k = jax.random.split(jax.random.key(0), 5)
  old_p = {"w1": jax.random.normal(k[0], (3, 4)), "w2": jax.random.normal(k[1], (4, 2)),
           "s": 1 + jax.random.uniform(k[2], (4,))}
  new_init = {"w1": jax.random.normal(k[3], (3, 6)), "w2": jax.random.normal(k[4], (6, 2)), "s": jnp.ones(4)}
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  surgery = js.plan(js.dependency_table(fn, old_p, x, spec, strict=True),
                    js.dependency_table(fn, new_init, x, spec, strict=True))
  assert surgery.report.preserved is not True, surgery.report
  assert any("non-finite" in r and "dot_general" in r for r in surgery.report.reasons), surgery.report.reasons
  assert not js.verify(surgery, fn, fn, old_p, surgery(old_p, new_init), x, x, key=jax.random.key(1)).ok


@pytest.mark.parametrize("op", ["rsqrt", "log", "divide"])
def test_a_partial_op_on_fresh_values_is_a_stated_assumption(op):
  # a widened running variance under rsqrt (batch norm at inference), a log, a division: the proof holds only if
  # the fresh values stay inside the op's domain, and the report says so, naming the op
  f = {"rsqrt": lambda v: jax.lax.rsqrt(v + 1e-5), "log": lambda v: jnp.log(v), "divide": lambda v: 1.0 / v}[op]
  fn = lambda p, x: (jnp.tanh(x @ p["w1"]) * f(p["var"])) @ p["w2"]
  k = jax.random.split(jax.random.key(0), 4)
  old_p = {"w1": jax.random.normal(k[0], (3, 4)), "var": jnp.full((4,), 2.0), "w2": jax.random.normal(k[1], (4, 2))}
  new_init = {"w1": jax.random.normal(k[2], (3, 6)), "var": jnp.ones((6,)), "w2": jax.random.normal(k[3], (6, 2))}
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  surgery = js.plan(js.dependency_table(fn, old_p, x, spec, strict=True),
                    js.dependency_table(fn, new_init, x, spec, strict=True))
  assert surgery.report.preserved is True, surgery.report
  prim = {"rsqrt": "rsqrt", "log": "log", "divide": "div"}[op]
  assert any(f"`{prim}` at" in a and "domain" in a for a in surgery.report.assumptions), surgery.report.assumptions
  assert js.verify(surgery, fn, fn, old_p, surgery(old_p, new_init), x, x, key=jax.random.key(1)).ok
