"""jaxsurgery: neural network surgery for JAX and Flax.

Flow: features -> masks -> interpreter and rules -> table -> probe -> plan/remap.
"""

from jaxsurgery._src.core.errors import FeatureSpecError, TraceError, UnknownPrimitiveError, UnknownPrimitiveWarning
from jaxsurgery._src.core.features import Features
from jaxsurgery._src.core.values import Val
from jaxsurgery._src.rules.registry import override_rule, register as register_rule
from jaxsurgery._src.core.table import FeatureTable, dependency_table
from jaxsurgery._src.rules import opaque as _opaque, elementwise as _elementwise

__version__ = "0.1.0"


class rules:  # noqa: N801  (a namespace of ready-made rules for overrides)
  """Ready-made rules: ``dense`` (conservative), ``unary``, ``nary``, ``passthrough``."""
  dense = staticmethod(_opaque.dense)
  unary = staticmethod(_elementwise.unary)
  nary = staticmethod(_elementwise.nary)
  passthrough = staticmethod(_elementwise.passthrough)

from jaxsurgery._src.probe.cross_check import CrossCheck, Difference, LeafAgreement, Miss, cross_check  # noqa: E402
from jaxsurgery._src.probe.gradient_table import gradient_table  # noqa: E402
from jaxsurgery._src.core.errors import SurgeryError  # noqa: E402
from jaxsurgery._src.surgery.plan import Report, plan  # noqa: E402
from jaxsurgery._src.surgery.remap import Surgery  # noqa: E402
from jaxsurgery._src.surgery.verify import Verification, verify  # noqa: E402
from jaxsurgery._src.surgery.state import StateReport, remap_state  # noqa: E402
