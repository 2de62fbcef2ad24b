"""Readable text for tables, cross-checks and surgery reports."""

from __future__ import annotations

import html as _html

import numpy as np


def fmt_shape(shape) -> str:
  return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def columns(rows: list[list[str]], header: list[str]) -> str:
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  line = lambda r: "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([line(header)] + [line(r) for r in rows])


def feature_list(names, counts=None, limit: int = 6) -> str:
  items = [f"{n}" if counts is None else f"{n}({c})" for n, c in
           zip(names, counts if counts is not None else [None] * len(names))]
  if len(items) > limit:
    items = items[:limit] + [f"... +{len(items) - limit}"]
  return " ".join(items) if items else "-"


def plural(n: int, one: str, many: str | None = None) -> str:
  """``"1 feature"``, ``"2 features"`` (``many`` for irregular plurals)."""
  return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _is_dropped_note(reason: str, dropped_leaves) -> bool:
  """The planner's note for a dropped leaf, which the views list in their own section."""
  notes = {f"old parameter {p!r} {shape} has no counterpart in the new model" for p, shape in dropped_leaves}
  return reason in notes


def _recipe_count(report) -> int:
  return sum(int(l.counts.get("recipe", 0)) for l in report.leaves)


def _output_rows(report) -> list[tuple[str, tuple]]:
  """(label, names) for the output-name changes a report records (plans with named outputs)."""
  rows = [(label, tuple(getattr(report, attr, ()) or ())) for label, attr in
          (("added", "outputs_added"), ("removed", "outputs_removed"), ("moved", "outputs_moved"))]
  return rows if any(names for _, names in rows) or getattr(report, "renamed_outputs", None) else []


def _leaf_notes(report) -> list[tuple[str, str]]:
  return [(l.path, n) for l in report.leaves for n in getattr(l, "notes", ()) or ()]


def table_summary(table, max_features: int = 6) -> str:
  n_params = sum(int(np.prod(s, dtype=np.int64)) for s in table.shapes.values())
  head = (f"FeatureTable[{table.method}]: {plural(table.num_features, 'feature')}, "
          f"{plural(len(table.paths), 'parameter leaf', 'parameter leaves')} ({n_params:,} elements), "
          f"{plural(len(table.output_paths), 'output')}")
  lines = [head, "  features: " + feature_list(table.features, limit=12)]
  if table.unknown_primitives:
    lines.append("  conservative rule used for unknown primitives: " + ", ".join(table.unknown_primitives))
  rows = []
  for p in table.paths:
    counts = table.feature_counts(p)
    nz = np.nonzero(counts)[0]
    size = int(np.prod(table.shapes[p], dtype=np.int64))
    rows.append([p or "<root>", fmt_shape(table.shapes[p]), f"{table.touched_elements(p):,}/{size:,}",
                 feature_list([table.features[i] for i in nz], counts[nz], max_features)])
  lines.append(columns(rows, ["parameter", "shape", "touched", "features (elements)"]))
  return "\n".join(lines)


