"""The notebooks in notebooks/ are valid, committed without outputs, and run top to bottom.

Every code cell of a notebook is executed in order in one namespace, the way a
kernel would run it (no jupyter/nbclient dependency): IPython magics and shell
escapes are skipped, and the value of a cell's last expression is "displayed"
(``_repr_html_`` if its class has one, else ``repr``), so the rich displays the
notebook relies on are exercised too. Per-notebook checks then assert on the
namespace the notebook left behind.
"""

from __future__ import annotations

import ast
import json
import linecache
import re
import time
import traceback
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxsurgery as js

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def load(path: Path) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def source(cell: dict) -> str:
  src = cell["source"]
  return src if isinstance(src, str) else "".join(src)


def strip_magics(src: str) -> str | None:
  """The cell without IPython magics / shell escapes (None: a cell magic, skip the whole cell)."""
  lines = src.split("\n")
  first = next((l.strip() for l in lines if l.strip()), "")
  if first.startswith("%%"):
    return None
  out = []
  for line in lines:
    stripped = line.lstrip()
    if stripped.startswith(("%", "!")):
      line = line[:len(line) - len(stripped)] + "pass  # " + stripped
    out.append(line)
  return "\n".join(out)


def display(value, shown: list) -> None:
  """What a notebook front end would do with a cell's value."""
  if value is None:
    return
  html = getattr(type(value), "_repr_html_", None)
  text = html(value) if html is not None else repr(value)
  assert isinstance(text, str) and text, f"display of {type(value).__name__} produced {text!r}"
  shown.append((value, text))


def run_notebook(path: Path) -> tuple[dict, list]:
  """Executes every code cell in order in one namespace; returns (namespace, displayed values)."""
  nb = load(path)
  ns: dict = {"__name__": "__main__"}
  shown: list = []
  n_code = 0
  for index, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    n_code += 1
    raw = source(cell)
    src = strip_magics(raw)
    if src is None or not src.strip():
      continue
    filename = f"<{path.name} code cell {n_code}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    try:
      tree = ast.parse(src, filename)
      last = None
      if tree.body and isinstance(tree.body[-1], ast.Expr) and not src.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
      exec(compile(tree, filename, "exec"), ns)
      if last is not None:
        display(eval(compile(last, filename, "eval"), ns), shown)
    except Exception as e:  # noqa: BLE001  (report which cell failed, with its source)
      pytest.fail(f"{path.name}: code cell {n_code} (cell index {index}) raised {type(e).__name__}: {e}\n"
                  f"--- cell source ---\n{raw}\n--- traceback ---\n{traceback.format_exc()}", pytrace=False)
  return ns, shown


# -- per-notebook checks ------------------------------------------------------------

