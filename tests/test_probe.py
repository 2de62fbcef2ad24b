"""Tests of the gradient probe (gradient_table) and its cross-check against the boolean table."""

import dataclasses
import gc
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import jaxsurgery as js
from jaxsurgery import ProbeEvidence
from jaxsurgery._src.core import masks

KEY = jax.random.key(0)  # results were also checked with keys 1-4


# Singles whose first contact is *additive* (x - mean, + bias): their gradient is the cotangent
# at their position, which changes with every feature reaching a nonlinearity downstream, while
# the first-contact table marks them with their own feature only. No gradient probe can single
# out features there (test_additive_parameters_cannot_single_out_features); everywhere else the
# probe must agree with the table exactly, element by element.
ADDITIVE = {
    "batchnorm": {"batch_stats/in_norm/mean": "x - mean", "params/in_norm/bias": "+ bias"},
    "five": {"obs_norm/mean": "x - mean", "globals_norm/mean": "x - mean"},
}


def _tables(m, **kw):
  table = js.dependency_table(m.fn, m.params, m.inputs, m.features)
  probe = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, **kw)
  return table, probe


def _pack(dense):
  """A dense bool (..., F) mask as a FeatureTable stores it."""
  return masks.compress(masks.pack(dense))


def _exact_singles(m, check):
  """The singles of ``m`` on which table and probe agree exactly."""
  return {s for s in m.singles if check.per_leaf[s].exact}


SLOW_ZOO = {"five", "lstm"}  # over ~5 s each on 2 idle cores


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ZOO else n for n in zoo.names()])
def test_zoo_cross_check(name):
  """Default probe settings (zero base, nothing kept) on every zoo model."""
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
  # Every legitimate difference names the operation that explains it; every probe-only and
  # live-only entry is classified.
  for d in check.legitimate:
    assert d.op and d.path in d.explanation and "`" in d.explanation
  for p, a in check.per_leaf.items():
    assert a.legitimate + a.missed == a.probe_only + a.live_only, (p, a)
  additive = ADDITIVE.get(name, {})
  for s in m.singles:
    a = check.per_leaf[s]
    assert a.missed == 0
    if s in additive:
      assert a.probe_only == a.legitimate > 0 and a.live_only == 0, (s, a)
      ops = {d.op for d in check.legitimate if d.path == s}
      assert ops and ops <= {"max", "reduce_max"}, ops  # the ReLU / max-pool after the contact
      assert "additive" in check.report()
    else:
      assert a.exact, (s, a, check.report())
      np.testing.assert_array_equal(table.mask(s), probe.mask(s))
  assert set(additive) <= set(m.singles)


def test_exact_singles_count():
  """Pins the documented count (docs/probe.md): test_zoo_cross_check requires exact agreement on
  every single outside ADDITIVE, so growing ADDITIVE to pass it must change this number too."""
  total = sum(len(zoo.get(name).singles) for name in zoo.names())
  exact = total - sum(len(v) for v in ADDITIVE.values())
  assert (exact, total) == (27, 31)


def test_annihilating_run_is_what_makes_kernels_exact():
  """Without the annihilating run, the kernel rows reading gathered embeddings (nonzero at the
  base) carry every feature that flips a ReLU: legitimate differences, not exact agreement."""
  m = zoo.get("embedding")
  table = js.dependency_table(m.fn, m.params, m.inputs, m.features)
  without = js.cross_check(table, js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY,
                                                    annihilate=False))
  assert without.ok and not without.agrees("dense1/kernel")
  legit = {(d.index[0], d.feature) for d in without.legitimate if d.path == "dense1/kernel"}
  assert legit and all(i < 7 for i, _ in legit)  # rows 0..6 read the hero and item embeddings
  probe = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY)
  ev = probe.evidence
  assert ev.runs[0].startswith("annihilating") and len(ev.runs) == 4
  # The biases added to features and the rows gathered at the base id were zeroed.
  assert ev.zeroed["dense1/bias"] == 8 and ev.zeroed["out/bias"] == 3
  assert ev.zeroed["hero_embed"] == 4 and ev.zeroed["item_embed"] == 3  # one row each
  assert "dense1/kernel" not in ev.zeroed
  with_ = js.cross_check(table, probe)
  assert with_.ok and with_.agrees("dense1/kernel") and with_.agrees("hero_embed")
  # The gradient changes seen in live runs are kept as evidence and classified, not dropped.
  assert with_.per_leaf["dense1/kernel"].live_only > 0
  assert any(d.path == "dense1/kernel" and "live" in d.explanation for d in with_.legitimate)


