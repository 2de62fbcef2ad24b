"""Regressions for issue 15: one test per item, each on a model of the same kind as the issue's
example but not the same one, and every failure the surgery fuzzer found (tests/fuzz_models.py).

Tests of behaviour still wrong are ``xfail(strict=True)`` with the item and what is
wrong: when a fix lands, the mark fails and must be removed.
"""

import warnings

import fuzz_models as fm
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsurgery as js
import jaxsurgery.flax as jsf

KEY = jax.random.key(0)
ATOL = 1e-5


def rand(rng, shape, scale=0.5):
  """Random values from numpy (jax.random would compile a program per shape)."""
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def plan(old_fn, new_fn, old_p, new_init, old_x, new_x, old_spec, new_spec, *, rename=None):
  """Tables (strict: no unknown primitive), plan and the transferred parameters."""
  old_t = js.dependency_table(old_fn, old_p, old_x, old_spec, strict=True)
  new_t = js.dependency_table(new_fn, new_init, new_x, new_spec, strict=True)
  surgery = js.plan(old_t, new_t, rename=rename)
  return surgery, surgery(old_p, new_init)


def assert_claim_holds(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x, *, must_preserve=False):
  """``report.preserved is True`` is a proof: verify must agree; nothing trained may be dropped then."""
  report = surgery.report
  if must_preserve:
    assert report.preserved is True, report
  if report.preserved is True:
    assert not report.dropped_elements(), ("preserved while dropping", report.dropped_elements())
    check = js.verify(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x, key=jax.random.key(3), samples=2,
                      atol=ATOL)
    assert check.ok, (check, report)


def fill(abstract, seed):
  """Concrete random values for an abstract tree (``jax.eval_shape`` of a library's init): every
  element differs, so misplaced ones show, and nothing is compiled per shape."""
  r = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda a: rand(r, a.shape), abstract)


def positions(old_names, new_names):
  """new index -> old index of the same feature (-1: new)."""
  return np.array([old_names.index(n) if n in old_names else -1 for n in new_names])


def assert_rows_follow(new, old, src, axis=0, up_to_scale=False):
  """Along ``axis``, every new index with a source holds exactly the old index's values (with
  ``up_to_scale``: times one positive factor for the whole leaf, as a widening recipe rescales gains)."""
  new, old = np.moveaxis(np.asarray(new), axis, 0), np.moveaxis(np.asarray(old), axis, 0)
  scale = 1.0
  if up_to_scale:
    j0 = next(j for j in src if j >= 0)
    scale = float(np.ravel(new[list(src).index(j0)])[0] / np.ravel(old[j0])[0])
    assert scale > 0, scale
  for i, j in enumerate(src):
    if j >= 0:
      np.testing.assert_allclose(new[i], scale * old[j], rtol=1e-6 if up_to_scale else 0,
                                 err_msg=f"new index {i} should hold old index {j}")


# -- 0. features behind a LayerNorm or a residual over the feature axis --------------------

