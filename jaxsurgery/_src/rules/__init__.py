"""Dependency rules, one module per primitive family, and the registry they register into.

Importing this package registers every family (each module calls
``registry.register`` for its primitives, with their traits), so any import of
``jaxsurgery._src.rules.registry`` sees the complete table.
"""

from jaxsurgery._src.rules import contraction, control_flow, elementwise, indexing, opaque, reductions, structural  # noqa: F401  (imported to register their rules)