def test_base_and_keep_at_the_running_mean():
  """design §5: a base at the running mean with the statistics kept (the manual way)."""
  m = zoo.get("batchnorm")
  mean = m.params["batch_stats"]["in_norm"]["mean"]
  keep = ("batch_stats/in_norm/mean", "batch_stats/in_norm/var")
  table, probe = _tables(m, base=jnp.broadcast_to(mean, m.inputs.shape), keep=keep)
  check = js.cross_check(table, probe)
  assert check.ok, check.report()
  assert _exact_singles(m, check) == set(m.singles) - set(ADDITIVE["batchnorm"])
  assert not set(keep) & set(probe.evidence.zeroed)  # kept leaves are never zeroed
  assert probe.evidence.zeroed["params/in_norm/bias"] == 4


@pytest.mark.slow
def test_additive_parameters_cannot_single_out_features():
  """Why the additive singles cannot agree exactly, for any criterion on output gradients.

  1. The first-contact table depends on how the function is written, gradients do not:
     ``relu((x + b) @ w) @ v`` and ``relu(x @ w + b @ w) @ v`` are the same function, so every
     gradient-based probe gives both the same mask for ``b``, but the tables differ (``b[i]``
     meets feature i in the first, every feature in the second).
  2. The gradient of an added parameter is the cotangent at its position: it changes when a
     feature other than its own flips a ReLU downstream (zoo ``batchnorm``), and the cross-check
     names that operation for every such element.
  """
  fa = lambda p, x: jax.nn.relu((x + p["b"]) @ p["w"]) @ p["v"]
  fb = lambda p, x: jax.nn.relu(x @ p["w"] + p["b"] @ p["w"]) @ p["v"]
  rng = np.random.default_rng(0)
  params = {"b": rng.standard_normal(4), "w": rng.standard_normal((4, 6)), "v": rng.standard_normal((6, 2))}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x, spec = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), js.Features(list("pqrs"))
  for _ in range(3):  # the same function: same values and gradients at random points
    xr = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    np.testing.assert_allclose(fa(params, xr), fb(params, xr), rtol=1e-5, atol=1e-5)
    ga, gb = (jax.grad(lambda p, f=f, xr=xr: jnp.sum(f(p, xr) ** 2))(params) for f in (fa, fb))
    for k in params:
      np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-5)
  ta, tb = js.dependency_table(fa, params, x, spec), js.dependency_table(fb, params, x, spec)
  np.testing.assert_array_equal(ta.mask("b"), np.eye(4, dtype=bool))
  assert tb.mask("b").all()
  pa, pb = (js.gradient_table(f, params, x, spec, key=KEY) for f in (fa, fb))
  np.testing.assert_array_equal(pa.mask("b"), pb.mask("b"))  # one probe mask, two tables
  assert not (np.array_equal(pa.mask("b"), ta.mask("b")) and np.array_equal(pb.mask("b"), tb.mask("b")))
  ca, cb = js.cross_check(ta, pa), js.cross_check(tb, pb)
  assert ca.ok and cb.ok and cb.agrees("b") and not ca.agrees("b")
  off = {(d.index, d.feature): d.op for d in ca.legitimate if d.path == "b"}
  assert set(off) == {((i,), f) for i in range(4) for f in "pqrs" if f != "pqrs"[i]}
  assert set(off.values()) == {"max"}  # the ReLU after the contact

  # 2. Numerically, on the zoo: the gradient of in_norm/mean[0] (feature x) changes when vy
  # (feature 3) alone is switched on, because a ReLU after dense1 flips.
  m = zoo.get("batchnorm")
  rng = np.random.default_rng(1)
  P = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), m.params)
  P["batch_stats"]["in_norm"]["var"] = jnp.abs(P["batch_stats"]["in_norm"]["var"]) + 0.1
  r = jnp.asarray(rng.standard_normal((2, 2)), jnp.float32)
  grad_mean = lambda x: jax.grad(lambda p: jnp.sum(r * m.fn(p, x)))(P)["batch_stats"]["in_norm"]["mean"]
  x0 = jnp.zeros(m.inputs.shape)
  changed = [bool(jnp.any(grad_mean(x0.at[:, 3].set(v)) != grad_mean(x0))) for v in (-3.0, -1.0, 1.0, 3.0)]
  assert any(changed)
  table, probe = _tables(m)
  check = js.cross_check(table, probe)
  for s in ADDITIVE["batchnorm"]:
    T, Pm = table.mask(s), probe.mask(s)
    assert (T.sum(axis=1) == 1).all()  # its own feature only
    assert (Pm & ~T).any()
    entries = {(d.index, d.feature): d for d in check.legitimate if d.path == s}
    assert set(entries) == {((i,), check.features[k]) for i, k in zip(*np.nonzero(Pm & ~T))}
    for d in entries.values():
      assert d.op == "max" and "additive" in d.explanation and "`max`" in d.explanation