def norm_then_linear(nin, nout, seed):
  """An NNX LayerNorm over the input features, then a linear layer (random scale and bias)."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(nin, rngs=rngs)
      self.out = nnx.Linear(nin, nout, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.out(self.norm(x)))

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(seed))))
  return nnx.merge(graphdef, fill(state, seed))


def test_0_reordered_features_in_front_of_nnx_layernorm_move_with_their_names():
  from flax import nnx
  old_names, new_names = ["hp", "mana", "x", "y", "armor"], ["y", "hp", "armor", "mana", "x"]
  old, new = norm_then_linear(5, 3, 0), norm_then_linear(5, 3, 1)
  x = jax.ShapeDtypeStruct((4, 5), jnp.float32)
  surgery = jsf.plan_nnx(old, new, x, x, js.Features(old_names), js.Features(new_names))
  jsf.transplant(surgery, old, new)
  src = positions(old_names, new_names)
  before, after = nnx.to_pure_dict(nnx.state(old)), nnx.to_pure_dict(nnx.state(new))
  for layer, name in (("norm", "scale"), ("norm", "bias"), ("out", "kernel")):
    assert_rows_follow(after[layer][name], before[layer][name], src)
  assert surgery.report.preserved is True  # a permutation of the features is exact
  assert jsf.verify_nnx(surgery, old, new, x, x, key=KEY, atol=ATOL).ok


def layernorm_dense(p, x):
  mu = x.mean(-1, keepdims=True)
  z = (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["gain"] + p["bias"]
  return jnp.tanh(z @ p["w"] + p["b"]).sum(1)  # (B, T, F) -> (B, H)


def ln_params(key, nf, h=3):
  r = np.random.default_rng(key)
  return {"gain": 1 + rand(r, (nf,)), "bias": rand(r, (nf,)), "w": rand(r, (nf, h)), "b": rand(r, (h,))}


def test_0_feature_inserted_in_front_of_a_sequence_layernorm_shifts_its_rows():
  old_names, new_names = ["a", "b", "c", "d"], ["a", "b", "new", "c", "d"]
  old_p, new_init = ln_params(0, 4), ln_params(1, 5)
  old_x, new_x = jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5))
  surgery, new_p = plan(layernorm_dense, layernorm_dense, old_p, new_init, old_x, new_x,
                        js.Features(old_names), js.Features(new_names))
  src = positions(old_names, new_names)
  assert_rows_follow(new_p["gain"], old_p["gain"], src, up_to_scale=True)  # a recipe may rescale the gains
  for name in ("bias", "w"):
    assert_rows_follow(new_p[name], old_p[name], src)
  assert_claim_holds(surgery, layernorm_dense, layernorm_dense, old_p, new_p, old_x, new_x)


def residual_over_features(p, x):
  """Features on axis 0 of the input leaf; ``h + block(h)`` over them, then a head."""
  h = x.T
  h = h + jax.nn.relu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return h @ p["head"]


def res_params(key, nf, inner=3, out=2):
  r = np.random.default_rng(key)
  return {"w1": rand(r, (nf, inner)), "b1": rand(r, (inner,)), "w2": rand(r, (inner, nf)),
          "b2": rand(r, (nf,)), "head": rand(r, (nf, out))}


def check_residual_placement(old_p, new_p, src):
  assert_rows_follow(new_p["w1"], old_p["w1"], src)
  assert_rows_follow(new_p["w2"], old_p["w2"], src, axis=1)
  assert_rows_follow(new_p["b2"], old_p["b2"], src)
  assert_rows_follow(new_p["head"], old_p["head"], src)


def test_0_residual_over_features_reordered():
  old_names, new_names = ["a", "b", "c", "d"], ["c", "a", "d", "b"]
  old_p, new_init = res_params(0, 4), res_params(1, 4)
  x = jnp.ones((4, 2))
  spec_old, spec_new = js.Features(old_names, axis=0), js.Features(new_names, axis=0)
  surgery, new_p = plan(residual_over_features, residual_over_features, old_p, new_init, x, x, spec_old, spec_new)
  check_residual_placement(old_p, new_p, positions(old_names, new_names))
  assert_claim_holds(surgery, residual_over_features, residual_over_features, old_p, new_p, x, x,
                     must_preserve=True)


def test_0_residual_over_features_with_an_inserted_feature():
  old_names, new_names = ["a", "b", "c"], ["a", "new", "b", "c"]
  old_p, new_init = res_params(0, 3), res_params(1, 4)
  old_x, new_x = jnp.ones((3, 2)), jnp.ones((4, 2))
  surgery, new_p = plan(residual_over_features, residual_over_features, old_p, new_init, old_x, new_x,
                        js.Features(old_names, axis=0), js.Features(new_names, axis=0))
  check_residual_placement(old_p, new_p, positions(old_names, new_names))
  assert_claim_holds(surgery, residual_over_features, residual_over_features, old_p, new_p, old_x, new_x)


# -- 1. rows the example input does not reach --------------------------------------------

def tokens_and_positions(p, ids):
  t = ids.shape[1]
  h = p["tok"][ids] + jnp.take(p["pos"], jnp.arange(t), axis=0)
  return jnp.tanh(h @ p["w"]).mean(1) @ p["head"]


def pos_params(key, vocab, rows=10, d=4):
  r = np.random.default_rng(key)
  return {"tok": rand(r, (vocab, d)), "pos": rand(r, (rows, d)), "w": rand(r, (d, d)),
          "head": rand(r, (d, 2))}


def test_1_positional_rows_beyond_the_traced_length_are_kept():
  old_p, new_init = pos_params(0, 7), pos_params(1, 9)  # the vocabulary grows 7 -> 9
  ids = jax.ShapeDtypeStruct((2, 6), jnp.int32)  # traced with 6 of 10 positions
  surgery, new_p = plan(tokens_and_positions, tokens_and_positions, old_p, new_init, ids, ids, "tok", "tok")
  dropped = surgery.report.dropped_elements()
  assert "pos" not in dropped, f"{int(dropped['pos'].sum())} trained positional elements dropped"
  np.testing.assert_array_equal(np.asarray(new_p["pos"]), np.asarray(old_p["pos"]))
  np.testing.assert_array_equal(np.asarray(new_p["tok"])[:7], np.asarray(old_p["tok"]))
  assert not any("'pos' grew" in r for r in surgery.report.reasons), surgery.report.reasons
  # the full table: positions 6..9 too
  long_ids = jnp.asarray(np.random.default_rng(2).integers(0, 7, (3, 10)), jnp.int32)
  np.testing.assert_allclose(tokens_and_positions(new_p, long_ids), tokens_and_positions(old_p, long_ids), atol=ATOL)
  assert_claim_holds(surgery, tokens_and_positions, tokens_and_positions, old_p, new_p, ids, ids)


def with_token_types(p, ids, types=None):
  types = jnp.zeros_like(ids) if types is None else types  # the default: every token in segment 0
  h = p["tok"][ids] + p["type"][types]
  return jnp.tanh(h @ p["w"]).sum(1) @ p["head"]


def type_params(key, hidden, d=3):
  r = np.random.default_rng(key)
  return {"tok": rand(r, (6, d)), "type": rand(r, (3, d)), "w": rand(r, (d, hidden)),
          "head": rand(r, (hidden, 2))}


def test_1_token_type_rows_unreached_by_the_default_ids_are_kept():
  old_p, new_init = type_params(0, 4), type_params(1, 6)  # the hidden layer widens 4 -> 6
  ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
  surgery, new_p = plan(with_token_types, with_token_types, old_p, new_init, ids, ids, "tok", "tok")
  assert "type" not in surgery.report.dropped_elements()
  np.testing.assert_array_equal(np.asarray(new_p["type"]), np.asarray(old_p["type"]))
  assert not any("'type' grew" in r for r in surgery.report.reasons), surgery.report.reasons  # it did not grow
  segment_b = jnp.full((2, 5), 2, jnp.int32)
  real_ids = jnp.asarray(np.random.default_rng(2).integers(0, 6, (2, 5)), jnp.int32)
  np.testing.assert_allclose(with_token_types(new_p, real_ids, segment_b), with_token_types(old_p, real_ids, segment_b),
                             atol=ATOL)
  assert_claim_holds(surgery, with_token_types, with_token_types, old_p, new_p, ids, ids)


# -- 2. conv widening on its own -------------------------------------------------------------

CONV_LAYOUTS = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}


def conv_pair(layout, *, groups=1, stride=1, dilation=1):
  """Two stacked convs; the first one (``groups=0``: depthwise) is the one widened."""
  dn = CONV_LAYOUTS[layout]

  def fn(p, x):
    cin = x.shape[-1] if layout == "NHWC" else x.shape[1]
    y = jax.lax.conv_general_dilated(x, p["k1"], (stride, stride), "SAME", rhs_dilation=(dilation, dilation),
                                     dimension_numbers=dn, feature_group_count=cin if groups == 0 else groups)
    y = jax.nn.relu(y + (p["b1"] if layout == "NHWC" else p["b1"][:, None, None]))
    y = jax.lax.conv_general_dilated(y, p["k2"], (1, 1), "SAME", dimension_numbers=dn)
    return y.mean((1, 2) if layout == "NHWC" else (2, 3))
  return fn


def conv_params(key, layout, cin, cout, groups):
  g = cin if groups == 0 else groups
  r = np.random.default_rng(key)
  k1 = rand(r, (3, 3, cin // g, cout)) if layout == "NHWC" else rand(r, (cout, cin // g, 3, 3))
  k2 = rand(r, (3, 3, cout, 2)) if layout == "NHWC" else rand(r, (2, cout, 3, 3))
  return {"k1": k1, "b1": rand(r, (cout,)), "k2": k2}


def grouped_map(cout_old, cout_new, groups):
  """new channel -> old channel: each group keeps its old channels first."""
  old_pg, new_pg = cout_old // groups, cout_new // groups
  return np.array([(o // new_pg) * old_pg + o % new_pg if o % new_pg < old_pg else -1 for o in range(cout_new)])


CONV_CASES = [  # layout, groups, stride, dilation, cin, cout old -> new
    ("NHWC", 1, 1, 1, 3, 3, 5),
    ("NCHW", 1, 1, 1, 2, 4, 5),
    ("NHWC", 2, 1, 1, 4, 4, 6),
    ("NCHW", 2, 1, 1, 2, 2, 4),
    ("NHWC", 0, 1, 1, 3, 3, 6),
    ("NCHW", 0, 1, 1, 2, 4, 6),
    ("NHWC", 1, 2, 2, 2, 3, 4),
    ("NCHW", 1, 2, 1, 3, 2, 3),
]


@pytest.mark.parametrize("layout,groups,stride,dilation,cin,c_old,c_new", CONV_CASES,
                         ids=[f"{c[0]}-g{c[1]}-s{c[2]}-d{c[3]}" for c in CONV_CASES])
def test_2_widening_a_conv_alone(layout, groups, stride, dilation, cin, c_old, c_new):
  fn = conv_pair(layout, groups=groups, stride=stride, dilation=dilation)
  old_p, new_init = conv_params(0, layout, cin, c_old, groups), conv_params(1, layout, cin, c_new, groups)
  shape = (1, 5, 5, cin) if layout == "NHWC" else (1, cin, 5, 5)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  spec = js.Features([f"c{i}" for i in range(cin)], axis=-1 if layout == "NHWC" else 1)
  surgery, new_p = plan(fn, fn, old_p, new_init, x, x, spec, spec)
  g = cin if groups == 0 else groups
  out_map = grouped_map(c_old, c_new, g)
  o_axis, i_axis = (3, 2) if layout == "NHWC" else (0, 1)
  assert_rows_follow(new_p["k1"], old_p["k1"], out_map, axis=o_axis)
  assert_rows_follow(new_p["b1"], old_p["b1"], out_map)
  assert_rows_follow(new_p["k2"], old_p["k2"], out_map, axis=i_axis)
  assert_claim_holds(surgery, fn, fn, old_p, new_p, x, x, must_preserve=True)


def conv_flatten_dense(layout):
  dn = CONV_LAYOUTS[layout]

  def fn(p, x):
    y = jax.lax.conv_general_dilated(x, p["k"], (2, 2), "SAME", dimension_numbers=dn)
    y = jnp.tanh(y + (p["b"] if layout == "NHWC" else p["b"][:, None, None]))
    return y.reshape(y.shape[0], -1) @ p["dense"]
  return fn


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_2_last_conv_before_a_flatten_into_dense(layout):
  """The dense rows interleave pixels and channels: NHWC rows are (pixel, channel), NCHW (channel, pixel)."""
  fn, cin, pix = conv_flatten_dense(layout), 2, 9  # 6x6 input, stride 2: 3x3 pixels

  def params(key, c):
    r = np.random.default_rng(key)
    kern = rand(r, (3, 3, cin, c)) if layout == "NHWC" else rand(r, (c, cin, 3, 3))
    return {"k": kern, "b": rand(r, (c,)), "dense": rand(r, (pix * c, 2))}
  old_p, new_init = params(0, 2), params(1, 3)
  x = jax.ShapeDtypeStruct((1, 6, 6, cin) if layout == "NHWC" else (1, cin, 6, 6), jnp.float32)
  spec = js.Features(["r", "g"], axis=-1 if layout == "NHWC" else 1)
  surgery, new_p = plan(fn, fn, old_p, new_init, x, x, spec, spec)
  if layout == "NHWC":
    rows = np.array([p * 2 + c if c < 2 else -1 for p in range(pix) for c in range(3)])
  else:
    rows = np.array([c * pix + p if c < 2 else -1 for c in range(3) for p in range(pix)])
  assert_rows_follow(new_p["dense"], old_p["dense"], rows)
  assert_claim_holds(surgery, fn, fn, old_p, new_p, x, x, must_preserve=True)


# -- 3. fused gates cut by uneven splits -----------------------------------------------------

def candidate_first_gru(p, xs):
  """A GRU whose fused axis is [candidate | update, reset]: cut [H | 2H], then the 2H part in halves."""
  hidden = p["wh"].shape[0]

  def cell(h, x):
    a_x, zr_x = jnp.split(x @ p["wi"], [hidden], axis=-1)
    wh_a, wh_zr = jnp.split(p["wh"], [hidden], axis=1)
    b_a, b_zr = jnp.split(p["b"], [hidden])
    z, r = jnp.split(jax.nn.sigmoid(zr_x + h @ wh_zr + b_zr), 2, axis=-1)
    h = (1 - z) * h + z * jnp.tanh(a_x + (r * h) @ wh_a + b_a)
    return h, h
  h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[0], hidden)), jnp.swapaxes(xs, 0, 1))
  return h @ p["head"]


def gru_params(key, nin, hidden):
  r = np.random.default_rng(key)
  return {"wi": rand(r, (nin, 3 * hidden)), "wh": rand(r, (hidden, 3 * hidden)), "b": rand(r, (3 * hidden,)),
          "head": rand(r, (hidden, 2))}


def gate_map(h_old, h_new, gates=3):
  return np.array([g * h_old + j if j < h_old else -1 for g in range(gates) for j in range(h_new)])


def test_3_plain_jax_gru_with_nested_uneven_splits():
  old_p, new_init = gru_params(0, 2, 2), gru_params(1, 3, 3)
  old_x, new_x = jnp.ones((2, 4, 2)), jnp.ones((2, 4, 3))
  surgery, new_p = plan(candidate_first_gru, candidate_first_gru, old_p, new_init, old_x, new_x,
                        js.Features(["u", "v"]), js.Features(["u", "w", "v"]))
  cols = gate_map(2, 3)
  assert_rows_follow(np.asarray(new_p["wi"])[[0, 2]], old_p["wi"], cols, axis=1)
  assert_rows_follow(new_p["wh"][:2], old_p["wh"], cols, axis=1)
  assert_rows_follow(new_p["b"], old_p["b"], cols)
  assert_claim_holds(surgery, candidate_first_gru, candidate_first_gru, old_p, new_p, old_x, new_x,
                     must_preserve=True)


def haiku_gru(hidden):
  import haiku as hk

  def f(xs):
    core = hk.GRU(hidden)
    ys, _ = hk.dynamic_unroll(core, jnp.swapaxes(xs, 0, 1), core.initial_state(xs.shape[0]))
    return hk.Linear(2)(ys[-1])
  return hk.without_apply_rng(hk.transform(f))


def test_3_haiku_gru_widened_keeps_each_gate():
  old_m, new_m = haiku_gru(3), haiku_gru(4)
  x = jnp.ones((2, 3, 2))
  old_p = fill(jax.eval_shape(old_m.init, KEY, x), 1)
  new_init = fill(jax.eval_shape(new_m.init, KEY, x), 2)
  spec = js.Features(["a", "b"])
  surgery, new_p = plan(old_m.apply, new_m.apply, old_p, new_init, x, x, spec, spec)
  cols = gate_map(3, 4)
  assert_rows_follow(new_p["gru"]["w_i"], old_p["gru"]["w_i"], cols, axis=1)
  assert_rows_follow(new_p["gru"]["w_h"][:3], old_p["gru"]["w_h"], cols, axis=1)
  assert_rows_follow(new_p["gru"]["b"], old_p["gru"]["b"], cols)
  assert_claim_holds(surgery, old_m.apply, new_m.apply, old_p, new_p, x, x, must_preserve=True)


# -- 4. rename ------------------------------------------------------------------------------

def stack_fn(order):
  def fn(p, x):
    h = x
    for i in order:
      blk = p["h"][i]
      h = h + jnp.tanh(h @ blk["mlp"]["w"] + blk["mlp"]["b"]) * blk["gate"]
    return h @ p["head"]
  return fn


def stack_params(key, blocks=2, d=3):
  r = np.random.default_rng(key)
  return {"h": [{"mlp": {"w": rand(r, (d, d)), "b": rand(r, (d,))}, "gate": rand(r, (d,))}
                for i in range(blocks)], "head": rand(r, (d, 2))}


def test_4_rename_entries_that_match_nothing_raise_naming_the_closest_path():
  p = stack_params(0)
  x = jnp.ones((2, 3))
  spec = js.Features(["a", "b", "c"])
  table = js.dependency_table(stack_fn([0, 1]), p, x, spec)
  for rename, unknown, closest in [({"h/1/mpl/w": "h/0/mlp/w"}, "h/1/mpl/w", "h/1/mlp/w"),  # a typo in the old path
                                   ({"h/1/mlp/w": "h/0/mlp/ww"}, "h/0/mlp/ww", "h/0/mlp/w"),  # ... in the new path
                                   ({"blk1/": "h/0/"}, "blk1/", "")]:  # a prefix that matches nothing
    with pytest.raises(ValueError) as error:
      js.plan(table, table, rename=rename)
    assert unknown in str(error.value) and closest in str(error.value), error.value


def test_4_prefix_renames_move_whole_blocks():
  old_p, new_init = stack_params(0), stack_params(1)
  x = jnp.ones((2, 3))
  spec = js.Features(["a", "b", "c"])
  old_fn, new_fn = stack_fn([0, 1]), stack_fn([1, 0])  # the blocks were swapped in the list
  surgery, new_p = plan(old_fn, new_fn, old_p, new_init, x, x, spec, spec, rename={"h/0/": "h/1/", "h/1/": "h/0/"})
  matching = {o: (n, why) for o, n, why in surgery.report.matching}
  for leaf in ("mlp/w", "mlp/b", "gate"):
    assert matching[f"h/0/{leaf}"] == (f"h/1/{leaf}", "rename"), matching
    assert matching[f"h/1/{leaf}"] == (f"h/0/{leaf}", "rename"), matching
  np.testing.assert_array_equal(np.asarray(new_p["h"][1]["mlp"]["w"]), np.asarray(old_p["h"][0]["mlp"]["w"]))
  np.testing.assert_array_equal(np.asarray(new_p["h"][0]["gate"]), np.asarray(old_p["h"][1]["gate"]))
  assert_claim_holds(surgery, old_fn, new_fn, old_p, new_p, x, x, must_preserve=True)


# -- 6. verify with a featureless input that changes shape -------------------------------------

def rnn_step(p, inputs):
  """One step of a recurrent policy whose carry is an input (purejaxrl style)."""
  h = jnp.tanh(inputs["obs"] @ p["wi"] + inputs["carry"] @ p["wh"] + p["b"])
  return h @ p["pi"]


def step_params(key, hidden, nin=3):
  r = np.random.default_rng(key)
  return {"wi": rand(r, (nin, hidden)), "wh": rand(r, (hidden, hidden)), "b": rand(r, (hidden,)),
          "pi": rand(r, (hidden, 2))}


def test_6_verify_builds_a_grown_carry_from_the_old_draw():
  old_p, new_init = step_params(0, 4), step_params(1, 6)
  old_x = {"obs": jnp.ones((2, 3)), "carry": jnp.zeros((2, 4))}
  new_x = {"obs": jnp.ones((2, 3)), "carry": jnp.zeros((2, 6))}
  spec = {"obs": js.Features(["x", "y", "z"]), "carry": None}
  surgery, new_p = plan(rnn_step, rnn_step, old_p, new_init, old_x, new_x, spec, spec)
  r = np.random.default_rng(2)
  obs, carry = rand(r, (2, 3), 1.0), rand(r, (2, 4), 1.0)
  exact = np.abs(rnn_step(old_p, {"obs": obs, "carry": carry})
                 - rnn_step(new_p, {"obs": obs, "carry": jnp.pad(carry, ((0, 0), (0, 2)))})).max() <= ATOL
  assert exact  # the transfer is exact when the new carry is the old one, zero in the new units
  try:
    check = js.verify(surgery, rnn_step, rnn_step, old_p, new_p, old_x, new_x, key=KEY, atol=ATOL)
  except ValueError as e:  # refusing is fine, if it says why
    assert "carry" in str(e), e
    return
  assert check.ok, check


def test_6_grown_output_without_names_points_to_outputs():
  def fn(p, x):
    return jnp.tanh(x @ p["w"]) @ p["head"]
  r = np.random.default_rng(0)
  old_p = {"w": rand(r, (3, 4)), "head": rand(r, (4, 2))}
  new_init = {"w": rand(r, (3, 4)), "head": rand(r, (4, 3))}
  x = jnp.ones((2, 3))
  spec = js.Features(["a", "b", "c"])
  surgery, new_p = plan(fn, fn, old_p, new_init, x, x, spec, spec)
  with pytest.raises(ValueError, match="outputs="):
    js.verify(surgery, fn, fn, old_p, new_p, x, x, key=KEY)


# -- 8. peer-suite findings -------------------------------------------------------------------

def test_8_empty_contraction_has_an_empty_mask():
  def fn(p, x):
    return {"empty": x[:, :0] @ jnp.zeros((0, 3)), "full": x @ p["w"]}
  table = js.dependency_table(fn, {"w": jnp.ones((4, 3))}, jnp.ones((2, 4)), js.Features(list("abcd")), strict=True)
  masks = {path: table.output_mask(path) for path in table.output_paths}
  assert not masks["empty"].any(), masks["empty"]
  assert masks["full"].all()


def scan_outputs_mask(fn, n):
  table = js.dependency_table(lambda p, x: fn(x), {}, jnp.ones((n,)), js.Features([f"x{i}" for i in range(n)]),
                              strict=True)
  return np.asarray(table.output_mask(table.output_paths[0])).reshape(n, n)


def test_8_scan_cumulative_sum_is_causal():
  def running_sum(xs):
    return jax.lax.scan(lambda c, x: (c + x, c + x), 0.0, xs)[1]

  def discounted_returns(xs):  # reverse scan: step k reads steps >= k
    return jax.lax.scan(lambda c, r: (r + 0.9 * c, r + 0.9 * c), 0.0, xs, reverse=True)[1]
  n = 6
  np.testing.assert_array_equal(scan_outputs_mask(running_sum, n), np.tril(np.ones((n, n), bool)))
  np.testing.assert_array_equal(scan_outputs_mask(discounted_returns, n), np.triu(np.ones((n, n), bool)))


def test_8_scan_per_step_parameters_are_touched_by_their_own_step():
  """A gain per time step (a leaf scanned over as ``xs``) is touched by its own step's feature only."""
  n = 5

  def gated_sum(p, x):
    def body(c, xw):
      xi, w = xw
      return c + w * xi, jnp.tanh(c + w * xi)
    return jax.lax.scan(body, 0.0, (x, p["w"]))[1]

  params, x, spec = {"w": jnp.full((n,), 0.7)}, jnp.linspace(0.5, 1.5, n), js.Features([f"x{i}" for i in range(n)])
  table = js.dependency_table(gated_sum, params, x, spec, strict=True)
  np.testing.assert_array_equal(np.asarray(table.mask("w")).reshape(n, n), np.eye(n, dtype=bool))
  np.testing.assert_array_equal(np.asarray(table.output_mask(table.output_paths[0])).reshape(n, n),
                                np.tril(np.ones((n, n), bool)))
  check = js.cross_check(table, js.gradient_table(gated_sum, params, x, spec, key=KEY))
  assert check.ok and check.agrees("w"), check.report()


