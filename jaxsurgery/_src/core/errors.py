"""The library's errors and warnings, in one place.

Every error a user can meet derives from ``ValueError`` or ``TypeError`` (bad
input) or from ``NotImplementedError`` (a primitive the analysis cannot follow),
and its message names the argument, leaf, feature or primitive concerned and a
way to fix it.
"""

from __future__ import annotations


class FeatureSpecError(ValueError):
  """A feature spec that does not fit the inputs it describes."""


class TraceError(ValueError):
  """``fn`` could not be traced with the given params and inputs."""


class SurgeryError(ValueError):
  """The plan cannot be applied (mismatched trees) or violates ``strict``."""


class UnknownNameError(KeyError, ValueError):
  """A lookup by name (feature, parameter or output path, evidence mask...) that names nothing.

  It derives from ``ValueError`` (a bad argument) and from ``KeyError``, so
  ``except KeyError`` code written against earlier versions keeps working.
  Unlike a plain ``KeyError``, its message prints as written (not quoted, with
  its line breaks).
  """

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


class UnknownPrimitiveWarning(UserWarning):
  """A primitive without a dependency rule got the conservative dense rule."""


class UnknownPrimitiveError(NotImplementedError):
  """A primitive the analysis cannot follow: no rule in strict mode, mutable refs, unreadable params."""


class NoSubJaxprError(UnknownPrimitiveError):
  """A call-like primitive whose sub-jaxpr cannot be found among its params (another JAX version's spelling)."""


class RuleError(RuntimeError):
  """A dependency rule broke an invariant (e.g. recorded a touch of the wrong shape): a bug in that rule."""