REAL_DOT_GENERAL = js.rules.get("dot_general")  # the real rule, to break it


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


@pytest.mark.parametrize("budget", [1, 200, 5000])
def test_cross_check_in_element_blocks_matches_the_whole_leaf(budget):
  """``memory_budget`` compares large leaves a block of elements at a time: same misses (at the same
  absolute elements), legitimate differences, counts and notes as one block per leaf."""
  m = zoo.get("mlp_tanh")
  with js.override_rule("dot_general", broken_dot_general):
    broken = js.dependency_table(m.fn, m.params, m.inputs, m.features)
  probe = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY)
  for table in (broken, js.dependency_table(m.fn, m.params, m.inputs, m.features)):
    whole, blocks = js.cross_check(table, probe), js.cross_check(table, probe, memory_budget=budget)
    assert sorted(blocks.missed) == sorted(whole.missed)
    assert sorted(blocks.legitimate) == sorted(whole.legitimate)
    assert blocks.per_leaf == whole.per_leaf and blocks.table_only_notes == whole.table_only_notes
  assert not js.cross_check(broken, probe, memory_budget=budget).ok
  with pytest.raises(ValueError, match="memory_budget"):
    js.cross_check(broken, probe, memory_budget=0)


def test_cross_check_memory_follows_the_budget():
  """numpy's peak allocation during the cross-check of a 64 x 4096 kernel (16.8M (element, feature)
  pairs, every one legitimate or shared) stays near ``memory_budget``, far below the dense masks."""
  import tracemalloc
  n = 64
  fn = lambda p, x: jax.nn.relu(jnp.tanh(x @ p["w"]) @ p["v"])
  params = {"w": jnp.full((n, 4096), 0.01), "v": jnp.full((4096, 2), 0.01)}
  x, spec = jnp.linspace(-1.0, 1.0, n)[None], js.Features([f"x{i}" for i in range(n)])
  table, probe = js.dependency_table(fn, params, x, spec), js.gradient_table(fn, params, x, spec, key=KEY)
  budget = 1 << 20
  tracemalloc.start()
  try:
    check = js.cross_check(table, probe, memory_budget=budget)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  dense = 4096 * n * n   # bytes of one dense bool mask of w
  assert check.ok and check.per_leaf["w"].both > 0
  assert peak < 2 * budget + (1 << 20) < dense / 5, (peak, dense)


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
  # The evidence travels with the table object (a rebuilt table keeps it) ...
  assert js.cross_check(table, dataclasses.replace(probe)).ok
  # ... and without it the check is strict and says so.
  strict = js.cross_check(table, dataclasses.replace(probe, evidence=None))
  assert not strict.ok and any("no evidence" in n for n in strict.notes)
  assert [(m.path, m.feature) for m in strict.missed] == [("w", "b")]