def test_8_scan_level_that_adds_nothing_is_steady_only_if_later_steps_add_nothing():
  """Steps 0-2 carry no feature, steps 3-4 do: the carry stops growing at step 1, but it is not steady
  (ending the loop there would drop every feature from the outputs)."""
  def late_sum(p, x):
    xs = jnp.concatenate([jnp.zeros(3), x])
    return jax.lax.scan(lambda c, xi: (c + xi, c + xi), 0.0, xs)[1]

  table = js.dependency_table(late_sum, {}, jnp.ones((2,)), js.Features(["f0", "f1"]), strict=True)
  mask = np.asarray(table.output_mask(table.output_paths[0])).reshape(5, 2)
  np.testing.assert_array_equal(mask, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])


@pytest.mark.parametrize("reverse", [False, True])
def test_8_scan_with_a_steady_carry_keeps_each_step_its_own(reverse):
  """A feature-free carry (a counter, a decay) is steady at once; each later step's ``ys`` still
  reads its own ``xs`` only (one run per step on the steady carry), so the outputs are diagonal."""
  def counter(xs):
    return jax.lax.scan(lambda i, x: (i + 1, 2.0 * x * i), 0.0, xs, reverse=reverse)[1]

  def decay(xs):
    return jax.lax.scan(lambda c, x: (c * 0.5, x + c), 1.0, xs, reverse=reverse)[1]
  n = 7
  for fn in (counter, decay):
    np.testing.assert_array_equal(scan_outputs_mask(fn, n), np.eye(n, dtype=bool), err_msg=fn.__name__)


