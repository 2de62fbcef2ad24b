"""Tests of the gradient probe (gradient_table) and its cross-check against the boolean table."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402

import jaxsurgery as js  # noqa: E402
from jaxsurgery._src.rules import registry  # noqa: E402  (the real dot_general rule, to break it)

KEY = jax.random.key(0)  # results were also checked with keys 1-4


def _five_base(m):
  """Base at the running means: the normalised unit and global features vanish."""
  base = jax.tree.map(jnp.zeros_like, m.inputs)
  base["units"] = jnp.broadcast_to(m.params["obs_norm"]["mean"], m.inputs["units"].shape)
  base["globals"] = jnp.broadcast_to(m.params["globals_norm"]["mean"], m.inputs["globals"].shape)
  return {"base": base, "keep": ("obs_norm/mean", "globals_norm/mean")}


def _batchnorm_base(m):
  mean = m.params["batch_stats"]["in_norm"]["mean"]
  return {"base": jnp.broadcast_to(mean, m.inputs.shape),
          "keep": ("batch_stats/in_norm/mean", "batch_stats/in_norm/var")}


# Probe options per model (design §5: a base at the running mean, statistics kept).
OPTIONS = {"five": _five_base, "batchnorm": _batchnorm_base}

# Singles on which the gradient cannot single out features, with the reason. Everywhere else
# the probe must agree with the table exactly, element by element.
NOT_ANNIHILATED = {
    "embedding": {
        "hero_embed": "row of the base id is gathered at the base: its gradient is the downstream cotangent",
        "item_embed": "row of the base id is gathered at the base",
        "dense1/kernel": "rows reading the gathered embeddings multiply a nonzero base value",
    },
    "batchnorm": {
        "batch_stats/in_norm/mean": "additive (x - mean)",
        "params/in_norm/bias": "additive",
        "params/dense1/kernel": "multiplies the normalised input, which is the BatchNorm bias at the base",
    },
    "five": {
        "obs_norm/mean": "additive (x - mean)",
        "globals_norm/mean": "additive (x - mean)",
        "unit_embed": "row of the base id is gathered at the base",
    },
}


def _tables(m, **kw):
  opts = OPTIONS[m.name](m) if m.name in OPTIONS else {}
  opts.update(kw)
  table = js.dependency_table(m.fn, m.params, m.inputs, m.features)
  probe = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, **opts)
  return table, probe


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_cross_check(name):
  m = zoo.get(name)
  table, probe = _tables(m)
  assert isinstance(probe, js.FeatureTable) and probe.method == "gradient"
  assert probe.paths == table.paths and probe.features == table.features
  check = js.cross_check(table, probe)
  assert check.ok, check.report()
  assert not check.missed and not check.output_missed
  # The probe finds something on every model (no vacuous pass).
  assert sum(a.both for a in check.per_leaf.values()) > 0
  # Output dependence: the probe's forward differences sit inside the forward masks, and the
  # first output depends on at least one feature.
  for p in table.output_paths:
    assert not (probe.output_mask(p) & ~table.output_mask(p)).any()
  assert any(probe.output_mask(p).any() for p in probe.output_paths)
  # Every legitimate difference names the operation that explains it.
  for d in check.legitimate:
    assert d.op and d.path in d.explanation and "`" in d.explanation
  special = NOT_ANNIHILATED.get(name, {})
  for s in m.singles:
    a = check.per_leaf[s]
    assert a.missed == 0
    if s in special:
      assert a.probe_only == a.legitimate > 0, (s, a)
      if a.table_only:  # the gradient is blind to additive first contacts
        assert "additive" in check.table_only_notes[s], check.table_only_notes[s]
    else:
      assert a.exact, (s, a, check.report())
      np.testing.assert_array_equal(table.mask(s), probe.mask(s))
  for s in special:
    assert s in m.singles


REAL_DOT_GENERAL = registry.lookup("dot_general")


def broken_dot_general(ctx, eqn, invals):
  """The real dot_general rule, but blind to the rhs's provenance: no touch reaches the kernel."""
  lhs, rhs = invals[:2]
  blind = js.Val(rhs.shape, rhs.dtype, mask=rhs.mask, pull=None, const=rhs.const)
  return REAL_DOT_GENERAL(ctx, eqn, [lhs, blind] + list(invals[2:]))