def check_tour(ns: dict, shown: list) -> None:
  # (a) the tables were built from abstract shapes and displayed.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ns["old"].params))
  assert not ns["old_table"].unknown_primitives and not ns["new_table"].unknown_primitives
  kinds = {type(v) for v, _ in shown}
  assert {js.FeatureTable, js.CrossCheck, js.Report, js.Verification} <= kinds, kinds
  for v, text in shown:
    if getattr(type(v), "_repr_html_", None) is not None:
      assert "<table" in text, f"{type(v).__name__}._repr_html_ gave no table"

  # (b) the cross-check passed and found what the tour describes.
  check = ns["check"]
  assert check.ok and not check.missed and not check.output_missed
  assert check.agrees("core/kernel") and check.agrees("pi/kernel")
  # Legitimate differences are explained by a named later operation (the ReLU's max).
  assert check.legitimate and all("max" in d.explanation for d in check.legitimate)
  assert "pi/bias" in check.table_only_notes and "additive" in check.table_only_notes["pi/bias"]

  # (c) the plan: what changed, consistent counts, and the arrays agree with the report.
  report = ns["surgery"].report
  assert report.added == ("armor",) and report.removed == () and "mana" in report.moved
  assert report.preserved is not False and not report.dropped_leaves
  new_params = ns["new_params"]
  flat = {"/".join(str(k.key) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(new_params)[0]}
  sums = dict.fromkeys(("copied", "moved", "fresh", "zeroed", "dropped"), 0)
  for leaf in report.leaves:
    c = leaf.counts
    size = int(np.prod(leaf.shape))
    assert c["copied"] + c["moved"] + c["fresh"] == size, (leaf.path, c)
    assert 0 <= c["zeroed"] <= c["fresh"] and c["dropped"] == 0, (leaf.path, c)
    assert np.count_nonzero(flat[leaf.path] == 0) >= c["zeroed"], leaf.path
    for k in sums:
      sums[k] += c[k]
  assert report.totals() == sums
  leaves = {l.path: l for l in report.leaves}
  assert leaves["torso/kernel"].counts["moved"] > 0 and leaves["core/kernel"].counts["zeroed"] == 16 * 48
  k_old = np.asarray(ns["trained"]["torso"]["kernel"])
  k_new = flat["torso/kernel"]
  np.testing.assert_array_equal(k_new[2, :32], k_old[1])        # mana moved with its feature
  np.testing.assert_array_equal(k_new[1], 0)                    # armor: zero in
  np.testing.assert_array_equal(flat["core/kernel"][32:], 0)    # new units: zero out
  assert ns["verification"].ok

  # (d) the pool and the optimizer state.
  assert jax.tree.leaves(ns["new_pool"])[0].shape[0] == len(ns["pool"]) == 6
  assert ns["pool_check"].ok
  mu = ns["new_opt_state"][0].mu
  np.testing.assert_array_equal(np.asarray(mu["torso"]["kernel"])[1], 0)


CHECKS = {"tour.ipynb": check_tour}


# -- tests ----------------------------------------------------------------------------

def test_the_tour_is_there():
  assert NOTEBOOK_DIR / "tour.ipynb" in NOTEBOOKS
  assert set(CHECKS) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_cleared(path):
  nb = load(path)
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict) and isinstance(nb["cells"], list) and nb["cells"]
  ids = []
  for i, cell in enumerate(nb["cells"]):
    where = f"{path.name} cell {i}"
    assert cell["cell_type"] in ("code", "markdown", "raw"), where
    assert isinstance(cell["metadata"], dict), where
    src = cell["source"]
    assert isinstance(src, str) or all(isinstance(s, str) for s in src), where
    if nb["nbformat_minor"] >= 5:
      assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cell["id"]), where
      ids.append(cell["id"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"{where}: outputs not cleared"
    else:
      assert "outputs" not in cell and "execution_count" not in cell, where
  assert len(ids) == len(set(ids)), "duplicate cell ids"
  # Relative links in markdown (docs/, README) point at files that exist.
  for cell in nb["cells"]:
    if cell["cell_type"] == "markdown":
      for target in re.findall(r"\]\(([^)#\s]+)\)", source(cell)):
        if "://" not in target:
          assert (path.parent / target).resolve().exists(), f"{path.name}: broken link {target}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  start = time.perf_counter()
  ns, shown = run_notebook(path)
  elapsed = time.perf_counter() - start
  print(f"{path.name}: ran in {elapsed:.1f} s")
  check = CHECKS.get(path.name)
  if check is not None:
    check(ns, shown)


def test_runner_reports_the_failing_cell(tmp_path):
  nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
      {"cell_type": "code", "id": "a", "metadata": {}, "execution_count": None, "outputs": [],
       "source": ["%matplotlib inline\n", "x = 1"]},
      {"cell_type": "markdown", "id": "b", "metadata": {}, "source": "text"},
      {"cell_type": "code", "id": "c", "metadata": {}, "execution_count": None, "outputs": [],
       "source": "y = x + 1\nraise ValueError('boom')"}]}
  path = tmp_path / "bad.ipynb"
  path.write_text(json.dumps(nb))
  with pytest.raises(pytest.fail.Exception, match=r"(?s)code cell 2 \(cell index 2\).*boom.*y = x \+ 1"):
    run_notebook(path)
