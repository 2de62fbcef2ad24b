"""The registry of dependency rules and primitive traits, keyed by primitive name.

A rule is ``rule(ctx, eqn, invals) -> list[Val]``. Families of primitives share
one rule, so registering most primitives is a one-liner::

    register(("exp", "log", "tanh"), unary, traits=("elementwise",))

*Traits* say what the other stages need to know about a primitive beyond its
mask rule: the gradient probe (how an operation's local derivative depends on
its operands), the novelty pass of the planner (views, casts, products, sums)
and the axis-structure walk (elementwise ops keep an axis). They are declared
next to the rule, in the style of ``jax.experimental.jet``'s ``deflinear`` and
``defzero``: with the ``traits=`` of :func:`register`, or with
:func:`add_traits` right after it for a subset of a family. The stages query
them with :func:`has_trait` and :func:`with_trait`; see :data:`TRAITS` for
their meaning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

#: ``rule(ctx, eqn, invals) -> list[Val]`` (see :class:`jaxsurgery.rules.Rule`).
Rule = Callable[[Any, Any, list[Any]], list[Any]]

Trait = Literal["elementwise", "passthrough", "call", "control", "view", "cast", "linear", "zero_grad",
                "product", "sum", "additive", "places", "selection", "indexed"]

#: What each trait means, and which stage reads it.
TRAITS: Mapping[str, str] = {
    "elementwise": "out[e] depends on the operands at e only (axes: keeps every axis; novelty: spreading "
                   "is measured against the union of the operands)",
    "passthrough": "one output per operand, each a copy of it (axes: keeps every axis)",
    "call": "evaluates a sub-jaxpr in place with the caller's values (probe, novelty, axes: walk inside)",
    "control": "a loop, conditional or shard_map body run in place (probe: evaluated as one unit)",
    "view": "feature-free data movement: a zero mask is carried by applying the op to it (novelty)",
    "cast": "a value-preserving conversion: zero masks pass unchanged (novelty)",
    "linear": "its local derivative w.r.t. every operand is constant (probe)",
    "zero_grad": "its derivative is zero: comparisons, rounding, integer and key ops (probe)",
    "product": "multiplies its operands: the derivative w.r.t. one is the others (probe: multiplicative "
               "contact; novelty: a fresh factor of a novel value is zeroed)",
    "sum": "adds its operands (novelty: a fresh summand of an old value is zeroed)",
    "additive": "adds or places a value into another: the placed value's gradient does not depend on "
                "its partner (probe: additive contact)",
    "places": "places a parameter-derived value into a feature-dependent one, like additive ones "
              "(probe: zeroed by the annihilating run)",
    "selection": "selects between its operands (max, sort...): the derivative follows the winner (probe)",
    "indexed": "selects or places by an index operand (probe: selection contact)",
}

#: Registered names that are not primitives of JAX 0.10 (checked by tests/test_coverage.py),
#: with why they are kept. Most are other JAX versions' spellings; the ones marked
#: "unverified" come from an earlier rule table and may name a primitive of another
#: version or backend. A name that is neither a primitive nor listed here fails the test.
_OLDER = "a primitive name of older JAX versions"
_UNVERIFIED = "unverified: possibly another JAX version's or backend's primitive"
LEGACY_NAMES: Mapping[str, str] = {
    "pjit": "jit's name before JAX 0.7",
    "checkpoint": "remat2's name in other JAX versions",
    "copy_p": "copy's name in other JAX versions",
    "core_call": _OLDER, "xla_call": _OLDER, "named_call": _OLDER,
    "custom_vjp_call_jaxpr": "custom_vjp_call's name in older JAX versions (its sub-jaxpr is fun_jaxpr)",
    "remat": _UNVERIFIED, "scatter_add": _UNVERIFIED, "scatter_mul": _UNVERIFIED, "scatter_min": _UNVERIFIED,
    "scatter_max": _UNVERIFIED, "scatter_sub": _UNVERIFIED,
    "callback": _UNVERIFIED, "eigh_jacobi": _UNVERIFIED, "frexp": _UNVERIFIED, "linear_solve": _UNVERIFIED,
    "mesh_cast": _UNVERIFIED, "orgqr": _UNVERIFIED, "pgather": _UNVERIFIED, "psum_scatter": _UNVERIFIED,
    "ragged_dot": _UNVERIFIED, "random_gamma_grad": _UNVERIFIED, "random_key_data": _UNVERIFIED,
    "tsqr": _UNVERIFIED,
    **{n: "equinox.internal's primitive (not jax's)" for n in
       ("nonbatchable", "select_if_vmap", "unvmap_any", "unvmap_all", "unvmap_max")},
}

_RULES: dict[str, Rule] = {}
_TRAITS: dict[str, frozenset[str]] = {}
_OVERRIDES: list[dict[str, Rule]] = []
_BY_TRAIT: dict[tuple[str, ...], frozenset[str]] = {}  # cache of with_trait, cleared on registration


def _names(names: str | Iterable[str]) -> list[str]:
  return [names] if isinstance(names, str) else list(names)


def _check_traits(traits: Iterable[str]) -> frozenset[str]:
  traits = frozenset(traits)
  unknown = sorted(traits - set(TRAITS))
  if unknown:
    raise ValueError(f"Unknown primitive traits {unknown}; known traits: {sorted(TRAITS)}.")
  return traits


def register(names: str | Iterable[str], rule: Rule, *, traits: Iterable[str] | None = None) -> Rule:
  """Registers ``rule`` (and optionally its traits) for one primitive name or several.

  Args:
    names: a primitive name (``eqn.primitive.name``) or several.
    rule: ``rule(ctx, eqn, invals) -> list[Val]``.
    traits: the primitives' traits (keys of :data:`TRAITS`); ``None`` keeps
      the traits they already have (so a replaced rule keeps what the probe and
      the planner know about the primitive), ``()`` clears them.

  Returns:
    ``rule``, so that ``register`` can be used as a decorator factory's body.
  """
  checked = None if traits is None else _check_traits(traits)
  for name in _names(names):
    _RULES[name] = rule
    if checked is not None or name not in _TRAITS:
      _TRAITS[name] = checked or frozenset()
  _BY_TRAIT.clear()
  return rule


def add_traits(names: str | Iterable[str], *traits: str) -> None:
  """Adds traits to primitives that already have a rule (declared next to it)."""
  checked = _check_traits(traits)
  for name in _names(names):
    if name not in _RULES:
      raise ValueError(f"add_traits: primitive {name!r} has no rule; register its rule first, so that "
                       f"traits are declared next to the rule.")
    _TRAITS[name] = _TRAITS[name] | checked
  _BY_TRAIT.clear()


def has_trait(name: str, trait: str) -> bool:
  """Whether primitive ``name`` has ``trait``."""
  return trait in _TRAITS.get(name, ())


def with_trait(*traits: str) -> frozenset[str]:
  """The primitive names that have any of ``traits``."""
  hit = _BY_TRAIT.get(traits)
  if hit is None:
    wanted = set(traits)
    hit = _BY_TRAIT[traits] = frozenset(n for n, ts in _TRAITS.items() if not wanted.isdisjoint(ts))
  return hit


def traits_of(name: str) -> frozenset[str]:
  """The traits of primitive ``name`` (empty if it has no rule)."""
  return _TRAITS.get(name, frozenset())


def registered() -> frozenset[str]:
  """Every primitive name with a registered rule."""
  return frozenset(_RULES)


def active_rules() -> dict[str, Rule]:
  """``{name: rule}`` with the active overrides applied."""
  rules = dict(_RULES)
  for layer in _OVERRIDES:
    rules.update(layer)
  return rules


def lookup(name: str) -> Rule | None:
  """The active rule of primitive ``name`` (``None`` if it has none)."""
  return active_rules().get(name)


@contextlib.contextmanager
def override_rule(name: str, rule: Rule) -> Iterator[None]:
  """Temporarily replaces the rule of one primitive (for experiments and tests).

  Tables built inside the ``with`` block use ``rule``; the primitive keeps its
  traits. Overrides nest, and each is removed when its block exits.

  Args:
    name: the primitive name (``eqn.primitive.name``), e.g. ``"dot_general"``.
    rule: ``rule(ctx, eqn, invals) -> list[Val]``.

  Returns:
    A context manager.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x * p["w"])
    >>> params, x = {"w": jnp.ones(3)}, jnp.ones(3)
    >>> spec = js.Features(["a", "b", "c"])
    >>> with js.override_rule("tanh", js.rules.dense):   # tanh mixes every element
    ...   table = js.dependency_table(fn, params, x, spec)
    >>> bool(table.output_mask().all())
    True
    >>> js.dependency_table(fn, params, x, spec).output_mask()[0].tolist()
    [True, False, False]
  """
  layer = {name: rule}
  _OVERRIDES.append(layer)
  try:
    yield
  finally:
    _OVERRIDES.remove(layer)