def test_broken_rule_is_caught():
  m = zoo.get("mlp_tanh")
  with js.override_rule("dot_general", broken_dot_general):
    broken = js.dependency_table(m.fn, m.params, m.inputs, m.features)
  assert broken.mask("dense1/kernel").sum() == 0  # the override took effect
  probe = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY)
  check = js.cross_check(broken, probe)
  assert not check.ok
  assert "FAILED" in check.report() and "dense1/kernel" in check.report()
  missed = {(x.path, x.index, x.feature) for x in check.missed}
  # Every row of the first kernel is missed with exactly its own feature.
  for i in range(5):
    for k in range(8):
      assert ("dense1/kernel", (i, k), f"obs{i}") in missed
  assert not any(p == "dense1/kernel" and f != f"obs{idx[0]}" for p, idx, f in missed)
  assert {p for p, _, _ in missed} == {"dense1/kernel", "dense2/kernel", "out/kernel"}
  assert all("contact" in x.explanation for x in check.missed)
  # The real rule, same probe: nothing missed.
  assert js.cross_check(js.dependency_table(m.fn, m.params, m.inputs, m.features), probe).ok


def test_broken_forward_rule_is_caught_on_outputs():
  fn = lambda p, x: jnp.tanh(x @ p["w"]) + p["b"]
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  x, spec = jnp.ones((1, 3)), js.Features(["a", "b", "c"])
  drop = lambda ctx, eqn, invals: [js.Val(tuple(o.aval.shape), o.aval.dtype) for o in eqn.outvars]
  with js.override_rule("tanh", drop):
    broken = js.dependency_table(fn, params, x, spec)
  check = js.cross_check(broken, js.gradient_table(fn, params, x, spec, key=KEY))
  assert not check.ok
  assert {(o.index, o.feature) for o in check.output_missed} == {
      ((0, j), f) for j in range(2) for f in "abc"}


def test_design_example_is_legitimate():
  """design §5: an additive parameter later multiplied by a raw feature."""
  fn = lambda p, x: jnp.sum((x[..., 0] + p["b"]) * x[..., 1] + x[..., 2] * p["w"])
  params = {"b": jnp.ones(()), "w": jnp.ones(())}
  x, spec = jnp.ones((2, 3)), js.Features(["g", "f", "h"])
  table = js.dependency_table(fn, params, x, spec)
  probe = js.gradient_table(fn, params, x, spec, key=KEY)
  assert table.lookup("g")["b"] and not table.lookup("f")["b"]
  assert probe.lookup("f")["b"]  # the gradient of b is x_f
  check = js.cross_check(table, probe)
  assert check.ok
  assert [(d.path, d.feature, d.op) for d in check.legitimate] == [("b", "f", "mul")]
  assert "`b` enters via `add`" in check.legitimate[0].explanation
  assert "legitimate" in check.report().lower() and "`mul`" in check.report()
  # w multiplies raw feature h and is annihilated at the base: exact agreement.
  assert check.agrees("w")


def test_probe_only_without_explanation_is_missed():
  """A table that simply lacks an annihilated first contact: reported as missed, not legitimate."""
  fn = lambda p, x: jnp.sum(x * p["w"])
  params = {"w": jnp.ones(3)}
  x, spec = jnp.ones(3), js.Features(["a", "b", "c"])
  table = js.dependency_table(fn, params, x, spec)
  probe = js.gradient_table(fn, params, x, spec, key=KEY)
  np.testing.assert_array_equal(probe.mask("w"), np.eye(3, dtype=bool))
  empty = dataclasses.replace(table, packed={"w": None})
  check = js.cross_check(empty, probe)
  assert not check.ok and not check.legitimate
  assert sorted((m.index, m.feature) for m in check.missed) == [((0,), "a"), ((1,), "b"), ((2,), "c")]
  assert check.per_leaf["w"].probe_only == 3 and check.per_leaf["w"].missed == 3


def test_live_first_contact_still_caught():
  """w's first contact is live at the base (x + 1 != 0) and tanh after it depends on every
  feature, yet the contact-local gradient shows that 'a' reaches w's first contact itself."""
  fn = lambda p, x: jnp.tanh(p["w"] * (x[0] + 1.0) + x[1])
  params = {"w": jnp.ones(())}
  x, spec = jnp.ones(2), js.Features(["a", "b"])
  table = js.dependency_table(fn, params, x, spec)
  assert table.lookup("a")["w"] and not table.lookup("b")["w"]
  probe = js.gradient_table(fn, params, x, spec, key=KEY)
  check = js.cross_check(table, probe)
  assert check.ok and [(d.feature, d.op) for d in check.legitimate] == [("b", "tanh")]
  check = js.cross_check(dataclasses.replace(table, packed={"w": None}), probe)
  assert [(m.path, m.feature) for m in check.missed] == [("w", "a")]
  assert "contact-local gradient" in check.missed[0].explanation
  assert [(d.feature, d.op) for d in check.legitimate] == [("b", "tanh")]
  # Without the probe's evidence (a rebuilt table object) the check is strict and says so.
  strict = js.cross_check(table, dataclasses.replace(probe))
  assert not strict.ok and any("no evidence" in n for n in strict.notes)


