"""HTML views of tables, surgery reports and cross-checks (notebooks): content, escaping, row caps."""

from __future__ import annotations

from html.parser import HTMLParser

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsurgery as js
from jaxsurgery._src import display

KEY = jax.random.key(0)
VOID = {"br", "hr", "img", "input", "meta", "link", "col", "wbr"}


class Parsed(HTMLParser):
  """Tag balance, visible text and every <table> as rows of cell texts."""

  def __init__(self, html: str):
    super().__init__(convert_charrefs=True)
    self.stack: list[str] = []
    self.errors: list[str] = []
    self.tags: list[str] = []
    self.text: list[str] = []
    self.tables: list[list[list[str]]] = []
    self._cell: list[str] | None = None
    self.feed(html)
    self.close()
    if self.stack:
      self.errors.append(f"unclosed {self.stack}")

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    if tag in VOID:
      return
    self.stack.append(tag)
    if tag == "table":
      self.tables.append([])
    elif tag == "tr":
      self.tables[-1].append([])
    elif tag in ("td", "th"):
      self._cell = []

  def handle_endtag(self, tag):
    if tag in VOID:
      return
    if not self.stack or self.stack[-1] != tag:
      self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
      return
    self.stack.pop()
    if tag in ("td", "th"):
      self.tables[-1][-1].append("".join(self._cell).strip())
      self._cell = None

  def handle_data(self, data):
    self.text.append(data)
    if self._cell is not None:
      self._cell.append(data)

  @property
  def visible(self) -> str:
    return "".join(self.text)


def parse(html: str) -> Parsed:
  p = Parsed(html)
  assert not p.errors, p.errors
  assert "script" not in p.tags and "style" not in p.tags
  return p


def table_with_header(p: Parsed, first: str) -> list[list[str]]:
  for t in p.tables:
    if t and t[0] and t[0][0] == first:
      return t
  raise AssertionError(f"no table with first column {first!r}: {[t[0] for t in p.tables if t]}")


def rows_by_name(t: list[list[str]]) -> dict[str, dict[str, str]]:
  header = t[0]
  return {r[0]: dict(zip(header, r)) for r in t[1:] if len(r) == len(header)}


def rand(key, shape, scale=0.5):
  return jax.random.normal(key, shape) * scale


# -- models --------------------------------------------------------------------------

def mlp(p, x):
  return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]


def mlp_params(key, nin, nh, nout=2):
  k = jax.random.split(key, 4)
  return {"l1": {"w": rand(k[0], (nin, nh)), "b": rand(k[1], (nh,))},
          "l2": {"w": rand(k[2], (nh, nout)), "b": rand(k[3], (nout,))}}


def hostile(p, x):
  return jnp.tanh(x @ p["<w>"] + p["b&c"]) @ p['v"']


HOSTILE_FEATURES = ["<b>hp</b>", "a&b", 'q"t', "<script>alert(1)</script>"]


def hostile_params(key, nin=4, nh=3):
  k = jax.random.split(key, 3)
  return {"<w>": rand(k[0], (nin, nh)), "b&c": rand(k[1], (nh,)), 'v"': rand(k[2], (nh, 2))}


def chain(n_layers):
  def fn(p, x):
    for i in range(n_layers):
      x = jnp.tanh(x @ p[f"w{i:02d}"])
    return x
  return fn


# -- escaping ------------------------------------------------------------------------

@pytest.mark.slow
def test_names_are_escaped_everywhere():
  p = hostile_params(KEY)
  x = jnp.ones((2, 4))
  spec = js.Features(HOSTILE_FEATURES)
  table = js.dependency_table(hostile, p, x, spec)
  probe = js.gradient_table(hostile, p, x, spec, key=KEY)
  new_spec = js.Features(HOSTILE_FEATURES[:2] + ["<i>new</i>"] + HOSTILE_FEATURES[2:])
  new_p = hostile_params(jax.random.key(1), nin=5)
  surgery = js.plan(table, js.dependency_table(hostile, new_p, jnp.ones((2, 5)), new_spec))
  for html in (display.table_html(table), display.cross_check_html(js.cross_check(table, probe)),
               display.report_html(surgery.report)):
    parsed = parse(html)
    for raw in ("<b>hp</b>", "<script>", "<w>", "<i>new</i>"):
      assert raw not in html
    assert "&lt;w&gt;" in html and "b&amp;c" in html
    text = parsed.visible
    assert "<w>" in text and "b&c" in text and 'v"' in text
    assert "i" not in parsed.tags
  assert "<b>hp</b>" in parse(display.table_html(table)).visible
  assert "<i>new</i>" in parse(display.report_html(surgery.report)).visible
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in display.table_html(table)


# -- FeatureTable ------------------------------------------------------------------

def test_table_html_content():
  p = mlp_params(KEY, 3, 4)
  table = js.dependency_table(mlp, p, jnp.ones((2, 3)), js.Features(["hp", "mana", "x"]))
  parsed = parse(display.table_html(table))
  rows = rows_by_name(table_with_header(parsed, "parameter"))
  assert list(rows) == list(table.paths)
  assert rows["l1/w"]["shape"] == "(3, 4)" and rows["l1/w"]["touched"] == "12/12"
  # 4 elements per feature: one kernel row each.
  assert rows["l1/w"]["features (elements)"].replace("\xa0", " ") == "hp (4), mana (4), x (4)"
  outputs = rows_by_name(table_with_header(parsed, "output"))
  assert outputs["<root>"]["depends on"] == "hp, mana, x"
  assert "boolean" in parsed.visible and "3 features" in parsed.visible


def test_table_html_outputs_list_their_own_features():
  def fn(p, x):
    return {"first": x[:, :1] @ p["u"], "rest": jnp.tanh(x[:, 1:] @ p["w"])}
  params = {"u": jnp.ones((1, 2)), "w": jnp.ones((2, 2))}
  table = js.dependency_table(fn, params, jnp.ones((2, 3)), js.Features(["hp", "mana", "x"]))
  outputs = rows_by_name(table_with_header(parse(display.table_html(table)), "output"))
  assert outputs["first"] == {"output": "first", "shape": "(2, 2)", "depends on": "hp"}
  assert outputs["rest"]["depends on"] == "mana, x"


