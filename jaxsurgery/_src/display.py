"""Readable text for tables, cross-checks and surgery reports."""

from __future__ import annotations

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


def table_summary(table, max_features: int = 6) -> str:
  n_params = sum(int(np.prod(s, dtype=np.int64)) for s in table.shapes.values())
  head = (f"FeatureTable[{table.method}]: {table.num_features} features, {len(table.paths)} "
          f"parameter leaves ({n_params:,} elements), {len(table.output_paths)} outputs")
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
  lines = [f"Surgery report: function {status}",
           f"  elements: {t['copied']:,} copied, {t['moved']:,} moved, {t['fresh']:,} fresh "
           f"({t['zeroed']:,} zeroed), {t['dropped']:,} old elements dropped",
           "  features added: " + feature_list(report.added, limit=12),
           "  features removed: " + feature_list(report.removed, limit=12),
           "  features moved: " + feature_list(report.moved, limit=12)]
  if report.renamed_features:
    lines.append("  features renamed: " + ", ".join(f"{a}->{b}" for a, b in report.renamed_features.items()))
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
                 f"{c['fresh']:,}", f"{c['zeroed']:,}", f"{c['dropped']:,}"])
  lines.append(columns(rows, ["parameter", "shape", "from", "axes", "copied", "moved", "fresh", "zeroed",
                              "dropped"]))
  for p, shape in report.dropped_leaves:
    lines.append(f"  dropped leaf: {p} {fmt_shape(shape)}")
  for r in report.reasons:
    lines.append(f"  note: {r}")
  return "\n".join(lines)
