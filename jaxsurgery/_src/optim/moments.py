"""What a leaf plan does to optimizer statistics: the operator per kind of state leaf.

A param-shaped leaf of a training state is one of four *roles*:

* ``"param"`` -- the params or an image of them (EMA params): the leaf plan
  itself (:func:`~jaxsurgery._src.surgery.remap.apply_leaf`);
* ``"grad"`` -- linear in the gradients (Adam's ``mu``, momentum ``trace``);
* ``"grad_sq"`` -- quadratic in the gradients (Adam's ``nu``, RMSProp, Adagrad);
* ``"counts"`` / ``"ages"`` -- per-element step counts (:func:`scale_by_adam`'s
  ``counts``, :func:`freeze_fresh`'s ``ages``).

Why the moments need their own operator. Let the plan map the old params ``W``
to ``W' = R(W)`` and preserve the function for every ``W`` (a linear
embedding: index maps, ``scale``, clones). Then ``L(W) = L'(R(W))`` and the
chain rule gives ``g = R^T g'``. A new element ``e'`` copied from old element
``e`` with multiplier ``s`` (``scale``), among ``n`` copies of ``e`` in the leaf
(clones), that all see the same gradient (they are symmetric), therefore has

    g'(e') = g(e) / (s * n)

so ``m' = m / (s n)`` and ``v' = v / (s n)^2``: the copies of a cloned unit's
fan-out weights (``n`` copies, ``s = 1``) get ``m/n`` and ``v/n^2``; the fan-in
of the clones (``n`` copies, ``s = 1/n``) keeps ``m`` and ``v``; a leaf only
rescaled (a key absorbing a new ``1/sqrt(d)``) gets ``m/s`` and ``v/s^2``. Fresh
positions -- new units, positions filled with the mean of the old ones, a
zeroed leaf -- have no gradient history on the old data (the function is
preserved, so nothing downstream reads them): their moments are the new
optimizer's init (zeros) and their counts 0, so that a per-element count
(:func:`scale_by_adam`) gives them the first steps of a freshly initialised
Adam. A folded constant feature changes a bias's value, not its gradient:
moments are carried unchanged. Clone noise (``noise > 0``) breaks the symmetry
on purpose; the copies' gradients then differ by terms of the noise's size and
``g/(s n)`` is their mean, not each one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

import jax.numpy as jnp
import numpy as np

from jaxsurgery._src.surgery.remap import copies_as_is, gather

if TYPE_CHECKING:
  from jaxsurgery._src.surgery.plan import LeafPlan

#: The role of a param-shaped state leaf (see the module docstring).
Role = Literal["param", "grad", "grad_sq", "counts", "ages"]
PARAM: Final = "param"
GRAD: Final = "grad"
GRAD_SQ: Final = "grad_sq"
COUNTS: Final = "counts"
AGES: Final = "ages"
ROLES: tuple[Role, ...] = (PARAM, GRAD, GRAD_SQ, COUNTS, AGES)

#: State field names and the role of the param-shaped subtree below them (optax, PyTorch-style names).
ROLE_OF_NAME: dict[str, Role] = {
    "mu": GRAD, "trace": GRAD, "momentum": GRAD, "exp_avg": GRAD,
    "nu": GRAD_SQ, "nu_max": GRAD_SQ, "exp_avg_sq": GRAD_SQ, "sum_of_squares": GRAD_SQ,
    "counts": COUNTS, "ages": AGES,
}

#: Roles whose leaves are integers (step counts).
INTEGER_ROLES: Final = (COUNTS, AGES)


def role_of_prefix(prefix: str) -> Role:
  """The role of the param-shaped subtree at ``prefix`` (``"opt_state/0/mu/"`` -> ``"grad"``), by its last name.

  NNX wraps state leaves in variables (``.../mu/l1/kernel/value``) but the
  prefix is the same; a restored checkpoint keeps the field names.
  """
  parts = [p for p in prefix.strip("/").split("/") if p]
  return ROLE_OF_NAME.get(parts[-1], PARAM) if parts else PARAM


# -- the plan's structure -----------------------------------------------------------------

def _column(v: np.ndarray, a: int, rank: int) -> np.ndarray:
  return v.reshape((1,) * a + (-1,) + (1,) * (rank - a - 1))


def clone_multiplicity(leaf: LeafPlan) -> list[tuple[int, np.ndarray]]:
  """``[(axis, n per new index)]``: how many copies of its old index the leaf holds, along axes with clones.

  An old index that a map repeats is a clone (HyperCloning's ``W.repeat``):
  the planner repeats an index only to replicate a unit.
  """
  out = []
  for a, m in enumerate(leaf.maps):
    if m is None:
      continue
    valid = m >= 0
    if leaf.old_shape is None or not valid.any():
      continue
    n = np.bincount(m[valid], minlength=leaf.old_shape[a])
    per_new = np.where(valid, n[np.maximum(m, 0)], 1)
    if (per_new != 1).any():
      out.append((a, per_new))
  return out


def gradient_divisor(leaf: LeafPlan) -> np.ndarray | None:
  """``s * n`` per new element (broadcastable), or ``None`` when it is 1 everywhere."""
  scale = np.asarray(getattr(leaf, "scale", 1.0), np.float64)
  mult = clone_multiplicity(leaf)
  if not mult and np.all(scale == 1.0):
    return None
  rank = len(leaf.shape)
  d = np.ones((1,) * rank) * scale
  for a, n in mult:
    d = d * _column(n.astype(np.float64), a, rank)
  return d


def _fresh_columns(leaf: LeafPlan) -> list[np.ndarray]:
  """Per grown axis, the broadcastable column of its new positions (one column of ones: all fresh)."""
  rank = len(leaf.shape)
  if leaf.old_path is None or getattr(leaf, "zero_all", False):
    return [np.ones((1,) * rank, bool)]
  return [_column(m < 0, a, rank) for a, m in enumerate(leaf.maps) if m is not None and (m < 0).any()]


def fresh_mask(leaf: LeafPlan) -> Any:
  """Broadcastable bool: the new elements that are not a copy of an old element (fresh, mean-filled, zeroed).

  ORed in jax from per-axis columns: a numpy OR of columns of two grown axes would be a
  leaf-sized constant in the program.
  """
  cols = _fresh_columns(leaf)
  if not cols:
    return np.zeros((1,) * len(leaf.shape), bool)
  out = jnp.asarray(cols[0])
  for c in cols[1:]:
    out = out | jnp.asarray(c)
  return out


# -- the operators -------------------------------------------------------------------------

def apply_statistic(leaf: LeafPlan, old: Any, init: Any, role: Role, *, from_scalar: bool = False) -> Any:
  """One new optimizer-statistics leaf from the old one (``role`` is not ``"param"``).

  Args:
    leaf: the parameter's leaf plan.
    old: the old statistics leaf (of the old parameter's shape), or with
      ``from_scalar`` a scalar count broadcast to every old element.
    init: the new optimizer's init of the leaf (fresh moments take it).
    role: ``"grad"``, ``"grad_sq"``, ``"counts"`` or ``"ages"``.
    from_scalar: ``old`` is one count for every element (an optax state with
      one scalar ``count`` remapped into per-element counts).

  Returns:
    The new leaf, with ``init``'s shape and dtype.
  """
  counting = role in INTEGER_ROLES
  fresh_value = jnp.zeros((), init.dtype) if counting else init
  if leaf.old_path is None or getattr(leaf, "zero_all", False) or old is None:
    return jnp.broadcast_to(fresh_value, init.shape).astype(init.dtype)
  x = jnp.asarray(old)
  if from_scalar:
    x = jnp.broadcast_to(x.astype(init.dtype), leaf.old_shape)
  x, _ = gather(x, leaf.maps, len(leaf.shape))
  if role in (GRAD, GRAD_SQ):
    d = gradient_divisor(leaf)
    if d is not None:
      x = x.astype(jnp.promote_types(x.dtype, jnp.float32)) / (d if role == GRAD else d * d).astype(np.float32)
  x = x.astype(init.dtype)
  if not _fresh_columns(leaf):
    return x
  return jnp.where(fresh_mask(leaf), fresh_value, x)


def is_identity(leaf: LeafPlan, role: Role) -> bool:
  """The leaf plan leaves a state leaf of this role as it is (same shape, same values)."""
  if leaf.old_path is None or leaf.old_shape != leaf.shape or getattr(leaf, "zero_all", False):
    return False
  if any(m is not None for m in leaf.maps) or leaf.zero is not None:
    return False
  if role == PARAM:
    return copies_as_is(leaf)
  if role in (GRAD, GRAD_SQ):
    return gradient_divisor(leaf) is None
  return True
