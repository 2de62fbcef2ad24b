"""Screenshots of jaxsurgery's notebook displays, rendered by a real browser (headless Chromium).

    python scripts/screenshots.py --out docs/screenshots
    python scripts/screenshots.py --out /tmp/shots --only surgery-report --themes jupyterlab-dark

Builds small but realistic objects through the public API (a feature table, two surgery reports,
two cross-checks, a training-state report), takes the ``_repr_html_()`` of each one (or, for a class
still without one, the ``jaxsurgery.display`` function that will back it, flagged in the index),
wraps it in a page that imitates a notebook's output area (JupyterLab and VS Code, light and dark:
their background, text colour and the table CSS they apply to HTML outputs), renders each page with
Chromium from the OS packages and writes ``<object>-<theme>.png`` plus an index (README.md) to
``--out``. Each page is rendered in a window larger than its content (enlarged if the content
reaches its edge), and the blank margins are cropped with Pillow. Output wider than a notebook's
output area (``--width``) is drawn in full, so that nothing is cut off, and reported: a notebook
would scroll it sideways.

It also renders the treescope view of a training state with its surgery (``treescope-*.png``,
JavaScript on) and writes the matplotlib pictures of the same plan (``picture-*.png``; no browser
needed for those); ``--five`` adds the overview of a 150M-parameter plan (benchmarks/models.py's
``five()`` widened: planning it takes a while).

Needs: ``apt-get install chromium`` (or ``CHROMIUM=/path/to/chrome``) and Pillow (``pip install
pillow``; it comes with matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Chromium as this machine's notes prescribe: root needs --no-sandbox, and the closed network
# refuses the connections Chromium makes on its own unless background networking is off.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                  "--mute-audio")
INSTALL_HINT = ("install it with `apt-get install chromium` (Debian/Ubuntu), or point the CHROMIUM "
                "environment variable at a Chrome/Chromium binary")


class ChromiumMissing(RuntimeError):
  """No Chromium binary was found."""


class CutOff(RuntimeError):
  """The content reached the edge of the window."""


# -- notebook hosts -------------------------------------------------------------------------------
#
# Values read from JupyterLab 4 (packages/theme-{light,dark}-extension/style/variables.css,
# rendermime/style/base.css, outputarea/style/base.css) and VS Code (the notebook webview's
# backLayerWebView.ts, themes Light Modern / Dark Modern). Only what reaches an HTML output is
# imitated: page colours, the output area's font, and the rules every <table> in an output gets.

_JUPYTER_CSS = """
body {{ margin: 0; background: {bg}; }}
#cell {{ padding: 5px 10px 5px 10px; }}
#out {{ color: {fg}; font-family: system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif;
  font-size: 14px; line-height: 1.6; padding: 0 20px 0 5px; }}
#out table {{ border-collapse: collapse; border-spacing: 0; border: none; color: {ui_fg};
  font-size: 13px; table-layout: fixed; margin: 0 0 1em 0; }}
#out thead {{ border-bottom: 1px solid {border}; vertical-align: bottom; }}
#out td, #out th, #out tr {{ vertical-align: middle; padding: 0.5em; line-height: normal;
  white-space: normal; max-width: none; border: none; text-align: right; }}
#out th {{ font-weight: bold; }}
#out tbody tr:nth-child(odd) {{ background: {bg}; }}
#out tbody tr:nth-child(even) {{ background: {row}; }}
#out ul {{ padding-left: 2em; list-style: disc; margin-bottom: 1em; }}
#out > *:last-child {{ margin-bottom: 0.5em; }}
#out pre {{ margin: 0; white-space: pre-wrap; word-break: break-all;
  font-family: Menlo, Consolas, 'DejaVu Sans Mono', monospace; font-size: 13px; line-height: 1.3077; }}
"""

_VSCODE_CSS = """
body {{ margin: 0; background: {bg}; }}
#cell {{ padding: 4px 8px 4px 8px; }}
#out {{ color: {fg}; font-family: system-ui, -apple-system, 'Segoe UI', Ubuntu, 'Droid Sans', sans-serif;
  font-size: 14px; }}
table, thead, tr, th, td, tbody {{ border: none !important; border-color: transparent;
  border-spacing: 0; border-collapse: collapse; }}
