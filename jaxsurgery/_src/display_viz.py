"""Pictures of surgeries and tables (matplotlib, imported lazily: the ``viz`` extra).

* :func:`show_surgery`: one new leaf, every element coloured by where its value comes
  from (:mod:`~jaxsurgery._src.display_sources`); axes aligned by feature (or output)
  name are labelled with the names, moved rows with their old index.
* :func:`show_overview`: every leaf of a plan at once, as a treemap of small multiples
  whose areas grow with the parameter count.
* :func:`show_table`: a leaf's feature mask as a heatmap (indices x features), with a
  gradient probe's and a cross-check's differences drawn on the same picture.

Every function returns a :class:`Picture`: it displays itself once in a notebook (PNG)
and saves with ``picture.savefig(path)``. Figures are built without pyplot, so no
window opens and nothing is shown twice.
"""

from __future__ import annotations

import difflib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsurgery._src import display_sources as S
from jaxsurgery._src.core.errors import UnknownNameError
from jaxsurgery._src.display import fmt_shape

INSTALL_HINT = ("pictures need matplotlib, which jaxsurgery does not require: install the `viz` extra "
                "(`pip install 'jaxsurgery[viz]'`) or `pip install matplotlib`")

#: Colour of each element class (colour-blind safe: grey, blue, purple, orange, near black).
SOURCE_COLORS: dict[str, str] = {"copied": "#d5dae0", "moved": "#3a76af", "recipe": "#9467bd",
                                 "fresh": "#f0a03c", "zeroed": "#333333"}
_BACKGROUND = "#ffffff"


def _matplotlib():
  try:
    import matplotlib  # noqa: F401  (imported here: the extra is optional)
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  return Figure