def test_abstract_params_and_inputs_match_concrete():
  m = zoo.get("embedding")
  params, inputs = zoo.abstract(m)
  a = js.gradient_table(m.fn, params, inputs, m.features, key=KEY)
  b = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, chunk_size=3)
  for p in a.paths:
    np.testing.assert_array_equal(a.mask(p), b.mask(p))
  for p in a.output_paths:
    np.testing.assert_array_equal(a.output_mask(p), b.output_mask(p))
  # Categorical features: every row of each embedding is probed (ids inferred from the gathers).
  assert a.lookup("hero")["hero_embed"].all() and a.lookup("items")["item_embed"].all()
  # Only the row gathered at the base (id 0) sees other features (through later operations).
  assert not a.lookup("hero")["item_embed"][1:].any() and a.lookup("hero")["item_embed"][0].any()
  # Another key and fewer draws: the same first-contact pattern of the items feature.
  c = js.gradient_table(m.fn, params, inputs, m.features, key=jax.random.key(7), draws=2)
  np.testing.assert_array_equal(a.lookup("items")["item_embed"], c.lookup("items")["item_embed"])


def test_num_ids_override_and_errors():
  fn = lambda p, x: jnp.tanh(p["e"][x["id"]] + x["v"][..., None])
  params = {"e": jnp.ones((6, 2))}
  x = {"id": jnp.zeros((2,), jnp.int32), "v": jnp.ones((2,))}
  spec = {"id": "id", "v": "v"}
  full = js.gradient_table(fn, params, x, spec, key=KEY)
  assert full.lookup("id")["e"].all()
  two = js.gradient_table(fn, params, x, spec, key=KEY, num_ids={"id": 2})
  np.testing.assert_array_equal(two.lookup("id")["e"].any(axis=1), [True, True, False, False, False, False])
  with pytest.raises(KeyError, match="not integer"):
    js.gradient_table(fn, params, x, spec, key=KEY, num_ids={"v": 3})
  with pytest.raises(ValueError, match="key=jax.random.key"):
    js.gradient_table(fn, params, x, spec)
  with pytest.raises(ValueError, match="same structure"):
    js.gradient_table(fn, params, x, spec, key=KEY, base={"id": x["id"]})
  with pytest.raises(ValueError, match="'v'.*shape"):
    js.gradient_table(fn, params, x, spec, key=KEY, base={"id": x["id"], "v": jnp.ones(3)})
  with pytest.raises(KeyError, match="nope"):
    js.gradient_table(fn, params, x, spec, key=KEY, keep=("nope",))
  table = js.dependency_table(fn, params, x, spec)
  other = js.gradient_table(fn, params, x, {"id": "id", "v": None}, key=KEY)
  with pytest.raises(ValueError, match="different features"):
    js.cross_check(table, other)


def test_feature_free_parameters_are_never_marked():
  fn = lambda p, x: x @ p["w"] + jnp.exp(p["c"]) * p["d"]
  params = {"w": jnp.ones((2, 3)), "c": jnp.ones(3), "d": jnp.ones(3)}
  x, spec = jnp.ones((4, 2)), js.Features(["a", "b"])
  probe = js.gradient_table(fn, params, x, spec, key=KEY)
  assert not probe.mask("c").any() and not probe.mask("d").any()
  np.testing.assert_array_equal(probe.lookup("a")["w"], [[True] * 3, [False] * 3])
  np.testing.assert_array_equal(probe.output_mask(), np.ones((4, 3, 2), bool))


def test_progress(capsys):
  fn = lambda p, x: jnp.tanh(x @ p["w"])
  params = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
  x, spec = jax.ShapeDtypeStruct((1, 4), jnp.float32), js.Features(list("abcd"))
  js.gradient_table(fn, params, x, spec, key=KEY, draws=1, chunk_size=2)
  assert capsys.readouterr().err == ""  # 2 chunks: quiet by default
  js.gradient_table(fn, params, x, spec, key=KEY, draws=2, chunk_size=2, progress=True)
  err = capsys.readouterr().err
  assert "gradient_table" in err and "chunk 4/4" in err and "draw 2/2" in err


def test_chunking_does_not_change_the_table():
  m = zoo.get("mlp_linen")
  a = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, chunk_size=1)
  b = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, chunk_size=8)
  for p in a.paths:
    np.testing.assert_array_equal(a.mask(p), b.mask(p))
