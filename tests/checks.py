"""Reference checks shared by the tests: Jacobian sparsity from JAX's own autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxsurgery as js


def element_features(n: int) -> js.Features:
  return js.Features([f"x{i}" for i in range(n)])


def jacobian_pattern(f, n: int, seeds=(0, 1, 2)) -> np.ndarray:
  """Union over random points of the nonzero pattern of d flat(f(x)) / dx: (out_size, n).

  Uses jvp with NaN tangents as well as jacfwd, so coincidental zeros of the
  derivative cannot hide a dependence.
  """
  def flat(x):
    return jnp.concatenate([jnp.ravel(o).astype(jnp.float32) for o in jax.tree_util.tree_leaves(f(x))])

  pattern = None
  for s in seeds:
    x = jax.random.normal(jax.random.key(s), (n,), jnp.float32) + 0.1 * (s + 1)
    try:
      jac = np.asarray(jax.jacfwd(flat)(x)) != 0
      tangents = jnp.where(jnp.eye(n, dtype=bool), jnp.nan, 0.0).astype(jnp.float32)
      nan = np.isnan(np.asarray(jax.vmap(lambda t: jax.jvp(flat, (x,), (t,))[1])(tangents))).T
      p = jac | nan
    except TypeError:  # custom_vjp functions support reverse mode only
      p = np.asarray(jax.jacrev(flat)(x)) != 0
    pattern = p if pattern is None else pattern | p
  return pattern


def forward_pattern(f, n: int, strict: bool = True) -> np.ndarray:
  """The interpreter's forward masks, flattened to (out_size, n)."""
  x = jax.ShapeDtypeStruct((n,), jnp.float32)
  table = js.dependency_table(lambda p, x: f(x), {}, x, element_features(n), strict=strict)
  return np.concatenate([table.output_mask(p).reshape(-1, n) for p in table.output_paths], axis=0)