class Picture:
  """A matplotlib figure that a notebook shows once (as PNG) and that saves with :meth:`savefig`.

  Attributes:
    figure: the ``matplotlib.figure.Figure``.
    info: what was drawn (e.g. ``counts``, ``axes``, ``grid``), for tests and captions.

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
    >>> fn = lambda p, x: x @ p["w"]
    >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["hp", "mana"]))
    >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["hp", "armor", "mana"]))
    >>> picture = jsd.show_surgery(js.plan(old, new), "w")
    >>> picture.png()[1:4], picture.info["row_labels"]
    (b'PNG', ['hp', 'armor', 'mana ←1'])
  """

  def __init__(self, figure: Any, info: dict[str, Any]):
    self.figure, self.info = figure, info

  def savefig(self, path: Any, **kwargs: Any) -> Any:
    """Saves the figure (``matplotlib.figure.Figure.savefig`` arguments; tight bounding box by default)."""
    kwargs.setdefault("bbox_inches", "tight")
    self.figure.savefig(path, **kwargs)
    return path

  def png(self, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes (no timestamp or version metadata, so equal figures give equal bytes)."""
    buf = io.BytesIO()
    self.figure.savefig(buf, format="png", dpi=dpi or self.figure.dpi, bbox_inches="tight",
                        metadata={"Software": None})
    return buf.getvalue()

  def _repr_png_(self) -> bytes:
    return self.png()

  def __repr__(self) -> str:
    w, h = self.figure.get_size_inches() * self.figure.dpi
    return f"<Picture: {self.info.get('title', 'figure')} ({w:.0f}x{h:.0f} px)>"


# -- lookups ------------------------------------------------------------------------------------

def _report_and_tables(obj: Any):
  report = getattr(obj, "report", obj)
  if not hasattr(report, "leaves"):
    raise TypeError(f"expected a Surgery (from `js.plan`) or its Report, got {type(obj).__name__}.")
  return report, getattr(obj, "old_table", None), getattr(obj, "new_table", None)


def unknown_path(path: Any, known: Sequence[str], what: str, extra: str = "") -> UnknownNameError:
  """An error naming the closest known paths (difflib)."""
  close = difflib.get_close_matches(str(path), list(known), n=4, cutoff=0.4)
  hint = f" Closest: {close}." if close else f" Known: {list(known)[:12]}{' ...' if len(known) > 12 else ''}."
  return UnknownNameError(f"No {what} {path!r}.{hint}{extra}")


def _leaf(report: Any, path: str):
  by_path = {l.path: l for l in report.leaves}
  if path in by_path:
    return by_path[path]
  extra = ""
  renamed = [l.path for l in report.leaves if l.old_path == path]
  if renamed:
    extra = f" {path!r} is the old path of new leaf {renamed[0]!r}; pass the new path."
  elif any(p == path for p, _ in report.dropped_leaves):
    extra = f" {path!r} is an old leaf that was dropped (it has no counterpart in the new model)."
  raise unknown_path(path, list(by_path), "new parameter leaf", extra)


def _kind(how: Any) -> str:
  return getattr(how, "kind", str(how).split(" ")[0])


# -- axis labels --------------------------------------------------------------------------------

def _reach(table: Any, path: str) -> tuple[np.ndarray, tuple[str, ...]] | None:
  """``(bool param.shape + (outputs,), output names)`` from ``table.reach`` once outputs have names, else None.

  Guarded: a table without ``reach`` / ``output_features``, or with another layout, gives None (the
  picture is drawn without output labels) rather than an error.
  """
  reach, names = getattr(table, "reach", None), getattr(table, "output_features", None)
  if not callable(reach) or not names or path not in table.shapes:
    return None
  try:
    r = np.asarray(reach(path), bool)
  except Exception:  # noqa: BLE001  (no reach for this leaf, or another API)
    return None
  if r.ndim != len(table.shapes[path]) + 1 or r.shape[-1] != len(names):
    return None
  return r, tuple(names)


def _output_names(table: Any, path: str, axis: int) -> list[str | None] | None:
  """Per index, the one named output it reaches alone (``table.reach``, once outputs have names)."""
  found = _reach(table, path)
  if found is None:
    return None
  r, names = found
  other = tuple(b for b in range(r.ndim - 1) if b != axis)
  sig = r.any(axis=other) if other else r
  single = sig.sum(-1) == 1
  which = np.where(single, sig.argmax(-1), -1)
  counts = np.bincount(which[which >= 0], minlength=len(names))
  named = single & (counts[np.maximum(which, 0)] == 1)
  return [names[w] if ok else None for w, ok in zip(which, named)] if named.any() else None


def axis_names(leaf: Any, table: Any, axis: int) -> list[str | None] | None:
  """Names for the indices of an axis aligned by feature or output name (None for other axes)."""
  if table is None or leaf.path not in getattr(table, "shapes", {}) or not leaf.how:
    return None
  kind = _kind(leaf.how[axis])
  if kind == "features":
    return S.axis_feature_names(table, leaf.path, axis)
  if kind == "outputs":
    return _output_names(table, leaf.path, axis)
  return None


def _short(name: str, limit: int = 28) -> str:
  """A long name cut in the middle (``enemy_distance…_diagonal``), so that a tick label stays short."""
  return name if len(name) <= limit else name[:limit // 2 - 1] + "…" + name[-(limit // 2 - 1):]


def _tick_label(i: int, run: S.Run, names) -> str:
  name = None if names is None else names[i]
  label = str(i) if name is None else _short(name)
  if run.old_start >= 0 and run.state in (S._MOVED, S._CLONE):
    label += f" ←{run.old_start + (i - run.start)}"
  return label


def axis_ticks(leaf: Any, axis: int, names, max_labels: int = 40) -> tuple[list[int], list[str]]:
  """Tick positions and labels: every index of a short axis, else the start of every run (capped).

  Moved indices read ``"i ←old"`` (or ``"name ←old"``).
  """
  n = leaf.shape[axis]
  runs = S.axis_runs(leaf, axis)
  run_of = np.repeat(np.arange(len(runs)), [r.stop - r.start for r in runs])
  if n <= max_labels:
    return list(range(n)), [_tick_label(i, runs[run_of[i]], names) for i in range(n)]
  if len(runs) > max_labels:  # too many runs to label each: an even spread
    starts = sorted(set(np.linspace(0, n - 1, max_labels // 2).astype(int).tolist()))
  else:  # run starts, moved runs first, none closer than 1/20 of the axis to another
    gap, starts = n / 20, []
    for r in sorted(runs, key=lambda r: (r.state not in (S._MOVED, S._CLONE), r.start)):
      if all(abs(r.start - t) >= gap for t in starts):
        starts.append(r.start)
    starts.sort()
  return starts, [_tick_label(i, runs[run_of[i]], names) for i in starts]


# -- one leaf -----------------------------------------------------------------------------------

def _legend(ax, counts: dict[str, int], size: int, notes: Sequence[str] = (), loc="upper left",
            anchor=(1.02, 1.0)) -> None:
  from matplotlib.patches import Patch
  handles = [Patch(facecolor=SOURCE_COLORS[k], edgecolor="#888888", linewidth=0.5,
                   label=f"{k} {counts[k]:,} ({100 * counts[k] / max(size, 1):.1f}%)")
             for k in S.SOURCES if counts[k]]
  legend = ax.legend(handles=handles, loc=loc, bbox_to_anchor=anchor, fontsize=8, frameon=False,
                     title="elements", title_fontsize=8, alignment="left")
  if notes:
    legend.set_title("elements\n" + "\n".join(_wrap(n, 38) for n in notes[:4]))


def _wrap(text: str, width: int) -> str:
  words, lines, line = str(text).split(), [], ""
  for w in words:
    if line and len(line) + 1 + len(w) > width:
      lines.append(line)
      line = w
    else:
      line = f"{line} {w}".strip()
  return "\n".join(lines + [line])


def _colormap():
  from matplotlib.colors import ListedColormap
  return ListedColormap([SOURCE_COLORS[k] for k in S.SOURCES])


def _reduction_note(leaf: Any, shown: Sequence[int]) -> str:
  reduced = [a for a in range(len(leaf.shape)) if a not in shown]
  if not reduced:
    return ""
  dims = "×".join(str(leaf.shape[a]) for a in reduced)
  n = math.prod(leaf.shape[a] for a in reduced)
  names = ", ".join(str(a) for a in reduced)
  z = S.zero_mask(leaf)
  same = all(not S.axis_states(leaf, a).any() and (z is None or z.shape[a] == 1) for a in reduced)
  if same:
    return f"axis {names} ({dims}) not shown: unchanged, every slice looks the same"
  return f"axis {names} ({dims}) reduced: a cell shows the highest class among its {n:,} elements"


def _axis_title(leaf: Any, axis: int, bins: np.ndarray | None) -> str:
  how = str(leaf.how[axis]) if leaf.how else ("new leaf" if leaf.old_path is None else "")
  old = "" if leaf.old_shape is None else f" (was {leaf.old_shape[axis]})"
  step = int(bins[1] - bins[0]) if bins is not None and len(bins) > 1 else 1
  cells = f"\n{step} indices per cell" if step > 1 else ""
  return f"axis {axis}: {leaf.shape[axis]}{old}" + (f"\n{_wrap(how, 30)}" if how else "") + cells


def show_surgery(surgery: Any, path: str | None = None, *, axes: Sequence[int] | None = None, ax: Any = None,
                 max_cells: int = 400, max_labels: int = 40, **overview: Any) -> Picture:
  """A picture of one new leaf, each element coloured by where its value comes from.

  Colours: copied (grey), moved (blue), recipe (purple: rescaled, mean-filled,
  noised or folded), fresh (orange: keeps its init), zeroed (black); the legend
  gives exact counts. Axes aligned by feature (or output) name are labelled with
  the names, moved indices with their old index (``"mana ←1"``). A leaf of rank
  above 2 shows the two axes that changed most; the title says how the other
  axes are reduced (a cell shows the highest class among its elements). Long axes
  are cut into at most ``max_cells`` cells, each again showing its highest class,
  so a single fresh row stays visible.

  Args:
    surgery: a ``Surgery`` (from ``js.plan``) or its ``Report`` (no names then).
    path: a new parameter path; ``None`` draws :func:`show_overview`.
    axes: the (one or two) axes to show, rows first.
    ax: a matplotlib ``Axes`` to draw into (default: a new figure).
    max_cells: at most this many cells per shown axis.
    max_labels: label every index of an axis up to this length, else the runs.
    **overview: passed to :func:`show_overview` when ``path`` is None.

  Returns:
    A :class:`Picture` (``info``: ``counts``, ``axes``, ``grid``).

  Raises:
    UnknownNameError: ``path`` is not a new leaf (the message names the closest ones).
    ImportError: matplotlib is missing (the message names the ``viz`` extra).

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> from jaxsurgery._src.display_viz import show_surgery
    >>> fn = lambda p, x: x @ p["w"]
    >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"]))
    >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["a", "new", "b"]))
    >>> picture = show_surgery(js.plan(old, new), "w")
    >>> picture.info["counts"], picture.info["row_labels"]
    ({'copied': 3, 'moved': 3, 'recipe': 0, 'fresh': 0, 'zeroed': 3}, ['a', 'new', 'b ←1'])
  """
  if path is None:
    return show_overview(surgery, **overview)
  Figure = _matplotlib()
  report, old_table, new_table = _report_and_tables(surgery)
  leaf = _leaf(report, path)
  shown = S.shown_axes(leaf, axes)
  bins = [S.bin_starts(leaf.shape[a], max_cells) for a in shown]
  grid = S.source_grid(leaf, shown, bins)
  grid2 = grid.reshape((1,) * (2 - grid.ndim) + grid.shape)
  if ax is None:
    ax = _leaf_axes(Figure, leaf, shown)
  counts = S.source_counts(leaf)
  _draw_leaf(ax, leaf, grid2, shown, bins, new_table, max_labels)
  title = _leaf_title(leaf)
  note = _reduction_note(leaf, shown)
  ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9, loc="left")
  _legend(ax, counts, math.prod(leaf.shape), tuple(getattr(leaf, "notes", ())) + _dropped_notes(leaf, old_table))
  info = {"title": title, "counts": counts, "axes": shown, "grid": grid, "note": note,
          "row_labels": [t.get_text() for t in ax.get_yticklabels()],
          "col_labels": [t.get_text() for t in ax.get_xticklabels()]}
  return Picture(ax.figure, info)


def _leaf_axes(Figure, leaf, shown):
  """A new figure sized to the leaf's shown aspect (clipped), with room for the legend."""
  rows = leaf.shape[shown[0]] if len(shown) == 2 else 1
  cols = leaf.shape[shown[-1]] if shown else 1
  height = float(np.clip(4.2 * rows / max(cols, 1), 1.8, 5.5))
  fig = Figure(figsize=(7.5, height + 1.9), dpi=100)
  return fig.add_axes((0.16, 1.3 / (height + 1.9), 0.55, height / (height + 1.9)))


