"""Which JAX primitives have dependency rules, and the fallback for those that do not.

Run with ``-s`` to see the coverage report:

    python -m pytest tests/test_coverage.py -s -q
"""

from __future__ import annotations

import gc
import importlib
import pkgutil
import warnings
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsurgery as js
from jaxsurgery._src.rules import registry

# Backend-specific kernels and lowering code: not part of a traced forward pass.
SKIP_MODULES = ("pallas", "mosaic", "gpu", "tpu", "triton", "cuda", "rocm", "cudnn", "serialization")

# Primitives that can appear in a model's forward pass (jaxpr of fn(params, inputs)).
FORWARD_PASS = {
    "elementwise unary": [
        "abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "bessel_i0e", "bessel_i1e", "cbrt",
        "ceil", "clz", "conj", "cos", "cosh", "digamma", "erf", "erf_inv", "erfc", "exp", "exp2",
        "expm1", "floor", "imag", "integer_pow", "is_finite", "lgamma", "log", "log1p", "logistic",
        "neg", "not", "population_count", "real", "round", "rsqrt", "sign", "sin", "sinh", "sqrt",
        "square", "tan", "tanh", "reciprocal"],
    "elementwise binary / n-ary": [
        "add", "add_any", "and", "atan2", "complex", "div", "igamma", "igammac", "igamma_grad_a",
        "max", "min", "mul", "nextafter", "or", "polygamma", "pow", "regularized_incomplete_beta",
        "rem", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sub", "xor", "zeta",
        "mulhi"],
    "comparisons and selection": ["eq", "ne", "ge", "gt", "le", "lt", "select_n", "clamp"],
    "type conversion and identities": [
        "convert_element_type", "bitcast_convert_type", "copy", "copy_p", "stop_gradient",
        "reduce_precision", "optimization_barrier", "sharding_constraint", "device_put", "name"],
    "reductions": [
        "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
        "reduce_xor", "reduce", "argmax", "argmin"],
    "cumulative and windowed": [
        "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "reduce_window_sum",
        "reduce_window_max", "reduce_window_min", "reduce_window", "select_and_gather_add"],
    "contractions": ["dot_general", "conv_general_dilated", "ragged_dot_general"],
    "data movement": [
        "reshape", "broadcast_in_dim", "transpose", "squeeze", "concatenate", "pad", "slice",
        "dynamic_slice", "dynamic_update_slice", "rev", "split", "iota", "tile", "zeros_like"],
    "gather and scatter": [
        "gather", "scatter", "scatter-add", "scatter-mul", "scatter-min", "scatter-max", "scatter-sub"],
    "sort and top_k": ["sort", "top_k", "approx_top_k"],
    "random": [
        "random_seed", "random_bits", "random_split", "random_fold_in", "random_wrap",
        "random_unwrap", "random_clone", "threefry2x32", "rng_bit_generator", "rng_uniform",
        "random_gamma"],
    "linalg and fft": [
        "cholesky", "eig", "eigh", "lu", "lu_pivots_to_permutation", "qr", "svd", "schur",
        "triangular_solve", "tridiagonal", "tridiagonal_solve", "householder_product", "geqrf",
        "hessenberg", "fft", "custom_linear_solve"],
    "calls": ["jit", "pjit", "closed_call", "custom_jvp_call", "custom_vjp_call", "remat2",
              "checkpoint", "custom_vmap_call", "linear_call", "core_call"],
    "control flow": ["cond", "while", "scan"],
    "sharding": ["shard_map", "psum", "pmax", "pmin", "pvary", "ppermute", "all_gather",
                 "all_to_all", "axis_index", "psum_invariant", "reduce_scatter"],
    "side effects": ["debug_callback", "pure_callback", "io_callback"],
}


def registered_primitives() -> dict[str, str]:
  """Every ``jax._src.core.Primitive`` JAX defines, by name -> defining module (best effort)."""
  import jax._src
  from jax._src import core

  where: dict[str, str] = {}
  for info in pkgutil.walk_packages(jax._src.__path__, "jax._src."):
    if any(s in info.name for s in SKIP_MODULES):
      continue
    try:
      module = importlib.import_module(info.name)
    except Exception:  # optional dependencies, platform-specific modules
      continue
    for value in vars(module).values():
      if isinstance(value, core.Primitive):
        where.setdefault(value.name, info.name)
  for obj in gc.get_objects():  # primitives created outside module globals
    if isinstance(obj, core.Primitive):
      where.setdefault(obj.name, "?")
  return where


