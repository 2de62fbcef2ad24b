"""Saved plans (issue 11 section 2): written once, applied identically in another process, refused when they
are of another format version, changed, or not plans at all."""

import json
import os
import subprocess
import sys

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
from jaxsurgery._src.optim.adam import adam
from jaxsurgery._src.surgery import persist

OLD, NEW = ["hp", "mana", "x"], ["x", "hp", "armor", "mana"]


def flat(tree) -> dict:
  return {feats.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mlp(p, x):
  return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]


def mlp_params(seed, nin, nh):
  r = np.random.default_rng(seed)   # numpy draws: no compile per shape
  normal = lambda *shape: jnp.asarray(r.standard_normal(shape, np.float32))
  return {"l1": {"w": normal(nin, nh), "b": normal(nh)}, "l2": {"w": normal(nh, 2), "b": normal(2)}}


def table(nin, nh, names):
  return js.dependency_table(mlp, mlp_params(0, nin, nh), jax.ShapeDtypeStruct((4, nin), jnp.float32),
                             js.Features(names))


@pytest.fixture(scope="module")
def surgery():
  """New feature, reordered features, hidden units cloned 4 -> 8 (recipes: a scale and clone noise)."""
  return js.plan(table(3, 4, OLD), table(4, 8, NEW), widen="clone")


def states(seed=1):
  tx = adam(1e-2)
  old_p, new_p = mlp_params(seed, 3, 4), mlp_params(seed + 1, 4, 8)
  old_opt = jax.tree.map(lambda a: a + 0.5 if jnp.issubdtype(a.dtype, jnp.floating) else a + 3, tx.init(old_p))
  return {"params": old_p, "opt": old_opt}, {"params": new_p, "opt": tx.init(new_p)}


def assert_same_plan(a, b):
  assert len(a.report.leaves) == len(b.report.leaves)
  for x, y in zip(a.report.leaves, b.report.leaves):
    assert type(x) is type(y)
    for f in x.__dataclass_fields__:
      u, v = getattr(x, f), getattr(y, f)
      if f in ("maps", "zero"):
        for m, n in zip(u if f == "maps" else (u,), v if f == "maps" else (v,)):
          assert (m is None and n is None) or np.array_equal(m, n), (x.path, f)
      else:
        assert u == v and type(u) is type(v), (x.path, f, u, v)
  for f in ("added", "removed", "moved", "preserved", "reasons", "dropped_leaves", "matching"):
    assert getattr(a.report, f) == getattr(b.report, f), f
  for t in ("old_table", "new_table"):
    s, l = getattr(a, t), getattr(b, t)
    summary = lambda t: (t.paths, t.features, dict(t.shapes), dict(t.dtypes))
    assert summary(s) == summary(l)
    assert all(np.array_equal(s.packed[p], l.packed[p]) for p in s.paths if s.packed[p] is not None)


def test_a_saved_plan_loads_as_the_same_plan_and_applies_identically(surgery, tmp_path):
  plan_id = persist.save(surgery, tmp_path / "plan")
  assert sorted(os.listdir(tmp_path / "plan")) == ["arrays.npz", "manifest.json"]
  loaded = persist.load(tmp_path / "plan")
  assert_same_plan(surgery, loaded)
  assert loaded.report.leaves[-1].scale == 0.5 and any(l.noise for l in loaded.report.leaves)   # recipes kept
  assert persist.fingerprint(loaded) == plan_id == persist.fingerprint(surgery)
  assert repr(loaded.report) == repr(surgery.report)
  old, init = states()
  here, there = js.remap_state(surgery, old, init), js.remap_state(loaded, old, init)
  for x, y in zip(jax.tree.leaves(here), jax.tree.leaves(there)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  manifest = json.loads((tmp_path / "plan" / "manifest.json").read_text())
  assert manifest["format"] == "jaxsurgery.plan" and manifest["version"] == persist.VERSION
  assert "old_table.jaxpr" in manifest["dropped"]   # said, not silently lost
  with pytest.raises(FileExistsError, match="overwrite=True"):
    persist.save(surgery, tmp_path / "plan")
  other = js.plan(table(3, 4, OLD), table(4, 6, NEW))
  assert persist.save(other, tmp_path / "plan", overwrite=True) != plan_id
  assert persist.load(tmp_path / "plan").new_table.shapes["l1/w"] == (4, 6)
  assert [p.name for p in tmp_path.iterdir()] == ["plan"]   # no temporary left next to it


def test_nnx_plans_with_key_dtypes_round_trip(tmp_path):
  class Net(nnx.Module):
    def __init__(self, nin, rngs):
      self.l1 = nnx.Linear(nin, 3, rngs=rngs)
      self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)   # rng state: a typed key and a count

    def __call__(self, x):
      return self.drop(self.l1(x))
  model = lambda n: nnx.eval_shape(lambda: Net(n, nnx.Rngs(0)))
  x = lambda n: jax.ShapeDtypeStruct((1, n), jnp.float32)
  surgery = jsf.plan_nnx(model(3), model(4), x(3), x(4), js.Features(OLD), js.Features(NEW))
  persist.save(surgery, tmp_path / "plan")
  loaded = persist.load(tmp_path / "plan")
  assert_same_plan(surgery, loaded)
  assert jax.dtypes.issubdtype(loaded.new_table.dtypes["drop/rngs/key/value"], jax.dtypes.prng_key)
  old, new = Net(3, nnx.Rngs(1)), Net(4, nnx.Rngs(2))
  for a, b in zip(jax.tree.leaves(jsf.remap_nnx(surgery, old, new)), jax.tree.leaves(jsf.remap_nnx(loaded, old, new))):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


