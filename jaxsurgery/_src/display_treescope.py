"""treescope renderers for tables, plans and reports (treescope is optional: imported here, lazily).

treescope is the pytree viewer JAX and penzai users already use in notebooks. After
:func:`register_treescope`, a training state with its surgery renders in one
interactive view: ``treescope.show({"state": new_state, "surgery": surgery,
"state_report": state_report})`` shows the arrays with treescope's own array views
and each jaxsurgery object as a foldable node whose first line summarises it (the
verdict, the element counts), whose first child is the object's HTML table and
whose other children are its attributes, to drill into (a surgery's report, every
``LeafPlan`` with its per-axis maps...).

Nothing else in jaxsurgery imports treescope. Two hooks: :func:`register_treescope`
fills treescope's handler registry (call it once per session); and
:func:`treescope_repr` is the body of the ``__treescope_repr__(self, path,
subtree_renderer)`` protocol method, for classes that define it.
"""

from __future__ import annotations

from typing import Any

from jaxsurgery._src import display

INSTALL_HINT = ("the treescope view needs treescope, which jaxsurgery does not require: install the "
                "`treescope` extra (`pip install 'jaxsurgery[treescope]'`) or `pip install treescope`")


def _treescope():
  try:
    import treescope
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  return treescope


def _classes() -> dict[type, Any]:
  """The rendered classes, each with its (summary, HTML view, attributes) functions."""
  from jaxsurgery._src.core.table import FeatureTable
  from jaxsurgery._src.probe.cross_check import CrossCheck
  from jaxsurgery._src.surgery.plan import LeafPlan, Report
  from jaxsurgery._src.surgery.remap import Surgery
  from jaxsurgery._src.surgery.state import StateReport
  return {FeatureTable: (_table_summary, display.table_html, _table_attributes),
          Report: (_report_summary, display.report_html, _report_attributes),
          Surgery: (lambda s: _report_summary(s.report), None, lambda s: ("report", "old_table", "new_table")),
          LeafPlan: (_leaf_summary, None, _leaf_attributes),
          CrossCheck: (_check_summary, display.cross_check_html, _check_attributes),
          StateReport: (_state_summary, display.state_report_html, lambda r: ("leaves", "subtrees", "left_behind"))}


# -- summaries (the first line, folded or not) -------------------------------------------------

def _table_summary(t) -> str:
  return (f"{t.method} · {display.plural(t.num_features, 'feature')} · "
          f"{display.plural(len(t.paths), 'parameter leaf', 'parameter leaves')} · "
          f"{display.plural(len(t.output_paths), 'output')}")


def _report_summary(r) -> str:
  t = r.totals()
  status = {True: "function preserved", False: "function NOT preserved", None: "not proven statically"}
  return (f"{status[r.preserved]} · {t['copied']:,} copied, {t['moved']:,} moved, {t['fresh']:,} fresh "
          f"({t['zeroed']:,} zeroed), {t['dropped']:,} dropped")


def _leaf_summary(l) -> str:
  if l.old_path is None:
    return f"{display.fmt_shape(l.shape)} new leaf, {l.counts['zeroed']:,} of {l.counts['fresh']:,} zeroed"
  src = display.fmt_shape(l.old_shape) if l.old_path == l.path else f"{l.old_path} {display.fmt_shape(l.old_shape)}"
  counts = ", ".join(f"{v:,} {k}" for k, v in l.counts.items() if v)
  return f"{display.fmt_shape(l.shape)} ← {src}: {counts or 'empty'}"


def _check_summary(c) -> str:
  return (f"{'OK' if c.ok else 'FAILED'} · {len(c.missed):,} missed parameter entries, {len(c.output_missed):,} "
          f"missed output entries, {len(c.legitimate):,} legitimate differences")


def _state_summary(r) -> str:
  t = r.totals()
  return (f"{t['remapped']:,} remapped, {t['fresh']:,} fresh params, {t['copied']:,} copied, "
          f"{t['missing'] + t['reset'] + t['init']:,} from new init; {t['left_behind']:,} old leaves left behind")


# -- attributes (the children) -------------------------------------------------------------------

def _table_attributes(t) -> tuple[str, ...]:
  return ("method", "features", "shapes", "output_shapes", "unknown_primitives")


def _report_attributes(r) -> tuple[str, ...]:
  names = ["preserved", "reasons", "added", "removed", "moved", "renamed_features", "leaves", "dropped_leaves",
           "matching"]
  names += [n for n in ("outputs_added", "outputs_removed", "outputs_moved", "assumptions") if getattr(r, n, None)]
  return tuple(names)