def test_table_html_caps_rows_and_features():
  n_layers, n_features = 30, 40
  names = [f"f{i}" for i in range(n_features)]
  params = {f"w{i:02d}": jnp.ones((n_features, n_features)) for i in range(n_layers)}
  table = js.dependency_table(chain(n_layers), params, jnp.ones((1, n_features)), js.Features(names))
  parsed = parse(display.table_html(table, max_rows=5, max_features=3))
  t = table_with_header(parsed, "parameter")
  assert [r[0] for r in t[1:6]] == [f"w{i:02d}" for i in range(5)]
  assert len(t) == 1 + 5 + 1 and t[-1] == ["… 25 more parameter leaves"]
  assert t[1][3].endswith("… 37 more")                           # features per row
  assert "… 16 more" in parsed.visible                           # header feature list (24 shown)
  # Without a cap every leaf is listed.
  assert len(table_with_header(parse(display.table_html(table, max_rows=100)), "parameter")) == 1 + n_layers


def test_table_html_unknown_primitives_warning():
  import dataclasses
  table = js.dependency_table(mlp, mlp_params(KEY, 3, 4), jnp.ones((2, 3)), js.Features(["a", "b", "c"]))
  assert "unknown primitives" not in display.table_html(table)
  flagged = dataclasses.replace(table, unknown_primitives=("my<prim>",))
  parsed = parse(display.table_html(flagged))
  assert "unknown primitives: my<prim>" in parsed.visible


# -- Report ------------------------------------------------------------------------

def plan_mlp(old_names, new_names, old_h=4, new_h=4, **kw):
  old_p, new_p = mlp_params(KEY, len(old_names), old_h), mlp_params(jax.random.key(1), len(new_names), new_h)
  old_t = js.dependency_table(mlp, old_p, jnp.ones((2, len(old_names))), js.Features(old_names))
  new_t = js.dependency_table(mlp, new_p, jnp.ones((2, len(new_names))), js.Features(new_names))
  return js.plan(old_t, new_t, **kw)


def test_report_html_reflects_counts():
  surgery = plan_mlp(["a", "b", "c"], ["c", "new", "a", "b"], old_h=4, new_h=6)
  report = surgery.report
  # Widening: some fresh elements keep their init ("random in"), so fresh != zeroed somewhere.
  assert any(l.counts["fresh"] != l.counts["zeroed"] for l in report.leaves)
  parsed = parse(display.report_html(report))
  rows = rows_by_name(table_with_header(parsed, "parameter"))
  assert set(rows) == {l.path for l in report.leaves}
  for leaf in report.leaves:
    row = rows[leaf.path]
    for k in ("copied", "moved", "fresh", "zeroed", "dropped"):
      assert row[k] == f"{leaf.counts[k]:,}", (leaf.path, k, row)
    assert row["matched by"] == "same path" and row["axes"] == ", ".join(leaf.how)
  assert rows["l1/w"]["zeroed"] == "6" and rows["l1/w"]["moved"] == "12" and rows["l1/w"]["fresh"] == "12"
  features = {r[0]: r[1] for r in table_with_header(parsed, "features")[1:]}
  assert features["added"] == "new" and features["removed"] == "–"
  assert set(features["moved"].split(", ")) == {"a", "b", "c"}
  t = report.totals()
  text = parsed.visible
  assert f"{t['copied']:,} copied" in text and f"{t['zeroed']:,} zeroed" in text
  assert "function preserved" in text


def test_report_html_removed_feature_dropped_leaf_and_rename():
  # Removed feature: NOT preserved, the reason is listed.
  report = plan_mlp(["a", "b", "c"], ["a", "c"]).report
  parsed = parse(display.report_html(report))
  assert "function NOT preserved" in parsed.visible
  features = {r[0]: r[1] for r in table_with_header(parsed, "features")[1:]}
  assert features["removed"] == "b"
  assert any("'b' was removed" in r for r in report.reasons)
  assert "feature 'b' was removed" in parsed.visible
  assert rows_by_name(table_with_header(parsed, "parameter"))["l1/w"]["dropped"] == "4"

  # A dropped leaf is listed with its element count.
  def two(p, x):
    return jnp.tanh(x @ p["w"]) @ p["extra"] @ p["v"]

  def one(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]
  spec = js.Features(["a", "b"])
  old_p = {"w": jnp.ones((2, 3)), "extra": jnp.ones((3, 3)), "v": jnp.ones((3, 1))}
  new_p = {"w": jnp.ones((2, 3)), "v": jnp.ones((3, 1))}
  report = js.plan(js.dependency_table(two, old_p, jnp.ones((1, 2)), spec),
                   js.dependency_table(one, new_p, jnp.ones((1, 2)), spec)).report
  parsed = parse(display.report_html(report))
  dropped = table_with_header(parsed, "old parameter")
  assert dropped[1] == ["extra", "(3, 3)", "9"]

  # Renamed feature and leaf.
  def renamed(p, x):
    return mlp({"l1": p["first"], "l2": p["l2"]}, x)
  old_p = mlp_params(KEY, 3, 4)
  new_p = {"first": mlp_params(jax.random.key(1), 3, 4)["l1"], "l2": mlp_params(KEY, 3, 4)["l2"]}
  surgery = js.plan(js.dependency_table(mlp, old_p, jnp.ones((2, 3)), js.Features(["a", "b", "c"])),
                    js.dependency_table(renamed, new_p, jnp.ones((2, 3)), js.Features(["a", "hp", "c"])),
                    rename={"b": "hp", "l1/w": "first/w", "l1/b": "first/b"})
  parsed = parse(display.report_html(surgery.report))
  rows = rows_by_name(table_with_header(parsed, "parameter"))
  assert rows["first/w"]["from"] == "l1/w (3, 4)" and rows["first/w"]["matched by"] == "rename"
  assert {r[0]: r[1] for r in table_with_header(parsed, "features")[1:]}["renamed"] == "b → hp"