def test_8_scan_parameters_read_per_step_on_a_steady_carry_match_the_gradient():
  """A gain per step scanned as ``xs`` beside a steady counter: step s's gain touches feature s only
  (the confirming run, which mixes every later step's xs, is dry; the per-step runs record)."""
  n = 6

  def gated(p, x):
    def body(i, xw):
      xi, w = xw
      return i + 1.0, jnp.tanh(w * xi + 0.1 * i)
    return jax.lax.scan(body, 0.0, (x, p["w"]))[1]

  params, x, spec = {"w": jnp.full((n,), 0.7)}, jnp.linspace(0.5, 1.5, n), js.Features([f"x{i}" for i in range(n)])
  table = js.dependency_table(gated, params, x, spec, strict=True)
  np.testing.assert_array_equal(np.asarray(table.output_mask(table.output_paths[0])).reshape(n, n),
                                np.eye(n, dtype=bool))
  np.testing.assert_array_equal(np.asarray(table.mask("w")).reshape(n, n), np.eye(n, dtype=bool))
  check = js.cross_check(table, js.gradient_table(gated, params, x, spec, key=KEY))
  assert check.ok and check.agrees("w"), check.report()


def test_8_scan_contacts_with_a_steady_carry_cover_every_step():
  """Soundness of the dry confirming run: after the carry is steady, each later step's contact of the
  kernel with its own xs is still recorded (step 2 reads the features reversed), forward and reverse;
  the carry is linear, so a missing touch would be a miss of the gradient cross-check."""
  n = 5
  want = np.eye(n, dtype=bool) | np.eye(n, dtype=bool)[::-1]   # w[i]: feature i, and n-1-i from step 2
  for reverse in (False, True):
    def fn(p, x, reverse=reverse):
      def body(c, xi):
        return 0.5 * c + xi @ p["w"], jnp.sum(c * p["v"])
      return jax.lax.scan(body, jnp.zeros(3), jnp.stack([x, x * 2, x[::-1], x + 1, x * 3]), reverse=reverse)[1]
    params, x = {"w": jnp.full((n, 3), 0.3), "v": jnp.full((3,), 0.5)}, jnp.linspace(0.5, 1.5, n)
    spec = js.Features([f"x{i}" for i in range(n)])
    table = js.dependency_table(fn, params, x, spec, strict=True)
    np.testing.assert_array_equal(np.asarray(table.mask("w")).any(axis=1), want, err_msg=f"reverse={reverse}")
    check = js.cross_check(table, js.gradient_table(fn, params, x, spec, key=KEY))
    assert check.ok and check.agrees("w"), check.report()


