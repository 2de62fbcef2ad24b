"""What the gradient probe measured besides its table, stored with the table for the cross-check."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import UnknownNameError

#: The per-leaf masks of :class:`ProbeEvidence`.
EvidenceMask = Literal["live", "annihilated", "contact_change", "live_only"]


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeEvidence:
  """What :func:`gradient_table` measured besides its table; :func:`cross_check` reads it.

  Stored on the probe table (``FeatureTable.evidence``), so it survives
  ``dataclasses.replace`` and pickling (numpy arrays, strings and ints only).
  Per-element bool masks are stored as compressed 1-bit masks (see
  :meth:`mask`); feature masks as compressed packed masks like the table's.

  Attributes:
    features: feature names (must match the probe table's).
    shapes: parameter shape per path (must match the probe table's).
    contact_change: per leaf, packed: the contact-local gradient of the element
      changed when the feature was switched on (in some run).
    live: per leaf, 1-bit: the contact-local gradient was nonzero at the base
      in some run (a first contact not annihilated at the base).
    annihilated: per leaf, 1-bit: the contact-local gradient was zero at the
      base in some run; the probe table reads such elements from those runs only.
    live_only: per leaf, packed: features that changed the element's gradient
      only in runs where its first contact was live (annihilated elements only;
      not in the probe table, checked by the cross-check).
    runs: one line per run (parameter draw and base).
    num_ids: categorical feature -> number of ids probed.
    ids_capped: categorical features whose ids were sampled (``max_ids``).
    draws: number of generic draws.
    positive_draws: generic draws redrawn positive after non-finite values.
    nonfinite: leaf -> elements with a non-finite gradient in some column (not marked there).
    zeroed: leaf -> elements zeroed in the annihilating run.
    notes: remarks for the cross-check report.
    columns: probed (feature, id) columns per run.
    chunk: columns vmapped together (from ``chunk_size`` or ``memory_budget``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> probe = js.gradient_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"]),
    ...                           key=jax.random.key(0))
    >>> ev = probe.evidence
    >>> ev.columns, len(ev.runs), ev.mask("contact_change", "w").shape
    (2, 4, (2, 3, 2))
  """

  features: tuple[str, ...]
  shapes: Mapping[str, tuple[int, ...]]
  contact_change: Mapping[str, np.ndarray | None]
  live: Mapping[str, np.ndarray | None]
  annihilated: Mapping[str, np.ndarray | None]
  live_only: Mapping[str, np.ndarray | None]
  runs: tuple[str, ...]
  num_ids: Mapping[str, int]
  ids_capped: tuple[str, ...]
  draws: int
  positive_draws: int
  nonfinite: Mapping[str, int]
  zeroed: Mapping[str, int]
  notes: tuple[str, ...] = ()
  columns: int = 0
  chunk: int = 0

  def mask(self, what: EvidenceMask, path: str) -> np.ndarray:
    """One evidence mask of one parameter leaf, expanded.

    Args:
      what: ``"live"`` or ``"annihilated"`` (bool, the leaf's shape), or
        ``"contact_change"`` or ``"live_only"`` (bool, ``shape + (num_features,)``).
      path: the parameter leaf path.

    Returns:
      A dense bool array.
    """
    shape = tuple(self.shapes[path])
    if what in ("live", "annihilated"):
      return M.unpack(getattr(self, what)[path], shape, 1)[..., 0]
    if what in ("contact_change", "live_only"):
      return M.unpack(getattr(self, what)[path], shape, len(self.features))
    raise UnknownNameError(f"No evidence mask {what!r}; known: live, annihilated, contact_change, live_only.")


def bits1(b: np.ndarray) -> np.ndarray | None:
  """A bool array as a compressed 1-feature packed mask (None if all False)."""
  b = np.asarray(b, bool)
  return M.compress(b[..., None].astype(np.uint32)) if b.any() else None
