"""Optimizer state across a surgery (issue 11 section 1): exact for old elements, fresh-sized for new ones,
the matching operator for cloned and rescaled elements, and a local warm-up.

The model is test_integrations.py's: an MLP reading (hp, mana, x) through 4 hidden units becomes one
reading (x, hp, armor, mana) through 6 -- a new feature inserted, the others reordered, new units
("random in, zero out"). The function is preserved for any value of the new feature, so the old
elements' gradients on a batch are the old model's gradients on the same batch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsurgery as js
import jaxsurgery.flax as jsf
from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import SurgeryError
from jaxsurgery._src.optim import moments
from jaxsurgery._src.optim.adam import adam, adamw, scale_by_adam
from jaxsurgery._src.optim.freeze import freeze_fresh
from jaxsurgery._src.surgery import remap as remap_lib
from jaxsurgery._src.surgery import state as state_lib
from jaxsurgery._src.surgery.state import remap_state

OLD, NEW = ["hp", "mana", "x"], ["x", "hp", "armor", "mana"]
H_OLD, H_NEW, OUT, STEPS, LR, WD = 4, 6, 2, 5, 1e-2, 1e-2


def flat(tree) -> dict:
  return {feats.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mlp(p, x):
  return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]


def normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))   # numpy draws: no compile per shape


def mlp_params(seed, nin, nh):
  r = np.random.default_rng(seed)
  return {"l1": {"w": normal(r, nin, nh), "b": normal(r, nh)}, "l2": {"w": normal(r, nh, OUT), "b": normal(r, OUT)}}


def loss(p, x, y):
  return jnp.mean((mlp(p, x) - y) ** 2)


def batch(seed, names):
  """A batch over OLD's features; NEW's batch holds the same values (armor: arbitrary values)."""
  r = np.random.default_rng(seed)
  x, y, armor = normal(r, 16, len(OLD)), normal(r, 16, OUT), normal(r, 16)
  cols = {f: x[:, OLD.index(f)] if f in OLD else armor for f in names}
  return jnp.stack([cols[f] for f in names], 1), y


@pytest.fixture(scope="module")
def surgery():
  table = lambda nin, nh, names: js.dependency_table(mlp, mlp_params(0, nin, nh),
                                                     jax.ShapeDtypeStruct((16, nin), jnp.float32), js.Features(names))
  return js.plan(table(3, H_OLD, OLD), table(4, H_NEW, NEW))


def train(tx, params, steps=STEPS, names=OLD):
  state = tx.init(params)
  step = jax.jit(lambda p, s, x, y: _step(tx, p, s, x, y))
  for i in range(steps):
    params, state, _ = step(params, state, *batch(100 + i, names))
  return params, state


def _step(tx, params, state, x, y):
  grads = jax.grad(loss)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, updates


LONG = 10_000   # a long run: bias correction ~1, where a copied count hurts fresh elements most


def aged(opt_state, count=LONG):
  """The optax Adam states in ``opt_state`` with their count set to ``count`` (as after a long run)."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return jax.tree.map(lambda x: x._replace(count=jnp.int32(count)) if is_adam(x) else x, opt_state, is_leaf=is_adam)


def first_update(tx, params, state, names):
  """The update of the step after surgery (step STEPS + 1), on the batch the old run would see."""
  x, y = batch(100 + STEPS, names)
  return jax.jit(lambda p, s: _step(tx, p, s, x, y)[2])(params, state)


def images(surgery, old_tree, new_like):
  """``old_tree`` carried to the new layout (nan where fresh): what an old element's value becomes."""
  fresh = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), new_like)
  return js.remap_state(surgery, {"params": old_tree}, {"params": fresh}, prefixes=["params"])["params"]


def fresh_masks(surgery, like):
  return {p: np.broadcast_to(moments.fresh_mask(surgery.leaf_plans[p]), x.shape) for p, x in flat(like).items()}


# -- (a), (b): old elements exact, fresh elements fresh-sized ----------------------------------------