def report_text(report) -> str:
  t = report.totals()
  status = {True: "preserved", False: "NOT preserved", None: "not proven statically"}[report.preserved]
  recipe = _recipe_count(report)
  lines = [f"Surgery report: function {status}",
           f"  elements: {t['copied']:,} copied, {t['moved']:,} moved, {t['fresh']:,} fresh "
           f"({t['zeroed']:,} zeroed), {t['dropped']:,} old elements dropped"
           + (f"; {recipe:,} computed by a recipe" if recipe else ""),
           "  features added: " + feature_list(report.added, limit=12),
           "  features removed: " + feature_list(report.removed, limit=12),
           "  features moved: " + feature_list(report.moved, limit=12)]
  if report.renamed_features:
    lines.append("  features renamed: " + ", ".join(f"{a}->{b}" for a, b in report.renamed_features.items()))
  for label, names in _output_rows(report):
    lines.append(f"  outputs {label}: " + feature_list(names, limit=12))
  if getattr(report, "renamed_outputs", None):
    lines.append("  outputs renamed: " + ", ".join(f"{a}->{b}" for a, b in report.renamed_outputs.items()))
  renamed = [(o, n, why) for o, n, why in report.matching if o != n]
  if renamed:
    lines.append("  parameter leaves matched under another name:")
    lines += [f"    {o} -> {n}  ({why})" for o, n, why in renamed]
  rows = []
  for leaf in report.leaves:
    c = leaf.counts
    src = "(new leaf)" if leaf.old_path is None else (leaf.old_path + " " + fmt_shape(leaf.old_shape))
    how = ",".join(h for h in leaf.how) if leaf.how else "-"
    rows.append([leaf.path, fmt_shape(leaf.shape), src, how, f"{c['copied']:,}", f"{c['moved']:,}",
                 f"{c['fresh']:,}", f"{c['zeroed']:,}", f"{c['dropped']:,}"]
                + ([f"{c.get('recipe', 0):,}"] if recipe else []))
  lines.append(columns(rows, ["parameter", "shape", "from", "axes", "copied", "moved", "fresh", "zeroed",
                              "dropped"] + (["recipe"] if recipe else [])))
  for path, note in _leaf_notes(report):
    lines.append(f"  recipe: {path}: {note}")
  for p, shape in report.dropped_leaves:
    lines.append(f"  dropped leaf: {p} {fmt_shape(shape)} (no counterpart in the new model)")
  for a in getattr(report, "assumptions", ()) or ():
    lines.append(f"  assumes: {a}")
  for r in report.reasons:
    if not _is_dropped_note(r, report.dropped_leaves):
      lines.append(f"  note: {r}")
  return "\n".join(lines)


# -- HTML (notebooks) -------------------------------------------------------------
#
# Plain HTML tables with inline styles (no CSS classes, no scripts), so the output
# renders the same in Jupyter, VS Code and GitHub's notebook viewer. Every name that
# comes from the user (feature names, parameter and output paths, explanations) goes
# through ``html.escape``. Long lists end in a "… N more" line.

_FONT = "font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px"
_TABLE = f"border-collapse:collapse;margin:4px 0 8px 0;{_FONT}"
_TH = "text-align:left;padding:2px 8px;border-bottom:1px solid #888;font-weight:600"
_TD = "text-align:left;padding:1px 8px;border-bottom:1px solid rgba(128,128,128,0.25);vertical-align:top"
_NUM = "text-align:right"
_MUTED = "opacity:0.7"  # the inherited text colour, dimmed: legible on light and dark
_COLORS = {"ok": "#2e7d32", "bad": "#c62828", "warn": "#b26a00", "info": "#1565c0"}


def _fg(kind: str) -> str:
  """Text in a status colour mixed with the inherited text colour (legible on light and dark).

  The plain colour comes first, for viewers without color-mix.
  """
  return f"color:{_COLORS[kind]};color:color-mix(in srgb,{_COLORS[kind]} 60%,currentColor)"


def _nb(html: str) -> str:
  """No line break inside ``html`` (a shape, an index, a "… N more")."""
  return f'<span style="white-space:nowrap">{html}</span>'


def _name(x) -> str:
  """An escaped name; a long one may break after "_" rather than widen its table."""
  s = _e(x)
  return s.replace("_", "_<wbr>") if len(s) > 24 else s


def _breakable(html: str) -> str:
  """Tokens longer than the column may break anywhere rather than widen the table."""
  return f'<span style="overflow-wrap:anywhere">{html}</span>'


def _shape(shape) -> str:
  return _nb(_e(fmt_shape(shape)))


def _e(x) -> str:
  return _html.escape(str(x), quote=True)


def _path(p) -> str:
  return _e(p).replace("/", "/<wbr>") if p else _e("<root>")  # long paths may break after a "/"


def _badge(text: str, kind: str) -> str:
  return (f'<span style="background:{_COLORS[kind]};color:#fff;border-radius:3px;padding:0 6px;'
          f'font-weight:600">{_e(text)}</span>')