def _leaf_title(leaf) -> str:
  if leaf.old_path is None:
    return f"{leaf.path} {fmt_shape(leaf.shape)}: a new leaf (no old counterpart)"
  old = f"{leaf.old_path} {fmt_shape(leaf.old_shape)}" if leaf.old_path != leaf.path else fmt_shape(leaf.old_shape)
  return f"{leaf.path} {fmt_shape(leaf.shape)} ← {old}"


def _dropped_notes(leaf, old_table) -> tuple[str, ...]:
  """Old indices no new index takes, per axis (named by the old table where they are features)."""
  if leaf.old_path is None or leaf.old_shape is None:
    return ()
  out = []
  for a, m in enumerate(leaf.maps):
    if m is None:
      continue
    gone = np.setdiff1d(np.arange(leaf.old_shape[a]), np.asarray(m)[np.asarray(m) >= 0])
    if not len(gone):
      continue
    names = None
    if old_table is not None and leaf.old_path in old_table.shapes:
      names = S.axis_feature_names(old_table, leaf.old_path, a)
    shown = [f"{i} ({names[i]})" if names is not None and names[i] else str(i) for i in gone[:6]]
    more = f" … {len(gone) - 6} more" if len(gone) > 6 else ""
    out.append(f"old axis {a} dropped: {', '.join(shown)}{more}")
  return tuple(out)


