"""jaxsurgery: neural network surgery for JAX and Flax."""

from jaxsurgery._src.features import Features, FeatureSpecError

__version__ = "0.1.0"