CHILD = """
import sys, jax, numpy as np
sys.path.insert(0, {tests!r})
import test_persist as t
from jaxsurgery._src.surgery import persist
import jaxsurgery as js
old, init = t.states()
new = js.remap_state(persist.load({plan!r}), old, init)
np.savez({out!r}, **{{k: np.asarray(v) for k, v in t.flat(new).items()}})
"""


def test_a_plan_loaded_in_another_process_applies_identically(surgery, tmp_path):
  persist.save(surgery, tmp_path / "plan")
  out = tmp_path / "child.npz"
  code = CHILD.format(tests=os.path.dirname(__file__), plan=str(tmp_path / "plan"), out=str(out))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  here = flat(js.remap_state(surgery, *states()))
  with np.load(out) as child:
    assert sorted(child.files) == sorted(here)
    for k, v in here.items():
      np.testing.assert_array_equal(child[k], np.asarray(v), err_msg=k)   # clone noise included


def test_plans_of_another_version_changed_or_not_plans_are_refused(surgery, tmp_path):
  path = tmp_path / "plan"
  persist.save(surgery, path)
  manifest = json.loads((path / "manifest.json").read_text())

  def write(m):
    (path / "manifest.json").write_text(json.dumps(m))
  write(dict(manifest, version=persist.VERSION + 1))
  with pytest.raises(persist.PlanFormatError, match=rf"format version {persist.VERSION + 1}.*reads version"):
    persist.load(path)
  leaves = manifest["report"]["fields"]["leaves"]["__tuple__"]
  leaves[0]["fields"]["made_up"] = 1
  write(manifest)
  with pytest.raises(persist.PlanFormatError, match=r"LeafPlan has fields \['made_up'\]"):
    persist.load(path)
  del leaves[0]["fields"]["made_up"]
  write(manifest)
  persist.load(path)   # intact again
  (path / "arrays.npz").write_bytes((path / "arrays.npz").read_bytes()[:-10])
  with pytest.raises(persist.PlanFormatError, match="checksum"):
    persist.load(path)
  (path / "manifest.json").write_text("{not json")
  with pytest.raises(persist.PlanFormatError, match="not valid JSON"):
    persist.load(path)
  with pytest.raises(persist.PlanFormatError, match="no manifest.json"):
    persist.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="No saved plan"):
    persist.load(tmp_path / "nowhere")
  persist.save(surgery, path, overwrite=True)
  manifest = json.loads((path / "manifest.json").read_text())
  write(dict(manifest, report={"__dataclass__": "os:system", "fields": {}}))   # nothing else is ever imported
  with pytest.raises(persist.PlanFormatError, match="not a jaxsurgery class"):
    persist.load(path)


def test_a_loaded_plan_refuses_another_models_state(surgery, tmp_path):
  persist.save(surgery, tmp_path / "plan")
  loaded = persist.load(tmp_path / "plan")
  tx = optax.adam(1e-2)
  wrong = mlp_params(1, 3, 5)   # 5 hidden units: not the model the plan was made for
  _, init = states()
  with pytest.raises(SurgeryError, match=r"'params/l1/w' is \(3, 5\) float32, but it should be an image"):
    js.remap_state(loaded, {"params": wrong, "opt": tx.init(wrong)}, init)
  with pytest.raises(SurgeryError, match="old_params does not match"):
    loaded(wrong, init["params"])
