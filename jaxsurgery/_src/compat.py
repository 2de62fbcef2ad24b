"""The one place that knows how JAX versions spell primitive parameters.

Supported: JAX >= 0.7. Known differences:
* "pjit" was renamed "jit" (0.7); both names are registered.
* scan's ``num_consts``/``num_carry`` became ``ft_in`` (0.11).
* custom_vjp's sub-jaxpr is ``call_jaxpr`` (newer) or ``fun_jaxpr`` (older
  ``custom_vjp_call_jaxpr``); remat is ``checkpoint``/``remat2``; linear_call's is
  ``callee``, custom_vmap_call's is ``call``.
* shard_map's ``jaxpr`` is an open Jaxpr (0.10), with ``in_specs``/``out_specs``;
  the rule reads only the body's local avals.
"""

from __future__ import annotations

from typing import Any

import jax
from jax._src import core as jcore

JIT_NAMES = ("jit", "pjit")
CALL_NAMES = ("closed_call", "core_call", "remat2", "checkpoint", "remat",
              "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "xla_call",
              "named_call", "custom_jvp_call_jaxpr", "custom_vmap_call", "compute_on", "call",
              "remat_opt", "composite", "linear_call", "eval_jaxpr")

Literal = jcore.Literal
DropVar = jcore.DropVar
Jaxpr = jcore.Jaxpr
ClosedJaxpr = jcore.ClosedJaxpr


def sub_jaxpr(params: dict[str, Any]) -> tuple[Jaxpr, list[Any]]:
  """The (open jaxpr, consts) that a call-like primitive evaluates."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr", "callee", "call"):  # call: custom_vmap_call
    if isinstance(params.get(key), (Jaxpr, ClosedJaxpr)):
      return open_jaxpr(params[key])
  raise KeyError(f"no sub-jaxpr among params {sorted(params)}")


def open_jaxpr(j: Any) -> tuple[Jaxpr, list[Any]]:
  if isinstance(j, ClosedJaxpr):
    return j.jaxpr, list(j.consts)
  return j, []


def scan_counts(params: dict[str, Any]) -> tuple[int, int]:
  """(num_consts, num_carry) of a scan eqn."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  ft = params["ft_in"]  # JAX >= 0.11: flat-tree description of (consts, carry, xs)
  counts = getattr(ft, "num_consts", None)
  if counts is not None:
    return ft.num_consts, ft.num_carry
  consts, carry, _ = ft
  return len(consts), len(carry)


def bind(eqn, args: list[Any]) -> list[Any]:
  """Evaluates one eqn on concrete arguments (constant folding)."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bound, tuple):  # JAX < 0.8: (subfuns, params)
    subfuns, params = bound
  else:
    subfuns, params = [], bound
  with eqn.ctx.manager if hasattr(eqn, "ctx") else _null():
    out = eqn.primitive.bind(*subfuns, *args, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def jax_version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