def test_report_html_caps_leaf_rows():
  # n leaves; only the last one (hidden behind the cap) is widened.
  n = 12
  fn = lambda p, x: chain(n - 1)(p, x) @ p[f"w{n - 1:02d}"]
  spec = js.Features(["a", "b", "c"])
  params_old = {f"w{i:02d}": jnp.ones((3, 3)) for i in range(n)}
  params_new = params_old | {f"w{n - 1:02d}": jnp.ones((3, 4))}
  report = js.plan(js.dependency_table(fn, params_old, jnp.ones((1, 3)), spec),
                   js.dependency_table(fn, params_new, jnp.ones((1, 3)), spec)).report
  assert {l.path: l for l in report.leaves}[f"w{n - 1:02d}"].counts["fresh"] == 3
  t = table_with_header(parse(display.report_html(report, max_rows=4)), "parameter")
  assert [r[0] for r in t[1:5]] == ["w00", "w01", "w02", "w03"]
  assert len(t) == 1 + 4 + 1
  assert t[-1] == ["… 8 more leaves (1 of them with moved, fresh or dropped elements)"]
  t = table_with_header(parse(display.report_html(report, max_rows=50)), "parameter")
  assert len(t) == 1 + n


# -- CrossCheck ----------------------------------------------------------------------

def test_cross_check_html_ok():
  p = mlp_params(KEY, 3, 4)
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  table = js.dependency_table(mlp, p, x, spec)
  check = js.cross_check(table, js.gradient_table(mlp, p, x, spec, key=KEY))
  assert check.ok
  parsed = parse(display.cross_check_html(check))
  assert "OK" in parsed.visible and "FAILED" not in parsed.visible
  rows = rows_by_name(table_with_header(parsed, "parameter"))
  assert set(rows) == set(check.per_leaf)
  for path, a in check.per_leaf.items():
    assert rows[path]["both"] == f"{a.both:,}" and rows[path]["table-only"] == f"{a.table_only:,}"
    assert rows[path]["probe-only"] == f"{a.probe_only:,}" and rows[path]["missed"] == "0"
    assert rows[path]["live-only"] == f"{getattr(a, 'live_only', 0):,}"
    assert rows[path]["legitimate"] == f"{a.legitimate:,}"
    assert (rows[path]["exact"] == "✓") == a.exact
  assert "<root>" in rows_by_name(table_with_header(parsed, "output"))
  if check.table_only_notes:
    notes = rows_by_name(table_with_header(parsed, "leaf"))
    assert set(notes) == set(check.table_only_notes)


def test_cross_check_html_failed_lists_missed_groups_capped():
  real = js.rules.get("dot_general")

  def broken(ctx, eqn, invals):
    lhs, rhs = invals[:2]
    blind = js.Val(rhs.shape, rhs.dtype, mask=rhs.mask, pull=None, const=rhs.const)
    return real(ctx, eqn, [lhs, blind] + list(invals[2:]))

  p = mlp_params(KEY, 3, 4)
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  with js.override_rule("dot_general", broken):
    table = js.dependency_table(mlp, p, x, spec)
  check = js.cross_check(table, js.gradient_table(mlp, p, x, spec, key=KEY))
  assert not check.ok
  parsed = parse(display.cross_check_html(check))
  assert "FAILED" in parsed.visible
  assert f"{len(check.missed):,} missed parameter entries" in parsed.visible
  rows = rows_by_name(table_with_header(parsed, "parameter"))
  assert rows["l1/w"]["missed"] == f"{check.per_leaf['l1/w'].missed:,}" != "0"
  groups = [t for t in parsed.tables if t[0] == ["leaf", "entries", "elements", "features", "explanation"]]
  missed = groups[0]
  assert sum(int(r[1].replace(",", "")) for r in missed[1:] if len(r) == 5) == len(check.missed)
  assert any(r[0] == "l1/w" and "first-contact touch" in r[4] for r in missed[1:])
  capped = parse(display.cross_check_html(check, max_rows=1))
  missed = [t for t in capped.tables if t[0][0] == "leaf" and t[0][1] == "entries"][0]
  assert len(missed) == 1 + 1 + 1 and missed[-1][0].startswith("… ") and "more groups" in missed[-1][0]
  assert capped.tables[0][-1][0].startswith("… ") and "more parameter leaves" in capped.tables[0][-1][0]


# -- the text views still work -------------------------------------------------------

def test_text_views_unchanged():
  surgery = plan_mlp(["a", "b", "c"], ["c", "new", "a", "b"])
  assert display.report_text(surgery.report) == repr(surgery.report)
  assert display.report_text(surgery.report).startswith("Surgery report: function ")
  assert display.table_summary(surgery.old_table).startswith("FeatureTable[boolean]: 3 features")


# -- HTML layout (T4's browser measurements) and the new displays ----------------------------

def test_report_html_layout_hints_and_theme_colours():
  report = plan_mlp(["a", "b", "c"], ["c", "new", "a", "b"], old_h=4, new_h=6).report
  html = display.report_html(report)
  parse(html)
  assert "l1/<wbr>w" in html                                         # paths may break after "/"
  assert '<span style="white-space:nowrap">(4, 6)</span>' in html    # shapes never wrap inside
  assert "color-mix(in srgb,#1565c0 60%,currentColor)" in html       # status colours follow the theme
  assert "color:#888" not in html and "opacity:0.7" in html          # muted text: dimmed, not grey
  rows = rows_by_name(table_with_header(parse(html), "parameter"))
  assert rows["l1/w"]["from"] == "(3, 4)"                            # same path: the old shape only


def test_long_feature_names_may_break_and_counts_are_singular():
  long = "enemy_distance_to_nearest_allied_tower"
  table = js.dependency_table(mlp, mlp_params(KEY, 2, 3), jnp.ones((2, 2)), js.Features(["hp", long]))
  html = display.table_html(table)
  assert "enemy_<wbr>distance" in html and long in parse(html).visible
  assert "· 1 output</div>" in html and "1 outputs" not in html and "1 outputs" not in repr(table)