CLIP = 1.0
OPTS = {   # old run (optax) -> new run (per-element counts); the chain clips per element (a global norm would
           # see the fresh elements' gradients and change every old update)
    "adam": (lambda: optax.adam(LR), lambda: adam(LR)),
    "adamw": (lambda: optax.adamw(LR, weight_decay=WD), lambda: adamw(LR, weight_decay=WD)),
    "chain": (lambda: optax.chain(optax.clip(CLIP), optax.scale_by_adam(), optax.add_decayed_weights(WD),
                                  optax.scale_by_learning_rate(LR)),
              lambda: optax.chain(optax.clip(CLIP), scale_by_adam(), optax.add_decayed_weights(WD),
                                  optax.scale_by_learning_rate(LR))),
}


@pytest.mark.parametrize("name", list(OPTS))
def test_first_update_after_surgery_is_exact_for_old_and_fresh_sized_for_new_elements(surgery, name):
  make_old, make_new = OPTS[name]
  old_params, old_opt = train(make_old(), mlp_params(1, 3, H_OLD))
  old_opt = aged(old_opt)
  u_old = first_update(make_old(), old_params, old_opt, OLD)    # what the old run does next

  new_tx = make_new()
  init_params = mlp_params(2, 4, H_NEW)
  new, report = remap_state(surgery, {"params": old_params, "opt": old_opt},
                            {"params": init_params, "opt": new_tx.init(init_params)}, return_report=True)
  counts = [l for l in report.leaves if "/counts/" in l.path]
  assert counts and all(l.kind == "remapped" and l.old_path.endswith("count") for l in counts), report
  kernel_counts = np.asarray(flat(new)[next(l.path for l in counts if l.path.endswith("counts/l1/w"))])
  assert kernel_counts[NEW.index("hp"), 0] == LONG and kernel_counts[NEW.index("armor"), 0] == 0
  u_new = flat(first_update(new_tx, new["params"], new["opt"], NEW))
  expected_old = flat(images(surgery, u_old, init_params))
  fresh = fresh_masks(surgery, init_params)

  # a freshly initialised optax run, given the same gradients and params: what fresh elements should do
  fresh_tx = make_old()
  u_fresh = flat(first_update(fresh_tx, new["params"], fresh_tx.init(new["params"]), NEW))
  # the old behaviour: optax's state remapped as it is (count copied, zero moments)
  plain = remap_state(surgery, {"params": old_params, "opt": old_opt},
                      {"params": init_params, "opt": make_old().init(init_params)})
  u_plain = flat(first_update(make_old(), plain["params"], plain["opt"], NEW))
  x, y = batch(100 + STEPS, NEW)
  grads = flat(jax.grad(loss)(new["params"], x, y))
  moved = 0
  for p, u in u_new.items():
    u, f = np.asarray(u), fresh[p]
    np.testing.assert_allclose(u[~f], np.asarray(expected_old[p])[~f], atol=1e-6, rtol=0, err_msg=p)
    np.testing.assert_allclose(u[f], np.asarray(u_fresh[p])[f], atol=1e-6, rtol=1e-5, err_msg=p)
    big = f & (np.abs(np.asarray(grads[p])) > 1e-5)   # fresh elements with a real gradient
    if big.any():
      moved += int(big.sum())
      np.testing.assert_array_less(np.abs(u[big]), 1.5 * LR)    # fresh Adam: ~lr per element
      assert np.all(np.abs(np.asarray(u_plain[p])[big]) > 2.5 * np.abs(u[big])), p   # copied count: ~3.16x
  assert moved >= H_NEW   # the armor row and the new units' output rows have real gradients


