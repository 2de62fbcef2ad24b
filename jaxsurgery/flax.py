"""Flax integration: ``import jaxsurgery.flax as jsf``.

* NNX: :func:`plan_nnx` (abstract models are enough), :func:`transplant` (in
  place, models and ``nnx.Optimizer``), :func:`remap_nnx` (returns the state),
  :func:`verify_nnx`.
* Linen: :func:`plan_linen`, :func:`remap_train_state`.
* Building blocks: :func:`nnx_fn`, :func:`linen_fn`.

Remapping returns a :class:`jaxsurgery.StateReport`; the generic
:func:`jaxsurgery.remap_state` is in the top-level package. See
docs/integrations.md.
"""

from jaxsurgery._src.integrations.flax import (
                                               linen_fn,
                                               nnx_fn,
                                               plan_linen,
                                               plan_nnx,
                                               remap_nnx,
                                               remap_train_state,
                                               transplant,
                                               verify_nnx,
)

__all__ = ["plan_nnx", "plan_linen", "verify_nnx", "nnx_fn", "linen_fn", "transplant", "remap_nnx", "remap_train_state"]
