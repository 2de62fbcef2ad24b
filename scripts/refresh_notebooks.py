"""Run the notebooks in notebooks/ top to bottom and store their outputs in place.

    python scripts/refresh_notebooks.py                     # every notebook
    python scripts/refresh_notebooks.py notebooks/tour.ipynb
    python scripts/refresh_notebooks.py --check             # exit 1 if a stored output is stale

The notebooks are committed with their outputs, so that they render where the
repository is viewed (GitHub, an editor); tests/test_notebooks.py re-runs them
with this module and fails when a stored output no longer matches.

Cells run in order in one namespace in this process, the way a kernel runs them,
without Jupyter: stdout and stderr become ``stream`` outputs, ``display(x)`` a
``display_data`` output and a cell's last expression an ``execute_result``, each
with the MIME types a notebook front end asks for (``text/plain`` from ``repr``,
``text/html`` from ``_repr_html_``, ``image/png`` from ``_repr_png_``; matplotlib
figures left open by pyplot are shown as PNG, as the inline backend does).
Warnings are shown as ``Category: message`` on stderr, every time (so the output
does not depend on what ran before). IPython magics and shell escapes are skipped.

Comparison (:func:`stale_outputs`) ignores what legitimately varies between runs
and machines (:func:`normalise`): timings (``1.2 s``, ``35 ms``), memory
addresses (``0x7f...``), round-off printed in e-notation below 1e-5 (``2.4e-07``
reads as ``0``: a reduction may associate differently on another CPU) and
trailing whitespace. Images are compared by size
(within 2 px) and by a 48x48 thumbnail (mean difference under 3%), so a new
matplotlib or font version does not make them stale, but a changed picture does.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import io
import json
import linecache
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"


class CellError(RuntimeError):
  """A cell raised; the message names the notebook, the cell and its source."""


# -- running ------------------------------------------------------------------------------------

def load(path: Path) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def source(cell: dict) -> str:
  src = cell["source"]
  return src if isinstance(src, str) else "".join(src)


def strip_magics(src: str) -> str | None:
  """The cell without IPython magics / shell escapes (None: a cell magic, skip the whole cell)."""
  lines = src.split("\n")
  first = next((line.strip() for line in lines if line.strip()), "")
  if first.startswith("%%"):
    return None
  out = []
  for line in lines:
    stripped = line.lstrip()
    if stripped.startswith(("%", "!")):
      line = line[:len(line) - len(stripped)] + "pass  # " + stripped
    out.append(line)
  return "\n".join(out)


def _lines(text: str) -> list[str]:
  """Text as a notebook stores it: a list of lines, each ending in a newline but the last."""
  return text.splitlines(keepends=True)


def mime_bundle(value: Any) -> dict[str, Any]:
  """What a front end receives for ``value``: text/plain always, text/html and image/png when the class has them."""
  data: dict[str, Any] = {"text/plain": _lines(repr(value))}
  html = getattr(type(value), "_repr_html_", None)
  if html is not None:
    text = html(value)
    if text:
      data["text/html"] = _lines(text)
  png = getattr(type(value), "_repr_png_", None)
  if png is not None:
    raw = png(value)
    if raw:
      data["image/png"] = base64.b64encode(raw).decode("ascii")
  return data


class Outputs:
  """The outputs of one cell, in order (consecutive writes to one stream are merged)."""

  def __init__(self):
    self.items: list[dict] = []
    self.shown: list[tuple[Any, dict]] = []   # (value, mime bundle) of every displayed value

  def stream(self, name: str, text: str) -> None:
    if not text:
      return
    last = self.items[-1] if self.items else None
    if last is not None and last["output_type"] == "stream" and last["name"] == name:
      last["text"] = _lines("".join(last["text"]) + text)
    else:
      self.items.append({"output_type": "stream", "name": name, "text": _lines(text)})

  def display(self, value: Any, result_count: int | None = None) -> None:
    data = mime_bundle(value)
    self.shown.append((value, data))
    if result_count is None:
      self.items.append({"output_type": "display_data", "data": data, "metadata": {}})
    else:
      self.items.append({"output_type": "execute_result", "data": data, "metadata": {},
                         "execution_count": result_count})


class _Capture(io.StringIO):
  """A stdout/stderr stand-in that hands text to the cell's outputs as it is written."""

  def __init__(self, outputs: Outputs, name: str):
    super().__init__()
    self.outputs, self.name = outputs, name

  def write(self, text: str) -> int:
    self.outputs.stream(self.name, text)
    return len(text)