_LEAF_RECIPES = {"scale": 1.0, "mean_axes": (), "noise_axes": (), "fold": (), "zero_all": False, "notes": ()}


def _leaf_attributes(l) -> tuple[str, ...]:
  names = ["path", "old_path", "shape", "old_shape", "how", "counts", "maps", "zero"]
  return tuple(names + [n for n, default in _LEAF_RECIPES.items() if getattr(l, n, default) != default])


def _check_attributes(c) -> tuple[str, ...]:
  return ("ok", "per_leaf", "missed", "output_missed", "legitimate", "table_only_notes", "notes", "features")


# -- rendering ----------------------------------------------------------------------------------

def treescope_repr(obj: Any, path: str | None, subtree_renderer: Any) -> Any:
  """A treescope rendering of a jaxsurgery object (the ``__treescope_repr__`` protocol's body).

  Args:
    obj: a ``FeatureTable``, ``Report``, ``Surgery``, ``LeafPlan``, ``CrossCheck`` or ``StateReport``.
    path: the node's path (from treescope).
    subtree_renderer: treescope's renderer for the children.

  Returns:
    A treescope rendering, or ``NotImplemented`` for another type.

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
    >>> table = js.dependency_table(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)),
    ...                             js.Features(["hp", "mana"]))
    >>> jsd.treescope_repr(object(), None, None)   # not a jaxsurgery object
    NotImplemented
    >>> import treescope
    >>> _ = jsd.register_treescope()   # treescope now calls this function for jaxsurgery objects
    >>> "FeatureTable(" in treescope.render_to_text({"table": table})
    True
  """
  ts = _treescope()
  parts = ts.rendering_parts
  entry = next((fns for cls, fns in _classes().items() if isinstance(obj, cls)), None)
  if entry is None:
    return NotImplemented
  summary, html, attributes = entry
  children = []
  if html is not None and getattr(type(obj), "_repr_html_", None) is None:   # else treescope appends it itself
    text_view = parts.fold_condition(expanded=parts.text(repr(obj)))  # the text repr has newlines
    children.append(parts.embedded_iframe(html(obj), fallback_in_text_mode=text_view))
  for name in attributes(obj):
    child_path = None if path is None else f"{path}.{name}"
    line = parts.siblings_with_annotations(f"{name}=", subtree_renderer(getattr(obj, name), path=child_path))
    children.append(parts.build_full_line_with_annotations(line, ","))
  summary_text = summary(obj)
  contents = parts.siblings(
      parts.fold_condition(collapsed=parts.comment_color(parts.text(summary_text)),
                           expanded=parts.siblings(parts.comment_color(parts.text("  # " + summary_text)),
                                                   parts.indented_children(children))),
      ")")
  return parts.build_custom_foldable_tree_node(
      contents=contents, path=path, label=parts.siblings(parts.maybe_qualified_type_name(type(obj)), "("),
      # Inside a larger tree a node starts folded to its summary line (click to open it); alone, treescope decides.
      expand_state=parts.ExpandState.COLLAPSED if path else parts.ExpandState.WEAKLY_COLLAPSED)


def _handler(obj: Any, path: str | None, subtree_renderer: Any) -> Any:
  return treescope_repr(obj, path, subtree_renderer)


def register_treescope() -> tuple[type, ...]:
  """Registers treescope renderers for jaxsurgery's tables, plans and reports.

  Afterwards ``treescope.show(x)`` (or treescope as the notebook's default pretty
  printer: ``treescope.basic_interactive_setup()``) renders every ``FeatureTable``,
  ``Report``, ``Surgery``, ``LeafPlan``, ``CrossCheck`` and ``StateReport`` inside
  ``x`` as a foldable node: a one-line summary, the HTML table, then the
  attributes. Calling it again is harmless.

  Returns:
    The registered classes.

  Raises:
    ImportError: treescope is not installed (the message names the extra).

  Example:
    >>> import jax.numpy as jnp, treescope, jaxsurgery as js
    >>> from jaxsurgery._src.display_treescope import register_treescope
    >>> table = js.dependency_table(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)),
    ...                             js.Features(["a", "b"]))
    >>> classes = register_treescope()
    >>> text = treescope.render_to_text({"table": table})
    >>> "FeatureTable(" in text and "boolean · 2 features · 1 parameter leaf · 1 output" in text
    True
  """
  ts = _treescope()
  classes = tuple(_classes())
  for cls in classes:
    ts.type_registries.TREESCOPE_HANDLER_REGISTRY[cls] = _handler
  return classes