def _colored(text: str, kind: str | None, bold: bool = False) -> str:
  if kind is None:
    return text
  return f'<span style="{_fg(kind)}{";font-weight:600" if bold else ""}">{text}</span>'


def _n(x: int, kind: str | None = None) -> str:
  """A count, colored when nonzero."""
  s = f"{int(x):,}"
  return _colored(s, kind) if x and kind else s


def _more(n: int, what: str = "") -> str:
  return _nb(f"… {n:,} more" + (f" {what}" if what else ""))


def _names_html(names, limit: int = 24, counts=None) -> str:
  """Escaped, comma-separated names (with optional counts), capped with "… N more"."""
  names = list(names)
  if not names:
    return f'<span style="{_MUTED}">–</span>'
  items = [_name(n) if counts is None else f"{_name(n)}&nbsp;({int(c):,})" for n, c in
           zip(names, counts if counts is not None else [None] * len(names))]
  shown = items[:limit]
  if len(items) > limit:
    shown.append(f'<span style="{_MUTED}">{_more(len(items) - limit)}</span>')
  return _breakable(", ".join(shown))


def _html_table(header: list[str], rows: list[list[str]], *, numeric=(), max_rows: int | None = None,
                what: str = "rows", more_note: str = "") -> str:
  """``rows`` hold ready-made (escaped) HTML cells. Caps rows at ``max_rows`` with a "… N more" row."""
  def cell(tag, c, i, style):
    st = style + (";" + _NUM if i in numeric else "")
    return f'<{tag} style="{st}">{c}</{tag}>'
  out = [f'<table style="{_TABLE}">', "<thead><tr>" + "".join(cell("th", _e(h), i, _TH) for i, h in
                                                               enumerate(header)) + "</tr></thead>", "<tbody>"]
  shown = rows if max_rows is None else rows[:max_rows]
  for r in shown:
    out.append("<tr>" + "".join(cell("td", c, i, _TD) for i, c in enumerate(r)) + "</tr>")
  if len(shown) < len(rows):
    out.append(f'<tr><td colspan="{len(header)}" style="{_TD};{_MUTED}">'
               f'{_more(len(rows) - len(shown), what)}{more_note}</td></tr>')
  out.append("</tbody></table>")
  return "".join(out)


def _section(title: str) -> str:
  return f'<div style="margin-top:6px;font-weight:600">{_e(title)}</div>'


def _wrap(parts: list[str]) -> str:
  return f'<div style="{_FONT};line-height:1.4">' + "".join(parts) + "</div>"


def _output_features(table, path) -> list[str]:
  packed = table.output_packed.get(path)
  if packed is None:
    return []
  words = np.bitwise_or.reduce(np.asarray(packed).reshape(-1, packed.shape[-1]), axis=0)
  bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")[:table.num_features]
  return [table.features[i] for i in np.nonzero(bits)[0]]


def table_html(table, max_rows: int = 25, max_features: int = 6) -> str:
  """HTML summary of a :class:`FeatureTable`: features, per-leaf touches, outputs' dependences.

  Args:
    table: a ``FeatureTable`` (boolean or gradient).
    max_rows: at most this many parameter (and output) rows; the rest is a "… N more" line.
    max_features: at most this many features per parameter row (in spec order, as in
      the text summary); output rows show at least 12.

  Returns:
    An HTML string (what a notebook shows for a table).

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
    >>> table = js.dependency_table(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)),
    ...                             js.Features(["hp", "mana"]))
    >>> html = jsd.table_html(table)
    >>> "<b>FeatureTable</b>" in html and "hp" in html
    True
  """
  n_params = sum(int(np.prod(s, dtype=np.int64)) for s in table.shapes.values())
  parts = [f'<div><b>FeatureTable</b> <span style="{_MUTED}">[{_e(table.method)}]</span> '
           f"{plural(table.num_features, 'feature')} · "
           f"{plural(len(table.paths), 'parameter leaf', 'parameter leaves')} "
           f"({n_params:,} elements) · {plural(len(table.output_paths), 'output')}</div>",
           f"<div>features: {_names_html(table.features, limit=24)}</div>"]
  if table.unknown_primitives:
    parts.append("<div>" + _colored("conservative (dense) rule used for unknown primitives: "
                                    + ", ".join(_e(p) for p in table.unknown_primitives), "warn", True)
                 + "</div>")
  rows = []
  for p in table.paths:
    counts = table.feature_counts(p)
    nz = np.nonzero(counts)[0]
    size = int(np.prod(table.shapes[p], dtype=np.int64))
    touched = table.touched_elements(p)
    rows.append([_path(p), _shape(table.shapes[p]),
                 f"{touched:,}/{size:,}" if touched else f'<span style="{_MUTED}">0/{size:,}</span>',
                 _names_html([table.features[i] for i in nz], max_features, counts[nz])])
  parts.append(_html_table(["parameter", "shape", "touched", "features (elements)"], rows, numeric=(2,),
                           max_rows=max_rows, what="parameter leaves"))
  if table.output_paths:
    orows = [[_path(p), _shape(table.output_shapes[p]),
              _names_html(_output_features(table, p), max(max_features, 12))] for p in table.output_paths]
    parts.append(_html_table(["output", "shape", "depends on"], orows, max_rows=max_rows, what="outputs"))
  return _wrap(parts)


