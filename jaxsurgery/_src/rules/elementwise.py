"""Elementwise primitives.

Structure: ``out[e]`` depends on ``in_k[e]`` for every operand ``k`` (scalars
broadcast). So ``mask(out) = OR_k mask(in_k)``, and a parameter-derived operand
element is touched by the masks of its partners at the same position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.values import Val, out_val
from jaxsurgery._src.rules.common import cut_pull
from jaxsurgery._src.rules.registry import add_traits, register

if TYPE_CHECKING:  # the interpreter imports the rules
  from jaxsurgery._src.compat import Eqn
  from jaxsurgery._src.core.interpreter import Context


def unary(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[e]`` depends on ``x[e]`` only: the mask and the provenance pass through.

  Args:
    ctx: the interpreter's state (unused: no operand meets another).
    eqn: the eqn (one operand or more; only the first is read).
    invals: the operands' values.

  Returns:
    One value per output, with the first operand's mask and provenance.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.sin(x + p["b"])
    >>> with js.override_rule("sin", js.rules.unary):   # sin's own rule
    ...   table = js.dependency_table(fn, {"b": jnp.ones(2)}, jnp.ones(2), js.Features(["a", "b"]))
    >>> table.output_mask().tolist()
    [[True, False], [False, True]]
  """
  (x,) = invals[:1]
  return [out_val(o, x.mask, x.pull) for o in eqn.outvars]


def passthrough(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out_k`` is ``in_k``: masks and provenance pass through one to one.

  Args:
    ctx: the interpreter's state (unused).
    eqn: the eqn (as many outputs as operands).
    invals: the operands' values.

  Returns:
    One value per output, a copy of its operand's mask and provenance.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jax.lax.optimization_barrier((x, p["w"]))
    >>> table = js.dependency_table(fn, {"w": jnp.ones(2)}, jnp.ones(2), js.Features(["a", "b"]))
    >>> js.rules.get("optimization_barrier") is js.rules.passthrough, table.output_mask("0").tolist()
    (True, [[True, False], [False, True]])
  """
  return [out_val(o, v.mask, v.pull) for o, v in zip(eqn.outvars, invals)]


def nary(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[e]`` depends on every ``in_k[e]``: OR of masks; partners touch each other.

  Operands broadcast (numpy rules); a parameter-derived operand element is
  touched by the masks of its partners at the same position.

  Args:
    ctx: the interpreter's state.
    eqn: the eqn.
    invals: the operands' values.

  Returns:
    One value per output, with the OR of the operands' masks.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: x * p["w"]
    >>> table = js.dependency_table(fn, {"w": jnp.ones(2)}, jnp.ones(2), js.Features(["a", "b"]))
    >>> js.rules.get("mul") is js.rules.nary, table.mask("w").tolist()   # w[i] meets feature i
    (True, [[True, False], [False, True]])
  """
  ndim = len(eqn.outvars[0].aval.shape)
  masks = [M.lift(v.mask, ndim) for v in invals]
  out_mask = M.orr(*masks)
  for i, v in enumerate(invals):
    if v.pull is not None:
      partners = M.orr(*(m for j, m in enumerate(masks) if j != i))
      ctx.touch(v, M.unbroadcast(partners, v.shape))
  pull = cut_pull([(v, lambda t, s=v.shape: M.unbroadcast(t, s)) for v in invals], out_mask)
  return [out_val(o, out_mask, pull) for o in eqn.outvars]


UNARY = (
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "bessel_i0e", "bessel_i1e",
    "cbrt", "ceil", "clz", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh",
    "digamma", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "imag",
    "integer_pow", "is_finite", "lgamma", "log", "log1p", "logistic", "neg", "not",
    "population_count", "real", "reduce_precision", "round", "rsqrt",
    "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "tan", "tanh",
    "frexp", "reciprocal", "stage", "xla_metadata_value", "random_seed", "random_clone",
)

# One output per operand, each a copy of its operand (collectives see the shard
# union, see control_flow.shard_map).
PASSTHROUGH = ("device_put", "optimization_barrier", "pvary", "pbroadcast", "psum", "pmax",
               "pmin", "ppermute", "psum_invariant", "sharding_constraint", "mesh_cast", "reshard",
               "name", "layout_constraint", "with_memory_space_constraint", "shard_alike", "tie",
               "pin", "unpin", "multiple_of", "inspect_sharding", "debug_print", "check",
               "unreduced_psum", "preduced", "vary_unreduced_cast_p", "reduced_vary_cast_p",
               "nonbatchable")   # equinox.internal: an identity outside vmap

NARY = (
    "add", "add_any", "and", "atan2", "clamp", "complex", "div", "eq", "ge", "gt", "igamma",
    "igammac", "igamma_grad_a", "le", "lt", "max", "min", "mul", "ne", "nextafter", "or",
    "polygamma", "pow", "random_gamma_grad", "regularized_incomplete_beta", "rem",
    "select_n", "select_if_vmap", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sub", "xor",
    "zeta", "mulhi", "stochastic_round", "eq_to", "lt_to", "le_to",
    "random_fold_in", "threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "random_gamma",
)

register(UNARY, unary, traits=("elementwise",))
register(NARY, nary, traits=("elementwise",))
register(PASSTHROUGH, passthrough, traits=("passthrough",))

# What the probe and the planner need beyond the mask rule (see registry.TRAITS).
add_traits(("neg", "real", "imag", "conj", "complex", "convert_element_type", "copy", "copy_p",
            "reduce_precision", "add", "sub", "add_any", "psum", "device_put", "optimization_barrier",
            "pvary", "pbroadcast", "sharding_constraint", "mesh_cast", "reshard", "name", "tie"), "linear")
add_traits(("convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier"), "cast")
add_traits(("stop_gradient", "floor", "ceil", "round", "sign", "is_finite", "not", "population_count", "clz",
            "random_seed", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "shift_left",
            "shift_right_arithmetic", "shift_right_logical", "threefry2x32"), "zero_grad")
add_traits("mul", "product")
add_traits(("add", "sub", "add_any"), "sum", "additive")
add_traits(("select_n", "select_if_vmap"), "additive", "indexed")   # equinox's select: the same operands
add_traits(("max", "min", "clamp"), "selection")
