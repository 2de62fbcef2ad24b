"""Issue 9 sections 3-4: the widened Five model is exact, and growth leaves no dead weights.

After a surgery, one or two optimizer steps on random data must give every new unit, channel,
head and inserted block a nonzero gradient, and no two new units the same update (unless the user
asked for clones without noise).
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transformers import CHANGES, widened
from transformers_zoo import Cfg, gpt, llama

import jaxsurgery as js

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import models as bench_models  # noqa: E402  (benchmarks/models.py: the Five-style policy)


@pytest.mark.slow
def test_widened_five_model_is_exact_with_a_new_feature_and_a_new_action():
  old_cfg = bench_models.FiveConfig(units=3, unit_features=4, unit_types=5, items=2, item_types=4, globals=3,
                                    hidden=8, lstm=16, steps=3, action_types=4, move=5)
  new_cfg = dataclasses.replace(old_cfg, unit_features=5, hidden=10, lstm=18, action_types=5)
  old, new = bench_models.five(old_cfg), bench_models.five(new_cfg)
  outputs = lambda cfg: {"action_type": js.Features(["noop", "move", "attack", "cast", "buyback"][:cfg.action_types]),
                         "move": None, "target": None, "value": None}
  old_p = bench_models.concrete(old.params, seed=0, scale=0.3)
  new_init = bench_models.concrete(new.params, seed=1, scale=0.3)
  ot = js.dependency_table(old.fn, old.params, old.inputs, old.features, outputs=outputs(old_cfg))
  nt = js.dependency_table(new.fn, new.params, new.inputs, new.features, outputs=outputs(new_cfg))
  s = js.plan(ot, nt)
  assert s.report.preserved is True, s.report
  assert s.report.outputs_added == ("buyback",) and s.report.added == ("unit_f4",)
  new_p = s(old_p, new_init)
  check = js.verify(s, old.fn, new.fn, old_p, new_p, old.inputs, new.inputs, key=jax.random.key(0), atol=1e-5)
  assert check.ok, check


# -- no dead weights ----------------------------------------------------------------------

def _new_units(leaf):
  """Per grown axis, groups of positions that must train apart: the new positions (``-1``) and,
  for each old position with copies, the original and its copies. None for a new leaf."""
  if leaf.old_path is None:
    return None
  out = {}
  for a, m in enumerate(leaf.maps):
    if m is None:
      continue
    m = np.asarray(m)
    groups = [list(np.nonzero(m < 0)[0])] + [list(np.nonzero(m == j)[0]) for j in np.unique(m[m >= 0])]
    groups = [g for g in groups if g and (m[g[0]] < 0 or len(g) > 1)]
    if groups:
      out[a] = groups
  return out


def _two_steps(fn, params, tokens, vocab, lr=0.05):
  """``(sum of |update|, params after - params before)`` over two SGD steps on a random loss."""
  labels = jax.random.randint(jax.random.key(7), tokens.shape, 0, vocab)

  def loss(p):
    logits = fn(p, tokens)[..., :vocab]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  tx = optax.sgd(lr)
  state, start = tx.init(params), params
  total = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss)(params), state)
    params = optax.apply_updates(params, updates)
    total = jax.tree.map(lambda t, u: t + jnp.abs(u), total, updates)
  return total, jax.tree.map(jnp.subtract, params, start)


def _by_path(tree):
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v, np.float64)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_no_dead_weights(surgery, new_p, fn, tokens, vocab):
  """Every new unit moves (above rounding: 1e-6 of the largest move of any parameter) and no two
  units that must train apart (new units; a unit and its clones) move identically. Leaves whose
  old elements do not move either are structurally dead, not made so by the surgery (a key bias
  under a softmax: adding it shifts every score of a query alike)."""
  total, delta = map(_by_path, _two_steps(fn, new_p, tokens, vocab))
  floor = 1e-6 * max(float(t.max()) for t in total.values())
  dead, twins = [], []
  for leaf in surgery.report.leaves:
    t, d = total[leaf.path], delta[leaf.path]
    units = _new_units(leaf)
    if units is not None and leaf.maps and all(m is not None or True for m in leaf.maps):
      old = np.ones(t.shape, bool)
      for a, m in enumerate(leaf.maps):
        if m is not None:
          old &= np.expand_dims(np.asarray(m) >= 0, tuple(b for b in range(t.ndim) if b != a))
      if old.any() and not t[old].max() > floor:
        continue
    if units is None:
      if not t.max() > 1e-12:
        dead.append(f"{leaf.path} (new leaf)")
      continue
    for a, groups in units.items():
      src = np.asarray(leaf.maps[a])
      for idx in groups:
        moved = np.moveaxis(t, a, 0)[idx].reshape(len(idx), -1).max(1) > floor
        if leaf.path != "pos":   # rows of a positional table past the traced length are never read
          dead += [f"{leaf.path} axis {a} index {i}" for i, ok in zip(idx, moved) if not ok and src[i] < 0]
        ds = np.moveaxis(d, a, 0)[idx].reshape(len(idx), -1)
        for x in range(len(idx)):
          for y in range(x + 1, len(idx)):
            if moved[x] and np.allclose(ds[x], ds[y], rtol=1e-6, atol=1e-3 * floor):
              twins.append(f"{leaf.path} axis {a}: {idx[x]} and {idx[y]}")
  assert not dead, f"new units without gradient after two steps: {dead}"
  assert not twins, f"new units with identical updates: {twins}"


GROWTHS = ["one_more_layer", "d_8_12", "heads_2_4", "head_dim_4_6", "mlp_16_24"]


@pytest.mark.parametrize("change", GROWTHS)
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_growth_leaves_no_dead_weights(family, change):
  build = {"gpt": gpt, "llama": llama}[family]
  base = Cfg()
  new_cfg = widened(base, **CHANGES[change])
  old_fn, old_init, tokens = build(base)
  new_fn, new_init_fn, _ = build(new_cfg)
  old_p, new_init = old_init(jax.random.key(0)), new_init_fn(jax.random.key(1))
  tables = [js.dependency_table(f, p, tokens, "tokens") for f, p in ((old_fn, old_p), (new_fn, new_init))]
  s = js.plan(*tables)
  assert s.report.preserved is True, s.report
  new_p = s(old_p, new_init)
  ids = jax.random.randint(jax.random.key(3), tokens.shape, 0, base.vocab)
  _check_no_dead_weights(s, new_p, new_fn, ids, base.vocab)


def test_clones_train_apart_thanks_to_their_noise():
  base = Cfg()
  old_fn, old_init, tokens = gpt(base)
  new_fn, new_init_fn, _ = gpt(dataclasses.replace(base, d=16))
  old_p, new_init = old_init(jax.random.key(0)), new_init_fn(jax.random.key(1))
  tables = [js.dependency_table(f, p, tokens, "tokens") for f, p in ((old_fn, old_p), (new_fn, new_init))]
  ids = jax.random.randint(jax.random.key(3), tokens.shape, 0, base.vocab)
  noisy = js.plan(*tables, widen="clone")
  assert noisy.report.preserved is True
  _check_no_dead_weights(noisy, noisy(old_p, new_init), new_fn, ids, base.vocab)
  # without noise, the copies see the same inputs and get the same updates: the check sees it
  quiet = js.plan(*tables, widen="clone", clone_noise=0.0)
  with pytest.raises(AssertionError, match="identical updates"):
    _check_no_dead_weights(quiet, quiet(old_p, new_init), new_fn, ids, base.vocab)
