"""Progress bars: tqdm, following its conventions (off when stderr is not a terminal, unless asked).

tqdm is optional (the ``viz`` extra); without it there is no bar, and asking for one says so once.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any


class _NoBar:
  def __init__(self, iterable: Iterable | None = None):
    self.iterable = iterable

  def __iter__(self):
    return iter(self.iterable or ())

  def update(self, n: int = 1) -> None:
    pass

  def set_postfix_str(self, s: str) -> None:
    pass

  def close(self) -> None:
    pass


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
        enabled: bool | None = None) -> Any:
  """A tqdm bar on stderr. ``enabled=None``: shown only when stderr is a terminal (tqdm's rule).

  Args:
    iterable: what to iterate over, or None for a bar driven by ``update``.
    total: number of steps (for ``iterable=None``).
    desc: the bar's label.
    unit: what one step is.
    enabled: True shows it, False hides it, None decides by the terminal.

  Returns:
    A ``tqdm`` object (or a silent stand-in when tqdm is not installed).
  """
  try:
    from tqdm.auto import tqdm
  except ImportError:
    if enabled:
      warnings.warn("progress bars need tqdm: pip install 'jaxsurgery[viz]'", stacklevel=3)
    return _NoBar(iterable)
  return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
              disable=None if enabled is None else not enabled)