def test_nnx_optimizer_transplant_with_per_element_counts(surgery):
  class Net(nnx.Module):
    def __init__(self, nin, nh, rngs):
      self.l1, self.l2 = nnx.Linear(nin, nh, rngs=rngs), nnx.Linear(nh, OUT, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  abstract = lambda nin, nh: nnx.eval_shape(lambda: Net(nin, nh, nnx.Rngs(0)))
  shapes = lambda n: jax.ShapeDtypeStruct((16, n), jnp.float32)
  nnx_surgery = jsf.plan_nnx(abstract(3, H_OLD), abstract(4, H_NEW), shapes(3), shapes(4), js.Features(OLD),
                             js.Features(NEW), wrt=nnx.Param)
  old_model = Net(3, H_OLD, nnx.Rngs(1))
  old_opt = nnx.Optimizer(old_model, optax.adam(LR), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))   # values, not the variables updated in place
    opt.update(model, grads)
    return jax.tree.map(lambda a, b: a - b, nnx.state(model, nnx.Param), before)
  for i in range(STEPS):
    step(old_model, old_opt, *batch(100 + i, OLD))
  new_model = Net(4, H_NEW, nnx.Rngs(2))
  new_opt = nnx.Optimizer(new_model, adam(LR), wrt=nnx.Param)
  report = jsf.transplant(nnx_surgery, (old_model, old_opt), (new_model, new_opt))
  assert any(l.path.startswith("1/opt_state/0/counts/") and l.kind == "remapped" for l in report.leaves), report
  counts = flat(nnx.state(new_opt))["opt_state/0/counts/l1/kernel/value"]
  assert int(counts[NEW.index("hp"), 0]) == STEPS and int(counts[NEW.index("armor"), 0]) == 0

  u_old = flat(step(old_model, old_opt, *batch(100 + STEPS, OLD)))
  u_new = flat(step(new_model, new_opt, *batch(100 + STEPS, NEW)))
  w_old, w_new = np.asarray(u_old["l1/kernel/value"]), np.asarray(u_new["l1/kernel/value"])
  assert np.abs(w_old).max() > 0.5 * LR   # a real update to compare
  for f in OLD:   # old rows, old units: the old run's update
    np.testing.assert_allclose(w_new[NEW.index(f), :H_OLD], w_old[OLD.index(f)], atol=1e-6, rtol=0)
  armor = np.abs(w_new[NEW.index("armor"), :H_OLD])   # fresh (zeroed) row with a real gradient: ~lr, not 3 lr
  assert np.all(armor > 0.5 * LR) and np.all(armor < 1.5 * LR), armor


# -- (c) copied elements under linear recipes: clones and scales ---------------------------------------

def clone_surgery(widen_to: int):
  table = lambda nh: js.dependency_table(mlp, mlp_params(0, 3, nh),
                                         jax.ShapeDtypeStruct((16, 3), jnp.float32), js.Features(OLD))
  return js.plan(table(H_OLD), table(widen_to), widen="clone", clone_noise=0.0)


def grads_and_step(tx, params, opt_state, names=OLD, loss=loss):
  """The gradients on the next batch, and the optimizer state after the step."""
  x, y = batch(100 + STEPS, names)

  @jax.jit
  def run(params, opt_state):
    g = jax.grad(loss)(params, x, y)
    return g, tx.update(g, opt_state, params)[1]
  return run(params, opt_state)