def _draw_leaf(ax, leaf, grid2, shown, bins, table, max_labels) -> None:
  rows, cols = grid2.shape
  row_axis, col_axis = shown if len(shown) == 2 else (None, shown[0] if shown else None)
  row_bins, col_bins = bins if len(shown) == 2 else (None, bins[0] if bins else None)
  n_rows = 1 if row_axis is None else leaf.shape[row_axis]
  n_cols = 1 if col_axis is None else leaf.shape[col_axis]
  ax.imshow(grid2, cmap=_colormap(), vmin=-0.5, vmax=4.5, interpolation="nearest", aspect="auto",
            extent=(-0.5, n_cols - 0.5, n_rows - 0.5, -0.5))
  if rows <= 60 and cols <= 60 and (rows == n_rows and cols == n_cols):   # one cell per element: outline them
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
  for axis, setter, label, n_bins in ((col_axis, ax.set_xticks, ax.set_xlabel, col_bins),
                                      (row_axis, ax.set_yticks, ax.set_ylabel, row_bins)):
    if axis is None:
      setter([])
      continue
    ticks, labels = axis_ticks(leaf, axis, axis_names(leaf, table, axis), max_labels)
    setter(ticks, labels, fontsize=7 if len(ticks) > 12 else 8)
    label(_axis_title(leaf, axis, n_bins), fontsize=8)
  if col_axis is not None and any(len(t.get_text()) > 3 for t in ax.get_xticklabels()):
    for t in ax.get_xticklabels():
      t.set_rotation(90)


# -- every leaf ---------------------------------------------------------------------------------

def squarify(weights: Sequence[float], x: float, y: float, w: float, h: float) -> list[tuple[float, ...]]:
  """Squarified treemap (Bruls, Huizing & van Wijk, 2000): one (x, y, w, h) per weight, areas proportional.

  Args:
    weights: positive weights, best sorted in decreasing order.
    x: left of the rectangle to fill.
    y: top.
    w: width.
    h: height.

  Returns:
    The rectangles, in the order of ``weights``.
  """
  total = float(sum(weights))
  areas = [wt * w * h / total for wt in weights] if total > 0 else [0.0] * len(weights)
  out: list[tuple[float, ...]] = []
  i = 0
  while i < len(areas):
    side = min(w, h)
    row = [areas[i]]
    while i + len(row) < len(areas) and _worst(row + [areas[i + len(row)]], side) <= _worst(row, side):
      row.append(areas[i + len(row)])
    s = sum(row)
    if w >= h:  # a column on the left
      cw = s / h if h else 0.0
      yy = y
      for a in row:
        out.append((x, yy, cw, a / cw if cw else 0.0))
        yy += a / cw if cw else 0.0
      x, w = x + cw, w - cw
    else:       # a row on top
      rh = s / w if w else 0.0
      xx = x
      for a in row:
        out.append((xx, y, a / rh if rh else 0.0, rh))
        xx += a / rh if rh else 0.0
      y, h = y + rh, h - rh
    i += len(row)
  return out


def _worst(row: list[float], side: float) -> float:
  s = sum(row)
  if s <= 0 or side <= 0 or min(row) <= 0:
    return math.inf
  return max(side * side * max(row) / (s * s), s * s / (side * side * min(row)))


_AREA = {"sqrt": math.sqrt, "linear": float, "log": lambda n: math.log10(n + 1.0)}
_AREA_WORDS = {"sqrt": "area ∝ √parameters", "linear": "area ∝ parameters", "log": "area ∝ log parameters"}


def _leaf_tile(leaf: Any, w: int, h: int) -> np.ndarray:
  """The leaf's classes resampled to a ``h`` x ``w`` pixel tile (rows: its first shown axis)."""
  shown = S.shown_axes(leaf)
  px = (h, w) if len(shown) == 2 else (w,)
  bins = [S.bin_starts(leaf.shape[a], p) for a, p in zip(shown, px)]
  g = S.source_grid(leaf, shown, bins)
  g = g.reshape((1,) * (2 - g.ndim) + g.shape)
  ri = np.arange(h) * g.shape[0] // max(h, 1)
  ci = np.arange(w) * g.shape[1] // max(w, 1)
  return g[np.ix_(ri, ci)]


