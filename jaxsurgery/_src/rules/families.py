"""Imports every rule family so that each registers its primitives."""

from jaxsurgery._src.rules import (  # noqa: F401
    contraction, control_flow, elementwise, indexing, opaque, reductions, structural)