table, th, tr {{ vertical-align: middle; text-align: right; }}
thead {{ font-weight: bold; background-color: rgba(130, 130, 130, 0.16); }}
th, td {{ padding: 4px 8px; }}
tr:nth-child(even) {{ background-color: rgba(130, 130, 130, 0.08); }}
#out pre {{ margin: 0; white-space: pre-wrap; font-family: 'Droid Sans Mono', 'DejaVu Sans Mono', monospace;
  font-size: 14px; }}
"""


@dataclasses.dataclass(frozen=True)
class Theme:
  name: str
  background: tuple[int, int, int]
  css: str
  left: int             # x of the output area's left edge, from the paddings in ``css``


def _theme(name, template, background, **colors) -> Theme:
  left = 15 if template is _JUPYTER_CSS else 8
  bg = "#{:02x}{:02x}{:02x}".format(*background)
  return Theme(name, background, template.format(bg=bg, **colors), left)


THEMES = {t.name: t for t in (
    _theme("jupyterlab-light", _JUPYTER_CSS, (255, 255, 255), fg="rgba(0,0,0,0.87)",
           ui_fg="rgba(0,0,0,0.87)", border="#bdbdbd", row="#f5f5f5"),
    _theme("jupyterlab-dark", _JUPYTER_CSS, (17, 17, 17), fg="rgba(255,255,255,1)",
           ui_fg="rgba(255,255,255,0.87)", border="#616161", row="#212121"),
    _theme("vscode-light", _VSCODE_CSS, (255, 255, 255), fg="#3b3b3b"),
    _theme("vscode-dark", _VSCODE_CSS, (31, 31, 31), fg="#cccccc"),
)}


def page(body: str, theme: Theme, width: int) -> str:
  """A notebook-like page around one output's HTML; ``#out`` is the output area, ``width`` px wide.

  The output area lets wide content spill over visibly (a notebook would scroll it), so a
  screenshot shows all of it and its overflow can be measured; the table layout is the same.
  """
  return (f'<!doctype html><html><head><meta charset="utf-8"><style>{theme.css}'
          f"#out {{ width: {width}px; box-sizing: content-box; overflow: visible; }}</style></head>"
          f'<body><div id="cell"><div id="out">{body}</div></div></body></html>')


# -- Chromium -------------------------------------------------------------------------------------

def chromium_binary() -> str:
  """The Chromium to use: ``$CHROMIUM``, else the first of chromium / chromium-browser / google-chrome."""
  for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
    found = name and shutil.which(name)
    if found:
      return found
  raise ChromiumMissing("headless Chromium is needed for screenshots but was not found: " + INSTALL_HINT)


def _chromium(binary: str, args: list[str], timeout: float = 90) -> str:
  """Runs one headless Chromium with a fresh profile; returns its stdout."""
  with tempfile.TemporaryDirectory(prefix="jaxsurgery-chromium-") as profile:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  if proc.returncode:
    tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
    raise RuntimeError(f"{Path(binary).name} failed (exit {proc.returncode}) on {args[-1]}:\n{tail}")
  return proc.stdout


def chromium_version(binary: str) -> str:
  out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                       check=False).stdout
  return out.strip().splitlines()[0] if out.strip() else "unknown"


# -- images ---------------------------------------------------------------------------------------

def _pillow():
  try:
    from PIL import Image
  except ImportError as e:
    raise RuntimeError("Pillow is needed to crop and check screenshots: `pip install pillow` "
                       "(it comes with matplotlib)") from e
  return Image


def _delta(img, background):
  """Per-pixel distance (0..255, grey) of an RGB image from a plain ``background``."""
  from PIL import Image, ImageChops
  return ImageChops.difference(img, Image.new("RGB", img.size, background)).convert("L")


def content_box(img, background, tol: int = 6):
  """(left, top, right, bottom) of the pixels that differ from ``background``, or None if blank."""
  return _delta(img, background).point(lambda v: 255 if v > tol else 0).getbbox()


def crop_to_content(png: Path, background, pad: int = 10) -> tuple[int, int, int]:
  """Crops the blank right and bottom margins of ``png`` in place, keeping ``pad`` px.

  Returns:
    (width, height, right) of the cropped image, ``right`` being the content's right edge.

  Raises:
    RuntimeError: the image is blank, or its content touches the window's edge (it may be cut off).
  """
  Image = _pillow()
  img = Image.open(png).convert("RGB")
  box = content_box(img, background)
  if box is None:
    raise RuntimeError(f"{png} is blank: nothing differs from the background {background}")
  if box[3] >= img.height or box[2] >= img.width:
    raise CutOff(f"{png}: content reaches the edge of the {img.width}x{img.height} window")
  cropped = img.crop((0, 0, min(img.width, box[2] + pad), min(img.height, box[3] + pad)))
  # A 256-colour palette keeps antialiased text intact (these pages have ~1,000 colours) at half the size.
  cropped.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(png, optimize=True)
  return (*cropped.size, box[2])


def ink_stats(png: Path, background) -> dict:
  """Pixel standard deviation, and the fraction of pixels clearly unlike the background (text, rules)."""
  from PIL import ImageStat
  img = _pillow().open(png).convert("RGB")
  ink = _delta(img, background).point(lambda v: 255 if v > 24 else 0).histogram()[255]
  return {"stddev": ImageStat.Stat(img.convert("L")).stddev[0], "ink": ink / (img.width * img.height)}


@dataclasses.dataclass
class Shot:
  png: Path
  size: tuple[int, int]
  content_width: int     # px from the output area's left edge to the content's right edge
  overflow: int          # px beyond the output area (0: it fits)


def render(html_body: str, theme: Theme, png: Path, *, width: int = 960, binary: str | None = None,
           window: tuple[int, int] = (1800, 2400), settle_ms: int = 0) -> Shot:
  """Renders one output's HTML in a notebook-like page with headless Chromium, cropped to content.

  The window starts larger than any display here and doubles (up to 4 times) while the content
  reaches its edge; the blank margins are then cropped.

  Args:
    html_body: the output's HTML (e.g. ``obj._repr_html_()``).
    theme: one of ``THEMES``.
    png: where to write the screenshot.
    width: the output area's width in px; content spilling over it is kept and reported.
    binary: a Chromium binary (default: :func:`chromium_binary`).
    window: the first window size tried (at least 800x600, and wider than the output area).
    settle_ms: let the page's scripts and timers run this long (virtual time) before the shot.

  Returns:
    A :class:`Shot` with the final size and the overflow beyond ``width``.
  """
  binary = binary or chromium_binary()
  png.parent.mkdir(parents=True, exist_ok=True)
  # Below about 500x240 Chromium clamps the viewport but still writes a window-sized PNG, blank where
  # it painted nothing; so stay above that, and wider than the output area.
  window = (max(window[0], 800, width + theme.left + 100), max(window[1], 600))
  with tempfile.TemporaryDirectory(prefix="jaxsurgery-page-") as tmp:
    html_file = Path(tmp) / "page.html"
    html_file.write_text(page(html_body, theme, width), encoding="utf-8")
    for attempt in range(5):
      settle = [f"--virtual-time-budget={settle_ms}"] if settle_ms else []
      _chromium(binary, [f"--window-size={window[0]},{window[1]}", *settle, f"--screenshot={png}",
                         html_file.as_uri()])
      try:
        w, h, right = crop_to_content(png, theme.background)
        break
      except CutOff:
        if attempt == 4:
          raise
        window = (window[0] * 2, window[1] * 2)
  content_width = right - theme.left
  return Shot(png, (w, h), content_width, max(0, content_width - width))


# -- the objects ----------------------------------------------------------------------------------

LONG_FEATURE = "enemy_distance_to_nearest_allied_tower_normalized_by_map_diagonal"
HTML_FEATURE = '<b>gold</b> & "xp"'     # must show literally, not in bold
ITEMS = [f"item_slot_{i}" for i in range(24)]


def _policy_class():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  class UnitEncoder(nnx.Module):
    def __init__(self, n_features, *, norm, rngs):
      self.per_unit_feature_projection = nnx.Linear(n_features, 16, rngs=rngs)
      self.norm = nnx.LayerNorm(16, rngs=rngs) if norm else None

    def __call__(self, units):
      h = jax.nn.relu(self.per_unit_feature_projection(units))
      return (self.norm(h) if self.norm is not None else h).max(axis=-2)

  class Policy(nnx.Module):
    """A set encoder over units, a hero embedding, an LSTM over time, and heads."""

    def __init__(self, n_features, hidden, *, norm=False, value_head=False, rngs):
      self.unit_encoder = UnitEncoder(n_features, norm=norm, rngs=rngs)
      self.hero_embed = nnx.Embed(10, 16, rngs=rngs)
      self.lstm = nnx.OptimizedLSTMCell(16, hidden, rngs=rngs)
      self.policy_logits = nnx.Linear(hidden, 4, rngs=rngs)
      self.value_head = nnx.Linear(hidden, 1, rngs=rngs) if value_head else None
      self.hidden = hidden

    def __call__(self, obs):
      x = self.unit_encoder(obs["units"]) + self.hero_embed(obs["hero"])   # (B, T, 16)
      carry = (jnp.zeros((x.shape[0], self.hidden)), jnp.zeros((x.shape[0], self.hidden)))
      _, hs = jax.lax.scan(lambda c, xt: self.lstm(c, xt), carry, jnp.swapaxes(x, 0, 1))
      out = {"logits": self.policy_logits(hs[-1])}
      if self.value_head is not None:
        out["value"] = self.value_head(hs[-1])[..., 0]
      return out

  return Policy


@dataclasses.dataclass
class Version:
  fn: object
  params: object      # abstract (ShapeDtypeStruct) pure dict
  obs: dict
  spec: dict

  def init(self, seed: int):
    """Concrete parameters of the abstract shapes (values do not matter to the displays)."""
    import jax
    import numpy as np
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda sd: rng.normal(0, 0.1, sd.shape).astype(sd.dtype), self.params)


def policy_version(names, hidden, **kw) -> Version:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jaxsurgery as js
  Policy = _policy_class()
  abstract = nnx.eval_shape(lambda: Policy(len(names), hidden, rngs=nnx.Rngs(0), **kw))
  graph, state = nnx.split(abstract, nnx.Param)
  fn = lambda p, obs: nnx.merge(graph, p)(obs)
  obs = {"units": jax.ShapeDtypeStruct((2, 3, 5, len(names)), jnp.float32),
         "hero": jax.ShapeDtypeStruct((2, 3), jnp.int32)}
  return Version(fn, nnx.to_pure_dict(state), obs, {"units": js.Features(names), "hero": "hero"})


def build_objects() -> dict[str, object]:
  """The displayed objects, by file stem. All built through the public API.

  * ``feature-table``: the new policy's table (31 features, so the feature list is capped).
  * ``surgery-report``: a new observation inserted mid-list and a wider LSTM.
  * ``surgery-report-lossy``: a feature with HTML characters removed, a LayerNorm dropped and a
    value head added.
  * ``cross-check``: the old table against the gradient probe (agrees).
  * ``cross-check-failed``: a table built with a deliberately wrong rule for ``add``.
  * ``state-report``: an Adam state remapped with the surgery (``return_report=True``).
  """
  import jax
  import optax

  import jaxsurgery as js
  old_names = ["hp", "mana", "x", "y", LONG_FEATURE, HTML_FEATURE] + ITEMS
  new_names = ["hp", "armor", "mana", "x", "y", LONG_FEATURE, HTML_FEATURE] + ITEMS
  old, new = policy_version(old_names, 8), policy_version(new_names, 12)
  old_table = js.dependency_table(old.fn, old.params, old.obs, old.spec, strict=True)
  new_table = js.dependency_table(new.fn, new.params, new.obs, new.spec, strict=True)
  surgery = js.plan(old_table, new_table)

  normed = policy_version(old_names, 8, norm=True)
  lossy_names = [n for n in old_names if n != HTML_FEATURE]
  lossy = policy_version(lossy_names, 8, value_head=True)
  lossy_surgery = js.plan(js.dependency_table(normed.fn, normed.params, normed.obs, normed.spec),
                          js.dependency_table(lossy.fn, lossy.params, lossy.obs, lossy.spec))

  probe = js.gradient_table(old.fn, old.params, old.obs, old.spec, key=jax.random.key(0))
  with js.override_rule("add", js.rules.unary):   # wrong: drops the second operand's dependences
    wrong_table = js.dependency_table(old.fn, old.params, old.obs, old.spec)

  tx = optax.adam(1e-3)
  old_state = {"params": old.init(0), "opt_state": tx.init(old.init(0)), "step": 1000}
  new_state, state_report = js.remap_state(
      surgery, old_state, {"params": new.init(1), "opt_state": tx.init(new.init(1)), "step": 0}, return_report=True)
  check = js.cross_check(old_table, probe)
  EXTRAS.update(surgery=surgery, lossy_surgery=lossy_surgery, old_table=old_table, probe=probe, check=check,
                new_state=new_state, state_report=state_report)
  return {"feature-table": new_table, "surgery-report": surgery.report,
          "surgery-report-lossy": lossy_surgery.report, "cross-check": check,
          "cross-check-failed": js.cross_check(wrong_table, probe), "state-report": state_report}


#: What :func:`build_objects` made besides the displayed objects (the surgery, tables, new state).
EXTRAS: dict[str, object] = {}

_DISPLAY_FUNCTIONS = {"CrossCheck": "cross_check_html", "StateReport": "state_report_html"}


def html_of(obj, fallback: bool = False) -> str | None:
  """The object's HTML display, as a notebook would ask for it; None if its class has none.

  With ``fallback``, a class without ``_repr_html_`` is rendered by the ``jaxsurgery.display``
  function meant to back it (until the class's method is wired).
  """
  method = getattr(type(obj), "_repr_html_", None)
  if method is not None:
    return method(obj)
  name = _DISPLAY_FUNCTIONS.get(type(obj).__name__)
  if fallback and name:
    import jaxsurgery.display as jsd
    return getattr(jsd, name)(obj)
  return None


# -- treescope and pictures -----------------------------------------------------------------------

def treescope_pages() -> dict[str, str]:
  """The treescope view (HTML with scripts) of a training state with its surgery and state report."""
  import treescope

  import jaxsurgery.display as jsd
  jsd.register_treescope()
  state = {"params": EXTRAS["new_state"]["params"], "surgery": EXTRAS["surgery"],
           "state_report": EXTRAS["state_report"]}
  return {"treescope-state": treescope.render_to_html(state, compressed=False)}


def write_pictures(out: Path, five: bool = False) -> list[Path]:
  """The matplotlib pictures of the screenshot plan (and, with ``five``, of a Five-scale plan)."""
  import jaxsurgery.display as jsd
  surgery, check = EXTRAS["surgery"], EXTRAS["check"]
  pictures = {
      "picture-overview": jsd.show_surgery(surgery),
      "picture-leaf": jsd.show_surgery(surgery, "unit_encoder/per_unit_feature_projection/kernel"),
      "picture-gates": jsd.show_surgery(surgery, "lstm/dense_h/kernel"),
      "picture-lossy-leaf": jsd.show_surgery(EXTRAS["lossy_surgery"],
                                             "unit_encoder/per_unit_feature_projection/kernel"),
      "picture-table-check": jsd.show_table(EXTRAS["old_table"], "unit_encoder/per_unit_feature_projection/bias",
                                            probe=EXTRAS["probe"], check=check),
  }
  if five:
    pictures["picture-five-overview"] = jsd.show_surgery(five_surgery())
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for stem, picture in pictures.items():
    path = out / f"{stem}.png"
    path.write_bytes(picture.png())
    paths.append(path)
    print(f"{path}: {picture.info.get('title', stem)}")
  return paths


def five_surgery():
  """benchmarks/models.py's ``five()`` (152M parameters) gaining a unit feature and a wider LSTM (4096 -> 4352)."""
  import jaxsurgery as js
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  import models
  old, new = models.five(), models.five(models.FiveConfig(unit_features=44, lstm=4352))
  start = time.perf_counter()
  surgery = js.plan(js.dependency_table(old.fn, old.params, old.inputs, old.features),
                    js.dependency_table(new.fn, new.params, new.inputs, new.features))
  print(f"planned five() -> five(unit_features=44, lstm=4352) in {time.perf_counter() - start:.1f} s")
  return surgery


# -- index ----------------------------------------------------------------------------------------

def write_index(out: Path, shots: dict, missing: dict, width: int, version: str, *, via_function=(),
                treescope_shots=None, pictures=()) -> Path:
  lines = ["# Screenshots of the displays", "",
           "Generated by `python scripts/screenshots.py --out docs/screenshots` (do not edit by hand):",
           f"each object's `_repr_html_()` in a page that imitates a notebook output area {width} px wide",
           f"(JupyterLab 4 and VS Code, light and dark), rendered by headless Chromium ({version})",
           "and cropped to content; then the treescope view and the matplotlib pictures.", ""]
  for stem, per_theme in shots.items():
    lines.append(f"## {stem}")
    lines.append("")
    if stem in via_function:
      lines += [f"(Rendered by `jaxsurgery.display.{via_function[stem]}`: its class's `_repr_html_` is not wired "
                "yet, so a notebook still shows its text `repr()`.)", ""]
    for theme, shot in per_theme.items():
      note = (f"; {shot.content_width} px wide, {shot.overflow} px more than the output area, so a "
              "notebook scrolls it sideways") if shot.overflow else ""
      lines += [f"{theme} ({shot.size[0]}×{shot.size[1]}{note}):", "", f"![{stem}, {theme}]({shot.png.name})", ""]
  if missing:
    lines += ["## Objects without an HTML display", "",
              "A notebook shows these as their plain-text `repr()`:", ""]
    lines += [f"- {stem}: `{name}` has no `_repr_html_`" for stem, name in missing.items()]
    lines.append("")
  if treescope_shots:
    lines += ["## treescope", "", "`jaxsurgery.display.register_treescope()`, then `treescope.render_to_html` of a "
              "training state with its surgery and state report, each folded to its summary line (a click opens it: "
              "its HTML view, under treescope's \"Rich HTML representation\" fold, then its attributes).", ""]
    for stem, shot in treescope_shots.items():
      lines += [f"{stem} ({shot.size[0]}×{shot.size[1]}):", "", f"![{stem}]({shot.png.name})", ""]
  if pictures:
    lines += ["## Pictures (matplotlib)", "", "`jaxsurgery.display.show_surgery` / `show_table` of the same plan "
              "(`Picture.png()`).", ""]
    lines += [f"![{p.stem}]({p.name})\n" for p in pictures]
  index = out / "README.md"
  index.write_text("\n".join(lines), encoding="utf-8")
  return index


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="output folder")
  parser.add_argument("--themes", default=",".join(THEMES), help="comma-separated: " + ", ".join(THEMES))
  parser.add_argument("--only", default="", help="comma-separated object names (default: all, with pictures)")
  parser.add_argument("--width", type=int, default=960, help="the output area's width in px")
  parser.add_argument("--five", action="store_true", help="add the overview picture of a Five-scale plan")
  args = parser.parse_args(argv)
  bad = sorted({t for t in args.themes.split(",") if t} - set(THEMES))
  if bad:
    parser.error(f"unknown `--themes` {bad}; choose from {list(THEMES)}")
  themes = [THEMES[t] for t in args.themes.split(",") if t]
  start = time.perf_counter()
  objects = build_objects()
  print(f"built {len(objects)} objects in {time.perf_counter() - start:.1f} s with the public API")
  wanted = [s for s in args.only.split(",") if s] or list(objects)
  unknown = sorted(set(wanted) - set(objects))
  if unknown:
    parser.error(f"unknown `--only` names {unknown}; choose from {list(objects)}")
  pictures = [] if args.only else write_pictures(args.out, five=args.five)
  try:
    binary = chromium_binary()
  except ChromiumMissing as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  shots, missing, via_function = {}, {}, {}
  for stem in wanted:
    obj = objects[stem]
    body = html_of(obj, fallback=True)
    if body is None:
      missing[stem] = type(obj).__name__
      print(f"{stem}: {type(obj).__name__} has no _repr_html_; skipped")
      continue
    if html_of(obj) is None:
      via_function[stem] = _DISPLAY_FUNCTIONS[type(obj).__name__]
    for theme in themes:
      shot = render(body, theme, args.out / f"{stem}-{theme.name}.png", width=args.width, binary=binary)
      shots.setdefault(stem, {})[theme.name] = shot
      over = f", {shot.overflow} px wider than the output area" if shot.overflow else ""
      print(f"{shot.png}: {shot.size[0]}x{shot.size[1]}{over}")
  treescope_shots = {}
  if not args.only:
    for stem, body in treescope_pages().items():
      shot = render(body, THEMES["jupyterlab-light"], args.out / f"{stem}.png", width=args.width, binary=binary,
                    window=(1200, 1400), settle_ms=3000)
      treescope_shots[stem] = shot
      print(f"{shot.png}: {shot.size[0]}x{shot.size[1]}")
    index = write_index(args.out, shots, missing, args.width, chromium_version(binary), via_function=via_function,
                        treescope_shots=treescope_shots, pictures=pictures)
    print(f"index: {index}")
  print(f"done in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
