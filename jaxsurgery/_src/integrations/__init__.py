"""Framework integrations (Flax NNX / Linen, Orbax). Public entry points: ``jaxsurgery.flax``, ``jaxsurgery.orbax``.

Each module here imports its framework; the core (:mod:`jaxsurgery._src.surgery.state`) imports none of them.
"""