def test_dropped_leaf_is_listed_once():
  def two(p, x):
    return jnp.tanh(x @ p["w"]) @ p["extra"] @ p["v"]

  def one(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]
  spec = js.Features(["a", "b"])
  report = js.plan(js.dependency_table(two, {"w": jnp.ones((2, 3)), "extra": jnp.ones((3, 3)),
                                             "v": jnp.ones((3, 1))}, jnp.ones((1, 2)), spec),
                   js.dependency_table(one, {"w": jnp.ones((2, 3)), "v": jnp.ones((3, 1))}, jnp.ones((1, 2)),
                                       spec)).report
  assert any("'extra'" in r for r in report.reasons)
  for text in (parse(display.report_html(report)).visible, repr(report)):
    assert text.count("extra") == 1, text


def fake_report(**extra):
  """A Report-shaped object with the fields a recipe planner adds (read with getattr by the views)."""
  import types
  leaf = types.SimpleNamespace(path="ln/scale", old_path="ln/scale", shape=(6,), old_shape=(4,),
                               maps=(np.array([0, 1, 2, 3, -1, -1]),), how=("prefix",), zero=None,
                               counts={"copied": 4, "moved": 0, "fresh": 2, "zeroed": 0, "dropped": 0, "recipe": 6},
                               scale=0.8, mean_axes=(0,), notes=("old values x 0.8", "axis 0: new positions hold "
                                                                 "the mean of the old ones"))
  base = dict(leaves=(leaf,), dropped_leaves=(), added=(), removed=(), moved=(), renamed_features={},
              matching=(("ln/scale", "ln/scale", "same path"),), preserved=True, reasons=(),
              outputs_added=("<jump>",), outputs_removed=(), outputs_moved=("noop",), renamed_outputs={},
              assumptions=("ids below 10",))
  base.update(extra)
  report = types.SimpleNamespace(**base)
  report.totals = lambda: {k: sum(l.counts.get(k, 0) for l in report.leaves) for k in
                           ("copied", "moved", "fresh", "zeroed", "dropped")}
  return report


def test_report_views_show_recipes_outputs_and_assumptions():
  report = fake_report()
  parsed = parse(display.report_html(report))
  rows = rows_by_name(table_with_header(parsed, "parameter"))
  assert rows["ln/scale"]["recipe"] == "6"
  recipes = table_with_header(parsed, "parameter")  # the first table with that header is the leaf table
  assert recipes is not None
  notes = [t for t in parsed.tables if t[0] == ["parameter", "what the plan computes"]][0]
  assert notes[1] == ["ln/scale", "old values x 0.8"] and len(notes) == 3
  outputs = {r[0]: r[1] for r in table_with_header(parsed, "outputs")[1:]}
  assert outputs == {"added": "<jump>", "removed": "–", "moved": "noop"}
  assert "ids below 10" in parsed.visible and "6 computed by a recipe" in parsed.visible
  text = display.report_text(report)
  assert "outputs added: <jump>" in text and "recipe: ln/scale: old values x 0.8" in text
  assert "assumes: ids below 10" in text and text.splitlines()[1].endswith("6 computed by a recipe")


def adam_state_report():
  import optax
  surgery = plan_mlp(["a", "b"], ["a", "new", "b"], old_h=3, new_h=5)
  tx = optax.adam(1e-3)
  old_p, new_p = mlp_params(KEY, 2, 3), mlp_params(KEY, 3, 5)
  old_state = {"opt": tx.init(old_p), "<odd>": jnp.ones(2)}
  _, report = js.remap_state(surgery, old_state, {"opt": tx.init(new_p)}, return_report=True)
  return report


def test_state_report_html():
  report = adam_state_report()
  parsed = parse(display.state_report_html(report))
  subtrees = rows_by_name(table_with_header(parsed, "prefix"))
  assert set(subtrees) == {s.prefix for s in report.subtrees}
  for s in report.subtrees:
    row = subtrees[s.prefix]
    assert row["leaves"] == str(s.size) and row["remapped"] == str(s.counts["remapped"])
    assert row["elements kept"] == f"{s.elements['copied'] + s.elements['moved']:,}"
    assert row.get("role") == getattr(s, "role", None)       # a column once subtrees have roles
  left = rows_by_name(table_with_header(parsed, "old leaf"))
  assert set(left) == {p for p, *_ in report.left_behind} and "<odd>" in left      # escaped, shown literally
  assert "&lt;odd&gt;" in display.state_report_html(report)
  assert "1 old leaf left behind" in parsed.visible
  copied = rows_by_name(table_with_header(parsed, "leaf"))
  assert set(copied) >= set(report.copied)


# -- element sources: what a picture draws -----------------------------------------------------

from jaxsurgery._src import display_sources as S  # noqa: E402  (grouped with the tests that use it)


def gated(p, x):
  """A fused-gate cell (blockwise axis) feeding a rank-3 kernel."""
  g = x @ p["wi"] + p["b"]
  i, f, c, o = jnp.split(g, 4, axis=-1)
  h = jax.nn.sigmoid(i) * jnp.tanh(c) * jax.nn.sigmoid(o) + jax.nn.sigmoid(f)
  return jnp.einsum("bh,hkd->bkd", h, p["w3"]).sum(-1)


def gated_params(n, hidden):
  return {"wi": jnp.ones((n, 4 * hidden)), "b": jnp.ones((4 * hidden,)), "w3": jnp.ones((hidden, 3, 2))}


def plan_gated(old_names, new_names, old_h=4, new_h=6):
  old = js.dependency_table(gated, gated_params(len(old_names), old_h), jnp.ones((2, len(old_names))),
                            js.Features(old_names))
  new = js.dependency_table(gated, gated_params(len(new_names), new_h), jnp.ones((2, len(new_names))),
                            js.Features(new_names))
  return js.plan(old, new)