def _shorten(path: str, chars: int) -> str:
  """``path`` in at most ``chars`` characters: ``…/`` and its last components, else its last characters."""
  if len(path) <= chars:
    return path
  parts = path.split("/")
  for k in range(len(parts) - 1, 0, -1):   # the longest tail of whole components that fits
    short = "…/" + "/".join(parts[-k:])
    if len(short) <= chars:
      return short
  return "…" + path[-(chars - 1):]


def _tile_label(leaf: Any, w: float, h: float) -> str | None:
  if w < 46 or h < 12:
    return None
  chars = max(4, int((w - 6) / 6.2))
  p = _shorten(leaf.path, chars)
  return p + (f"\n{fmt_shape(leaf.shape)}" if h >= 26 else "")


def show_overview(surgery: Any, *, area: str = "sqrt", width: float = 10.0, height: float | None = None,
                  dpi: int = 100) -> Picture:
  """Every leaf of a plan at once: a treemap of small multiples, each coloured like :func:`show_surgery`.

  Tiles are laid out largest first, their areas growing with the leaf's parameter
  count (``area="sqrt"`` by default, so a bias stays visible next to a 75M kernel;
  ``"linear"`` or ``"log"``). A tile shows the leaf's two most changed axes (rows:
  the first), each pixel its highest class. A bar on top gives the exact totals;
  leaves that change but whose tiles are too small to label are listed below.
  The work is per axis, not per element, so a 150M-parameter plan draws in well
  under a second.

  Args:
    surgery: a ``Surgery`` or its ``Report``.
    area: how tile areas follow the parameter count: ``"sqrt"``, ``"linear"`` or ``"log"``.
    width: figure width in inches.
    height: figure height in inches (default: 0.66 of the width).
    dpi: pixels per inch (tiles are computed at this resolution).

  Returns:
    A :class:`Picture` (``info``: ``counts`` (totals), ``tiles`` ``{path: (x, y, w, h)}`` in pixels,
    ``small_changed``: the changed leaves without a label).

  Raises:
    ValueError: an unknown ``area``.

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> from jaxsurgery._src.display_viz import show_overview
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
    >>> params = lambda n, h: {"w": jnp.ones((n, h)), "v": jnp.ones((h, 2))}
    >>> old = js.dependency_table(fn, params(2, 4), jnp.ones((1, 2)), js.Features(["a", "b"]))
    >>> new = js.dependency_table(fn, params(3, 6), jnp.ones((1, 3)), js.Features(["a", "new", "b"]))
    >>> picture = show_overview(js.plan(old, new))
    >>> sorted(picture.info["tiles"]), picture.info["counts"]["moved"]
    (['v', 'w'], 4)
  """
  Figure = _matplotlib()
  if area not in _AREA:
    raise ValueError(f"`area` must be one of {list(_AREA)}, got {area!r}.")
  report, _, _ = _report_and_tables(surgery)
  height = height or 0.66 * width
  fig = Figure(figsize=(width, height), dpi=dpi)
  map_box = (0.01, 0.12, 0.98, 0.72)
  ax = fig.add_axes(map_box)
  W, H = int(width * dpi * map_box[2]), int(height * dpi * map_box[3])
  leaves = sorted(report.leaves, key=lambda l: -math.prod(l.shape))
  rects = squarify([max(_AREA[area](math.prod(l.shape)), 1e-9) for l in leaves], 0, 0, W, H)
  canvas, tiles = _paint_tiles(leaves, rects, W, H)
  palette = np.array([_rgb(SOURCE_COLORS[k]) for k in S.SOURCES] + [_rgb(_BACKGROUND)], np.uint8)
  ax.imshow(palette[canvas], interpolation="nearest", extent=(0, W, H, 0))
  ax.set_axis_off()
  small = []
  for leaf, (x, y, w, h) in zip(leaves, rects):
    label = _tile_label(leaf, w, h)
    if label:
      ax.text(x + 3, y + 3, label, fontsize=6.5, va="top", ha="left", color="#111111", clip_on=True,
              bbox=dict(boxstyle="square,pad=0.15", facecolor="white", alpha=0.75, linewidth=0))
    elif _changes(leaf):
      small.append(leaf)
  totals = dict.fromkeys(S.SOURCES, 0)
  for leaf in leaves:
    for k, v in S.source_counts(leaf).items():
      totals[k] += v
  _header(fig, report, leaves, totals, area)
  _small_list(fig, small)
  return Picture(fig, {"title": "surgery overview", "counts": totals, "tiles": tiles, "area": area,
                       "small_changed": [l.path for l in small]})