def _open_figures(outputs: Outputs) -> None:
  """Figures pyplot left open, shown and closed as the inline backend does at the end of a cell."""
  plt = sys.modules.get("matplotlib.pyplot")
  if plt is None:
    return
  for num in plt.get_fignums():
    fig = plt.figure(num)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    outputs.items.append({"output_type": "display_data", "metadata": {},
                          "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                                   "text/plain": _lines(repr(fig))}})
  plt.close("all")


def run_cell(src: str, ns: dict, filename: str, count: int) -> Outputs:
  """Runs one cell's source in ``ns``; returns its outputs. Exceptions propagate."""
  outputs = Outputs()
  tree = ast.parse(src, filename)
  last = None
  if tree.body and isinstance(tree.body[-1], ast.Expr) and not src.rstrip().endswith(";"):
    last = ast.Expression(tree.body.pop().value)
  def display(*values):  # IPython's display(), which notebooks may call
    for v in values:
      outputs.display(v)
  ns["display"] = display
  with warnings.catch_warnings(record=True) as caught, \
       contextlib.redirect_stdout(_Capture(outputs, "stdout")), \
       contextlib.redirect_stderr(_Capture(outputs, "stderr")):
    warnings.simplefilter("always")
    exec(compile(tree, filename, "exec"), ns)
    value = eval(compile(last, filename, "eval"), ns) if last is not None else None
  for w in caught:
    outputs.stream("stderr", f"{w.category.__name__}: {w.message}\n")
  _open_figures(outputs)
  if value is not None:
    outputs.display(value, result_count=count)
  return outputs


def execute(path: Path) -> tuple[dict, dict, list]:
  """Runs a notebook; returns (the notebook with fresh outputs, the namespace, every displayed (value, bundle)).

  Raises:
    CellError: a cell raised (the message has the cell's number, source and traceback).
  """
  nb = load(path)
  ns: dict = {"__name__": "__main__"}
  shown: list = []
  count = 0
  for index, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    count += 1
    raw = source(cell)
    src = strip_magics(raw)
    cell["execution_count"], cell["outputs"] = count, []
    if src is None or not src.strip():
      continue
    filename = f"<{path.name} code cell {count}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    try:
      outputs = run_cell(src, ns, filename, count)
    except Exception as e:  # noqa: BLE001  (report which cell failed, with its source)
      raise CellError(f"{path.name}: code cell {count} (cell index {index}) raised {type(e).__name__}: {e}\n"
                      f"--- cell source ---\n{raw}\n--- traceback ---\n{traceback.format_exc()}") from e
    cell["outputs"] = outputs.items
    shown += outputs.shown
  return nb, ns, shown


def save(nb: dict, path: Path) -> None:
  """Writes a notebook the way Jupyter does (1-space indent, unicode, trailing newline)."""
  path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# -- comparing ----------------------------------------------------------------------------------

_VOLATILE = [
    (re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "0x…"),                                    # memory addresses
    (re.compile(r"\b\d+(?:\.\d+)?(?:e-?\d+)?\s?(?:ns|µs|us|ms|s|min)\b(?![\w(])"), "<time>"),  # timings
    (re.compile(r"-?\b\d+(?:\.\d+)?e-(?:0*[6-9]|0*[1-9]\d+)\b"), "0"),                    # round-off below 1e-5
    (re.compile(r"[ \t]+$", re.M), ""),                                                  # trailing blanks
]


def normalise(text: str) -> str:
  """``text`` without what varies between runs and machines: timings, addresses, round-off, trailing blanks."""
  for pattern, repl in _VOLATILE:
    text = pattern.sub(repl, text)
  return text.rstrip("\n")


def _text(value: Any) -> str:
  return value if isinstance(value, str) else "".join(value)


def _summary(output: dict) -> tuple:
  kind = output["output_type"]
  if kind == "stream":
    return (kind, output["name"])
  if kind == "error":
    return (kind, output.get("ename"))
  return (kind, tuple(sorted(output.get("data", {}))))


def _image_difference(a: str, b: str) -> str | None:
  """Why two base64 PNGs differ (size, or thumbnail content), or None if they match."""
  from PIL import Image, ImageChops, ImageStat
  ia, ib = (Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB") for x in (a, b))
  if abs(ia.width - ib.width) > 2 or abs(ia.height - ib.height) > 2:
    return f"image size {ib.width}x{ib.height} is now {ia.width}x{ia.height}"
  ta, tb = (im.resize((48, 48), Image.Resampling.BOX) for im in (ia, ib))
  diff = sum(ImageStat.Stat(ImageChops.difference(ta, tb)).mean) / 3 / 255
  return f"image content differs ({100 * diff:.1f}% mean difference of 48x48 thumbnails)" if diff > 0.03 else None


def _first_difference(new: str, old: str) -> str:
  a, b = new.splitlines(), old.splitlines()
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return f"line {i + 1}: stored {y[:160]!r}, now {x[:160]!r}"
  return f"stored {len(b)} lines, now {len(a)}"


def output_difference(new: dict, old: dict) -> str | None:
  """Why one fresh output differs from the stored one (after :func:`normalise`), or None."""
  if _summary(new) != _summary(old):
    return f"stored {_summary(old)}, now {_summary(new)}"
  if new["output_type"] == "stream":
    a, b = normalise(_text(new["text"])), normalise(_text(old["text"]))
    return None if a == b else _first_difference(a, b)
  for mime, value in new.get("data", {}).items():
    stored = old["data"][mime]
    if mime == "image/png":
      why = _image_difference(_text(value), _text(stored))
    else:
      a, b = normalise(_text(value)), normalise(_text(stored))
      why = None if a == b else f"{mime} " + _first_difference(a, b)
    if why:
      return why
  return None


def stale_outputs(fresh: dict, stored: dict) -> list[str]:
  """One message per code cell whose stored outputs no longer match a fresh run (empty: up to date)."""
  problems = []
  cells = [(c, s) for c, s in zip(fresh["cells"], stored["cells"]) if c["cell_type"] == "code"]
  if len(fresh["cells"]) != len(stored["cells"]):
    problems.append("the notebook changed while it ran")
  for n, (new, old) in enumerate(cells, 1):
    a, b = new.get("outputs", []), old.get("outputs", [])
    where = f"code cell {n} ({source(new).strip().splitlines()[0][:60] if source(new).strip() else ''!r})"
    if len(a) != len(b):
      problems.append(f"{where}: {len(b)} stored outputs, the code now gives {len(a)} "
                      f"({[_summary(o) for o in b]} vs {[_summary(o) for o in a]})")
      continue
    for i, (x, y) in enumerate(zip(a, b)):
      why = output_difference(x, y)
      if why:
        problems.append(f"{where}, output {i + 1}: {why}")
  return problems


# -- command line -------------------------------------------------------------------------------

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
  parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a stored output is stale")
  args = parser.parse_args(argv)
  paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
  stale = 0
  for path in paths:
    start = time.perf_counter()
    try:
      nb, _, _ = execute(path)
    except CellError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    problems = stale_outputs(nb, load(path))
    took = time.perf_counter() - start
    if args.check:
      stale += bool(problems)
      print(f"{path}: {'stale' if problems else 'up to date'} ({took:.1f} s)")
      for p in problems:
        print(f"  {p}")
    elif problems:   # unchanged notebooks are left alone (no churn from re-encoded images)
      save(nb, path)
      print(f"{path}: refreshed ({took:.1f} s)")
    else:
      print(f"{path}: up to date ({took:.1f} s)")
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
