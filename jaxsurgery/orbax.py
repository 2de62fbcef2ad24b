"""Orbax integration: ``import jaxsurgery.orbax as jso``.

:func:`restore` reads an *old* checkpoint (its tree from the checkpoint
metadata: the old model is not built) and returns the *new* state through the
surgery, with the new target's shardings, and optionally a
:class:`jaxsurgery.StateReport`. Needs ``orbax-checkpoint`` (not a dependency
of jaxsurgery; imported when first used). See docs/integrations.md.
"""

from jaxsurgery._src.integrations.orbax import old_abstract, restore

__all__ = ["restore", "old_abstract"]