def observed_sources(surgery, old_params, new_init):
  """The class of every element, read off what the remap does to marked arrays (an oracle independent of
  the plan's fields): old values are distinct positive numbers (flat index + 1), the init distinct negative
  ones, and a second run doubles the old values. Zero in both runs: zeroed; the same nonzero value in both
  (whatever the old values): fresh; an old value, doubled in the second run: copied (same index) or moved;
  anything else depends on the old values without being one of them: a recipe."""
  mark = lambda tree, scale: jax.tree.map(
      lambda x: scale * (1.0 + np.arange(x.size, dtype=np.float32)).reshape(x.shape), tree)
  flat = lambda tree: {"/".join(str(k.key) for k in p): np.asarray(x)
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  first = flat(surgery(mark(old_params, 1), mark(new_init, -1)))
  second = flat(surgery(mark(old_params, 2), mark(new_init, -1)))
  result = {}
  for path, leaf in surgery.leaf_plans.items():
    a, b = first[path], second[path]
    cls = np.full(a.shape, S.RECIPE, np.int8)
    cls[(a == b) & (a != 0)] = S.FRESH
    cls[(a == 0) & (b == 0)] = S.ZEROED
    if leaf.old_path is not None:
      size = int(np.prod(leaf.old_shape))
      plain = (a > 0) & (b == 2 * a) & (a == np.round(a)) & (a <= size)
      src = np.stack(np.unravel_index(a[plain].astype(np.int64) - 1, leaf.old_shape), -1)
      same = (src == np.argwhere(plain)).all(-1)
      cls[plain] = np.where(same, S.COPIED, S.MOVED)
    result[path] = cls
  return result


@pytest.mark.parametrize("case", ["widen+insert", "remove+reorder", "gated", "gated-narrow"])
def test_element_sources_are_what_the_remap_does(case):
  if case.startswith("gated"):
    names = (["a", "b", "c"], ["c", "new", "a", "b"]) if case == "gated" else (["a", "b", "c"], ["b", "a"])
    hidden = (4, 6) if case == "gated" else (4, 3)
    surgery = plan_gated(*names, *hidden)
    old_p, init = gated_params(len(names[0]), hidden[0]), gated_params(len(names[1]), hidden[1])
  else:
    names = (["a", "b", "c"], ["c", "new", "a", "b"]) if case == "widen+insert" else (["a", "b", "c"], ["c", "a"])
    hidden = (4, 6) if case == "widen+insert" else (4, 4)
    surgery = plan_mlp(*names, *hidden)
    old_p, init = mlp_params(KEY, len(names[0]), hidden[0]), mlp_params(KEY, len(names[1]), hidden[1])
  observed = observed_sources(surgery, old_p, init)
  kinds = set()
  for path, leaf in surgery.leaf_plans.items():
    got = S.element_sources(leaf)
    np.testing.assert_array_equal(got, observed[path], err_msg=path)
    counts = S.source_counts(leaf)
    assert [counts[k] for k in S.SOURCES] == np.bincount(got.ravel(), minlength=5).tolist()
    c = leaf.counts
    assert (counts["copied"], counts["moved"], counts["zeroed"]) == (c["copied"], c["moved"], c["zeroed"]), path
    assert counts["fresh"] + counts["zeroed"] == c["fresh"], path
    kinds |= {k for k, v in counts.items() if v}
  assert {"copied", "moved"} <= kinds or case == "gated-narrow"
  if case in ("widen+insert", "gated"):
    assert {"fresh", "zeroed"} <= kinds


def ln_mlp(p, x):
  h = x @ p["w"] + p["b"]
  mu = h.mean(-1, keepdims=True)
  h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["g"] + p["beta"]
  return jnp.tanh(h) @ p["v"]


def ln_params(n, hidden):
  return {"w": jnp.ones((n, hidden)), "b": jnp.ones((hidden,)), "g": jnp.ones((hidden,)),
          "beta": jnp.ones((hidden,)), "v": jnp.ones((hidden, 2))}


def _plan_has(*names):
  import inspect
  return set(names) <= set(inspect.signature(js.plan).parameters)


@pytest.mark.skipif(not _plan_has("widen", "constants"), reason="the planner has no recipes yet")
@pytest.mark.parametrize("case", ["layernorm-auto", "clone", "fold"])
def test_recipe_elements_are_what_the_remap_does(case):
  spec = js.Features(["a", "b"])
  if case == "layernorm-auto":   # average expansion: mean-filled kernel columns, rescaled gains
    old_p, init = ln_params(2, 4), ln_params(2, 6)
    surgery = js.plan(js.dependency_table(ln_mlp, old_p, jnp.ones((1, 2)), spec),
                      js.dependency_table(ln_mlp, init, jnp.ones((1, 2)), spec))
  elif case == "clone":          # clones: fan-in halved, zero-sum noise between the copies
    old_p, init = mlp_params(KEY, 2, 4), mlp_params(KEY, 2, 8)
    surgery = js.plan(js.dependency_table(mlp, old_p, jnp.ones((1, 2)), spec),
                      js.dependency_table(mlp, init, jnp.ones((1, 2)), spec), widen="clone")
  else:                          # a removed constant feature folded into the bias
    old_p, init = mlp_params(KEY, 2, 4), mlp_params(KEY, 1, 4)
    surgery = js.plan(js.dependency_table(mlp, old_p, jnp.ones((1, 2)), spec),
                      js.dependency_table(mlp, init, jnp.ones((1, 1)), js.Features(["a"])), constants={"b": 0.5})
  observed = observed_sources(surgery, old_p, init)
  recipes = 0
  for path, leaf in surgery.leaf_plans.items():
    np.testing.assert_array_equal(S.element_sources(leaf), observed[path], err_msg=path)
    recipes += S.source_counts(leaf)["recipe"]
  assert recipes > 0


class FakeLeaf:
  """A LeafPlan with the recipe fields of the coming planner (scale, mean/noise axes, fold, zero_all)."""

  def __init__(self, shape, maps, zero=None, old_path="old", **recipes):
    self.path, self.old_path, self.shape, self.maps = "p", old_path, tuple(shape), tuple(maps)
    self.old_shape = None if old_path is None else tuple(
        n if m is None else int(np.max(m, initial=-1)) + 1 for n, m in zip(shape, maps))
    self.how, self.zero, self.counts = (), zero, {}
    self.__dict__.update(recipes)


def test_recipes_and_zeros_classify_elements():
  prefix = np.array([0, 1, 2, -1])               # widened: one fresh index at the end
  plain = S.element_sources(FakeLeaf((4, 2), (prefix, None)))
  assert plain[:3].tolist() == [[S.COPIED] * 2] * 3 and plain[3].tolist() == [S.FRESH] * 2
  # old values rescaled: carried elements are a recipe, fresh ones stay fresh
  scaled = S.element_sources(FakeLeaf((4, 2), (prefix, None), scale=0.5))
  assert (scaled[:3] == S.RECIPE).all() and (scaled[3] == S.FRESH).all()
  assert (S.element_sources(FakeLeaf((4, 2), (prefix, None), fold=(("c", 0, 0, 1),)))[:3] == S.RECIPE).all()
  # mean-filled new positions are a recipe, the others are copied
  mean = S.element_sources(FakeLeaf((4, 2), (prefix, None), mean_axes=(0,)))
  assert (mean[:3] == S.COPIED).all() and (mean[3] == S.RECIPE).all()
  # clones with noise: both copies of old index 1 are a recipe; without noise they are plain
  clones = np.array([0, 1, 1, 2])
  noised = S.element_sources(FakeLeaf((4,), (clones,), noise_axes=(0,), noise=0.01))
  assert noised.tolist() == [S.COPIED, S.RECIPE, S.RECIPE, S.MOVED]
  assert S.element_sources(FakeLeaf((4,), (clones,), noise_axes=(0,), noise=0.0)).tolist() == [0, 0, 1, 1]
  # zeros win over everything; a new leaf is fresh; zero_all zeroes it all
  zeroed = S.element_sources(FakeLeaf((4, 2), (prefix, None), zero=np.array([[False], [False], [False], [True]]),
                                      scale=0.5))
  assert (zeroed[3] == S.ZEROED).all() and (zeroed[:3] == S.RECIPE).all()
  assert (S.element_sources(FakeLeaf((2, 3), (), old_path=None)) == S.FRESH).all()
  assert (S.element_sources(FakeLeaf((2, 3), (), old_path=None, zero_all=True)) == S.ZEROED).all()
  assert S.element_sources(FakeLeaf((), ())).shape == ()
  with pytest.raises(ValueError, match="2 axis maps for shape"):
    S.element_sources(FakeLeaf((2, 3, 4), (None, None)))


def random_leaf(rng):
  rank = int(rng.integers(0, 4))
  shape = tuple(int(n) for n in rng.integers(1, 7, rank))
  maps = [None if rng.random() < 0.3 else rng.integers(-1, 4, n) for n in shape]
  zero = None
  if rank and rng.random() < 0.5:
    zero = rng.random(tuple(n if rng.random() < 0.5 else 1 for n in shape)) < 0.3
  recipes = {}
  if rng.random() < 0.2:
    recipes["scale"] = 0.5
  if rank and rng.random() < 0.3:
    recipes["mean_axes"] = (int(rng.integers(rank)),)
  if rank and rng.random() < 0.3:
    recipes["noise_axes"] = (int(rng.integers(rank)),)
  return FakeLeaf(shape, maps, zero, old_path=None if rng.random() < 0.1 else "old", **recipes)


def test_counts_reduced_views_and_subsamples_agree_with_the_element_array():
  import itertools
  rng = np.random.default_rng(0)
  for _ in range(300):
    leaf = random_leaf(rng)
    full = S.element_sources(leaf)
    counts = S.source_counts(leaf)
    assert [counts[k] for k in S.SOURCES] == np.bincount(full.ravel(), minlength=5).tolist()
    rank = len(leaf.shape)
    for k in range(min(rank, 2) + 1):
      for axes in itertools.permutations(range(rank), k):
        bins = [S.bin_starts(leaf.shape[a], int(rng.integers(1, 5))) for a in axes]
        other = [a for a in range(rank) if a not in axes]
        want = full.transpose(list(axes) + other).reshape([leaf.shape[a] for a in axes] + [-1]).max(-1)
        for i, starts in enumerate(bins):
          want = np.maximum.reduceat(want, starts, axis=i)
        np.testing.assert_array_equal(S.source_grid(leaf, list(axes), bins), want)
    if rank:
      index = S.strided_index(leaf.shape, 4)
      grid = [np.arange(n) if i is None else i for n, i in zip(leaf.shape, index)]
      np.testing.assert_array_equal(S.element_sources(leaf, index), full[np.ix_(*grid)])


def test_a_five_scale_leaf_is_counted_and_reduced_without_element_arrays():
  # lstm/wi of benchmarks/models.py's five() widened 4096 -> 4352: 75.8M elements.
  rows = np.concatenate([np.arange(4096), np.full(256, -1)])
  cols = np.concatenate([np.concatenate([np.arange(g * 4096, (g + 1) * 4096), np.full(256, -1)]) for g in range(4)])
  leaf = FakeLeaf((4352, 17408), (rows, cols), zero=(rows < 0)[:, None])
  counts = S.source_counts(leaf)
  assert counts == {"copied": 4096 * 4096, "moved": 3 * 4096 * 4096, "recipe": 0, "fresh": 4096 * 1024,
                    "zeroed": 256 * 17408}
  grid = S.source_grid(leaf, (0, 1), [S.bin_starts(4352, 68), S.bin_starts(17408, 68)])
  assert grid.shape == (68, 68) and grid[-1].tolist() == [S.ZEROED] * 68
  assert grid[0, 0] == S.COPIED and grid[0, 16] == S.FRESH and grid[0, 17] == S.MOVED  # 256 columns per cell
  assert [(r.start, r.state, r.old_start) for r in S.axis_runs(leaf, 1)][:3] == [(0, 0, 0), (4096, 3, -1),
                                                                                (4352, 1, 4096)]


# -- pictures (matplotlib, Agg: no window) -----------------------------------------------------

from jaxsurgery import display as jsd  # noqa: E402
from jaxsurgery._src import display_viz as viz  # noqa: E402


@pytest.fixture
def mpl():
  return pytest.importorskip("matplotlib", reason="the pictures need the viz extra")


def test_show_surgery_labels_rows_by_feature_and_old_index(mpl):
  surgery = plan_mlp(["a", "b", "c"], ["c", "new", "a", "b"], old_h=4, new_h=6)
  picture = jsd.show_surgery(surgery, "l1/w")
  info = picture.info
  assert info["axes"] == (0, 1) and info["row_labels"] == ["c ←2", "new", "a ←0", "b ←1"]
  assert info["col_labels"] == [str(i) for i in range(6)]
  np.testing.assert_array_equal(info["grid"], S.element_sources(surgery.leaf_plans["l1/w"]))
  leaf = surgery.leaf_plans["l1/w"]
  assert info["counts"]["moved"] == leaf.counts["moved"] and info["note"] == ""
  png = picture._repr_png_()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == picture.png()     # no timestamp: equal figures, equal bytes
  assert "l1/w" in repr(picture)
  # a wider hidden layer: the second kernel's rows are hidden units (no names), fresh ones last
  rows = jsd.show_surgery(surgery, "l2/w").info["row_labels"]
  assert rows == [str(i) for i in range(6)]


def test_show_surgery_of_a_rank_3_leaf_shows_the_changed_axes(mpl):
  surgery = plan_gated(["a", "b", "c"], ["c", "new", "a", "b"])
  info = jsd.show_surgery(surgery, "w3").info
  assert info["axes"][0] == 0 and "reduced" not in info["note"] and "unchanged" in info["note"]
  leaf = surgery.leaf_plans["w3"]
  want = S.element_sources(leaf).max(axis=tuple(a for a in range(3) if a not in info["axes"]))
  np.testing.assert_array_equal(info["grid"], want)
  # the fused gates: runs of moved columns are labelled with their old start
  cols = jsd.show_surgery(surgery, "wi").info["col_labels"]
  assert cols[:8] == ["0", "1", "2", "3", "4", "5", "6 ←4", "7 ←5"]
  # explicit axes, and a reduction that is not lossless
  leaf3 = FakeLeaf((3, 4, 5), (np.array([0, 1, -1]), np.array([1, 0, 2, 3]), None))
  report = fake_report(leaves=(leaf3,), matching=())
  info = jsd.show_surgery(report, "p", axes=(1, 2)).info
  assert info["axes"] == (1, 2) and "axis 0 (3) reduced" in info["note"]
  assert (info["grid"] == S.FRESH).all()      # every (axis 1, axis 2) cell has a fresh row among its 3
  with pytest.raises(ValueError, match="at most two distinct axes"):
    jsd.show_surgery(report, "p", axes=(0, 0))


def test_show_surgery_names_the_closest_paths(mpl):
  surgery = plan_mlp(["a", "b"], ["a", "b"])
  with pytest.raises(js.UnknownNameError, match=r"No new parameter leaf 'l1/kernel'.*Closest: \['l1/w'"):
    jsd.show_surgery(surgery, "l1/kernel")

  def renamed(p, x):
    return mlp({"l1": p["first"], "l2": p["l2"]}, x)
  old_p = mlp_params(KEY, 3, 4)
  new_p = {"first": old_p["l1"], "l2": old_p["l2"]}
  spec = js.Features(["a", "b", "c"])
  moved = js.plan(js.dependency_table(mlp, old_p, jnp.ones((2, 3)), spec),
                  js.dependency_table(renamed, new_p, jnp.ones((2, 3)), spec), rename={"l1/w": "first/w",
                                                                                       "l1/b": "first/b"})
  with pytest.raises(js.UnknownNameError, match="old path of new leaf 'first/w'"):
    jsd.show_surgery(moved, "l1/w")
  assert "first/w (3, 4) ← l1/w (3, 4)" in jsd.show_surgery(moved, "first/w").info["title"]


def test_show_overview_tiles_every_leaf_by_parameter_count(mpl):
  surgery = plan_gated(["a", "b", "c"], ["c", "new", "a", "b"])
  picture = jsd.show_surgery(surgery)                      # no path: the overview
  info = picture.info
  assert set(info["tiles"]) == set(surgery.leaf_plans)
  sizes = {p: int(np.prod(l.shape)) for p, l in surgery.leaf_plans.items()}
  area = {p: w * h for p, (x, y, w, h) in info["tiles"].items()}
  ratio = [area[p] / np.sqrt(sizes[p]) for p in sizes]
  assert max(ratio) / min(ratio) < 1.25                   # areas follow sqrt(parameters), up to rounding
  t = surgery.report.totals()
  assert info["counts"]["copied"] == t["copied"] and info["counts"]["moved"] == t["moved"]
  assert info["counts"]["fresh"] + info["counts"]["zeroed"] == t["fresh"]
  linear = jsd.show_overview(surgery, area="linear").info["tiles"]
  assert linear["wi"][2] * linear["wi"][3] > area["wi"]
  with pytest.raises(ValueError, match="`area` must be one of"):
    jsd.show_overview(surgery, area="cubic")


def test_overview_tiles_are_the_leaf_views(mpl):
  zero = np.array([False] * 6 + [True, False])[:, None]
  leaf = FakeLeaf((8, 4), (np.array([0, 1, 2, 3, 4, 5, -1, -1]), None), zero=zero)
  tile = viz._leaf_tile(leaf, 4, 8)
  np.testing.assert_array_equal(tile, S.element_sources(leaf))
  small = viz._leaf_tile(leaf, 2, 2)                        # 4 rows per pixel: the highest class wins
  assert small.tolist() == [[S.COPIED] * 2, [S.ZEROED] * 2]


def test_overview_lists_changed_leaves_too_small_to_label(mpl):
  big = FakeLeaf((400, 400), (None, None))
  tiny = FakeLeaf((3,), (np.array([0, 1, -1]),))
  tiny.path = "norm/mean"
  report = fake_report(leaves=(big, tiny), matching=())
  info = jsd.show_overview(report).info
  assert info["small_changed"] == ["norm/mean"] and info["counts"]["fresh"] == 1


def test_show_table_mask_probe_and_cross_check_on_one_picture(mpl):
  p = mlp_params(KEY, 3, 4)
  x, spec = jnp.ones((2, 3)), js.Features(["a", "b", "c"])
  table = js.dependency_table(mlp, p, x, spec)
  info = jsd.show_table(table, "l1/w").info
  assert info["axis"] == 0
  np.testing.assert_array_equal(info["grid"], table.mask("l1/w").any(axis=1))
  elements = jsd.show_table(table, "l1/w", axis=None).info["grid"]
  np.testing.assert_array_equal(elements, table.mask("l1/w").reshape(-1, 3))
  assert jsd.show_table(table, "<root>" if "<root>" in table.output_paths else table.output_paths[0]).info["grid"].any()

  real = js.rules.get("dot_general")

  def broken(ctx, eqn, invals):
    lhs, rhs = invals[:2]
    return real(ctx, eqn, [lhs, js.Val(rhs.shape, rhs.dtype, mask=rhs.mask, pull=None, const=rhs.const)]
                + list(invals[2:]))
  with js.override_rule("dot_general", broken):
    wrong = js.dependency_table(mlp, p, x, spec)
  probe = js.gradient_table(mlp, p, x, spec, key=KEY)
  check = js.cross_check(wrong, probe)
  info = jsd.show_table(wrong, "l1/w", axis=None, probe=probe, check=check).info
  t, g = wrong.mask("l1/w").reshape(-1, 3), probe.mask("l1/w").reshape(-1, 3)
  want = np.where(t & g, 1, np.where(t, 2, np.where(g, 3, 0)))
  np.testing.assert_array_equal(info["grid"], want)
  missed = sorted({(int(np.ravel_multi_index(m.index, (3, 4))), wrong.features.index(m.feature))
                   for m in check.missed if m.path == "l1/w"})
  assert missed and info["marks"]["missed"] == missed
  assert all(info["grid"][r, c] == 3 for r, c in missed)       # each miss sits on a probe-only cell
  with pytest.raises(js.UnknownNameError, match=r"Closest: \['l1/w'"):
    jsd.show_table(table, "l1/ww")
  with pytest.raises(ValueError, match="`axis` must be"):
    jsd.show_table(table, "l1/w", axis=5)


def test_show_table_draws_reach_once_outputs_have_names(mpl):
  import dataclasses
  table = js.dependency_table(mlp, mlp_params(KEY, 3, 4), jnp.ones((2, 3)), js.Features(["a", "b", "c"]))

  @dataclasses.dataclass(frozen=True, eq=False)
  class Named(type(table)):                 # stands in for the output-naming table (helper O's `reach`)
    output_features: tuple = ("left", "right")

    def reach(self, path):
      shape = self.shapes[path]
      out = np.zeros(shape + (2,), bool)
      out[..., 0] = True
      if path == "l2/w":
        out[..., 1] = np.arange(shape[1]) == 1
      return out
  named = Named(**{f.name: getattr(table, f.name) for f in dataclasses.fields(table)})
  info = jsd.show_table(named, "l2/w", axis=1).info
  assert info["reach"] == ("left", "right")
  assert jsd.show_table(table, "l2/w").info["reach"] is None
  # an axis aligned by output name is labelled with the output each index alone reaches
  import types
  leaf = FakeLeaf((4, 2), (None, np.array([0, 1])))
  leaf.path, leaf.how = "l2/w", ("identity", "outputs")
  surgery = types.SimpleNamespace(report=fake_report(leaves=(leaf,), matching=()), old_table=None, new_table=named)
  assert jsd.show_surgery(surgery, "l2/w").info["col_labels"] == ["left", "1"]


def test_missing_matplotlib_names_the_extra(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  surgery = plan_mlp(["a", "b"], ["a", "b"])
  with pytest.raises(ImportError, match=r"jaxsurgery\[viz\]"):
    jsd.show_surgery(surgery, "l1/w")
  assert S.element_sources(surgery.leaf_plans["l1/w"]).shape == (2, 4)    # the arrays need numpy only


def test_importing_jaxsurgery_loads_neither_matplotlib_nor_treescope():
  import subprocess
  import sys
  code = ("import sys, jaxsurgery, jaxsurgery.display; "
          "print(sorted(m for m in ('matplotlib', 'treescope') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]"


# -- treescope -----------------------------------------------------------------------------------

def test_treescope_renders_a_training_state_with_its_surgery():
  treescope = pytest.importorskip("treescope")
  surgery = plan_mlp(["a", "b"], ["a", "new", "b"], old_h=3, new_h=5)
  state_report = adam_state_report()
  registered = jsd.register_treescope()
  assert {js.FeatureTable, js.Report, js.Surgery, js.CrossCheck, js.StateReport, js.LeafPlan} <= set(registered)
  view = {"params": mlp_params(KEY, 3, 5), "surgery": surgery, "state_report": state_report}
  text = treescope.render_to_text(view)     # inside a tree, each object folds to its summary line
  assert "'surgery': Surgery(function preserved · " in text
  assert "'state_report': StateReport(" in text and "left behind" in text
  leaf = surgery.leaf_plans["l1/w"]
  alone = treescope.render_to_text(surgery)                    # at the root it opens: its attributes
  assert alone.startswith("Surgery(  # function preserved") and "report=Report(function preserved" in alone
  assert treescope.render_to_text(leaf).startswith(
      f"LeafPlan(  # {display.fmt_shape(leaf.shape)} ← {display.fmt_shape(leaf.old_shape)}: ")
  html = treescope.render_to_html(view, compressed=False)
  assert "Surgery report" in html and "StateReport" in html      # the HTML views, embedded
  assert jsd.treescope_repr(object(), None, None) is NotImplemented


def test_missing_treescope_names_the_extra(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "treescope", None)
  with pytest.raises(ImportError, match=r"jaxsurgery\[treescope\]"):
    jsd.register_treescope()


def test_surgery_and_table_show_are_the_display_pictures(mpl):
  old = js.dependency_table(mlp, mlp_params(KEY, 3, 4), jnp.ones((2, 3)), js.Features(["a", "b", "c"]))
  new = js.dependency_table(mlp, mlp_params(KEY, 4, 4), jnp.ones((2, 4)), js.Features(["a", "x", "b", "c"]))
  surgery = js.plan(old, new)
  assert repr(surgery.show("l1/w").info) == repr(jsd.show_surgery(surgery, "l1/w").info)
  assert surgery.show("l1/w").info["row_labels"][:2] == ["a", "x"]
  assert surgery.show().info.keys() == jsd.show_overview(surgery).info.keys()
  assert repr(new.show("l1/w").info) == repr(jsd.show_table(new, "l1/w").info)
  with pytest.raises(js.UnknownNameError, match="Closest"):
    surgery.show("l1/ww")
