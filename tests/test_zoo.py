"""Smoke tests for the model zoo (tests/zoo.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import jaxsurgery as js

NAMES = zoo.names()


@pytest.fixture(scope="module")
def models():
  return zoo.zoo()


def _spec_leaves(features):
  is_leaf = lambda x: x is None or isinstance(x, (js.Features, str))
  return jax.tree_util.tree_flatten_with_path(features, is_leaf=is_leaf)


def test_registry(models):
  assert tuple(models) == NAMES
  assert len(NAMES) == len(set(NAMES)) >= 16
  assert all(m.name == n for n, m in models.items())
  with pytest.raises(KeyError):
    zoo.get("no_such_model")


@pytest.mark.parametrize("name", NAMES)
def test_runs_finite(models, name):
  m = models[name]
  out = m.fn(m.params, m.inputs)
  for leaf in jax.tree.leaves(out):
    assert jnp.all(jnp.isfinite(leaf)), name


@pytest.mark.parametrize("name", NAMES)
def test_traces(models, name):
  m = models[name]
  params, inputs = zoo.abstract(m)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((params, inputs)))
  closed = jax.make_jaxpr(m.fn)(params, inputs)
  assert len(closed.jaxpr.invars) == len(jax.tree.leaves((params, inputs)))


@pytest.mark.parametrize("name", NAMES)
def test_params_random_float32(models, name):
  m = models[name]
  leaves = jax.tree.leaves(m.params)
  assert leaves
  for x in leaves:
    assert x.dtype == jnp.float32
    assert np.all(np.asarray(x) != 0), "params must be random, without structural zeros"


@pytest.mark.parametrize("name", NAMES)
def test_singles_exist(models, name):
  m = models[name]
  paths = zoo.param_paths(m.params)
  assert len(paths) == len(set(paths))
  assert len(m.singles) == len(set(m.singles))
  for s in m.singles:
    assert s in paths, f"{s!r} not in {paths}"


@pytest.mark.parametrize("name", NAMES)
def test_features_match_inputs(models, name):
  m = models[name]
  assert m.source in ("plain", "nnx", "linen")
  spec, spec_def = _spec_leaves(m.features)
  per_input = spec_def.flatten_up_to(m.inputs)
  names = []
  for (_, s), sub in zip(spec, per_input):
    for x in jax.tree.leaves(sub):
      assert x.dtype in (jnp.float32, jnp.int32)
      if isinstance(s, js.Features):
        assert x.dtype == jnp.float32
        assert x.shape[s.axis] == len(s.names)
    if isinstance(s, js.Features):
      names.extend(s.names)
    elif isinstance(s, str):
      names.append(s)
  assert names and len(names) == len(set(names)), names


def test_deterministic(models):
  m0, m1, m2 = models["five"], zoo.get("five"), zoo.get("five", seed=1)
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), m0.params, m1.params)
  assert all(jax.tree.leaves(same))
  assert not jnp.array_equal(m0.params["unit_embed"], m2.params["unit_embed"])