def _family(rule) -> str:
  name = getattr(rule, "__qualname__", getattr(rule, "__name__", repr(rule)))
  return f"{rule.__module__.rsplit('.', 1)[-1]}.{name.split('.<locals>')[0]}"


@pytest.fixture(scope="module")
def jax_primitives():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return registered_primitives()


def test_coverage_report(jax_primitives):
  rules = registry.active_rules()
  covered = sorted(p for p in jax_primitives if p in rules)
  missing = sorted(p for p in jax_primitives if p not in rules)
  by_family = defaultdict(list)
  for p in covered:
    by_family[_family(rules[p])].append(p)
  by_module = defaultdict(list)
  for p in missing:
    by_module[jax_primitives[p]].append(p)
  lines = [f"\njax {jax.__version__}: {len(jax_primitives)} primitives, {len(covered)} with a rule, "
           f"{len(missing)} without (they get the conservative dense rule and a warning)",
           "\nWith a rule (by rule):"]
  for fam in sorted(by_family):
    lines.append(f"  {fam} ({len(by_family[fam])}): {', '.join(by_family[fam])}")
  lines.append("\nWithout a rule (by defining module; '?' = a skipped backend module):")
  for mod in sorted(by_module):
    lines.append(f"  {mod} ({len(by_module[mod])}): {', '.join(by_module[mod])}")
  lines.append("\nForward-pass primitives by family:")
  for fam, prims in FORWARD_PASS.items():
    have = sum(p in rules for p in prims)
    lines.append(f"  {fam}: {have}/{len(prims)}")
  print("\n".join(lines))
  assert len(jax_primitives) > 200  # the scan found JAX's primitives
  assert len(covered) > 150


def test_every_forward_pass_primitive_has_a_rule(jax_primitives):
  rules = registry.active_rules()
  curated = [p for prims in FORWARD_PASS.values() for p in prims]
  missing = [p for p in curated if p not in rules]
  assert not missing, f"forward-pass primitives without a rule: {missing}"
  # the curated list names primitives of this JAX (aliases of older versions excepted)
  aliases = {"pjit", "checkpoint", "copy_p", "core_call"}
  unknown = [p for p in curated if p not in jax_primitives and p not in aliases]
  assert not unknown, f"curated names that this JAX does not define: {unknown}"


# -- the conservative fallback ----------------------------------------------------

def _my_op():
  from jax.extend.core import Primitive

  p = Primitive("my_op")
  p.multiple_results = True
  p.def_impl(lambda x, w: [x.sum() * w, x * 2.0])
  p.def_abstract_eval(lambda x, w: [jax.core.ShapedArray(w.shape, w.dtype),
                                    jax.core.ShapedArray(x.shape, x.dtype)])
  return p


MY_OP = _my_op()


def _model(params, x):
  """x (3,) features; params['w'] (2,) reaches my_op through a transpose-free view."""
  out, y = MY_OP.bind(x[:2] * 1.0, params["w"] * 2.0)
  return {"out": out, "y": y, "side": params["b"] * x[2]}


PARAMS = {"w": jax.ShapeDtypeStruct((2,), jnp.float32), "b": jax.ShapeDtypeStruct((), jnp.float32)}
X = jax.ShapeDtypeStruct((3,), jnp.float32)
SPEC = js.Features(["a", "b", "c"])


def test_unknown_primitive_gets_the_conservative_rule_and_a_warning():
  with pytest.warns(js.UnknownPrimitiveWarning, match="my_op"):
    table = js.dependency_table(_model, PARAMS, X, SPEC)
  assert table.unknown_primitives == ("my_op",)
  assert "my_op" in table.summary()
  # every output depends on every input that enters the op (a, b), not on c
  assert table.output_mask("out").reshape(-1, 3).tolist() == [[True, True, False]] * 2
  assert table.output_mask("y").reshape(-1, 3).tolist() == [[True, True, False]] * 2
  # the parameter operand is touched by everything that enters
  assert table.mask("w").tolist() == [[True, True, False]] * 2
  assert table.mask("b").tolist() == [False, False, True]