@pytest.mark.slow
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
  # Only its own feature marks an embedding: the row gathered at the base id is read from the
  # runs whose base ids are shifted (where it is not gathered) ...
  assert not a.lookup("hero")["item_embed"].any() and not a.lookup("items")["hero_embed"].any()
  ev = a.evidence
  assert ev.mask("annihilated", "item_embed").all() and ev.num_ids == {"hero": 5, "items": 7}
  # ... while in the runs where it is gathered at the base, its gradient (the cotangent there)
  # does change with the other features: kept as live-only evidence, rows 0 and 1 only.
  live_only = ev.mask("live_only", "item_embed")[..., a.features.index("hero")]
  assert live_only[:2].any() and not live_only[2:].any()
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
  js.gradient_table(fn, params, x, spec, key=KEY, draws=8, chunk_size=1, annihilate=False)
  assert capsys.readouterr().err == ""  # a tqdm bar only when stderr is a terminal (not here)...
  js.gradient_table(fn, params, x, spec, key=KEY, draws=2, chunk_size=2, progress=True)
  err = capsys.readouterr().err  # ...or when asked
  assert "gradient_table(4 columns x 3 runs)" in err and "6/6" in err and "(3/3)" in err and "chunk/s" in err


def test_chunking_does_not_change_the_table():
  m = zoo.get("mlp_linen")
  a = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, chunk_size=1)
  b = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, chunk_size=8)
  for p in a.paths:
    np.testing.assert_array_equal(a.mask(p), b.mask(p))


def test_annihilated_element_entry_is_never_legitimate():
  """A kernel row reading a gathered embedding is live in the generic runs (the embedding is
  nonzero at the base) but annihilated in the annihilating run: the probe reads it from there,
  where only its own feature can change its gradient, so a table lacking that entry is caught."""
  m = zoo.get("embedding")
  table, probe = _tables(m)
  mask = table.mask("dense1/kernel").copy()
  k = table.features.index("hero")
  assert mask[0, :, k].all()
  mask[0, 3, k] = False
  broken = dataclasses.replace(table, packed={**table.packed, "dense1/kernel": _pack(mask)})
  check = js.cross_check(broken, probe)
  assert not check.ok
  assert [(x.path, x.index, x.feature) for x in check.missed] == [("dense1/kernel", (0, 3), "hero")]
  assert "contact-local gradient" in check.missed[0].explanation
  # Even with no contact-local evidence for it (e.g. a contact inside a scan), the entry is
  # missed: the element is annihilated in some run, so its probe entries are first contacts.
  ev = probe.evidence
  cc = ev.mask("contact_change", "dense1/kernel").copy()
  cc[0, 3, k] = False
  blind = dataclasses.replace(ev, contact_change={**ev.contact_change, "dense1/kernel": _pack(cc)})
  check = js.cross_check(broken, dataclasses.replace(probe, evidence=blind))
  assert [(x.path, x.index, x.feature) for x in check.missed] == [("dense1/kernel", (0, 3), "hero")]
  assert "annihilated at the base of some run" in check.missed[0].explanation


