"""jaxsurgery: neural network surgery for JAX and Flax.

Flow: features -> masks -> interpreter and rules -> table -> probe -> plan/remap.
"""

from jaxsurgery._src.features import Features, FeatureSpecError
from jaxsurgery._src.interpreter import UnknownPrimitiveError, UnknownPrimitiveWarning, Val
from jaxsurgery._src.rules.registry import override_rule, register as register_rule
from jaxsurgery._src.table import FeatureTable, TraceError, dependency_table
from jaxsurgery._src.rules import families as _families  # noqa: F401
from jaxsurgery._src.rules import opaque as _opaque, elementwise as _elementwise

__version__ = "0.1.0"


class rules:  # noqa: N801  (a namespace of ready-made rules for overrides)
  """Ready-made rules: ``dense`` (conservative), ``unary``, ``nary``, ``passthrough``."""
  dense = staticmethod(_opaque.dense)
  unary = staticmethod(_elementwise.unary)
  nary = staticmethod(_elementwise.nary)
  passthrough = staticmethod(_elementwise.passthrough)

from jaxsurgery._src.probe import (  # noqa: E402
    CrossCheck, Difference, LeafAgreement, Miss, cross_check, gradient_table)
from jaxsurgery._src.plan import Report, Surgery, SurgeryError, plan  # noqa: E402
from jaxsurgery._src.verify import Verification, verify  # noqa: E402
from jaxsurgery._src.state import StateReport, remap_state  # noqa: E402
