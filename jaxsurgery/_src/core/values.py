"""The values the mask interpreter binds to jaxpr variables.

Every jaxpr variable gets a :class:`Val`:

* ``mask``  -- its forward dependency mask (packed, compressed; ``None`` = empty);
* ``pull``  -- its provenance: a callable that receives *touches* recorded on the
  value and carries them back to the parameter elements it was derived from
  (``None`` when the value does not come from parameters);
* ``const`` -- a lazily evaluated concrete value for values computed only from
  literals and closed-over constants (used for static indices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxsurgery._src import compat

#: A provenance pullback: receives a touch (a packed mask shaped like the value) and
#: carries it back to the parameter elements the value was derived from.
Pull = Callable[[np.ndarray], None]


class Lazy:
  """A constant-foldable value: evaluated only if a rule asks for it."""

  __slots__ = ("eqn", "args", "index", "_cache")

  def __init__(self, eqn: Any, args: Sequence[Any], index: int, cache: dict[str, Any]):
    self.eqn, self.args, self.index, self._cache = eqn, args, index, cache

  def _done(self) -> bool:
    return "value" in self._cache

  def _evaluate(self) -> None:
    args = [a.get() if isinstance(a, Lazy) else a for a in self.args]  # all already cached
    value = None
    if not any(a is None for a in args):
      try:
        value = [np.asarray(o) for o in compat.bind(self.eqn, args)]
      except Exception:  # folding is an optimisation; "unknown" is always sound
        value = None
    self._cache["value"] = value

  def get(self) -> np.ndarray | None:
    """The folded value (``None`` if it cannot be computed, e.g. typed PRNG keys).

    Dependencies are evaluated with an explicit stack, so long chains of
    constant operations cannot exhaust Python's recursion limit.
    """
    stack = [self]
    while stack:
      node = stack[-1]
      if node._done():
        stack.pop()
        continue
      pending = [a for a in node.args if isinstance(a, Lazy) and not a._done()]
      if pending:
        stack.extend(pending)
        continue
      node._evaluate()
      stack.pop()
    value = self._cache["value"]
    return None if value is None else value[self.index]


@dataclasses.dataclass(frozen=True, eq=False)
class Val:
  """What the interpreter knows about one jaxpr variable (see the module docstring).

  Attributes:
    shape: the value's shape.
    dtype: its dtype.
    mask: the packed forward mask, shaped ``shape' + (W,)`` with size-1 axes
      where it is constant (``None`` = depends on no feature).
    pull: the provenance pullback, or ``None`` if the value does not come from
      parameters.
    const: a concrete value (``np.ndarray``), a :class:`Lazy` one, or ``None``.

  Example:
    >>> import numpy as np, jaxsurgery as js
    >>> v = js.Val((2, 3), np.float32)
    >>> v.ndim, v.size, v.concrete() is None
    (2, 6, True)
  """

  shape: tuple[int, ...]
  dtype: Any
  mask: np.ndarray | None = None
  pull: Pull | None = None
  const: Any = None  # np.ndarray | Lazy | None

  @property
  def ndim(self) -> int:
    """Number of axes."""
    return len(self.shape)

  @property
  def size(self) -> int:
    """Number of elements."""
    return int(np.prod(self.shape, dtype=np.int64))

  def concrete(self) -> np.ndarray | None:
    """The concrete value, if it is a known constant."""
    c = self.const
    return c.get() if isinstance(c, Lazy) else c


def join_pulls(*pulls: Pull | None) -> Pull | None:
  """One pull that forwards a touch to every given pull (``None`` entries skipped).

  Args:
    *pulls: provenance pullbacks, or ``None``.

  Returns:
    ``None`` if none is given, the only one if one is, else a pull calling each.

  Example:
    >>> seen = []
    >>> pull = join_pulls(seen.append, None, lambda t: seen.append(2 * t))
    >>> pull(1)
    >>> seen
    [1, 2]
  """
  present = [p for p in pulls if p is not None]
  if not present:
    return None
  if len(present) == 1:
    return present[0]

  def pull(t):
    for p in present:
      p(t)
  return pull


def out_val(outvar: Any, mask: np.ndarray | None = None, pull: Pull | None = None) -> Val:
  """The :class:`Val` of an eqn output variable, with its aval's shape and dtype.

  Args:
    outvar: ``eqn.outvars[k]``.
    mask: its forward mask (``None``: depends on no feature).
    pull: its provenance (``None``: not derived from parameters).

  Returns:
    The value.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> eqn = jax.make_jaxpr(jnp.sin)(jnp.ones((2, 3))).eqns[0]
    >>> v = out_val(eqn.outvars[0])
    >>> v.shape, v.mask is None
    ((2, 3), True)
  """
  return Val(tuple(outvar.aval.shape), outvar.aval.dtype, mask=mask, pull=pull)


def const_vals(consts: Sequence[Any]) -> list[Val]:
  """Closed-over constants of a jaxpr as constant :class:`Val`s."""
  out = []
  for c in consts:
    shape = tuple(np.shape(c))
    out.append(Val(shape, getattr(c, "dtype", None), const=c))
  return out
