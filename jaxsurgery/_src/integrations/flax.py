"""Flax integration: plan from NNX / Linen models, remap NNX models and optimizers, Linen ``TrainState``.

Paths agree with the core because every state goes through the same
``keystr`` format: an NNX state leaf is ``l1/kernel/value``, its optimizer
moment ``opt_state/0/mu/l1/kernel/value``; a Linen ``TrainState`` holds
``params/Dense_0/kernel`` and ``opt_state/0/mu/Dense_0/kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from flax.training import train_state as train_state_lib

from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core.errors import UnknownNameError
from jaxsurgery._src.core.table import dependency_table
from jaxsurgery._src.surgery.plan import plan
from jaxsurgery._src.surgery.remap import Surgery
from jaxsurgery._src.surgery.state import StateReport, remap_state
from jaxsurgery._src.surgery.verify import verify

# -- planning from models --------------------------------------------------------------

def _default_nnx_call(model, inputs):
  return model(inputs)


def _abstract_leaves(tree) -> list[str]:
  return [feats.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(x, jax.ShapeDtypeStruct)]


def nnx_fn(model: nnx.Module, wrt: Any = ..., call: Callable | None = None):
  """A pure function of an NNX model's state, for :func:`~jaxsurgery.dependency_table` and :func:`~jaxsurgery.verify`.

  Args:
    model: an ``nnx.Module``; abstract (``nnx.eval_shape(lambda: Model(...))``)
      is enough for planning, nothing is allocated.
    wrt: the variables the function takes (and the plan covers). The default
      ``...`` takes the whole state: params, batch statistics (remapped per
      unit like the params), rng keys and counts. A narrower filter such as
      ``nnx.Param`` closes over the rest, which must then be concrete.
    call: ``call(model, inputs) -> outputs``; default ``model(inputs)``.

  Returns:
    ``(fn, state)``: ``fn(state, inputs)`` runs the model; ``state`` is the
    ``wrt`` state, with paths like ``l1/kernel/value``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> from flax import nnx
    >>> abstract = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)))   # allocates nothing
    >>> fn, state = jsf.nnx_fn(abstract)
    >>> x = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    >>> js.dependency_table(fn, state, x, js.Features(["a", "b"])).paths
    ('bias/value', 'kernel/value')
  """
  call = call or _default_nnx_call
  rest: list[Any]
  if wrt is ...:
    graphdef, state = nnx.split(model)
    rest = []
  else:
    graphdef, state, *rest = nnx.split(model, wrt, ...)
    abstract = _abstract_leaves(rest)
    if abstract:
      raise ValueError(f"nnx_fn(wrt={wrt!r}) closes over the state outside wrt, but it is abstract "
                       f"({abstract[:4]}...). Use the default wrt=... (the whole state) with an abstract model, "
                       f"or pass a concrete model.")

  def fn(s, inputs):
    return call(nnx.merge(graphdef, s, *rest), inputs)
  return fn, state


def plan_nnx(old_model: nnx.Module, new_model: nnx.Module, old_inputs, new_inputs, old_features, new_features, *,
             wrt: Any = ..., call: Callable | None = None, rename: Mapping[str, str] | None = None,
             strict: bool = False, strict_tables: bool = False) -> Surgery:
  """Plans a surgery between two NNX models (abstract or concrete).

  Args:
    old_model: the old ``nnx.Module``; an abstract one from ``nnx.eval_shape`` is
      enough (planning allocates no parameters).
    new_model: the new one (abstract or concrete).
    old_inputs: example inputs of the old model (arrays or ``jax.ShapeDtypeStruct``).
    new_inputs: example inputs of the new model.
    old_features: the feature spec of the old inputs (:class:`~jaxsurgery.Features`...).
    new_features: the feature spec of the new inputs.
    wrt: the variables the plan covers; see :func:`nnx_fn` (default: all).
    call: ``call(model, inputs) -> outputs``; default ``model(inputs)``.
    rename: passed to :func:`~jaxsurgery.plan` (old -> new feature names or
      state paths, e.g. ``{"l1/kernel/value": "enc/kernel/value"}``).
    strict: passed to :func:`~jaxsurgery.plan`.
    strict_tables: passed as ``strict`` to :func:`~jaxsurgery.dependency_table`.

  Returns:
    A :class:`~jaxsurgery.Surgery` whose paths are NNX state paths
    (``l1/kernel/value``): apply it with :func:`transplant`, or as
    ``surgery(nnx.state(old), nnx.state(new))``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> from flax import nnx
    >>> old = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> new = nnx.eval_shape(lambda: nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    >>> x2, x3 = jax.ShapeDtypeStruct((1, 2), jnp.float32), jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> surgery = jsf.plan_nnx(old, new, x2, x3, js.Features(["a", "b"]), js.Features(["a", "new", "b"]))
    >>> surgery.report.preserved, surgery.report.added
    (True, ('new',))
  """
  tables = []
  for model, inputs, features in ((old_model, old_inputs, old_features), (new_model, new_inputs, new_features)):
    fn, state = nnx_fn(model, wrt, call)
    tables.append(dependency_table(fn, state, inputs, features, strict=strict_tables))
  return plan(*tables, rename=rename, strict=strict)


def verify_nnx(surgery: Surgery, old_model, new_model, old_inputs, new_inputs, *, key, wrt: Any = ...,
               call: Callable | None = None, **kwargs):
  """:func:`~jaxsurgery.verify` for NNX models: does the new model compute what the old one did?

  Args:
    surgery: the plan (from :func:`plan_nnx` with the same ``wrt``).
    old_model: the old (trained) model, concrete.
    new_model: the new model after :func:`transplant`, concrete.
    old_inputs: example inputs of the old model (shapes are enough).
    new_inputs: example inputs of the new model.
    key: a PRNG key.
    wrt: the variables the plan covers, as in :func:`nnx_fn`.
    call: ``call(model, inputs) -> outputs``, as in :func:`nnx_fn`.
    **kwargs: passed to :func:`~jaxsurgery.verify` (``atol``, ``samples``...).

  Returns:
    A :class:`~jaxsurgery.Verification`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> from flax import nnx
    >>> old_model, new_model = nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 3, rngs=nnx.Rngs(1))
    >>> x2, x3 = jax.ShapeDtypeStruct((1, 2), jnp.float32), jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> surgery = jsf.plan_nnx(old_model, new_model, x2, x3, js.Features(["a", "b"]),
    ...                        js.Features(["a", "new", "b"]))
    >>> jsf.verify_nnx(surgery, old_model, new_model, x2, x3, key=jax.random.key(0)).ok  # before the transfer
    False
    >>> _ = jsf.transplant(surgery, old_model, new_model)
    >>> jsf.verify_nnx(surgery, old_model, new_model, x2, x3, key=jax.random.key(0)).ok
    True
  """
  old_fn, old_state = nnx_fn(old_model, wrt, call)
  new_fn, new_state = nnx_fn(new_model, wrt, call)
  return verify(surgery, old_fn, new_fn, old_state, new_state, old_inputs, new_inputs, key=key, **kwargs)


def _default_linen_call(module, variables, inputs):
  return module.apply(variables, inputs)


def linen_fn(module, variables, collections: Sequence[str] | None = None, call: Callable | None = None):
  """A pure function of a Linen module's variables, for :func:`~jaxsurgery.dependency_table`.

  Args:
    module: a ``flax.linen.Module``.
    variables: its variables (``module.init(...)``, or abstract:
      ``jax.eval_shape(module.init, key, x)``).
    collections: the collections the function takes (and the plan covers);
      default all of them. Paths start with the collection
      (``params/Dense_0/kernel``, ``batch_stats/BatchNorm_0/mean``); a
      ``TrainState``'s optimizer moments (``opt_state/0/mu/Dense_0/kernel``) are
      matched below the ``params/`` root. Collections left out are closed over
      and must be concrete.
    call: ``call(module, variables, inputs) -> outputs``; default
      ``module.apply(variables, inputs)``.

  Returns:
    ``(fn, variables)``: ``fn(variables, inputs)`` and the variables it takes.

  Raises:
    UnknownNameError: ``collections`` names a collection ``variables`` lack.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> import flax.linen as nn
    >>> x = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    >>> variables = jax.eval_shape(nn.Dense(3).init, jax.random.key(0), x)
    >>> fn, taken = jsf.linen_fn(nn.Dense(3), variables)
    >>> js.dependency_table(fn, taken, x, js.Features(["a", "b"])).paths
    ('params/bias', 'params/kernel')
  """
  call = call or _default_linen_call
  names = list(variables) if collections is None else list(collections)
  missing = [c for c in names if c not in variables]
  if missing:
    raise UnknownNameError(f"`variables` have no collection(s) {missing}; they have {list(variables)}. "
                           f"Pass `collections=` with some of these.")
  taken = {c: variables[c] for c in names}
  rest = {c: v for c, v in variables.items() if c not in names}
  abstract = _abstract_leaves(rest)
  if abstract:
    raise ValueError(f"linen_fn(collections={names}) closes over the other collections, but they are abstract "
                     f"({abstract[:4]}...). Include them in collections, or pass concrete variables.")

  def fn(v, inputs):
    return call(module, {**rest, **v}, inputs)
  return fn, taken


def plan_linen(old_module, new_module, old_variables, new_variables, old_inputs, new_inputs, old_features,
               new_features, *, collections: Sequence[str] | None = None, call: Callable | None = None,
               rename: Mapping[str, str] | None = None, strict: bool = False,
               strict_tables: bool = False) -> Surgery:
  """Plans a surgery between two Linen modules (variables may be abstract).

  Args:
    old_module: the old ``flax.linen.Module``.
    new_module: the new one.
    old_variables: the old module's variables; ``jax.eval_shape(module.init, key,
      x)`` is enough.
    new_variables: the new module's variables (abstract is enough).
    old_inputs: example inputs of the old module (arrays or ``jax.ShapeDtypeStruct``).
    new_inputs: example inputs of the new module.
    old_features: the feature spec of the old inputs.
    new_features: the feature spec of the new inputs.
    collections: the collections the plan covers, as in :func:`linen_fn`.
    call: ``call(module, variables, inputs) -> outputs``, as in :func:`linen_fn`.
    rename: passed to :func:`~jaxsurgery.plan`.
    strict: passed to :func:`~jaxsurgery.plan`.
    strict_tables: passed as ``strict`` to :func:`~jaxsurgery.dependency_table`.

  Returns:
    A :class:`~jaxsurgery.Surgery` over the variables (paths like
    ``params/Dense_0/kernel``), ready for :func:`remap_train_state`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> import flax.linen as nn
    >>> x2, x3 = jax.ShapeDtypeStruct((1, 2), jnp.float32), jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> module = nn.Dense(3)
    >>> v2, v3 = (jax.eval_shape(module.init, jax.random.key(0), x) for x in (x2, x3))
    >>> surgery = jsf.plan_linen(module, module, v2, v3, x2, x3, js.Features(["a", "b"]),
    ...                          js.Features(["a", "new", "b"]))
    >>> [leaf.path for leaf in surgery.report.leaves], surgery.report.preserved
    (['params/bias', 'params/kernel'], True)
  """
  tables = []
  for module, variables, inputs, features in ((old_module, old_variables, old_inputs, old_features),
                                              (new_module, new_variables, new_inputs, new_features)):
    fn, taken = linen_fn(module, variables, collections, call)
    tables.append(dependency_table(fn, taken, inputs, features, strict=strict_tables))
  return plan(*tables, rename=rename, strict=strict)


# -- NNX: models and optimizers ---------------------------------------------------------

def _is_node(x) -> bool:
  return nnx.graphlib.is_graph_node(x)


def _states(x, what: str):
  """Modules / optimizers -> nnx.State, recursively through tuples, lists and dicts."""
  if _is_node(x):
    return nnx.state(x)
  if isinstance(x, nnx.State):
    return x
  if isinstance(x, (tuple, list)):
    return type(x)(_states(v, what) for v in x)
  if isinstance(x, Mapping):
    if any(_is_node(v) or isinstance(v, nnx.State) for v in x.values()):
      return {k: _states(v, what) for k, v in x.items()}
    return _with_value_leaves(x)
  raise TypeError(f"{what}: expected an nnx.Module, nnx.Optimizer, nnx.State, a pure dict of one "
                  f"(nnx.to_pure_dict), or a tuple/list/dict of those; got {type(x).__name__}.")


def _with_value_leaves(tree):
  """A pure dict (``nnx.to_pure_dict``, a restored checkpoint) with ``.../value`` paths, like an nnx.State."""
  paths = [feats.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if any(p == "value" or p.endswith("/value") for p in paths):
    return tree
  return jax.tree_util.tree_map(lambda v: {"value": v}, tree)


def _check_updatable(node):
  if _is_node(node):
    return
  if isinstance(node, (tuple, list)):
    for n in node:
      _check_updatable(n)
  elif isinstance(node, Mapping) and not isinstance(node, nnx.State):
    for n in node.values():
      _check_updatable(n)
  else:
    raise TypeError(f"transplant updates the new models in place, but got a {type(node).__name__}; pass "
                    f"nnx.Module / nnx.Optimizer objects, or use remap_nnx, which returns the new state.")


def _update(node, state, what: str):
  if _is_node(node):
    nnx.update(node, state)
  elif isinstance(node, (tuple, list)):
    for n, s in zip(node, state):
      _update(n, s, what)
  elif isinstance(node, Mapping):
    for k in node:
      _update(node[k], state[k], what)
  else:
    raise TypeError(f"{what}: cannot update a {type(node).__name__} in place; pass nnx.Module / nnx.Optimizer "
                    f"objects (or use remap_nnx, which returns the new state).")


def remap_nnx(surgery: Surgery, old, new, *, rename: Mapping[str, str] | None = None, prefixes=None,
              roles: Mapping[str, str] | None = None, strict: bool = False, return_report: bool = False):
  """The new state of NNX models / optimizers, remapped from old ones (pure: nothing is mutated).

  Args:
    surgery: planned over the models' state (e.g. by :func:`plan_nnx`).
    old: the trained ``nnx.Module`` or ``nnx.Optimizer``, its ``nnx.State``, a
      pure dict of it (``nnx.to_pure_dict`` or restored from a checkpoint), or a
      tuple / list / dict of those (``(model, optimizer)``).
    new: the new model / optimizer (concrete: fresh elements take its values),
      or its state, in the same arrangement as ``old``.
    rename: ``{old state prefix: new state prefix}``; see :func:`~jaxsurgery.remap_state`.
    prefixes: the state prefixes that hold param-shaped subtrees; see :func:`~jaxsurgery.remap_state`.
    roles: ``{new state prefix: role}`` for statistics whose name does not say it; see
      :func:`~jaxsurgery.remap_state`.
    strict: raise if anything is left behind or missing; see :func:`~jaxsurgery.remap_state`.
    return_report: also return the :class:`~jaxsurgery.StateReport`.

  Returns:
    The new ``nnx.State`` (or the tuple / dict of them); apply it with
    ``nnx.update(new_model, state)``. With ``return_report=True``, ``(state, report)``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> from flax import nnx
    >>> old_model, new_model = nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 3, rngs=nnx.Rngs(1))
    >>> x2, x3 = jax.ShapeDtypeStruct((1, 2), jnp.float32), jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> surgery = jsf.plan_nnx(old_model, new_model, x2, x3, js.Features(["a", "b"]),
    ...                        js.Features(["a", "new", "b"]))
    >>> state = jsf.remap_nnx(surgery, old_model, new_model)     # new_model is not changed
    >>> bool((state["kernel"][...][2] == old_model.kernel[...][1]).all())   # row "b" moved to 2
    True
    >>> nnx.update(new_model, state)
  """
  return remap_state(surgery, _states(old, "old"), _states(new, "new"), rename=rename, prefixes=prefixes,
                     roles=roles, strict=strict, return_report=return_report)


def transplant(surgery: Surgery, old, new, *, rename: Mapping[str, str] | None = None, prefixes=None,
               roles: Mapping[str, str] | None = None, strict: bool = False) -> StateReport:
  """Transplants trained NNX state into new models / optimizers, in place (``nnx.update``).

  Params (and every ``wrt`` variable of the plan) go through the plan;
  optimizer moments of ``nnx.Optimizer`` (``opt_state/.../mu``, ``nu``...)
  follow their elements with the moments' operator (fresh entries keep the new
  optimizer's zeros; see :func:`~jaxsurgery.remap_state`); per-element counts
  of :func:`jaxsurgery.optim.adam` are filled from the old optax count (fresh
  elements 0); the optimizer ``step``, optax counts and rng streams are copied
  when their shape is unchanged. Pass the model and its optimizer together so
  that one report covers both.

  Args:
    surgery: planned over the models' params (e.g. :func:`plan_nnx`).
    old: the trained ``nnx.Module`` / ``nnx.Optimizer`` / ``nnx.State`` / pure
      dict, or a tuple / list / dict of those.
    new: the new ``nnx.Module`` / ``nnx.Optimizer`` objects (updated in place),
      in the same arrangement as ``old``.
    rename: ``{old state prefix: new state prefix}``; see :func:`~jaxsurgery.remap_state`.
    prefixes: the state prefixes that hold param-shaped subtrees; see :func:`~jaxsurgery.remap_state`.
    roles: ``{new state prefix: role}`` for statistics whose name does not say it; see
      :func:`~jaxsurgery.remap_state`.
    strict: raise if anything is left behind or missing; see :func:`~jaxsurgery.remap_state`.

  Returns:
    The :class:`~jaxsurgery.StateReport`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> from flax import nnx
    >>> old_model, new_model = nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 3, rngs=nnx.Rngs(1))
    >>> old_opt = nnx.Optimizer(old_model, optax.adam(1e-3), wrt=nnx.Param)
    >>> new_opt = nnx.Optimizer(new_model, optax.adam(1e-3), wrt=nnx.Param)
    >>> x2, x3 = jax.ShapeDtypeStruct((1, 2), jnp.float32), jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> surgery = jsf.plan_nnx(old_model, new_model, x2, x3, js.Features(["a", "b"]),
    ...                        js.Features(["a", "new", "b"]))
    >>> print(jsf.transplant(surgery, (old_model, old_opt), (new_model, new_opt)))
    StateReport: 8 leaves -- 6 remapped, 0 fresh params, 2 copied, 0 from new init; 0 old leaves left behind
    ...
  """
  _check_updatable(new)
  state, report = remap_nnx(surgery, old, new, rename=rename, prefixes=prefixes, roles=roles, strict=strict,
                            return_report=True)
  _update(new, state, "new")
  return report


# -- Linen ------------------------------------------------------------------------------

def remap_train_state(surgery: Surgery, old_state, new_state: train_state_lib.TrainState, *,
                      rename: Mapping[str, str] | None = None, prefixes=None,
                      roles: Mapping[str, str] | None = None, strict: bool = False, return_report: bool = False):
  """A new Linen ``TrainState`` remapped from an old one: params, optimizer moments, step.

  Args:
    surgery: planned over the variables (paths like ``params/Dense_0/kernel``,
      e.g. :func:`plan_linen`) or over ``variables["params"]`` alone
      (``Dense_0/kernel``); both are understood.
    old_state: the trained ``TrainState`` (or subclass, e.g. with
      ``batch_stats``), or the dict restored from its checkpoint.
    new_state: ``TrainState.create(apply_fn=..., params=new_init, tx=...)``; its
      ``apply_fn``, ``tx`` and other static fields are kept.
    rename: ``{old state prefix: new state prefix}``; see :func:`~jaxsurgery.remap_state`.
    prefixes: the state prefixes that hold param-shaped subtrees; see :func:`~jaxsurgery.remap_state`.
    roles: ``{new state prefix: role}`` for statistics whose name does not say it; see
      :func:`~jaxsurgery.remap_state`.
    strict: raise if anything is left behind or missing; see :func:`~jaxsurgery.remap_state`.
    return_report: also return the :class:`~jaxsurgery.StateReport`.

  Returns:
    The new ``TrainState``, or ``(state, report)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxsurgery as js, jaxsurgery.flax as jsf
    >>> import flax.linen as nn
    >>> from flax.training.train_state import TrainState
    >>> module, tx = nn.Dense(3), optax.adam(1e-3)
    >>> v2, v3 = module.init(jax.random.key(0), jnp.ones((1, 2))), module.init(jax.random.key(1), jnp.ones((1, 3)))
    >>> surgery = jsf.plan_linen(module, module, v2, v3, jnp.ones((1, 2)), jnp.ones((1, 3)),
    ...                          js.Features(["a", "b"]), js.Features(["a", "new", "b"]))
    >>> old_state = TrainState.create(apply_fn=module.apply, params=v2["params"], tx=tx)
    >>> new_state = jsf.remap_train_state(surgery, old_state,
    ...                                   TrainState.create(apply_fn=module.apply, params=v3["params"], tx=tx))
    >>> bool((new_state.params["kernel"][2] == old_state.params["kernel"][1]).all())
    True
  """
  if not hasattr(new_state, "params") or not hasattr(new_state, "opt_state"):
    raise TypeError(f"new_state should be a flax.training.train_state.TrainState; got {type(new_state).__name__}. "
                    f"For other pytrees use jaxsurgery.remap_state.")
  return remap_state(surgery, old_state, new_state, rename=rename, prefixes=prefixes, roles=roles, strict=strict,
                     return_report=return_report)


__all__ = ["nnx_fn", "plan_nnx", "verify_nnx", "linen_fn", "plan_linen", "remap_nnx", "transplant", "remap_train_state"]