def test_unknown_primitive_strict_raises():
  with pytest.raises(js.UnknownPrimitiveError, match="my_op"):
    js.dependency_table(_model, PARAMS, X, SPEC, strict=True)


def test_registering_a_rule_for_the_unknown_primitive():
  # a precise rule replaces the fallback: out = w * sum(x); y = 2 x (elementwise)
  def rule(ctx, eqn, invals):
    M, out_val = js.rules.masks, js.rules.out_val
    x, w = invals
    ctx.touch(w, M.uniform(M.reduce_all(x.mask), w.ndim))
    return [out_val(eqn.outvars[0], M.uniform(M.reduce_all(x.mask), 1)), out_val(eqn.outvars[1], x.mask)]

  with warnings.catch_warnings():
    warnings.simplefilter("error", js.UnknownPrimitiveWarning)
    with js.override_rule("my_op", rule):
      table = js.dependency_table(_model, PARAMS, X, SPEC, strict=True)
  assert table.unknown_primitives == ()
  assert (table.output_mask("y") == np.eye(3, dtype=bool)[:2]).all()


# -- the registry's names and traits --------------------------------------------------

def test_every_registered_name_is_a_primitive_or_a_listed_legacy_name(jax_primitives):
  names = registry.registered()
  stray = sorted(n for n in names if n not in jax_primitives and n not in registry.LEGACY_NAMES)
  assert not stray, (f"registered names that are neither primitives of jax {jax.__version__} nor in "
                     f"registry.LEGACY_NAMES (add them there with the reason, or drop them): {stray}")
  unregistered = sorted(set(registry.LEGACY_NAMES) - names)
  assert not unregistered, f"LEGACY_NAMES lists names without a rule: {unregistered}"


def test_traits_are_declared_with_a_rule_and_known():
  for trait in registry.TRAITS:
    assert registry.with_trait(trait), f"no primitive has the trait {trait!r}"
  with pytest.raises(ValueError, match="has no rule"):
    registry.add_traits("not_a_primitive", "linear")
  with pytest.raises(ValueError, match="Unknown primitive traits"):
    registry.add_traits("add", "lineal")
  assert registry.has_trait("dot_general", "product") and registry.has_trait("add", "sum")
  assert not registry.has_trait("tanh", "linear")


def test_replacing_a_rule_keeps_the_primitives_traits():
  real = registry.lookup("mul")
  before = registry.traits_of("mul")
  try:
    registry.register("mul", js.rules.nary)   # traits=None: keep what the probe and the planner know
    assert registry.traits_of("mul") == before and registry.has_trait("mul", "product")
  finally:
    registry.register("mul", real)
  assert registry.lookup("mul") is real and registry.traits_of("mul") == before


# -- errors that name the primitive ----------------------------------------------------

def test_a_rule_touching_with_the_wrong_shape_names_the_primitive():
  def bad_mul(ctx, eqn, invals):
    x, w = invals
    ctx.touch(w, np.ones((5, 1), np.uint32))  # w has shape (3,): a touch of shape (5,) is a bug
    return js.rules.nary(ctx, eqn, invals)
  with js.override_rule("mul", bad_mul), pytest.raises(js.RuleError, match=r"primitive `mul`.*override_rule"):
    js.dependency_table(lambda p, x: x * p["w"], {"w": jnp.ones(3)}, jnp.ones(3), SPEC)


def test_a_call_without_a_readable_sub_jaxpr_names_the_primitive():
  from jaxsurgery._src import compat
  with pytest.raises(js.UnknownPrimitiveError, match=r"`my_call`.*\['fn', 'name'\].*register_rule\('my_call'"):
    compat.sub_jaxpr({"fn": len, "name": "f"}, "my_call")


def test_name_lookups_raise_a_readable_value_error():
  table = js.dependency_table(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones((1, 3)), SPEC)
  with pytest.raises(ValueError) as err:
    table.mask("v")
  assert isinstance(err.value, KeyError) and isinstance(err.value, js.UnknownNameError)
  assert str(err.value) == "No parameter leaf 'v' in this table. Known parameter paths: ['w']"  # not quoted