def test_8_scan_confirming_run_stands_for_later_steps_when_their_xs_are_alike():
  """Every step reads the same features: the confirming run stands for the steps after the steady
  level and records their contacts, here with a kernel per step scanned as xs."""
  n, steps = 4, 5

  def fn(p, x):
    def body(c, xw):
      xi, w = xw
      return 0.5 * c + xi @ w, jnp.sum(c)
    return jax.lax.scan(body, jnp.zeros(3), (jnp.broadcast_to(x, (steps, n)), p["ws"]))[1]
  params, x = {"ws": jnp.full((steps, n, 3), 0.3)}, jnp.linspace(0.5, 1.5, n)
  spec = js.Features([f"x{i}" for i in range(n)])
  table = js.dependency_table(fn, params, x, spec, strict=True)
  want = np.broadcast_to(np.eye(n, dtype=bool)[None, :, None], (steps, n, 3, n))
  np.testing.assert_array_equal(np.asarray(table.mask("ws")), want)
  check = js.cross_check(table, js.gradient_table(fn, params, x, spec, key=KEY))
  assert check.ok, check.report()   # the last step's kernel feeds only the final carry: table-only there


def test_8_equinox_internal_primitives_have_rules():
  import equinox.internal as eqxi

  def fn(p, x):
    y = eqxi.nonbatchable(x * p["s"])
    picked = eqxi.select_if_vmap_p.bind(jnp.bool_(True), y, 2 * x)
    return {"picked": picked, "any": eqxi.unvmap_any(x > 0).astype(jnp.float32),
            "max": eqxi.unvmap_max(jnp.round(x.sum()).astype(jnp.int32)).astype(jnp.float32)}
  with warnings.catch_warnings():
    warnings.simplefilter("error", js.UnknownPrimitiveWarning)
    table = js.dependency_table(fn, {"s": jnp.ones((3,))}, jnp.ones((3,)), js.Features(list("abc")), strict=True)
  masks = {path: np.asarray(table.output_mask(path)) for path in table.output_paths}
  np.testing.assert_array_equal(masks["picked"].reshape(3, 3), np.eye(3, dtype=bool))  # elementwise
  assert masks["any"].all() and masks["max"].all()  # reductions over every feature


# -- failures the surgery fuzzer found (scripts/fuzz.py, shrunk; tests/fuzz_models.py FOUND) ----------

@pytest.mark.parametrize("found", [pytest.param(f, id=f.id, marks=[] if f.fixed else pytest.mark.xfail(
    strict=True, reason=f.reason)) for f in fm.FOUND])
def test_fuzzer_finding(found):
  """Exact placement, drops exactly what the edit removed, and ``preserved`` only where verify agrees."""
  failures = fm.check_pair(found.spec, found.edits)
  assert not failures, "\n".join([fm.reproducer(found.spec, found.edits)] + [str(f) for f in failures])
