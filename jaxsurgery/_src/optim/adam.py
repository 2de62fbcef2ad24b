"""Adam with a per-element step count: fresh elements after a surgery start as a freshly initialised Adam.

optax's ``scale_by_adam`` keeps one ``count`` for the whole tree. After a
surgery that count is copied (old elements must keep their bias correction),
so a fresh element with zero moments is bias-corrected as if it had trained
for ``count`` steps: its first update is ``(1-b1) g / (sqrt(1-b2) |g|)``, about
``3.16`` times the learning rate, and it decays only as ``nu`` fills, over
~``1/(1-b2)`` steps (docs/integrations.md, "Optimizer state after surgery").

:func:`scale_by_adam` here is optax's update with one difference: the bias
corrections use a per-element count ``counts`` (a tree like the params). A run
that starts from scratch has ``counts == count`` everywhere and computes
exactly what optax computes. After :func:`~jaxsurgery.remap_state`, old
elements keep their count (copied from the old per-element counts, or from the
old optax state's scalar ``count``) and fresh elements start at 0: their first
update is ``lr * g / (|g| + eps)``, as in a fresh run. The state's ``count``,
``mu`` and ``nu`` keep optax's names and places, so an optax Adam state maps
into it with no ``rename``.

The cost is one integer per parameter (``count_dtype``; the increment
saturates at the dtype's maximum, which is exact as long as ``b2**max`` is 0 in
float32: ``int16`` is enough for ``b2 <= 0.9995``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`: optax's fields, and the per-element counts.

  Attributes:
    count: steps taken by the transform (a scalar, as in optax).
    mu: first moments.
    nu: second moments.
    counts: steps taken by each element (a tree like the params); fresh
      elements after a surgery start at 0.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's own state does
  mu: optax.Updates
  nu: optax.Updates
  counts: optax.Updates


def _saturating_increment(c):
  top = jnp.iinfo(c.dtype).max
  return jnp.where(c < top, c + jnp.ones((), c.dtype), c)


def _bias_correction(moment, decay, counts):
  return jax.tree.map(lambda t, c: t / (1 - decay ** c).astype(t.dtype), moment, counts)


def _check_count_dtype(count_dtype) -> Any:
  dtype = jnp.dtype(count_dtype)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"`count_dtype` must be an integer dtype (int32, int16...), got {dtype}.")
  return dtype


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                  mu_dtype: Any = None, *, nesterov: bool = False,
                  count_dtype: Any = jnp.int32) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with per-element bias correction (fresh elements start afresh).

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    mu_dtype: dtype of the first moment (default: that of the params).
    nesterov: Nesterov momentum (NAdam), as in optax.
    count_dtype: integer dtype of the per-element counts.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdamState`.

  Example:
    >>> import jax.numpy as jnp, optax, jaxsurgery as js
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(js.optim.scale_by_adam(), optax.scale(-1e-2))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1., -2., 3.])}, state)
    >>> [round(u, 4) for u in updates["w"].tolist()], state[0].counts["w"].tolist()   # a fresh Adam's lr * sign(g)
    ([-0.01, 0.01, -0.01], [1, 1, 1])
  """
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  count_dtype = _check_count_dtype(count_dtype)

  def init_fn(params):
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params), counts=optax.tree.zeros_like(params, dtype=count_dtype))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    counts_inc = jax.tree.map(_saturating_increment, state.counts)
    if nesterov:
      mu_hat = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g,
                            _bias_correction(mu, b1, jax.tree.map(_saturating_increment, counts_inc)),
                            _bias_correction(updates, b1, counts_inc))
    else:
      mu_hat = _bias_correction(mu, b1, counts_inc)
    nu_hat = _bias_correction(nu, b2, counts_inc)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return updates, ScaleByAdamState(count=count_inc, mu=mu, nu=nu, counts=counts_inc)

  return optax.GradientTransformation(init_fn, update_fn)


def adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 0.0, mu_dtype: Any = None, *, nesterov: bool = False,
         count_dtype: Any = jnp.int32) -> optax.GradientTransformation:
  """``optax.adam`` with per-element bias correction (see :func:`scale_by_adam`).

  Same arguments and same state layout as ``optax.adam`` (``(ScaleByAdamState,
  scale_by_learning_rate state)``), plus the per-element ``counts``.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    mu_dtype: dtype of the first moment.
    nesterov: Nesterov momentum (NAdam).
    count_dtype: integer dtype of the per-element counts.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> tx = js.optim.adam(1e-3)
    >>> sorted(tx.init({"w": jnp.ones(2)})[0]._fields)
    ['count', 'counts', 'mu', 'nu']
  """
  return optax.chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, count_dtype=count_dtype),
                     optax.scale_by_learning_rate(learning_rate))


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0, mu_dtype: Any = None, weight_decay: optax.ScalarOrSchedule = 1e-4,
          mask: Any = None, *, nesterov: bool = False, count_dtype: Any = jnp.int32) -> optax.GradientTransformation:
  """``optax.adamw`` with per-element bias correction (see :func:`scale_by_adam`).

  Same arguments and state layout as ``optax.adamw``, plus the per-element ``counts``.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    mu_dtype: dtype of the first moment.
    weight_decay: decoupled weight decay (multiplied by the learning rate, as in optax).
    mask: which params get weight decay (a tree of bools or a callable), as in optax.
    nesterov: Nesterov momentum (NAdamW).
    count_dtype: integer dtype of the per-element counts.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> tx = js.optim.adamw(1e-3, weight_decay=1e-2)
    >>> len(tx.init({"w": jnp.ones(2)}))    # adam, decayed weights, learning rate: optax's layout
    3
  """
  return optax.chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, count_dtype=count_dtype),
                     optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))