@pytest.mark.slow
def test_evidence_persists_with_the_table():
  """The cross-check evidence is a field of the probe table: it survives dataclasses.replace
  and pickling (without the jaxpr, which does not pickle), and the checks are identical."""
  m = zoo.get("five")
  table, probe = _tables(m)
  ev = probe.evidence
  assert isinstance(ev, ProbeEvidence) and ev.features == probe.features
  reloaded = pickle.loads(pickle.dumps(dataclasses.replace(probe, jaxpr=None)))
  assert reloaded.jaxpr is None and isinstance(reloaded.evidence, ProbeEvidence)
  a, b = js.cross_check(table, probe), js.cross_check(table, reloaded)
  assert a.ok and b.ok and a.report() == b.report()
  assert a.legitimate == b.legitimate and a.per_leaf == b.per_leaf
  for p in probe.paths:
    np.testing.assert_array_equal(reloaded.mask(p), probe.mask(p))
    for what in ("live", "annihilated", "contact_change", "live_only"):
      np.testing.assert_array_equal(reloaded.evidence.mask(what, p), ev.mask(what, p))
  # Without evidence every probe-only entry is missed; evidence of other features is ignored.
  strict = js.cross_check(table, dataclasses.replace(probe, evidence=None))
  assert not strict.ok and strict.per_leaf["obs_norm/mean"].missed == a.per_leaf["obs_norm/mean"].legitimate
  other = dataclasses.replace(probe, evidence=dataclasses.replace(ev, features=ev.features[::-1]))
  check = js.cross_check(table, other)
  assert not check.ok and any("other features" in n for n in check.notes)


@pytest.mark.slow
def test_compiled_functions_are_cached_weakly():
  """A second call with the same function and shapes compiles nothing; the cache entry dies with
  the function and the cache stays bounded."""
  from jaxsurgery._src.probe import compile as P
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
    params = {"w": jnp.ones((3, 5)), "v": jnp.ones((5, 2))}
    x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
    first = js.gradient_table(fn, params, x, spec, key=KEY)
    hits, n_first = P.COMPILED.hits, len(compiles)
    assert n_first > 0
    second = js.gradient_table(fn, params, x, spec, key=jax.random.key(1))
    assert P.COMPILED.hits == hits + 1 and len(compiles) == n_first  # nothing compiled
    for p in first.paths:
      np.testing.assert_array_equal(first.mask(p), second.mask(p))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  mine = [k for k, (ref, _) in P.COMPILED.entries.items() if ref() is fn]
  assert len(mine) == 1
  del fn, first, second
  gc.collect()
  assert mine[0] not in P.COMPILED.entries
  for k in range(P.CACHE_SIZE + 2):
    f = lambda p, x, k=k: jnp.tanh(x @ p["w"]) * k
    js.gradient_table(f, {"w": jnp.ones((3, 2))}, x, spec, key=KEY, draws=1, annihilate=False)
  assert len(P.COMPILED.entries) <= P.CACHE_SIZE


def test_chunks_from_the_memory_budget():
  m = zoo.get("mlp_linen")
  default = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, progress=True)
  tiny = js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, memory_budget=1, progress=True)
  for p in default.paths:
    np.testing.assert_array_equal(default.mask(p), tiny.mask(p))
  for p in default.output_paths:
    np.testing.assert_array_equal(default.output_mask(p), tiny.output_mask(p))
  with pytest.raises(ValueError, match="memory_budget"):
    js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, memory_budget=0)
  with pytest.raises(ValueError, match="chunk_size"):
    js.gradient_table(m.fn, m.params, m.inputs, m.features, key=KEY, chunk_size=0)
  from jaxsurgery._src.probe import compile as P
  assert P.chunking(300, None, None, 1) == 100        # capped at 128, balanced: 3 x 100
  assert P.chunking(99, None, 10 * 1000, 1000) == 10  # 10 per chunk by the budget
  assert P.chunking(99, 16, None, 10**12) == 15       # chunk_size wins; 7 chunks of 15
  assert P.chunking(3, None, 1, 10**9) == 1           # at least one column