_STATUS = {True: ("preserved", "ok"), False: ("NOT preserved", "bad"), None: ("not proven statically", "warn")}


def report_html(report, max_rows: int = 25) -> str:
  """HTML view of a surgery :class:`Report`.

  Shows the verdict, element totals, features (and named outputs) added / removed /
  moved / renamed, one row per new parameter leaf (source leaf, how it was matched,
  per-axis maps, copied / moved / fresh / zeroed / dropped, and recipe when a plan
  uses recipes), the recipes in words, old leaves with no counterpart, the proof's
  assumptions and the reasons behind the verdict.

  Args:
    report: ``surgery.report``.
    max_rows: at most this many leaf rows (and dropped-leaf rows); the rest is a
      "… N more" line that says how many of the hidden leaves change.

  Returns:
    An HTML string (what a notebook shows for a report).

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
    >>> fn = lambda p, x: x @ p["w"]
    >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["hp", "mana"]))
    >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["hp", "armor", "mana"]))
    >>> html = jsd.report_html(js.plan(old, new).report)
    >>> "<b>Surgery report</b>" in html and "armor" in html
    True
  """
  t = report.totals()
  status, kind = _STATUS[report.preserved]
  recipe = _recipe_count(report)
  parts = [f"<div><b>Surgery report</b> {_badge('function ' + status, kind)}</div>",
           f"<div>elements: {_n(t['copied'])} copied · {_n(t['moved'], 'info')} moved · "
           f"{_n(t['fresh'], 'info')} fresh ({_n(t['zeroed'], 'warn')} zeroed) · "
           f"{_n(t['dropped'], 'bad')} old elements dropped"
           + (f" · {_n(recipe, 'info')} computed by a recipe" if recipe else "") + "</div>",
           _names_table(report)]
  parts.append(_section("parameter leaves"))
  parts.append(_leaf_table(report, max_rows, recipe > 0))
  notes = _leaf_notes(report)
  if notes:
    parts.append(_section("recipes"))
    parts.append(_html_table(["parameter", "what the plan computes"], [[_path(p), _e(n)] for p, n in notes],
                             max_rows=max_rows, what="recipes"))
  if report.dropped_leaves:
    parts.append(_section("old leaves with no counterpart (dropped)"))
    drows = [[_colored(_path(p), "bad"), _shape(s), _n(int(np.prod(s, dtype=np.int64)), "bad")]
             for p, s in report.dropped_leaves]
    parts.append(_html_table(["old parameter", "shape", "elements"], drows, numeric=(2,), max_rows=max_rows,
                             what="dropped leaves"))
  assumptions = list(getattr(report, "assumptions", ()) or ())
  if assumptions:
    parts += [_section("the proof assumes"), _ul(assumptions)]
  parts += _notes([r for r in report.reasons if not _is_dropped_note(r, report.dropped_leaves)])
  return _wrap(parts)