def test_cloned_units_get_the_moments_of_the_grown_models_gradients():
  """Staged Training's check: after surgery, one step; the grown model's real gradients, m and v equal
  the old ones carried by the operator (fan-out copies of a unit cloned n times: g/n, m/n, v/n^2; its
  fan-in, scaled by 1/n: g, m, v)."""
  n = 2
  surgery = clone_surgery(n * H_OLD)
  leaves = surgery.leaf_plans
  assert leaves["l2/w"].scale == 1 / n and leaves["l1/w"].maps[1].tolist() == [0, 1, 2, 3] * n
  old_params, old_opt = train(optax.adam(LR), mlp_params(1, 3, H_OLD))
  init = mlp_params(2, 3, n * H_OLD)
  grown = remap_state(surgery, {"params": old_params, "opt": old_opt},
                      {"params": init, "opt": adam(LR).init(init)})
  x = batch(7, OLD)[0]
  np.testing.assert_allclose(mlp(grown["params"], x), mlp(old_params, x), rtol=1e-5, atol=1e-6)

  g_old, old_after = grads_and_step(optax.adam(LR), old_params, old_opt)
  g_new, new_after = grads_and_step(adam(LR), grown["params"], grown["opt"])
  predicted = remap_state(surgery, {"g": g_old, "opt": old_after},
                          {"g": init, "opt": adam(LR).init(init)}, roles={"g": "grad"})
  real = {"g": g_new, "mu": new_after[0].mu, "nu": new_after[0].nu}
  pred = {"g": predicted["g"], "mu": predicted["opt"][0].mu, "nu": predicted["opt"][0].nu}
  for what in real:
    for p, r in flat(real[what]).items():
      np.testing.assert_allclose(np.asarray(flat(pred[what])[p]), np.asarray(r), rtol=2e-5, atol=1e-9,
                                 err_msg=f"{what} {p}")
  # the same facts by hand: fan-out weights of the clones (l1/w columns) see g/n, their fan-in (l2/w rows) g
  np.testing.assert_allclose(g_new["l1"]["w"], np.tile(g_old["l1"]["w"], (1, n)) / n, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(g_new["l2"]["w"], np.tile(g_old["l2"]["w"], (n, 1)), rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(new_after[0].nu["l1"]["w"], np.tile(old_after[0].nu["l1"]["w"], (1, n)) / n ** 2,
                             rtol=2e-5, atol=1e-12)
  # copying the moments unchanged (what a plain index map does) would be wrong for the cloned fan-out
  naive = np.tile(old_opt[0].nu["l1"]["w"], (1, n))
  assert not np.allclose(np.asarray(grown["opt"][0].nu["l1"]["w"]), naive, rtol=1e-3)


def scaled(leaf, **recipe):
  return dataclasses.replace(leaf, **recipe)


def test_rescaled_and_mean_filled_leaves():
  """A leaf only rescaled (W' = s W, the function compensating: g' = g/s, v' = v/s^2) and new units whose
  in-weights are the mean of the old ones (no gradient on the old data: fresh moments, count 0)."""
  s = 2.0

  def scaled_mlp(p, x):   # the new model divides its first layer by s: W1' = s W1 keeps the function
    return jnp.tanh(x @ p["l1"]["w"] / s + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]
  base = js.plan(*(js.dependency_table(mlp, mlp_params(0, 3, nh),
                                       jax.ShapeDtypeStruct((16, 3), jnp.float32), js.Features(OLD))
                   for nh in (H_OLD, H_NEW)))
  leaves = dict(base.leaf_plans)
  leaves["l1/w"] = scaled(leaves["l1/w"], scale=s, mean_axes=(1,))
  surgery = js.Surgery(base.old_table, base.new_table, dataclasses.replace(base.report, leaves=tuple(
      leaves[l.path] for l in base.report.leaves)))
  old_params, old_opt = train(optax.adam(LR), mlp_params(1, 3, H_OLD))
  init = mlp_params(2, 3, H_NEW)
  grown = remap_state(surgery, {"params": old_params, "opt": old_opt}, {"params": init, "opt": adam(LR).init(init)})
  w = np.asarray(grown["params"]["l1"]["w"])
  np.testing.assert_allclose(w[:, :H_OLD], s * np.asarray(old_params["l1"]["w"]), rtol=1e-6)
  np.testing.assert_allclose(w[:, H_OLD:], s * np.asarray(old_params["l1"]["w"]).mean(1, keepdims=True)
                             .repeat(H_NEW - H_OLD, 1), rtol=1e-5)

  x, y = batch(100 + STEPS, OLD)
  new_loss = lambda p, x, y: jnp.mean((scaled_mlp(p, x) - y) ** 2)
  np.testing.assert_allclose(new_loss(grown["params"], x, y), loss(old_params, x, y), rtol=1e-5)
  g_old, old_after = grads_and_step(optax.adam(LR), old_params, old_opt)
  g_new, new_after = grads_and_step(adam(LR), grown["params"], grown["opt"], loss=new_loss)
  np.testing.assert_allclose(g_new["l1"]["w"][:, :H_OLD], g_old["l1"]["w"] / s, rtol=2e-5, atol=1e-9)
  np.testing.assert_array_equal(g_new["l1"]["w"][:, H_OLD:], 0.0)
  np.testing.assert_allclose(new_after[0].mu["l1"]["w"][:, :H_OLD], old_after[0].mu["l1"]["w"] / s, rtol=2e-5,
                             atol=1e-9)
  np.testing.assert_allclose(new_after[0].nu["l1"]["w"][:, :H_OLD], old_after[0].nu["l1"]["w"] / s ** 2,
                             rtol=2e-5, atol=1e-12)
  np.testing.assert_array_equal(new_after[0].nu["l1"]["w"][:, H_OLD:], 0.0)
  np.testing.assert_array_equal(grown["opt"][0].counts["l1"]["w"][:, H_OLD:], 0)
  assert (np.asarray(grown["opt"][0].counts["l1"]["w"][:, :H_OLD]) == STEPS).all()


# -- (d) warm-up: fresh elements held still while their moments fill ------------------------------------

def test_freeze_fresh_holds_new_elements_while_old_ones_train(surgery):
  k = 3
  old_params, old_opt = train(optax.adam(LR), mlp_params(1, 3, H_OLD))
  tx = optax.chain(adam(LR), freeze_fresh(k))
  init = mlp_params(2, 4, H_NEW)
  state = remap_state(surgery, {"params": old_params, "opt": (old_opt,)},   # optax adam -> chain(adam, freeze)
                      {"params": init, "opt": tx.init(init)}, strict=True)
  ages = flat(state["opt"][1].ages)
  fresh = fresh_masks(surgery, init)
  for p, a in ages.items():
    np.testing.assert_array_equal(np.asarray(a), np.where(fresh[p], 0, k), err_msg=p)
  with pytest.raises(ValueError, match="steps"):
    freeze_fresh(-1)

  params, opt = state["params"], state["opt"]
  start = flat(params)
  u_old = flat(images(surgery, first_update(optax.adam(LR), old_params, old_opt, OLD), init))

  @jax.jit
  def step(params, opt, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, updates, grads
  seen = []
  for i in range(k + 1):
    params, opt, updates, grads = step(params, opt, *batch(100 + STEPS + i, NEW))
    u, _ = flat(updates), seen.append(grads)
    for p, f in fresh.items():
      if i == 0:   # old elements: the old run's next update, as without the freeze
        np.testing.assert_allclose(np.asarray(u[p])[~f], np.asarray(u_old[p])[~f], atol=1e-6, err_msg=p)
      if i < k:
        np.testing.assert_array_equal(np.asarray(flat(params)[p])[f], np.asarray(start[p])[f], err_msg=p)
  # unfrozen, fresh elements take the step a fresh Adam takes after the same k + 1 gradients
  reference, ref_state = None, optax.adam(LR).init(init)
  for g in seen:
    reference, ref_state = optax.adam(LR).update(g, ref_state)
  for p, f in fresh.items():
    np.testing.assert_allclose(np.asarray(u[p])[f], np.asarray(flat(reference)[p])[f], atol=1e-6, err_msg=p)
  assert np.abs(np.asarray(u["l1/w"])[NEW.index("armor")]).max() > 0.1 * LR   # it moves now

  # a new run that starts with a fresh optimizer marks the plan's fresh elements itself
  ages = flat(freeze_fresh(k, surgery).init(init).ages)
  for p, a in ages.items():
    np.testing.assert_array_equal(np.asarray(a), np.where(fresh[p], 0, k), err_msg=p)


# -- bad input, and the remap's programs ------------------------------------------------------------------

def test_an_optimizer_state_that_does_not_fit_names_the_path(surgery):
  old_params, old_opt = train(adam(LR), mlp_params(1, 3, H_OLD))
  init = mlp_params(2, 4, H_NEW)
  new_init = {"params": init, "opt": adam(LR).init(init)}
  # another model's moments (5 hidden units) under the same paths
  _, wrong = train(adam(LR), mlp_params(1, 3, 5))
  with pytest.raises(SurgeryError, match=r"'opt/0/mu/l1/w' is \(3, 5\) float32"):
    remap_state(surgery, {"params": old_params, "opt": wrong}, new_init)
  # per-element counts that are not the old params' shape
  bad = old_opt[0]._replace(counts=jax.tree.map(lambda c: c[..., :1], old_opt[0].counts))
  with pytest.raises(SurgeryError, match=r"'opt/0/counts/l1/w' is \(3, 1\) int32, but it should be per-element"):
    remap_state(surgery, {"params": old_params, "opt": (bad, old_opt[1])}, new_init)
  # another optimizer (sgd momentum): nothing is invented; strict names what is missing
  _, sgd = train(optax.sgd(LR, momentum=0.9), mlp_params(1, 3, H_OLD))
  _, report = remap_state(surgery, {"params": old_params, "opt": sgd}, new_init, return_report=True)
  assert {l.prefix for l in report.of_kind("missing")} == {"opt/0/mu/", "opt/0/nu/", "opt/0/counts/"}
  assert {p for p, *_ in report.left_behind} >= {"opt/0/trace/l1/w"}
  with pytest.raises(SurgeryError, match=r"(?s)strict=True.*'opt/0/mu/l1/w': missing.*opt/0/trace/l1/w"):
    remap_state(surgery, {"params": old_params, "opt": sgd}, new_init, strict=True)
  with pytest.raises(ValueError, match="a role is one of"):
    remap_state(surgery, {"params": old_params, "opt": old_opt}, new_init, roles={"opt/0/mu": "moment"})


def test_large_remaps_run_as_programs_of_about_one_leaf(surgery, monkeypatch):
  old_params, old_opt = train(adam(LR), mlp_params(1, 3, H_OLD))
  init = mlp_params(2, 4, H_NEW)
  old, new_init = {"params": old_params, "opt": old_opt}, {"params": init, "opt": adam(LR).init(init)}
  one = remap_state(surgery, old, new_init)
  splan = state_lib.plan_state(surgery, old, new_init)
  traced = [s for s in splan.steps if s.op == "plan"]
  assert len(state_lib._programs(surgery.leaf_plans, traced, splan.old_leaves, splan.new_leaves)) == 1
  monkeypatch.setattr(remap_lib, "PROGRAM_BYTES", 0)
  groups = state_lib._programs(surgery.leaf_plans, traced, splan.old_leaves, splan.new_leaves)
  largest = max(remap_lib.shard_bytes(splan.new_leaves[s.new_index]) for s in traced)
  sizes = [sum(remap_lib.shard_bytes(splan.new_leaves[s.new_index]) for s in g
               if not moments.is_identity(surgery.leaf_plans[s.param], s.role)) for g in groups]
  assert len(groups) > 3 and max(sizes) <= largest, sizes
  split = remap_state(surgery, old, new_init)
  for p, x in flat(one).items():
    np.testing.assert_array_equal(np.asarray(flat(split)[p]), np.asarray(x), err_msg=p)


def test_large_param_remaps_run_as_programs_of_about_one_leaf(surgery, monkeypatch):
  """Eager ``surgery(old, init)`` past the program budget: one cached program per moving leaf (an
  unchanged leaf rides along), the same values as one program and as ``apply``."""
  old_params, init = train(adam(LR), mlp_params(1, 3, H_OLD))[0], mlp_params(2, 4, H_NEW)
  one = surgery(old_params, init)
  monkeypatch.setattr(remap_lib, "PROGRAM_BYTES", 0)
  groups = surgery._programs(old_params, init)
  moving = [not remap_lib.copies_as_is(surgery.leaf_plans[p]) for p in flat(init)]
  assert 1 < len(groups) <= sum(moving) and sorted(i for g in groups for i in g) == list(range(len(moving)))
  before = len(surgery._compiled)
  split = surgery(old_params, init)
  assert len(surgery._compiled) - before == len(groups)
  for p, x in flat(surgery.apply(old_params, init)).items():
    np.testing.assert_array_equal(np.asarray(flat(split)[p]), np.asarray(x), err_msg=p)
    np.testing.assert_array_equal(np.asarray(flat(one)[p]), np.asarray(x), err_msg=p)
