"""Training-state surgery: optax states, Linen TrainState, NNX model + Optimizer, Orbax checkpoints.

Every case is the same real surgery: the old model reads features (hp, mana, x)
through a hidden layer of 4 units; the new one reads (x, hp, armor, mana) -- a
new feature inserted and the others reordered -- through 6 units. The checks
spell out what must move where: every row of an input kernel (in params, EMA
params, and in every optimizer moment) moves with its feature, the old hidden
units keep their values, fresh moment entries are the optimizer's zeros, fresh
params follow "random in, zero out", counts are copied, and the new model
computes what the old one did.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsurgery as js
import jaxsurgery.flax as jsf
import jaxsurgery.orbax as jso
from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import SurgeryError
from jaxsurgery._src.surgery.state import COPIED, MISSING, REMAPPED, StateReport, remap_state

OLD = ["hp", "mana", "x"]
NEW = ["x", "hp", "armor", "mana"]
H_OLD, H_NEW, OUT = 4, 6, 2
X_OLD = jax.ShapeDtypeStruct((5, len(OLD)), jnp.float32)
X_NEW = jax.ShapeDtypeStruct((5, len(NEW)), jnp.float32)
STEPS = 3


def flat(tree) -> dict:
  return {feats.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def as_np(x) -> np.ndarray:
  if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def role(param_path: str) -> str:
  parts = param_path.split("/")
  if "l1" not in parts and "l2" not in parts:
    return "same"   # e.g. NNX rng state, part of the plan when the table covers the whole state
  layer = "l1" if "l1" in parts else "l2"
  kind = "bias" if "b" in parts or "bias" in parts else "kernel"
  return {("l1", "kernel"): "in_kernel", ("l1", "bias"): "hidden_bias",
          ("l2", "kernel"): "out_kernel", ("l2", "bias"): "out_bias"}[layer, kind]


def param_fresh(r: str, init) -> np.ndarray:
  """Fresh param elements: 'random in, zero out' -- the new feature's row and the new units' outputs are 0."""
  f = as_np(init).copy()
  if r == "in_kernel":
    f[NEW.index("armor")] = 0
  if r == "out_kernel":
    f[H_OLD:] = 0
  return f


def assert_image(r: str, old, new, fresh):
  """``new`` carries ``old`` with rows following their features and old units in front; the rest is ``fresh``."""
  old, new = as_np(old), as_np(new)
  expected = np.array(np.broadcast_to(np.asarray(fresh, new.dtype), new.shape))
  if r == "in_kernel":
    for i, f in enumerate(NEW):
      if f in OLD:
        expected[i, :H_OLD] = old[OLD.index(f)]
  elif r in ("hidden_bias", "out_kernel"):
    expected[:H_OLD] = old
  else:   # out_bias, and leaves the plan keeps as they are
    expected = old
  np.testing.assert_array_equal(new, expected)


def check_state(report: StateReport, old_state, new_init, new_state, param_prefixes, moment_prefixes):
  """Every param-shaped subtree is the image of its old counterpart; counts are copied; nothing is left behind."""
  o, i, n = flat(old_state), flat(new_init), flat(new_state)
  chex.assert_trees_all_equal_structs(new_state, new_init)   # the new state is shaped like its init
  assert set(report.params) == set(param_prefixes) | set(moment_prefixes), report
  assert not report.left_behind, report
  for leaf in report.leaves:
    if leaf.kind == REMAPPED:
      r = role(leaf.param)
      if leaf.prefix in param_prefixes:
        assert_image(r, o[leaf.old_path], n[leaf.path], param_fresh(r, i[leaf.path]))
      else:
        assert np.all(np.asarray(i[leaf.path]) == 0)   # the optimizer's init: fresh moments are zero
        assert_image(r, o[leaf.old_path], n[leaf.path], 0.0)
        assert np.any(np.asarray(o[leaf.old_path]) != 0)   # a real moment moved, not zeros
    elif leaf.kind == COPIED:
      np.testing.assert_array_equal(as_np(n[leaf.path]), as_np(o[leaf.old_path]))
    else:
      raise AssertionError(f"{leaf} should not be taken from the new init here:\n{report}")
  name = lambda path: [p for p in path.split("/") if p != "value"][-1]
  counts = [l for l in report.leaves if l.kind == COPIED and name(l.path) in ("count", "step")]
  assert counts and all(int(np.asarray(n[l.path])) == STEPS for l in counts), report
  assert all(int(np.asarray(i[l.path])) == 0 for l in counts)


def data(key, n_features):
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (8, n_features)), jax.random.normal(ky, (8, OUT))


# -- (a) plain params + optax --------------------------------------------------------------

def mlp(p, x):
  return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]


def mlp_params(key, nin, nh):
  k = jax.random.split(key, 4)
  return {"l1": {"w": jax.random.normal(k[0], (nin, nh)), "b": jax.random.normal(k[1], (nh,))},
          "l2": {"w": jax.random.normal(k[2], (nh, OUT)), "b": jax.random.normal(k[3], (OUT,))}}


@pytest.fixture(scope="module")
def plain_surgery():
  old_t = js.dependency_table(mlp, mlp_params(jax.random.key(0), 3, H_OLD), X_OLD, js.Features(OLD), strict=True)
  new_t = js.dependency_table(mlp, mlp_params(jax.random.key(0), 4, H_NEW), X_NEW, js.Features(NEW), strict=True)
  return js.plan(old_t, new_t)


KERNELS = {"l1": {"w": True, "b": False}, "l2": {"w": True, "b": False}}
LABELS = {"l1": {"w": "adam", "b": "sgd"}, "l2": {"w": "adam", "b": "sgd"}}
TXS = {
    "adam": (lambda: optax.adam(1e-2), ["opt_state/0/mu/", "opt_state/0/nu/"]),
    "masked_chain": (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adam(1e-2), KERNELS),
                                         optax.add_decayed_weights(1e-4)),
                     ["opt_state/1/inner_state/0/mu/", "opt_state/1/inner_state/0/nu/"]),
    "multi_transform": (lambda: optax.multi_transform({"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-2, 0.9)}, LABELS),
                        ["opt_state/inner_states/adam/inner_state/0/mu/",
                         "opt_state/inner_states/adam/inner_state/0/nu/",
                         "opt_state/inner_states/sgd/inner_state/0/trace/"]),
    "inject_hyperparams": (lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
                           ["opt_state/inner_state/0/mu/", "opt_state/inner_state/0/nu/"]),
}


def trained_plain_state(tx, key, nin=3, nh=H_OLD):
  params = mlp_params(key, nin, nh)
  opt_state = tx.init(params)
  x, y = data(jax.random.fold_in(key, 1), nin)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean((mlp(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state)
  ema = jax.tree.map(lambda a: 0.5 * a, params)
  return {"params": params, "ema": ema, "opt_state": opt_state, "step": jnp.int32(STEPS)}


def fresh_plain_state(tx, key):
  params = mlp_params(key, 4, H_NEW)
  return {"params": params, "ema": params, "opt_state": tx.init(params), "step": jnp.int32(0)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "adam" else n for n in TXS])
def test_optax_states_move_with_their_features(plain_surgery, name):
  make_tx, moments = TXS[name]
  tx = make_tx()
  old = trained_plain_state(tx, jax.random.key(1))
  init = fresh_plain_state(tx, jax.random.key(2))
  new, report = remap_state(plain_surgery, old, init, return_report=True)
  check_state(report, old, init, new, ["params/", "ema/"], moments)
  if name == "inject_hyperparams":   # hyperparameters are copied like counts
    assert "opt_state/hyperparams/learning_rate" in report.copied
  assert js.verify(plain_surgery, mlp, mlp, old["params"], new["params"], X_OLD, X_NEW, key=jax.random.key(3)).ok
  # the remapped optimizer state is a valid state of the new model: training goes on
  x, y = data(jax.random.key(4), 4)

  @jax.jit
  def updates(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean((mlp(p, x) - y) ** 2))(params)
    return tx.update(grads, opt_state, params)[0]
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates(new["params"], new["opt_state"])))
  text = repr(report)
  assert "param-shaped subtrees" in text and moments[0] in text and "left behind in the old state: nothing" in text


@pytest.mark.slow
def test_remap_state_under_jit_vmap_and_sharding(plain_surgery):
  tx = optax.adam(1e-2)
  old = trained_plain_state(tx, jax.random.key(1))
  other = trained_plain_state(tx, jax.random.key(5))
  init = fresh_plain_state(tx, jax.random.key(2))
  eager = remap_state(plain_surgery, old, init)
  jitted = jax.jit(lambda o, n: remap_state(plain_surgery, o, n))(old, init)
  pool = jax.tree.map(lambda a, b: jnp.stack([a, b]), old, other)
  pooled = jax.vmap(lambda o: remap_state(plain_surgery, o, init))(pool)
  single = remap_state(plain_surgery, other, init)
  for path, x in flat(eager).items():
    np.testing.assert_array_equal(np.asarray(flat(jitted)[path]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(flat(pooled)[path][0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(flat(pooled)[path][1]), np.asarray(flat(single)[path]))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  result = remap_state(plain_surgery, old, jax.device_put(init, sharding))
  assert all(x.sharding == sharding for x in jax.tree.leaves(result))


def test_moved_subtree_needs_rename_and_nothing_is_dropped_silently(plain_surgery):
  old = trained_plain_state(optax.adam(1e-2), jax.random.key(1))
  old["extra"] = jnp.arange(3.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))   # adam moved from opt_state/0 to /1
  init = fresh_plain_state(tx, jax.random.key(2))
  _, report = remap_state(plain_surgery, old, init, return_report=True)
  missing = report.of_kind(MISSING)
  assert {l.prefix for l in missing} == {"opt_state/1/0/mu/", "opt_state/1/0/nu/"} and len(missing) == 8
  left = {p for p, *_ in report.left_behind}
  assert "extra" in left and "opt_state/0/mu/l1/w" in left and "opt_state/0/count" in left
  assert "opt_state/0/mu/l1/w" in repr(report)
  with pytest.raises(SurgeryError, match="extra"):
    remap_state(plain_surgery, old, init, strict=True)

  del old["extra"]
  new, report = remap_state(plain_surgery, old, init, rename={"opt_state/0": "opt_state/1/0"}, return_report=True)
  assert not report.of_kind(MISSING) and not report.left_behind
  o, n = flat(old), flat(new)
  assert_image("in_kernel", o["opt_state/0/mu/l1/w"], n["opt_state/1/0/mu/l1/w"], 0.0)
  assert report.copied["opt_state/1/0/count"] == "opt_state/0/count"
  assert report.from_init == {}   # clip_by_global_norm has no state leaves

  # a bare param tree into a whole train state: params remapped, the optimizer starts afresh (reported)
  new, report = remap_state(plain_surgery, old["params"], init, rename={"": "params"}, return_report=True)
  assert_image("in_kernel", old["params"]["l1"]["w"], new["params"]["l1"]["w"],
               param_fresh("in_kernel", init["params"]["l1"]["w"]))
  assert {l.prefix for l in report.of_kind(MISSING)} == {"ema/", "opt_state/1/0/mu/", "opt_state/1/0/nu/"}
  assert set(report.from_init) >= {"step", "opt_state/1/0/count"}
  # prefixes= restricts where param-shaped subtrees are looked for
  _, report = remap_state(plain_surgery, old, init, rename={"opt_state/0": "opt_state/1/0"},
                          prefixes=["params", "opt_state/1/0/mu"], return_report=True)
  assert set(report.params) == {"params/", "opt_state/1/0/mu/"}
  assert "opt_state/1/0/nu/l1/w" in report.from_init and "opt_state/0/nu/l1/w" in {p for p, *_ in report.left_behind}


@pytest.mark.slow
def test_another_models_state_is_a_clear_error(plain_surgery):
  tx = optax.adam(1e-2)
  init = fresh_plain_state(tx, jax.random.key(2))
  wrong_width = trained_plain_state(tx, jax.random.key(1), nh=5)
  with pytest.raises(SurgeryError, match=r"'params/l1/w' is \(3, 5\)"):
    remap_state(plain_surgery, wrong_width, init)
  renamed = {"weights": trained_plain_state(tx, jax.random.key(1))["params"]}
  with pytest.raises(SurgeryError, match=r"(?s)none of the old model's parameters.*'params/l1/b' \(4,\)"):
    remap_state(plain_surgery, renamed, init)
  with pytest.raises(SurgeryError, match="No leaf of new_state_init"):
    remap_state(plain_surgery, init, {"something": {"else": jnp.zeros(3)}})
  with pytest.raises(SurgeryError, match="abstract"):
    remap_state(plain_surgery, init, jax.eval_shape(lambda: init))


def test_python_scalars_raw_keys_and_opaque_leaves(plain_surgery):
  old = {"params": mlp_params(jax.random.key(1), 3, H_OLD), "step": STEPS, "name": "old run",
         "key": jax.random.key_data(jax.random.key(7))}    # raw uint32 key data, as some checkpoints hold it
  init = {"params": mlp_params(jax.random.key(2), 4, H_NEW), "step": 0, "name": "new run",
          "key": jax.random.key(8)}
  new, report = remap_state(plain_surgery, old, init, return_report=True)
  assert new["step"] == STEPS and report.copied["step"] == "step"
  np.testing.assert_array_equal(jax.random.key_data(new["key"]), old["key"])
  assert new["name"] == "new run" and "not an array" in report.from_init["name"]
  assert [p for p, *_ in report.left_behind] == ["name"]


def test_factored_statistics_are_reset_and_reported(plain_surgery):
  tx = optax.adafactor(1e-2, min_dim_size_to_factor=2)   # v_row / v_col: not of their parameter's shape
  old_p, new_p = mlp_params(jax.random.key(1), 3, H_OLD), mlp_params(jax.random.key(2), 4, H_NEW)
  old = {"params": old_p, "opt_state": tx.init(old_p)}
  old["opt_state"] = jax.tree.map(lambda a: a + 1, old["opt_state"])   # distinguishable from the new init
  init = {"params": new_p, "opt_state": tx.init(new_p)}
  new, report = remap_state(plain_surgery, old, init, return_report=True)
  o, i, n = flat(old), flat(init), flat(new)
  reset = {l.path for l in report.of_kind("reset")}
  assert {"opt_state/0/v_row/l1/w", "opt_state/0/v_col/l1/w", "opt_state/0/v_col/l2/w"} <= reset
  left = {q: why for q, _, _, why in report.left_behind}
  for p in reset:
    np.testing.assert_array_equal(n[p], i[p])
    assert "cannot map" in left[p]
  # l2/b is unchanged by the plan: its statistics are copied even though they are not param-shaped
  assert report.copied["opt_state/0/v_row/l2/b"] == "opt_state/0/v_row/l2/b"
  np.testing.assert_array_equal(n["opt_state/0/v_row/l2/b"], o["opt_state/0/v_row/l2/b"])
  # the unfactored second moment of a vector parameter is param-shaped and remapped
  assert_image("hidden_bias", o["opt_state/0/v/l1/b"], n["opt_state/0/v/l1/b"], 0.0)
  with pytest.raises(SurgeryError, match="v_row/l1/w"):
    remap_state(plain_surgery, old, init, strict=True)


# -- (b) Linen TrainState ---------------------------------------------------------------------

def linen_module(nh):
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(OUT, name="l2")(jnp.tanh(nn.Dense(nh, name="l1")(x)))
  return MLP()


@pytest.mark.slow
def test_linen_train_state():
  from flax.training.train_state import TrainState
  old_m, new_m = linen_module(H_OLD), linen_module(H_NEW)
  old_v = jax.eval_shape(old_m.init, jax.random.key(0), X_OLD)     # abstract: planning allocates nothing
  new_v = jax.eval_shape(new_m.init, jax.random.key(0), X_NEW)
  surgery = jsf.plan_linen(old_m, new_m, old_v, new_v, X_OLD, X_NEW, js.Features(OLD), js.Features(NEW))
  assert surgery.new_table.paths[0].startswith("params/")

  tx = optax.adam(1e-2)
  old = TrainState.create(apply_fn=old_m.apply, params=old_m.init(jax.random.key(1), jnp.ones(X_OLD.shape))["params"],
                          tx=tx)
  x, y = data(jax.random.key(2), 3)
  step = jax.jit(lambda s: s.apply_gradients(
      grads=jax.grad(lambda p: jnp.mean((old_m.apply({"params": p}, x) - y) ** 2))(s.params)))
  for _ in range(STEPS):
    old = step(old)
  init = TrainState.create(apply_fn=new_m.apply, params=new_m.init(jax.random.key(3), jnp.ones(X_NEW.shape))["params"],
                           tx=tx)
  new, report = jsf.remap_train_state(surgery, old, init, return_report=True)
  assert isinstance(new, TrainState) and new.apply_fn is init.apply_fn and new.tx is init.tx
  check_state(report, old, init, new, [""], ["opt_state/0/mu/", "opt_state/0/nu/"])
  roots = {s.prefix: s.root for s in report.subtrees}
  assert roots == {"": "", "opt_state/0/mu/": "params/", "opt_state/0/nu/": "params/"}   # moments below params/
  assert int(new.step) == STEPS
  old_fn, _ = jsf.linen_fn(old_m, old_v)
  new_fn, _ = jsf.linen_fn(new_m, new_v)
  assert js.verify(surgery, old_fn, new_fn, {"params": old.params}, {"params": new.params}, X_OLD, X_NEW,
                   key=jax.random.key(4), atol=1e-5).ok
  jax.jit(lambda s: s.apply_gradients(grads=jax.tree.map(jnp.ones_like, s.params)))(new)   # training goes on


# -- (c) NNX model + nnx.Optimizer ------------------------------------------------------------

class Net(nnx.Module):
  def __init__(self, nin, nh, rngs):
    self.l1 = nnx.Linear(nin, nh, rngs=rngs)
    self.l2 = nnx.Linear(nh, OUT, rngs=rngs)
    self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)   # rng state: a key and a count

  def __call__(self, x):
    return self.l2(self.drop(jnp.tanh(self.l1(x))))


@pytest.fixture(scope="module")
def nnx_surgery():
  old = nnx.eval_shape(lambda: Net(3, H_OLD, nnx.Rngs(0)))
  new = nnx.eval_shape(lambda: Net(4, H_NEW, nnx.Rngs(0)))
  return jsf.plan_nnx(old, new, X_OLD, X_NEW, js.Features(OLD), js.Features(NEW))


def trained_nnx(seed, nh=H_OLD):
  model = Net(3, nh, nnx.Rngs(seed))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, y = data(jax.random.key(seed + 10), 3)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model))
  for _ in range(STEPS):
    step(model, opt)
  return model, opt


def test_nnx_model_and_optimizer(nnx_surgery):
  old_model, old_opt = trained_nnx(1)
  old_state = (nnx.state(old_model), nnx.state(old_opt))
  new_model = Net(4, H_NEW, nnx.Rngs(2))
  new_opt = nnx.Optimizer(new_model, optax.adam(1e-2), wrt=nnx.Param)
  init = (nnx.state(new_model), nnx.state(new_opt))
  init = jax.tree.map(lambda a: a, init)   # a snapshot: transplant updates the models in place

  report = jsf.transplant(nnx_surgery, (old_model, old_opt), (new_model, new_opt))
  check_state(report, old_state, init, (nnx.state(new_model), nnx.state(new_opt)), ["0/"],
              ["1/opt_state/0/mu/", "1/opt_state/0/nu/"])
  assert int(new_opt.step[...]) == STEPS
  np.testing.assert_array_equal(jax.random.key_data(new_model.drop.rngs.key[...]),
                                jax.random.key_data(old_model.drop.rngs.key[...]))   # the rng stream goes on
  assert jsf.verify_nnx(nnx_surgery, old_model, new_model, X_OLD, X_NEW, key=jax.random.key(3), atol=1e-5).ok

  # the same from a pure-dict checkpoint (nnx.to_pure_dict), returned instead of applied
  pure = (nnx.to_pure_dict(old_state[0]), nnx.to_pure_dict(old_state[1]))
  other = Net(4, H_NEW, nnx.Rngs(2))
  other_opt = nnx.Optimizer(other, optax.adam(1e-2), wrt=nnx.Param)
  state = jsf.remap_nnx(nnx_surgery, pure, (other, other_opt))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves((nnx.state(new_model), nnx.state(new_opt)))):
    np.testing.assert_array_equal(as_np(a), as_np(b))
  x = jax.random.normal(jax.random.key(5), (8, 4))
  nnx.jit(lambda m, o: o.update(m, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)))(new_model, new_opt)   # goes on
  assert int(new_opt.step[...]) == STEPS + 1


def test_nnx_wrong_model_names_the_path(nnx_surgery):
  wrong_model, wrong_opt = trained_nnx(1, nh=5)
  new_model = Net(4, H_NEW, nnx.Rngs(2))
  new_opt = nnx.Optimizer(new_model, optax.adam(1e-2), wrt=nnx.Param)
  before = np.asarray(new_model.l1.kernel[...]).copy()
  with pytest.raises(SurgeryError, match=r"'0/l1/kernel/value' is \(3, 5\)"):
    jsf.transplant(nnx_surgery, (wrong_model, wrong_opt), (new_model, new_opt))
  np.testing.assert_array_equal(np.asarray(new_model.l1.kernel[...]), before)   # nothing half-applied
  with pytest.raises(TypeError, match="in place"):
    jsf.transplant(nnx_surgery, nnx.state(wrong_model), nnx.state(new_model))


# -- (d) Orbax: save the old state, restore it into the new model ------------------------------------

@pytest.fixture
def ocp():
  return pytest.importorskip("orbax.checkpoint")   # a test dependency only; jaxsurgery.orbax imports it lazily


def test_orbax_restore_plain_state(plain_surgery, tmp_path, ocp):
  make_tx, moments = TXS["masked_chain"]    # MaskedNode / EmptyState: None in the checkpoint metadata
  tx = make_tx()
  old = trained_plain_state(tx, jax.random.key(1))
  old["key"] = jax.random.key(7)
  init = fresh_plain_state(tx, jax.random.key(2))
  init["key"] = jax.random.key(8)
  with ocp.CheckpointManager(tmp_path / "run") as mngr:
    mngr.save(STEPS, args=ocp.args.StandardSave(old))
    later = dict(old, params=jax.tree.map(jnp.zeros_like, old["params"]))
    mngr.save(STEPS + 1, args=ocp.args.StandardSave(later))
    mngr.wait_until_finished()
    # the manager object and an explicit step; no old model, no old abstract tree given
    new, report = jso.restore(plain_surgery, mngr, init, step=STEPS, return_report=True)
  check_state(report, old, init, new, ["params/", "ema/"], moments)
  np.testing.assert_array_equal(as_np(new["key"]), as_np(old["key"]))   # the rng stream goes on
  # the root directory (latest step: the zeroed state) and an explicit abstract tree
  latest = jso.restore(plain_surgery, tmp_path / "run", init)
  assert not np.asarray(latest["params"]["l1"]["w"])[:, :H_OLD].any()
  given = jso.restore(plain_surgery, tmp_path / "run", init, step=STEPS, old_state_abstract=jax.eval_shape(lambda: old))
  for path, x in flat(new).items():
    np.testing.assert_array_equal(as_np(flat(given)[path]), as_np(x))
  abstract = jso.old_abstract(tmp_path / "run", step=STEPS)
  assert flat(abstract)["params/l1/w"].shape == (3, H_OLD)


def test_orbax_restore_nnx_and_another_models_checkpoint(nnx_surgery, tmp_path, ocp):
  old_model, old_opt = trained_nnx(1)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "old", {"model": nnx.state(old_model), "opt": nnx.state(old_opt)})
  wrong_model, wrong_opt = trained_nnx(1, nh=5)
  ckpt.save(tmp_path / "wrong", {"model": nnx.state(wrong_model), "opt": nnx.state(wrong_opt)})
  ckpt.wait_until_finished()

  new_model = Net(4, H_NEW, nnx.Rngs(2))
  new_opt = nnx.Optimizer(new_model, optax.adam(1e-2), wrt=nnx.Param)
  init = {"model": nnx.state(new_model), "opt": nnx.state(new_opt)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  init = jax.device_put(init, sharding)
  state, report = jso.restore(nnx_surgery, tmp_path / "old", init, return_report=True)
  assert all(x.sharding == sharding for x in jax.tree.leaves(state))
  old_state = {"model": nnx.state(old_model), "opt": nnx.state(old_opt)}
  check_state(report, old_state, init, state, ["model/"], ["opt/opt_state/0/mu/", "opt/opt_state/0/nu/"])
  nnx.update(new_model, state["model"])
  nnx.update(new_opt, state["opt"])
  assert jsf.verify_nnx(nnx_surgery, old_model, new_model, X_OLD, X_NEW, key=jax.random.key(3), atol=1e-5).ok

  with pytest.raises(SurgeryError, match=r"'model/l1/kernel/value' is \(3, 5\).*'l1/kernel/value' \(3, 4\)"):
    jso.restore(nnx_surgery, tmp_path / "wrong", init)
  with pytest.raises(FileNotFoundError, match="No orbax checkpoint"):
    jso.restore(nnx_surgery, tmp_path / "nowhere", init)