def _names_table(report) -> str:
  rows = [["added", _colored(_names_html(report.added), "ok" if report.added else None)],
          ["removed", _colored(_names_html(report.removed), "bad" if report.removed else None)],
          ["moved", _names_html(report.moved)]]
  if report.renamed_features:
    rows.append(["renamed", ", ".join(f"{_e(a)} → {_e(b)}" for a, b in report.renamed_features.items())])
  out = _html_table(["features", "names"], rows)
  outputs = _output_rows(report)
  if outputs:
    kinds = {"added": "ok", "removed": "bad", "moved": None}
    orows = [[label, _colored(_names_html(names), kinds[label] if names else None)] for label, names in outputs]
    renamed = getattr(report, "renamed_outputs", None) or {}
    if renamed:
      orows.append(["renamed", ", ".join(f"{_e(a)} → {_e(b)}" for a, b in renamed.items())])
    out += _html_table(["outputs", "names"], orows)
  return out


def _leaf_table(report, max_rows: int, with_recipe: bool) -> str:
  why = {n: w for _, n, w in report.matching}
  rows, changed_hidden = [], 0
  for i, leaf in enumerate(report.leaves):
    c = leaf.counts
    if leaf.old_path is None:
      src, matched = _colored(_nb("(new leaf)"), "info"), f'<span style="{_MUTED}">–</span>'
    else:
      renamed = leaf.old_path != leaf.path
      src = (_colored(_path(leaf.old_path), "info") + " " if renamed else "") + _shape(leaf.old_shape)
      matched = _nb(_e(why.get(leaf.path, "")))
    how = ", ".join(_nb(_e(h)) for h in leaf.how) if leaf.how else f'<span style="{_MUTED}">–</span>'
    rows.append([_path(leaf.path), _shape(leaf.shape), src, matched, how, _n(c["copied"]),
                 _n(c["moved"], "info"), _n(c["fresh"], "info"), _n(c["zeroed"], "warn"), _n(c["dropped"], "bad")]
                + ([_n(c.get("recipe", 0), "info")] if with_recipe else []))
    if i >= max_rows and (c["fresh"] or c["moved"] or c["dropped"] or c.get("recipe", 0)):
      changed_hidden += 1
  note = f" ({changed_hidden:,} of them with moved, fresh or dropped elements)" if changed_hidden else ""
  header = ["parameter", "shape", "from", "matched by", "axes", "copied", "moved", "fresh", "zeroed", "dropped"]
  numeric = (5, 6, 7, 8, 9, 10) if with_recipe else (5, 6, 7, 8, 9)
  return _html_table(header + (["recipe"] if with_recipe else []), rows, numeric=numeric, max_rows=max_rows,
                     what="leaves", more_note=note)


def _fmt_idx(index) -> str:
  return "[" + ", ".join(str(i) for i in index) + "]" if index else ""


def _capped(items, limit: int, show=lambda i: _nb(_e(i)), total: int | None = None) -> str:
  items = [str(i) for i in items]
  total = len(items) if total is None else total
  out = ", ".join(show(i) for i in items[:limit])
  return out + (", " + _more(total - limit) if total > limit else "")


def _group_rows(entries, features, key) -> list[list[str]]:
  """One row per (leaf, explanation) group: entries, elements, features, explanation."""
  groups: dict = {}
  for d in entries:
    groups.setdefault(key(d), []).append(d)
  rows = []
  for (path, expl), ds in groups.items():
    elems = [_fmt_idx(e) for e in sorted({d.index for d in ds})]
    fnames = sorted({d.feature for d in ds}, key=lambda f: features.index(f) if f in features else len(features))
    rows.append([_path(path), f"{len(ds):,}", _capped(elems, 4), _breakable(_capped(fnames, 6, _name)), _e(expl)])
  return rows