def _paint_tiles(leaves, rects, W: int, H: int):
  """The canvas of class codes (-1: background) and each leaf's tile in pixels."""
  canvas = np.full((H, W), -1, np.int8)
  tiles = {}
  for leaf, (x, y, w, h) in zip(leaves, rects):
    x0, y0, x1, y1 = int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h))
    tiles[leaf.path] = (x0, y0, x1 - x0, y1 - y0)
    if x1 - x0 >= 2 and y1 - y0 >= 2:   # a 1 px gap separates the tiles
      canvas[y0:y1 - 1, x0:x1 - 1] = _leaf_tile(leaf, x1 - x0 - 1, y1 - y0 - 1)
    elif x1 > x0 and y1 > y0:
      canvas[y0:y1, x0:x1] = S.source_grid(leaf, (), []).max()
  return canvas, tiles


def _changes(leaf) -> bool:
  return S.source_counts(leaf)["copied"] != math.prod(leaf.shape)


def _header(fig, report, leaves, totals, area) -> None:
  from matplotlib.patches import Patch
  size = sum(totals.values())
  status = {True: "function preserved", False: "function NOT preserved",
            None: "preservation not proven statically"}.get(report.preserved, "")
  title = f"{len(leaves):,} new leaves, {size:,} parameters · {status} · tiles: {_AREA_WORDS[area]}"
  if report.dropped_leaves:
    gone = ", ".join(p for p, _ in report.dropped_leaves[:4]) + (" …" if len(report.dropped_leaves) > 4 else "")
    title += f"\n{len(report.dropped_leaves)} old leaves dropped (no counterpart): {gone}"
  fig.text(0.01, 0.99, title, fontsize=9, ha="left", va="top")
  handles = [Patch(facecolor=SOURCE_COLORS[k], edgecolor="#888888", linewidth=0.5,
                   label=f"{k} {_human(totals[k])} ({100 * totals[k] / max(size, 1):.1f}%)")
             for k in S.SOURCES if totals[k]]
  fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.005, 0.935), ncol=max(len(handles), 1),
             fontsize=8, frameon=False, handlelength=1.2, columnspacing=1.2)
  bar = fig.add_axes((0.01, 0.855, 0.98, 0.018))
  left = 0.0
  for k in S.SOURCES:
    if totals[k]:
      bar.barh(0, totals[k] / max(size, 1), left=left, height=1, color=SOURCE_COLORS[k])
      left += totals[k] / max(size, 1)
  bar.set_xlim(0, 1)
  bar.set_ylim(-0.5, 0.5)
  bar.set_axis_off()


