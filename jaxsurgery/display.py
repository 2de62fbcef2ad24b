"""Look before you apply: pictures of plans and tables, HTML views, and treescope renderers.

Pictures (matplotlib, the ``viz`` extra; imported only when a picture is drawn):

* :func:`show_surgery` ``(surgery, path)``: one new leaf, every element coloured by
  where its value comes from (copied, moved, recipe, fresh, zeroed), rows named by
  their features, moved rows with their old index; ``path=None``: :func:`show_overview`,
  every leaf of the plan at once.
* :func:`show_table` ``(table, path, probe=..., check=...)``: which features touch a
  leaf, with a gradient probe's and a cross-check's differences on the same picture.

Each returns a :class:`Picture`, which a notebook shows once and which saves with
``picture.savefig("plan.png")``. :func:`element_sources` gives the element classes
as an array (numpy only). The HTML views (``table_html``, ``report_html``,
``cross_check_html``, ``state_report_html``) are what notebooks display.
:func:`register_treescope` makes treescope render these objects inside any pytree
(the ``treescope`` extra). See docs/display.md.

Example:
  >>> import jax.numpy as jnp, jaxsurgery as js, jaxsurgery.display as jsd
  >>> fn = lambda p, x: x @ p["w"]
  >>> old = js.dependency_table(fn, {"w": jnp.ones((2, 3))}, jnp.ones((1, 2)), js.Features(["hp", "mana"]))
  >>> new = js.dependency_table(fn, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)), js.Features(["hp", "armor", "mana"]))
  >>> surgery = js.plan(old, new)
  >>> [jsd.SOURCES[c] for c in jsd.element_sources(surgery.leaf_plans["w"])[:, 0]]
  ['copied', 'zeroed', 'moved']
  >>> jsd.show_surgery(surgery, "w").info["row_labels"]
  ['hp', 'armor', 'mana ←1']
"""

from jaxsurgery._src.display import cross_check_html, report_html, state_report_html, table_html
from jaxsurgery._src.display_sources import (
  COPIED,
  FRESH,
  MOVED,
  RECIPE,
  SOURCES,
  ZEROED,
  element_sources,
  source_counts,
  strided_index,
)
from jaxsurgery._src.display_treescope import register_treescope, treescope_repr
from jaxsurgery._src.display_viz import SOURCE_COLORS, Picture, show_overview, show_surgery, show_table

__all__ = [
    # pictures
    "show_surgery", "show_overview", "show_table", "Picture", "SOURCE_COLORS",
    # element classes
    "element_sources", "source_counts", "strided_index", "SOURCES", "COPIED", "MOVED", "RECIPE", "FRESH", "ZEROED",
    # HTML views
    "table_html", "report_html", "cross_check_html", "state_report_html",
    # treescope
    "register_treescope", "treescope_repr",
]
