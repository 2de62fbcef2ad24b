"""The legitimate differences of a cross-check, stored as index arrays and built on access.

A large leaf can have millions of legitimate (element, feature) pairs (five_L1024:
1.7 million): as Python tuples they took 230 MB and most of the cross-check's time.
:class:`Differences` keeps, per block of a leaf, the element indices, the feature
of each pair and whether it was seen in live runs only (a few bytes per pair), and
builds :class:`~jaxsurgery.Difference` entries when they are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, overload

import numpy as np


class Difference(NamedTuple):
  """A probe entry the table lacks, explained by a named downstream operation (legitimate).

  Attributes:
    path: the parameter leaf.
    index: the element.
    feature: the feature that changed the element's gradient.
    op: the primitive after the element's first contact whose derivative
      depends on the feature.
    explanation: the contact and that operation, in words.

  Example:
    A mean subtracted from each feature is touched by its own feature only;
    the ReLU after the matmul makes its gradient depend on the other one.

    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jax.nn.relu((x - p["m"]) @ p["w"])
    >>> params, x, spec = {"m": jnp.ones(2), "w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"])
    >>> check = js.cross_check(js.dependency_table(fn, params, x, spec),
    ...                        js.gradient_table(fn, params, x, spec, key=jax.random.key(0)))
    >>> check.ok, [d[:4] for d in check.legitimate if d.path == "m"]
    (True, [('m', (0,), 'b', 'max'), ('m', (1,), 'a', 'max')])
  """

  path: str
  index: tuple[int, ...]  # type: ignore[assignment]  # a field named like tuple.index
  feature: str
  op: str
  explanation: str


class DifferencePart(NamedTuple):
  """The legitimate pairs of one block of one leaf.

  Attributes:
    path: the parameter leaf.
    elements: ``(n, rank)`` element indices (absolute in the leaf).
    feature: ``(n,)`` feature ids.
    live_only: ``(n,)`` bool: seen only in runs where the first contact is live.
    names: the feature names.
    ops: per feature id, the operation that explains it.
    texts: per ``(feature id, live_only)``, the explanation.
  """

  path: str
  elements: np.ndarray
  feature: np.ndarray
  live_only: np.ndarray
  names: Sequence[str]
  ops: dict[int, str]
  texts: dict[tuple[int, bool], str]

  def entry(self, j: int) -> Difference:
    k = int(self.feature[j])
    return Difference(self.path, tuple(int(i) for i in self.elements[j]), self.names[k], self.ops[k],
                      self.texts[k, bool(self.live_only[j])])


class DifferenceGroup(NamedTuple):
  """Legitimate pairs of one leaf that share an explanation.

  Attributes:
    path: the parameter leaf.
    explanation: their explanation.
    entries: how many (element, feature) pairs.
    elements: ``(n, rank)`` distinct element indices, sorted.
    features: the features, in table order.
  """

  path: str
  explanation: str
  entries: int
  elements: np.ndarray
  features: tuple[str, ...]


class Differences(Sequence[Difference]):
  """A read-only sequence of :class:`~jaxsurgery.Difference`, built on access from index arrays.

  Compares equal to any sequence with the same entries in the same order.

  Example:
    >>> import numpy as np
    >>> from jaxsurgery._src.probe.differences import DifferencePart, Differences
    >>> part = DifferencePart("w", np.array([[0, 1], [2, 0]]), np.array([1, 0]), np.array([False, True]),
    ...                       ["a", "b"], {0: "mul", 1: "tanh"}, {(1, False): "x", (0, True): "y"})
    >>> d = Differences([part])
    >>> len(d), d[0], [g.entries for g in d.groups()]
    (2, Difference(path='w', index=(0, 1), feature='b', op='tanh', explanation='x'), [1, 1])
  """

  def __init__(self, parts: Sequence[DifferencePart] = ()):
    self._parts = [p for p in parts if len(p.feature)]
    self._ends = np.cumsum([len(p.feature) for p in self._parts], dtype=np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  @overload
  def __getitem__(self, i: int) -> Difference: ...

  @overload
  def __getitem__(self, i: slice) -> list[Difference]: ...

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"difference index {i} out of range for {n} differences")
    i %= n
    p = int(np.searchsorted(self._ends, i, side="right"))
    start = int(self._ends[p - 1]) if p else 0
    return self._parts[p].entry(i - start)

  def __iter__(self) -> Iterator[Difference]:
    for part in self._parts:
      for j in range(len(part.feature)):
        yield part.entry(j)

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, Sequence) or len(other) != len(self):
      return NotImplemented if not isinstance(other, Sequence) else False
    return all(a == b for a, b in zip(self, other))

  __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence: not hashable, like list

  def __repr__(self) -> str:
    return f"Differences({len(self)} entries over {len({p.path for p in self._parts})} leaves)"

  def groups(self) -> list[DifferenceGroup]:
    """The entries grouped by leaf and explanation (vectorised), leaf by leaf in table order."""
    found: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray, Sequence[str]]]] = {}
    for part in self._parts:
      for (k, lo), text in part.texts.items():
        sel = (part.feature == k) & (part.live_only == lo)
        if sel.any():
          found.setdefault((part.path, text), []).append((part.elements[sel], part.feature[sel], part.names))
    out = []
    for (path, text), pieces in found.items():
      elements = np.concatenate([e for e, _, _ in pieces])
      elements = np.unique(elements, axis=0) if elements.shape[1] else elements[:1]  # a scalar leaf: one element
      ks = np.unique(np.concatenate([f for _, f, _ in pieces]))
      names = pieces[0][2]
      out.append(DifferenceGroup(path, text, sum(len(f) for _, f, _ in pieces), elements,
                                 tuple(names[int(k)] for k in ks)))
    return out
