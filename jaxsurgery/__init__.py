"""jaxsurgery: neural network surgery for JAX and Flax.

The flow (see docs/design.md):

1. name the input features (:class:`Features`) and build each model's
   feature→parameter table (:func:`dependency_table`; cross-checked by the
   gradient probe, :func:`gradient_table` and :func:`cross_check`);
2. plan the transfer from the old table to the new one (:func:`plan`), which
   returns a :class:`Surgery` and its :class:`Report`;
3. apply it to parameters (``surgery(old_params, new_init)``) or whole training
   states (:func:`remap_state`; ``jaxsurgery.flax``, ``jaxsurgery.orbax``);
4. check it numerically (:func:`verify`).

Rule authors: :mod:`jaxsurgery.rules` (``register_rule`` and ``override_rule``
are re-exported here).

Example:
  >>> import jax, jax.numpy as jnp, jaxsurgery as js
  >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
  >>> old_p, new_init = {"w": jnp.ones((2, 3))}, {"w": jnp.zeros((3, 3))}
  >>> old = js.dependency_table(fn, old_p, jnp.ones((1, 2)), js.Features(["hp", "mana"]))
  >>> new = js.dependency_table(fn, new_init, jnp.ones((1, 3)), js.Features(["hp", "armor", "mana"]))
  >>> surgery = js.plan(old, new)
  >>> surgery.report.preserved
  True
  >>> js.verify(surgery, fn, fn, old_p, surgery(old_p, new_init), jnp.ones((1, 2)), jnp.ones((1, 3)),
  ...           key=jax.random.key(0)).ok
  True
"""

from importlib import metadata as _metadata

from jaxsurgery import optim, rules
from jaxsurgery._src.core.errors import (
  FeatureSpecError,
  RuleError,
  SurgeryError,
  TraceError,
  UnknownNameError,
  UnknownPrimitiveError,
  UnknownPrimitiveWarning,
)
from jaxsurgery._src.core.features import Features
from jaxsurgery._src.core.table import FeatureTable, dependency_table
from jaxsurgery._src.core.values import Val
from jaxsurgery._src.optim.freeze import freeze_fresh
from jaxsurgery._src.probe.cross_check import CrossCheck, LeafAgreement, Miss, cross_check
from jaxsurgery._src.probe.differences import Difference
from jaxsurgery._src.probe.evidence import ProbeEvidence
from jaxsurgery._src.probe.gradient_table import gradient_table
from jaxsurgery._src.surgery.persist import PlanFormatError
from jaxsurgery._src.surgery.persist import load as load_surgery
from jaxsurgery._src.surgery.plan import LeafPlan, Report, plan
from jaxsurgery._src.surgery.remap import Surgery
from jaxsurgery._src.surgery.state import StateReport, remap_state
from jaxsurgery._src.surgery.verify import Verification, verify
from jaxsurgery.rules import override_rule, register_rule

try:
  __version__ = _metadata.version("jaxsurgery")  # the one version source: pyproject.toml
except _metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree that is not installed
  __version__ = "0+unknown"

__all__ = [
    # features and tables
    "Features", "dependency_table", "FeatureTable",
    # the gradient probe and its cross-check
    "gradient_table", "ProbeEvidence", "cross_check", "CrossCheck", "Miss", "Difference", "LeafAgreement",
    # surgery
    "plan", "Surgery", "Report", "LeafPlan", "remap_state", "StateReport", "verify", "Verification",
    # training on: plans on disk, optimizer state
    "load_surgery", "PlanFormatError", "optim", "freeze_fresh",
    # rules (see jaxsurgery.rules)
    "rules", "Val", "register_rule", "override_rule",
    # errors and warnings
    "FeatureSpecError", "TraceError", "SurgeryError", "UnknownNameError", "UnknownPrimitiveError",
    "UnknownPrimitiveWarning", "RuleError",
    "__version__",
]
