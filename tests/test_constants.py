"""Issue 9 table: a removed feature declared constant (``plan(..., constants=...)``) is folded into
the bias it feeds, exactly; bad declarations are clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsurgery as js


def mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  return h @ p["l2"]["w"] + p["l2"]["b"]


def params(n_in, seed):
  r = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(r.standard_normal(s, np.float32))
  return {"l1": {"w": n(n_in, 5), "b": n(5)}, "l2": {"w": n(5, 2), "b": n(2)}}


OLD, NEW = ["hp", "legacy", "mana"], ["hp", "mana"]


def tables(fn=mlp, old_names=OLD, new_names=NEW):
  old_p, new_init = params(len(old_names), 0), params(len(new_names), 1)
  x = lambda names: jax.ShapeDtypeStruct((4, len(names)), jnp.float32)
  return (old_p, new_init, js.dependency_table(fn, old_p, x(old_names), js.Features(old_names)),
          js.dependency_table(fn, new_init, x(new_names), js.Features(new_names)), x(old_names), x(new_names))


def test_a_removed_constant_feature_is_folded_into_the_bias_exactly():
  old_p, new_init, ot, nt, xo, xn = tables()
  s = js.plan(ot, nt, constants={"legacy": 2.5})
  assert s.report.preserved is True, s.report
  assert s.report.removed == ("legacy",) and s.report.constants == {"legacy": 2.5}
  new_p = s(old_p, new_init)
  w, b = np.asarray(old_p["l1"]["w"]), np.asarray(old_p["l1"]["b"])
  np.testing.assert_allclose(new_p["l1"]["b"], b + 2.5 * w[1], rtol=1e-6)        # w[legacy] * value, folded
  np.testing.assert_array_equal(new_p["l1"]["w"], w[[0, 2]])                      # the row is dropped
  check = js.verify(s, mlp, mlp, old_p, new_p, xo, xn, key=jax.random.key(0))   # old inputs hold legacy = 2.5
  assert check.ok, check
  # without the declaration the removal is reported as a loss, not folded
  plain = js.plan(ot, nt)
  assert plain.report.preserved is False and any("legacy" in r for r in plain.report.reasons)


def test_constants_must_name_a_removed_feature():
  _, _, ot, nt, _, _ = tables()
  with pytest.raises(js.SurgeryError, match=r"`constants=` names \['armor'\], which the old model does not have"):
    js.plan(ot, nt, constants={"armor": 1.0})
  with pytest.raises(js.SurgeryError, match=r"`constants=` names \['hp'\], which is not removed"):
    js.plan(ot, nt, constants={"hp": 1.0})
