"""Reference checks shared by the tests: Jacobian sparsity from JAX's own autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxsurgery as js


def element_features(n: int) -> js.Features:
  return js.Features([f"x{i}" for i in range(n)])


def _flat(f):
  def flat(x):
    return jnp.concatenate([jnp.ravel(o).astype(jnp.float32) for o in jax.tree_util.tree_leaves(f(x))])
  return flat


def jacobian_pattern(f, n: int, seeds=(0, 1, 2)) -> np.ndarray:
  """Union over random points of the nonzero pattern of d flat(f(x)) / dx: (out_size, n).

  Forward mode with the unit tangents (the Jacobian itself) and with NaN
  tangents, so coincidental zeros of the derivative cannot hide a dependence
  (0 * NaN is NaN). One jit-compiled function evaluates both at every point.
  Functions that support reverse mode only (custom_vjp) use jacrev.
  """
  flat = _flat(f)
  eye = jnp.eye(n, dtype=jnp.float32)
  nan_tangents = jnp.where(eye > 0, jnp.nan, 0.0).astype(jnp.float32)

  @jax.jit
  def forward(x):
    push = jax.vmap(lambda t: jax.jvp(flat, (x,), (t,))[1])
    return ((push(eye) != 0) | jnp.isnan(push(nan_tangents))).T

  reverse = jax.jit(lambda x: jax.jacrev(flat)(x) != 0)

  pattern = None
  for s in seeds:
    x = jax.random.normal(jax.random.key(s), (n,), jnp.float32) + 0.1 * (s + 1)
    try:
      p = np.asarray(forward(x))
    except TypeError:  # custom_vjp functions support reverse mode only
      p = np.asarray(reverse(x))
    pattern = p if pattern is None else pattern | p
  return pattern


def forward_pattern(f, n: int, strict: bool = True) -> np.ndarray:
  """The interpreter's forward masks, flattened to (out_size, n)."""
  x = jax.ShapeDtypeStruct((n,), jnp.float32)
  table = js.dependency_table(lambda p, x: f(x), {}, x, element_features(n), strict=strict)
  return np.concatenate([table.output_mask(p).reshape(-1, n) for p in table.output_paths], axis=0)


def assert_contains(forward: np.ndarray, jac: np.ndarray, what: str = "") -> None:
  """forward ⊇ jac, with the missed (output, feature) pairs in the message."""
  missed = jac & ~forward
  assert not missed.any(), f"{what}: forward masks miss (output, feature) {np.argwhere(missed).tolist()[:20]}"


def assert_equal(forward: np.ndarray, jac: np.ndarray, what: str = "") -> None:
  assert_contains(forward, jac, what)
  extra = forward & ~jac
  assert not extra.any(), f"{what}: over-approximates at (output, feature) {np.argwhere(extra).tolist()[:20]}"


def perturbation_pattern(f, n: int, trials: int = 8, seed: int = 0) -> np.ndarray:
  """Which outputs change when one input is redrawn: (out_size, n).

  A value-level dependence oracle for outputs that autodiff cannot see
  (integer and boolean outputs, indices, predicates): output ``o`` depends on
  input ``i`` if redrawing ``x[i]`` alone changes ``o`` at some base point.
  """
  flat = _flat(f)
  batched = jax.jit(jax.vmap(flat))
  rng = np.random.RandomState(seed)
  pattern = None
  for _ in range(trials):
    base = rng.normal(size=n).astype(np.float32) * 2
    xs = np.repeat(base[None], n + 1, axis=0)
    xs[np.arange(n), np.arange(n)] = rng.normal(size=n).astype(np.float32) * 2
    ys = np.asarray(batched(jnp.asarray(xs)))
    ref, moved = ys[n], ys[:n]
    same = (moved == ref) | (np.isnan(moved) & np.isnan(ref))
    p = (~same).T
    pattern = p if pattern is None else pattern | p
  return pattern
