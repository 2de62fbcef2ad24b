"""Optimizer state across a surgery: ``import jaxsurgery.optim`` (also ``js.optim``).

* :func:`adam`, :func:`adamw`, :func:`scale_by_adam`: optax's Adam with a per-element
  step count in the state, so that elements a surgery made fresh are bias-corrected
  as a fresh Adam would be (their first update is about ``lr``, not ``3 x lr``), while
  old elements continue their run exactly. :func:`jaxsurgery.remap_state` carries the
  counts (fresh elements restart at 0) and applies a clone's operator to the moments
  (``m / n``, ``v / n**2``).
* :func:`freeze_fresh`: an optax transform that holds the elements a surgery made
  fresh still for ``steps`` updates while their moments fill (OpenAI Five's
  "learning rate 0 for a while", per element).

See docs/integrations.md.
"""

from jaxsurgery._src.optim.adam import ScaleByAdamState, adam, adamw, scale_by_adam
from jaxsurgery._src.optim.freeze import FreezeFreshState, freeze_fresh

__all__ = ["adam", "adamw", "scale_by_adam", "ScaleByAdamState", "freeze_fresh", "FreezeFreshState"]
