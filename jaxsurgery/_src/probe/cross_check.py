"""The cross-check of the boolean table against the gradient probe.

:func:`cross_check` compares the probe (:func:`~jaxsurgery.gradient_table`)
with the boolean table (:func:`~jaxsurgery.dependency_table`). The expected
relation is probe ⊆ table. A probe entry the table lacks is *legitimate* only
by a checkable criterion (see :func:`cross_check` and docs/probe.md); every
other one is reported as missed.

The steps: check the two tables fit, read the probe's evidence, walk the
program for its first contacts and later operations
(:mod:`jaxsurgery._src.probe.static`), compare each parameter leaf, compare
the outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxsurgery._src import display
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import UnknownNameError
from jaxsurgery._src.core.table import FeatureTable
from jaxsurgery._src.probe import walk
from jaxsurgery._src.probe.differences import DifferencePart, Differences
from jaxsurgery._src.probe.evidence import ProbeEvidence
from jaxsurgery._src.probe.static import Record, static_walk


class Miss(NamedTuple):
  """A probe entry the boolean table lacks and that no legitimate difference explains.

  Attributes:
    path: the parameter (or output) leaf.
    index: the element.
    feature: the feature the probe found and the table lacks.
    explanation: why no criterion of :func:`cross_check` excuses it.

  Example:
    A ``dot_general`` rule that hides the kernel's provenance drops every
    kernel touch; the cross-check finds each one.

    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> params, x, spec = {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"])
    >>> real = js.rules.get("dot_general")
    >>> def blind(ctx, eqn, invals):
    ...   lhs, rhs = invals[:2]
    ...   return real(ctx, eqn, [lhs, js.Val(rhs.shape, rhs.dtype, mask=rhs.mask)] + list(invals[2:]))
    >>> with js.override_rule("dot_general", blind):
    ...   table = js.dependency_table(fn, params, x, spec)
    >>> check = js.cross_check(table, js.gradient_table(fn, params, x, spec, key=jax.random.key(0)))
    >>> check.ok, len(check.missed), check.missed[0][:3]
    (False, 6, ('w', (0, 0), 'a'))
  """

  path: str
  index: tuple[int, ...]  # type: ignore[assignment]  # a field named like tuple.index
  feature: str
  explanation: str


class LeafAgreement(NamedTuple):
  """Counts of (element, feature) pairs of one leaf.

  ``both``/``table_only``/``probe_only`` compare the two tables; ``live_only``
  counts pairs outside both tables that changed the element's gradient only in
  runs where its first contact was live (probe evidence). ``legitimate`` and
  ``missed`` classify the ``probe_only`` and ``live_only`` pairs.

  Attributes:
    both: pairs in both tables.
    table_only: pairs in the boolean table only (over-approximation).
    probe_only: pairs in the probe table only.
    total: elements times features.
    legitimate: probe-only and live-only pairs with a legitimate explanation.
    missed: the others.
    live_only: pairs seen only in runs where the first contact was live.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> params, x, spec = {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"])
    >>> check = js.cross_check(js.dependency_table(fn, params, x, spec),
    ...                        js.gradient_table(fn, params, x, spec, key=jax.random.key(0)))
    >>> a = check.per_leaf["w"]
    >>> a.both, a.total, a.exact
    (6, 12, True)
  """

  both: int
  table_only: int
  probe_only: int
  total: int
  legitimate: int = 0
  missed: int = 0
  live_only: int = 0

  @property
  def exact(self) -> bool:
    """True iff table and probe agree on every element and feature of the leaf."""
    return self.table_only == 0 and self.probe_only == 0


def _fmt_index(index) -> str:
  return "[" + ", ".join(str(i) for i in index) + "]" if index else ""


def _compact(items: Sequence[Any], limit: int = 6, total: int | None = None) -> str:
  """The first ``limit`` items and how many more (of ``total``, default all of ``items``)."""
  items = [str(i) for i in items]
  total = len(items) if total is None else total
  if total > limit:
    return ", ".join(items[:limit]) + f", ... (+{total - limit})"
  return ", ".join(items)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossCheck:
  """The result of :func:`cross_check`.

  Attributes:
    features: feature names.
    missed: probe entries the table lacks with no legitimate explanation.
    legitimate: probe entries the table lacks, each explained by the operation
      after the parameter's first contact that makes its gradient depend on
      the feature: a read-only sequence of :class:`Difference`, stored as
      index arrays and built on access (a large leaf can have millions);
      ``.groups()`` summarises it by leaf and explanation.
    per_leaf: per parameter leaf, agreement counts over (element, feature) pairs.
    table_only_notes: per leaf with table-only entries, why the gradient does
      not see them (boolean over-approximation relative to the gradient).
    output_missed: output elements that change numerically with a feature
      that their forward mask lacks (always a real bug).
    output_per_leaf: agreement counts of the output masks.
    notes: general remarks (missing evidence, capped categorical ids...).

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> params, x, spec = {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"])
    >>> check = js.cross_check(js.dependency_table(fn, params, x, spec),
    ...                        js.gradient_table(fn, params, x, spec, key=jax.random.key(0)))
    >>> check.ok, check.agrees("w")
    (True, True)
    >>> print(check.report().splitlines()[0])
    CrossCheck: OK -- 0 missed parameter entries, 0 missed output entries, 0 legitimate differences, 2 features
  """

  features: tuple[str, ...]
  missed: tuple[Miss, ...]
  legitimate: Differences
  per_leaf: Mapping[str, LeafAgreement]
  table_only_notes: Mapping[str, str]
  output_missed: tuple[Miss, ...]
  output_per_leaf: Mapping[str, LeafAgreement]
  notes: tuple[str, ...] = ()

  @property
  def ok(self) -> bool:
    """True iff nothing is missed (parameters and outputs)."""
    return not self.missed and not self.output_missed

  def agrees(self, path: str) -> bool:
    """True iff table and probe agree exactly on leaf ``path``.

    Args:
      path: a parameter path.

    Returns:
      Whether the leaf's agreement is exact.

    Raises:
      UnknownNameError: no such parameter leaf.
    """
    if path not in self.per_leaf:
      raise UnknownNameError(f"No parameter leaf {path!r}. Known: {list(self.per_leaf)}")
    return self.per_leaf[path].exact

  def report(self, max_rows: int = 12) -> str:
    """A readable report: verdict, per-leaf agreement, misses, legitimate differences, table-only notes.

    Args:
      max_rows: at most this many groups of misses and of legitimate differences.

    Returns:
      The text (also the ``repr``).
    """
    n_missed = len(self.missed) + len(self.output_missed)
    head = (f"CrossCheck: {'OK' if self.ok else 'FAILED'} -- {len(self.missed)} missed parameter "
            f"entries, {len(self.output_missed)} missed output entries, {len(self.legitimate)} "
            f"legitimate differences, {len(self.features)} features")
    lines = [head]
    rows = []
    for p, a in self.per_leaf.items():
      rows.append([p or "<root>", f"{a.both}", f"{a.table_only}", f"{a.probe_only}", f"{a.live_only}",
                   f"{a.legitimate} legit, {a.missed} missed" if a.probe_only or a.live_only else "",
                   "exact" if a.exact else ""])
    lines.append(display.columns(rows, ["parameter", "both", "table-only", "probe-only", "live-only",
                                        "probe/live-only", ""]))
    if n_missed:
      lines.append("Missed (probe found, table lacks, not explained):")
      mgroups: dict[tuple[str, str], list[Miss]] = {}
      for m in self.missed + self.output_missed:
        mgroups.setdefault((m.path, m.explanation.replace(repr(m.feature), "the feature")), []).append(m)
      for (path, _), ms in list(mgroups.items())[:max_rows]:
        elems = [_fmt_index(e) for e in sorted({m.index for m in ms})]
        fnames = sorted({m.feature for m in ms}, key=self.features.index)
        first = ms[0]
        lines.append(f"  {path or '<root>'}: {len(ms)} entries, elements {_compact(elems, 4)}; features "
                     f"{_compact(fnames)}; e.g. {path}{_fmt_index(first.index)} x {first.feature}\n"
                     f"    {first.explanation}")
      if len(mgroups) > max_rows:
        lines.append(f"  ... {len(mgroups) - max_rows} more groups")
    if self.legitimate:
      lines.append("Legitimate differences (probe-only and live-only; the gradient sees effects after the "
                   "first contact):")
      groups = self.legitimate.groups()
      for g in groups[:max_rows]:
        shown = [_fmt_index(tuple(int(i) for i in e)) for e in g.elements[:4]]
        lines.append(f"  {g.path}: {g.entries} entries, elements {_compact(shown, 4, len(g.elements))}; "
                     f"features {_compact(g.features)}\n    {g.explanation}")
      if len(groups) > max_rows:
        lines.append(f"  ... {len(groups) - max_rows} more groups")
    if self.table_only_notes:
      lines.append("Table only (boolean over-approximation relative to the gradient):")
      for p, note in self.table_only_notes.items():
        lines.append(f"  {p}: {note}")
    for n in self.notes:
      lines.append(f"Note: {n}")
    return "\n".join(lines)

  def __repr__(self) -> str:
    return self.report()


_KIND_NOTE = {
    "additive": "the gradient of an added/placed parameter does not depend on its partner, so the probe "
                "sees the contact only through later operations",
    "selection": "the gradient flows only to the selected element/row (max, select, gather), so other "
                 "candidates keep their gradient",
    "zero-gradient": "a comparison or rounding has zero gradient",
    "multiplicative": "the partner stayed zero at the base (e.g. an unnamed input at zero, padding-only "
                      "taps) or everything downstream was dead or saturated in every draw",
    "other": "the operation's gradient did not change in the draws",
}


def _bits(mask: int) -> list[int]:
  out = []
  k = 0
  while mask:
    if mask & 1:
      out.append(k)
    mask >>= 1
    k += 1
  return out


def _check_tables(table: FeatureTable, probe: FeatureTable) -> None:
  for name, t in (("table", table), ("probe", probe)):
    if not isinstance(t, FeatureTable):
      raise TypeError(f"cross_check: `{name}` must be a FeatureTable, got {type(t).__name__}.")
  if tuple(table.features) != tuple(probe.features):
    raise ValueError("cross_check: `table` and `probe` have different features; build both with the same spec.\n"
                     f"  table: {list(table.features)}\n  probe: {list(probe.features)}")
  if tuple(table.paths) != tuple(probe.paths) or any(
      tuple(table.shapes[p]) != tuple(probe.shapes[p]) for p in table.paths):
    raise ValueError("cross_check: `table` and `probe` have different parameter leaves or shapes; build both "
                     "from the same params.\n"
                     f"  table: {[(p, table.shapes[p]) for p in table.paths]}\n"
                     f"  probe: {[(p, probe.shapes[p]) for p in probe.paths]}")


def _usable_evidence(probe: FeatureTable, notes: list[str]) -> ProbeEvidence | None:
  """The probe's evidence if it describes the probe table (else None, with a note), and its notes."""
  ev = probe.evidence
  if ev is not None and not isinstance(ev, ProbeEvidence):
    notes.append(f"the probe's evidence is a {type(ev).__name__}, not a ProbeEvidence; ignored.")
    ev = None
  if ev is not None and (tuple(ev.features) != tuple(probe.features) or any(
      tuple(ev.shapes.get(p, ())) != tuple(probe.shapes[p]) for p in probe.paths)):
    notes.append("the probe's evidence describes other features or parameter shapes than the probe "
                 "table; ignored.")
    ev = None
  if ev is None:
    notes.append("the probe carries no evidence from gradient_table (contact-local gradients, "
                 "liveness); every probe-only entry is reported as missed.")
    return None
  if ev.ids_capped:
    notes.append(f"categorical features with more than max_ids ids were sampled: {list(ev.ids_capped)}; "
                 "their unsampled rows appear as table-only.")
  if ev.positive_draws:
    notes.append(f"{ev.positive_draws} of {ev.draws} draws were redrawn with positive parameters "
                 "because the base gave non-finite values.")
  if ev.nonfinite:
    notes.append(f"elements with non-finite gradients (not marked where non-finite): {dict(ev.nonfinite)}")
  notes.extend(ev.notes)
  return ev


def _records_by_leaf(table: FeatureTable, notes: list[str]) -> tuple[list[list[Record]], list[list[Record]]]:
  """Per parameter leaf: the later operations whose derivative depends on a feature, and the first contacts."""
  downs: list[list[Record]] = [[] for _ in table.paths]
  contacts: list[list[Record]] = [[] for _ in table.paths]
  if table.jaxpr is None:
    notes.append("the boolean table has no jaxpr: operations cannot be named.")
  if table.jaxpr is None or table.spec is None:
    return downs, contacts
  walked = static_walk(table.jaxpr, len(table.paths), table.spec)
  for records, by_leaf in ((walked.downs, downs), (walked.contacts, contacts)):
    for rec in records.values():
      for j in _bits(rec.params):
        if j < len(table.paths):
          by_leaf[j].append(rec)
  return downs, contacts


class _LeafMasks(NamedTuple):
  """Dense (element, feature) masks of one leaf; ``live`` and ``ann`` are per element."""

  T: np.ndarray        # the boolean table
  P: np.ndarray        # the probe table
  cchange: np.ndarray  # contact-local gradient changed
  live: np.ndarray
  ann: np.ndarray
  x_only: np.ndarray   # live-only changes outside both tables


def _block(packed, shape, F: int, e0: int, e1: int) -> np.ndarray:
  """Flat elements ``e0:e1`` (row-major) of a packed, compressed mask, expanded to ``(e1 - e0, F)`` bools.

  A compressed mask (axes of size 1) is read through the block's indices, never broadcast whole.
  """
  if packed is None:
    return np.zeros((e1 - e0, F), bool)
  if not shape:
    return M.unpack(packed.reshape(1, -1), (1,), F)
  if tuple(packed.shape[:-1]) == tuple(shape):
    words = packed.reshape(-1, packed.shape[-1])[e0:e1]
  else:
    idx = np.unravel_index(np.arange(e0, e1), shape)
    words = packed[tuple(i if n > 1 else 0 for i, n in zip(idx, packed.shape[:-1]))]
  return M.unpack(words, (e1 - e0,), F)


class _LeafPacked(NamedTuple):
  """One leaf's packed masks: table, probe and evidence (None: empty)."""

  T: Any
  P: Any
  cchange: Any
  live: Any
  ann: Any
  live_only: Any


def _leaf_packed(table: FeatureTable, probe: FeatureTable, ev: ProbeEvidence | None, path: str) -> _LeafPacked:
  if ev is None:
    return _LeafPacked(table.packed[path], probe.packed[path], None, None, None, None)
  return _LeafPacked(table.packed[path], probe.packed[path], ev.contact_change[path], ev.live[path],
                     ev.annihilated[path], ev.live_only[path])


def _leaf_masks(packed: _LeafPacked, shape, F: int, e0: int, e1: int) -> _LeafMasks:
  """The dense masks of flat elements ``e0:e1`` of one leaf."""
  block = lambda q, f=F: _block(q, shape, f, e0, e1)
  T, P = block(packed.T), block(packed.P)
  return _LeafMasks(T, P, block(packed.cchange), block(packed.live, 1)[:, 0], block(packed.ann, 1)[:, 0],
                    block(packed.live_only) & ~T & ~P)


def _first_downs(downs: list[Record], F: int) -> dict[int, Record]:
  """Per feature: the first later operation whose derivative depends on it."""
  first: dict[int, Record] = {}
  for rec in downs:
    for k in _bits(rec.features):
      if k < F and k not in first:
        first[k] = rec
  return first


def _why_missed(m: _LeafMasks, idx, e, feature: str, via: str) -> str:
  if m.cchange[idx]:
    return (f"the contact-local gradient (autodiff cut after the first contact via {via}) changes "
            f"when {feature!r} is switched on: a first-contact touch the table lacks")
  p_only = m.P[idx] and not m.T[idx]
  if p_only and m.ann[e] and m.live[e]:
    return (f"its first contact ({via}) is annihilated at the base of some run (contact-local "
            f"gradient 0), and the probe reads this element from those runs only, where only a "
            f"first contact with {feature!r} can change its gradient; the table lacks it")
  if not m.live[e]:
    return (f"its first contact ({via}) is annihilated at the base (contact-local gradient 0 in "
            f"every draw), so only a first contact with {feature!r} can change its gradient; the "
            f"table lacks it")
  return (f"no operation after its first contact ({via}) depends on {feature!r}, so nothing "
          f"explains the gradient change")


def _legitimate(path: str, ok_entry, m: _LeafMasks, first_down: dict[int, Record], names, via: str,
                kinds: Sequence[str], e0: int, shape) -> DifferencePart:
  """The legitimate pairs of one block (flat elements from ``e0``), as index arrays."""
  flat, k = np.nonzero(ok_entry)
  lo = m.x_only[flat, k]
  small = np.int32 if max(shape, default=0) < 2**31 else np.int64   # 4 bytes per index: millions of pairs
  elements = np.stack(np.unravel_index(e0 + flat, shape), axis=1).astype(small) if shape \
      else np.zeros((len(k), 0), small)
  texts = {}
  for kk, ll in {(int(a), bool(b)) for a, b in zip(*np.unique(np.stack([k, lo]), axis=1))}:
    rec = first_down[kk]
    texts[kk, ll] = (
        f"`{path}` enters via {via} ({'/'.join(kinds) or 'unknown'} contact, not annihilated "
        f"at the base), then {rec.desc} {rec.how} the feature: its cotangent, hence its "
        f"gradient, changes" + (" (seen only in runs where the contact is live; the probe table "
                                "reads this element from runs where it is annihilated)" if ll else ""))
  ops = {kk: first_down[kk].prim for kk, _ in texts}
  return DifferencePart(path, elements, k.astype(np.int32), lo, names, ops, texts)


def _table_only_note(n_t: int, confirmed: int, via: str, kinds: Sequence[str]) -> str:
  parts = [f"{n_t} entries"]
  if confirmed:
    parts.append(f"{confirmed} of them confirmed by the contact-local gradient (the output gradient "
                 f"did not change: downstream dead, saturated or cut in every draw)")
  ktxt = "; ".join(f"{k}: {_KIND_NOTE[k]}" for k in kinds) if kinds else "no first contact found"
  parts.append(f"contacts via {via} -- {ktxt}")
  return "; ".join(parts)


class _LeafResult(NamedTuple):
  missed: list[Miss]
  legitimate: list[DifferencePart]
  agreement: LeafAgreement
  table_only_note: str | None


#: Bytes of dense (element, feature) masks one leaf's comparison may hold at once (a block of elements).
MEMORY_BUDGET = 1 << 30
_MASKS_PER_BLOCK = 14   # bool arrays of the block's size alive at once (masks, unpacking, classes)


def _element_blocks(shape, F: int, memory_budget: int):
  """``(e0, e1)`` blocks of a leaf's flat elements whose dense masks fit ``memory_budget``."""
  n = int(np.prod(shape, dtype=np.int64))
  size = max(1, min(n, memory_budget // max(_MASKS_PER_BLOCK * F, 1)))
  return [(e0, min(n, e0 + size)) for e0 in range(0, n, size)]


def _compare_leaf(table: FeatureTable, probe: FeatureTable, ev: ProbeEvidence | None, path: str,
                  downs: list[Record], contacts: list[Record], memory_budget: int) -> _LeafResult:
  """Classifies every (element, feature) pair of one leaf (see :func:`cross_check`), a block of elements at a time."""
  F, names, shape = table.num_features, table.features, tuple(table.shapes[path])
  first_down = _first_downs(downs, F)
  down = np.zeros(F, bool)
  down[list(first_down)] = True
  via = _compact(sorted({r.desc for r in contacts}), 3) if contacts else "no first contact found"
  kinds = sorted({walk.contact_kind(r.prim) for r in contacts})
  missed: list[Miss] = []
  legit: list[DifferencePart] = []
  counts = np.zeros(6, np.int64)   # both, table-only, probe-only, legitimate, missed, live-only
  n_confirmed = 0
  packed = _leaf_packed(table, probe, ev, path)
  for e0, e1 in _element_blocks(shape, F, memory_budget):
    m = _leaf_masks(packed, shape, F, e0, e1)
    t_only, p_only = m.T & ~m.P, m.P & ~m.T
    # Probe-table entries of an element annihilated in some run come from such runs only, where
    # only a first contact can change the gradient: never legitimate. Live-only entries were
    # seen in live runs; probe-table entries of elements live in every run too.
    ok_entry = ((p_only & (m.live & ~m.ann)[..., None]) | m.x_only) & ~m.cchange & down
    miss_entry = (p_only | m.x_only) & ~ok_entry
    for j, k in zip(*np.nonzero(miss_entry)):
      e = tuple(int(i) for i in np.unravel_index(e0 + j, shape))
      missed.append(Miss(path, e, names[k], _why_missed(m, (j, k), j, names[k], via)))
    if ok_entry.any():
      legit.append(_legitimate(path, ok_entry, m, first_down, names, via, kinds, e0, shape))
    counts += [(m.T & m.P).sum(), t_only.sum(), p_only.sum(), ok_entry.sum(), miss_entry.sum(), m.x_only.sum()]
    n_confirmed += int((t_only & m.cchange).sum())
  both, n_t, n_p, n_ok, n_miss, n_x = (int(c) for c in counts)
  note = _table_only_note(n_t, n_confirmed, via, kinds) if n_t else None
  total = int(np.prod(shape, dtype=np.int64)) * F
  return _LeafResult(missed, legit, LeafAgreement(both, n_t, n_p, total, n_ok, n_miss, n_x), note)


def _compare_outputs(table: FeatureTable, probe: FeatureTable, notes: list[str]):
  """Outputs: forward differences must be inside the forward masks (no legitimate exception)."""
  out_missed: list[Miss] = []
  out_leaf: dict[str, LeafAgreement] = {}
  if tuple(table.output_paths) != tuple(probe.output_paths):
    notes.append("output leaves differ between the tables; outputs not compared.")
    return out_missed, out_leaf
  F, names = table.num_features, table.features
  for path in table.output_paths:
    T, P = table.output_mask(path), probe.output_mask(path)
    miss = P & ~T
    for idx in zip(*np.nonzero(miss)):
      e, k = tuple(int(i) for i in idx[:-1]), int(idx[-1])
      out_missed.append(Miss(path, e, names[k],
                             f"the output changes when {names[k]!r} is switched on but its forward "
                             f"mask lacks it: a forward rule drops a dependence"))
    out_leaf[path] = LeafAgreement(int((T & P).sum()), int((T & ~P).sum()), int(miss.sum()),
                                   int(T[..., 0].size) * F, 0, int(miss.sum()))
  return out_missed, out_leaf


def cross_check(table: FeatureTable, probe: FeatureTable, *, memory_budget: int | None = None) -> CrossCheck:
  """Checks the boolean table against the gradient probe: nothing the probe finds may be missing.

  Every (element, feature) pair is counted per parameter leaf as ``both``,
  ``table_only`` or ``probe_only`` (probe table vs boolean table), plus
  ``live_only``: pairs outside both tables that changed the element's gradient
  only in runs where its first contact was live (``probe.evidence``). A
  probe-only or live-only entry ``(p[e], f)`` is *legitimate* when all of these
  hold (else it is *missed*):

  1. the contact-local gradient of ``p[e]`` (autodiff cut right after the
     operations where ``p``'s feature-free chain first meets feature-dependent
     values) does not change when ``f`` is switched on: ``f`` does not reach
     ``p[e]``'s first contacts;
  2. the change was seen where that contact-local gradient is nonzero at the
     base (the first contact is live, so the output gradient of ``p[e]``
     carries the cotangent from later operations): always true of live-only
     entries; a probe-only entry needs ``p[e]`` live in every run, since an
     element annihilated in some run is read from those runs only, where only
     a first-contact feature can change its gradient;
  3. some operation after ``p``'s first contact has a local derivative that
     depends on ``f`` (a multiplication by, division by, nonlinearity of,
     selection or indexing by an ``f``-dependent value); it is named in the
     report.

  Without evidence (``probe.evidence`` is None, or describes other features or
  shapes) every probe-only entry is missed, with a note.

  Output masks are checked too: an output element that changes when ``f`` is
  switched on must have ``f`` in its forward mask (no legitimate exception).

  Table-only entries are not errors (the boolean table over-approximates); the
  report summarises them per leaf with the kind of contact that hides them
  from gradients.

  Args:
    table: the boolean table (:func:`dependency_table`).
    probe: the gradient table (:func:`gradient_table`) of the same function,
      params, inputs and features.
    memory_budget: bytes of host memory the dense (element, feature) masks
      of one comparison may take (default 1 GiB): a large leaf is compared a
      block of elements at a time.

  Returns:
    A :class:`CrossCheck`; ``.ok`` is True iff nothing is missed.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    >>> x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
    >>> table = js.dependency_table(fn, params, x, spec)
    >>> probe = js.gradient_table(fn, params, x, spec, key=jax.random.key(0))
    >>> js.cross_check(table, probe).ok
    True
  """
  _check_tables(table, probe)
  if memory_budget is not None and memory_budget <= 0:
    raise ValueError(f"`memory_budget` must be a positive number of bytes, got {memory_budget}.")
  budget = MEMORY_BUDGET if memory_budget is None else int(memory_budget)
  notes: list[str] = []
  ev = _usable_evidence(probe, notes)
  downs, contacts = _records_by_leaf(table, notes)
  missed: list[Miss] = []
  legit: list[DifferencePart] = []
  per_leaf: dict[str, LeafAgreement] = {}
  notes_leaf: dict[str, str] = {}
  for j, path in enumerate(table.paths):
    res = _compare_leaf(table, probe, ev, path, downs[j], contacts[j], budget)
    missed += res.missed
    legit += res.legitimate
    per_leaf[path] = res.agreement
    if res.table_only_note is not None:
      notes_leaf[path] = res.table_only_note
  out_missed, out_leaf = _compare_outputs(table, probe, notes)
  return CrossCheck(tuple(table.features), tuple(missed), Differences(legit), per_leaf, notes_leaf,
                    tuple(out_missed), out_leaf, tuple(notes))
