"""Hold fresh elements still for a few steps while their optimizer moments fill.

OpenAI Five set the learning rate to 0 for hours after each surgery, so that
Adam's statistics of the new parameters could settle before they moved
(arXiv 1912.06680, Appendix B). :func:`freeze_fresh` makes that local: only the
elements a surgery created are held; the old ones keep training.

The transform carries an *age* per element (a tree like the params). A run
started from scratch initialises every age to ``steps`` (nothing is fresh).
:func:`~jaxsurgery.remap_state` gives the fresh elements of the new state age 0
and the old elements their old age (or ``steps`` when the old run had no
``freeze_fresh``). An element's update is zeroed while its age is below
``steps``; ages grow by one per step and stop at ``steps``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsurgery._src.core import features as feats
from jaxsurgery._src.optim import moments

if TYPE_CHECKING:
  from jaxsurgery._src.surgery.remap import Surgery


class FreezeFreshState(NamedTuple):
  """State of :func:`freeze_fresh`.

  Attributes:
    ages: per element, the steps it has been trained for, up to ``steps``
      (fresh elements after a surgery start at 0).
  """

  ages: optax.Updates


def _fresh_ages(surgery: Surgery, params, steps: int, dtype):
  """Ages of a tree of new params: 0 where the plan's elements are fresh, ``steps`` elsewhere."""
  plans = surgery.leaf_plans
  roots = {""} | {p.partition("/")[0] + "/" for p in plans if "/" in p}

  def age(path, x):
    p = feats.keystr(path)
    leaf = next((plans[r + p] for r in sorted(roots) if r + p in plans), None)   # "" first, then table roots
    full = jnp.full(jnp.shape(x), steps, dtype)
    if leaf is None or tuple(jnp.shape(x)) != tuple(leaf.shape):
      return full
    return jnp.where(moments.fresh_mask(leaf), jnp.zeros((), dtype), full)
  return jax.tree_util.tree_map_with_path(age, params)


def freeze_fresh(steps: int, surgery: Surgery | None = None, *, age_dtype: Any = jnp.int32
                 ) -> optax.GradientTransformation:
  """Zeroes the updates of the elements a surgery created, for their first ``steps`` steps.

  Put it last in the chain (``optax.chain(js.optim.adam(lr), js.freeze_fresh(100))``)
  so that nothing (weight decay included) moves a frozen element. The
  moments before it keep accumulating the frozen elements' gradients, so they
  start with filled statistics. With :func:`~jaxsurgery.optim.adam` (per-element
  counts) any ``steps`` gives well-scaled first moves; with ``optax.adam`` (one
  count) a fresh ``nu`` is still ``1 - b2**steps`` of its value after
  ``steps`` steps, so the first unfrozen updates are ``~1/sqrt(1 - b2**steps)``
  too large unless ``steps`` is a few times ``1/(1-b2)``.

  Fresh elements are marked by :func:`~jaxsurgery.remap_state` (it gives them
  age 0) when the state goes through the surgery. To start the new run with a
  freshly initialised optimizer instead, pass the ``surgery``: ``init`` then
  marks its fresh elements itself.

  Args:
    steps: how many steps a fresh element is held still (``0``: never).
    surgery: optional; ``init(new_params)`` marks this plan's fresh elements.
    age_dtype: integer dtype of the per-element ages (must hold ``steps``).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`FreezeFreshState`.

  Raises:
    ValueError: ``steps`` is negative or does not fit ``age_dtype``.

  Example:
    >>> import jax.numpy as jnp, optax, jaxsurgery as js
    >>> tx = js.freeze_fresh(2)
    >>> state = js.optim.FreezeFreshState(ages={"w": jnp.array([2, 0])})   # element 1 is fresh
    >>> for _ in range(3):
    ...   u, state = tx.update({"w": jnp.ones(2)}, state)
    ...   print(u["w"].tolist())
    [1.0, 0.0]
    [1.0, 0.0]
    [1.0, 1.0]
  """
  dtype = jnp.dtype(age_dtype)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"`age_dtype` must be an integer dtype, got {dtype}.")
  if not 0 <= steps <= jnp.iinfo(dtype).max:
    raise ValueError(f"`steps` must be between 0 and {jnp.iinfo(dtype).max} for age_dtype={dtype}; got {steps}.")

  def init_fn(params):
    if surgery is not None:
      return FreezeFreshState(ages=_fresh_ages(surgery, params, steps, dtype))
    return FreezeFreshState(ages=jax.tree.map(lambda x: jnp.full(jnp.shape(x), steps, dtype), params))

  def update_fn(updates, state, params=None):
    del params
    held = jax.tree.map(lambda a: a < steps, state.ages)
    updates = jax.tree.map(lambda u, h: jnp.where(h, jnp.zeros((), u.dtype), u), updates, held)
    ages = jax.tree.map(lambda a: jnp.minimum(a + jnp.ones((), a.dtype), jnp.asarray(steps, a.dtype)), state.ages)
    return updates, FreezeFreshState(ages=ages)

  return optax.GradientTransformation(init_fn, update_fn)
