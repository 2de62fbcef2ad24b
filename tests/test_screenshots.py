"""One HTML display rendered by a real browser (headless Chromium), as scripts/screenshots.py does.

Skipped where Chromium (``apt-get install chromium``) or Pillow is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jaxsurgery as js

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshots.py"
CHROMIUM = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")


@pytest.fixture(scope="module")
def shots():
  pytest.importorskip("PIL", reason="needs Pillow to read the screenshot")
  spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["screenshots"] = module     # its dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def small_table():
  def mlp(p, x):
    return jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
  params = {"w": jax.ShapeDtypeStruct((3, 5), jnp.float32), "b": jax.ShapeDtypeStruct((5,), jnp.float32),
            "v": jax.ShapeDtypeStruct((5, 2), jnp.float32)}
  x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
  return js.dependency_table(mlp, params, x, js.Features(["hp", "mana", "<b>x</b>"]))


def test_table_display_renders_in_chromium(shots, tmp_path):
  theme = shots.THEMES["jupyterlab-dark"]   # light text on dark: a blank result is likelier here
  png = tmp_path / "table.png"
  shot = shots.render(small_table()._repr_html_(), theme, png, width=640, binary=shutil.which(CHROMIUM),
                      window=(800, 600))
  assert png.exists() and png.stat().st_size > 1000
  width, height = shot.size
  # Cropped to the content: a header line, a 3-row parameter table and a 1-row output table.
  assert 200 < width < 700 and 80 < height < 400, shot.size
  assert shot.overflow == 0
  stats = shots.ink_stats(png, theme.background)
  assert stats["stddev"] > 10, stats     # not a blank page
  assert 0.02 < stats["ink"] < 0.6, stats  # text and rules, not a solid block


def test_blank_and_cut_off_images_are_errors(shots, tmp_path):
  from PIL import Image
  blank, cut = tmp_path / "blank.png", tmp_path / "cut.png"
  Image.new("RGB", (50, 40), (17, 17, 17)).save(blank)
  img = Image.new("RGB", (50, 40), (17, 17, 17))
  img.paste((200, 200, 200), (10, 30, 20, 40))      # content touching the bottom edge
  img.save(cut)
  with pytest.raises(RuntimeError, match="blank"):
    shots.crop_to_content(blank, (17, 17, 17))
  with pytest.raises(shots.CutOff):
    shots.crop_to_content(cut, (17, 17, 17))


def test_missing_chromium_names_the_package(shots, monkeypatch):
  monkeypatch.setenv("CHROMIUM", "")
  monkeypatch.setattr(shots.shutil, "which", lambda name: None)
  with pytest.raises(shots.ChromiumMissing, match="apt-get install chromium"):
    shots.chromium_binary()
