"""The notebooks in notebooks/ are committed with their outputs, and those outputs are current.

The notebooks run with scripts/refresh_notebooks.py's runner: every code cell in
order in one namespace, in this process (no Jupyter), each cell's stdout, stderr,
``display()`` calls and last value stored as notebook outputs with their MIME
types. A test re-runs each notebook and fails if a stored output differs from
what the code produces now (after normalising timings, memory addresses and
round-off; images by size and thumbnail: see the script's docstring). Fix a
stale notebook with ``python scripts/refresh_notebooks.py``. Per-notebook checks
then assert on the namespace the notebook left behind.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxsurgery as js

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "refresh_notebooks.py"
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _runner():
  spec = importlib.util.spec_from_file_location("refresh_notebooks", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["refresh_notebooks"] = module
  spec.loader.exec_module(module)
  return module


R = _runner()


def html_of(bundle: dict) -> str | None:
  html = bundle.get("text/html")
  return None if html is None else "".join(html)


# -- per-notebook checks ------------------------------------------------------------

def check_tour(ns: dict, shown: list) -> None:
  # (a) the tables were built from abstract shapes and displayed.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ns["old"].params))
  assert not ns["old_table"].unknown_primitives and not ns["new_table"].unknown_primitives
  kinds = {type(v) for v, _ in shown}
  assert {js.FeatureTable, js.CrossCheck, js.Report, js.Verification} <= kinds, kinds
  for v, bundle in shown:
    if getattr(type(v), "_repr_html_", None) is not None:
      assert "<table" in html_of(bundle), f"{type(v).__name__}._repr_html_ gave no table"

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
  assert {k: v for k, v in report.totals().items() if k in sums} == sums
  leaves = {l.path: l for l in report.leaves}
  assert leaves["torso/kernel"].counts["moved"] > 0 and leaves["core/kernel"].counts["zeroed"] == 16 * 48
  k_old = np.asarray(ns["trained"]["torso"]["kernel"])
  k_new = flat["torso/kernel"]
  np.testing.assert_array_equal(k_new[2, :32], k_old[1])        # mana moved with its feature
  np.testing.assert_array_equal(k_new[1], 0)                    # armor: zero in
  np.testing.assert_array_equal(flat["core/kernel"][32:], 0)    # new units: zero out
  assert ns["verification"].ok
  picture = next(v for v, _ in shown if isinstance(v, ns["jsd"].Picture))
  assert picture.info["row_labels"][:3] == ["hp", "armor", "mana ←1"]

  # (d) the pool and the optimizer state.
  assert jax.tree.leaves(ns["new_pool"])[0].shape[0] == len(ns["pool"]) == 6
  assert ns["pool_check"].ok
  mu = ns["new_opt_state"][0].mu
  np.testing.assert_array_equal(np.asarray(mu["torso"]["kernel"])[1], 0)


def check_lstm_pictures(ns: dict, shown: list) -> None:
  jsd, surgery = ns["jsd"], ns["surgery"]
  pictures = [v for v, bundle in shown if isinstance(v, jsd.Picture)]
  assert len(pictures) >= 7 and all("image/png" in b for v, b in shown if isinstance(v, jsd.Picture))
  overview, encoder = pictures[0], pictures[1]
  assert set(overview.info["tiles"]) == set(surgery.leaf_plans)
  assert encoder.info["row_labels"] == ["hp", "armor", "mana ←1", "enemy_dist ←5", "x ←2", "y ←3", "gold ←4"]
  leaf = surgery.leaf_plans["unit_encoder/kernel"]
  assert ns["sources"][1].tolist() == [jsd.ZEROED] * 16                       # armor: zero in
  assert jsd.source_counts(leaf)["moved"] == leaf.counts["moved"] == 5 * 16
  gates = [p for p in pictures if p.info.get("title", "").startswith("lstm/dense_i/kernel")][0]
  assert "24 ←16" in gates.info["col_labels"]                                 # gate 2, moved block by block
  assert ns["check"].ok and ns["lossy"].report.preserved is False
  assert any("gold" in r for r in ns["lossy"].report.reasons)
  assert not ns["state_report"].left_behind
  assert surgery.report.preserved is True


CHECKS = {"tour.ipynb": check_tour, "lstm_pictures.ipynb": check_lstm_pictures}


# -- tests ----------------------------------------------------------------------------

def test_the_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} >= set(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_stored_with_outputs(path):
  nb = R.load(path)
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict) and isinstance(nb["cells"], list) and nb["cells"]
  ids, count = [], 0
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
      count += 1
      assert cell["execution_count"] == count, f"{where}: not run in order (run scripts/refresh_notebooks.py)"
      assert not [o for o in cell["outputs"] if o["output_type"] == "error"], f"{where}: an error is stored"
    else:
      assert "outputs" not in cell and "execution_count" not in cell, where
  assert len(ids) == len(set(ids)), "duplicate cell ids"
  assert any(c.get("outputs") for c in nb["cells"]), f"{path.name} is stored without outputs"
  # Relative links and images in markdown (docs/, README, other notebooks) point at files that exist.
  for cell in nb["cells"]:
    if cell["cell_type"] == "markdown":
      for target in re.findall(r"\]\(([^)#\s]+)\)", R.source(cell)):
        if "://" not in target:
          assert (path.parent / target).resolve().exists(), f"{path.name}: broken link {target}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_current(path):
  start = time.perf_counter()
  fresh, ns, shown = R.execute(path)
  print(f"{path.name}: ran in {time.perf_counter() - start:.1f} s")
  problems = R.stale_outputs(fresh, R.load(path))
  assert not problems, (f"{path.name} has stale outputs (refresh with `python scripts/refresh_notebooks.py "
                        f"{path.relative_to(NOTEBOOK_DIR.parent)}`):\n  " + "\n  ".join(problems))
  check = CHECKS.get(path.name)
  if check is not None:
    check(ns, shown)


def tiny_notebook(tmp_path, sources: list[str], name="tiny.ipynb") -> Path:
  nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
      {"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
      for i, src in enumerate(sources)]}
  path = tmp_path / name
  path.write_text(json.dumps(nb))
  return path


def test_stale_outputs_are_reported_and_refreshed(tmp_path):
  path = tiny_notebook(tmp_path, ["x = 2\nprint('x is', x)", "x + 1", "import warnings\nwarnings.warn('careful')"])
  fresh, _, _ = R.execute(path)
  outputs = [c["outputs"] for c in fresh["cells"]]
  assert outputs[0] == [{"output_type": "stream", "name": "stdout", "text": ["x is 2\n"]}]
  assert outputs[1][0]["output_type"] == "execute_result" and outputs[1][0]["data"] == {"text/plain": ["3"]}
  assert outputs[2] == [{"output_type": "stream", "name": "stderr", "text": ["UserWarning: careful\n"]}]
  assert [c["execution_count"] for c in fresh["cells"]] == [1, 2, 3]
  # never run: every cell with an output is stale
  assert len(R.stale_outputs(fresh, R.load(path))) == 3
  R.save(fresh, path)
  assert R.stale_outputs(R.execute(path)[0], R.load(path)) == []
  # the code changes, the stored output does not: the message names the cell and the line
  stored = R.load(path)
  stored["cells"][0]["source"] = "x = 5\nprint('x is', x)"
  path.write_text(json.dumps(stored))
  problems = R.stale_outputs(R.execute(path)[0], R.load(path))
  assert len(problems) == 2, problems      # cell 1 prints 5, cell 2 gives 6
  assert problems[0].startswith("code cell 1 ('x = 5'), output 1: line 1: stored 'x is 2', now 'x is 5'")
  assert R.main([str(path), "--check"]) == 1 and R.main([str(path)]) == 0 and R.main([str(path), "--check"]) == 0


def test_volatile_parts_are_normalised_and_nothing_else():
  n = R.normalise
  assert n("ran in 1.25 s, then 35 ms") == n("ran in 3.5 s, then 7 ms") == "ran in <time>, then <time>"
  assert n("<Foo object at 0x7f3a2b4c5d60>") == n("<Foo object at 0x55d1e2f3a4b0>")
  assert n("max |old - new| = 2.4e-07") == n("max |old - new| = 0") and n("err 3e-05") != n("err 0")
  assert n("a  \nb\n\n") == "a\nb"
  for kept in ("16 steps", "(3, 4)s", "0x12", "1st", "1,415 copied", "mana ←1"):
    assert n(kept) == kept


def test_images_are_compared_by_size_and_content(tmp_path):
  from PIL import Image
  def png(color, size=(60, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
  out = lambda data: {"output_type": "display_data", "data": {"image/png": data, "text/plain": ["<Picture>"]},
                      "metadata": {}}
  assert R.output_difference(out(png((200, 200, 200))), out(png((201, 200, 200)))) is None
  assert "content differs" in R.output_difference(out(png((0, 0, 0))), out(png((250, 250, 250))))
  assert "size" in R.output_difference(out(png((0, 0, 0), (80, 40))), out(png((0, 0, 0))))


def test_displayed_values_get_their_mime_types(tmp_path):
  pytest.importorskip("matplotlib")
  path = tiny_notebook(tmp_path, [
      "import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd\n"
      "t = js.dependency_table(lambda p, x: x @ p['w'], {'w': jnp.ones((2, 3))}, jnp.ones((1, 2)), "
      "js.Features(['a', 'b']))\nt",
      "display(t.summary()); s = js.plan(t, t); jsd.show_surgery(s, 'w')"])
  fresh, _, shown = R.execute(path)
  (table_out,), (text_out, picture_out) = [c["outputs"] for c in fresh["cells"]]
  assert set(table_out["data"]) == {"text/plain", "text/html"} and "<table" in "".join(table_out["data"]["text/html"])
  assert text_out["output_type"] == "display_data" and set(text_out["data"]) == {"text/plain"}
  assert set(picture_out["data"]) == {"text/plain", "image/png"}
  assert base64.b64decode(picture_out["data"]["image/png"])[:4] == b"\x89PNG"
  assert len(shown) == 3


def test_runner_reports_the_failing_cell(tmp_path):
  nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
      {"cell_type": "code", "id": "a", "metadata": {}, "execution_count": None, "outputs": [],
       "source": ["%matplotlib inline\n", "x = 1"]},
      {"cell_type": "markdown", "id": "b", "metadata": {}, "source": "text"},
      {"cell_type": "code", "id": "c", "metadata": {}, "execution_count": None, "outputs": [],
       "source": "y = x + 1\nraise ValueError('boom')"}]}
  path = tmp_path / "bad.ipynb"
  path.write_text(json.dumps(nb))
  with pytest.raises(R.CellError, match=r"(?s)code cell 2 \(cell index 2\).*boom.*y = x \+ 1"):
    R.execute(path)
