"""Surgery on real third-party models: Haiku, Equinox, Flax Linen and NNX, built with the
installed libraries and transferred through the public API.

Every model takes the same three surgeries: an input feature inserted in the middle
(``hp, mana, dist -> hp, armor, mana, dist``), a hidden layer widened (3 -> 5 units), and both
at once. Each is checked for exact placement (every old value where its feature, unit and gate
put it), for nothing dropped, and for preservation: statically and with ``js.verify``.
Failures that are bugs are ``xfail(strict=True)`` naming the issue item.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsurgery as js
import jaxsurgery.flax as jsf

ATOL = 1e-5
OLD_NAMES, NEW_NAMES = ["hp", "mana", "dist"], ["hp", "armor", "mana", "dist"]
H_OLD, H_NEW = 3, 5
SURGERIES = {"feature": (NEW_NAMES, H_OLD), "widen": (OLD_NAMES, H_NEW), "both": (NEW_NAMES, H_NEW)}


def feature_map(names):
  """new index -> old index of the same feature (-1: new)."""
  return np.array([OLD_NAMES.index(n) if n in OLD_NAMES else -1 for n in names])


def unit_map(h):
  """new unit -> old unit: the old units first."""
  return np.array([j if j < H_OLD else -1 for j in range(h)])


def gate_map(h, gates):
  """A fused (gates * h) axis: each gate keeps its old units first."""
  return np.array([g * H_OLD + j if j < H_OLD else -1 for g in range(gates) for j in range(h)])


def assert_placed(new, old, *maps, what=""):
  """Every new index whose per-axis maps (new -> old, -1 fresh; None: identity) all have a source
  holds exactly that old element."""
  new, old = np.asarray(new), np.asarray(old)
  maps = [np.arange(new.shape[a]) if m is None else np.asarray(m) for a, m in enumerate(maps)]
  maps += [np.arange(new.shape[a]) for a in range(len(maps), new.ndim)]
  sel = [np.nonzero(m >= 0)[0] for m in maps]
  src = [m[s] for m, s in zip(maps, sel)]
  np.testing.assert_array_equal(new[np.ix_(*sel)], old[np.ix_(*src)], err_msg=f"{what}: old values misplaced")


def fill(abstract, seed):
  """Random values for an abstract tree (the library's init under ``eval_shape``): zero biases or
  unit scales would hide misplaced elements, and numpy compiles nothing per shape."""
  r = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda a: jnp.asarray(r.normal(size=a.shape) * 0.5, a.dtype), abstract)


def check_exact(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x):
  """Nothing dropped, preserved statically, and numerically within 1e-5."""
  report = surgery.report
  assert not report.dropped_elements(), report
  assert report.preserved is True, report
  check = js.verify(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x, key=jax.random.key(5), samples=2,
                    atol=ATOL)
  assert check.ok, (check, report)


def transfer(old_fn, new_fn, old_p, new_init, old_x, new_x, names):
  old_t = js.dependency_table(old_fn, old_p, old_x, js.Features(OLD_NAMES), strict=True)
  new_t = js.dependency_table(new_fn, new_init, new_x, js.Features(names), strict=True)
  surgery = js.plan(old_t, new_t)
  return surgery, surgery(old_p, new_init)


# -- Haiku ----------------------------------------------------------------------------------

def haiku_model(core, hidden):
  import haiku as hk

  def mlp(x):
    return hk.nets.MLP([hidden, 2], activation=jnp.tanh)(x)

  def recurrent(xs):
    cell = hk.LSTM(hidden) if core == "lstm" else hk.GRU(hidden)
    ys, _ = hk.dynamic_unroll(cell, jnp.swapaxes(xs, 0, 1), cell.initial_state(xs.shape[0]))
    return hk.Linear(2)(ys[-1])
  return hk.without_apply_rng(hk.transform(mlp if core == "mlp" else recurrent))


def haiku_case(core, surgery_name):
  names, hidden = SURGERIES[surgery_name]
  old_m, new_m = haiku_model(core, H_OLD), haiku_model(core, hidden)
  lead = (2,) if core == "mlp" else (2, 3)
  old_x, new_x = jnp.ones(lead + (len(OLD_NAMES),)), jnp.ones(lead + (len(names),))
  old_p = fill(jax.eval_shape(old_m.init, jax.random.key(0), old_x), 1)
  new_init = fill(jax.eval_shape(new_m.init, jax.random.key(0), new_x), 2)
  surgery, new_p = transfer(old_m.apply, new_m.apply, old_p, new_init, old_x, new_x, names)
  return surgery, old_m.apply, new_m.apply, old_p, new_p, old_x, new_x, feature_map(names), hidden


@pytest.mark.parametrize("surgery_name", list(SURGERIES))
def test_haiku_mlp(surgery_name):
  surgery, old_fn, new_fn, old_p, new_p, old_x, new_x, fmap, hidden = haiku_case("mlp", surgery_name)
  l0, l1 = "mlp/~/linear_0", "mlp/~/linear_1"
  assert_placed(new_p[l0]["w"], old_p[l0]["w"], fmap, unit_map(hidden), what=l0)
  assert_placed(new_p[l0]["b"], old_p[l0]["b"], unit_map(hidden), what=l0)
  assert_placed(new_p[l1]["w"], old_p[l1]["w"], unit_map(hidden), what=l1)
  check_exact(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x)


@pytest.mark.parametrize("surgery_name", list(SURGERIES))
def test_haiku_lstm(surgery_name):
  """hk.LSTM: one kernel over concat([inputs, hidden]) with 4 gates (i, g, f, o)."""
  surgery, old_fn, new_fn, old_p, new_p, old_x, new_x, fmap, hidden = haiku_case("lstm", surgery_name)
  rows = np.concatenate([fmap, np.where(unit_map(hidden) >= 0, len(OLD_NAMES) + unit_map(hidden), -1)])
  assert_placed(new_p["lstm/linear"]["w"], old_p["lstm/linear"]["w"], rows, gate_map(hidden, 4), what="lstm/linear/w")
  assert_placed(new_p["lstm/linear"]["b"], old_p["lstm/linear"]["b"], gate_map(hidden, 4), what="lstm/linear/b")
  assert_placed(new_p["linear"]["w"], old_p["linear"]["w"], unit_map(hidden), what="linear/w")
  check_exact(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x)


@pytest.mark.parametrize("surgery_name", ["feature", "widen", "both"])  # hk.GRU splits [2H | H], then halves
def test_haiku_gru(surgery_name):
  surgery, old_fn, new_fn, old_p, new_p, old_x, new_x, fmap, hidden = haiku_case("gru", surgery_name)
  gates = gate_map(hidden, 3)
  assert_placed(new_p["gru"]["w_i"], old_p["gru"]["w_i"], fmap, gates, what="gru/w_i")
  assert_placed(new_p["gru"]["w_h"], old_p["gru"]["w_h"], unit_map(hidden), gates, what="gru/w_h")
  assert_placed(new_p["gru"]["b"], old_p["gru"]["b"], gates, what="gru/b")
  assert_placed(new_p["linear"]["w"], old_p["linear"]["w"], unit_map(hidden), what="linear/w")
  check_exact(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x)


# -- Equinox --------------------------------------------------------------------------------

def equinox_concrete(make, seed):
  """An Equinox model built abstractly (``filter_eval_shape``), its arrays filled, split into
  a params pytree and the static rest."""
  import equinox as eqx
  abstract = eqx.filter_eval_shape(make)
  r = np.random.default_rng(seed)
  model = jax.tree_util.tree_map(
      lambda a: jnp.asarray(r.normal(size=a.shape) * 0.5, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a,
      abstract)
  return eqx.partition(model, eqx.is_inexact_array)


def equinox_mlp(nin, hidden, seed):
  import equinox as eqx
  params, static = equinox_concrete(
      lambda: eqx.nn.MLP(nin, 2, hidden, depth=1, activation=jnp.tanh, key=jax.random.key(0)), seed)
  return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


def equinox_gru(nin, hidden, seed):
  """eqx.nn.GRUCell over a sequence (lax.scan, vmapped over the batch), then eqx.nn.Linear."""
  import equinox as eqx
  params, static = equinox_concrete(
      lambda: (eqx.nn.GRUCell(nin, hidden, key=jax.random.key(0)), eqx.nn.Linear(hidden, 2, key=jax.random.key(1))),
      seed)

  def fn(p, xs):
    cell, head = eqx.combine(p, static)

    def one(seq):
      h, _ = jax.lax.scan(lambda h, x: (cell(x, h), None), jnp.zeros(hidden), seq)
      return head(h)
    return jax.vmap(one)(xs)
  return fn, params


@pytest.mark.parametrize("surgery_name", list(SURGERIES))
def test_equinox_mlp(surgery_name):
  names, hidden = SURGERIES[surgery_name]
  old_fn, old_p = equinox_mlp(3, H_OLD, 0)
  new_fn, new_init = equinox_mlp(len(names), hidden, 1)
  old_x, new_x = jnp.ones((2, 3)), jnp.ones((2, len(names)))
  surgery, new_p = transfer(old_fn, new_fn, old_p, new_init, old_x, new_x, names)
  first, second = old_p.layers[0], old_p.layers[1]
  assert_placed(new_p.layers[0].weight, first.weight, unit_map(hidden), feature_map(names), what="layers/0/weight")
  assert_placed(new_p.layers[0].bias, first.bias, unit_map(hidden), what="layers/0/bias")
  assert_placed(new_p.layers[1].weight, second.weight, None, unit_map(hidden), what="layers/1/weight")
  check_exact(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x)


@pytest.mark.parametrize("surgery_name", list(SURGERIES))
def test_equinox_gru_cell(surgery_name):
  names, hidden = SURGERIES[surgery_name]
  old_fn, old_p = equinox_gru(3, H_OLD, 0)
  new_fn, new_init = equinox_gru(len(names), hidden, 1)
  old_x, new_x = jnp.ones((2, 4, 3)), jnp.ones((2, 4, len(names)))
  surgery, new_p = transfer(old_fn, new_fn, old_p, new_init, old_x, new_x, names)
  (cell, head), (new_cell, new_head) = old_p, new_p
  gates = gate_map(hidden, 3)
  assert_placed(new_cell.weight_ih, cell.weight_ih, gates, feature_map(names), what="weight_ih")
  assert_placed(new_cell.weight_hh, cell.weight_hh, gates, unit_map(hidden), what="weight_hh")
  assert_placed(new_cell.bias, cell.bias, gates, what="bias")
  assert_placed(new_cell.bias_n, cell.bias_n, unit_map(hidden), what="bias_n")
  assert_placed(new_head.weight, head.weight, None, unit_map(hidden), what="head")
  check_exact(surgery, old_fn, new_fn, old_p, new_p, old_x, new_x)


# -- Flax Linen CNN with BatchNorm ------------------------------------------------------------

def linen_cnn(channels):
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(channels, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
      x = nn.Conv(4, (3, 3), strides=2)(x)
      return nn.Dense(2)(x.mean((1, 2)))
  return CNN()


def random_variables(module, x, seed):
  """Random params and batch statistics (positive variances)."""
  out = fill(jax.eval_shape(module.init, jax.random.key(0), x), seed)
  stats = out["batch_stats"]["BatchNorm_0"]
  stats["var"] = jnp.exp(stats["var"])
  return out


@pytest.mark.parametrize("surgery_name", ["feature", "widen", "both"])
def test_linen_cnn_with_batchnorm(surgery_name):
  names, channels = SURGERIES[surgery_name]
  old_m, new_m = linen_cnn(H_OLD), linen_cnn(channels)
  old_x, new_x = jnp.ones((1, 6, 6, 3)), jnp.ones((1, 6, 6, len(names)))
  old_v = random_variables(old_m, old_x, 1)
  new_init = random_variables(new_m, new_x, 2)
  surgery = jsf.plan_linen(old_m, new_m, old_v, new_init, old_x, new_x, js.Features(OLD_NAMES, axis=-1),
                           js.Features(names, axis=-1), strict_tables=True)
  new_v = surgery(old_v, new_init)
  units = unit_map(channels)
  p_old, p_new = old_v["params"], new_v["params"]
  assert_placed(p_new["Conv_0"]["kernel"], p_old["Conv_0"]["kernel"], None, None, feature_map(names), units,
                what="Conv_0/kernel")
  for name in ("scale", "bias"):
    assert_placed(p_new["BatchNorm_0"][name], p_old["BatchNorm_0"][name], units, what=f"BatchNorm_0/{name}")
  for name in ("mean", "var"):
    assert_placed(new_v["batch_stats"]["BatchNorm_0"][name], old_v["batch_stats"]["BatchNorm_0"][name], units,
                  what=f"batch_stats/{name}")
  assert_placed(p_new["Conv_1"]["kernel"], p_old["Conv_1"]["kernel"], None, None, units, what="Conv_1/kernel")
  apply_old = lambda v, x: old_m.apply(v, x)
  apply_new = lambda v, x: new_m.apply(v, x)
  check_exact(surgery, apply_old, apply_new, old_v, new_v, old_x, new_x)


# -- NNX with nnx.Optimizer -------------------------------------------------------------------

def nnx_net(nin, hidden, seed):
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(nin, hidden, rngs=rngs)
      self.l2 = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
  return nnx.merge(graphdef, fill(state, seed))


@pytest.mark.parametrize("surgery_name", list(SURGERIES))
def test_nnx_model_and_optimizer_transplant(surgery_name):
  from flax import nnx
  names, hidden = SURGERIES[surgery_name]
  old_x, new_x = jnp.ones((4, 3)), jnp.ones((4, len(names)))
  old_model = nnx_net(3, H_OLD, 0)
  old_opt = nnx.Optimizer(old_model, optax.adam(1e-2), wrt=nnx.Param)
  batch = jnp.asarray(np.random.default_rng(9).normal(size=(8, 3)), jnp.float32)
  old_opt.update(old_model, nnx.grad(lambda m: (m(batch) ** 2).sum())(old_model))  # nonzero moments, step 1
  new_model = nnx_net(len(names), hidden, 1)
  new_opt = nnx.Optimizer(new_model, optax.adam(1e-2), wrt=nnx.Param)
  surgery = jsf.plan_nnx(old_model, new_model, old_x, new_x, js.Features(OLD_NAMES), js.Features(names),
                         strict_tables=True)
  jsf.transplant(surgery, (old_model, old_opt), (new_model, new_opt))
  fmap, units = feature_map(names), unit_map(hidden)
  before, after = nnx.to_pure_dict(nnx.state(old_model)), nnx.to_pure_dict(nnx.state(new_model))
  assert_placed(after["l1"]["kernel"], before["l1"]["kernel"], fmap, units, what="l1/kernel")
  assert_placed(after["l2"]["kernel"], before["l2"]["kernel"], units, what="l2/kernel")
  old_state, new_state = nnx.to_pure_dict(nnx.state(old_opt)), nnx.to_pure_dict(nnx.state(new_opt))
  for moment in ("mu", "nu"):
    old_m, new_m = old_state["opt_state"][0][moment], new_state["opt_state"][0][moment]
    assert_placed(new_m["l1"]["kernel"], old_m["l1"]["kernel"], fmap, units, what=f"{moment}/l1/kernel")
    assert np.abs(np.asarray(old_m["l1"]["kernel"])).min() > 0  # the moments are trained, not zeros
  assert int(new_state["step"]) == int(old_state["step"]) == 1
  report = surgery.report
  assert not report.dropped_elements() and report.preserved is True, report
  assert jsf.verify_nnx(surgery, old_model, new_model, old_x, new_x, key=jax.random.key(3), samples=2, atol=ATOL).ok
