"""Dependency rules, for rule authors: ``import jaxsurgery as js; js.rules``.

The mask interpreter walks a jaxpr eqn by eqn and asks each primitive's *rule*
how its outputs depend on its inputs. A rule is a function
``rule(ctx, eqn, invals) -> list[Val]`` (the :class:`Rule` protocol):

* ``eqn`` is the ``jax.core.JaxprEqn`` (the :class:`Eqn` protocol:
  ``eqn.primitive.name``, ``eqn.params``, ``eqn.outvars[k].aval.shape``);
* ``invals`` holds one :class:`Val` per operand: its forward ``mask`` (which
  features each element depends on, bit-packed; see :mod:`masks`), its
  provenance ``pull`` (``None`` unless the value comes from parameters) and a
  ``const`` for known constants;
* the rule returns one :class:`Val` per output (:func:`out_val` builds one
  from an output variable) and records, with ``ctx.touch(val, mask)``, that
  a parameter-derived operand takes part in an operation with values of
  ``mask`` (the :class:`Context` protocol).

Rules must over-approximate: an output element's mask must contain every
feature it can depend on. Ready-made rules cover most primitives:
:func:`dense` (everything depends on everything: always sound),
:func:`unary`, :func:`nary` (elementwise) and :func:`passthrough`.
Register a rule with :func:`register_rule`, swap one for a block of code with
:func:`override_rule`, and read the active one with :func:`get`.

Example:
  >>> import jax, jax.numpy as jnp, jaxsurgery as js
  >>> js.rules.get("tanh") is js.rules.unary
  True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from jaxsurgery._src.compat import Eqn
from jaxsurgery._src.core import masks
from jaxsurgery._src.core.values import Val, join_pulls, out_val
from jaxsurgery._src.rules import registry as _registry
from jaxsurgery._src.rules.elementwise import nary, passthrough, unary
from jaxsurgery._src.rules.opaque import dense
from jaxsurgery._src.rules.registry import TRAITS, override_rule

__all__ = ["Rule", "Context", "Eqn", "Val", "out_val", "join_pulls", "masks", "dense", "unary", "nary",
           "passthrough", "get", "register_rule", "override_rule", "TRAITS"]


class Context(Protocol):
  """What a rule may use of the interpreter's state (``ctx``).

  Attributes:
    num_features: the number of named features (bits of every mask).
    W: the number of 32-bit words of a packed mask (``masks.num_words``).
  """

  num_features: int
  W: int

  def touch(self, val: Val, mask: np.ndarray | None) -> None:
    """Records that ``val`` takes part in an operation with values of ``mask`` (shaped like ``val``)."""

  def run(self, jaxpr: Any, consts: Sequence[Val], args: Sequence[Val]) -> list[Val]:
    """Interprets a sub-jaxpr on these values (for call-like primitives); returns its outputs."""


class Rule(Protocol):
  """A dependency rule: ``rule(ctx, eqn, invals) -> list[Val]`` (see the module docstring)."""

  def __call__(self, ctx: Context, eqn: Eqn, invals: list[Val], /) -> list[Val]:
    """The output values of ``eqn`` given its operands' values; records touches through ``ctx``."""


def get(name: str) -> Rule | None:
  """The active rule of a primitive (overrides applied), or ``None`` if it has none.

  Args:
    name: the primitive name (``eqn.primitive.name``).

  Returns:
    The rule, or ``None`` (tables then use :func:`dense`, with a warning).

  Example:
    >>> import jaxsurgery as js
    >>> js.rules.get("add") is js.rules.nary, js.rules.get("no_such_primitive")
    (True, None)
  """
  return _registry.lookup(name)


def register_rule(names: str | Iterable[str], rule: Rule, *, traits: Iterable[str] | None = None) -> Rule:
  """Registers the dependency rule of one primitive or several, for every later table.

  Args:
    names: a primitive name (``eqn.primitive.name``) or several.
    rule: ``rule(ctx, eqn, invals) -> list[Val]`` (see :mod:`jaxsurgery.rules`).
    traits: what the gradient probe and the planner need to know about the
      primitives (keys of :data:`TRAITS`, e.g. ``("elementwise",)``); the
      default ``None`` keeps the traits a replaced rule had.

  Returns:
    ``rule``.

  Example:
    A primitive that scales its operand by the sum of another one: ``out[i] =
    x[i] * sum(w)``. Every output element depends on ``x[i]`` and on all of
    ``w``; ``w`` is touched by every feature of ``x``.

    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> from jax.extend.core import Primitive
    >>> scale_p = Primitive("scale_by_sum")
    >>> _ = scale_p.def_impl(lambda x, w: x * w.sum())
    >>> _ = scale_p.def_abstract_eval(lambda x, w: jax.core.ShapedArray(x.shape, x.dtype))
    >>> def scale_rule(ctx, eqn, invals):
    ...   x, w = invals
    ...   M = js.rules.masks
    ...   everything_x = M.uniform(M.reduce_all(x.mask), w.ndim)
    ...   ctx.touch(w, everything_x)                  # w meets every feature of x
    ...   from_w = M.uniform(M.reduce_all(w.mask), x.ndim)
    ...   return [js.rules.out_val(eqn.outvars[0], M.orr(M.lift(x.mask, x.ndim), from_w))]
    >>> _ = js.register_rule("scale_by_sum", scale_rule)
    >>> fn = lambda p, x: scale_p.bind(x, p["w"])
    >>> table = js.dependency_table(fn, {"w": jnp.ones(2)}, jnp.ones(3), js.Features(["a", "b", "c"]),
    ...                             strict=True)
    >>> bool(table.mask("w").all()), table.output_mask().tolist()[0]
    (True, [True, False, False])
  """
  return _registry.register(names, rule, traits=traits)