def cross_check_html(check, max_rows: int = 12) -> str:
  """HTML view of a probe :class:`CrossCheck`.

  Shows the verdict, per-leaf agreement of the boolean table and the gradient
  probe (both / table-only / probe-only / live-only, legitimate and missed), output
  agreement, the missed entries and legitimate differences grouped by leaf and
  explanation, the table-only notes and general notes.

  Args:
    check: the result of ``cross_check(table, probe)``.
    max_rows: at most this many rows per table / group list; the rest is a "… N more" line.

  Returns:
    An HTML string.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
    >>> fn, params = lambda p, x: x @ p["w"], {"w": jnp.ones((2, 3))}
    >>> x, spec = jnp.ones((1, 2)), js.Features(["hp", "mana"])
    >>> check = js.cross_check(js.dependency_table(fn, params, x, spec),
    ...                        js.gradient_table(fn, params, x, spec, key=jax.random.key(0)))
    >>> "OK" in jsd.cross_check_html(check)
    True
  """
  n_missed = len(check.missed) + len(check.output_missed)
  parts = [f"<div><b>Cross-check</b> boolean table vs gradient probe "
           f"{_badge('OK' if check.ok else 'FAILED', 'ok' if check.ok else 'bad')}</div>",
           f"<div>{_n(len(check.missed), 'bad')} missed parameter entries · "
           f"{_n(len(check.output_missed), 'bad')} missed output entries · "
           f"{len(check.legitimate):,} legitimate differences · {len(check.features):,} features</div>"]
  exact = f'<span style="{_fg("ok")}">✓</span>'
  rows = [[_path(p), _n(a.both), _n(a.table_only), _n(a.probe_only), _n(getattr(a, "live_only", 0)),
           _n(a.legitimate), _n(a.missed, "bad"), exact if a.exact else ""] for p, a in check.per_leaf.items()]
  parts.append(_section("parameter leaves: (element, feature) pairs"))
  parts.append(_html_table(["parameter", "both", "table-only", "probe-only", "live-only", "legitimate", "missed",
                            "exact"], rows, numeric=(1, 2, 3, 4, 5, 6), max_rows=max_rows, what="parameter leaves"))
  if check.output_per_leaf:
    orows = [[_path(p), _n(a.both), _n(a.table_only), _n(a.probe_only, "bad"), exact if a.exact else ""]
             for p, a in check.output_per_leaf.items()]
    parts.append(_section("outputs: (element, feature) pairs"))
    parts.append(_html_table(["output", "both", "table-only", "probe-only (missed)", "exact"], orows,
                             numeric=(1, 2, 3), max_rows=max_rows, what="outputs"))
  header = ["leaf", "entries", "elements", "features", "explanation"]
  if n_missed:
    rows = _group_rows(check.missed + check.output_missed, check.features,
                       lambda m: (m.path, m.explanation.replace(repr(m.feature), "the feature")))
    parts.append(_section("missed: the probe finds it, the table lacks it, nothing explains it"))
    parts.append(_html_table(header, rows, numeric=(1,), max_rows=max_rows, what="groups"))
  if check.legitimate:
    rows = [[_path(g.path), f"{g.entries:,}",
             _capped([_fmt_idx(tuple(int(i) for i in e)) for e in g.elements[:4]], 4, total=len(g.elements)),
             _breakable(_capped(g.features, 6, _name)), _e(g.explanation)] for g in check.legitimate.groups()]
    parts.append(_section("legitimate differences (the gradient sees effects after the first contact)"))
    parts.append(_html_table(header, rows, numeric=(1,), max_rows=max_rows, what="groups"))
  if check.table_only_notes:
    rows = [[_path(p), _e(note)] for p, note in check.table_only_notes.items()]
    parts.append(_section("table only (boolean over-approximation relative to the gradient)"))
    parts.append(_html_table(["leaf", "why the gradient does not see it"], rows, max_rows=max_rows,
                             what="leaves"))
  parts += _notes(check.notes)
  return _wrap(parts)


def _ul(items) -> str:
  return ('<ul style="margin:2px 0;padding-left:20px">' + "".join(f"<li>{_breakable(_e(n))}</li>" for n in items)
          + "</ul>")


def _notes(notes) -> list[str]:
  if not notes:
    return []
  return [_section("notes"), _ul(notes)]


