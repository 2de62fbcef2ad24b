"""HTML views of tables, surgery reports and cross-checks (notebooks): content, escaping, row caps."""

from __future__ import annotations

from html.parser import HTMLParser

import jax
import jax.numpy as jnp
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