def _small_list(fig, small, limit: int = 8) -> None:
  if not small:
    return
  items = []
  for leaf in small[:limit]:
    c = S.source_counts(leaf)
    what = ", ".join(f"{v:,} {k}" for k, v in c.items() if v and k != "copied")
    items.append(f"{leaf.path} {fmt_shape(leaf.shape)}: {what}")
  if len(small) > limit:
    items.append(f"… {len(small) - limit} more")
  half = -(-len(items) // 2)
  fig.text(0.01, 0.105, "changed leaves too small to label:", fontsize=7.5, ha="left", va="top", weight="bold")
  for col, chunk in enumerate((items[:half], items[half:])):
    fig.text(0.01 + 0.49 * col, 0.08, "\n".join(chunk), fontsize=7, ha="left", va="top", family="monospace")


def _human(n: int) -> str:
  for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= div:
      return f"{n / div:.1f}{unit}"
  return f"{n:,}"


def _rgb(color: str) -> tuple[int, int, int]:
  c = color.lstrip("#")
  return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


# -- tables ------------------------------------------------------------------------------------

#: Heatmap codes of :func:`show_table`: no touch, touch (in both tables), table only, probe only.
_NONE, _BOTH, _TABLE_ONLY, _PROBE_ONLY = 0, 1, 2, 3
TABLE_COLORS = ("#ffffff", "#1b7f79", "#9fd6cf", "#d62728")
_MAX_ELEMENT_ROWS = 1 << 21


def _packed_of(table: Any, path: str):
  if path in table.shapes:
    return table.packed.get(path), tuple(table.shapes[path]), "parameter"
  if path in getattr(table, "output_shapes", {}):
    return table.output_packed.get(path), tuple(table.output_shapes[path]), "output"
  raise unknown_path(path, list(table.paths) + list(getattr(table, "output_paths", ())),
                     "parameter or output leaf")


def _rows(packed, shape, n_features: int, axis: int | None) -> np.ndarray:
  """Bool ``(rows, features)``: per index along ``axis`` (touches ORed over the others), or per element."""
  rank = len(shape)
  if packed is None:
    n = math.prod(shape) if axis is None else shape[axis]
    return np.zeros((n, n_features), bool)
  p = packed.reshape((1,) * (rank - packed.ndim + 1) + packed.shape)
  if axis is None:
    if math.prod(shape) > _MAX_ELEMENT_ROWS:
      raise ValueError(f"a leaf of {math.prod(shape):,} elements is too large to show element by element; "
                       f"pass `axis=` to show one axis (each row ORs the touches over the others).")
    sig = np.broadcast_to(p, tuple(shape) + p.shape[-1:]).reshape(-1, p.shape[-1])
  else:
    other = tuple(b for b in range(rank) if b != axis)
    sig = np.bitwise_or.reduce(p, axis=other) if other else p
    sig = np.broadcast_to(sig, (shape[axis], sig.shape[-1]))
  bits = np.unpackbits(np.ascontiguousarray(sig).view(np.uint8), axis=-1, bitorder="little")
  return bits[:, :n_features].astype(bool)


def _auto_axis(packed, shape) -> int | None:
  """The axis whose indices differ most in their touches (the one carrying features)."""
  if len(shape) <= 1 or packed is None:
    return 0 if len(shape) == 1 else None
  p = packed.reshape((1,) * (len(shape) - packed.ndim + 1) + packed.shape)
  def distinct(a):
    other = tuple(b for b in range(len(shape)) if b != a)
    sig = np.bitwise_or.reduce(p, axis=other)
    return len(np.unique(sig, axis=0)) if sig.shape[0] > 1 else 1
  return max(range(len(shape)), key=lambda a: (distinct(a), -a))


def _row_of(index: Sequence[int], shape, axis: int | None) -> int:
  return int(np.ravel_multi_index(tuple(index), shape)) if axis is None else int(index[axis])


def show_table(table: Any, path: str, *, axis: int | str | None = "auto", probe: Any = None, check: Any = None,
               ax: Any = None, max_rows: int = 400, max_labels: int = 40) -> Picture:
  """A heatmap of which features touch a leaf (rows: indices of one axis, or elements; columns: features).

  With ``probe`` (a gradient table of the same model) each cell compares the two
  tables: in both, table only (the boolean over-approximation) or probe only. With
  ``check`` (``js.cross_check(table, probe)``) its missed entries (red ×) and its
  legitimate differences (○) are marked on the same cells. Once outputs have names
  (``table.reach``), a second panel shows which outputs each row reaches.

  Args:
    table: a ``FeatureTable``.
    path: a parameter path (or an output path: its forward mask).
    axis: ``"auto"`` (the axis along which the touches vary most), an axis (each
      row ORs the touches over the other axes), or ``None`` (one row per element,
      for leaves up to 2M elements).
    probe: a ``FeatureTable`` from ``js.gradient_table`` to compare with.
    check: a ``CrossCheck`` whose entries on this leaf are marked.
    ax: a matplotlib ``Axes`` to draw into.
    max_rows: at most this many rows (longer axes are cut into bins, each showing
      the strongest code in it: probe only > table only > both > none).
    max_labels: label every row up to this many rows.

  Returns:
    A :class:`Picture` (``info``: ``grid``, ``axis``, ``features``, ``marks``).

  Raises:
    UnknownNameError: ``path`` names no leaf (the closest ones are listed).

  Example:
    >>> import jax.numpy as jnp, jaxsurgery as js
    >>> from jaxsurgery._src.display_viz import show_table
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> table = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["a", "b"]))
    >>> picture = show_table(table, "w")
    >>> picture.info["axis"], picture.info["grid"].tolist()    # kernel row i: feature i
    (0, [[1, 0], [0, 1]])
  """
  Figure = _matplotlib()
  packed, shape, what = _packed_of(table, path)
  axis = _auto_axis(packed, shape) if axis == "auto" else axis
  if axis is not None and not (isinstance(axis, int) and -len(shape) <= axis < len(shape)):
    raise ValueError(f"`axis` must be 'auto', None or an axis of {path!r} {shape}, got {axis!r}.")
  axis = None if axis is None else axis % len(shape)
  rows = _rows(packed, shape, table.num_features, axis)
  codes = rows.astype(np.int8)
  if probe is not None:
    ppacked, pshape, _ = _packed_of(probe, path)
    prows = _rows(ppacked, pshape, probe.num_features, axis)
    codes = np.where(rows & prows, _BOTH, np.where(rows, _TABLE_ONLY, np.where(prows, _PROBE_ONLY, _NONE)))
  starts = S.bin_starts(len(codes), max_rows)
  grid = np.maximum.reduceat(codes, starts, axis=0).astype(np.int8) if len(codes) else codes
  marks = _check_marks(check, path, shape, axis, table.features)
  reach = _reach_rows(table, path, shape, axis) if what == "parameter" else None
  if ax is None:
    n_panels = 2 if reach is not None else 1
    fig = Figure(figsize=(min(3.2 + 0.22 * table.num_features, 11) + 2.6 * (n_panels - 1),
                          float(np.clip(0.14 * len(grid), 2.0, 7.0)) + 1.6), dpi=100)
    ax = fig.add_axes((0.2, 0.28, 0.55 if n_panels == 1 else 0.45, 0.6))
  _draw_table(ax, grid, starts, len(codes), table.features, marks, probe is not None)
  _row_labels(ax, table, path, shape, axis, len(codes), max_labels, what)
  title = f"{path} {fmt_shape(shape)}: {what} touches" + (" vs the gradient probe" if probe is not None else "")
  ax.set_title(title + "\n" + _rows_note(shape, axis, starts), fontsize=9, loc="left")
  if reach is not None:
    _draw_reach(ax, reach[0], reach[1], len(codes), starts)
  info = {"title": title, "grid": grid, "axis": axis, "features": tuple(table.features), "marks": marks,
          "reach": None if reach is None else reach[1]}
  return Picture(ax.figure, info)


def _rows_note(shape, axis, starts) -> str:
  step = int(starts[1] - starts[0]) if len(starts) > 1 else 1
  per = f"; {step} per row" if step > 1 else ""
  if axis is None:
    return f"rows: the {math.prod(shape):,} elements in row-major order{per}"
  others = [b for b in range(len(shape)) if b != axis]
  over = f" (touches ORed over axis {', '.join(map(str, others))})" if others else ""
  return f"rows: indices along axis {axis}{over}{per}"


def _check_marks(check: Any, path: str, shape, axis, features) -> dict[str, list[tuple[int, int]]]:
  """(row, feature index) of the cross-check's missed entries and legitimate differences on this leaf."""
  if check is None:
    return {}
  index = {f: i for i, f in enumerate(features)}
  out: dict[str, list[tuple[int, int]]] = {"missed": [], "legitimate": []}
  for kind, entries in (("missed", list(check.missed) + list(check.output_missed)), ("legitimate", check.legitimate)):
    for e in entries:
      if e.path == path and e.feature in index and len(e.index) == len(shape):
        out[kind].append((_row_of(e.index, shape, axis), index[e.feature]))
  return {k: sorted(set(v)) for k, v in out.items()}


def _draw_table(ax, grid, starts, n_rows, features, marks, compared) -> None:
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch
  ax.imshow(grid, cmap=ListedColormap(TABLE_COLORS), vmin=-0.5, vmax=3.5, interpolation="nearest",
            aspect="auto", extent=(-0.5, len(features) - 0.5, n_rows - 0.5, -0.5))
  labels = [_short(f) for f in features]
  step = max(1, -(-len(labels) // 60))
  ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=7 if len(labels) > 16 else 8)
  ax.set_xlabel("features", fontsize=8)
  if grid.shape[0] <= 80 and len(features) <= 80:
    ax.set_xticks(np.arange(-0.5, len(features), 1), minor=True)
    if len(starts) == n_rows:
      ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
  handles = [Patch(facecolor=TABLE_COLORS[_BOTH], label="in both tables" if compared else "touches")]
  if compared:
    handles += [Patch(facecolor=TABLE_COLORS[_TABLE_ONLY], label="table only (over-approximation)"),
                Patch(facecolor=TABLE_COLORS[_PROBE_ONLY], label="probe only")]
  for kind, style in (("missed", dict(marker="x", color="#d62728", s=28, linewidths=1.4)),
                      ("legitimate", dict(marker="o", facecolors="none", edgecolors="#111111", s=22,
                                          linewidths=0.9))):
    pts = marks.get(kind, [])
    if pts:
      r, c = np.array(pts).T
      handle = ax.scatter(c, r, label=f"{kind} ({len(pts):,})", **style)
      handles.append(handle)
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _row_labels(ax, table, path, shape, axis, n_rows, max_labels, what) -> None:
  if axis is None:
    idx = range(n_rows) if n_rows <= max_labels else np.linspace(0, n_rows - 1, max_labels // 2).astype(int)
    ax.set_yticks(list(idx), [str(tuple(int(i) for i in np.unravel_index(int(k), shape))) for k in idx],
                  fontsize=7)
    ax.set_ylabel("element", fontsize=8)
    return
  names = S.axis_feature_names(table, path, axis) if what == "parameter" else None
  idx = range(n_rows) if n_rows <= max_labels else np.linspace(0, n_rows - 1, max_labels // 2).astype(int)
  labels = [_short(n) if (n := None if names is None else names[i]) is not None else str(i) for i in idx]
  ax.set_yticks(list(idx), labels, fontsize=7 if len(labels) > 12 else 8)
  ax.set_ylabel(f"axis {axis} ({shape[axis]})", fontsize=8)


def _reach_rows(table, path, shape, axis):
  """(rows x outputs bool, output names) for the reach panel, or None."""
  found = _reach(table, path)
  if found is None:
    return None
  r, names = found
  if axis is None:
    return r.reshape(-1, r.shape[-1]), names
  other = tuple(b for b in range(len(shape)) if b != axis)
  return (np.asarray(r.any(axis=other)) if other else r), names


def _draw_reach(ax, rows, names, n_rows, starts) -> None:
  from matplotlib.colors import ListedColormap
  fig = ax.figure
  box = ax.get_position()
  rax = fig.add_axes((box.x1 + 0.17, box.y0, min(0.25, 0.02 * len(names) + 0.05), box.height))
  grid = np.maximum.reduceat(rows.astype(np.int8), starts, axis=0)
  rax.imshow(grid, cmap=ListedColormap(["#ffffff", "#6a51a3"]), vmin=0, vmax=1, interpolation="nearest",
             aspect="auto", extent=(-0.5, len(names) - 0.5, n_rows - 0.5, -0.5))
  step = max(1, -(-len(names) // 40))
  rax.set_xticks(range(0, len(names), step), list(names)[::step], rotation=90, fontsize=7)
  rax.set_yticks([])
  rax.set_title("reaches outputs", fontsize=8, loc="left")