def state_report_html(report, max_rows: int = 25) -> str:
  """HTML view of a :class:`StateReport` (``remap_state(..., return_report=True)``).

  Shows the leaf totals, the param-shaped subtrees remapped with the plan (and their
  element counts), the other leaves copied from the old state, the leaves taken from
  the new init (with why) and the old leaves left behind (with why).

  Args:
    report: a ``StateReport``.
    max_rows: at most this many rows per table; the rest is a "… N more" line.

  Returns:
    An HTML string.

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
    >>> fn = lambda p, x: x @ p["w"]
    >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["hp", "mana"]))
    >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["hp", "armor", "mana"]))
    >>> old_state = {"params": {"w": jnp.ones((2, 3))}, "step": jnp.int32(3)}
    >>> new_state = {"params": {"w": jnp.zeros((3, 3))}, "step": jnp.int32(0)}
    >>> _, report = js.remap_state(js.plan(old, new), old_state, new_state, return_report=True)
    >>> "nothing left behind" in jsd.state_report_html(report)
    True
  """
  t = report.totals()
  from_init = t["missing"] + t["reset"] + t["init"]
  left = t["left_behind"]
  badge = _badge(f"{plural(left, 'old leaf', 'old leaves')} left behind", "warn") if left else _badge(
      "nothing left behind", "ok")
  parts = [f"<div><b>StateReport</b> {badge}</div>",
           f"<div>{plural(len(report.leaves), 'leaf', 'leaves')}: {_n(t['remapped'])} remapped · "
           f"{_n(t['fresh'], 'info')} fresh params · {_n(t['copied'])} copied · "
           f"{_n(from_init, 'info')} from the new init</div>"]
  if report.subtrees:
    roles = any(getattr(s, "role", None) for s in report.subtrees)   # what a subtree holds (params, moments...)
    rows = []
    for s in report.subtrees:
      c, e = s.counts, s.elements
      old = "" if s.old_prefix == s.prefix else _colored(_path(s.old_prefix), "info")
      rows.append([_path(s.prefix)] + ([_e(getattr(s, "role", "") or "")] if roles else [])
                  + [_n(s.size), _n(c.get("remapped", 0)), _n(c.get("fresh", 0), "info"),
                     _n(c.get("missing", 0), "warn"), _n(e.get("copied", 0) + e.get("moved", 0)),
                     f"{_n(e.get('fresh', 0), 'info')} ({_n(e.get('zeroed', 0), 'warn')})",
                     _path(s.root) if s.root else f'<span style="{_MUTED}">–</span>', old])
    header = ["prefix"] + (["role"] if roles else []) + ["leaves", "remapped", "fresh", "missing", "elements kept",
                                                        "fresh (zeroed)", "root", "old prefix"]
    first = 2 if roles else 1
    parts.append(_section("param-shaped subtrees (remapped with the plan)"))
    parts.append(_html_table(header, rows, numeric=tuple(range(first, first + 6)), max_rows=max_rows,
                             what="subtrees"))
  copied = [l for l in report.leaves if l.kind == "copied"]
  if copied:
    rows = [[_path(l.path), "" if l.old_path == l.path else _colored(_path(l.old_path), "info")] for l in copied]
    parts.append(_section("copied from the old state"))
    parts.append(_html_table(["leaf", "from"], rows, max_rows=max_rows, what="leaves"))
  init = [l for l in report.leaves if l.kind in ("missing", "reset", "init")]
  if init:
    rows = [[_path(l.path), _e(l.kind), _breakable(_e(l.why))] for l in init]
    parts.append(_section("taken from the new init"))
    parts.append(_html_table(["leaf", "kind", "why"], rows, max_rows=max_rows, what="leaves"))
  if report.left_behind:
    rows = [[_colored(_path(p), "warn"), _shape(s), _e(d), _breakable(_e(why))] for p, s, d, why in report.left_behind]
    parts.append(_section("left behind in the old state"))
    parts.append(_html_table(["old leaf", "shape", "dtype", "why"], rows, max_rows=max_rows, what="leaves"))
  return _wrap(parts)
