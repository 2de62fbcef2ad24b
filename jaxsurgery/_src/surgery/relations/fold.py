"""Removed features declared constant: their contribution is folded into a bias (exactly).

OpenAI Five kept deprecated observations and fed them constants. jaxsurgery removes the
feature and folds what it contributed: for ``x @ W + b`` with old feature ``i`` always equal
to ``c`` (after any feature-wise normalisation ``(c - mean_i) / std_i``), the new bias is
``b + v_i * W[i, :]``, computed from the old parameters inside the remap.

An expression for ``v_i`` is data (so a plan can be saved): ``("const", value)``,
``("param", old_param_index, axis, index)`` or ``("op", primitive, y, *args)`` for a small set of
elementwise primitives.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

OPS: dict[str, Any] = {  # "integer_pow" is evaluated inline (None here)
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "div": jnp.divide,
    "max": jnp.maximum, "min": jnp.minimum, "neg": jnp.negative, "abs": jnp.abs,
    "sqrt": jnp.sqrt, "rsqrt": jax.lax.rsqrt, "exp": jnp.exp, "log": jnp.log, "tanh": jnp.tanh,
    "logistic": jax.nn.sigmoid, "square": jnp.square, "convert_element_type": lambda x: x,
    "integer_pow": None, "pow": jnp.power,
}


def evaluate(expr, old_leaves):
  """The scalar value of ``expr`` given the old parameter leaves (a list, by old index)."""
  kind = expr[0]
  if kind == "const":
    return jnp.asarray(expr[1], jnp.float32)
  if kind == "param":
    _, idx, axis, i = expr
    x = jnp.asarray(old_leaves[idx])
    return jnp.take(x, i, axis=axis).reshape(-1)[0]
  _, prim, y, *args = expr
  vals = [evaluate(a, old_leaves) for a in args]
  if prim == "integer_pow":
    return vals[0] ** y
  return OPS[prim](*vals)


def contribution(term, old_leaves, old_shape_of_bias):
  """``v_i * W[i, :]`` in the old bias's coordinates: term = (expr, kernel index, row axis, i)."""
  expr, k, row_axis, i = term
  w = jnp.take(jnp.asarray(old_leaves[k]), i, axis=row_axis)
  return (evaluate(expr, old_leaves) * w).reshape(old_shape_of_bias)
