"""Issue 10: outputs have names (new actions, classes, tokens), aligned by name, never by position.

The planner follows every named output axis back to the parameters that write it (head columns
and bias entries move with their names); ``verify`` compares named outputs by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsurgery as js

OBS, ACTS = ["hp", "mana"], ["noop", "move", "attack", "cast"]


def policy(p, obs):
  h = jnp.tanh(obs @ p["enc"]["w"] + p["enc"]["b"])
  return {"logits": h @ p["head"]["w"] + p["head"]["b"], "value": (h @ p["v"]["w"])[..., 0]}


def log_policy(p, obs):
  out = policy(p, obs)
  return {**out, "logits": jax.nn.log_softmax(out["logits"])}


def params(nin, nh, na, seed):
  r = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(r.standard_normal(s, np.float32))
  return {"enc": {"w": n(nin, nh), "b": n(nh)}, "head": {"w": n(nh, na), "b": n(na)}, "v": {"w": n(nh, 1)}}


def obs(names):
  return jax.ShapeDtypeStruct((3, len(names)), jnp.float32)


def table(fn, p, obs_names, acts):
  return js.dependency_table(fn, p, obs(obs_names), js.Features(obs_names),
                             outputs={"logits": js.Features(acts), "value": "value"})


def surgery(old_acts, new_acts, *, old_obs=OBS, new_obs=OBS, nh=(4, 4), fn=policy, **plan_kw):
  old_p, new_init = params(len(old_obs), nh[0], len(old_acts), 0), params(len(new_obs), nh[1], len(new_acts), 1)
  s = js.plan(table(fn, old_p, old_obs, old_acts), table(fn, new_init, new_obs, new_acts), **plan_kw)
  new_p = s(old_p, new_init)
  check = js.verify(s, fn, fn, old_p, new_p, obs(old_obs), obs(new_obs), key=jax.random.key(0))
  return s, old_p, new_init, new_p, check


def test_a_new_action_and_a_new_observation_in_one_surgery():
  new_acts = ["noop", "move", "use_item", "attack", "cast"]
  s, old_p, new_init, new_p, check = surgery(ACTS, new_acts, new_obs=["hp", "armor", "mana"], nh=(4, 6))
  r = s.report
  assert r.preserved is True and check.ok, (r, check)
  assert r.outputs_added == ("use_item",) and r.outputs_moved == ("attack", "cast") and r.outputs_removed == ()
  assert r.added == ("armor",)
  w, b = np.asarray(new_p["head"]["w"]), np.asarray(new_p["head"]["b"])
  for k, name in enumerate(ACTS):   # every old action's column and bias entry, under its name
    j = new_acts.index(name)
    np.testing.assert_array_equal(w[:4, j], np.asarray(old_p["head"]["w"])[:, k])
    assert b[j] == old_p["head"]["b"][k]
  # the new action keeps its init where it reads old units: it trains from the first step
  np.testing.assert_array_equal(w[:4, 2], np.asarray(new_init["head"]["w"])[:4, 2])
  assert next(l for l in r.leaves if l.path == "head/w").how[1] == "outputs"   # aligned by name
  text = str(r)
  assert "outputs added: use_item" in text and "outputs moved: attack cast" in text
  assert "use_item" in r._repr_html_()


def test_output_names_are_their_own_namespace_and_reach_the_table():
  p = params(2, 4, 4, 0)
  t = js.dependency_table(policy, p, obs(OBS), js.Features(OBS),
                          outputs={"logits": js.Features(["hp", "b", "c", "d"]), "value": "mana"})
  assert t.features == ("hp", "mana") and t.output_features == ("hp", "b", "c", "d", "mana")
  assert js.dependency_table(policy, p, obs(OBS), js.Features(OBS)).output_features == ()


def test_renamed_outputs_move_with_their_names():
  # 4 of 5 names renamed, and reordered: the columns follow the names, not the positions
  old, new = ["a", "b", "c", "d", "e"], ["E", "a", "D", "C", "B"]
  s, old_p, _, new_p, check = surgery(old, new, rename={"b": "B", "c": "C", "d": "D", "e": "E"})
  assert s.report.preserved is True and check.ok
  assert s.report.renamed_outputs == {"b": "B", "c": "C", "d": "D", "e": "E"}
  w = np.asarray(new_p["head"]["w"])
  for k, name in enumerate(old):
    j = new.index(name if name == "a" else name.upper())
    np.testing.assert_array_equal(w[:, j], np.asarray(old_p["head"]["w"])[:, k])


def test_a_removed_output_is_dropped_and_reported():
  s, old_p, _, new_p, check = surgery(ACTS, ["noop", "attack", "cast"])
  r = s.report
  assert r.outputs_removed == ("move",) and r.preserved is True and check.ok
  head = next(l for l in r.leaves if l.path == "head/w")
  assert head.counts["dropped"] == 4   # the removed action's column: reported, not lost silently
  assert "outputs removed: move" in str(r)


def test_new_outputs_mean_fills_the_new_column_and_bias_with_the_old_mean():
  s, old_p, _, new_p, check = surgery(ACTS, ["noop", "move", "use_item", "attack", "cast"], new_outputs="mean")
  assert s.report.preserved is True and check.ok
  np.testing.assert_allclose(new_p["head"]["w"][:, 2], np.asarray(old_p["head"]["w"]).mean(1), rtol=1e-6)
  np.testing.assert_allclose(new_p["head"]["b"][2], np.asarray(old_p["head"]["b"]).mean(), rtol=1e-6)


def test_a_softmax_over_a_grown_output_axis_is_not_proven_and_the_reduction_is_named():
  new_acts = ["noop", "move", "use_item", "attack", "cast"]
  s, old_p, new_init, new_p, check = surgery(ACTS, new_acts, fn=log_policy)
  assert s.report.preserved is not True and not check.ok
  notes = " ".join(s.report.reasons)
  assert "logits" in notes and "reduce_max" in notes and "axis 1" in notes
  # the documented recipe: a large negative initial bias on the new logit keeps the old log-probabilities
  fixed = {**new_p, "head": {**new_p["head"], "b": new_p["head"]["b"].at[2].set(-1e9)}}
  check = js.verify(s, log_policy, log_policy, old_p, fixed, obs(OBS), obs(OBS), key=jax.random.key(0))
  assert check.ok, check


def lstm_policy(p, xs):
  """An LSTM over time (lax.scan) with an action head and a value head."""
  n = p["lstm"]["wh"].shape[0]

  def step(carry, x):
    h, c = carry
    z = x @ p["lstm"]["wx"] + h @ p["lstm"]["wh"] + p["lstm"]["b"]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((xs.shape[1], n), xs.dtype)
  _, hs = jax.lax.scan(step, (zeros, zeros), xs)
  return {"logits": hs @ p["head"]["w"] + p["head"]["b"], "value": hs @ p["v"]}


def lstm_params(nin, n, na, seed):
  r = np.random.default_rng(seed)
  g = lambda *s: jnp.asarray(0.5 * r.standard_normal(s, np.float32))
  return {"lstm": {"wx": g(nin, 4 * n), "wh": g(n, 4 * n), "b": g(4 * n)}, "head": {"w": g(n, na), "b": g(na)},
          "v": g(n, 1)}


def test_both_sides_at_once_new_feature_widened_lstm_new_action():
  old_obs, new_obs = ["hp", "mana"], ["hp", "gold", "mana"]
  new_acts = ["noop", "move", "buyback", "attack", "cast"]
  xo, xn = (jax.ShapeDtypeStruct((4, 2, len(o)), jnp.float32) for o in (old_obs, new_obs))
  old_p, new_init = lstm_params(2, 4, 4, 0), lstm_params(3, 6, 5, 1)
  spec = lambda acts: {"logits": js.Features(acts, axis=-1), "value": None}
  ot = js.dependency_table(lstm_policy, old_p, xo, js.Features(old_obs, axis=-1), outputs=spec(ACTS))
  nt = js.dependency_table(lstm_policy, new_init, xn, js.Features(new_obs, axis=-1), outputs=spec(new_acts))
  s = js.plan(ot, nt)
  new_p = s(old_p, new_init)
  check = js.verify(s, lstm_policy, lstm_policy, old_p, new_p, xo, xn, key=jax.random.key(0))
  assert s.report.preserved is True and check.ok, (s.report, check)
  assert s.report.outputs_added == ("buyback",) and s.report.added == ("gold",)


def test_a_cond_predicate_touches_nothing_so_branch_kernels_keep_their_rows():
  def fn(p, x):
    return jax.lax.cond(x[0, -1] > 0, lambda x: x @ p["a"], lambda x: jnp.tanh(x @ p["b"]), x)

  r = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(r.standard_normal(s, np.float32))
  old_p, new_init = {"a": n(3, 2), "b": n(3, 2)}, {"a": n(4, 2), "b": n(4, 2)}
  xo, xn = jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((2, 4), jnp.float32)
  ot = js.dependency_table(fn, old_p, xo, js.Features(["hp", "mana", "flag"]))
  nt = js.dependency_table(fn, new_init, xn, js.Features(["armor", "hp", "mana", "flag"]))
  np.testing.assert_array_equal(ot.mask("a")[:, 0], np.eye(3, dtype=bool))   # the flag touches only its row
  assert js.cross_check(ot, js.gradient_table(fn, old_p, xo, js.Features(["hp", "mana", "flag"]),
                                              key=jax.random.key(0))).ok
  s = js.plan(ot, nt, strict=True)
  new_p = s(old_p, new_init)
  np.testing.assert_array_equal(new_p["a"][1:], old_p["a"])
  assert js.verify(s, fn, fn, old_p, new_p, xo, xn, key=jax.random.key(0)).ok


def test_plans_with_output_names_persist(tmp_path):
  s, old_p, new_init, new_p, _ = surgery(ACTS, ["noop", "move", "use_item", "attack", "cast"])
  s.save(str(tmp_path / "plan"))
  loaded = js.load_surgery(str(tmp_path / "plan"))
  assert loaded.new_table.output_features == s.new_table.output_features
  assert loaded.report.outputs_added == ("use_item",)
  jax.tree.map(np.testing.assert_array_equal, loaded(old_p, new_init), new_p)


@pytest.mark.parametrize("outputs, match", [
    ({"logits": js.Features(ACTS)}, r"(?s)outputs spec does not match the structure of the outputs.*logits.*value"),
    ({"logits": js.Features(["a", "a", "b", "c"]), "value": None}, r"Duplicate output name 'a'"),
    ({"logits": js.Features(ACTS), "value": "noop"}, r"Duplicate output name 'noop'.*'logits'.*'value'"),
    ({"logits": js.Features(ACTS, axis=2), "value": None}, r"axis=2\) is out of range for output leaf 'logits'"),
    ({"logits": js.Features(ACTS[:3]), "value": None}, r"Output leaf 'logits' has shape \(3, 4\).*3 names"),
    ({"logits": 3, "value": None}, r"Outputs spec leaf at 'logits' is 3"),
])
def test_bad_outputs_specs_name_the_leaf_and_the_fix(outputs, match):
  with pytest.raises(js.FeatureSpecError, match=match):
    js.dependency_table(policy, params(2, 4, 4, 0), obs(OBS), js.Features(OBS), outputs=outputs)


def test_a_rename_target_that_is_already_another_output_is_an_error():
  old_p, new_init = params(2, 4, 4, 0), params(2, 4, 4, 1)
  ot, nt = table(policy, old_p, OBS, ACTS), table(policy, new_init, OBS, ["noop", "move", "attack", "cast"])
  with pytest.raises(js.SurgeryError, match=r"old output 'move' to 'attack'.*already has output 'attack'"):
    js.plan(ot, nt, rename={"move": "attack"})
  with pytest.raises(js.SurgeryError, match=r"two old features would become one"):
    js.plan(ot, nt, rename={"hp": "mana"})


def test_an_axis_the_names_cannot_reach_is_aligned_by_position_with_a_warning_and_strict_raises():
  from jax.extend.core import Primitive
  from jax.interpreters import mlir

  flip = Primitive("flip_without_a_rule")
  flip.def_impl(lambda x: x[..., ::-1])
  flip.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  mlir.register_lowering(flip, mlir.lower_fun(lambda x: x[..., ::-1], multiple_results=False))
  fn = lambda p, x: flip.bind(x) @ p["w"]
  xo, xn = jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((2, 4), jnp.float32)
  with pytest.warns(js.UnknownPrimitiveWarning, match="flip_without_a_rule"):
    ot = js.dependency_table(fn, {"w": jnp.ones((3, 2))}, xo, js.Features(["a", "b", "c"]))
    nt = js.dependency_table(fn, {"w": jnp.ones((4, 2))}, xn, js.Features(["a", "new", "b", "c"]))
  report = js.plan(ot, nt).report
  assert report.preserved is None
  assert any("'w' axis 0 (3 -> 4) is aligned by position" in r for r in report.reasons), report.reasons
  with pytest.raises(js.SurgeryError, match="aligned by position"):
    js.plan(ot, nt, strict=True)
